"""Generate images from a trained model: `python sample.py --workdir=DIR`.

    python sample.py --workdir=runs/fashion --num_images=64 --output=samples.png
    python sample.py --workdir=runs/fashion --sampler=ddim --steps=50 \\
        --gif=denoising.gif --gif_images=16 --save_npz=samples.npz
    python sample.py --workdir=runs/fashion --sampler=dpmpp --steps=20
    python sample.py --torch_checkpoint=model.pt --config=configs/fashion.py
    python sample.py --workdir=runs/fashion_cond --class_label=all --guidance=2

Every path may be relative, `~/...`, absolute or gs://; the messages show it
resolved. --workdir samples the newest readable checkpoint of a training run (its EMA
parameters unless --use_ema=false), with the config stored in it.
--torch_checkpoint takes a `torch.save(model.state_dict())` of the PyTorch
design's Unet, with --config describing that network. The sampler defaults
come from the config's `sampling` section; the flags override them. Images
are a function of (--seed, image index): the same on any number of devices
and with any --chunk_size. Every process of a multi-host run runs the same
command; process 0 writes the files.

A class-conditional model (config.model.num_classes > 0) takes --class_label
(a class, a list, or 'all': one class per grid row; default 'all') and
--guidance w (classifier-free guidance; default config.sampling.guidance);
image i's noise does not depend on w, so grids of different w compare.
"""

from ddpm_jax.runtime import cpu_defaults

cpu_defaults.apply_cpu_defaults(restart=__name__ == "__main__")  # before JAX starts

import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from ddpm_jax.runtime import console, storage  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's --workdir: sample its newest "
                               "checkpoint.")
