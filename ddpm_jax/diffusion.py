"""The DDPM forward process, training losses and samplers, as pure functions.

Names follow the design document so that a user of the PyTorch version finds
them. Every function takes the `DiffusionSchedule` and, where it needs
randomness, an explicit PRNG key. The network enters as `denoise_fn(x, t)`,
a function from noisy images [B, H, W, C] and int timesteps [B] to what the
network predicts: the noise (the design's "eps" objective), the clean image
("x0") or v ("v"); `predict_x0_eps` turns any of them into (x0, eps), and
every sampler and the bound take the `objective` they were trained with.
"""
from typing import Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.schedules import DiffusionSchedule

DenoiseFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
# A class-conditional network: (x, t, int labels [B]) -> predicted noise.
ConditionalDenoiseFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]

LOSS_TYPES = ("l1", "l2", "huber")
# What the network predicts: the noise (the design's), the clean image, or
# v = alpha * eps - sigma * x0 (Salimans & Ho 2022).
OBJECTIVES = ("eps", "x0", "v")
# Per-timestep loss weights: none (the design's), or Min-SNR-gamma (Hang et al. 2023).
LOSS_WEIGHTINGS = ("none", "min_snr")


def extract(a: jnp.ndarray, t: jnp.ndarray, x_shape: Sequence[int]) -> jnp.ndarray:
    """a[t] reshaped to [B, 1, 1, ...] so it broadcasts against an x of `x_shape`."""
    return a[t].reshape((t.shape[0],) + (1,) * (len(x_shape) - 1))


def q_sample(schedule: DiffusionSchedule, x_start, t, noise):
    """Sample x_t ~ q(x_t | x_0) in closed form (the "nice property")."""
    return (extract(schedule.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)


def elementwise_loss(target, prediction, loss_type: str = "l1"):
    """The loss of each element; huber is PyTorch's `smooth_l1_loss` with beta 1."""
    diff = prediction - target
    if loss_type == "l1":
        return jnp.abs(diff)
    if loss_type == "l2":
        return diff ** 2
    if loss_type == "huber":
        abs_diff = jnp.abs(diff)
        return jnp.where(abs_diff < 1.0, 0.5 * diff ** 2, abs_diff - 0.5)
    raise ValueError(f"unknown loss_type {loss_type!r}; valid choices: {list(LOSS_TYPES)}")


def loss_fn(target, prediction, loss_type: str = "l1"):
    """The mean elementwise loss between the target (the design's: the noise) and the
    prediction."""
    return jnp.mean(elementwise_loss(target, prediction, loss_type))


def objective_target(schedule: DiffusionSchedule, objective: str, x_start, t, noise):
    """What a network trained on `objective` should output for x_t = q_sample(x_start, t,
    noise): the noise, x_start, or v = alpha * noise - sigma * x_start."""
    if objective == "eps":
        return noise
    if objective == "x0":
        return x_start
    if objective == "v":
        return (extract(schedule.sqrt_alphas_cumprod, t, x_start.shape) * noise
                - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * x_start)
    raise ValueError(f"unknown objective {objective!r}; valid choices: {list(OBJECTIVES)}")


def signal_to_noise(schedule: DiffusionSchedule, t):
    """SNR = alpha_bar / (1 - alpha_bar) at int timesteps t, 1 - alpha_bar without cancellation."""
    return schedule.alphas_cumprod[t] / schedule.sqrt_one_minus_alphas_cumprod[t] ** 2


def min_snr_weight(schedule: DiffusionSchedule, objective: str, t, gamma: float):
    """Min-SNR-gamma loss weights [B] (Hang et al. 2023): min(SNR, gamma) times 1 / SNR (eps),
    1 (x0) or 1 / (SNR + 1) (v), the weights that make each objective's loss
    min(SNR, gamma) |x0 error|^2. Where SNR = 0 (zero terminal SNR) the weight is 1,
    as in the official code: the formulas give 0 (x0, v), which would never train t = T."""
    snr = signal_to_noise(schedule, t)
    positive = snr > 0
    safe_snr = jnp.where(positive, snr, 1.0)
    clipped = jnp.minimum(safe_snr, gamma)
    if objective == "eps":
        weight = clipped / safe_snr
    elif objective == "x0":
        weight = clipped
    elif objective == "v":
        weight = clipped / (safe_snr + 1.0)
    else:
        raise ValueError(f"unknown objective {objective!r}; valid choices: {list(OBJECTIVES)}")
    return jnp.where(positive, weight, 1.0)


def p_losses(schedule: DiffusionSchedule, denoise_fn: DenoiseFn, x_start, t, noise,
             loss_type: str = "l1", objective: str = "eps", loss_weighting: str = "none",
             min_snr_gamma: float = 5.0):
    """The training loss of Algorithm 1 for given timesteps and noise: the network's output
    against `objective_target`, each example weighted by `min_snr_weight` with
    loss_weighting "min_snr" (gamma `min_snr_gamma`); "none" is the plain mean."""
    x_noisy = q_sample(schedule, x_start, t, noise)
    target = objective_target(schedule, objective, x_start, t, noise)
    prediction = denoise_fn(x_noisy, t)
    if loss_weighting == "none":
        return loss_fn(target, prediction, loss_type)
    if loss_weighting != "min_snr":
        raise ValueError(f"unknown loss_weighting {loss_weighting!r}; valid choices: "
                         f"{list(LOSS_WEIGHTINGS)}")
    per_example = jnp.mean(elementwise_loss(target, prediction, loss_type).reshape(
        x_start.shape[0], -1), axis=1)
    return jnp.mean(min_snr_weight(schedule, objective, t, min_snr_gamma) * per_example)


def guided_denoise_fn(denoise_fn: ConditionalDenoiseFn, null_label: int, guidance
                      ) -> ConditionalDenoiseFn:
    """Classifier-free guidance (Ho & Salimans 2022) of a conditional network:
    eps = (1 + w) eps(x, c) - w eps(x, none), w = `guidance` (0: plain conditional).

    The same combination of x0 or v outputs is the guided eps of any objective: eps is
    affine in either (`predict_x0_eps`) and the weights 1 + w and -w sum to 1.

    Both passes are one call of `denoise_fn` on the batch twice over (labels,
    then `null_label`), so the samplers' steps take the result as any `DenoiseFn`.
    """
    def denoise(x, t, labels):
        batch = x.shape[0]
        eps = denoise_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                         jnp.concatenate([labels, jnp.full_like(labels, null_label)]))
        return (1 + guidance) * eps[:batch] - guidance * eps[batch:]
    return denoise


