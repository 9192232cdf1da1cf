"""Generate images from a trained network: DDPM, DDIM or DPM-Solver++, one compiled scan,
sharded over devices.

Every image draws its randomness from its own key, `fold_in(key(seed), i)` for
image i: its x_T and the noise of each step do not depend on how many images
are requested, on the chunk size, on padding or on the device count. Image i
is what the foundation's `p_sample_loop` (or `ddim_sample_loop`) returns for
shape (1, H, W, C) and that key; the per-step updates are the foundation's
`p_sample` and `ddim_step` (and `dpm_solver.step`), vmapped over the images.
Results are bit for bit equal whenever each device computes the same number of
images per call; with another per-device batch, XLA's kernels may round
differently (about 1e-6).

A request is split into chunks of equal size (one compilation serves every
chunk); each chunk's batch is split over a 1-D device mesh with axis 'data'
and the parameters are replicated. Equal chunks that are multiples of the
device count may overshoot the request: `plan_chunks` picks the fewest chunks
that fit the chunk limit and then the smallest such chunk, so fewer than
(device count) images per chunk are computed and dropped. The alternative, a
second program for the remainder, would cost a compilation (seconds to
minutes) to save less than one image per device per chunk.
"""
import dataclasses
import math
import time
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from ddpm_jax import diffusion, dpm_solver
from ddpm_jax.models import embeddings
from ddpm_jax.runtime import parallel
from ddpm_jax.schedules import DiffusionSchedule

SAMPLERS = ("ddpm", "ddim", "dpmpp")
# The default chunk holds this many pixels per device (64 images of 32x32):
# small enough for the activations of one network call on any accelerator,
# large enough to keep it busy.
PIXELS_PER_DEVICE = 64 * 32 * 32

# (params, x, t) -> noise; a class-conditional one also (params, x, t, labels) -> noise.
ApplyFn = Callable[..., jnp.ndarray]


@dataclasses.dataclass(frozen=True)
class ModelApply:
    """`(params, x, t) -> predicted noise` of a Flax network in inference mode.

    Hashable by the module's fields, so that `generate` calls with equal
    networks reuse one compilation. A class-conditional network also takes
    int labels [B] (`num_classes` of them, and `num_classes` for "no class");
    without labels it predicts for "no class" (e.g. for bits/dim).
    """
    model: nn.Module

    @property
    def num_classes(self) -> int:
        return getattr(self.model, "num_classes", 0)

    def __call__(self, params, x, t, labels=None):
        if labels is None and self.num_classes:
            labels = jnp.full(x.shape[:1], embeddings.null_label(self.num_classes), jnp.int32)
        return self.model.apply({"params": params}, x, t, labels, train=False)


def check_sampler(num_timesteps: int, sampler: str, steps: int, ddim_eta: float,
                  solver_order: int = 2, step_spacing: str = "time",
                  dynamic_threshold: float = 0.0) -> None:
    """Raise ValueError naming the bad argument of a sampler configuration (the one check
    of these settings: config validation and sample.py call it too)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
    if sampler != "ddpm" and not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}] (the model's diffusion "
                         f"timesteps), got {steps}")
    if not ddim_eta >= 0.0:
        raise ValueError(f"ddim_eta must be >= 0 (0 = deterministic DDIM, 1 = DDPM-like "
                         f"noise), got {ddim_eta}")
    if solver_order not in dpm_solver.ORDERS:
        raise ValueError(f"solver_order must be one of {list(dpm_solver.ORDERS)}, "
                         f"got {solver_order!r}")
    if step_spacing not in dpm_solver.SPACINGS:
        raise ValueError(f"step_spacing must be one of {list(dpm_solver.SPACINGS)}, "
                         f"got {step_spacing!r}")
    if not 0.0 <= dynamic_threshold <= 1.0:
        raise ValueError(f"dynamic_threshold must be in [0, 1] (a quantile of |x0|; 0 = off), "
                         f"got {dynamic_threshold}")
    if dynamic_threshold and sampler != "dpmpp":
        raise ValueError(f"dynamic_threshold applies to sampler 'dpmpp' only, not {sampler!r}; "
                         f"set it to 0")


def settings(config) -> Dict[str, Any]:
    """`generate`'s sampler arguments from a whole config: its `sampling` section and the
    objective the network was trained on (the one place a new sampler field is read)."""
    c = config.sampling
    return dict(sampler=c.sampler, steps=c.steps, ddim_eta=c.ddim_eta,
                clip_denoised=c.clip_denoised, solver_order=c.solver_order,
                step_spacing=c.step_spacing, dynamic_threshold=c.dynamic_threshold,
                objective=config.diffusion.objective)


def check_settings(num_timesteps: int, sampler_settings: Dict[str, Any]) -> None:
    """`check_sampler` of `settings`' arguments (the objective is checked with the config)."""
    s = sampler_settings
    check_sampler(num_timesteps, s["sampler"], s["steps"], s["ddim_eta"], s["solver_order"],
                  s["step_spacing"], s["dynamic_threshold"])


