"""Shared by the training tests: the tiny config on the real Fashion-MNIST, train.py runs."""
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import jax
import numpy as np

from configs import tiny
from ddpm_jax import checkpointing, parallel, train_state

REPO = Path(__file__).resolve().parents[1]
# Shared by the test processes and kept between test sessions (.cache/ is ignored by git):
# the tiny network's programs compile once per machine.
COMPILATION_CACHE = REPO / ".cache" / "jax_compilation_cache_tests"


def enable_compilation_cache() -> None:
    """Turn on JAX's persistent compilation cache in this process (`subprocess_env` hands the
    same directory to subprocesses)."""
    COMPILATION_CACHE.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(COMPILATION_CACHE))


def tiny_config(dirs, **overrides):
    """configs/tiny.py reading the fixture's prepared Fashion-MNIST, with `section.field=value`
    overrides given as keyword arguments `section__field=value`."""
    config = tiny.get_config()
    config.data.tfds_data_dir = str(dirs.data_dir)
    config.data.manual_dir = str(dirs.manual_dir)
    config.training.compilation_cache_dir = ""
    for key, value in overrides.items():
        section, field = key.split("__")
        config[section][field] = value
    return config


def cli_overrides(config) -> List[str]:
    """--config.x.y=v flags reproducing the data and training fields of `config`."""
    flags = []
    for section in ("data", "training", "diffusion"):
        for field, value in config[section].items():
            if value is not None:
                flags.append(f"--config.{section}.{field}={value}")
    return flags


def subprocess_env(xla_flags: str = "") -> Dict[str, str]:
    COMPILATION_CACHE.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["JAX_COMPILATION_CACHE_DIR"] = str(COMPILATION_CACHE)  # later runs skip compiling
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO)
    # This process's XLA_FLAGS (the tests' defaults, conftest.py) plus `xla_flags`.
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {xla_flags}".strip()
    return env


def train_py(config, workdir: Path, env: Dict[str, str], extra: Sequence[str] = (),
             **popen_kwargs):
    """`python train.py --config=configs/tiny.py --workdir=...` with `config`'s fields as flags,
    started (not waited for)."""
    args = [sys.executable, str(REPO / "train.py"), f"--config={REPO / 'configs' / 'tiny.py'}",
            f"--workdir={workdir}", *cli_overrides(config), *extra]
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen_kwargs)


def run_train_py(config, workdir: Path, env: Dict[str, str], extra: Sequence[str] = (),
                 timeout: float = 240) -> subprocess.CompletedProcess:
    process = train_py(config, workdir, env, extra)
    output, _ = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, output)


def restored_state(workdir: Path, config):
    """The whole TrainState of the newest checkpoint in `workdir`, as numpy arrays."""
    checkpointer = checkpointing.Checkpointer(str(workdir), keep=100)
    abstract = checkpointing.abstract_train_state(
        config, parallel.replicated(parallel.make_mesh(jax.devices()[:1])))
    try:
        state, step, _ = checkpointer.restore_latest(lambda _: abstract)
    finally:
        checkpointer.close()
    return jax.tree.map(np.asarray, state), step


def losses(workdir: Path) -> Dict[int, Optional[float]]:
    from ddpm_jax.metrics_writer import read_metrics
    return {row["step"]: row["loss"] for row in read_metrics(str(workdir)) if "loss" in row}


def filled_train_state(config, seed: int = 0):
    """A TrainState for `config` of numpy draws at PyTorch's initial scale, U(+-1/sqrt(fan_in))
    (`create_train_state` would compile the network's initialisation, which takes XLA:CPU
    about a minute); integer leaves and the optimizer's moments are zero."""
    model = train_state.create_model(config)
    shapes = jax.eval_shape(lambda key: train_state.create_train_state(
        config, model, train_state.make_optimizer(config), key), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def fill(leaf):
        if np.issubdtype(leaf.dtype, np.floating):
            bound = 1.0 / np.sqrt(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 0.1
            return rng.uniform(-bound, bound, leaf.shape).astype(leaf.dtype)
        return np.zeros(leaf.shape, leaf.dtype)

    state = jax.tree.map(fill, shapes)
    return state.replace(opt_state=jax.tree.map(np.zeros_like, state.opt_state))
