"""The commands print their own lines and warnings; library INFO lines only with --verbosity=1."""
import pytest
import logging
import os
import re
import subprocess
import sys

from absl import logging as absl_logging

from ddpm_jax.data import input_pipeline
from ddpm_jax.runtime import console
from tests.support import train_helpers

STEP = train_helpers.TINY_CHECKPOINT_STEP

pytestmark = pytest.mark.newest_stack

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


def test_quiet_libraries_follows_verbosity(monkeypatch):
    handler = absl_logging.get_absl_handler()
    before, formatter = list(handler.filters), handler.python_handler.formatter
    old = absl_logging.get_verbosity()
    monkeypatch.delenv(console.NATIVE_LOG_LEVEL_ENV, raising=False)
    try:
        absl_logging.set_verbosity(1)
        console.quiet_libraries()
        assert handler.filters == before and handler.python_handler.formatter is formatter
        assert console.NATIVE_LOG_LEVEL_ENV not in os.environ  # C++ INFO lines stay on
        absl_logging.set_verbosity(-1)
        console.quiet_libraries()
        console.quiet_libraries()  # idempotent
        added = [f for f in handler.filters if f not in before]
        assert len(added) == 1 and isinstance(added[0], console._OwnInfoOnly)
        assert isinstance(handler.python_handler.formatter, console._OwnPlain)
        assert os.environ[console.NATIVE_LOG_LEVEL_ENV] == "1"
    finally:
        absl_logging.set_verbosity(old)
        handler.filters[:] = before
        handler.setFormatter(formatter)


def test_own_lines_without_absl_prefix():
    plain = console._OwnPlain()

    def line(name, level, msg, *args):
        return plain.format(logging.LogRecord(name, level, "/x/y/training.py", 438, msg, args,
                                              None))

    assert line("ddpm_jax.training", logging.INFO, "Compiled in %.1f s", 9.61) == \
        "Compiled in 9.6 s"
    assert line("ddpm_jax.training.preemption", logging.WARNING, "Received SIGINT") == \
        "Warning: Received SIGINT"
    assert line("ddpm_jax.x", logging.ERROR, "bad") == "Error: bad"
    # Other libraries' warnings keep absl's prefix: it names the file that warns.
    assert re.fullmatch(r"W\d{4} [\d:.]+ +\d+ training\.py:438\] careful",
                        line("absl", logging.WARNING, "careful"))


def test_tfds_empty_variant_folder_warning_dropped(tmp_path, caplog):
    """TFDS warns about the version folder it creates while preparing (every first run)."""
    import tensorflow_datasets as tfds
    (tmp_path / "fashion_mnist" / "3.0.1").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="absl"):
        assert not tfds.builder("fashion_mnist", data_dir=str(tmp_path),
                                file_format="array_record").is_prepared()
    variant = [r for r in caplog.records if "has no" in r.getMessage()]
    assert variant and "fashion_mnist/3.0.1 has no dataset_info.json" in variant[0].getMessage()
    assert not any(console._OwnInfoOnly().filter(r) for r in variant)


def test_describe_in_memory_and_streamed(fashion_mnist_dirs):
    data = train_helpers.tiny_config(fashion_mnist_dirs).data
    in_memory = input_pipeline.open_config_source(data, "train[:1000]", "split")
    assert input_pipeline.describe(in_memory, data, "train[:1000]", num_classes=10) == (
        "Data: fashion_mnist 'train[:1000]', 1,000 images as 28x28x1, 10 classes; "
        "decoded into memory (1 MiB)")
    data.unlock()
    data.in_memory_max_bytes = 0  # the whole split streamed
    streamed = input_pipeline.open_config_source(data, "train", "split")
    assert input_pipeline.describe(streamed, data, "train") == (
        "Data: fashion_mnist 'train', 60,000 images as 28x28x1; streamed from disk by 2 Grain "
        "worker process(es) (45 MiB decoded > in_memory_max_bytes 0 MiB)")
    data.worker_count = 0
    assert "; streamed from disk by a thread (" in input_pipeline.describe(streamed, data, "train")


@pytest.mark.slow
@pytest.mark.subprocess
def test_train_py_first_lines(fashion_mnist_dirs, tmp_path):
    """What a user sees before the first step: the data, then the compile, in plain lines."""
    done = subprocess.run(
        [sys.executable, str(train_helpers.REPO / "train.py"),
         f"--config={train_helpers.REPO / 'configs' / 'tiny_cond.py'}",
         f"--workdir={tmp_path / 'run'}", f"--config.data.tfds_data_dir={fashion_mnist_dirs.data_dir}",
         "--config.training.num_train_steps=5", "--config.training.checkpoint_every=5",
         "--config.training.compilation_cache_dir="],
        cwd=tmp_path, env=train_helpers.subprocess_env(), capture_output=True, text=True,
        timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert not re.search(r"^[IWEF]\d{4} ", output, re.M), output  # no absl prefix anywhere
    assert "has no dataset_info.json" not in output and "oneDNN" not in output, output
    lines = output.splitlines()
    data = lines.index("Data: fashion_mnist 'train', 60,000 images as 28x28x1, 10 classes; "
                       "decoded into memory (45 MiB)")
    compiling = lines.index("Compiling the train step (on a CPU, minutes for the ConvNeXt "
                            "configs)")
    assert data < compiling and lines[compiling + 1].startswith("Compiled the train step in ")


@pytest.mark.subprocess
def test_sample_py_quiet_by_default(tiny_checkpoint, tmp_path):
    args = [f"--workdir={tiny_checkpoint}", "--num_images=1", "--sampler=ddim", "--ddim_steps=1",
            f"--output={tmp_path}/grid.png"]
    quiet = _run("sample.py", *args)
    assert _absl_info_sources(quiet) == [], quiet
    assert f"step {STEP} (EMA parameters)" in quiet and f"Wrote {tmp_path}/grid.png" in quiet
    assert len(quiet.strip().splitlines()) <= 6, quiet

    verbose = _run("sample.py", *args, "--verbosity=1")
    orbax_lines = [s for s in _absl_info_sources(verbose) if s in ORBAX_FILES]
    assert len(orbax_lines) >= 5, verbose


@pytest.mark.subprocess
def test_evaluate_py_quiet_by_default(tiny_checkpoint, fashion_mnist_dirs):
    args = [f"--workdir={tiny_checkpoint}", "--bpd_images=4", "--bpd_batch_size=2",
            f"--tfds_data_dir={fashion_mnist_dirs.data_dir}",
            f"--manual_dir={fashion_mnist_dirs.manual_dir}"]
    quiet = _run("evaluate.py", *args)
    assert _absl_info_sources(quiet) == [], quiet
    assert re.search(rf"step {STEP}: bits/dim \d+\.\d+", quiet), quiet
    progress = re.findall(r"^bits/dim batch (\d/\d): (\d/\d) images, [\d.]+ images/s, "
                          r"(\d+) s left$", quiet, re.M)
    assert [p[:2] for p in progress] == [("1/2", "2/4"), ("2/2", "4/4")], quiet
    assert progress[-1][2] == "0"
    assert f"results: {tiny_checkpoint}/eval/step_{STEP}.json" in quiet

    verbose = _run("evaluate.py", *args, "--verbosity=1")
    sources = _absl_info_sources(verbose)
    assert sum(s in ORBAX_FILES for s in sources) >= 5, verbose
    assert "dataset_info.py" in sources, verbose  # TFDS's lines come back too