def sampler_timesteps(schedule: DiffusionSchedule, sampler: str, steps: int,
                      step_spacing: str = "time") -> np.ndarray:
    """The descending timesteps at which the sampler calls the network (one call each);
    the schedule must be concrete (not traced) for DPM-Solver++'s log-SNR spacing."""
    if sampler == "ddim":
        return diffusion.ddim_timesteps(schedule.num_timesteps, steps)
    if sampler == "dpmpp":
        return dpm_solver.timesteps(np.asarray(schedule.sqrt_alphas_cumprod),
                                    np.asarray(schedule.sqrt_one_minus_alphas_cumprod), steps,
                                    step_spacing)
    return np.arange(schedule.num_timesteps - 1, -1, -1, dtype=np.int32)


def trajectory_steps(num_steps: int, max_frames: Optional[int] = None) -> Tuple[int, ...]:
    """The steps a trajectory keeps: all, or `max_frames` evenly spaced ones that always
    include the last (the finished images) and, from two frames on, the first."""
    if max_frames is None or max_frames >= num_steps:
        return tuple(range(num_steps))
    if max_frames < 1:
        raise ValueError(f"trajectory_frames must be >= 1, got {max_frames}")
    if max_frames == 1:
        return (num_steps - 1,)
    return tuple(int(s) for s in np.unique(np.round(np.linspace(0, num_steps - 1, max_frames))))


