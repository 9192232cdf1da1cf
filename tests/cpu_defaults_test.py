"""The CPU defaults (YNNPACK fusions off, malloc on huge pages): when each applies, and that
it takes effect."""
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from ddpm_jax.runtime import cpu_defaults

pytestmark = pytest.mark.newest_stack

REPO = Path(__file__).resolve().parents[1]
KNOWN = metadata.version("jaxlib").startswith(cpu_defaults.KNOWN_JAXLIB_RELEASES)


def _fusions_by_ynnpack():
    """YNNPACK fusions in the compiled program of a small conv + matmul on this process's CPU."""
    f = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) @ jnp.ones((8, 8)))
    text = f.lower(jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 8))).compile().as_text()
    return len(re.findall(r"^\s*%ynn_fusion\S* = ", text, flags=re.M))


@pytest.fixture
def env(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv(cpu_defaults.OPT_OUT_ENV, raising=False)
    monkeypatch.setattr(cpu_defaults.metadata, "version", lambda name: "0.10.2")
    return monkeypatch


def test_adds_the_flag_and_keeps_other_flags(env):
    assert cpu_defaults.apply_cpu_defaults()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type="
    env.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert cpu_defaults.apply_cpu_defaults()
    assert os.environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=8 "
                                       "--xla_cpu_experimental_ynn_fusion_type=")


@pytest.mark.parametrize("setting", [("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot"),
                                     (cpu_defaults.OPT_OUT_ENV, "0")])
def test_the_users_setting_wins(env, setting):
    env.setenv(*setting)
    before = os.environ.get("XLA_FLAGS")
    assert not cpu_defaults.apply_cpu_defaults()
    assert os.environ.get("XLA_FLAGS") == before


def test_an_unknown_jaxlib_gets_no_flag(env):
    # XLA aborts at start on a flag its release does not define: untested releases get none.
    env.setattr(cpu_defaults.metadata, "version", lambda name: "0.13.0")
    assert not cpu_defaults.apply_cpu_defaults()
    assert "XLA_FLAGS" not in os.environ


@pytest.mark.skipif(not KNOWN, reason="jaxlib without the flag")
def test_tests_run_without_fusions_by_ynnpack():
    assert _fusions_by_ynnpack() == 0


@pytest.mark.subprocess
@pytest.mark.skipif(not KNOWN, reason="jaxlib without the flag")
@pytest.mark.parametrize("entry_point", ["train", "sample"])
def test_entry_points_turn_fusions_by_ynnpack_off_and_the_opt_out_keeps_them(entry_point):
    code = (f"import {entry_point}; from tests import cpu_defaults_test; "  # from REPO, on sys.path
            f"print(cpu_defaults_test._fusions_by_ynnpack())")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    counts = []
    for opt_out in ("1", "0"):
        env[cpu_defaults.OPT_OUT_ENV] = opt_out
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=300, check=True, cwd=REPO).stdout
        counts.append(int(out.split()[-1]))
    assert counts[0] == 0 and counts[1] > 0, counts


def test_with_huge_pages_adds_the_tunable_once_and_keeps_others(monkeypatch):
    monkeypatch.setattr(cpu_defaults.platform, "libc_ver", lambda: ("glibc", "2.36"))
    assert cpu_defaults.with_huge_pages({"A": "1"}) == {
        "A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    env = cpu_defaults.with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert cpu_defaults.with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
    for libc in [("glibc", "2.34"), ("musl", "1.2"), ("", "")]:
        monkeypatch.setattr(cpu_defaults.platform, "libc_ver", lambda libc=libc: libc)
        assert cpu_defaults.with_huge_pages({}) is None


def _thp_mode():
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return re.search(r"\[(\w+)\]", text).group(1)


HUGE_PAGES_PROBE = """
import ctypes, os
print("pid", os.getpid(), flush=True)
from ddpm_jax.runtime import cpu_defaults
cpu_defaults.apply_cpu_defaults(restart=True)
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
n = 256 << 20
block = libc.malloc(ctypes.c_size_t(n))
ctypes.memset(block, 1, n)
rollup = open("/proc/self/smaps_rollup").read()
huge_kb = int(rollup.split("AnonHugePages:")[1].split()[0])
print("tunables", os.environ.get("GLIBC_TUNABLES", "-"), "huge_kb", huge_kb)
"""


@pytest.mark.subprocess
@pytest.mark.skipif(cpu_defaults.with_huge_pages({}) is None or _thp_mode() in (None, "never"),
                    reason="needs glibc >= 2.35 and transparent huge pages")
def test_a_script_restarts_itself_once_with_malloc_on_huge_pages():
    code = HUGE_PAGES_PROBE
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    runs = {}
    for opt_out in ("1", "0"):
        env[cpu_defaults.OPT_OUT_ENV] = opt_out
        runs[opt_out] = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                       text=True, timeout=120, check=True).stdout.split()
    # Restarted: the same pid printed twice, then the tunable in its environment, and the
    # 256 MiB block backed by huge pages.
    on = runs["1"]
    assert on[0:2] == on[2:4] and on[0] == "pid", on
    assert on[5] == "glibc.malloc.hugetlb=1" and int(on[7]) >= 128 << 10, on
    off = runs["0"]
    assert off.count("pid") == 1 and off[3] == "-", off  # opted out: no restart
    if _thp_mode() == "madvise":  # otherwise the kernel uses huge pages regardless
        assert int(off[5]) == 0, off
