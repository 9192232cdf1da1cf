"""Preemption with exact resume, a torn newest checkpoint, non-finite steps."""
import os
import signal
import threading

import jax
import numpy as np
import pytest

from ddpm_jax.models import unet
from ddpm_jax.runtime import metrics_writer, parallel
from ddpm_jax.training import checkpointing, loop, preemption, train_state, train_step
from ddpm_jax.schedules import make_schedule
from tests.support.train_helpers import (enable_compilation_cache, losses, restored_state, run_train_py,
                                 sigterm_at, subprocess_env, tiny_config, train_py)

STEPS = 12


@pytest.fixture(scope="module")
def reference(fashion_mnist_dirs, tmp_path_factory):
    """An uninterrupted run of STEPS steps: (config, workdir, final state as numpy)."""
    enable_compilation_cache()
    workdir = tmp_path_factory.mktemp("reference")
    config = tiny_config(fashion_mnist_dirs, training__num_train_steps=STEPS,
                         training__log_every=1, training__checkpoint_every=4)
    result = loop.train(config, str(workdir))
    assert result.status == "completed" and result.step == STEPS
    return config, workdir, jax.tree.map(np.asarray, result.state)


def _assert_bitwise_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        assert x.dtype == y.dtype and np.array_equal(x, y), "states differ"


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigterm_mid_run_then_resume_is_bitwise_the_uninterrupted_run(reference, tmp_path):
    config, reference_dir, reference_state = reference
    env = subprocess_env()
    process = train_py(config, tmp_path, env)
    output = sigterm_at(process, "step 5/")
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "Received SIGTERM: finishing the current step, then saving a checkpoint" in output
    stopped = int(output.split("Stopped at step ")[1].split(":")[0])
    assert 5 <= stopped < STEPS
    assert "run the same command to resume" in output
    assert str(stopped) in os.listdir(tmp_path / "checkpoints")
    assert (tmp_path / "checkpoints" / str(stopped) / checkpointing.MANIFEST).is_file()

    resumed = run_train_py(config, tmp_path, env)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"resuming from step {stopped} to {STEPS}" in resumed.stdout
    state, step = restored_state(tmp_path, config)
    assert step == STEPS
    _assert_bitwise_equal(state, reference_state)
    assert losses(tmp_path) == losses(reference_dir)  # every step's loss, to the last bit


@pytest.mark.slow
def test_steps_per_call_preempted_then_resumed_is_bitwise_the_uninterrupted_run(reference,
                                                                               tmp_path):
    """k = 4 steps per compiled call: a stop mid-call ends at the call boundary, the resume is
    bitwise exact, and the run follows the single-step reference: logged losses to 1e-5
    (XLA compiles the scanned step differently, so not bitwise: docs/speed.md)."""
    single_config, single_dir, single_state = reference
    config = single_config.copy_and_resolve_references()
    config.training.steps_per_call = 4
    config.training.log_every = 4
    uninterrupted = loop.train(config, str(tmp_path / "whole"))
    assert uninterrupted.step == STEPS

    stop = threading.Event()

    def stop_after_six_batches(source, start_step):
        with loop.default_iterator_factory(config)(source, start_step) as batches:
            for read, batch in enumerate(batches, start=start_step + 1):
                if read == 6:  # inside the second call (steps 5-8)
                    stop.set()
                yield batch
    first = loop.train(config, str(tmp_path / "cut"), stop_event=stop,
                       iterator_factory=stop_after_six_batches)
    assert (first.status, first.step) == ("preempted", 8)
    assert sorted(os.listdir(tmp_path / "cut" / "checkpoints"), key=int) == ["4", "8"]
    resumed = loop.train(config, str(tmp_path / "cut"))
    assert (resumed.status, resumed.step) == ("completed", STEPS)

    whole = jax.tree.map(np.asarray, uninterrupted.state)
    _assert_bitwise_equal(jax.tree.map(np.asarray, resumed.state), whole)
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")
    # Rows at call boundaries hold the mean of the call's steps, as with k = 1.
    per_step = losses(single_dir)
    logged = losses(tmp_path / "whole")
    assert sorted(logged) == [4, 8, 12]
    for step, loss in logged.items():
        assert loss == pytest.approx(np.mean([per_step[s] for s in range(step - 3, step + 1)]),
                                     rel=1e-5)
    # Adam moves a weight by about the learning rate per step whatever its gradient's size, so
    # rounding-level gradient differences can move a near-zero-gradient weight that far.
    assert int(whole.step) == STEPS and int(whole.skipped_steps) == 0
    bound = config.optim.learning_rate * STEPS
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(single_state.params)):
        assert np.max(np.abs(a - b)) <= bound