def predict_start_from_noise(schedule: DiffusionSchedule, x_t, t, noise):
    """x_0 implied by x_t and the noise that produced it."""
    return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise)


def predict_x0_eps(schedule: DiffusionSchedule, objective: str, x_t, t, output
                   ) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """(x0, eps) implied by x_t and a network `output` trained on `objective`.

    The one conversion every sampler and the bound use, so that each works with
    every objective. With alpha = sqrt(alpha_bar_t), sigma = sqrt(1 - alpha_bar_t):
    eps -> x0 = (x_t - sigma eps) / alpha; x0 -> eps = (x_t - alpha x0) / sigma;
    v -> x0 = alpha x_t - sigma v, eps = sigma x_t + alpha v.
    """
    if objective == "eps":
        return predict_start_from_noise(schedule, x_t, t, output), output
    alpha = extract(schedule.sqrt_alphas_cumprod, t, x_t.shape)
    sigma = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.shape)
    if objective == "x0":
        return output, (x_t - alpha * output) / sigma
    if objective == "v":
        return alpha * x_t - sigma * output, sigma * x_t + alpha * output
    raise ValueError(f"unknown objective {objective!r}; valid choices: {list(OBJECTIVES)}")


def q_posterior(schedule: DiffusionSchedule, x_start, x_t, t
                ) -> Tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
    mean = (extract(schedule.posterior_mean_coef1, t, x_t.shape) * x_start
            + extract(schedule.posterior_mean_coef2, t, x_t.shape) * x_t)
    variance = extract(schedule.posterior_variance, t, x_t.shape)
    log_variance = extract(schedule.posterior_log_variance_clipped, t, x_t.shape)
    return mean, variance, log_variance


