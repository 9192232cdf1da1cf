"""Checks every field of a training config before anything is built or compiled.

A mistyped or out-of-range field would otherwise surface minutes later as a
shape error deep inside XLA, or never (a silently ignored option). Every
problem found is reported at once, each naming the field as
`config.section.field`, its value and what is allowed.
"""
import difflib
import math
from typing import Any, Dict, Iterable, List, Optional, Sequence

from etils import epath

from ddpm_jax.data import datasets
from ddpm_jax.evaluation import suite
from ddpm_jax.models import unet_checks
from ddpm_jax.runtime import storage
from ddpm_jax.diffusion import LOSS_TYPES, LOSS_WEIGHTINGS, OBJECTIVES
from ddpm_jax.sampling import check_sampler
from ddpm_jax.schedules import BETA_SCHEDULES, TERMINAL_SNRS

# Label counts of the TFDS datasets the configs use, checked before anything is opened; other
# datasets' labels are checked when the training split is opened (loop.open_train_source).
TFDS_NUM_CLASSES = {"fashion_mnist": 10, "mnist": 10, "cifar10": 10}
MODEL_DTYPES = ("float32", "bfloat16")
NAN_POLICIES = ("skip", "stop")

# Every field a config must have, by section. The optional `eval` section is
# checked by `suite.validate_config`.
FIELDS = {
        "": ("seed",),
        "data": ("dataset", "folder", "image_size", "channels", "random_flip",
                 "tfds_data_dir", "manual_dir", "image_key", "train_split",
                 "in_memory_max_bytes", "worker_count", "converted_data_dir"),
        "diffusion": ("timesteps", "beta_schedule", "loss_type", "objective", "loss_weighting",
                      "min_snr_gamma", "terminal_snr"),
        "model": ("dim", "init_dim", "dim_mults", "with_time_emb", "resnet_block_groups",
                  "use_convnext", "convnext_mult", "dropout", "dtype", "num_classes"),
        "optim": ("learning_rate", "warmup_steps", "grad_clip_norm", "b1", "b2", "eps",
                  "ema_decay", "ema_warmup", "ema_start"),
        "training": ("batch_size", "num_train_steps", "num_epochs", "log_every",
                     "checkpoint_every", "keep_checkpoints", "sample_every",
                     "num_sample_images", "nan_policy", "compilation_cache_dir",
                     "label_dropout", "steps_per_call"),
        "sampling": ("sampler", "steps", "ddim_eta", "clip_denoised", "guidance", "solver_order",
                     "step_spacing", "dynamic_threshold"),
}


# The fields that hold a path (a file or directory, local or a URL; '' = not set).
PATH_FIELDS = ("data.folder", "data.tfds_data_dir", "data.manual_dir", "data.converted_data_dir",
               "training.compilation_cache_dir", "eval.classifier_dir", "eval.inception_weights",
               "eval.inception_reference_stats")


def resolve_paths(config) -> Dict[str, str]:
    """Make every set path field of `config` absolute (`storage.absolute`), in place; the
    commands do this once to each config they read. {field: new value} of the fields this
    changed (relative or `~/...` ones), for the command to print."""
    changed = {}
    for field in PATH_FIELDS:
        section, name = field.split(".")
        node = config.get(section)
        value = None if node is None else node.get(name)
        if isinstance(value, str) and value:
            node[name] = str(storage.absolute(value))
            if node[name] != value:
                changed[field] = node[name]
    return changed


class ConfigError(ValueError):
    """A config field has a wrong type, range or choice; the message lists every such field."""