def image_keys(seed, indices) -> jax.Array:
    """The key of each image: `fold_in(key(seed), index)` for int indices [B]."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.int32))


def sample_batch(schedule: DiffusionSchedule, denoise_fn: diffusion.DenoiseFn, keys: jax.Array,
                 image_shape: Tuple[int, int, int], sampler: str = "ddpm", steps: int = 50,
                 ddim_eta=0.0, trajectory_positions: Optional[jnp.ndarray] = None,
                 frame_steps: Optional[Sequence[int]] = None, clip_denoised: bool = False,
                 labels: Optional[jnp.ndarray] = None, *, solver_order: int = 2,
                 step_spacing: str = "time", dynamic_threshold: float = 0.0,
                 objective: str = "eps", timesteps: Optional[Sequence[int]] = None):
    """Images x_0 [B, H, W, C] for per-image keys [B], as one `lax.scan` over the steps.

    With int `labels` [B], `denoise_fn` is conditional, `(x, t, labels) -> noise`
    (e.g. `diffusion.guided_denoise_fn`), and image b is generated with labels[b].

    Image b equals, up to float rounding, `p_sample_loop(schedule, denoise_fn,
    (1, *image_shape), keys[b])` (or `ddim_sample_loop`): the same key splits,
    the same per-step fold_in. With `trajectory_positions` (int [K], positions
    in this batch) also returns those K images after each of the steps
    `frame_steps` (default all; see `trajectory_steps`), [F, K, H, W, C],
    keeping nothing of the other images and steps; else None. clip_denoised: step
    through the predicted x0 clipped to [-1, 1] (`diffusion.p_sample`, `ddim_step`).
    Every sampler reads the network's output as `objective` (`diffusion.predict_x0_eps`).

    sampler 'dpmpp' is DPM-Solver++ (`dpm_solver`) of `solver_order` over `steps` network
    calls spaced by `step_spacing`, deterministic given x_T; `dynamic_threshold` > 0 replaces
    its x0 clipping by Imagen's thresholding at that quantile. timesteps: the network calls' timesteps,
    default `sampler_timesteps` (pass them when the schedule is traced).
    """
    split = jax.vmap(jax.random.split)(keys)
    init_keys, loop_keys = split[:, 0], split[:, 1]
    # One [1, H, W, C] image per key, as the foundation's loops draw it.
    x = jax.vmap(lambda k: jax.random.normal(k, (1, *image_shape), jnp.float32))(init_keys)
    ts = np.asarray(sampler_timesteps(schedule, sampler, steps, step_spacing)
                    if timesteps is None else timesteps, np.int32)
    t_prevs = np.concatenate([ts[1:], [-1]]).astype(np.int32)
    history = ()  # what a step keeps for the next ones (DPM-Solver++: the last two x0)

    if sampler == "ddpm":
        def update(denoise, x_one, history, i, t, t_prev, key):
            del i, t_prev
            return diffusion.p_sample(schedule, denoise, x_one, jnp.full((1,), t, jnp.int32),
                                      key, clip_denoised, objective), history
    elif sampler == "ddim":
        def update(denoise, x_one, history, i, t, t_prev, key):
            del i
            return diffusion.ddim_step(schedule, denoise, x_one, t, t_prev, ddim_eta, key,
                                       clip_denoised, objective), history
    else:
        alpha, sigma, lam = dpm_solver.grid_constants(schedule, ts)
        step_orders = jnp.asarray(dpm_solver.orders(len(ts), solver_order))
        history = (jnp.zeros_like(x), jnp.zeros_like(x))

        def update(denoise, x_one, history, i, t, t_prev, key):
            del t_prev, key
            t_batch = jnp.full((1,), t, jnp.int32)
            x0, _ = diffusion.predict_x0_eps(schedule, objective, x_one, t_batch,
                                             denoise(x_one, t_batch))
            if dynamic_threshold:
                x0 = dpm_solver.dynamic_threshold(x0, dynamic_threshold)
            elif clip_denoised:
                x0 = jnp.clip(x0, -1.0, 1.0)
            lambdas = (lam[i + 1], lam[i], lam[jnp.maximum(i - 1, 0)], lam[jnp.maximum(i - 2, 0)])
            x_one = dpm_solver.step(x_one, (x0, *history), lambdas, alpha[i + 1], sigma[i + 1],
                                    sigma[i], step_orders[i])
            return x_one, (x0, history[0])

    frame_steps = range(len(ts)) if frame_steps is None else frame_steps
    frame_of_step = np.full(len(ts), -1, np.int32)  # -1: the step is not kept
    frame_of_step[list(frame_steps)] = np.arange(len(frame_steps))
    frames = (None if trajectory_positions is None else
              jnp.zeros((len(frame_steps), len(trajectory_positions), *image_shape), jnp.float32))

    def step(carry, inputs):
        x, history, frames = carry
        i, t, t_prev, frame = inputs
        x, history = jax.vmap(
            lambda x_one, h, k, y: update(_with_label(denoise_fn, y), x_one, h, i, t, t_prev,
                                          jax.random.fold_in(k, t)))(x, history, loop_keys, labels)
        if frames is not None:
            slot = jnp.maximum(frame, 0)
            frames = frames.at[slot].set(
                jnp.where(frame >= 0, x[trajectory_positions, 0], frames[slot]))
        return (x, history, frames), None

    (x, _, frames), _ = jax.lax.scan(
        step, (x, history, frames),
        (jnp.arange(len(ts)), jnp.asarray(ts), jnp.asarray(t_prevs), jnp.asarray(frame_of_step)))
    return x[:, 0], frames


def _with_label(denoise_fn, label):
    """One image's `DenoiseFn`: the conditional `denoise_fn` with its label (unless None)."""
    if label is None:
        return denoise_fn
    return lambda x, t: denoise_fn(x, t, label[None])


