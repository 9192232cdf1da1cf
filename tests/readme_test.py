"""The README's commands, run as a user runs them: a command edited in the docs is a command tested.

Which commands: every line of every fenced shell block (```bash, sh, shell, console) of
README.md and docs/*.md (a command continued with a backslash or a quote is one; comments
dropped). Indented blocks in docs/ are reference listings with `...` placeholders and are not
collected; the README has none. Each collected command is either in `QUICK_START` or
`CONDITIONAL` (run, in order, in one fresh copy of the repository, the working directory
its root, the relative paths as written) or in `SKIPPED` with the reason; any other command
fails `test_every_documented_command_is_known`, and so does an entry here that the docs
no longer have.

What CI changes, and nothing else:
- `VENV_SETUP` (`python3 -m venv .venv && . .venv/bin/activate && pip install -e . && `) is
  dropped: the commands run in the environment running the tests, `python` on PATH being
  this interpreter and the copy on PYTHONPATH (what `pip install -e .` in it gives).
- train.py gets `TINY` appended: a small ResNet UNet (the design's ConvNeXt compiles for
  minutes on a CPU) and 20 steps; the diffusion stays the design's (T = 200). sample.py and
  evaluate.py commands get the image counts of their step appended (absl: the last wins).
- The environment: TFDS_DATA_DIR is a fresh directory for the README's quick start (its
  first command prepares Fashion-MNIST from `../shared/data/fashion_mnist`, which the copy's
  parent links to the tests' official files) and the prepared test data for the docs'
  conditional one; the tests' JAX compilation cache; `/path/to/...` placeholders become
  those directories.
"""
import dataclasses
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest

from tests.support import train_helpers

REPO = train_helpers.REPO
DOCUMENTS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
SHELL_LANGUAGES = ("bash", "sh", "shell", "console")
VENV_SETUP = "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && "
TINY = ("--config.model.dim=8", "--config.model.dim_mults=(1,2)",
        "--config.model.use_convnext=False", "--config.training.batch_size=16",
        "--config.training.num_train_steps=20", "--config.training.log_every=5",
        "--config.training.checkpoint_every=10", "--config.training.sample_every=0",
        "--config.training.compilation_cache_dir=")
TIMEOUT_S = 600


@dataclasses.dataclass(frozen=True)
class Step:
    command: str  # as documented, without VENV_SETUP
    append: Tuple[str, ...] = ()  # CI's flags
    expect: str = ""  # a regex the output must match
    files: Tuple[str, ...] = ()  # written, relative to the repository root
    interrupt_at: Optional[str] = None  # Ctrl-C when a line starts with this (exit 130)


TRAIN = "python train.py --config=configs/fashion.py --workdir=workdir/fashion"
# The README's quick start as a user follows it, and the docs' commands on the same run.
QUICK_START = [
    Step("DDPM_JAX_MANUAL_DIR=../shared/data/fashion_mnist " + TRAIN, TINY,
         r"Prepared 'fashion_mnist' in \d+ s\n(.*\n)*Data: fashion_mnist 'train', 60,000 images"
         r"(.*\n)*Stopped at step (\d+): checkpoint saved in \S+/workdir/fashion/checkpoints; "
         r"run the same command to resume", interrupt_at="step 5/20 "),
    Step(TRAIN, TINY, r"resuming from step \d+ to 20(.*\n)*step 20/20 (.*\n)*"
         r"Finished training at step 20", ("workdir/fashion/checkpoints/20",)),
    Step(TRAIN + " --config.data.manual_dir=/path/to/fashion_mnist "
         "--config.data.tfds_data_dir=/path/to/tfds", TINY, r"Finished training at step 20"),
    Step("python sample.py --workdir=workdir/fashion --num_images=64 --output=samples.png "
         "--gif=diffusion.gif", (),
         r"Wrote \S*samples\.png \(\d+x\d+ px\), \S*diffusion\.gif \(\d+ frames of 16 images\)",
         ("samples.png", "diffusion.gif")),
    Step("python evaluate.py --workdir=workdir/fashion --bpd_images=1000", ("--bpd_images=16",),
         r"step 20: bits/dim \d+\.\d+(.*\n)*results: \S*workdir/fashion/eval/step_20\.json",
         ("workdir/fashion/eval/step_20.json",)),
    Step("python sample.py --workdir=workdir/fashion --num_images=64 --output=samples.png "
         "--gif=diffusion.gif --gif_images=16 --save_npz=samples.npz", (),
         r"Wrote \S*samples\.png \(.*\), \S*samples\.npz, \S*diffusion\.gif",
         ("samples.npz",)),
    Step("python sample.py --workdir=workdir/fashion --sampler=ddim --steps=50 "
         "--ddim_eta=0.0", (), r"\(ddim, 50 steps, eta 0\.0"),
    Step("python sample.py --workdir=workdir/fashion --sampler=dpmpp --steps=20", (),
         r"\(dpmpp, 20 steps, order 2, time spacing(.*\n)*Wrote \S*samples\.png"),
    Step("python sample.py --workdir=workdir/fashion --sampler=dpmpp --steps=10 "
         "--step_spacing=logsnr --solver_order=3", (),
         r"\(dpmpp, 10 steps, order 3, logsnr spacing"),
]
# docs/conditional.md's opening commands, after docs/evaluation.md's classifier command.
CLASSIFIER = Step("python train_classifier.py --output_dir=classifiers/fashion_mnist",
                  ("--epochs=1", "--num_train_images=1000", "--min_accuracy=0"),
                  r"saved to \S*classifiers/fashion_mnist", ("classifiers/fashion_mnist",))
