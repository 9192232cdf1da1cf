"""Test-set bits/dim: the full DDPM variational bound of each held-out image.

The bound is `likelihood.calc_bpd_loop` (the prior term, the T-1 KL terms and
the discretized decoder), reported as the mean and its standard error. Image i
draws its noise from `fold_in(PRNGKey(eval.seed), i)`, so its bound does not
depend on the batch size, on padding or on the device count, and the same
images get the same noise at every evaluation: differences between steps are
the model's.
"""
import time
from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ddpm_jax import likelihood, sampling
from ddpm_jax.runtime import parallel
from ddpm_jax.schedules import DiffusionSchedule


def per_image_bpd(schedule: DiffusionSchedule, apply_fn: sampling.ApplyFn, params, images,
                  indices, key, objective: str = "eps") -> Dict[str, jnp.ndarray]:
    """The bound of each image [B] with its own key `fold_in(key, index)`, in bits/dim, of a
    network trained on `objective`.

    Returns `total_bpd`, `prior_bpd`, `decoder_bpd` (L_0) and `kl_bpd` (the
    T-1 KL terms summed), each [B]; total = prior + decoder + kl.
    """
    def one(image, index):
        out = likelihood.calc_bpd_loop(schedule, lambda x, t: apply_fn(params, x, t),
                                       image[None], jax.random.fold_in(key, index), objective)
        terms = out["terms_bpd"][0]
        return {"total_bpd": out["total_bpd"][0], "prior_bpd": out["prior_bpd"][0],
                "decoder_bpd": terms[0], "kl_bpd": jnp.sum(terms[1:])}
    return jax.vmap(one)(images, indices)


def _per_image_bpd_sharded(schedule, params, images, indices, key, *, apply_fn, mesh,
                           objective):
    out = per_image_bpd(schedule, apply_fn, params, images, indices, key, objective)
    return jax.lax.with_sharding_constraint(out, parallel.replicated(mesh))


_per_image_bpd_jit = jax.jit(_per_image_bpd_sharded,
                             static_argnames=("apply_fn", "mesh", "objective"))


def bits_per_dim(apply_fn: sampling.ApplyFn, params, schedule: DiffusionSchedule,
                 images: np.ndarray, *, mesh: Mesh, seed: int = 0, batch_size: int = 64,
                 objective: str = "eps",
                 progress: Optional[Callable[[sampling.Progress], None]] = None
                 ) -> Dict[str, np.ndarray]:
    """Per-image bound terms (numpy [N] each, see `per_image_bpd`) of images [N, H, W, C],
    for a network trained on `objective`.

    The images go in fixed batches of min(batch_size, N) rounded up to a
    multiple of the device count (one compilation); the last batch is padded
    and its padding dropped. `progress` is called after each batch (its
    elapsed time includes the first batch's compilation).
    """
    replicated = parallel.replicated(mesh)
    params, schedule = jax.device_put((params, schedule), replicated)
    key = jax.device_put(jax.random.PRNGKey(seed), replicated)
    started = time.perf_counter()

    def report(done_batches, num_batches, done_images):
        if progress is not None:
            progress(sampling.Progress(done_batches, num_batches, done_images, len(images),
                                       time.perf_counter() - started))

    def run(batch, indices):
        return _per_image_bpd_jit(schedule, params, batch, indices, key, apply_fn=apply_fn,
                                  mesh=mesh, objective=objective)

    return parallel.map_batches(run, [images, np.arange(len(images), dtype=np.int32)],
                                batch_size, mesh=mesh, progress=report)


def summarize_bpd(per_image: Dict[str, np.ndarray]) -> Dict[str, float]:
    """Mean of each term, and the standard error of the mean of the total."""
    total = per_image["total_bpd"].astype(np.float64)
    n = len(total)
    stderr = float(np.std(total, ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return {"bpd": float(total.mean()), "bpd_stderr": stderr,
            "bpd_prior": float(np.mean(per_image["prior_bpd"])),
            "bpd_decoder": float(np.mean(per_image["decoder_bpd"])),
            "bpd_kl": float(np.mean(per_image["kl_bpd"])), "bpd_num_images": n}


# --- Sample quality -------------------------------------------------------------------------