def _sample_chunk(params, schedule, seed, indices, trajectory_positions, ddim_eta, labels,
                  guidance, *, apply_fn, image_shape, sampler, timesteps, frame_steps, mesh,
                  clip_denoised=False, solver_order=2, dynamic_threshold=0.0, objective="eps"):
    """One chunk: the images of global `indices` (sharded over 'data'), x_0 and trajectory;
    with `labels` guided by `guidance` (`diffusion.guided_denoise_fn`)."""
    if labels is None:
        denoise_fn = lambda x, t: apply_fn(params, x, t)  # noqa: E731
    else:
        denoise_fn = diffusion.guided_denoise_fn(
            lambda x, t, y: apply_fn(params, x, t, y), apply_fn.num_classes, guidance)
    images, trajectory = sample_batch(
        schedule, denoise_fn, image_keys(seed, indices), image_shape, sampler,
        ddim_eta=ddim_eta, trajectory_positions=trajectory_positions, frame_steps=frame_steps,
        clip_denoised=clip_denoised, labels=labels, solver_order=solver_order,
        dynamic_threshold=dynamic_threshold, objective=objective, timesteps=timesteps)
    images = jax.lax.with_sharding_constraint(images, parallel.batch_sharded(mesh))
    if trajectory is not None:
        trajectory = jax.lax.with_sharding_constraint(trajectory, parallel.replicated(mesh))
    return images, trajectory


_sample_chunk_jit = jax.jit(_sample_chunk, static_argnames=(
    "apply_fn", "image_shape", "sampler", "timesteps", "frame_steps", "mesh",
    "clip_denoised", "solver_order", "dynamic_threshold", "objective"))


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    """`num_chunks` compiled calls of `chunk_size` images (a multiple of the device count)."""
    chunk_size: int
    num_chunks: int

    @property
    def num_padded(self) -> int:
        return self.chunk_size * self.num_chunks


