"""Where a CPU training step's time goes: XLA ops by time, and by UNet module (issue 7).

Traces one step of the Fashion-MNIST config's JAX train step (batch 128) with
the JAX profiler, and sums the XLA:CPU ops' time by op name and by the UNet
module their HLO metadata names, forward and backward apart. Found with it:
XLA recomputing the depthwise conv's 49 taps inside a transpose, and the
strided conv's slow input gradient (bench/NOTES_cpu.md).

    .venv/bin/python bench/step_profile.py [--config cifar10] [--batch 128] [--top 30]
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark as bm  # noqa: E402  (sets the project's XLA flags before JAX starts)
import jax  # noqa: E402


def op_totals(trace_path):
    """Microseconds and count per XLA op name in a trace.json.gz (runtime, Python and while
    loops, whose body ops are listed themselves, left out)."""
    with gzip.open(trace_path, "rt") as f:
        events = json.load(f)["traceEvents"]
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and not name.startswith("$") and "Thunk" not in name \
                and "PjRt" not in name and "Pjit" not in name and not name.startswith("while"):
            total[name] += e.get("dur", 0)
            count[name] += 1
    return total, count


def op_modules(hlo_text):
    """HLO instruction name -> 'fwd <module>' / 'bwd <module>' from its op_name metadata."""
    modules = {}
    for line in hlo_text.splitlines():
        m = re.match(r'\s*%([\w.\-]+) = .*op_name="([^"]+)"', line)
        if m:
            path = m.group(2)
            direction = "bwd" if "transpose(jvp(" in path else "fwd"
            module = re.search(r"\)/(\w+)/", path)
            modules[m.group(1)] = f"{direction} {module.group(1) if module else path[:40]}"
    return modules


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="fashion", choices=["fashion", "cifar10"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    config = bm.bench_config(args.config, args.batch)
    trainer = bm.JaxTrainer(config, bm.make_train_step)
    step = trainer.step
    images = trainer.put(bm.synthetic_images(config, args.batch))
    state = trainer.init_state()
    for _ in range(2):
        start = time.perf_counter()
        state, metrics = step(state, images)
        jax.block_until_ready(metrics)
    print(f"{args.config}, batch {args.batch}: step {time.perf_counter() - start:.3f} s "
          f"(XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})")
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            state, metrics = step(state, images)
            jax.block_until_ready(metrics)
        total, count = op_totals(glob.glob(f"{log_dir}/**/*.trace.json.gz", recursive=True)[0])
    modules = op_modules(step.as_text())
    print(f"\nops (ms, calls; {sum(total.values()) / 1e3:.0f} ms in all)")
    for name, us in total.most_common(args.top):
        print(f"{us / 1e3:8.1f} {count[name]:5d}  {name[:45]:45s} {modules.get(name, '')}")
    by_module = collections.Counter()
    for name, us in total.items():
        by_module[modules.get(name, "(no op_name: layout copies XLA added)")] += us
    print("\nby module (ms)")
    for module, us in by_module.most_common(args.top):
        print(f"{us / 1e3:8.1f}  {module}")


if __name__ == "__main__":
    main()
