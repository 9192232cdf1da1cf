"""The EMA's start and warmup: how much of the initial parameters it still holds."""
import math

import jax
import ml_collections
import numpy as np
import pytest

from configs import cifar10, fashion, mnist, tiny
from ddpm_jax.data import input_pipeline
from ddpm_jax.models import unet
from ddpm_jax.runtime import parallel
from ddpm_jax.training import checkpointing, loop, train_state, train_step
from ddpm_jax.config_validation import ConfigError, validate_config
from ddpm_jax.schedules import make_schedule
from tests.support.train_helpers import enable_compilation_cache, filled_train_state, tiny_config

CONFIGS = {"fashion": fashion, "cifar10": cifar10, "mnist": mnist, "tiny": tiny}


def _initial_weight(config, updates: int) -> float:
    """What `updates` EMA updates leave of the EMA's start: the product of their decays."""
    return float(np.prod([np.float64(train_state.ema_decay_at(config, n))
                          for n in range(updates)]))


def test_decay_is_a_copy_then_the_warmup_formula_capped_at_ema_decay():
    config = fashion.get_config()
    assert config.optim.ema_start == 100
    for n in (0, 1, 99):
        assert float(train_state.ema_decay_at(config, n)) == 0.0
    for n in (100, 101, 109, 200, 1890, 1891, 10_000):
        m = n - 100
        assert float(train_state.ema_decay_at(config, n)) == pytest.approx(
            min(0.995, (1 + m) / (10 + m)), rel=1e-6)
    config.optim.ema_warmup = False
    assert float(train_state.ema_decay_at(config, 99)) == 0.0
    assert float(train_state.ema_decay_at(config, 103)) == pytest.approx(0.995, rel=1e-7)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_defaults_keep_under_1e3_of_the_initialisation_after_100_updates(name):
    config = CONFIGS[name].get_config()
    assert config.optim.ema_warmup is True and config.optim.ema_start == 100
    assert _initial_weight(config, 1) == 0.0  # the first update copies the weights
    config.optim.ema_start = 0
    # prod_{n<100} (1 + n) / (10 + n) = 9! 100! / 109! = 1 / C(109, 9), all below the cap.
    assert _initial_weight(config, 100) == pytest.approx(1 / math.comb(109, 9), rel=1e-4)
    assert _initial_weight(config, 100) < 1e-3
    config.optim.ema_warmup = False
    assert _initial_weight(config, 100) == pytest.approx(config.optim.ema_decay ** 100, rel=1e-4)


def _filled_state(config, shift: float = 0.0):
    """`filled_train_state` with its EMA the parameters plus `shift`."""
    state = filled_train_state(config)
    return state.replace(ema_params=jax.tree.map(lambda p: p + np.float32(shift), state.params))


def _step_and_batches(config, count: int, nan_at: int):
    """The mesh, the jitted train step and `count` real batches, batch `nan_at` all NaN."""
    model, optimizer = unet.create_model(config), train_state.make_optimizer(config)
    mesh = parallel.make_mesh()
    schedule = make_schedule(config.diffusion.beta_schedule, config.diffusion.timesteps)
    step = train_step.make_train_step(config, model, schedule, optimizer, mesh)
    with input_pipeline.TrainIterator(loop.open_train_source(config),
                                      config.training.batch_size, 0, random_flip=False) as it:
        batches = [next(it) for _ in range(count)]
    batches[nan_at] = np.full_like(batches[nan_at], np.nan)
    return mesh, step, batches


