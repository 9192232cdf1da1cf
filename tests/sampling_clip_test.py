"""The samplers through the predicted x0 clipped to [-1, 1] (`clip_denoised`)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion, sampling, schedules
from tests.sampling_test import SHAPE, _generate, _toy_denoise

T = 200


def _constants(schedule):
    """The schedule's closed forms in float64, from its betas."""
    betas = np.asarray(schedule.betas, np.float64)
    alpha_bar = np.cumprod(1.0 - betas)
    alpha_bar_prev = np.concatenate([[1.0], alpha_bar[:-1]])
    return betas, alpha_bar, alpha_bar_prev


def _x_t(schedule, x_start, t, noise):
    return np.asarray(diffusion.q_sample(schedule, jnp.asarray(x_start), jnp.asarray(t),
                                         jnp.asarray(noise)))


def _draws(low, high, batch=T, seed=0):
    rng = np.random.default_rng(seed)
    x_start = rng.uniform(low, high, (batch, *SHAPE)).astype(np.float32)
    noise = rng.standard_normal((batch, *SHAPE)).astype(np.float32)
    return x_start, noise


@pytest.mark.parametrize("beta_schedule", ["linear", "cosine"])
def test_p_mean_x0_clipped_is_equation_11_where_x0_stays_in_range(beta_schedule):
    """The posterior mean at x0(eps) is Equation 11 algebraically, at every t."""
    schedule = schedules.make_schedule(beta_schedule, T)
    x_start, noise = _draws(-0.9, 0.9)
    t = np.arange(T, dtype=np.int32)
    x_t = _x_t(schedule, x_start, t, noise)
    clipped = diffusion.p_mean_x0(schedule, x_t, t, noise, clip_denoised=True)
    eq11 = diffusion.p_mean(schedule, x_t, t, noise)
    np.testing.assert_allclose(clipped, eq11, atol=2e-5)


def test_p_sample_clipped_is_the_posterior_mean_at_the_clipped_x0_plus_noise():
    schedule = schedules.make_schedule("linear", T)
    betas, alpha_bar, alpha_bar_prev = _constants(schedule)
    x_start, noise = _draws(-3.0, 3.0, seed=1)
    t = np.arange(T, dtype=np.int32)
    x_t = _x_t(schedule, x_start, t, noise).astype(np.float64)
    x0 = (x_t - np.sqrt(1 - alpha_bar)[:, None, None, None] * noise) / np.sqrt(alpha_bar)[
        :, None, None, None]
    assert np.abs(x0).max() > 2.0  # clipping happens
    coef1 = betas * np.sqrt(alpha_bar_prev) / (1 - alpha_bar)
    coef2 = (1 - alpha_bar_prev) * np.sqrt(1 - betas) / (1 - alpha_bar)
    want_mean = (coef1[:, None, None, None] * np.clip(x0, -1, 1)
                 + coef2[:, None, None, None] * x_t)
    key = jax.random.key(3)
    x_t32 = jnp.asarray(x_t, jnp.float32)
    got = np.asarray(diffusion.p_sample(schedule, lambda x, t: jnp.asarray(noise), x_t32, t,
                                        key, clip_denoised=True))
    step_noise = np.asarray(jax.random.normal(key, x_t.shape, jnp.float32))
    std = np.sqrt(betas * (1 - alpha_bar_prev) / (1 - alpha_bar))
    want = want_mean + std[:, None, None, None] * step_noise
    np.testing.assert_allclose(got, want, atol=2e-5)
    # The last step returns the clipped x0 itself (coef1 = 1, coef2 = 0, no noise).
    np.testing.assert_allclose(got[0], np.clip(x0[0], -1, 1), atol=1e-6)
    unclipped = np.asarray(diffusion.p_sample(schedule, lambda x, t: jnp.asarray(noise), x_t32,
                                              t, key))
    assert np.abs(unclipped[0]).max() > 2.0


@pytest.mark.parametrize("t, t_prev, eta", [(199, 149, 0.0), (120, 119, 0.0), (80, 40, 0.7),
                                            (3, -1, 0.0)])
def test_ddim_step_clipped_closed_form(t, t_prev, eta):
    """x_prev = sqrt(a_prev) clip(x0) + sqrt(1 - a_prev - sigma^2) eps(clip(x0)) + sigma z."""
    schedule = schedules.make_schedule("linear", T)
    _, alpha_bar, _ = _constants(schedule)
    x_start, noise = _draws(-3.0, 3.0, batch=4, seed=2)
    x_t = _x_t(schedule, x_start, np.full(4, t, np.int32), noise)
    key = jax.random.key(5)
    run = lambda clip: np.asarray(diffusion.ddim_step(  # noqa: E731
        schedule, lambda x, tt: jnp.asarray(noise), jnp.asarray(x_t), t, t_prev, eta, key,
        clip_denoised=clip))
    x0 = np.clip((x_t - np.sqrt(1 - alpha_bar[t]) * noise) / np.sqrt(alpha_bar[t]), -1, 1)
    eps = (x_t - np.sqrt(alpha_bar[t]) * x0) / np.sqrt(1 - alpha_bar[t])
    a_prev = alpha_bar[t_prev] if t_prev >= 0 else 1.0
    sigma = eta * np.sqrt((1 - a_prev) / (1 - alpha_bar[t]) * (1 - alpha_bar[t] / a_prev))
    z = np.asarray(jax.random.normal(key, x_t.shape, jnp.float32))
    want = (np.sqrt(a_prev) * x0 + np.sqrt(max(1 - a_prev - sigma ** 2, 0.0)) * eps
            + sigma * z)
    np.testing.assert_allclose(run(True), want, atol=5e-5)
    assert np.abs(run(True) - run(False)).max() > 1e-2  # the clip changed something
    # Where x0 stays in [-1, 1], the clipped step is the plain one.
    x_start, noise = _draws(-0.9, 0.9, batch=4, seed=4)
    x_t = _x_t(schedule, x_start, np.full(4, t, np.int32), noise)
    np.testing.assert_allclose(run(True), run(False), atol=2e-5)


@pytest.mark.parametrize("sampler, steps", [("ddpm", 0), ("ddim", 8), ("dpmpp", 8)])
def test_generate_clipped_is_the_clipped_loop_and_ends_in_range(sampler, steps):
    schedule = schedules.make_schedule("linear", 50)
    kwargs = dict(schedule=schedule, seed=7, sampler=sampler, steps=steps or 50)
    clipped = _generate(3, clip_denoised=True, **kwargs).images
    plain = _generate(3, **kwargs).images
    assert np.abs(clipped).max() <= 1.0 and np.abs(plain).max() > 1.0
    key = sampling.image_keys(7, [2])[0]
    if sampler == "dpmpp":  # its last step returns the clipped x0; the same without clipping
        dynamic = _generate(3, dynamic_threshold=0.9, **kwargs).images
        assert np.abs(dynamic).max() <= 1.0 and np.abs(dynamic - clipped).max() > 1e-3
        return
    if sampler == "ddpm":
        loop = diffusion.p_sample_loop(schedule, _toy_denoise, (1, *SHAPE), key,
                                       clip_denoised=True)
    else:
        loop = diffusion.ddim_sample_loop(schedule, _toy_denoise, (1, *SHAPE), key, steps,
                                          clip_denoised=True)
    np.testing.assert_allclose(clipped[2], np.asarray(loop)[0], atol=1e-5)

