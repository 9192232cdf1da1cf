"""The variational bound's terms against closed forms and a float64 numpy evaluation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy.stats import norm

from ddpm_jax import likelihood, schedules

pytestmark = pytest.mark.newest_stack


def test_normal_kl_closed_forms():
    m, lv = jnp.array([0.3, -2.0]), jnp.array([0.1, -1.5])
    np.testing.assert_allclose(np.asarray(likelihood.normal_kl(m, lv, m, lv)), 0.0, atol=1e-7)
    # KL(N(1, 2) || N(0, 1)) = (2 + 1 - 1 - log 2) / 2.
    got = likelihood.normal_kl(1.0, np.log(2.0), 0.0, 0.0)
    np.testing.assert_allclose(float(got), 0.5 * (2.0 - np.log(2.0)), rtol=1e-6)
    # A general pair, against torch.distributions.
    mean1, logvar1, mean2, logvar2 = 0.7, -0.4, -1.1, 0.9
    want = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean1, np.exp(0.5 * logvar1)),
        torch.distributions.Normal(mean2, np.exp(0.5 * logvar2)))
    np.testing.assert_allclose(float(likelihood.normal_kl(mean1, logvar1, mean2, logvar2)),
                               float(want), rtol=1e-6)


LEVELS = np.arange(256) / 127.5 - 1.0


@pytest.mark.parametrize("mean,log_scale", [(0.0, np.log(0.1)), (0.93, np.log(0.01)),
                                            (-1.0, np.log(0.5)), (0.37, np.log(1e-3)),
                                            (0.99, np.log(0.003))])
def test_decoder_probabilities_sum_to_one_and_match_scipy(mean, log_scale):
    x = jnp.asarray(LEVELS, jnp.float32)
    log_p = likelihood.discretized_gaussian_log_likelihood(
        x, jnp.full_like(x, mean), jnp.full_like(x, log_scale))
    p = np.exp(np.asarray(log_p, np.float64))
    assert abs(p.sum() - 1.0) < 1e-5
    # Direct float64 evaluation: bins of width 2/255, edge bins open to infinity.
    std = np.exp(log_scale)
    upper = np.where(LEVELS > 0.999, np.inf, LEVELS + 1 / 255)
    lower = np.where(LEVELS < -0.999, -np.inf, LEVELS - 1 / 255)
    want = norm.cdf(upper, mean, std) - norm.cdf(lower, mean, std)
    likely = want > 1e-6
    np.testing.assert_allclose(p[likely], want[likely], rtol=2e-4)


def _toy_denoiser(x, t):
    return 0.8 * jnp.tanh(0.7 * x - 0.002 * t.reshape(-1, 1, 1, 1).astype(x.dtype))


def _numpy_bound(betas, x0, noises):
    """The DDPM bound in float64 numpy, written out term by term from the paper."""
    alphas = 1 - betas
    ab = np.cumprod(alphas)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    post_var = betas * (1 - ab_prev) / (1 - ab)
    post_logvar = np.log(np.concatenate([post_var[1:2], post_var[1:]]))
    coef1 = betas * np.sqrt(ab_prev) / (1 - ab)
    coef2 = (1 - ab_prev) * np.sqrt(alphas) / (1 - ab)
    kl = lambda m1, lv1, m2, lv2: 0.5 * (-1 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 / np.exp(lv2))
    total = kl(np.sqrt(ab[-1]) * x0, np.log(1 - ab[-1]), 0.0, 0.0).mean(axis=(1, 2, 3))
    for t in range(len(betas)):
        x_t = np.sqrt(ab[t]) * x0 + np.sqrt(1 - ab[t]) * noises[t]
        eps = 0.8 * np.tanh(0.7 * x_t - 0.002 * t)
        x0_pred = (x_t - np.sqrt(1 - ab[t]) * eps) / np.sqrt(ab[t])
        model_mean = coef1[t] * x0_pred + coef2[t] * x_t
        if t == 0:
            std = np.exp(0.5 * post_logvar[0])
            upper = np.where(x0 > 0.999, np.inf, x0 + 1 / 255)
            lower = np.where(x0 < -0.999, -np.inf, x0 - 1 / 255)
            p = norm.cdf(upper, model_mean, std) - norm.cdf(lower, model_mean, std)
            term = -np.log(np.maximum(p, 1e-12)).mean(axis=(1, 2, 3))
        else:
            true_mean = coef1[t] * x0 + coef2[t] * x_t
            term = kl(true_mean, post_logvar[t], model_mean, post_logvar[t]).mean(axis=(1, 2, 3))
        total = total + term
    return total / np.log(2)


def test_bpd_matches_numpy_bound():
    timesteps, shape = 20, (3, 4, 4, 1)
    s = schedules.make_schedule("linear", timesteps)
    rng = np.random.default_rng(0)
    x0 = (rng.integers(0, 256, shape) / 127.5 - 1.0).astype(np.float32)
    key = jax.random.PRNGKey(5)
    out = jax.jit(lambda x: likelihood.calc_bpd_loop(s, _toy_denoiser, x, key))(jnp.asarray(x0))
    noises = [np.asarray(jax.random.normal(jax.random.fold_in(key, t), shape), np.float64)
              for t in range(timesteps)]
    want = _numpy_bound(schedules.linear_beta_schedule(timesteps), x0.astype(np.float64), noises)
    assert out["terms_bpd"].shape == (3, timesteps)
    np.testing.assert_allclose(np.asarray(out["total_bpd"]), want, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(out["total_bpd"]),
                               np.asarray(out["terms_bpd"].sum(1) + out["prior_bpd"]), rtol=1e-6)


def test_bpd_of_the_exact_denoiser_is_prior_plus_decoder():
    """For data that is a single image c, eps(x_t, t) = (x_t - sqrt(ab) c) / sqrt(1 - ab) is exact.

    Then every KL term vanishes and the bound is L_T plus the decoder's NLL of
    c under N(c, posterior variance at t=0), both known in closed form.
    """
    timesteps = 50
    s = schedules.make_schedule("linear", timesteps)
    c = jnp.asarray((np.random.default_rng(1).integers(0, 256, (2, 3, 3, 1)) / 127.5 - 1.0)
                    .astype(np.float32))

    def exact(x_t, t):
        sqrt_ab = s.sqrt_alphas_cumprod[t].reshape(-1, 1, 1, 1)
        return (x_t - sqrt_ab * c) / s.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1, 1, 1)

    out = likelihood.calc_bpd_loop(s, exact, c, jax.random.PRNGKey(0))
    np.testing.assert_allclose(np.asarray(out["terms_bpd"][:, 1:]), 0.0, atol=2e-3)
    ab = np.cumprod(1 - schedules.linear_beta_schedule(timesteps))
    c64 = np.asarray(c, np.float64)
    prior = 0.5 * (-1 - np.log(1 - ab[-1]) + (1 - ab[-1]) + ab[-1] * c64 ** 2)
    std = np.sqrt(schedules.schedule_constants(schedules.linear_beta_schedule(timesteps))
                  ["posterior_variance"][1])
    upper = np.where(c64 > 0.999, np.inf, c64 + 1 / 255)
    lower = np.where(c64 < -0.999, -np.inf, c64 - 1 / 255)
    decoder = -np.log(norm.cdf(upper, c64, std) - norm.cdf(lower, c64, std))
    want = (prior + decoder).mean(axis=(1, 2, 3)) / np.log(2)
    np.testing.assert_allclose(np.asarray(out["total_bpd"]), want, rtol=1e-3)