def test_train_step_leaves_the_formulas_weight_on_the_initial_ema(fashion_mnist_dirs):
    """The EMA is linear in its start: shifting the start by 64 shifts the EMA after the steps
    by 64 times the product of the decays of the APPLIED updates (a NaN batch is skipped and
    does not advance the warmup)."""
    enable_compilation_cache()
    config = tiny_config(fashion_mnist_dirs, optim__ema_start=0)
    mesh, step, batches = _step_and_batches(config, 6, nan_at=2)
    finals = []
    for shift in (0.0, 64.0):
        state = jax.device_put(_filled_state(config, shift), parallel.replicated(mesh))
        for batch in batches:
            state, _ = step(state, parallel.global_batch(batch, mesh))
        finals.append(jax.tree.map(np.asarray, state))
    assert int(finals[0].step) == 6 and int(finals[0].skipped_steps) == 1
    want = 1 / math.comb(14, 9)  # 5 applied updates, all below the tiny config's cap of 0.9
    assert _initial_weight(config, 5) == pytest.approx(want, rel=1e-5)
    for a, b in zip(jax.tree.leaves(finals[0].params), jax.tree.leaves(finals[1].params)):
        np.testing.assert_array_equal(a, b)  # the EMA never feeds back into training
    for a, b in zip(jax.tree.leaves(finals[0].ema_params), jax.tree.leaves(finals[1].ema_params)):
        np.testing.assert_allclose((b - a) / 64.0, want, rtol=1e-3)


def test_the_ema_copies_the_weights_until_ema_start(fashion_mnist_dirs):
    """Through the real step: bitwise the weights after each of the first ema_start applied
    updates (a skipped NaN step does not count), then the first average keeps 1/10 of them."""
    enable_compilation_cache()
    config = tiny_config(fashion_mnist_dirs, optim__ema_start=2)
    mesh, step, batches = _step_and_batches(config, 4, nan_at=1)
    state = jax.device_put(_filled_state(config, 5.0), parallel.replicated(mesh))
    states = []
    for batch in batches:
        state, _ = step(state, parallel.global_batch(batch, mesh))
        states.append(jax.tree.map(np.asarray, state))
    assert [int(s.skipped_steps) for s in states] == [0, 1, 1, 1]
    for s in states[:3]:  # 0, 0 (skipped) and 2 applied updates: copies
        for p, e in zip(jax.tree.leaves(s.params), jax.tree.leaves(s.ema_params)):
            np.testing.assert_array_equal(p, e)
    last = states[3]
    for before, p, e in zip(jax.tree.leaves(states[2].params), jax.tree.leaves(last.params),
                            jax.tree.leaves(last.ema_params)):
        np.testing.assert_allclose(e, 0.1 * before + 0.9 * p, rtol=1e-5, atol=1e-6)
    assert not all(np.array_equal(p, e) for p, e in zip(jax.tree.leaves(last.params),
                                                         jax.tree.leaves(last.ema_params)))


def test_a_checkpoint_from_before_the_warmup_resumes_and_samples(fashion_mnist_dirs, tmp_path):
    """Checkpoints written before the EMA warmup hold the same TrainState; their stored config lacks
    optim.ema_warmup and sampling.clip_denoised. Training resumes from one, and sampling it
    uses the design's sampler it was written with."""
    enable_compilation_cache()
    config = tiny_config(fashion_mnist_dirs, training__num_train_steps=9)
    old = config.to_dict()
    del old["optim"]["ema_warmup"], old["optim"]["ema_start"], old["sampling"]["clip_denoised"]
    checkpointer = checkpointing.Checkpointer(str(tmp_path), keep=3)
    checkpointer.save(7, _filled_state(config).replace(step=np.int32(7)), old)
    checkpointer.close()
    stored_config, _, step = checkpointing.load_inference_params(str(tmp_path))
    assert step == 7 and stored_config.sampling.clip_denoised is False

    result = loop.train(config, str(tmp_path))
    assert result.status == "completed" and result.step == 9
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(result.state.ema_params))
    stored_config, _, step = checkpointing.load_inference_params(str(tmp_path))
    assert step == 9 and stored_config.optim.ema_warmup is True
    assert stored_config.optim.ema_start == 100


def test_the_new_fields_must_be_booleans():
    config = ml_collections.ConfigDict(tiny.get_config().to_dict(), type_safe=False)
    config.optim.ema_warmup = 1
    config.optim.ema_start = -1
    config.sampling.clip_denoised = "yes"
    with pytest.raises(ConfigError) as error:
        validate_config(config)
    assert "config.optim.ema_warmup = 1: must be True or False" in str(error.value)
    assert "config.optim.ema_start = -1" in str(error.value)
    assert "config.sampling.clip_denoised = 'yes': must be True or False" in str(error.value)
