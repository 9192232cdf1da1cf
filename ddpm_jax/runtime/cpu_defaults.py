"""The process settings this project runs with on CPUs, set before JAX starts.

- XLA:CPU's YNNPACK fusions off. With them (the default of jaxlib 0.10 to 0.12) the UNet's
  3x3 and 1x1 convolutions and its matmuls run 2-5x slower than PyTorch's, and a
  Fashion-MNIST training step 1.5x slower (docs/speed.md). Only XLA:CPU reads the
  flag; GPU and TPU programs are unchanged. XLA reads XLA_FLAGS once, at its first
  backend.
- glibc's malloc backing its large blocks with transparent huge pages
  (GLIBC_TUNABLES=glibc.malloc.hugetlb=1). XLA:CPU takes a step's temporary
  buffers (1.4 GB for the Fashion-MNIST step) fresh from the kernel at every
  step, and faulting them in 4 KiB pages costs system time: with the tunable
  that step is about 14% faster (PyTorch's alike; docs/speed.md). glibc reads
  it when the process starts, so a script's main process restarts itself once
  with it (same pid, arguments and streams).

The entry points (train.py, sample.py, evaluate.py, train_classifier.py, the
benchmarks) call `apply_cpu_defaults(restart=__name__ == "__main__")` first;
the tests call it without restarting (.ci/run sets the tunable itself).
$DDPM_JAX_CPU_DEFAULTS=0 keeps both of XLA's and glibc's defaults.
"""
import os
import platform
import sys
from importlib import metadata

FLAG = "xla_cpu_experimental_ynn_fusion_type"
YNN_FUSIONS_OFF = f"--{FLAG}="
# XLA aborts on a flag it does not know: add it only for jaxlib releases that have it
# (each one checked). jaxlib 0.12.0.1 still fuses with YNNPACK by default: the Fashion
# UNet's gradient at batch 32 took 2.6-3.5 s a step with the fusions, 0.7-0.9 s without
# (its compilation 87 s and 149 s; a loaded 2-core CPU).
KNOWN_JAXLIB_RELEASES = ("0.10.", "0.11.", "0.12.")
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT_ENV = "DDPM_JAX_CPU_DEFAULTS"


def apply_cpu_defaults(*, restart: bool = False) -> bool:
    """Append `--xla_cpu_experimental_ynn_fusion_type=` to XLA_FLAGS; True if added.

    Nothing changes where XLA_FLAGS already sets that flag (the user's choice
    wins), where $DDPM_JAX_CPU_DEFAULTS is 0, or where the installed jaxlib is
    not a release known to have the flag. Call it before JAX's first
    computation; later it has no effect. restart: first restart this process
    with glibc's huge-page tunable where `with_huge_pages` adds it (only for a
    script's own main process: it replaces the running program).
    """
    if os.environ.get(OPT_OUT_ENV, "1") == "0":
        return False
    if restart:
        env = with_huge_pages(os.environ)
        if env is not None:
            _restart(env)
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


def with_huge_pages(environ) -> dict | None:
    """`environ` with glibc.malloc.hugetlb=1 added to GLIBC_TUNABLES, or None where the C
    library is not glibc 2.35 or later (which has the tunable) or the tunable is set already."""
    if HUGE_PAGES_TUNABLE in environ.get("GLIBC_TUNABLES", ""):
        return None
    libc, version = platform.libc_ver()
    try:
        if libc != "glibc" or tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
            return None
    except ValueError:
        return None
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
    return {**environ, "GLIBC_TUNABLES": ":".join(tunables + [f"{HUGE_PAGES_TUNABLE}=1"])}


def _restart(env) -> None:
    """Run this program again in this process, with `env` (returns only if that fails)."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:
        pass