CONDITIONAL = [
    Step("python train.py --config=configs/fashion_cond.py --workdir=runs/fashion_cond", TINY,
         r"10 classes(.*\n)*Finished training at step 20"),
    Step("python sample.py --workdir=runs/fashion_cond --class_label=3 --guidance=2 "
         "--output=dresses.png", (), r"classes \[3\], guidance 2\.0(.*\n)*Wrote \S*dresses\.png",
         ("dresses.png",)),
    Step("python sample.py --workdir=runs/fashion_cond --class_label=all --num_images=80", (),
         r"classes \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9\](.*\n)*Wrote \S*samples\.png", ("samples.png",)),
    Step("python sample.py --workdir=runs/fashion_cond --class_label=all --num_images=80 "
         "--sampler=dpmpp --steps=20", (),
         r"\(dpmpp, 20 steps, order 2, time spacing.*classes \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9\]"
         r"(.*\n)*Wrote \S*samples\.png", ("samples.png",)),
    Step("python evaluate.py --workdir=runs/fashion_cond --fid_samples=1000 --guidance=0,1,2,4 "
         "--classifier_dir=classifiers/fashion_mnist", ("--fid_samples=40", "--fid_reference_images=400"),
         r"step 20, guidance 4: (.*\n)*guidance curve: "
         r"\S*runs/fashion_cond/eval/guidance_step_20\.png",
         ("runs/fashion_cond/eval/guidance_step_20.png",)),
]
QUALITY_RUN = "tests/experiments_quality_test.py runs experiments/quality/run.py on a tiny budget"
COMBINE = ("needs the two runs above; tests/experiments_quality_test.py runs the command on "
           "runs it writes")
CLOUD = "needs Google Cloud (gcloud, a bucket, a TPU VM); gs:// paths are tested against a " \
        "local Cloud Storage emulator in tests/storage_test.py"
COND_CPU_RUN = ("docs/conditional.md's 6,000-step CPU run (about 45 minutes on a 2-core CPU) "
                "and the commands on its workdir; the quick-start commands above cover the "
                "same flags")
