"""Shared by the training tests: the tiny config on the real Fashion-MNIST, train.py runs."""
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import jax
import numpy as np

from configs import tiny
from ddpm_jax.models import unet
from ddpm_jax.runtime import parallel
from ddpm_jax.training import checkpointing, train_state

REPO = Path(__file__).resolve().parents[2]
# Shared by the test processes and kept between test sessions (.cache/ is ignored by git):
# the tiny network's programs compile once per machine.
COMPILATION_CACHE = REPO / ".cache" / "jax_compilation_cache_tests"
TINY_CHECKPOINT_STEP = 7  # the step of the `tiny_checkpoint` fixture (conftest.py)


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
             cwd: Path = REPO, **popen_kwargs):
    """`python train.py --config=configs/tiny.py --workdir=...` with `config`'s fields as flags,
    started (not waited for)."""
    args = [sys.executable, str(REPO / "train.py"), f"--config={REPO / 'configs' / 'tiny.py'}",
            f"--workdir={workdir}", *cli_overrides(config), *extra]
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen_kwargs)


def sigterm_at(process, line_start: str, timeout: float = 300) -> str:
    """Send SIGTERM to a `train_py` process when it prints a line starting with `line_start`
    (to its whole process group, as Ctrl-C does, if it leads one: start_new_session=True);
    its whole output once it has exited (killed after `timeout` s: a hung run fails the test
    instead of CI)."""
    lines = []
    timer = threading.Timer(timeout, process.kill)
    timer.start()
    try:
        for line in process.stdout:
            lines.append(line)
            if line.startswith(line_start):
                if os.getpgid(process.pid) == process.pid:
                    os.killpg(process.pid, signal.SIGTERM)
                else:
                    process.send_signal(signal.SIGTERM)
        process.wait()
    finally:
        timer.cancel()
    return "".join(lines)


def run_train_py(config, workdir: Path, env: Dict[str, str], extra: Sequence[str] = (),
                 timeout: float = 240, cwd: Path = REPO) -> subprocess.CompletedProcess:
    process = train_py(config, workdir, env, extra, cwd)
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
    from ddpm_jax.runtime.metrics_writer import read_metrics
    return {row["step"]: row["loss"] for row in read_metrics(str(workdir)) if "loss" in row}


def read_events(directory, local_copy: Path):
    """TensorBoard's view of the event files in `directory` (local or a URL; copied to
    `local_copy` for TensorFlow's reader, which verifies their checksums):
    ({tag: {step: value}} of the scalars, {tag: {step: Summary.Image}} of the images)."""
    import tensorflow as tf
    from etils import epath
    local_copy.mkdir(parents=True, exist_ok=True)
    scalars, images = {}, {}
    for remote in sorted(epath.Path(directory).iterdir()):
        path = local_copy / remote.name
        path.write_bytes(remote.read_bytes())
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.HasField("image"):
                    images.setdefault(value.tag, {})[event.step] = value.image
                elif value.HasField("simple_value"):
                    scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars, images


def filled_train_state(config, seed: int = 0):
    """A TrainState for `config` of numpy draws at PyTorch's initial scale, U(+-1/sqrt(fan_in))
    (`create_train_state` would compile the network's initialisation, which takes XLA:CPU
    about a minute); integer leaves and the optimizer's moments are zero."""
    model = unet.create_model(config)
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