class _Checker:
    """Collects the problems of one config so that all are reported together."""

    def __init__(self, config):
        self.config = config
        self.errors: List[str] = []

    def get(self, path: str) -> Any:
        node = self.config
        for part in path.split("."):
            node = node[part]
        return node

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"config.{path} = {self._show(path)}: {message}")

    def _show(self, path: str) -> str:
        try:
            return repr(self.get(path))
        except KeyError:
            return "<missing>"

    def integer(self, path: str, minimum: Optional[int] = None, maximum: Optional[int] = None,
                optional: bool = False) -> bool:
        """Whether the field is an int (not a bool) in [minimum, maximum], or None if optional."""
        value = self.get(path)
        if value is None and optional:
            return True
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(path, "must be an integer" + (" or None" if optional else ""))
            return False
        return self._in_range(path, value, minimum, maximum)

    def number(self, path: str, minimum: Optional[float] = None, maximum: Optional[float] = None,
               exclusive_minimum: bool = False, exclusive_maximum: bool = False) -> bool:
        """Whether the field is a finite real number in the given (half-)open or closed range."""
        value = self.get(path)
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value)):
            self.error(path, "must be a finite number")
            return False
        return self._in_range(path, value, minimum, maximum, exclusive_minimum, exclusive_maximum)

    def _in_range(self, path, value, minimum, maximum, exclusive_minimum=False,
                  exclusive_maximum=False) -> bool:
        low_ok = minimum is None or (value > minimum if exclusive_minimum else value >= minimum)
        high_ok = maximum is None or (value < maximum if exclusive_maximum else value <= maximum)
        if low_ok and high_ok:
            return True
        low = "-inf" if minimum is None else minimum
        high = "inf" if maximum is None else maximum
        self.error(path, f"must be in {'(' if exclusive_minimum else '['}{low}, "
                         f"{high}{')' if exclusive_maximum or maximum is None else ']'}")
        return False

    def boolean(self, path: str) -> bool:
        if not isinstance(self.get(path), bool):
            self.error(path, "must be True or False")
            return False
        return True

    def string(self, path: str) -> bool:
        if not isinstance(self.get(path), str):
            self.error(path, "must be a string")
            return False
        return True

    def choice(self, path: str, choices: Iterable[str]) -> bool:
        choices = sorted(choices)
        value = self.get(path)
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.error(path, f"must be one of {choices}{hint}")
            return False
        return True


def _check_keys(check: _Checker) -> None:
    """Report missing fields, and unknown ones with the closest known name."""
    config = check.config
    for section, names in FIELDS.items():
        node = config if not section else config.get(section)
        prefix = f"{section}." if section else ""
        if node is None:
            check.errors.append(
                f"config.{section} is missing (a section with fields {list(names)})")
            continue
        for name in names:
            if name not in node:
                check.errors.append(f"config.{prefix}{name} is missing")
        known = names if section else names + tuple(s for s in FIELDS if s) + ("eval",)
        for name in node.keys():
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean config.{prefix}{close[0]}?" if close else ""
                check.errors.append(f"config.{prefix}{name} is not a known field{hint}")


def _check_data(check: _Checker) -> None:
    """The fields' types and ranges; whether the TFDS dataset, its image feature and split
    exist is checked when it is opened (`input_pipeline.open_source`), still before compiling."""
    for path in ("data.folder", "data.tfds_data_dir", "data.manual_dir",
                 "data.converted_data_dir"):
        check.string(path)
    for path in ("data.dataset", "data.image_key", "data.train_split"):
        if check.string(path) and not check.get(path):
            check.error(path, "must not be empty")
    check.integer("data.in_memory_max_bytes", minimum=0)
    check.integer("data.worker_count", minimum=0)
    check.boolean("data.random_flip")
    check.integer("data.image_size", minimum=1)
    _channels(check)
    dataset = check.get("data.dataset")
    if dataset == "folder" and isinstance(check.get("data.folder"), str):
        folder = check.get("data.folder")
        if not folder:
            check.error("data.folder", "must name the image folder when config.data.dataset is "
                                       "'folder'")
        elif not epath.Path(folder).is_dir():
            check.error("data.folder", "is not a directory")


def _channels(check: _Checker) -> bool:
    value = check.get("data.channels")
    if isinstance(value, bool) or value not in (1, 3):
        check.error("data.channels", "must be 1 (grayscale) or 3 (RGB)")
        return False
    return True


def _check_diffusion(check: _Checker) -> None:
    check.integer("diffusion.timesteps", minimum=1)
    check.choice("diffusion.beta_schedule", BETA_SCHEDULES)
    check.choice("diffusion.loss_type", LOSS_TYPES)
    check.choice("diffusion.loss_weighting", LOSS_WEIGHTINGS)
    check.number("diffusion.min_snr_gamma", minimum=0.0, exclusive_minimum=True)
    objective_ok = check.choice("diffusion.objective", OBJECTIVES)
    if not check.choice("diffusion.terminal_snr", TERMINAL_SNRS) or not objective_ok:
        return
    if check.get("diffusion.terminal_snr") != "zero":
        return
    if check.get("diffusion.objective") == "eps":
        # eps -> x0 divides by sqrt(alpha_bar_T) = 0: the eps network cannot be sampled.
        check.error("diffusion.terminal_snr", "needs config.diffusion.objective 'v' or 'x0' "
                                              "(it is 'eps', undefined at SNR 0); set one of "
                                              "them, or terminal_snr 'design' or 'scaled'")
    timesteps = check.get("diffusion.timesteps")
    if isinstance(timesteps, int) and timesteps < 2:
        check.error("diffusion.terminal_snr", "needs config.diffusion.timesteps >= 2 (the "
                                              "rescale keeps the first alpha_bar)")


