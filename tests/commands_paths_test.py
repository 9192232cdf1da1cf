"""Every command run as a user runs it: from a working directory, with relative and `~/...`
paths (the README's own commands use them; Orbax's background save refuses relative ones).

One tiny run is shared by the module: trained in a temporary working directory whose HOME
is the same directory, stopped by SIGTERM and resumed, then sampled and evaluated there.
"""
import os
import re
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ddpm_jax import config_validation
from ddpm_jax.runtime import storage
from ddpm_jax.training import checkpointing
from tests.support.train_helpers import (REPO, run_train_py, sigterm_at, subprocess_env, tiny_config,
                                 train_py)

STEPS = 12
WORKDIR = "runs/tiny"


def _command(cwd, env, script, *args, timeout=300):
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def user(fashion_mnist_dirs, tmp_path_factory):
    """(working directory, env with HOME = that directory, config with relative data paths)."""
    cwd = tmp_path_factory.mktemp("user")
    (cwd / "data").symlink_to(fashion_mnist_dirs.data_dir)
    (cwd / "manual").symlink_to(fashion_mnist_dirs.manual_dir)
    env = dict(subprocess_env(), HOME=str(cwd))
    config = tiny_config(fashion_mnist_dirs, training__num_train_steps=STEPS,
                         training__log_every=1, training__checkpoint_every=4)
    config.data.tfds_data_dir, config.data.manual_dir = "data", "~/manual"
    return cwd, env, config


@pytest.fixture(scope="module")
def trained(user):
    """train.py with --workdir=runs/tiny, stopped by SIGTERM after step 5, then resumed by the
    same command: (first output, second output)."""
    cwd, env, config = user
    process = train_py(config, WORKDIR, env, cwd=cwd)
    first = sigterm_at(process, "step 5/")
    assert process.returncode == 128 + signal.SIGTERM, first[-3000:]
    second = run_train_py(config, WORKDIR, env, cwd=cwd)
    assert second.returncode == 0, second.stdout[-3000:]
    return first, second.stdout


def test_absolute_resolves_relative_and_home_and_leaves_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", "/home/someone")
    assert str(storage.absolute("runs/x/../tiny")) == f"{tmp_path}/runs/tiny"
    assert str(storage.absolute("~/data")) == "/home/someone/data"
    assert str(storage.absolute("/abs/./path")) == "/abs/path"
    assert str(storage.absolute("gs://bucket/a/../b")) == "gs://bucket/a/../b"
    (tmp_path / "link").symlink_to("/tmp")
    assert str(storage.absolute("link")) == f"{tmp_path}/link"  # the user's name, not /tmp


def test_resolve_paths_makes_each_set_path_field_absolute(tmp_path, monkeypatch, user):
    _, _, config = user
    config = config.copy_and_resolve_references()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", "/home/someone")
    config.data.folder = "gs://bucket/images"
    config.training.compilation_cache_dir = ""
    changed = config_validation.resolve_paths(config)
    assert changed == {"data.tfds_data_dir": f"{tmp_path}/data",
                       "data.manual_dir": "/home/someone/manual"}
    assert config.data.tfds_data_dir == f"{tmp_path}/data"
    assert config.data.folder == "gs://bucket/images"
    assert config.training.compilation_cache_dir == ""  # '' = not set, not the cwd


@pytest.mark.slow
@pytest.mark.subprocess
def test_train_py_relative_workdir_saves_stops_and_resumes(user, trained):
    cwd, _, _ = user
    first, second = trained
    directory = cwd / WORKDIR / "checkpoints"
    # The resolved paths, each printed once, before training.
    assert first.count(f"workdir: {cwd / WORKDIR}\n") == 1, first[-3000:]
    assert f"config.data.tfds_data_dir: {cwd}/data\n" in first
    assert f"config.data.manual_dir: {cwd}/manual\n" in first
    stopped = int(first.split("Stopped at step ")[1].split(":")[0])
    assert 5 <= stopped < STEPS
    assert f"checkpoint saved in {directory}" in first
    assert f"resuming from step {stopped} to {STEPS}" in second
    assert f"Finished training at step {STEPS}; checkpoints in {directory}." in second
    assert "Config differs" not in second  # the same relative paths resolve the same
    steps = sorted(int(p) for p in os.listdir(directory))
    assert stopped in steps and steps[-1] == STEPS
    for step in steps:
        assert (directory / str(step) / checkpointing.MANIFEST).is_file()
    assert not list(directory.glob("*tmp*"))  # no save left half-written