@pytest.mark.slow
def test_truncated_newest_checkpoint_falls_back_and_still_ends_bitwise_equal(
        reference, tmp_path, caplog):
    config, _, reference_state = reference
    first = config.copy_and_resolve_references()
    first.training.num_train_steps = 8
    loop.train(first, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "8"]
    step_dir = tmp_path / "checkpoints" / "8"
    victim = max((os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs),
                 key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 3)

    result = loop.train(config, str(tmp_path))
    assert result.step == STEPS
    assert f"Skipping checkpoint {step_dir}: file " in caplog.text
    assert "Resuming from checkpoint" in caplog.text and "skipped step 8" in caplog.text
    assert os.listdir(tmp_path / checkpointing.UNREADABLE_SUBDIR)[0].startswith("8-")
    _assert_bitwise_equal(jax.tree.map(np.asarray, result.state), reference_state)


def _nan_at(config, bad_step):
    """An iterator factory of the config's batches, but all NaN for step `bad_step` (1-based)."""
    def factory(source, start_step):
        with loop.default_iterator_factory(config)(source, start_step) as batches:
            for step, batch in enumerate(batches, start=start_step + 1):
                yield np.full_like(batch, np.nan) if step == bad_step else batch
    return factory


@pytest.mark.slow
def test_nan_step_leaves_the_state_unchanged_but_the_counters(reference):
    config = reference[0]
    model, optimizer = unet.create_model(config), train_state.make_optimizer(config)
    mesh = parallel.make_mesh()
    schedule = make_schedule(config.diffusion.beta_schedule, config.diffusion.timesteps)
    step = train_step.make_train_step(config, model, schedule, optimizer, mesh)
    state = jax.jit(lambda k: train_state.create_train_state(config, model, optimizer, k),
                    out_shardings=parallel.replicated(mesh))(jax.random.key(0))
    before = jax.tree.map(np.asarray, state)
    batch = np.full((config.training.batch_size, 28, 28, 1), np.nan, np.float32)
    after, metrics = step(state, parallel.global_batch(batch, mesh))
    after = jax.tree.map(np.asarray, after)
    assert not bool(metrics["finite"]) and int(metrics["skipped_steps"]) == 1
    assert int(after.step) == 1 and int(after.skipped_steps) == 1
    _assert_bitwise_equal((after.params, after.ema_params, after.opt_state, after.rng),
                          (before.params, before.ema_params, before.opt_state, before.rng))


