"""The configs hold the documented recipes, and every bad field is refused before compiling."""
import subprocess
import sys

import ml_collections
import pytest

from configs import cifar10, fashion, mnist, tiny
from ddpm_jax.config_validation import ConfigError, validate_config
from tests.support.train_helpers import REPO

CONFIGS = {"fashion": fashion, "cifar10": cifar10, "mnist": mnist, "tiny": tiny}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("num_devices", [1, 8])
def test_every_config_is_valid(name, num_devices):
    validate_config(CONFIGS[name].get_config(), num_devices=num_devices)


def test_fashion_is_the_design_run():
    c = fashion.get_config()
    assert (c.data.dataset, c.data.image_size, c.data.channels, c.data.random_flip) == (
        "fashion_mnist", 28, 1, True)
    assert (c.diffusion.timesteps, c.diffusion.beta_schedule, c.diffusion.loss_type) == (
        200, "linear", "huber")
    assert (c.model.dim, tuple(c.model.dim_mults), c.model.use_convnext,
            c.model.convnext_mult) == (28, (1, 2, 4), True, 2)
    assert (c.optim.learning_rate, c.optim.warmup_steps, c.optim.grad_clip_norm) == (1e-3, 0, 0.0)
    assert (c.training.batch_size, c.training.num_epochs, c.training.num_train_steps) == (
        128, 5, None)


def test_cifar10_is_the_ddpm_paper_recipe():
    c = cifar10.get_config()
    assert (c.data.dataset, c.data.image_size, c.data.channels) == ("cifar10", 32, 3)
    assert (c.diffusion.timesteps, c.diffusion.beta_schedule, c.diffusion.loss_type) == (
        1000, "linear", "l2")
    assert (c.model.dim, tuple(c.model.dim_mults), c.model.use_convnext, c.model.dropout) == (
        128, (1, 2, 2, 2), False, 0.1)
    assert (c.optim.learning_rate, c.optim.warmup_steps, c.optim.grad_clip_norm,
            c.optim.ema_decay) == (2e-4, 5000, 1.0, 0.9999)
    assert (c.training.batch_size, c.training.num_train_steps) == (128, 800_000)


def test_configs_are_locked_against_new_keys():
    config = fashion.get_config()
    with pytest.raises(AttributeError, match="batchsize"):
        config.training.batchsize = 64
    with pytest.raises(TypeError):
        config.training.batch_size = "64"


def _untyped(config):
    """A copy whose fields accept any type, to feed validation what a careless caller might."""
    return ml_collections.ConfigDict(config.to_dict(), type_safe=False)


# (field, bad value, extra fields, expected part of the message)
BAD_VALUES = [
    ("diffusion.beta_schedule", "cosin", {},
     "config.diffusion.beta_schedule = 'cosin': must be one of "
     "['cosine', 'linear', 'quadratic', 'sigmoid'] (did you mean 'cosine'?)"),
    ("diffusion.loss_type", "mse", {},
     "config.diffusion.loss_type = 'mse': must be one of ['huber', 'l1', 'l2']"),
    ("diffusion.timesteps", 0, {}, "config.diffusion.timesteps = 0: must be in [1, inf)"),
    ("data.dataset", "", {}, "config.data.dataset = '': must not be empty"),
    ("data.train_split", 7, {}, "config.data.train_split = 7: must be a string"),
    ("data.in_memory_max_bytes", -1, {},
     "config.data.in_memory_max_bytes = -1: must be in [0, inf)"),
    ("data.worker_count", -2, {}, "config.data.worker_count = -2: must be in [0, inf)"),
    ("data.dataset", "folder", {"data.folder": ""},
     "config.data.folder = '': must name the image folder"),
    ("data.dataset", "folder", {"data.folder": "/no/such/dir"},
     "config.data.folder = '/no/such/dir': is not a directory"),
    ("data.channels", 2, {}, "config.data.channels = 2: must be 1 (grayscale) or 3 (RGB)"),
    ("data.random_flip", 1, {}, "config.data.random_flip = 1: must be True or False"),
    ("seed", -1, {}, "config.seed = -1: must be in [0, 2147483647]"),
    ("model.dim", 8.5, {}, "config.model.dim = 8.5: must be an integer"),
    ("model.dim_mults", (1, 2, 4, 8), {},
     "image size 28x28 does not fit dim_mults=(1, 2, 4, 8): the network halves it 3 times, so "
     "height and width must be multiples of 8"),
    ("model.dim_mults", (), {}, "config.model.dim_mults = (): must be a non-empty tuple"),
    ("model.resnet_block_groups", 3, {},
     "resnet_block_groups=3 does not divide 8, a channel count of the ResNet blocks' GroupNorm"),
    ("model.dropout", 1.0, {}, "config.model.dropout = 1.0: must be in [0.0, 1.0)"),
    ("model.dtype", "float16", {},
     "config.model.dtype = 'float16': must be one of ['bfloat16', 'float32']"),
    ("optim.learning_rate", 0.0, {}, "config.optim.learning_rate = 0.0: must be in (0.0, inf)"),
    ("optim.learning_rate", float("nan"), {},
     "config.optim.learning_rate = nan: must be a finite number"),
    ("optim.warmup_steps", -1, {}, "config.optim.warmup_steps = -1: must be in [0, inf)"),
    ("optim.grad_clip_norm", -1.0, {}, "config.optim.grad_clip_norm = -1.0: must be in [0.0, inf)"),
    ("optim.ema_decay", 1.0, {}, "config.optim.ema_decay = 1.0: must be in [0.0, 1.0)"),
    ("optim.ema_decay", -0.5, {}, "config.optim.ema_decay = -0.5: must be in [0.0, 1.0)"),
    ("optim.b2", 1.5, {}, "config.optim.b2 = 1.5: must be in [0.0, 1.0)"),
    ("training.batch_size", 100, {},
     "config.training.batch_size = 100: must be divisible by the 8 devices (each gets an equal "
     "share); e.g. 96 or 104"),
    ("training.batch_size", 0, {}, "config.training.batch_size = 0: must be in [1, inf)"),
    ("training.num_train_steps", -5, {},
     "config.training.num_train_steps = -5: must be in [1, inf)"),
    ("training.num_train_steps", None, {"training.num_epochs": 0},
     "config.training.num_epochs = 0: must be in (0.0, inf)"),
    ("training.log_every", 0, {}, "config.training.log_every = 0: must be in [1, inf)"),
    ("training.keep_checkpoints", 0, {},
     "config.training.keep_checkpoints = 0: must be in [1, inf)"),
    ("training.sample_every", -1, {}, "config.training.sample_every = -1: must be in [0, inf)"),
    ("training.nan_policy", "ignore", {},
     "config.training.nan_policy = 'ignore': must be one of ['skip', 'stop']"),
    ("sampling.sampler", "ddpm2", {},
     "config.sampling.sampler must be one of ['ddpm', 'ddim', 'dpmpp'], got 'ddpm2'"),
    ("sampling.steps", 30, {"sampling.sampler": "ddim"},
     "config.sampling.steps must be in [1, 20] (the model's diffusion timesteps), got 30"),
    ("sampling.steps", 0, {}, "config.sampling.steps = 0: must be in [1, inf)"),
    ("sampling.solver_order", 4, {"sampling.sampler": "dpmpp"},
     "config.sampling.solver_order must be one of [1, 2, 3], got 4"),
    ("sampling.step_spacing", "lu", {},
     "config.sampling.step_spacing must be one of ['time', 'logsnr'], got 'lu'"),
    ("sampling.dynamic_threshold", 0.995, {},
     "config.sampling.dynamic_threshold applies to sampler 'dpmpp' only, not 'ddpm'"),
    ("eval.bpd_every", -1, {}, "config.eval.bpd_every must be >= 0, got -1"),
    ("training.steps_per_call", 0, {},
     "config.training.steps_per_call = 0: must be in [1, inf)"),
    ("training.log_every", 6, {"training.steps_per_call": 4},
     "config.training.log_every = 6: must be a multiple of config.training.steps_per_call = 4 "
     "(each compiled call runs 4 steps); e.g. 4 or 8, or a steps_per_call that divides 6"),
    ("training.num_train_steps", 42, {"training.steps_per_call": 4},
     "config.training.num_train_steps = 42: must be a multiple of "
     "config.training.steps_per_call = 4"),
    ("eval.bpd_every", 10, {"training.steps_per_call": 4},
     "config.eval.bpd_every = 10: must be a multiple of config.training.steps_per_call = 4"),
]


