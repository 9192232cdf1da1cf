"""Fixtures shared by the test files: the real Fashion-MNIST, prepared once per machine, and a
tiny checkpoint."""
import dataclasses
import os
from pathlib import Path

import pytest

from ddpm_jax.runtime import cpu_defaults

cpu_defaults.apply_cpu_defaults()  # the tests run with XLA's flags as train.py and sample.py do

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class TfdsDirs:
    data_dir: Path  # TFDS data directory holding the prepared ArrayRecord files
    manual_dir: Path  # the official Fashion-MNIST .gz files


@pytest.fixture(scope="session")
def fashion_mnist_dirs() -> TfdsDirs:
    """Fashion-MNIST prepared from the official files into <repo>/.cache/tfds.

    The files come from $DDPM_JAX_MANUAL_DIR, else ../shared/data/fashion_mnist next to
    the repository; the path is made absolute because tests link to it from other
    directories and the docs set the variable relative. Preparing (~20 s) happens on the
    first test run of a machine; later runs and parallel workers reuse it.
    """
    from ddpm_jax.data import datasets

    dirs = TfdsDirs(
        data_dir=REPO / ".cache" / "tfds",
        manual_dir=Path(os.environ.get(datasets.MANUAL_DIR_ENV,
                                       REPO.parent / "shared" / "data" / "fashion_mnist")
                        ).absolute())
    datasets.prepare_tfds("fashion_mnist", data_dir=dirs.data_dir, manual_dir=dirs.manual_dir,
                          allow_download=False)
    return dirs


@pytest.fixture(scope="module")  # one per test file: evaluate.py writes into it
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A workdir with one checkpoint of the tiny config, at step
    `train_helpers.TINY_CHECKPOINT_STEP`, whose EMA parameters differ from the raw ones.

    The state is filled with numpy draws (`create_train_state` would compile
    the network's initialisation, which takes XLA:CPU about a minute).
    """
    import jax
    import numpy as np

    from configs import tiny
    from ddpm_jax.training import checkpointing
    from tests.support import train_helpers

    config = tiny.get_config()
    config.training.compilation_cache_dir = ""  # leave the user's cache alone
    step = train_helpers.TINY_CHECKPOINT_STEP
    state = train_helpers.filled_train_state(config)
    state = state.replace(step=np.int32(step),
                          ema_params=jax.tree.map(lambda p: 0.5 * p, state.params))
    directory = tmp_path_factory.mktemp("run")
    checkpointer = checkpointing.Checkpointer(str(directory), keep=1)
    checkpointer.save(step, state, config)
    checkpointer.close()
    return directory
