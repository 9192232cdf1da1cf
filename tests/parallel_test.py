"""The same steps on 1 device, on 8 simulated devices and in 2 processes give the same losses."""
import os
import socket

import jax
import numpy as np
import pytest

from ddpm_jax.runtime import metrics_writer
from ddpm_jax.training import loop
from tests.support.train_helpers import (enable_compilation_cache, losses, restored_state, run_train_py,
                                 subprocess_env, tiny_config, train_py)

STEPS = 4


@pytest.fixture(scope="module")
def one_device(fashion_mnist_dirs, tmp_path_factory):
    """STEPS steps in this process on one device: (config, per-step losses, final params)."""
    enable_compilation_cache()
    workdir = tmp_path_factory.mktemp("one_device")
    config = tiny_config(fashion_mnist_dirs, training__num_train_steps=STEPS,
                         training__log_every=1, training__checkpoint_every=STEPS)
    result = loop.train(config, str(workdir))
    return config, losses(workdir), jax.tree.map(np.asarray, result.state.params)


def _assert_same_run(workdir, config, one_device_losses, one_device_params):
    got = losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)],
                               [one_device_losses[s] for s in sorted(got)], rtol=0, atol=1e-5)
    state, step = restored_state(workdir, config)
    assert step == STEPS
    # Parameters whose true gradient is zero (a conv bias before a GroupNorm) get float
    # rounding noise that Adam normalises to steps of +-lr; all others agree far closer.
    bound = 2 * config.optim.learning_rate * STEPS
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(one_device_params)):
        np.testing.assert_allclose(a, b, rtol=0, atol=bound)


@pytest.mark.slow
@pytest.mark.subprocess
def test_eight_simulated_devices_match_one(one_device, tmp_path):
    config, one_losses, one_params = one_device
    env = subprocess_env("--xla_force_host_platform_device_count=8")
    result = run_train_py(config, tmp_path, env)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "on 8 device(s), 1 process(es)" in result.stdout
    _assert_same_run(tmp_path, config, one_losses, one_params)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(one_device, tmp_path):
    """Two processes on localhost (gloo CPU collectives), each reading half of each batch."""
    config, one_losses, one_params = one_device
    env = subprocess_env()
    address = f"127.0.0.1:{_free_port()}"
    processes = [train_py(config, tmp_path, env,
                          [f"--coordinator_address={address}", "--num_processes=2",
                           f"--process_id={i}"]) for i in range(2)]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=300)[0])
    finally:
        for process in processes:
            process.kill()
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
    assert "on 2 device(s), 2 process(es)" in outputs[0]
    # Only process 0 reports and writes logs; checkpoints are written by both together.
    assert "step 4/4" in outputs[0] and "step 4/4" not in outputs[1]
    assert [r["step"] for r in metrics_writer.read_metrics(str(tmp_path))] == [1, 2, 3, 4]
    assert len(os.listdir(tmp_path / metrics_writer.TENSORBOARD_SUBDIR)) == 1
    _assert_same_run(tmp_path, config, one_losses, one_params)
