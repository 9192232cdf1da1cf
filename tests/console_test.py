"""The commands print their own lines and warnings; library INFO lines only with --verbosity=1."""
import logging
import re
import subprocess
import sys

from absl import logging as absl_logging

from ddpm_jax.runtime import console
from tests import train_helpers
from tests.sample_cli_test import STEP, workdir  # noqa: F401  (the tiny checkpoint fixture)

# absl's console format: "I1201 16:02:20.609225 140292367883136 checkpoint_manager.py:701] ..."
ABSL_INFO = re.compile(r"^I\d{4} [\d:.]+ +\d+ ([\w.]+):\d+\]", re.M)
ORBAX_FILES = ("checkpoint_manager.py", "checkpointer.py", "composite_checkpoint_handler.py")


def _run(script, *args):
    done = subprocess.run([sys.executable, script, *args], cwd=train_helpers.REPO,
                          env=train_helpers.subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def _absl_info_sources(output):
    return [m.group(1) for m in ABSL_INFO.finditer(output)]


def test_filter_keeps_own_info_and_every_warning():
    own_filter = console._OwnInfoOnly()

    def record(name, level):
        return logging.LogRecord(name, level, "/x/orbax/checkpoint.py", 1, "m", (), None)

    assert own_filter.filter(record("ddpm_jax.training", logging.INFO))
    assert own_filter.filter(record("absl", logging.WARNING))
    assert not own_filter.filter(record("absl", logging.INFO))  # Orbax and TFDS log via absl
    assert not own_filter.filter(record("jax._src.dispatch", logging.DEBUG))


def test_quiet_libraries_follows_verbosity():
    handler = absl_logging.get_absl_handler()
    before = list(handler.filters)
    old = absl_logging.get_verbosity()
    try:
        absl_logging.set_verbosity(1)
        console.quiet_libraries()
        assert handler.filters == before
        absl_logging.set_verbosity(-1)
        console.quiet_libraries()
        console.quiet_libraries()  # idempotent
        added = [f for f in handler.filters if f not in before]
        assert len(added) == 1 and isinstance(added[0], console._OwnInfoOnly)
    finally:
        absl_logging.set_verbosity(old)
        handler.filters[:] = before


def test_sample_py_quiet_by_default(workdir, tmp_path):  # noqa: F811
    args = [f"--workdir={workdir}", "--num_images=1", "--sampler=ddim", "--ddim_steps=1",
            f"--output={tmp_path}/grid.png"]
    quiet = _run("sample.py", *args)
    assert _absl_info_sources(quiet) == [], quiet
    assert f"step {STEP} (EMA parameters)" in quiet and f"Wrote {tmp_path}/grid.png" in quiet
    assert len(quiet.strip().splitlines()) <= 6, quiet

    verbose = _run("sample.py", *args, "--verbosity=1")
    orbax_lines = [s for s in _absl_info_sources(verbose) if s in ORBAX_FILES]
    assert len(orbax_lines) >= 5, verbose


def test_evaluate_py_quiet_by_default(workdir, fashion_mnist_dirs):  # noqa: F811
    args = [f"--workdir={workdir}", "--bpd_images=4", "--bpd_batch_size=2",
            f"--tfds_data_dir={fashion_mnist_dirs.data_dir}",
            f"--manual_dir={fashion_mnist_dirs.manual_dir}"]
    quiet = _run("evaluate.py", *args)
    assert _absl_info_sources(quiet) == [], quiet
    assert re.search(rf"step {STEP}: bits/dim \d+\.\d+", quiet), quiet
    progress = re.findall(r"^bits/dim batch (\d/\d): (\d/\d) images, [\d.]+ images/s, "
                          r"(\d+) s left$", quiet, re.M)
    assert [p[:2] for p in progress] == [("1/2", "2/4"), ("2/2", "4/4")], quiet
    assert progress[-1][2] == "0"
    assert f"results: {workdir}/eval/step_{STEP}.json" in quiet

    verbose = _run("evaluate.py", *args, "--verbosity=1")
    sources = _absl_info_sources(verbose)
    assert sum(s in ORBAX_FILES for s in sources) >= 5, verbose
    assert "dataset_info.py" in sources, verbose  # TFDS's lines come back too