@pytest.mark.parametrize("field,value,extra,message", BAD_VALUES,
                         ids=[f"{f}={v!r}" for f, v, _, _ in BAD_VALUES])
def test_bad_value_is_refused_with_the_field_and_what_is_allowed(field, value, extra, message):
    config = _untyped(tiny.get_config())
    for path, v in {field: value, **extra}.items():
        section, _, name = path.rpartition(".")
        (config[section] if section else config)[name] = v
    with pytest.raises(ConfigError) as error:
        validate_config(config, num_devices=8)
    assert message in str(error.value)


def test_batch_size_must_split_over_processes():
    config = tiny.get_config()
    config.training.batch_size = 18
    with pytest.raises(ConfigError, match=r"config.training.batch_size = 18: must be divisible "
                                          r"by the 4 processes .*e.g. 16 or 20"):
        validate_config(config, num_devices=2, process_count=4)


def test_all_problems_are_reported_together():
    config = _untyped(tiny.get_config())
    config.diffusion.loss_type = "l3"
    config.optim.ema_decay = 2.0
    with pytest.raises(ConfigError, match=r"\(2 problems\)") as error:
        validate_config(config)
    assert "config.diffusion.loss_type" in str(error.value)
    assert "config.optim.ema_decay" in str(error.value)


def test_unknown_and_missing_fields_are_named():
    config = _untyped(tiny.get_config())
    config.training.batchsize = 64
    config.trainig = {}
    del config.optim["ema_decay"]
    with pytest.raises(ConfigError) as error:
        validate_config(config)
    text = str(error.value)
    assert "config.training.batchsize is not a known field; did you mean " \
           "config.training.batch_size?" in text
    assert "config.trainig is not a known field; did you mean config.training?" in text
    assert "config.optim.ema_decay is missing" in text


@pytest.mark.subprocess
def test_train_py_refuses_a_bad_field_before_compiling(tmp_path):
    """The command line names the field and its choices, without a traceback, in seconds."""
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), f"--config={REPO / 'configs' / 'tiny.py'}",
         f"--workdir={tmp_path}", "--config.diffusion.beta_schedule=cosin",
         "--config.training.batch_size=0"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={"JAX_PLATFORMS": "cpu",
                                                                     "PATH": "/usr/bin:/bin"})
    assert result.returncode != 0
    assert "config.diffusion.beta_schedule = 'cosin': must be one of" in result.stderr
    assert "config.training.batch_size = 0: must be in [1, inf)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.subprocess
def test_train_py_refuses_a_misspelled_field(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), f"--config={REPO / 'configs' / 'tiny.py'}",
         f"--workdir={tmp_path}", "--config.training.batchsize=64"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={"JAX_PLATFORMS": "cpu",
                                                                     "PATH": "/usr/bin:/bin"})
    assert result.returncode != 0
    assert ("unknown config field in a --config.<section>.<field> flag: 'batchsize' "
            "Did you mean \"batch_size\"") in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoints").exists()
