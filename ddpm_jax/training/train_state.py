"""The training state and the optimizer, built from the config (the network: `unet.create_model`).

Everything a resumed run needs is in `TrainState`: with the step number, the
RNG key and the optimizer moments restored, the run continues bit for bit as
if it had never stopped (the data pipeline's batches are a pure function of
the seed and the step, so its position is `step`).
"""
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ddpm_jax.models.unet import Unet


@flax.struct.dataclass
class TrainState:
    """step: updates attempted so far (int32 scalar); the next batch is batch number `step`.
    params / ema_params: the network's weights and their exponential moving average.
    opt_state: Adam's moments and update count.
    rng: raw uint32 key data (`jax.random.key_data`) from which each step folds its keys.
    skipped_steps: steps whose update was dropped because the loss or gradients were
      not finite (int32 scalar); `step - skipped_steps` updates were applied.
    """
    step: jnp.ndarray
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jnp.ndarray
    skipped_steps: jnp.ndarray


def learning_rate_schedule(config) -> optax.Schedule:
    """lr * min(n / warmup_steps, 1) after n applied updates (the DDPM paper's warmup)."""
    lr, warmup = config.optim.learning_rate, config.optim.warmup_steps
    if warmup == 0:
        return optax.constant_schedule(lr)
    return optax.linear_schedule(0.0, lr, warmup)


def make_optimizer(config) -> optax.GradientTransformation:
    """Adam on a schedule. Gradient clipping happens in the train step, which needs the
    gradient norm anyway, so that the optimizer state has the same structure whether
    clipping is on or off (a checkpoint restores under either)."""
    o = config.optim
    return optax.adam(learning_rate_schedule(config), b1=o.b1, b2=o.b2, eps=o.eps)


def ema_decay_at(config, applied_steps):
    """The EMA decay of the update that follows `applied_steps` applied updates.

    0 (the EMA copies the weights) for the first `config.optim.ema_start` updates: an
    average of the weights lags them while the loss still falls fast. Then, with
    `config.optim.ema_warmup`, min(ema_decay, (1 + m) / (10 + m)) after m averaged
    updates (TensorFlow's `ExponentialMovingAverage(num_updates=m)`): the first keeps
    1/10 of the weights it starts from and after k of them 1 / C(k + 9, 9) is left
    (2e-13 at k = 100; without warmup 0.995^100 = 0.61). A function of the
    applied-update count only, so it needs no state of its own: skipped steps and
    resumes stay exact and checkpoints keep their structure. (`optax.ema(debias=True)`
    would add a count and a zero-started average to the state, and its debiasing to
    every read of the weights.) `config.optim.ema_decay` stays the final decay, reached
    ~1.8k updates after ema_start at 0.995.
    """
    m = jnp.asarray(applied_steps, jnp.float32) - config.optim.ema_start
    decay = jnp.float32(config.optim.ema_decay)
    if config.optim.ema_warmup:
        decay = jnp.minimum(decay, (1.0 + m) / (10.0 + m))
    return jnp.where(m < 0, jnp.float32(0.0), decay)


def create_train_state(config, model: Unet, optimizer: optax.GradientTransformation,
                       key: jax.Array) -> TrainState:
    """A fresh state: parameters initialised from `key`, EMA equal to them, step 0.

    Pure, so `jax.eval_shape(create_train_state, ...)` gives the state's shapes
    without computing anything (what checkpoint restoring needs).
    """
    init_key, rng = jax.random.split(key)
    size, channels = config.data.image_size, config.data.channels
    labels = jnp.zeros((1,), jnp.int32) if model.num_classes else None
    params = model.init(init_key, jnp.zeros((1, size, size, channels), jnp.float32),
                        jnp.zeros((1,), jnp.int32), labels)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=jax.tree.map(jnp.copy, params),
                      opt_state=optimizer.init(params), rng=jax.random.key_data(rng),
                      skipped_steps=jnp.zeros((), jnp.int32))
