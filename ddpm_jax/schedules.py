"""Beta schedules and the constants derived from them.

The schedules follow the design document exactly (with the minus signs its
text lost restored from the math). Everything is computed in float64 with numpy on the
host and stored as float32, so the constants do not depend on the accelerator's
precision or on `jax_enable_x64`.

The design's betas were tuned for T = 1000 and never reach noise at its T = 200
(alpha_bar_T = 0.132), though sampling starts from N(0, I). `terminal_snr`
chooses what happens at t = T: "design" keeps the betas as given; "scaled"
multiplies them by 1000/T as lucidrains does (alpha_bar_T = 3e-5 for linear at
T = 200); "zero" rescales them to zero terminal SNR (Lin et al. 2023).
"""
from typing import Callable, Dict

import flax.struct
import jax.numpy as jnp
import numpy as np

BETA_START = 0.0001
BETA_END = 0.02


def linear_beta_schedule(timesteps: int) -> np.ndarray:
    return np.linspace(BETA_START, BETA_END, timesteps, dtype=np.float64)


def quadratic_beta_schedule(timesteps: int) -> np.ndarray:
    return np.linspace(BETA_START**0.5, BETA_END**0.5, timesteps, dtype=np.float64) ** 2


def sigmoid_beta_schedule(timesteps: int) -> np.ndarray:
    """A sigmoid in beta space (the design's; lucidrains' newer one is in alpha-bar space)."""
    x = np.linspace(-6.0, 6.0, timesteps, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-x)) * (BETA_END - BETA_START) + BETA_START