SKIPPED: Dict[str, str] = {
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]' && "
    "GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python -m pytest -q tests":
        "the test suite itself: CI runs it (.ci/run)",
    "python -m experiments.quality.run --data_npz .gpu/fashion_mnist.npz --classifier_dir "
    ".gpu/classifier.msgpack --out_dir workdir_quality/run1200_best --recipes design "
    "scaled-v-minsnr --steps 1200 --batch_size 64 --num_samples 400 --bpd_images 0 --no_torch "
    "--no_params --compile_threads 2 --variants raw-ddpm200-eq11 ema-ddpm200-clip "
    "ema-dpmpp2m20-clip ema-dpmpp2m10-clip ema-dpmpp2m15-clip ema-ddim50-clip --recipe_variants "
    "ema-ddpm200-clip ema-dpmpp2m20-clip ema-dpmpp2m10-clip ema-dpmpp2m15-clip ema-ddim50-clip":
        f"two hours on a 2-core CPU; {QUALITY_RUN}",
    "python -m experiments.quality.run --data_npz .gpu/fashion_mnist.npz --classifier_dir "
    ".gpu/classifier.msgpack --out_dir workdir_quality/run1200_levers --recipes scaled scaled-v "
    "--steps 1200 --batch_size 64 --num_samples 400 --bpd_images 0 --no_torch --no_params "
    "--compile_threads 2 --recipe_variants ema-dpmpp2m20-clip ema-ddim50-clip ema-ddpm200-clip":
        f"two hours on a 2-core CPU; {QUALITY_RUN}",
    "python -m experiments.quality.combine workdir_quality/run1200_best "
    "workdir_quality/run1200_levers --out_dir workdir_quality/run1200_all":
        COMBINE,
    "python -m experiments.quality.run --data_npz .gpu/fashion_mnist.npz --classifier_dir "
    ".gpu/classifier.msgpack --out_dir workdir_quality/run1200_more --recipes scaled-eps-minsnr "
    "scaled-x0 --steps 1200 --batch_size 64 --num_samples 400 --bpd_images 0 --no_torch "
    "--no_params --compile_threads 2 --recipe_variants ema-dpmpp2m20-clip ema-ddpm200-clip":
        f"an hour and a half on a 2-core CPU; {QUALITY_RUN}",
    "python -m experiments.quality.run --data_npz .gpu/fashion_mnist.npz --classifier_dir "
    ".gpu/classifier.msgpack --out_dir workdir_quality/run1200_ref --recipes design --steps 1200 "
    "--batch_size 64 --num_samples 400 --bpd_images 0 --no_torch --no_params --compile_threads 2 "
    "--variants raw-ddpm200-eq11":
        f"42 minutes on a 2-core CPU; {QUALITY_RUN}",
    "python -m experiments.quality.combine workdir_quality/run1200_ref "
    "workdir_quality/run1200_more --out_dir workdir_quality/run1200_more_all":
        COMBINE,
    'python -m pytest -q tests -m "not slow"':
        "a part of the suite by marker: CI runs the whole (.ci/run)",
    'python -m pytest -q tests -m "not subprocess"':
        "a part of the suite by marker: CI runs the whole (.ci/run)",
    "TFDS_DATA_DIR=.cache/tfds DDPM_JAX_MANUAL_DIR=../shared/data/fashion_mnist python "
    "-m experiments.quality.run --classifier_dir=workdir_quality/classifier --out_dir=workdir_quality/"
    "run1200 --steps 1200 --batch_size 64 --num_samples 400 --eval_at 400 800 --bpd_images 8 "
    "--torch_threads 2 --ema_start 0 --variants design-ddpm200-eq11 designnet-ddpm200-eq11 "
    "raw-ddpm200-eq11 ema-ddpm200-clip ema-ddpm200-eq11 raw-ddpm200-clip ema-ddim50-clip "
    "raw-ddim50-clip":
        f"71 minutes on a 2-core CPU; {QUALITY_RUN}",
    "python -m bench.stop_latency --after_s=40 -- --config=configs/fashion.py "
    "--workdir=workdir/stop_measure":
        "a measurement of minutes on the design's network; tests/loop_test.py tests the "
        "bound it measures (at most two calls in flight)",
    "pip install -e .": "the environment the tests run in (.ci/run installs '.[test]')",
    "pip install -e '.[test]'": "the environment the tests run in (.ci/run installs it)",
    "pip install -e '.[cuda]'": "needs an NVIDIA GPU",
    "pip install -e '.[tpu]'": "needs a Cloud TPU VM",
    "gcloud storage cp -r ~/tensorflow_datasets/cifar10 gs://BUCKET/tensorflow_datasets/": CLOUD,
    "gcloud storage buckets create gs://BUCKET --location=REGION": CLOUD,
    "gcloud storage buckets add-iam-policy-binding gs://BUCKET "
    "--member=serviceAccount:SERVICE_ACCOUNT --role=roles/storage.objectAdmin": CLOUD,
    "git clone <this repository> ddpm-jax && cd ddpm-jax": CLOUD,
    "python3 -m venv .venv && . .venv/bin/activate": CLOUD,
    "pip install -e . && pip install 'jax[tpu]==0.10.2'": CLOUD,
    "python train.py --config=configs/cifar10.py --workdir=gs://BUCKET/runs/cifar10 "
    "--config.data.tfds_data_dir=gs://BUCKET/tensorflow_datasets": CLOUD,
    'gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command=" git clone <this '
    'repository> ddpm-jax && cd ddpm-jax && python3 -m venv .venv && . .venv/bin/activate && '
    "pip install -e . && pip install 'jax[tpu]==0.10.2'\"": CLOUD,
    'gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command=" cd ddpm-jax && '
    ". .venv/bin/activate && python train.py --config=configs/cifar10.py "
    "--workdir=gs://BUCKET/runs/cifar10 --config.data.tfds_data_dir=gs://BUCKET/"
    'tensorflow_datasets"': CLOUD,
    "python sample.py --workdir=gs://BUCKET/runs/cifar10 "
    "--output=gs://BUCKET/runs/cifar10/grid.png": CLOUD,
    "python evaluate.py --workdir=gs://BUCKET/runs/cifar10 --bpd_images=1000": CLOUD,
    "python train.py --config=configs/tiny_cond.py --workdir=runs/cond "
    "--config.diffusion.timesteps=200 --config.model.dim=16 --config.training.batch_size=32 "
    "--config.training.num_train_steps=6000 --config.optim.ema_decay=0.995 "
    "--config.sampling.sampler=ddim --config.sampling.guidance=2.0": COND_CPU_RUN,
    "python evaluate.py --workdir=runs/cond --fid_samples=200 --guidance=0,1,2,4 --sampler=ddim "
    "--ddim_steps=20 --classifier_dir=classifiers/fashion_mnist": COND_CPU_RUN,
    "python sample.py --workdir=runs/cond --class_label=all --num_images=80 --guidance=2 "
    "--sampler=ddim --ddim_steps=50": COND_CPU_RUN,
}


