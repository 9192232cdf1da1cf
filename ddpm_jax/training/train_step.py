"""The compiled training step: one `jax.jit` program over the 'data' mesh, the global
batch split over devices, the state replicated and donated.

Its randomness is a function of (state.rng, step, example index) only, so a
step computes the same numbers on 1 or 8 devices, in 1 or 2 processes, and
after a resume. A non-finite loss or gradient leaves the parameters, EMA and
optimizer state as they were and counts the step in `state.skipped_steps`.
"""
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from ddpm_jax import diffusion
from ddpm_jax.models import embeddings
from ddpm_jax.runtime import parallel
from ddpm_jax.schedules import DiffusionSchedule
from ddpm_jax.training.train_state import TrainState, ema_decay_at, learning_rate_schedule


def train_step(state: TrainState, x_start: jax.Array, labels: Optional[jax.Array] = None, *,
               model, schedule: DiffusionSchedule, optimizer: optax.GradientTransformation,
               config, batch_sharding=None) -> Tuple[TrainState, Dict[str, jax.Array]]:
    """One step of Algorithm 1 with Adam and EMA; skips the update if anything is non-finite.

    Example i of the global batch draws its timestep and noise from
    fold_in(fold_in(key, step), i) so that neither depends on the device count.
    A conditional model's `labels` [B] are replaced by "no class" with
    probability config.training.label_dropout, drawn from the same key.
    """
    example_keys, t, noise, dropout_key = step_draws(state.rng, state.step, x_start,
                                                     schedule.num_timesteps)
    if labels is not None:
        labels = drop_labels(labels, example_keys, config.training.label_dropout,
                             model.num_classes)
    if batch_sharding is not None:
        t = jax.lax.with_sharding_constraint(t, batch_sharding)
        noise = jax.lax.with_sharding_constraint(noise, batch_sharding)

    def loss_of(params):
        def denoise(x, timesteps):
            return model.apply({"params": params}, x, timesteps, labels, train=True,
                               rngs={"dropout": dropout_key})
        d = config.diffusion
        return diffusion.p_losses(schedule, denoise, x_start, t, noise, d.loss_type,
                                  d.objective, d.loss_weighting, d.min_snr_gamma)

    loss, grads = jax.value_and_grad(loss_of)(state.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    clip = config.optim.grad_clip_norm
    if clip > 0:
        scale = jnp.where(grad_norm > clip, clip / grad_norm, 1.0)
        grads = jax.tree.map(lambda g: g * scale, grads)

    applied = state.step - state.skipped_steps  # Adam's update count, as its schedule sees it
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(config, applied)
    ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)

    def if_finite(new, old):
        return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

    new_state = state.replace(
        step=state.step + 1,
        params=if_finite(params, state.params),
        ema_params=if_finite(ema_params, state.ema_params),
        opt_state=if_finite(opt_state, state.opt_state),
        skipped_steps=state.skipped_steps + jnp.where(finite, 0, 1).astype(jnp.int32))
    metrics = dict(loss=loss, grad_norm=grad_norm,
                   learning_rate=learning_rate_schedule(config)(applied),
                   finite=finite, skipped_steps=new_state.skipped_steps)
    return new_state, metrics


def step_draws(rng: jax.Array, step: jax.Array, x_start: jax.Array, num_timesteps: int):
    """The step's randomness: (per-example keys, timesteps [B], noise like x_start, dropout key).

    A function of (rng, step, example index) only; experiments/quality/run.py feeds the same
    draws to the PyTorch design so that both frameworks train on identical numbers.
    """
    step_key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
    data_key, dropout_key = jax.random.split(step_key)
    example_keys = jax.vmap(lambda i: jax.random.fold_in(data_key, i))(
        jnp.arange(x_start.shape[0]))
    t = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 0), (), 0,
                                              num_timesteps))(example_keys)
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), x_start.shape[1:],
                                                 x_start.dtype))(example_keys)
    return example_keys, t, noise, dropout_key


def drop_labels(labels: jax.Array, example_keys: jax.Array, rate: float, num_classes: int
                ) -> jax.Array:
    """Each label replaced by "no class" with probability `rate`, drawn from
    fold_in(example key, 2) (0 and 1 draw the timestep and the noise)."""
    drop = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, 2), rate))(example_keys)
    return jnp.where(drop, embeddings.null_label(num_classes), labels)


def make_train_step(config, model, schedule: DiffusionSchedule,
                    optimizer: optax.GradientTransformation, mesh, steps_per_call: int = 1):
    """`train_step` jitted over `mesh`: batch split over 'data', state replicated and donated.

    Called as step(state, images), or step(state, images, labels) for a conditional model.
    steps_per_call k > 1: k steps in one program (`lax.scan` of the same step,
    one dispatch instead of k: the launch-bound GPU step's lever) over batches
    stacked as [k, B, ...], split over 'data' on axis 1; the metrics come back
    stacked [k]. k = 4 and k = 8 ran bitwise alike on XLA:CPU; k = 1 agrees to
    float32 rounding only, as XLA compiles a loop body differently (docs/speed.md).
    """
    replicated, batch_sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)

    def step(state, *batch):
        return train_step(state, *batch, model=model, schedule=schedule, optimizer=optimizer,
                          config=config, batch_sharding=batch_sharded)

    num_inputs = 2 if model.num_classes else 1  # images, and labels for a conditional model
    if steps_per_call == 1:
        return jax.jit(step, in_shardings=(replicated,) + (batch_sharded,) * num_inputs,
                       out_shardings=(replicated, replicated), donate_argnums=0)

    def steps(state, *batches):
        return jax.lax.scan(lambda s, batch: step(s, *batch), state, batches,
                            length=steps_per_call)

    stacked = parallel.stacked_batch_sharded(mesh)
    return jax.jit(steps, in_shardings=(replicated,) + (stacked,) * num_inputs,
                   out_shardings=(replicated, replicated), donate_argnums=0)
