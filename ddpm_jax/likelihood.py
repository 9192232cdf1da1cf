"""The variational bound of DDPM in bits per dimension (Ho et al. 2020, Sec. 3.3).

L = L_T + sum_{t>1} L_{t-1} + L_0: the prior term, closed-form Gaussian KL
terms, and a discretized Gaussian decoder for 8-bit data scaled to [-1, 1].
The reverse variance is the design's fixed posterior variance (the one
`p_sample` uses), with its log clipped at t = 0 as in DDPM. The reverse mean is
the posterior mean at the x0 the network implies (`predict_x0_eps`), so the
bound serves networks of every objective.
"""
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr, ndtr

from ddpm_jax.diffusion import DenoiseFn, predict_x0_eps, q_posterior, q_sample
from ddpm_jax.schedules import DiffusionSchedule

_LOG2 = np.log(2.0)
BIN_HALF_WIDTH = 1.0 / 255.0  # Bins of width 2/255 around each of the 256 levels.


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) per element under N(means, exp(log_scales)^2) integrated over x's bin.

    x holds 8-bit values scaled to [-1, 1]; the edge bins reach -inf and +inf,
    so the 256 probabilities sum to 1. The exact normal CDF is used, and bins
    in the upper tail are computed from the survival function to keep precision.
    """
    inv_std = jnp.exp(-log_scales)
    upper = inv_std * (x - means + BIN_HALF_WIDTH)
    lower = inv_std * (x - means - BIN_HALF_WIDTH)
    log_cdf_upper = log_ndtr(upper)          # log P(X < upper), the first bin
    log_survival_lower = log_ndtr(-lower)    # log P(X > lower), the last bin
    in_upper_tail = lower > 0
    mass = jnp.where(in_upper_tail, ndtr(-lower) - ndtr(-upper), ndtr(upper) - ndtr(lower))
    log_mid = jnp.log(jnp.maximum(mass, 1e-12))
    return jnp.where(x < -0.999, log_cdf_upper, jnp.where(x > 0.999, log_survival_lower, log_mid))


def _mean_over_pixels(x):
    return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def prior_bpd(schedule: DiffusionSchedule, x_start):
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, per image [B]."""
    t_last = schedule.num_timesteps - 1
    mean = schedule.sqrt_alphas_cumprod[t_last] * x_start
    logvar = jnp.log(1.0 - schedule.alphas_cumprod[t_last])
    return _mean_over_pixels(normal_kl(mean, logvar, 0.0, 0.0)) / _LOG2


def vb_term_bpd(schedule: DiffusionSchedule, denoise_fn: DenoiseFn, x_start, t, noise,
                objective: str = "eps"):
    """L_{t} for int timesteps t [B] in bits/dim: the decoder NLL where t == 0, else the KL;
    `denoise_fn` was trained on `objective`."""
    x_t = q_sample(schedule, x_start, t, noise)
    true_mean, _, true_logvar = q_posterior(schedule, x_start, x_t, t)
    x_start_pred = predict_x0_eps(schedule, objective, x_t, t, denoise_fn(x_t, t))[0]
    model_mean, _, model_logvar = q_posterior(schedule, x_start_pred, x_t, t)
    kl = _mean_over_pixels(normal_kl(true_mean, true_logvar, model_mean, model_logvar)) / _LOG2
    decoder_nll = -_mean_over_pixels(
        discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_logvar)) / _LOG2
    return jnp.where(t == 0, decoder_nll, kl)


def calc_bpd_loop(schedule: DiffusionSchedule, denoise_fn: DenoiseFn, x_start, key,
                  objective: str = "eps") -> Dict[str, jnp.ndarray]:
    """The whole variational bound of each image, every t, as the DDPM paper computes it.

    Returns per-image arrays: `total_bpd` [B], `prior_bpd` [B] and
    `terms_bpd` [B, T] (terms_bpd[:, 0] is the decoder term L_0).
    """
    batch = x_start.shape[0]

    def term(_, t):
        noise = jax.random.normal(jax.random.fold_in(key, t), x_start.shape, x_start.dtype)
        return None, vb_term_bpd(schedule, denoise_fn, x_start,
                                 jnp.full((batch,), t, jnp.int32), noise, objective)

    _, terms = jax.lax.scan(term, None, jnp.arange(schedule.num_timesteps, dtype=jnp.int32))
    terms = terms.T
    prior = prior_bpd(schedule, x_start)
    return {"total_bpd": jnp.sum(terms, axis=1) + prior, "prior_bpd": prior, "terms_bpd": terms}