def cosine_beta_schedule(timesteps: int, s: float = 0.008) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule, betas clipped to [1e-4, 0.9999]."""
    x = np.linspace(0.0, timesteps, timesteps + 1, dtype=np.float64)
    alphas_cumprod = np.cos(((x / timesteps) + s) / (1 + s) * np.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = 1.0 - (alphas_cumprod[1:] / alphas_cumprod[:-1])
    return np.clip(betas, 0.0001, 0.9999)


BETA_SCHEDULES: Dict[str, Callable[[int], np.ndarray]] = {
        "linear": linear_beta_schedule,
        "cosine": cosine_beta_schedule,
        "quadratic": quadratic_beta_schedule,
        "sigmoid": sigmoid_beta_schedule,
}


TERMINAL_SNRS = ("design", "scaled", "zero")
# The largest scaled beta: the cosine schedule's cap, so that a scaled linear schedule at
# T <= 20 (betas up to 0.02 * 1000 / T >= 1) stays a diffusion.
MAX_SCALED_BETA = 0.9999
# 1 / sqrt(alpha_bar) and 1 / sqrt(alpha) where alpha_bar_T = 0 (zero terminal SNR) use this
# instead of 0, diffusers' value for its samplers (the smallest float16 subnormal).
ZERO_SNR_FLOOR = 2.0 ** -24


def scale_betas(name: str, betas: np.ndarray) -> np.ndarray:
    """lucidrains' `scale = 1000 / T` for schedules given in betas (linear, quadratic, sigmoid:
    each is then the T = 1000 schedule's betas at T points, the same alpha_bar_T at any T),
    capped at MAX_SCALED_BETA. cosine is defined in alpha_bar over t / T and already reaches
    alpha_bar_T of about 1e-8 at any T: it is returned as is."""
    if name == "cosine":
        return betas
    return np.minimum(betas * (1000.0 / len(betas)), MAX_SCALED_BETA)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023 (arXiv 2305.08891), Algorithm 1: sqrt(alpha_bar) shifted so that its
    last value is 0 and scaled so that its first is unchanged; betas[-1] becomes 1."""
    if len(betas) < 2:
        raise ValueError("a zero terminal SNR needs timesteps >= 2 (the first alpha_bar is kept)")
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    alphas_cumprod = ((sqrt_ab - last) * (first / (first - last))) ** 2
    alphas = np.concatenate([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas


def beta_schedule(name: str, timesteps: int, terminal_snr: str = "design") -> np.ndarray:
    """The float64 betas of schedule `name` over `timesteps` steps (see the module doc for
    `terminal_snr`)."""
    if name not in BETA_SCHEDULES:
        raise ValueError(
            f"unknown beta schedule {name!r}; valid choices: {sorted(BETA_SCHEDULES)}")
    if isinstance(timesteps, bool) or not isinstance(timesteps, (int, np.integer)) or timesteps < 1:
        raise ValueError(f"timesteps must be an integer >= 1, got {timesteps!r}")
    if terminal_snr not in TERMINAL_SNRS:
        raise ValueError(f"unknown terminal_snr {terminal_snr!r}; valid choices: "
                         f"{list(TERMINAL_SNRS)}")
    betas = BETA_SCHEDULES[name](int(timesteps))
    if terminal_snr == "scaled":
        return scale_betas(name, betas)
    if terminal_snr == "zero":
        return rescale_zero_terminal_snr(betas)
    return betas


@flax.struct.dataclass
class DiffusionSchedule:
    """Every per-timestep constant of the forward and reverse processes.

    An immutable pytree of float32 arrays of shape [T], so it can be passed into
    jitted functions as an argument instead of living in a global.
    """
    betas: jnp.ndarray
    alphas: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    alphas_cumprod_prev: jnp.ndarray
    sqrt_recip_alphas: jnp.ndarray
    sqrt_alphas_cumprod: jnp.ndarray
    sqrt_one_minus_alphas_cumprod: jnp.ndarray
    posterior_variance: jnp.ndarray
    # For the likelihood and for DDIM.
    posterior_log_variance_clipped: jnp.ndarray
    posterior_mean_coef1: jnp.ndarray
    posterior_mean_coef2: jnp.ndarray
    sqrt_recip_alphas_cumprod: jnp.ndarray
    sqrt_recipm1_alphas_cumprod: jnp.ndarray

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]


def schedule_constants(betas: np.ndarray) -> Dict[str, np.ndarray]:
    """The float64 constants of `DiffusionSchedule` for the given betas.

    A zero terminal SNR (betas[-1] = 1) keeps alpha_bar_T = 0 exactly, so the
    forward process ends at N(0, I) and the v and x0 objectives' conversions
    (`diffusion.predict_x0_eps`) and the posterior stay exact and finite there.
    Only the reciprocals 1/sqrt(alpha_bar_T) and 1/sqrt(alpha_T) would be
    infinite: they take alpha_bar = alpha = ZERO_SNR_FLOOR instead, as diffusers'
    samplers do. They serve only the eps objective's x0 and Equation 11, which
    config validation refuses with a zero terminal SNR and the samplers avoid
    for the other objectives, so every constant is finite.
    """
    betas = np.asarray(betas, dtype=np.float64)
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.concatenate([[1.0], alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # posterior_variance[0] is 0; as in DDPM, its log takes the next value
    # (betas[0] when T == 1 has no next value).
    clipped = posterior_variance.copy()
    clipped[0] = posterior_variance[1] if len(betas) > 1 else betas[0]
    posterior_log_variance_clipped = np.log(clipped)
    return dict(
        betas=betas,
        alphas=alphas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_recip_alphas=np.sqrt(1.0 / _floored(alphas)),
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=posterior_log_variance_clipped,
        posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / _floored(alphas_cumprod)),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / _floored(alphas_cumprod) - 1.0),
    )


def _floored(a: np.ndarray) -> np.ndarray:
    """`a` with its zeros (alpha_T and alpha_bar_T at zero terminal SNR) set to ZERO_SNR_FLOOR."""
    return np.where(a > 0.0, a, ZERO_SNR_FLOOR)


def make_schedule(name: str = "linear", timesteps: int = 200, terminal_snr: str = "design"
                  ) -> DiffusionSchedule:
    """The schedule `name` over `timesteps` steps, as float32 device arrays."""
    constants = schedule_constants(beta_schedule(name, timesteps, terminal_snr))
    return DiffusionSchedule(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in constants.items()})


def schedule_from_config(diffusion_config) -> DiffusionSchedule:
    """The schedule of a config's `diffusion` section."""
    return make_schedule(diffusion_config.beta_schedule, diffusion_config.timesteps,
                         diffusion_config.terminal_snr)