_USE_EMA = flags.DEFINE_bool("use_ema", True, "Sample the EMA parameters (else the raw ones).")
_TORCH_CHECKPOINT = flags.DEFINE_string(
    "torch_checkpoint", None, "A PyTorch state_dict (.pt) of the design's Unet; needs --config.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "With --torch_checkpoint: the config (configs/*.py) of its network.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 64, "How many images to generate.")
_SAMPLER = flags.DEFINE_enum("sampler", None, ["ddpm", "ddim", "dpmpp"],
                             "ddpm (ancestral, all T steps), ddim or dpmpp (DPM-Solver++); "
                             "default: config.sampling.")
_STEPS = flags.DEFINE_integer("steps", None, "Network calls of ddim and dpmpp; default: "
                              "config.sampling.")
_DDIM_STEPS = flags.DEFINE_integer("ddim_steps", None, "The older name of --steps.")
_SOLVER_ORDER = flags.DEFINE_integer("solver_order", None, "dpmpp: 1 (= DDIM), 2 or 3; "
                                     "default: config.sampling.")
_STEP_SPACING = flags.DEFINE_enum("step_spacing", None, ["time", "logsnr"], "dpmpp: steps "
                                  "uniform in time or in log-SNR; default: config.sampling.")
_DYNAMIC_THRESHOLD = flags.DEFINE_float(
    "dynamic_threshold", None, "dpmpp: Imagen's dynamic thresholding of x0 at this quantile "
    "of |x0| (e.g. 0.995) instead of clipping; 0 = off. Default: config.sampling.")
_DDIM_ETA = flags.DEFINE_float("ddim_eta", None, "DDIM eta (0 = deterministic); default: "
                               "config.sampling.")
_CLIP_DENOISED = flags.DEFINE_bool(
    "clip_denoised", None, "Step through the predicted x0 clipped to [-1, 1] (the DDPM "
    "paper's sampler); false: the design's Equation 11. Default: config.sampling.")
_SEED = flags.DEFINE_integer("seed", 0, "Images are a function of the seed and their index.")
_OUTPUT = flags.DEFINE_string("output", "samples.png", "The image grid (PNG).")
_NROW = flags.DEFINE_integer("nrow", None, "Images per grid row; default ceil(sqrt(num_images)).")
_SAVE_NPZ = flags.DEFINE_string("save_npz", None, "Also save the raw float32 samples [N, H, W, C] "
                                "(about [-1, 1]) to this .npz file.")
_GIF = flags.DEFINE_string("gif", None, "Also write the denoising animation to this GIF file.")
_GIF_IMAGES = flags.DEFINE_integer("gif_images", 16, "How many of the images (the first ones) "
                                   "the GIF shows.")
_GIF_FRAMES = flags.DEFINE_integer("gif_frames", None, "At most this many GIF frames, evenly "
                                   "spaced over the steps; default: one per step.")
_CHUNK_SIZE = flags.DEFINE_integer("chunk_size", None, "Most images per compiled call (over all "
                                   "devices); default: sampling.default_chunk_size.")
_CLASS_LABEL = flags.DEFINE_string(
    "class_label", None, "Conditional models: a class K, a list 'K1,K2,...' or 'all' (an "
    "equal number of each, one class per grid row); default 'all'.")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Conditional models: the classifier-free "
                               "guidance scale w (0 = plain conditional); default: "
                               "config.sampling.guidance.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Must equal the model's trained image size "
                                   "if given (a check; the network serves only that size).")


def _fail(message: str) -> None:
    sys.exit(f"sample.py: error: {message}")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _load_workdir():
    """(config, params, step, source description) of --workdir's newest checkpoint."""
    from ddpm_jax.training import checkpointing
    try:
        config, params, step = checkpointing.load_inference_params(_WORKDIR.value, _USE_EMA.value)
    except checkpointing.CheckpointError as e:
        _fail(str(e))
    kind = "EMA" if _USE_EMA.value else "raw"
    return config, params, f"{_WORKDIR.value} step {step} ({kind} parameters)"


def _load_torch():
    """(config, params, source description) of --torch_checkpoint with --config."""
    import pickle

    from ddpm_jax import config_validation
    from ddpm_jax.models import torch_weights, unet
    path, config = _TORCH_CHECKPOINT.value, _CONFIG.value
    if config is None:
        _fail("--torch_checkpoint needs --config=configs/<name>.py describing its network")
    try:
        config_validation.validate_config(config)
    except config_validation.ConfigError as e:
        _fail(f"--config: {e}")
    from etils import epath
    if not epath.Path(path).is_file():
        _fail(f"--torch_checkpoint={path}: no such file")
    try:
        params = torch_weights.load_torch_checkpoint(path, unet.create_model(config))
    except ValueError as e:  # the file holds another network, or no state_dict
        _fail(f"--torch_checkpoint={path}: {e}")
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as e:
        _fail(f"--torch_checkpoint={path} cannot be read as a PyTorch state_dict "
              f"({_first_line(e)})")
    return config, params, path


def _check_request(config) -> None:
    """Exit with the flag's name if the request cannot be served by this model."""
    from ddpm_jax import sampling
    if _IMAGE_SIZE.value is not None and _IMAGE_SIZE.value != config.data.image_size:
        _fail(f"--image_size={_IMAGE_SIZE.value}, but the model was trained on "
              f"{config.data.image_size}x{config.data.image_size} images "
              f"(config.data.image_size) and generates only that size; omit --image_size")
    for name, value, minimum in (("num_images", _NUM_IMAGES.value, 1),
                                 ("gif_images", _GIF_IMAGES.value, 1),
                                 ("gif_frames", _GIF_FRAMES.value, 1),
                                 ("chunk_size", _CHUNK_SIZE.value, 1),
                                 ("nrow", _NROW.value, 1)):
        if value is not None and value < minimum:
            _fail(f"--{name} must be >= {minimum}, got {value}")
    conditional_flags = _CLASS_LABEL.value or _GUIDANCE.value is not None
    if not config.model.num_classes and conditional_flags:
        _fail("--class_label and --guidance need a class-conditional model; this one is "
              "unconditional (config.model.num_classes=0)")
    try:
        sampling.check_settings(config.diffusion.timesteps, _sampler_settings(config))
    except ValueError as e:
        _fail(f"--{e}")


def _sampler_settings(config):
    """`sampling.settings` of the config with the sampler flags that were given."""
    from ddpm_jax import sampling
    if _DDIM_STEPS.value is not None and _STEPS.value not in (None, _DDIM_STEPS.value):
        _fail("--steps and its older name --ddim_steps disagree; give --steps")
    result = sampling.settings(config)
    overrides = {"sampler": _SAMPLER, "steps": _DDIM_STEPS if _STEPS.value is None else _STEPS,
                 "ddim_eta": _DDIM_ETA, "clip_denoised": _CLIP_DENOISED,
                 "solver_order": _SOLVER_ORDER, "step_spacing": _STEP_SPACING,
                 "dynamic_threshold": _DYNAMIC_THRESHOLD}
    result.update({name: flag.value for name, flag in overrides.items() if flag.value is not None})
    return result


def _output_paths():
    """(flag name, path) of every file to write."""
    named = (("output", _OUTPUT.value), ("save_npz", _SAVE_NPZ.value), ("gif", _GIF.value))
    return [(name, path) for name, path in named if path]


def _prepare_outputs() -> None:
    """Create the output directories now, so that a bad path fails before sampling."""
    from etils import epath
    for name, path in _output_paths():
        try:
            epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            _fail(f"--{name}={path}: cannot create its directory ({_first_line(e)})")
        if epath.Path(path).is_dir():
            _fail(f"--{name}={path} is a directory; give a file name")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    console.quiet_libraries()
    if (_WORKDIR.value is None) == (_TORCH_CHECKPOINT.value is None):
        _fail("give exactly one of --workdir (a training run) and --torch_checkpoint "
              "(a PyTorch state_dict, with --config)")
    if _WORKDIR.value is not None and _CONFIG.value is not None:
        _fail("--config goes with --torch_checkpoint only: a --workdir's checkpoints carry "
              "their own config")
    storage.absolute_flags("workdir", "torch_checkpoint", "output", "save_npz", "gif")
    start = time.perf_counter()
    from ddpm_jax.runtime import parallel
    parallel.maybe_initialize_distributed()
    import jax
    import numpy as np

    from ddpm_jax import config_validation, sampling, schedules
    from ddpm_jax.models import unet
    from ddpm_jax.runtime import images

    config, params, source = _load_workdir() if _WORKDIR.value else _load_torch()
    config_validation.resolve_paths(config)  # e.g. a stored '~/...' compilation cache
    _check_request(config)
    parallel.configure_compilation_cache(config)
    settings = _sampler_settings(config)
    num_images, nrow, conditional = _NUM_IMAGES.value, _NROW.value, {}
    num_classes = config.model.num_classes
    if num_classes:
        try:
            labels, per_row = sampling.class_labels(_CLASS_LABEL.value or "all", num_classes,
                                                    num_images)
        except ValueError as e:
            _fail(f"--class_label: {e}")
        guidance = (config.sampling.guidance if _GUIDANCE.value is None
                    else _GUIDANCE.value)
        conditional = dict(labels=labels, guidance=guidance)
        num_images, nrow = len(labels), nrow or per_row
    gif_images = min(_GIF_IMAGES.value, num_images) if _GIF.value else 0
    image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
    schedule = schedules.schedule_from_config(config.diffusion)
    sampler = settings["sampler"]
    steps = len(sampling.sampler_timesteps(schedule, sampler, settings["steps"],
                                           settings["step_spacing"]))
    is_main = jax.process_index() == 0
    if is_main:
        _prepare_outputs()

    if is_main:
        description = f"{sampler}, {steps} steps" + {
            "ddim": f", eta {settings['ddim_eta']}",
            "dpmpp": f", order {settings['solver_order']}, {settings['step_spacing']} spacing",
        }.get(sampler, "")
        if sampler == "dpmpp" and settings["dynamic_threshold"]:
            description += f", x0 dynamically thresholded at {settings['dynamic_threshold']}"
        elif settings["clip_denoised"]:
            description += ", x0 clipped"
        if conditional:
            description += (f", classes {sorted(set(conditional['labels'].tolist()))}, "
                            f"guidance {conditional['guidance']}")
        print(f"Sampling {num_images} images of {image_shape} ({description}) from {source} "
              f"on {jax.device_count()} {jax.devices()[0].platform} device(s), seed "
              f"{_SEED.value}", flush=True)
    result = sampling.generate(
        sampling.ModelApply(unet.create_model(config)), params, schedule, image_shape,
        num_images, seed=_SEED.value, **settings,
        trajectory_indices=range(gif_images), trajectory_frames=_GIF_FRAMES.value,
        chunk_size=_CHUNK_SIZE.value, progress=console.progress_printer("chunk", is_main),
        **conditional)
    if not is_main:
        return
    written = []
    try:
        nrow = nrow or math.ceil(math.sqrt(num_images))
        height, width = images.save_grid(result.images, _OUTPUT.value, nrow=nrow)
        written.append(f"{_OUTPUT.value} ({width}x{height} px)")
        if _SAVE_NPZ.value:
            storage.write_encoded(_SAVE_NPZ.value, lambda f: np.savez(
                f, images=result.images, seed=_SEED.value, sampler=sampler, steps=steps,
                **conditional))
            written.append(_SAVE_NPZ.value)
        if _GIF.value:
            frames = images.save_gif(result.trajectory, _GIF.value)
            written.append(f"{_GIF.value} ({frames} frames of {gif_images} images)")
    except OSError as e:
        _fail(f"cannot write the output ({_first_line(e)}); wrote {written or 'nothing'}")
    plan = result.plan
    print(f"Sampled {num_images} images in {result.sample_s:.1f} s "
          f"({num_images / result.sample_s:.2f} images/s; {plan.num_chunks} chunk(s) of "
          f"{plan.chunk_size}; compilation {result.compile_s:.1f} s; wall time "
          f"{time.perf_counter() - start:.1f} s)")
    print("Wrote " + ", ".join(written))


if __name__ == "__main__":
    app.run(main)
