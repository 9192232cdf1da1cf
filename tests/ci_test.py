"""CI runs what the README says, on the stacks docs/installation.md and setup.cfg name."""
import configparser
import os
import re
import shlex
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

from tests.support.train_helpers import REPO, subprocess_env

CI = (REPO / ".ci" / "run").read_text()


def _constraints(name):
    pins = {}
    for line in (REPO / ".ci" / name).read_text().splitlines():
        if line and not line.startswith("#"):
            package, version = line.split("==")
            pins[package.lower().replace("_", "-")] = version
    return pins


def test_readme_test_command_is_the_one_ci_runs():
    readme = (REPO / "README.md").read_text()
    command = re.search(r'^TEST_COMMAND="(.*)"$', CI, re.M).group(1)
    assert "run_stack oldest python3 .ci/constraints-oldest.txt .venv-ci tests" in CI
    assert (f"python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]' && "
            f"{command} tests") in readme.splitlines()


def _collected(*selection):
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *selection,
                          "tests"], cwd=REPO, env=subprocess_env(), capture_output=True,
                         text=True, check=True).stdout
    return [line for line in out.splitlines() if "::" in line]


@pytest.mark.subprocess
def test_newest_stack_runs_the_marked_upgrade_sensitive_tests():
    """The newest stack's marker expression selects the math, the UNet against PyTorch,
    checkpoints, sampling and one tiny train + resume: a part of the suite, not all of it."""
    selection = shlex.split(re.search(r"^NEWEST_STACK_TESTS='(.*)'$", CI, re.M).group(1))
    assert '"$NEWEST_STACK_TESTS"' in CI
    selected, everything = _collected(*selection), _collected()
    files = {node.split("::")[0] for node in selected}
    assert {"tests/diffusion_test.py", "tests/likelihood_test.py", "tests/objectives_test.py",
            "tests/dpm_solver_test.py", "tests/unet_test.py", "tests/checkpointing_test.py",
            "tests/sampling_test.py", "tests/sample_test.py"} <= files
    assert [n for n in selected if n.startswith("tests/train_test.py")] == [
        "tests/train_test.py::test_train_py_trains_then_resumes"]
    assert 0.2 * len(everything) < len(selected) < 0.6 * len(everything)


def test_both_constraint_files_lie_inside_setup_cfg_ranges():
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    requirements = [Requirement(r) for r in setup["options"]["install_requires"].split("\n")
                    if r.strip()]
    oldest, newest = _constraints("constraints-oldest.txt"), _constraints(
        "constraints-newest.txt")
    for requirement in requirements:
        name = requirement.name.lower().replace("_", "-")
        for pins in (oldest, newest):
            assert name in pins, name
            assert requirement.specifier.contains(pins[name], prereleases=True), (
                requirement, pins[name])
    # The lower bounds are the oldest stack's versions, e.g. jax 0.10.2.
    jax = next(r for r in requirements if r.name == "jax")
    assert oldest["jax"] == "0.10.2" and f">={oldest['jax']}" in str(jax.specifier)
    assert newest["jax"].startswith("0.12.")


STUB_PYTHON = """#!/usr/bin/env bash
# `python -m venv DIR` makes a venv whose python passes pip and exits with $PYTEST_EXIT for pytest.
if [ "$1 $2" = "-m venv" ]; then
    mkdir -p "$3/bin"
    printf '#!/usr/bin/env bash\\n[ "$2" = pytest ] && exit "$PYTEST_EXIT"; exit 0\\n' > "$3/bin/python"
    chmod +x "$3/bin/python"
    echo "PATH=$3/bin:\\$PATH" > "$3/bin/activate"
    exit 0
fi
echo "Python 3.x"
"""


@pytest.mark.subprocess
@pytest.mark.parametrize("pytest_exit", [0, 1, 5])
def test_ci_passes_on_pytest_exit(tmp_path, pytest_exit):
    """.ci/run's run_stack passes pytest's exit on; exit 5 (no test collected) fails CI too."""
    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    functions = CI[CI.index("run_stack() {"):CI.index("ci_start=")]
    script = (f"set -euo pipefail\nTEST_COMMAND='python -m pytest -q'\n{functions}\n"
              f"run_stack stub {stub} constraints.txt {tmp_path / 'venv'} tests\necho after")
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, env={"PATH": os.environ["PATH"],
                                          "PYTEST_EXIT": str(pytest_exit)}, timeout=60)
    assert done.returncode == pytest_exit, done.stdout + done.stderr
    assert f"exit {pytest_exit}" in done.stdout
    assert ("after" in done.stdout) == (pytest_exit == 0)
    assert ("collected no test" in done.stderr) == (pytest_exit == 5)
