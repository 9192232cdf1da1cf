"""The tiny config trains end to end on the real Fashion-MNIST, from the command line and in
process: loss falls, checkpoints, logs and sample grids appear, a second run resumes."""
import io
import json
import os
import time

import jax
import numpy as np
import pytest
from PIL import Image

from ddpm_jax import config_validation
from ddpm_jax.runtime import metrics_writer
from ddpm_jax.training import loop
from tests.support.train_helpers import (enable_compilation_cache, read_events, restored_state,
                                 run_train_py, subprocess_env, tiny_config)


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.newest_stack
def test_train_py_trains_then_resumes(fashion_mnist_dirs, tmp_path):
    workdir = tmp_path / "run"
    env = subprocess_env()
    config = tiny_config(fashion_mnist_dirs, training__num_train_steps=20,
                         training__checkpoint_every=10, training__sample_every=20)
    first = run_train_py(config, workdir, env)
    assert first.returncode == 0, first.stdout[-3000:]
    assert "step 5/20 | loss" in first.stdout and "img/s" in first.stdout
    assert "Finished training at step 20" in first.stdout

    rows = metrics_writer.read_metrics(str(workdir))
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    loss = [r["loss"] for r in rows]
    assert all(np.isfinite(loss)) and loss[-1] < 0.92 * loss[0], loss
    assert rows[-1]["skipped_steps"] == 0 and rows[-1]["learning_rate"] == pytest.approx(1e-3)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "20"]
    grid = Image.open(workdir / "samples" / "step_0000020.png")
    # 8 images in a 3 x 3 grid of 28-pixel images with 2-pixel padding.
    assert grid.size == (3 * 30 + 2, 3 * 30 + 2) and grid.mode == "L"

    # The same command with a longer schedule continues from step 20.
    config.training.num_train_steps = 25
    second = run_train_py(config, workdir, env)
    assert second.returncode == 0, second.stdout[-3000:]
    assert "resuming from step 20 to 25" in second.stdout
    assert "step 25/25" in second.stdout
    assert [r["step"] for r in metrics_writer.read_metrics(str(workdir))] == [5, 10, 15, 20, 25]
    state, step = restored_state(workdir, config)
    assert step == 25 and int(state.step) == 25

    _check_tensorboard(workdir, expected_steps=[5, 10, 15, 20, 25])


def _check_tensorboard(workdir, expected_steps):
    """TensorBoard's reader finds every logged scalar and the sample grid."""
    scalars, images = read_events(workdir / "tensorboard", workdir / "events_copy")
    assert sorted(scalars["loss"]) == expected_steps
    for row in metrics_writer.read_metrics(str(workdir)):
        for tag, value in row.items():
            if tag != "step" and value is not None:
                assert scalars[tag][row["step"]] == pytest.approx(value, rel=1e-6), tag
    assert set(images) == {"samples"} and set(images["samples"]) == {20}
    image = images["samples"][20]
    png = Image.open(io.BytesIO(image.encoded_image_string))
    assert png.size == (image.width, image.height) == (92, 92)


@pytest.mark.slow
def test_no_compilation_after_the_first_step(fashion_mnist_dirs, tmp_path):
    """Logging, checkpointing and resuming reuse the compiled step; nothing else compiles."""
    compiles = []

    def on_event(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append((time.monotonic(), kwargs.get("fun_name")))

    class Lines(io.StringIO):
        """Records when each console line was written."""
        times = []

        def write(self, text):
            self.times.append((time.monotonic(), text))
            return super().write(text)

    enable_compilation_cache()  # a persistent-cache hit still counts as a compilation event
    jax.clear_caches()
    jax.monitoring.register_event_duration_secs_listener(on_event)
    stream = Lines()
    try:
        config = tiny_config(fashion_mnist_dirs, training__num_train_steps=6,
                             training__log_every=1, training__checkpoint_every=2)
        loop.train(config, str(tmp_path), console_stream=stream)
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    first_step_logged = min(t for t, text in stream.times if text.startswith("step 1/6"))
    assert [name for _, name in compiles].count("jit(step)") == 1, compiles
    late = [name for t, name in compiles if t > first_step_logged]
    assert late == [], f"compiled after the first step: {late}"
    assert [r["step"] for r in metrics_writer.read_metrics(str(tmp_path))] == list(range(1, 7))


@pytest.mark.slow
def test_a_slow_input_shows_as_input_wait(fashion_mnist_dirs, tmp_path):
    """input_wait_fraction: the share of each logged interval spent waiting for batches."""
    config = tiny_config(fashion_mnist_dirs, training__num_train_steps=6,
                         training__log_every=3, training__checkpoint_every=6)
    default = loop.default_iterator_factory(config)
    enable_compilation_cache()

    def slow_factory(source, start_step):
        batches = default(source, start_step)

        def slow():
            with batches:
                while True:
                    time.sleep(0.25)
                    yield next(batches)
        return slow()

    loop.train(config, str(tmp_path / "slow"), iterator_factory=slow_factory)
    slow = [r["input_wait_fraction"] for r in metrics_writer.read_metrics(str(tmp_path / "slow"))]
    loop.train(config, str(tmp_path / "fast"))
    fast = [r["input_wait_fraction"] for r in metrics_writer.read_metrics(str(tmp_path / "fast"))]
    assert len(slow) == len(fast) == 2 and all(0 <= f <= 1 for f in slow + fast)
    assert min(slow) > 0.5, slow
    assert max(fast) < min(slow), (fast, slow)


def test_metrics_file_drops_rows_after_the_resumed_step(tmp_path):
    """A run killed after logging step 30 but checkpointed at 20 relogs 21..30 on resume."""
    path = tmp_path / metrics_writer.METRICS_FILE
    path.write_text("".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in (10, 20, 30))
                    + '{"step": 40, "lo')  # a torn last line
    writer = metrics_writer.MetricsWriter(str(tmp_path), enabled=True, resume_step=20)
    writer.write_scalars(25, {"loss": 0.25, "skipped_steps": 0, "grad_norm": float("nan")})
    writer.close()
    rows = metrics_writer.read_metrics(str(tmp_path))
    assert rows == [{"step": 10, "loss": 0.5}, {"step": 20, "loss": 0.5},
                    {"step": 25, "loss": 0.25, "skipped_steps": 0, "grad_norm": None}]


