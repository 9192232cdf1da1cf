"""DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095): multistep, data prediction, for the
discrete-time models this project trains.

In lambda = log(alpha / sigma) the probability-flow ODE of the data prediction
x0(x, lambda) is x_t = (sigma_t / sigma_s) x_s + sigma_t * integral of e^lambda x0 dlambda:
the linear part is solved exactly and x0 is extrapolated from the last `order`
network calls (a polynomial in lambda), so a step of size h has error O(h^(order+1)).
Order 1 is DDIM with eta = 0.

The grid: `num_steps` network calls at timesteps t_0 = T-1 > ... > t_{N-1}, the
first N of N+1 points spaced uniformly in t or in lambda from T-1 down to 0,
rounded to timesteps; the last point is the clean image (alpha = 1, sigma = 0,
lambda = inf) instead of t = 0, so the last step returns the x0 prediction at
t_{N-1} and no call is spent at t = 0 (sigma_0 = 0.01 for the linear schedule).
Uniform in t this is diffusers' `timestep_spacing="linspace"` with
`final_sigmas_type="zero"`; diffusers' log-SNR grid (`use_lu_lambdas`) instead
calls the network at t = 0 and rounds only the network's timestep, not the alpha
and sigma it steps with. Here the network sees exactly the alpha and sigma the
solver uses.

Everything stays finite when alpha_bar_{T-1} = 0 (zero terminal SNR, lambda =
-inf): the first step is then sigma_1 x + alpha_1 x0, and the history terms that
involve lambda = -inf vanish.
"""
from typing import Sequence, Tuple

import jax.numpy as jnp
import numpy as np

SPACINGS = ("time", "logsnr")
ORDERS = (1, 2, 3)
# Runs with fewer steps lower the order of their last steps (diffusers' threshold; the
# official code's is 10): extrapolating over the long last steps near t = 0 is unstable.
LOWER_ORDER_FINAL_BELOW = 15


def log_snr(alpha, sigma):
    """lambda = log(alpha / sigma); -inf where alpha = 0, inf where sigma = 0."""
    return jnp.log(alpha) - jnp.log(sigma)


def timesteps(alpha: np.ndarray, sigma: np.ndarray, num_steps: int, spacing: str = "time"
              ) -> np.ndarray:
    """The descending int32 timesteps of the network calls (at most `num_steps`: timesteps
    that coincide after rounding are called once) for a schedule's alpha, sigma [T]."""
    num_timesteps = len(alpha)
    if spacing not in SPACINGS:
        raise ValueError(f"step_spacing must be one of {list(SPACINGS)}, got {spacing!r}")
    if spacing == "time":
        points = np.linspace(0, num_timesteps - 1, num_steps + 1).round()[::-1][:-1]
    else:
        with np.errstate(divide="ignore"):
            lam = np.log(np.asarray(alpha, np.float64)) - np.log(np.asarray(sigma, np.float64))
        # Zero terminal SNR: space from the smallest finite lambda; t = T-1 stays the start.
        lam = np.maximum(lam, lam[np.isfinite(lam)].min())
        targets = np.linspace(lam[-1], lam[0], num_steps + 1)[:-1]
        # lambda falls with t: interpolate t(lambda) on the ascending reversed arrays.
        points = np.interp(targets, lam[::-1], np.arange(num_timesteps - 1, -1, -1)).round()
        points[0] = num_timesteps - 1
    return np.unique(points.astype(np.int32))[::-1]


def orders(num_steps: int, order: int, to_data: bool = True) -> np.ndarray:
    """The order of each of `num_steps` steps: lower while too few network outputs exist.

    to_data: the last step lands on the clean image (lambda = inf), where only the first
    order is finite; and runs shorter than LOWER_ORDER_FINAL_BELOW steps also lower the
    order of their last steps (at most `num_steps - i` for step i), as diffusers does.
    """
    if order not in ORDERS:
        raise ValueError(f"solver_order must be one of {list(ORDERS)}, got {order!r}")
    i = np.arange(num_steps)
    result = np.minimum(order, i + 1)
    if to_data:
        if num_steps < LOWER_ORDER_FINAL_BELOW:
            result = np.minimum(result, num_steps - i)
        result[-1] = 1
    return result.astype(np.int32)


def step(x, x0s: Sequence[jnp.ndarray], lambdas: Sequence[jnp.ndarray], alpha_t, sigma_t,
         sigma_s, order) -> jnp.ndarray:
    """One DPM-Solver++ multistep update from x at s = s0 to t.

    x0s: the data predictions (x0_s0, x0_s1, x0_s2) at the current and two previous grid
    points, newest first; lambdas: (lambda_t, lambda_s0, lambda_s1, lambda_s2); `order`
    (1, 2 or 3, may be traced) says how many of them are used: the others may hold anything.
    The second order is the paper's 2M (diffusers' "midpoint"). The third is the Taylor
    expansion of x0 to its second derivative: the official code's and diffusers' 3M weigh
    that term by half (their D2 is h^2 x0''/2 where the integral needs h^2 x0''), which
    leaves them second order; here d2 has the factor 2 of the official singlestep code.
    """
    lam_t, lam_s0, lam_s1, lam_s2 = lambdas
    m0, m1, m2 = x0s
    h = lam_t - lam_s0
    phi1 = jnp.expm1(-h)  # e^-h - 1
    linear = (sigma_t / sigma_s) * x
    r0 = (lam_s0 - lam_s1) / h
    d1_0 = (m0 - m1) / r0
    first = linear - alpha_t * phi1 * m0
    second = first - 0.5 * alpha_t * phi1 * d1_0
    r1 = (lam_s1 - lam_s2) / h
    d1_1 = (m1 - m2) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)  # h x0'(lambda_s0) + O(h^3)
    d2 = 2.0 * (d1_0 - d1_1) / (r0 + r1)  # h^2 x0''(lambda_s0) + O(h^3)
    third = (first + alpha_t * (phi1 / h + 1.0) * d1
             - alpha_t * ((phi1 + h) / h ** 2 - 0.5) * d2)
    return jnp.where(order == 1, first, jnp.where(order == 2, second, third))


def dynamic_threshold(x0, percentile: float):
    """Imagen's dynamic thresholding (Saharia et al. 2022) of one image's x0: s = the
    `percentile` quantile of |x0| (at least 1), x0 clipped to [-s, s] and divided by s."""
    s = jnp.maximum(jnp.quantile(jnp.abs(x0), percentile), 1.0)
    return jnp.clip(x0, -s, s) / s


def grid_constants(schedule, ts: np.ndarray) -> Tuple[jnp.ndarray, ...]:
    """(alpha, sigma, lambda) at the grid points `ts` followed by the clean image (alpha 1,
    sigma 0, lambda inf): arrays [len(ts) + 1]."""
    alpha = jnp.concatenate([schedule.sqrt_alphas_cumprod[ts], jnp.ones(1)])
    sigma = jnp.concatenate([schedule.sqrt_one_minus_alphas_cumprod[ts], jnp.zeros(1)])
    return alpha, sigma, log_snr(alpha, sigma)