def _is_int_sequence(value: Any) -> bool:
    return (isinstance(value, (tuple, list)) and len(value) > 0
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value))


def _check_model(check: _Checker) -> None:
    ok = all([
        check.integer("model.dim", minimum=1),
        check.integer("model.init_dim", minimum=1, optional=True),
        check.boolean("model.with_time_emb"),
        check.integer("model.resnet_block_groups", minimum=1),
        check.boolean("model.use_convnext"),
        check.integer("model.convnext_mult", minimum=1),
        check.number("model.dropout", minimum=0.0, maximum=1.0, exclusive_maximum=True),
        check.choice("model.dtype", MODEL_DTYPES),
        check.integer("model.num_classes", minimum=0),
    ])
    if not _is_int_sequence(check.get("model.dim_mults")):
        check.error("model.dim_mults", "must be a non-empty tuple of positive integers, "
                                       "e.g. (1, 2, 4)")
        ok = False
    image_size = check.get("data.image_size")
    if not ok or isinstance(image_size, bool) or not isinstance(image_size, int):
        return
    model = check.get("model")
    try:
        unet_checks.validate_unet_config(
            image_size, dim=model.dim, dim_mults=tuple(model.dim_mults), init_dim=model.init_dim,
            with_time_emb=model.with_time_emb, resnet_block_groups=model.resnet_block_groups,
            use_convnext=model.use_convnext, dropout=model.dropout,
            num_classes=model.num_classes)
    except ValueError as e:
        check.errors.append(f"config.model (with config.data.image_size={image_size}): {e}")
        return
    _check_labels(check)


def _check_labels(check: _Checker) -> None:
    """A conditional model needs a dataset with exactly num_classes labels."""
    num_classes, dataset = check.get("model.num_classes"), check.get("data.dataset")
    folder = check.get("data.folder")
    if num_classes == 0:
        return
    if dataset in TFDS_NUM_CLASSES:
        if num_classes != TFDS_NUM_CLASSES[dataset]:
            check.error("model.num_classes", f"{dataset} has {TFDS_NUM_CLASSES[dataset]} "
                                             f"classes: set {TFDS_NUM_CLASSES[dataset]}, or 0 "
                                             f"for an unconditional model")
    elif dataset == "folder" and isinstance(folder, str) and folder and epath.Path(folder).is_dir():
        classes = datasets.folder_classes(folder)
        if not classes:
            check.error("model.num_classes", f"the image folder {folder} "
                                             f"has no class subfolders to take labels from "
                                             f"(one subfolder per class, as torchvision's "
                                             f"ImageFolder); set 0 for an unconditional model")
        elif num_classes != len(classes):
            check.error("model.num_classes", f"the image folder has {len(classes)} class "
                                             f"subfolders {classes[:10]}: set {len(classes)}, "
                                             f"or 0 for an unconditional model")


def _check_optim(check: _Checker) -> None:
    check.number("optim.learning_rate", minimum=0.0, exclusive_minimum=True)
    check.integer("optim.warmup_steps", minimum=0)
    check.number("optim.grad_clip_norm", minimum=0.0)
    check.number("optim.b1", minimum=0.0, maximum=1.0, exclusive_maximum=True)
    check.number("optim.b2", minimum=0.0, maximum=1.0, exclusive_maximum=True)
    check.number("optim.eps", minimum=0.0, exclusive_minimum=True)
    check.number("optim.ema_decay", minimum=0.0, maximum=1.0, exclusive_maximum=True)
    check.boolean("optim.ema_warmup")
    check.integer("optim.ema_start", minimum=0)


