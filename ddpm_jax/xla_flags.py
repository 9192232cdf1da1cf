"""The XLA:CPU setting this project runs with: YNNPACK fusions off.

With XLA:CPU's default YNNPACK fusions (jaxlib 0.10), the UNet's 3x3 and 1x1
convolutions and its matmuls run 2-5x slower than PyTorch's; without them, at
PyTorch's speed: a Fashion-MNIST training step at batch 128 took 4.2 s
instead of 6.5 s on a 2-core CPU, and sampling a third less
(bench/NOTES_cpu.md). Only XLA:CPU reads the flag; GPU and TPU programs are
unchanged.

The entry points (train.py, sample.py, evaluate.py, train_classifier.py, the
benchmarks, the tests) call `apply_cpu_defaults()` before JAX starts, since XLA
reads XLA_FLAGS once, when it creates its first backend.
"""
import os
from importlib import metadata

FLAG = "xla_cpu_experimental_ynn_fusion_type"
YNN_FUSIONS_OFF = f"--{FLAG}="
# XLA aborts on a flag it does not know: add it only for jaxlib releases that have it.
KNOWN_JAXLIB_RELEASES = ("0.10.",)
OPT_OUT_ENV = "DDPM_JAX_XLA_CPU_DEFAULTS"


def apply_cpu_defaults() -> bool:
    """Append `--xla_cpu_experimental_ynn_fusion_type=` to XLA_FLAGS; True if added.

    Nothing changes where XLA_FLAGS already sets that flag (the user's choice
    wins), where $DDPM_JAX_XLA_CPU_DEFAULTS is 0, or where the installed jaxlib
    is not a release known to have the flag. Call it before JAX's first
    computation; later it has no effect.
    """
    if os.environ.get(OPT_OUT_ENV, "1") == "0":
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if FLAG in flags:
        return False
    try:
        jaxlib_version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return False
    if not jaxlib_version.startswith(KNOWN_JAXLIB_RELEASES):
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {YNN_FUSIONS_OFF}".strip()
    return True