def documented_commands(document: str) -> List[Tuple[int, str]]:
    """(line, command) of the fenced shell blocks of `document`, whitespace collapsed."""
    commands, pending, start, language = [], "", 0, None
    for number, line in enumerate((REPO / document).read_text().splitlines(), 1):
        fence = re.match(r"\s*```(\w*)", line)
        if fence:
            assert not pending, f"{document}:{start}: unfinished command {pending!r}"
            language = None if language is not None else fence.group(1)
            continue
        if language not in SHELL_LANGUAGES:
            continue
        text = re.sub(r"(^|\s+)#\s.*$", "", line).strip()  # a comment, whole line or trailing
        if not text and not pending:
            continue
        start = start if pending else number
        pending = f"{pending} {text}".strip()
        if pending.endswith("\\"):
            pending = pending[:-1].strip()
            continue
        try:
            shlex.split(pending)
        except ValueError:  # an open quote: the command goes on
            continue
        commands.append((start, " ".join(pending.split())))
        pending = ""
    return commands


def all_commands() -> List[Tuple[str, str]]:
    return [(f"{doc}:{line}", command) for doc in DOCUMENTS
            for line, command in documented_commands(doc)]


def _without_venv(command: str) -> str:
    return command[len(VENV_SETUP):] if command.startswith(VENV_SETUP) else command


def unknown_commands(commands: List[Tuple[str, str]]) -> List[str]:
    """'where: command' of each of `commands` that is neither run nor skipped here."""
    run = {step.command for step in QUICK_START + CONDITIONAL}
    return [f"{where}: {command}" for where, command in commands
            if _without_venv(command) not in run and command not in SKIPPED]


def test_every_documented_command_is_known():
    commands = all_commands()
    unknown = unknown_commands(commands)
    assert not unknown, ("commands in the docs that tests/readme_test.py neither runs nor "
                         "skips with a reason (add each to QUICK_START, CONDITIONAL or "
                         "SKIPPED):\n" + "\n".join(unknown))
    found = {c for _, command in commands for c in (command, _without_venv(command))}
    known = {step.command for step in QUICK_START + CONDITIONAL} | set(SKIPPED)
    stale = sorted(known - found)
    assert not stale, "commands no longer in the docs:\n" + "\n".join(stale)
    # A new or edited command is unknown; the venv prefix alone does not make one.
    assert unknown_commands([("README.md:99", TRAIN + " --config.seed=1"),
                             ("README.md:98", VENV_SETUP + TRAIN)]) == [
        f"README.md:99: {TRAIN} --config.seed=1"]