@pytest.mark.slow
def test_nan_batch_is_skipped_and_counted(reference, tmp_path, caplog):
    config = reference[0].copy_and_resolve_references()
    config.training.num_train_steps = 6
    result = loop.train(config, str(tmp_path), iterator_factory=_nan_at(config, 4))
    assert result.status == "completed" and int(result.state.skipped_steps) == 1
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(result.state.params))
    rows = {r["step"]: r for r in metrics_writer.read_metrics(str(tmp_path))}
    assert rows[4]["nonfinite_steps"] == 1 and rows[4]["loss"] is None
    assert [rows[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 0, 1, 1, 1]
    assert np.isfinite(rows[5]["loss"]) and np.isfinite(rows[6]["loss"])
    assert "Skipped the update of step(s) [4]" in caplog.text


@pytest.mark.slow
def test_nan_batch_with_policy_stop_names_the_step_and_keeps_the_last_good_checkpoint(
        reference, tmp_path):
    config = reference[0].copy_and_resolve_references()
    config.training.num_train_steps = 10
    config.training.nan_policy = "stop"
    config.training.log_every = 3
    config.training.checkpoint_every = 2
    with pytest.raises(loop.NonFiniteError) as error:
        loop.train(config, str(tmp_path), iterator_factory=_nan_at(config, 5))
    assert error.value.step == 5
    assert str(error.value).startswith(
        f"non-finite loss or gradient at step 5 (config.training.nan_policy='stop'); the newest "
        f"checkpoint, step 4, in {tmp_path / 'checkpoints'} predates it")
    assert sorted(os.listdir(tmp_path / "checkpoints"), key=int) == ["2", "4"]
    state, step = restored_state(tmp_path, config)
    assert step == 4 and int(state.skipped_steps) == 0
    assert all(np.isfinite(p).all() for p in jax.tree.leaves(state.params))


class _FakeOutput:
    """A call's output as `preemption.InFlight` sees it: ready once the fake device ran it."""

    def __init__(self, device_log, step):
        self.device_log, self.step, self.ready = device_log, step, False

    def is_ready(self):
        return self.ready

    def block_until_ready(self):
        self.device_log.append(self.step)
        self.ready = True


def test_in_flight_blocks_on_the_oldest_call_only_when_full():
    waited = []
    in_flight = preemption.InFlight(computed_step=8, limit=2)
    assert in_flight.wait_for_room() == 8  # nothing in flight: no wait
    outputs = {step: _FakeOutput(waited, step) for step in (12, 16, 20)}  # 4 steps per call
    in_flight.add(12, outputs[12])
    assert in_flight.wait_for_room() == 8 and waited == []  # one call in flight: room
    in_flight.add(16, outputs[16])
    assert in_flight.wait_for_room() == 12 and waited == [12]  # full: waits for the oldest
    outputs[16].ready = True  # finished meanwhile: counted without blocking on it
    in_flight.add(20, outputs[20])
    assert in_flight.wait_for_room() == 16 and waited == [12, 16]
    assert not outputs[20].ready
    with pytest.raises(ValueError, match="limit must be at least 1, got 0"):
        preemption.InFlight(0, limit=0)


@pytest.mark.slow
@pytest.mark.parametrize("steps_per_call", [1, 4])
def test_host_runs_at_most_two_calls_ahead_so_a_stop_waits_for_two(reference, tmp_path,
                                                                    monkeypatch, steps_per_call):
    """Whatever log_every is, when the host reads the batches of call c + 1, calls up to c - 1
    are computed; so a stop requested then saves at the end of call c + 1, at most two calls
    after the last one computed. The progress bar counts computed steps, not dispatched ones."""
    config = reference[0].copy_and_resolve_references()
    config.training.steps_per_call = steps_per_call
    config.training.num_train_steps = 24
    config.training.log_every = config.training.checkpoint_every = 24  # no device read before
    dispatched = []  # one output of each call, in order
    record = loop._Loop.record

    def recording(loop, step, metrics, count=1):
        dispatched.append(metrics["loss"])
        record(loop, step, metrics, count)
    monkeypatch.setattr(loop._Loop, "record", recording)
    shown = []  # (the bar's step, steps computed then, steps dispatched then)

    def bar(console, step):
        computed = sum(out.is_ready() for out in dispatched) * steps_per_call
        shown.append((step, computed, len(dispatched) * steps_per_call))
    monkeypatch.setattr(metrics_writer.ConsoleReporter, "step", bar)
    stop, behind = threading.Event(), []

    def watch(source, start_step):
        with loop.default_iterator_factory(config)(source, start_step) as batches:
            for read, batch in enumerate(batches):
                if read % steps_per_call == 0:  # the first batch of the next call
                    behind.append(sum(not out.is_ready() for out in dispatched))
                    if len(dispatched) == 3:
                        stop.set()
                yield batch
    result = loop.train(config, str(tmp_path), stop_event=stop, iterator_factory=watch)
    assert len(behind) == 4 and max(behind) <= 1, behind  # + the call being read: two
    assert (result.status, result.step) == ("preempted", 4 * steps_per_call)
    assert os.listdir(tmp_path / "checkpoints") == [str(4 * steps_per_call)]
    assert len(shown) == 5
    for step, computed, dispatched_steps in shown:
        assert dispatched_steps - steps_per_call <= step <= computed, shown
