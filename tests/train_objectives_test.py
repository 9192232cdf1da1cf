"""The tiny config trains with each objective, weighting and terminal SNR, resumes bitwise, and
its checkpoints (and older ones, written before these fields) sample with their own objective."""
import shutil

import jax
import numpy as np
import pytest

from ddpm_jax import schedules
from ddpm_jax.evaluation import suite
from ddpm_jax.runtime import parallel
from ddpm_jax.training import checkpointing, loop
from tests.loop_test import _assert_bitwise_equal
from tests.support.train_helpers import enable_compilation_cache, filled_train_state, losses, tiny_config

STEPS = 4
RECIPES = [("eps", "scaled", "min_snr"), ("x0", "zero", "none"), ("v", "zero", "min_snr")]


@pytest.mark.slow
@pytest.mark.parametrize("objective,terminal_snr,loss_weighting", RECIPES)
def test_each_objective_trains_and_resumes_bitwise(fashion_mnist_dirs, tmp_path, caplog,
                                                   objective, terminal_snr, loss_weighting):
    enable_compilation_cache()
    config = tiny_config(fashion_mnist_dirs, training__num_train_steps=STEPS,
                         training__log_every=1, training__checkpoint_every=STEPS // 2,
                         diffusion__objective=objective, diffusion__terminal_snr=terminal_snr,
                         diffusion__loss_weighting=loss_weighting)
    caplog.set_level("INFO", logger="ddpm_jax.training.loop")
    whole = loop.train(config, str(tmp_path))
    alpha_bar_t = {"scaled": "5.59e-12", "zero": "0"}[terminal_snr]
    assert f"terminal_snr {terminal_snr}: alpha_bar_T = {alpha_bar_t};" in caplog.text
    state, whole_losses = jax.tree.map(np.asarray, whole.state), losses(tmp_path)
    assert int(state.step) == STEPS and int(state.skipped_steps) == 0
    assert len(whole_losses) == STEPS and all(np.isfinite(list(whole_losses.values())))

    # Without the last checkpoint the run resumes from the middle one and ends bitwise equal.
    shutil.rmtree(tmp_path / "checkpoints" / str(STEPS))
    resumed = loop.train(config, str(tmp_path))
    assert f"resuming from step {STEPS // 2} to {STEPS}" in caplog.text
    _assert_bitwise_equal(jax.tree.map(np.asarray, resumed.state), state)
    assert losses(tmp_path) == whole_losses

    # Sampling and evaluation take the objective and schedule from the checkpoint's config.
    stored, _, step = checkpointing.load_inference_params(str(tmp_path))
    assert step == STEPS and stored.diffusion.objective == objective
    evaluator = suite.Evaluator(stored, parallel.make_mesh(), with_bpd=False,
                                with_sample_quality=False)
    np.testing.assert_array_equal(
        evaluator.schedule.betas,
        schedules.make_schedule("linear", config.diffusion.timesteps, terminal_snr).betas)


@pytest.mark.slow
def test_a_checkpoint_from_before_the_objectives_resumes_and_samples_as_eps(
        fashion_mnist_dirs, tmp_path):
    """A stored config without the diffusion fields of objectives and terminal SNR resumes
    under the design's config, and is read back with the behaviour it was trained with."""
    enable_compilation_cache()
    config = tiny_config(fashion_mnist_dirs, training__num_train_steps=5)
    old = config.to_dict()
    for field in ("objective", "loss_weighting", "min_snr_gamma", "terminal_snr"):
        del old["diffusion"][field]
    checkpointer = checkpointing.Checkpointer(str(tmp_path), keep=3)
    checkpointer.save(4, filled_train_state(config).replace(step=np.int32(4)), old)
    checkpointer.close()
    stored, _, _ = checkpointing.load_inference_params(str(tmp_path))
    assert (stored.diffusion.objective, stored.diffusion.terminal_snr,
            stored.diffusion.loss_weighting) == ("eps", "design", "none")

    result = loop.train(config, str(tmp_path))
    assert (result.status, result.step) == ("completed", 5)
    config.diffusion.objective = "v"  # another network: refused, naming the field
    with pytest.raises(checkpointing.ConfigMismatchError, match="config.diffusion.objective"):
        loop.train(config, str(tmp_path))