def default_chunk_size(image_shape: Sequence[int], num_devices: int) -> int:
    """PIXELS_PER_DEVICE worth of images per device (at least one), times the devices."""
    height, width = image_shape[:2]
    return max(1, PIXELS_PER_DEVICE // (height * width)) * num_devices


def plan_chunks(num_images: int, num_devices: int, max_chunk_size: int) -> ChunkPlan:
    """The fewest equal chunks of at most `max_chunk_size` images, each as small as possible.

    A chunk is a multiple of `num_devices` (a limit below the device count is
    raised to it), so at most num_devices - 1 images per chunk are computed
    and dropped: 13 images on 8 devices run as one chunk of 16; 100 images
    with a limit of 64 as two chunks of 56, not two of 64.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if max_chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {max_chunk_size}")
    limit = max(num_devices, max_chunk_size // num_devices * num_devices)
    num_chunks = math.ceil(num_images / limit)
    chunk_size = math.ceil(math.ceil(num_images / num_chunks) / num_devices) * num_devices
    return ChunkPlan(chunk_size, num_chunks)


class Progress(NamedTuple):
    """Where a generation stands after a chunk has reached the host."""
    chunks_done: int
    num_chunks: int
    images_done: int
    num_images: int
    elapsed_s: float  # since sampling started, compilation excluded

    @property
    def images_per_s(self) -> float:
        return self.images_done / self.elapsed_s if self.elapsed_s > 0 else float("nan")


@dataclasses.dataclass(frozen=True)
class SampleResult:
    images: np.ndarray                 # [N, H, W, C] float32, unclipped (about [-1, 1])
    trajectory: Optional[np.ndarray]   # [F, K, H, W, C] for the trajectory indices, or None
    trajectory_steps: Tuple[int, ...]  # the steps (0 = the first) the F frames show
    plan: ChunkPlan
    compile_s: float
    sample_s: float                    # wall time of all chunks, compilation excluded


def _to_host(x: jax.Array) -> np.ndarray:
    """The whole array on this process (gathered from the others when it spans processes)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def class_labels(spec: str, num_classes: int, num_images: int) -> Tuple[np.ndarray, int]:
    """(labels, images per grid row) for a `--class_label` request: 'K' (all images of class
    K), 'K1,K2,...' or 'all' (num_images // classes of each listed class, at least one, one
    class per row). ValueError names what a model of `num_classes` classes accepts."""
    if not num_classes:
        raise ValueError("the model is unconditional (config.model.num_classes=0): it takes no "
                         "class label")
    valid = f"a class in 0..{num_classes - 1}, a comma-separated list of them, or 'all'"
    if spec.strip() == "all":
        classes = list(range(num_classes))
    else:
        try:
            classes = [int(part) for part in spec.split(",")]
        except ValueError:
            raise ValueError(f"{spec!r} is not {valid}") from None
    if not classes or any(not 0 <= k < num_classes for k in classes):
        raise ValueError(f"{spec!r} is not {valid}")
    if len(classes) == 1:
        return np.full(num_images, classes[0], np.int32), math.ceil(math.sqrt(num_images))
    per_class = max(1, num_images // len(classes))
    return np.repeat(np.asarray(classes, np.int32), per_class), per_class


def _check_labels(labels, num_images: int, num_classes: int) -> Optional[np.ndarray]:
    """`labels` as int32 [num_images], or None; ValueError for a request the network cannot
    serve."""
    if labels is None:
        return None
    labels = np.asarray(labels)
    if not num_classes:
        raise ValueError("labels were given, but the network is unconditional (num_classes=0)")
    if labels.shape != (num_images,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be {num_images} ints (one per image), got "
                         f"{labels.dtype} {labels.shape}")
    if labels.min() < 0 or labels.max() > num_classes:
        raise ValueError(f"labels must be in [0, {num_classes - 1}] (or {num_classes}: no "
                         f"class), got {sorted(set(labels.tolist()))[:20]}")
    return labels.astype(np.int32)


def generate(apply_fn: ApplyFn, params, schedule: DiffusionSchedule,
             image_shape: Sequence[int], num_images: int, *, seed: int = 0,
             sampler: str = "ddpm", steps: Optional[int] = None, ddim_eta: float = 0.0,
             clip_denoised: bool = False, solver_order: int = 2, step_spacing: str = "time",
             dynamic_threshold: float = 0.0, objective: str = "eps",
             ddim_steps: Optional[int] = None,
             trajectory_indices: Sequence[int] = (), trajectory_frames: Optional[int] = None,
             chunk_size: Optional[int] = None,
             mesh: Optional[Mesh] = None,
             progress: Optional[Callable[[Progress], None]] = None,
             labels: Optional[Sequence[int]] = None, guidance: float = 0.0) -> SampleResult:
    """`num_images` samples of the network `apply_fn(params, x, t)`, on every device of `mesh`.

    Args:
      apply_fn: hashable `(params, x, t) -> predicted noise`, e.g. `ModelApply(model)`;
        equal apply_fns (and shapes and sampler settings) reuse one compilation.
      image_shape: (H, W, C) of the images the network was trained on.
      seed: the images are a function of (seed, image index) only.
      sampler: 'ddpm' (ancestral, all T steps), 'ddim' (`steps` network calls, `ddim_eta`)
        or 'dpmpp' (DPM-Solver++ of `solver_order` over `steps` network calls spaced by
        `step_spacing`, 'time' or 'logsnr'; see `dpm_solver`).
      steps: network calls of ddim and dpmpp (default 50); `ddim_steps` is its older name.
      clip_denoised: step through the predicted x0 clipped to [-1, 1] (the DDPM paper's
        sampler); False: the design's Equation 11.
      dynamic_threshold: dpmpp: Imagen's dynamic thresholding of x0 at this quantile of
        |x0| instead of the clipping; 0 = off.
      objective: what the network predicts, 'eps', 'x0' or 'v' (`diffusion.predict_x0_eps`).
      trajectory_indices: images whose steps to keep, e.g. for a GIF.
      trajectory_frames: keep at most this many steps (`trajectory_steps`); None: all.
      chunk_size: most images per compiled call; None: `default_chunk_size`.
      mesh: a 1-D mesh with axis 'data'; None: all devices.
      progress: called on the host after each chunk.
      labels: a class-conditional apply_fn's class of each image ([num_images], in
        0..apply_fn.num_classes, the last meaning "no class"); image i's noise is the
        same whatever the labels and `guidance`, the classifier-free guidance scale w.
    """
    image_shape = tuple(int(s) for s in image_shape)
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (H, W, C), got {image_shape}")
    if steps is not None and ddim_steps is not None and steps != ddim_steps:
        raise ValueError(f"steps={steps} and its older name ddim_steps={ddim_steps} disagree; "
                         f"give steps only")
    steps = next((s for s in (steps, ddim_steps) if s is not None), 50)
    check_sampler(schedule.num_timesteps, sampler, steps, ddim_eta, solver_order, step_spacing,
                  dynamic_threshold)
    if objective not in diffusion.OBJECTIVES:
        raise ValueError(f"objective must be one of {list(diffusion.OBJECTIVES)}, got "
                         f"{objective!r}")
    if not -2**31 <= seed < 2**31:
        raise ValueError(f"seed must fit in int32, got {seed}")
    trajectory_indices = [int(i) for i in trajectory_indices]
    if any(not 0 <= i < num_images for i in trajectory_indices):
        raise ValueError(f"trajectory_indices must be in [0, num_images={num_images}), "
                         f"got {trajectory_indices}")
    labels = _check_labels(labels, num_images, getattr(apply_fn, "num_classes", 0))
    # Static (part of the compiled program), as the frames, kept only with a trajectory.
    timesteps = tuple(int(t) for t in sampler_timesteps(schedule, sampler, steps, step_spacing))
    frame_steps = (trajectory_steps(len(timesteps), trajectory_frames) if trajectory_indices
                   else ())
    mesh = parallel.make_mesh() if mesh is None else mesh
    num_devices = mesh.devices.size
    plan = plan_chunks(num_images, num_devices, default_chunk_size(image_shape, num_devices)
                       if chunk_size is None else chunk_size)

    put = lambda tree: jax.device_put(tree, parallel.replicated(mesh))  # noqa: E731
    params, schedule = put(params), put(schedule)
    seed_array, eta = put(np.int32(seed)), put(np.float32(ddim_eta))
    guidance_array = None if labels is None else put(np.float32(guidance))
    wanted = np.asarray(trajectory_indices, np.int64)

    def chunk_inputs(chunk: int):
        start = chunk * plan.chunk_size
        indices = jax.device_put(np.arange(start, start + plan.chunk_size, dtype=np.int32),
                                 parallel.batch_sharded(mesh))
        # Every chunk returns len(wanted) frames; those of images in other chunks are dropped.
        positions = (put(np.clip(wanted - start, 0, plan.chunk_size - 1).astype(np.int32))
                     if len(wanted) else None)
        chunk_labels = None
        if labels is not None:  # the padding past num_images gets class 0 and is dropped
            chunk_labels = np.zeros(plan.chunk_size, np.int32)
            mine = labels[start:start + plan.chunk_size]
            chunk_labels[:len(mine)] = mine
            chunk_labels = jax.device_put(chunk_labels, parallel.batch_sharded(mesh))
        return indices, positions, eta, chunk_labels, guidance_array

    dpmpp = sampler == "dpmpp"  # the solver's settings: one compilation for the others
    static = dict(apply_fn=apply_fn, image_shape=image_shape, sampler=sampler,
                  timesteps=timesteps, frame_steps=frame_steps, mesh=mesh,
                  clip_denoised=bool(clip_denoised), solver_order=solver_order if dpmpp else 2,
                  dynamic_threshold=float(dynamic_threshold), objective=objective)
    start_compile = time.perf_counter()
    compiled = _sample_chunk_jit.lower(params, schedule, seed_array, *chunk_inputs(0),
                                       **static).compile()
    compile_s = time.perf_counter() - start_compile

    images = np.empty((plan.num_padded, *image_shape), np.float32)
    trajectory = (np.empty((len(frame_steps), len(wanted), *image_shape), np.float32)
                  if len(wanted) else None)
    start = time.perf_counter()

    def collect(chunk: int, outputs) -> None:
        chunk_images, chunk_trajectory = outputs
        begin = chunk * plan.chunk_size
        images[begin:begin + plan.chunk_size] = _to_host(chunk_images)
        if trajectory is not None:
            mine = (wanted >= begin) & (wanted < begin + plan.chunk_size)
            if mine.any():
                trajectory[:, mine] = _to_host(chunk_trajectory)[:, mine]
        if progress is not None:
            progress(Progress(chunk + 1, plan.num_chunks,
                              min(num_images, begin + plan.chunk_size), num_images,
                              time.perf_counter() - start))

    # Dispatch chunk c + 1 before copying chunk c to the host, so devices never wait.
    pending = None
    for chunk in range(plan.num_chunks):
        outputs = compiled(params, schedule, seed_array, *chunk_inputs(chunk))
        if pending is not None:
            collect(*pending)
        pending = (chunk, outputs)
    collect(*pending)
    return SampleResult(images[:num_images], trajectory, frame_steps, plan, compile_s,
                        time.perf_counter() - start)