@pytest.mark.slow
@pytest.mark.subprocess
def test_sample_py_relative_and_home_outputs(user, trained):
    cwd, env, _ = user
    done = _command(cwd, env, "sample.py", f"--workdir={WORKDIR}", "--num_images=4",
                    "--sampler=ddim", "--ddim_steps=2", "--output=out/grid.png",
                    "--save_npz=~/out/samples.npz", "--gif=out/anim.gif", "--gif_images=2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"from {cwd / WORKDIR} step {STEPS} (EMA parameters)" in done.stdout
    assert (f"Wrote {cwd}/out/grid.png (62x62 px), {cwd}/out/samples.npz, {cwd}/out/anim.gif"
            in done.stdout)
    samples = np.load(cwd / "out" / "samples.npz")["images"]
    assert samples.shape == (4, 28, 28, 1) and np.isfinite(samples).all()
    assert Image.open(cwd / "out" / "anim.gif").n_frames == 2  # one frame per DDIM step


@pytest.fixture(scope="module")
def classifier(user):
    """train_classifier.py --output_dir=classifiers/fashion, on 640 images for one epoch."""
    cwd, env, _ = user
    return _command(cwd, env, "train_classifier.py", "--output_dir=classifiers/fashion",
                    "--tfds_data_dir=data", "--manual_dir=~/manual", "--num_train_images=640",
                    "--epochs=1", "--batch_size=64", "--min_accuracy=0")


@pytest.mark.slow
@pytest.mark.subprocess
def test_train_classifier_py_relative_output_dir(user, classifier):
    cwd, _, _ = user
    assert classifier.returncode == 0, classifier.stdout + classifier.stderr
    assert f"saved to {cwd}/classifiers/fashion\n" in classifier.stdout
    assert (cwd / "classifiers" / "fashion" / "0").is_dir()


@pytest.mark.slow
@pytest.mark.subprocess
def test_evaluate_py_relative_paths(user, trained, classifier):
    cwd, env, _ = user
    assert classifier.returncode == 0, classifier.stderr
    done = _command(cwd, env, "evaluate.py", f"--workdir={WORKDIR}", "--bpd_images=2",
                    "--bpd_batch_size=2", "--fid_samples=8", "--fid_reference_images=64",
                    "--sampler=ddim", "--ddim_steps=2", "--classifier_dir=classifiers/fashion",
                    "--tfds_data_dir=data", "--output=~/eval/result.json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"evaluating {cwd / WORKDIR} at step {STEPS}" in done.stdout
    assert re.search(rf"step {STEPS}: bits/dim \d+\.\d+", done.stdout), done.stdout
    assert f"results: {cwd}/eval/result.json" in done.stdout
    record = (cwd / "eval" / "result.json").read_text()
    assert f'"classifier_dir": "{cwd}/classifiers/fashion"' in record
    assert f'"workdir": "{cwd / WORKDIR}"' in record


def _limit_file_size():
    """Files this process writes stop at 64 KB: the checkpoint's arrays fail to write (with
    EFBIG, as on a full disk) while the logs fit. Runs in the child before exec."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an ignored signal stays so across exec
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))


def test_a_failed_background_save_is_one_line_and_exit_status_74(user):
    """Orbax's background thread fails to write checkpoint 4; the error surfaces at the next
    save, as one line naming the step, the directory and the cause, and no traceback."""
    cwd, env, config = user
    config = config.copy_and_resolve_references()
    config.training.num_train_steps, config.training.log_every = 8, 4
    # No compilation cache: its entries would be cut at 64 KB too, for every later run.
    env = {k: v for k, v in env.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    process = train_py(config, "runs/full_disk", env, cwd=cwd, preexec_fn=_limit_file_size)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == os.EX_IOERR == 74, output[-3000:]
    directory = cwd / "runs" / "full_disk" / "checkpoints"
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, output[-3000:]
    assert errors[0].startswith(f"error: saving checkpoint 4 to {directory} failed: ")
    assert "File too large" in errors[0] and errors[0].endswith("(no checkpoint was completed)")
    assert "Traceback" not in output and len(output.splitlines()) < 16, output[-3000:]
