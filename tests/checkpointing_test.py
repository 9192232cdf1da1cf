"""Checkpoints: round trip, torn and corrupt steps, killed saves, foreign workdirs, inference."""
import json
import logging
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import fashion, tiny
from ddpm_jax import config_validation
from ddpm_jax.runtime import parallel
from ddpm_jax.training import checkpointing, train_state
from ddpm_jax.training.checkpointing import (CheckpointError, Checkpointer, ConfigMismatchError,
                                             load_inference_params)
from tests.support.train_helpers import REPO

pytestmark = pytest.mark.newest_stack


@pytest.fixture(scope="module")
def config_and_state():
    """The tiny config and a TrainState of its shapes filled with random numbers on the host
    (initialising the network would cost a compilation that these tests do not need)."""
    config = tiny.get_config()
    abstract = checkpointing.abstract_train_state(config, None)
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), abstract)
    return config, state


def _at_step(state, step):
    """A distinguishable state for each step, on the devices: params shifted by the step."""
    state = state.replace(step=np.int32(step),
                          params=jax.tree.map(lambda p: p + np.float32(step), state.params))
    return jax.device_put(state, parallel.replicated(parallel.make_mesh()))


def _save(workdir, config, state, steps, keep=5):
    checkpointer = Checkpointer(str(workdir), keep=keep)
    for step in steps:
        checkpointer.save(step, _at_step(state, step), config)
    checkpointer.close()


def _restore(workdir, config, state, **kwargs):
    abstract = checkpointing.abstract_train_state(config, parallel.replicated(parallel.make_mesh()))
    checkpointer = Checkpointer(str(workdir), keep=5)
    try:
        return checkpointer.restore_latest(lambda _: abstract, config, **kwargs)
    finally:
        checkpointer.close()


