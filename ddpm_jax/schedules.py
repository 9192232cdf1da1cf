"""Beta schedules and the constants derived from them.

The schedules follow the design document exactly (with the minus signs its
text lost restored from the math). Everything is computed in float64 with numpy on the
host and stored as float32, so the constants do not depend on the accelerator's
precision or on `jax_enable_x64`.
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


def beta_schedule(name: str, timesteps: int) -> np.ndarray:
    """The float64 betas of schedule `name` over `timesteps` steps."""
    if name not in BETA_SCHEDULES:
        raise ValueError(
            f"unknown beta schedule {name!r}; valid choices: {sorted(BETA_SCHEDULES)}")
    if isinstance(timesteps, bool) or not isinstance(timesteps, (int, np.integer)) or timesteps < 1:
        raise ValueError(f"timesteps must be an integer >= 1, got {timesteps!r}")
    return BETA_SCHEDULES[name](int(timesteps))


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
    """The float64 constants of `DiffusionSchedule` for the given betas."""
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
        sqrt_recip_alphas=np.sqrt(1.0 / alphas),
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=posterior_log_variance_clipped,
        posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
    )


def make_schedule(name: str = "linear", timesteps: int = 200) -> DiffusionSchedule:
    """The schedule `name` over `timesteps` steps, as float32 device arrays."""
    constants = schedule_constants(beta_schedule(name, timesteps))
    return DiffusionSchedule(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in constants.items()})
