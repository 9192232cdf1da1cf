"""The XLA:CPU default (YNNPACK fusions off): when it is applied, and that it takes effect."""
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from ddpm_jax import xla_flags

REPO = Path(__file__).resolve().parents[1]
KNOWN = metadata.version("jaxlib").startswith(xla_flags.KNOWN_JAXLIB_RELEASES)


def _fusions_by_ynnpack():
    """YNNPACK fusions in the compiled program of a small conv + matmul on this process's CPU."""
    f = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) @ jnp.ones((8, 8)))
    text = f.lower(jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 8))).compile().as_text()
    return len(re.findall(r"^\s*%ynn_fusion\S* = ", text, flags=re.M))


@pytest.fixture
def env(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv(xla_flags.OPT_OUT_ENV, raising=False)
    monkeypatch.setattr(xla_flags.metadata, "version", lambda name: "0.10.2")
    return monkeypatch


def test_adds_the_flag_and_keeps_other_flags(env):
    assert xla_flags.apply_cpu_defaults()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type="
    env.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert xla_flags.apply_cpu_defaults()
    assert os.environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=8 "
                                       "--xla_cpu_experimental_ynn_fusion_type=")


@pytest.mark.parametrize("setting", [("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot"),
                                     (xla_flags.OPT_OUT_ENV, "0")])
def test_the_users_setting_wins(env, setting):
    env.setenv(*setting)
    before = os.environ.get("XLA_FLAGS")
    assert not xla_flags.apply_cpu_defaults()
    assert os.environ.get("XLA_FLAGS") == before


def test_an_unknown_jaxlib_gets_no_flag(env):
    # XLA aborts at start on a flag its release does not define.
    env.setattr(xla_flags.metadata, "version", lambda name: "0.11.2")
    assert not xla_flags.apply_cpu_defaults()
    assert "XLA_FLAGS" not in os.environ


@pytest.mark.skipif(not KNOWN, reason="jaxlib without the flag")
def test_tests_run_without_fusions_by_ynnpack():
    assert _fusions_by_ynnpack() == 0


@pytest.mark.skipif(not KNOWN, reason="jaxlib without the flag")
@pytest.mark.parametrize("entry_point", ["train", "sample"])
def test_entry_points_turn_fusions_by_ynnpack_off_and_the_opt_out_keeps_them(entry_point):
    code = (f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(Path(__file__).parent)!r}]; "
            f"import {entry_point}, xla_flags_test; print(xla_flags_test._fusions_by_ynnpack())")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    counts = []
    for opt_out in ("1", "0"):
        env[xla_flags.OPT_OUT_ENV] = opt_out
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=300, check=True).stdout
        counts.append(int(out.split()[-1]))
    assert counts[0] == 0 and counts[1] > 0, counts
