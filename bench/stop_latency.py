"""How long a SIGTERM takes to become a checkpoint on disk: the number a preemption notice must cover.

Runs `train.py` with the given flags (a fresh, relative --workdir), sends
SIGTERM `--after_s` seconds after the train step has compiled, and reports the
seconds from the signal to the checkpoint's step directory appearing in
`<workdir>/checkpoints/` (Orbax renames a step into place only when complete)
and to the process's exit, with the step saved. docs/training.md has the
numbers.

    python -m bench.stop_latency --after_s=40 -- --config=configs/fashion.py \
        --workdir=workdir/stop_measure --config.data.tfds_data_dir=.cache/tfds
"""
import argparse
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMPILED = "Compiled the train step"


def _workdir(train_args) -> Path:
    for arg in train_args:
        if arg.startswith("--workdir="):
            return Path(arg.split("=", 1)[1])
    sys.exit("error: pass train.py's --workdir=DIR after --")


def _saved_steps(workdir: Path) -> set:
    directory = workdir / "checkpoints"
    return {p.name for p in directory.iterdir() if p.name.isdigit()} if directory.is_dir() else set()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--after_s", type=float, default=40.0,
                        help="seconds after the compile line to send SIGTERM")
    parser.add_argument("train_args", nargs="+", help="train.py's flags, after --")
    args = parser.parse_args()
    workdir = _workdir(args.train_args)
    if workdir.exists():
        sys.exit(f"error: {workdir} exists; the measurement needs a fresh workdir")
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args.train_args],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    compiled = threading.Event()

    def echo():
        for line in process.stdout:
            print(f"[{time.monotonic():10.1f}] {line}", end="", flush=True)
            if COMPILED in line:
                compiled.set()
    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    while not compiled.wait(1.0):
        if process.poll() is not None:
            sys.exit(f"error: train.py exited with {process.returncode} before compiling")
    time.sleep(args.after_s)
    before = _saved_steps(workdir)
    process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    on_disk = None  # (seconds after the signal, step) of the first new checkpoint
    while True:
        done = process.poll() is not None
        new = _saved_steps(workdir) - before
        if new and on_disk is None:
            on_disk = (time.monotonic() - signalled, max(new, key=int))
        if done:
            break
        time.sleep(0.1)
    exited = time.monotonic() - signalled
    reader.join()
    print(f"SIGTERM {args.after_s:.0f} s after compiling; exit status {process.returncode}")
    if on_disk is None:
        print(f"no new checkpoint; exited after {exited:.1f} s")
    else:
        print(f"checkpoint step {on_disk[1]} on disk {on_disk[0]:.1f} s after SIGTERM; "
              f"process exited after {exited:.1f} s")


if __name__ == "__main__":
    main()