def p_mean(schedule: DiffusionSchedule, x, t, predicted_noise):
    """The reverse-process mean of Equation 11, exactly as the design computes it."""
    return extract(schedule.sqrt_recip_alphas, t, x.shape) * (
        x - extract(schedule.betas, t, x.shape) * predicted_noise
        / extract(schedule.sqrt_one_minus_alphas_cumprod, t, x.shape))


def p_mean_x0(schedule: DiffusionSchedule, x, t, output, objective: str = "eps",
              clip_denoised: bool = False):
    """The DDPM paper code's reverse mean: the posterior mean of q(x_{t-1} | x_t, x0) at the
    x0 a network `output` trained on `objective` implies, clipped to the data range [-1, 1]
    with `clip_denoised`. Without clipping it equals Equation 11 (`p_mean`) algebraically,
    and unlike Equation 11 it is finite at a zero terminal SNR (for x0 and v)."""
    x_start = predict_x0_eps(schedule, objective, x, t, output)[0]
    if clip_denoised:
        x_start = jnp.clip(x_start, -1.0, 1.0)
    return q_posterior(schedule, x_start, x, t)[0]


def p_sample(schedule: DiffusionSchedule, denoise_fn: DenoiseFn, x, t, key,
             clip_denoised: bool = False, objective: str = "eps"):
    """One step of Algorithm 2: x_{t-1} from x_t, with no noise where t == 0.

    An eps network steps with the design's Equation 11 (`p_mean`); with
    clip_denoised, or a network of another `objective`, the mean goes through
    the predicted x0 (`p_mean_x0`).
    """
    output = denoise_fn(x, t)
    if objective == "eps" and not clip_denoised:
        model_mean = p_mean(schedule, x, t, output)
    else:
        model_mean = p_mean_x0(schedule, x, t, output, objective, clip_denoised)
    noise = jax.random.normal(key, x.shape, x.dtype)
    std = jnp.sqrt(extract(schedule.posterior_variance, t, x.shape))
    nonzero = extract((jnp.arange(schedule.num_timesteps) > 0).astype(x.dtype), t, x.shape)
    return model_mean + nonzero * std * noise


def _initial_noise(shape, key, x_T):
    """Split `key` into one for x_T and one for the steps; x_T is drawn unless given."""
    init_key, loop_key = jax.random.split(key)
    if x_T is None:
        if shape is None:
            raise ValueError("give either shape or x_T")
        x_T = jax.random.normal(init_key, tuple(shape), jnp.float32)
    elif shape is not None and tuple(shape) != tuple(x_T.shape):
        raise ValueError(f"shape {tuple(shape)} does not match x_T.shape {tuple(x_T.shape)}")
    return x_T, loop_key


def p_sample_loop(schedule: DiffusionSchedule, denoise_fn: DenoiseFn, shape, key,
                  x_T: Optional[jnp.ndarray] = None, return_trajectory: bool = False,
                  clip_denoised: bool = False, objective: str = "eps"):
    """Algorithm 2 as one `lax.scan` from x_T ~ N(0, I) down to x_0.

    The step at time t uses the key `fold_in(loop_key, t)`, so its noise does
    not depend on how the loop is compiled or sharded. Returns x_0, or with
    `return_trajectory` the T images after each step ([T, B, H, W, C], last is
    x_0), like the design's list of images. clip_denoised, objective: see `p_sample`.
    """
    x, loop_key = _initial_noise(shape, key, x_T)
    batch = x.shape[0]

    def step(x, t):
        x = p_sample(schedule, denoise_fn, x, jnp.full((batch,), t, jnp.int32),
                     jax.random.fold_in(loop_key, t), clip_denoised, objective)
        return x, (x if return_trajectory else None)

    timesteps = jnp.arange(schedule.num_timesteps - 1, -1, -1, dtype=jnp.int32)
    x, trajectory = jax.lax.scan(step, x, timesteps)
    return trajectory if return_trajectory else x