def _multiples_near(value: int, divisor: int) -> str:
    """The multiples of `divisor` either side of `value`, e.g. '96 or 104'."""
    below = value // divisor * divisor
    return " or ".join(str(v) for v in (below, below + divisor) if v > 0)


def _divisible(check: _Checker, path: str, value: int, divisor: int, what: str) -> None:
    if value % divisor:
        check.error(path, f"must be divisible by the {divisor} {what} (each gets an equal "
                          f"share); e.g. {_multiples_near(value, divisor)}")


def _check_training(check: _Checker, num_devices: int, process_count: int) -> None:
    if check.integer("training.batch_size", minimum=1):
        batch_size = check.get("training.batch_size")
        _divisible(check, "training.batch_size", batch_size, num_devices, "devices")
        _divisible(check, "training.batch_size", batch_size, process_count, "processes")
    check.integer("training.num_train_steps", minimum=1, optional=True)
    if check.get("training.num_train_steps") is None:
        check.number("training.num_epochs", minimum=0.0, exclusive_minimum=True)
    for path in ("training.log_every", "training.checkpoint_every", "training.keep_checkpoints"):
        check.integer(path, minimum=1)
    check.integer("training.sample_every", minimum=0)
    check.integer("training.num_sample_images", minimum=1)
    check.choice("training.nan_policy", NAN_POLICIES)
    check.string("training.compilation_cache_dir")
    check.number("training.label_dropout", minimum=0.0, maximum=1.0)
    _check_steps_per_call(check)


def _check_steps_per_call(check: _Checker) -> None:
    """Logs, checkpoints, samples, evaluations and the end fall on call boundaries: every
    step count must be a multiple of config.training.steps_per_call."""
    if not check.integer("training.steps_per_call", minimum=1):
        return
    k = check.get("training.steps_per_call")
    paths = ["training.num_train_steps", "training.log_every", "training.checkpoint_every",
             "training.sample_every"]
    if "eval" in check.config:
        paths += ["eval.bpd_every", "eval.fid_every"]
    for path in paths:
        value = check.get(path)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0 and value % k:
            check.error(path, steps_per_call_message(value, k))


def steps_per_call_message(value: int, k: int) -> str:
    """What to do when a step count is not a multiple of config.training.steps_per_call."""
    return (f"must be a multiple of config.training.steps_per_call = {k} (each compiled call "
            f"runs {k} steps); e.g. {_multiples_near(value, k)}, or a steps_per_call that "
            f"divides {value}")


def _check_sampling(check: _Checker) -> None:
    """The types here; the choices and ranges in `sampling.check_sampler`, which `generate`
    and sample.py call too."""
    typed = [check.string("sampling.sampler"), check.integer("sampling.steps", minimum=1),
             check.number("sampling.ddim_eta"), check.integer("sampling.solver_order"),
             check.string("sampling.step_spacing"), check.number("sampling.dynamic_threshold")]
    check.boolean("sampling.clip_denoised")
    check.number("sampling.guidance")
    timesteps = check.get("diffusion.timesteps")
    if all(typed) and isinstance(timesteps, int) and timesteps >= 1:
        s = check.get("sampling")
        try:
            check_sampler(timesteps, s.sampler, s.steps, s.ddim_eta, s.solver_order,
                          s.step_spacing, s.dynamic_threshold)
        except ValueError as e:
            check.errors.append(f"config.sampling.{e}")


def validate_config(config, *, num_devices: int = 1, process_count: int = 1) -> None:
    """Raise ConfigError listing every field of `config` that cannot work.

    num_devices / process_count: the global device and process counts of the
    run, which the global batch must split evenly over.
    """
    check = _Checker(config)
    _check_keys(check)
    if check.errors:  # the field checks below assume every field is present
        raise ConfigError(_message(check.errors))
    check.integer("seed", minimum=0, maximum=2**31 - 1)  # the samplers take it as an int32
    _check_data(check)
    _check_diffusion(check)
    _check_model(check)
    _check_optim(check)
    _check_training(check, num_devices, process_count)
    _check_sampling(check)
    if "eval" in config:
        try:
            suite.validate_config(config.eval)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            check.errors.append(str(e))
    if check.errors:
        raise ConfigError(_message(check.errors))


def _message(errors: Sequence[str]) -> str:
    plural = "s" if len(errors) > 1 else ""
    return f"invalid config ({len(errors)} problem{plural}):\n  " + "\n  ".join(errors)