def test_collects_continued_quoted_and_commented_commands(tmp_path, monkeypatch):
    (tmp_path / "doc.md").write_text(
        "    python indented.py\n```bash\n# setup\npython a.py --x=1 \\\n    --y=2   # note\n"
        "gcloud ssh --command=\"\n  cd d &&\n  python b.py\"\n```\n```python\nimport os\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert documented_commands("doc.md") == [
        (4, "python a.py --x=1 --y=2"), (6, 'gcloud ssh --command=" cd d && python b.py"')]


def _copy_repository(destination: Path) -> Path:
    """The files git tracks or would track (the working tree, edits included), copied."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


@pytest.fixture
def user_checkout(tmp_path, fashion_mnist_dirs):
    """A fresh copy of the repository beside `shared/data/fashion_mnist` (the official files),
    as the README's `../shared/data/fashion_mnist` expects."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to copy")
    assert (fashion_mnist_dirs.manual_dir / "train-images-idx3-ubyte.gz").is_file(), (
        f"no official Fashion-MNIST files in {fashion_mnist_dirs.manual_dir}: set "
        f"$DDPM_JAX_MANUAL_DIR")
    shared = tmp_path / "shared" / "data"
    shared.mkdir(parents=True)
    (shared / "fashion_mnist").symlink_to(fashion_mnist_dirs.manual_dir)
    return _copy_repository(tmp_path / "ddpm-jax")


def _environment(checkout: Path, tfds_data_dir: Path) -> Dict[str, str]:
    env = train_helpers.subprocess_env()
    env.pop("DDPM_JAX_MANUAL_DIR", None)  # only where a command sets it
    env.update(TFDS_DATA_DIR=str(tfds_data_dir), PYTHONPATH=str(checkout),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    return env


def _run(step: Step, checkout: Path, env: Dict[str, str], placeholders: Dict[str, str]) -> str:
    """`step` in `checkout` as a shell runs it; its output (stdout and stderr)."""
    command = step.command
    for placeholder, value in placeholders.items():
        command = command.replace(placeholder, value)
    command = " ".join([command, *map(shlex.quote, step.append)])
    process = subprocess.Popen(["bash", "-c", command], cwd=checkout, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if step.interrupt_at and line.startswith(step.interrupt_at):
                os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: the terminal's whole group
        process.wait(timeout=TIMEOUT_S)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    output = "".join(lines)
    expected_status = 128 + signal.SIGINT if step.interrupt_at else 0
    assert process.returncode == expected_status, f"$ {command}\n{output}"
    assert re.search(step.expect, output), f"$ {command}\n{output}"
    for name in step.files:
        assert (checkout / name).exists(), f"$ {command}\n{output}\n{name} missing"
    return output


@pytest.mark.slow
@pytest.mark.subprocess
def test_readme_quick_start_as_written(user_checkout, tmp_path):
    """Train (offline, preparing the data), Ctrl-C, resume, sample, evaluate, then the docs'
    sampling commands: one run, one working directory, the paths as written."""
    tfds_data_dir = tmp_path / "tfds"  # fresh: the first command prepares it
    env = _environment(user_checkout, tfds_data_dir)
    placeholders = {"/path/to/fashion_mnist": "../shared/data/fashion_mnist",
                    "/path/to/tfds": str(tfds_data_dir)}
    outputs = [_run(step, user_checkout, env, placeholders) for step in QUICK_START]
    stopped = int(re.search(r"Stopped at step (\d+)", outputs[0]).group(1))
    assert 5 <= stopped < 20 and f"resuming from step {stopped} to 20" in outputs[1]
    assert "has no dataset_info.json" not in outputs[0] and not re.search(
        r"^[IWEF]\d{4} ", outputs[0], re.M), outputs[0]
    with np.load(user_checkout / "samples.npz") as saved:
        images = next(iter(saved.values()))
    assert images.shape == (64, 28, 28, 1)


@pytest.mark.slow
@pytest.mark.subprocess
def test_docs_conditional_quick_start(user_checkout, fashion_mnist_dirs):
    env = _environment(user_checkout, fashion_mnist_dirs.data_dir)
    _run(CLASSIFIER, user_checkout, env, {})
    for step in CONDITIONAL:
        _run(step, user_checkout, env, {})