def test_later_flushes_append_to_a_local_metrics_file(tmp_path):
    """The first flush writes the file whole, later ones only add their rows (the same file,
    not a rewritten copy), so a long run does not rewrite a growing file at every log step."""
    writer = metrics_writer.MetricsWriter(str(tmp_path), enabled=True)
    writer.write_scalars(1, {"loss": 0.5})
    writer.flush()
    path = tmp_path / metrics_writer.METRICS_FILE
    inode = path.stat().st_ino
    writer.flush()  # nothing new: nothing written
    writer.write_scalars(2, {"loss": 0.25})
    writer.write_scalars(3, {"loss": 0.125})
    writer.close()
    assert path.stat().st_ino == inode
    assert metrics_writer.read_metrics(str(tmp_path)) == [
        {"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}, {"step": 3, "loss": 0.125}]


def test_tensorboard_reads_every_scalar_and_image(tmp_path):
    writer = metrics_writer.MetricsWriter(str(tmp_path), enabled=True)
    writer.write_scalars(3, {"loss": 0.25, "skipped_steps": 2})
    writer.write_scalars(6, {"loss": 0.125, "eval/bpd": 3.5})
    rgb = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    writer.write_image(6, "samples", rgb)
    writer.close()
    scalars, images = read_events(tmp_path / "tensorboard", tmp_path / "copy")
    assert scalars == {"loss": {3: 0.25, 6: 0.125}, "skipped_steps": {3: 2.0},
                       "eval/bpd": {6: 3.5}}
    image = images["samples"][6]
    assert (image.height, image.width) == (5, 7)
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB")), rgb)


def test_only_the_primary_process_writes(tmp_path):
    writer = metrics_writer.MetricsWriter(str(tmp_path), enabled=False)
    writer.write_scalars(1, {"loss": 0.5})
    writer.write_image(1, "samples", np.zeros((4, 4, 1), np.uint8))
    writer.close()
    assert os.listdir(tmp_path) == []


def test_console_shows_step_loss_speed_and_time_left():
    stream = io.StringIO()
    console = metrics_writer.ConsoleReporter(100, enabled=True, stream=stream)
    console.log(40, 0.0512, 1234.5, 3725.0)
    assert stream.getvalue() == "step 40/100 | loss 0.0512 | 1,234 img/s | 1:02:05 left\n"


def test_steps_per_call_must_divide_the_epochs_steps_and_the_resumed_step():
    """What config_validation cannot see: the length from num_epochs, the checkpoint's step."""
    from configs import fashion
    config = fashion.get_config()
    config.training.steps_per_call = 8
    with pytest.raises(config_validation.ConfigError) as error:
        loop._check_call_boundaries(config, 2340, 0)
    assert str(error.value).startswith(
        "config.training.num_epochs = 5 gives 2340 steps: set config.training.num_train_steps; "
        "it must be a multiple of config.training.steps_per_call = 8 (each compiled call runs 8 "
        "steps); e.g. 2336 or 2344")
    with pytest.raises(config_validation.ConfigError, match="checkpoint resumed is at step 12"):
        loop._check_call_boundaries(config, 2336, 12)
    loop._check_call_boundaries(config, 2336, 16)  # both multiples of 8: no error
