"""Bits/dim of the sharded evaluator against a float64 numpy bound; the Evaluator end to end."""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import schedules
from ddpm_jax.evaluation import bpd, classifier, suite
from ddpm_jax.models import unet
from ddpm_jax.runtime.parallel import make_mesh
from tests.likelihood_test import _numpy_bound
from tests.support.train_helpers import subprocess_env, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMESTEPS, SHAPE = 12, (4, 4, 1)


@dataclasses.dataclass(frozen=True)
class ToyApply:
    """The toy denoiser of likelihood_test, as a hashable (params, x, t) -> noise."""

    def __call__(self, params, x, t):
        return params["a"] * jnp.tanh(0.7 * x - 0.002 * t.reshape(-1, 1, 1, 1).astype(x.dtype))


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n,) + SHAPE) / 127.5 - 1.0).astype(np.float32)


def _toy_bpd(images, batch_size, seed=3):
    schedule = schedules.make_schedule("linear", TIMESTEPS)
    return bpd.bits_per_dim(ToyApply(), {"a": jnp.float32(0.8)}, schedule, images,
                            mesh=make_mesh(), seed=seed, batch_size=batch_size)


def test_per_image_bound_matches_numpy_with_per_image_keys():
    images, seed = _images(5), 3
    out = _toy_bpd(images, batch_size=2)  # 3 batches, the last one padded
    betas = schedules.linear_beta_schedule(TIMESTEPS)
    for i in range(len(images)):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
        noises = [np.asarray(jax.random.normal(jax.random.fold_in(key, t), (1,) + SHAPE),
                             np.float64) for t in range(TIMESTEPS)]
        want = _numpy_bound(betas, images[i:i + 1].astype(np.float64), noises)[0]
        assert out["total_bpd"][i] == pytest.approx(want, rel=1e-4)
    np.testing.assert_allclose(out["total_bpd"],
                               out["prior_bpd"] + out["decoder_bpd"] + out["kl_bpd"], rtol=1e-5)


def test_bound_does_not_depend_on_batching():
    images = _images(7)
    one, many = _toy_bpd(images, batch_size=1), _toy_bpd(images, batch_size=4)
    for k in one:
        np.testing.assert_allclose(one[k], many[k], rtol=1e-6)


def test_summary_mean_and_standard_error():
    per_image = {"total_bpd": np.array([1.0, 2.0, 4.0]), "prior_bpd": np.zeros(3),
                 "decoder_bpd": np.ones(3), "kl_bpd": np.array([0.0, 1.0, 3.0])}
    summary = bpd.summarize_bpd(per_image)
    assert summary["bpd"] == pytest.approx(7 / 3)
    assert summary["bpd_stderr"] == pytest.approx(np.std([1, 2, 4], ddof=1) / np.sqrt(3))
    assert summary["bpd_kl"] == pytest.approx(4 / 3) and summary["bpd_num_images"] == 3


@pytest.mark.subprocess
def test_same_bound_on_eight_devices():
    script = textwrap.dedent("""
        import json
        import jax
        from tests.evaluation_test import _images, _toy_bpd
        assert jax.device_count() == 8
        out = _toy_bpd(_images(11), batch_size=4)  # 4 rounds up to 8 per call: 2 calls
        print(json.dumps({k: v.tolist() for k, v in out.items()}))
    """)  # run in the repository root, which `-c` puts on sys.path
    env = subprocess_env("--xla_force_host_platform_device_count=8")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    eight = json.loads(result.stdout.strip().splitlines()[-1])
    one = _toy_bpd(_images(11), batch_size=4)
    for k in one:
        np.testing.assert_allclose(np.asarray(eight[k]), one[k], rtol=1e-6)


def test_quantize_rounds_to_eight_bit_levels():
    q = suite.quantize(np.array([-3.0, -1.0, 0.0, 0.0039, 1.2], np.float32))
    np.testing.assert_allclose(q, [-1.0, -1.0, 1 / 255, 1 / 255, 1.0], atol=1e-6)
    assert np.allclose(np.round((q + 1) * 127.5), (q + 1) * 127.5, atol=1e-4)


def test_validate_config_names_the_field():
    config = suite.default_config()
    config.bpd_num_images = 0
    with pytest.raises(ValueError, match="config.eval.bpd_num_images"):
        suite.validate_config(config)
    config = suite.default_config()
    config.fid_every = 10
    with pytest.raises(ValueError, match="config.eval.classifier_dir"):
        suite.validate_config(config)


@pytest.mark.slow
def test_evaluator_on_the_tiny_config(fashion_mnist_dirs, tmp_path):
    """Real test images, a tiny UNet, an untrained classifier: every number is produced."""
    config = tiny_config(fashion_mnist_dirs, sampling__sampler="ddim", sampling__steps=2)
    config.unlock()
    config.eval = suite.default_config()
    config.eval.update(bpd_every=5, bpd_num_images=3, bpd_batch_size=2, fid_every=10,
                       fid_num_samples=6, fid_reference_images=50,
                       classifier_dir=str(tmp_path / "classifier"))
    model = classifier.Classifier()
    untrained = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"]
    classifier.save_classifier(config.eval.classifier_dir, model, untrained,
                               {"test_accuracy": 0.1})
    params = unet.create_model(config).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,), jnp.int32))["params"]
    lines = []
    evaluator = suite.Evaluator(config, make_mesh(), log_fn=lines.append)
    assert not evaluator.due(3) and evaluator(params, 3) == {}
    scores = evaluator(params, 10)
    assert scores["eval/bpd_num_images"] == 3 and scores["eval/fid_num_samples"] == 6
    assert np.isfinite(scores["eval/bpd"]) and scores["eval/bpd"] > 0
    assert scores["eval/bpd_stderr"] > 0
    assert scores["eval/classifier_fd"] > 0
    assert sum(scores[f"eval/class_fraction_{k}"] for k in range(10)) == pytest.approx(1.0)
    assert 1 <= scores["eval/num_classes_covered"] <= 6
    assert "bits/dim" in lines[0] and "classifier FD" in lines[0]
    # The same bound as a direct call on the first three test images.
    direct = bpd.bits_per_dim(evaluator.apply_fn, params, evaluator.schedule,
                              evaluator.bpd_images, mesh=make_mesh(), batch_size=3)
    assert scores["eval/bpd"] == pytest.approx(float(direct["total_bpd"].mean()), rel=1e-5)
