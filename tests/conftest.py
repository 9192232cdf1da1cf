"""Fixtures shared by the test files: the real Fashion-MNIST, prepared once per machine."""
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

    The files come from $DDPM_JAX_MANUAL_DIR, else ../shared/data/fashion_mnist
    next to the repository. Preparing (~20 s) happens on the first test run of
    a machine; later runs and parallel workers reuse it.
    """
    from ddpm_jax.data import datasets

    dirs = TfdsDirs(
        data_dir=REPO / ".cache" / "tfds",
        manual_dir=Path(os.environ.get(datasets.MANUAL_DIR_ENV,
                                       REPO.parent / "shared" / "data" / "fashion_mnist")))
    datasets.prepare_tfds("fashion_mnist", data_dir=dirs.data_dir, manual_dir=dirs.manual_dir,
                          allow_download=False)
    return dirs