def _assert_same_state(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _largest_file(step_dir):
    files = [os.path.join(root, f) for root, _, names in os.walk(step_dir) for f in names
             if f != checkpointing.MANIFEST]
    return max(files, key=os.path.getsize)


def test_round_trip_keeps_the_newest_k_with_manifests(tmp_path, config_and_state):
    config, state = config_and_state
    _save(tmp_path, config, state, [5, 10, 15], keep=2)
    directory = tmp_path / checkpointing.CHECKPOINT_SUBDIR
    assert sorted(os.listdir(directory)) == ["10", "15"]
    assert all((directory / s / checkpointing.MANIFEST).is_file() for s in ("10", "15"))
    restored, step, stored_config = _restore(tmp_path, config, state)
    assert step == 15
    assert stored_config["model"]["dim"] == config.model.dim
    _assert_same_state(restored, _at_step(state, 15))
    assert isinstance(restored, train_state.TrainState)


@pytest.mark.parametrize("damage", ["truncate", "delete", "overwrite"])
def test_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path, config_and_state, caplog,
                                                             damage):
    config, state = config_and_state
    _save(tmp_path, config, state, [5, 10])
    victim = _largest_file(tmp_path / "checkpoints" / "10")
    if damage == "truncate":
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
    elif damage == "delete":
        os.remove(victim)
    else:  # same size, different bytes: only the checksum can tell
        with open(victim, "r+b") as f:
            f.seek(os.path.getsize(victim) // 2)
            f.write(b"\x00garbage\xff" * 4)
    with caplog.at_level(logging.WARNING):
        restored, step, _ = _restore(tmp_path, config, state, move_unreadable=True)
    assert step == 5
    _assert_same_state(restored, _at_step(state, 5))
    relative = os.path.relpath(victim, tmp_path / "checkpoints" / "10")
    expected = {"truncate": f"file {relative} has", "delete": f"file {relative} is missing",
                "overwrite": f"file {relative} differs from what was written"}[damage]
    warning = caplog.text
    assert f"Skipping checkpoint {tmp_path / 'checkpoints' / '10'}: {expected}" in warning
    assert "skipped step 10" in warning
    # Moved aside, not deleted, so that step 10 can be saved again.
    moved = os.listdir(tmp_path / checkpointing.UNREADABLE_SUBDIR)
    assert len(moved) == 1 and moved[0].startswith("10-")
    _save(tmp_path, config, state, [10])
    assert _restore(tmp_path, config, state)[1] == 10


def test_unreadable_without_manifest_falls_back_too(tmp_path, config_and_state, caplog):
    """A step whose manifest is gone (a save killed after Orbax finished) is still checked
    by Orbax's own restore."""
    config, state = config_and_state
    _save(tmp_path, config, state, [5, 10])
    step_dir = tmp_path / "checkpoints" / "10"
    os.remove(step_dir / checkpointing.MANIFEST)
    os.remove(step_dir / "meta" / "metadata")
    with caplog.at_level(logging.WARNING):
        assert _restore(tmp_path, config, state)[1] == 5
    assert "Skipping checkpoint" in caplog.text and "its metadata cannot be read" in caplog.text


def test_no_readable_checkpoint_is_a_clear_error(tmp_path, config_and_state):
    config, state = config_and_state
    _save(tmp_path, config, state, [5, 10])
    for step in ("5", "10"):
        victim = _largest_file(tmp_path / "checkpoints" / step)
        with open(victim, "r+b") as f:
            f.truncate(10)
    with pytest.raises(CheckpointError) as error:
        _restore(tmp_path, config, state)
    message = str(error.value)
    assert message.startswith(f"no readable checkpoint in {tmp_path / 'checkpoints'} (step 10: ")
    assert "step 5: file" in message and "Move that directory away" in message


@pytest.mark.subprocess
def test_save_killed_halfway_leaves_the_previous_checkpoint(tmp_path):
    """SIGKILL while the second save is being written: that step never appears."""
    script = textwrap.dedent(f"""
        import os, signal
        import jax.numpy as jnp
        from configs import tiny
        from ddpm_jax.training.checkpointing import Checkpointer
        config = tiny.get_config()
        checkpointer = Checkpointer({str(tmp_path)!r}, keep=1)
        big = {{"w": jnp.arange(40_000_000, dtype=jnp.int32)}}
        checkpointer.save(10, big, config)
        checkpointer.wait()
        checkpointer.save(20, {{"w": big["w"] + 1}}, config)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, timeout=180, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == -9, result.stderr[-2000:]
    names = os.listdir(tmp_path / "checkpoints")
    assert "10" in names and "20" not in names
    assert any(n.startswith("20.orbax-checkpoint-tmp") for n in names)
    checkpointer = Checkpointer(str(tmp_path), keep=1)
    abstract = {"w": jax.ShapeDtypeStruct((40_000_000,), jnp.int32,
                                          sharding=parallel.replicated(parallel.make_mesh()))}
    restored, step, _ = checkpointer.restore_latest(lambda _: abstract)
    checkpointer.close()
    assert step == 10
    np.testing.assert_array_equal(np.asarray(restored["w"][-3:]), [39_999_997, 39_999_998,
                                                                   39_999_999])


def test_workdir_of_another_model_is_refused_unless_allowed(tmp_path, config_and_state, caplog):
    config, state = config_and_state
    _save(tmp_path, config, state, [5])
    other = tiny.get_config()
    other.diffusion.loss_type = "l2"
    other.diffusion.timesteps = 50
    with pytest.raises(ConfigMismatchError) as error:
        _restore(tmp_path, other, state)
    message = str(error.value)
    assert f"{tmp_path} holds checkpoints of a different model (step 5)" in message
    assert "config.diffusion.loss_type: checkpoint 'huber', now 'l2'" in message
    assert "config.diffusion.timesteps: checkpoint 20, now 50" in message
    assert "--allow_config_change" in message
    with caplog.at_level(logging.WARNING):
        restored, step, _ = _restore(tmp_path, other, state, allow_config_change=True)
    assert step == 5 and "config.diffusion.loss_type" in caplog.text
    _assert_same_state(restored, _at_step(state, 5))


def test_changed_training_fields_resume_with_a_warning(tmp_path, config_and_state, caplog):
    config, state = config_and_state
    _save(tmp_path, config, state, [5])
    longer = tiny.get_config()
    longer.training.num_train_steps = 80
    with caplog.at_level(logging.WARNING):
        assert _restore(tmp_path, longer, state)[1] == 5
    assert "config.training.num_train_steps: checkpoint 40, now 80" in caplog.text


def test_allowed_config_change_that_does_not_fit_is_an_error(tmp_path, config_and_state):
    config, state = config_and_state
    _save(tmp_path, config, state, [5])
    wider = tiny.get_config()
    wider.model.dim = 16
    with pytest.raises(CheckpointError, match=r"does not fit this model's state .* arrays "
                                              r"differ"):
        _restore(tmp_path, wider, state, allow_config_change=True)
    # Nothing was moved or deleted.
    assert os.listdir(tmp_path / "checkpoints") == ["5"]


def test_load_inference_params_returns_the_config_and_ema(tmp_path, config_and_state):
    config, state = config_and_state
    _save(tmp_path, config, state, [5, 10])
    loaded_config, params, step = load_inference_params(str(tmp_path))
    assert step == 10
    assert loaded_config.model.dim == config.model.dim
    assert tuple(loaded_config.model.dim_mults) == tuple(config.model.dim_mults)
    _assert_same_state(params, _at_step(state, 10).ema_params)
    _, raw, _ = load_inference_params(str(tmp_path), use_ema=False)
    _assert_same_state(raw, _at_step(state, 10).params)


def test_load_inference_params_of_a_non_workdir_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path} has no checkpoints/ directory"):
        load_inference_params(str(tmp_path))


def test_configs_stored_before_the_sampler_fields_read_as_today():
    """`sampling.ddim_steps` became `sampling.steps`; the DPM-Solver++ fields are later."""
    stored = tiny.get_config().to_dict()
    stored["sampling"]["ddim_steps"] = stored["sampling"].pop("steps")
    for name in ("solver_order", "step_spacing", "dynamic_threshold"):
        del stored["sampling"][name]
    upgraded = checkpointing.upgrade_config(stored)
    assert upgraded["sampling"] == tiny.get_config().sampling.to_dict()
    assert "ddim_steps" in stored["sampling"]  # the stored dict itself is left as it was
    assert checkpointing.config_differences(upgraded, tiny.get_config()) == ([], [])
    stored["sampling"]["ddim_steps"] = 7
    assert checkpointing.config_differences(checkpointing.upgrade_config(stored),
                                            tiny.get_config())[1] == [
        "config.sampling.steps: checkpoint 7, now 10"]


def _flat(tree, prefix=""):
    return {key: value for name, sub in tree.items()
            for key, value in (_flat(sub, f"{prefix}{name}.").items() if isinstance(sub, dict)
                               else [(prefix + name, sub)])}


def test_a_config_of_the_oldest_schema_reads_as_todays_with_its_old_behaviour():
    """configs/fashion.py as the first checkpoints stored it (git 8742224): upgraded once,
    where a checkpoint is read, it has exactly today's fields, the later ones at the value
    its run behaved as, and passes today's checks, so no reader needs a fallback."""
    oldest = json.loads((REPO / "tests" / "support" / "fashion_config_2026-11-27.json")
                        .read_text())
    upgraded = checkpointing.upgrade_config(oldest)
    today = _flat(fashion.get_config().to_dict())
    assert set(_flat(upgraded)) == set(today)
    assert upgraded["sampling"]["steps"] == oldest["sampling"]["ddim_steps"]
    for field, old_behaviour in checkpointing.LATER_FIELDS.items():
        section, name = field.split(".")
        assert upgraded[section][name] == old_behaviour, field
    assert upgraded["sampling"]["clip_denoised"] is False  # the design's Equation 11
    assert upgraded["diffusion"]["objective"] == "eps"
    config_validation.validate_config(ml_collections.ConfigDict(upgraded))