def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """`num_steps` evenly spaced timesteps from T-1 down to 0 (all T when equal)."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"DDIM num_steps must be in [1, {num_timesteps}], got {num_steps}")
    return np.unique(np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(np.int32))[::-1]


def _one_minus_alphas_cumprod(schedule: DiffusionSchedule, t):
    """1 - alpha_bar_t without cancellation; 0 for t = -1 (x_0)."""
    return jnp.where(t >= 0, schedule.sqrt_one_minus_alphas_cumprod[jnp.maximum(t, 0)] ** 2, 0.0)


def ddim_sigma(schedule: DiffusionSchedule, t, t_prev, eta):
    """DDIM's noise scale between t and t_prev (t_prev = -1 means x_0).

    1 - alpha_bar_t / alpha_bar_prev is 1 - prod(1 - beta_s) over (t_prev, t],
    computed as -expm1(sum log1p(-beta_s)) because the plain float32 ratio loses
    the ~1e-4 differences between neighbouring alpha_bars.
    """
    s = jnp.arange(schedule.num_timesteps)
    in_range = (s > jnp.asarray(t_prev)[..., None]) & (s <= jnp.asarray(t)[..., None])
    one_minus_ratio = -jnp.expm1(
        jnp.sum(jnp.where(in_range, jnp.log1p(-schedule.betas), 0.0), axis=-1))
    return eta * jnp.sqrt(_one_minus_alphas_cumprod(schedule, t_prev)
                          / _one_minus_alphas_cumprod(schedule, t) * one_minus_ratio)


def ddim_step(schedule: DiffusionSchedule, denoise_fn: DenoiseFn, x, t, t_prev, eta, key,
              clip_denoised: bool = False, objective: str = "eps"):
    """One DDIM update x_t -> x_{t_prev} for scalar int timesteps t > t_prev >= -1, of a
    network trained on `objective` (x0 and eps from `predict_x0_eps`).

    clip_denoised: clip the predicted x0 to [-1, 1] and step with the noise re-derived
    from it (what the DDPM paper's code and lucidrains do), so both terms agree.
    """
    t_batch = jnp.full((x.shape[0],), t, jnp.int32)
    x_start, predicted_noise = predict_x0_eps(schedule, objective, x, t_batch,
                                              denoise_fn(x, t_batch))
    if clip_denoised:
        x_start = jnp.clip(x_start, -1.0, 1.0)
        if objective == "eps":  # the design's constants: bitwise the sampler eps runs had
            predicted_noise = (
                (extract(schedule.sqrt_recip_alphas_cumprod, t_batch, x.shape) * x - x_start)
                / extract(schedule.sqrt_recipm1_alphas_cumprod, t_batch, x.shape))
        else:  # (x - alpha x0) / sigma: exact where alpha_bar_T = 0
            predicted_noise = predict_x0_eps(schedule, "x0", x, t_batch, x_start)[1]
    sqrt_alpha_bar_prev = jnp.where(
        t_prev >= 0, schedule.sqrt_alphas_cumprod[jnp.maximum(t_prev, 0)], 1.0)
    sigma = ddim_sigma(schedule, t, t_prev, eta)
    direction = jnp.sqrt(jnp.maximum(
        _one_minus_alphas_cumprod(schedule, t_prev) - sigma ** 2, 0.0)) * predicted_noise
    noise = jax.random.normal(key, x.shape, x.dtype)
    return sqrt_alpha_bar_prev * x_start + direction + sigma * noise


def ddim_sample_loop(schedule: DiffusionSchedule, denoise_fn: DenoiseFn, shape, key,
                     num_steps: int, eta: float = 0.0, x_T: Optional[jnp.ndarray] = None,
                     return_trajectory: bool = False, clip_denoised: bool = False,
                     objective: str = "eps"):
    """DDIM (Song et al. 2021) over `num_steps` of the T timesteps, as one `lax.scan`.

    eta = 0 is deterministic given x_T; eta = 1 with all T steps has the DDPM
    posterior variance. Returns x_0, or the `num_steps` images after each step.
    clip_denoised, objective: see `ddim_step`.
    """
    x, loop_key = _initial_noise(shape, key, x_T)
    ts = ddim_timesteps(schedule.num_timesteps, num_steps)
    t_prevs = np.concatenate([ts[1:], [-1]]).astype(np.int32)

    def step(x, ts_pair):
        t, t_prev = ts_pair
        x = ddim_step(schedule, denoise_fn, x, t, t_prev, eta, jax.random.fold_in(loop_key, t),
                      clip_denoised, objective)
        return x, (x if return_trajectory else None)

    x, trajectory = jax.lax.scan(step, x, (jnp.asarray(ts), jnp.asarray(t_prevs)))
    return trajectory if return_trajectory else x
