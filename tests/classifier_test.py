"""The feature classifier: its command on real Fashion-MNIST, saving, loading, the histogram."""
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.data import input_pipeline
from ddpm_jax.evaluation import classifier

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, fashion_mnist_dirs):
    command = [sys.executable, os.path.join(REPO, "train_classifier.py"),
               f"--tfds_data_dir={fashion_mnist_dirs.data_dir}",
               f"--manual_dir={fashion_mnist_dirs.manual_dir}", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)


@pytest.mark.slow
@pytest.mark.subprocess
def test_command_trains_saves_and_reloads(fashion_mnist_dirs, tmp_path):
    """A short real run (a tenth of the training set, one epoch) to keep CI fast; the full
    command (`python train_classifier.py --output_dir=DIR`, three epochs) reaches >= 90%."""
    out = tmp_path / "classifier"
    result = _run([f"--output_dir={out}", "--num_train_images=6400", "--epochs=1",
                   "--min_accuracy=0.75"], fashion_mnist_dirs)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = float(re.search(r"test accuracy ([0-9.]+) on 10000 images", result.stdout).group(1))
    assert printed >= 0.75

    model, params, metadata = classifier.load_classifier(str(out))
    assert metadata["test_accuracy"] == pytest.approx(printed, abs=1e-4)
    assert metadata["num_train_images"] == 6400 and metadata["settings"]["epochs"] == 1
    test = input_pipeline.open_source("fashion_mnist", "test", image_size=28, channels=1,
                                      data_dir=fashion_mnist_dirs.data_dir)
    images, labels = input_pipeline.load_labeled(test)
    reloaded = classifier.accuracy(classifier.make_apply_fn(model), params, images, labels)
    assert reloaded == pytest.approx(printed, abs=1e-4)


def test_save_and_load_round_trip(tmp_path):
    model = classifier.Classifier(num_classes=4, features=(8,), hidden=16)
    params = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 12, 12, 3)))["params"]
    classifier.save_classifier(str(tmp_path / "c"), model, params, {"test_accuracy": 0.5})
    loaded_model, loaded_params, metadata = classifier.load_classifier(str(tmp_path / "c"))
    assert loaded_model == model and metadata == {"test_accuracy": 0.5}
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x = np.random.default_rng(0).uniform(-1, 1, (5, 12, 12, 3)).astype(np.float32)
    logits, features = loaded_model.apply({"params": loaded_params}, x)
    assert logits.shape == (5, 4) and features.shape == (5, 16)


def test_load_names_the_command_when_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_classifier.py --output_dir="):
        classifier.load_classifier(str(tmp_path / "nothing"))


def test_class_histogram():
    logits = np.eye(4)[[0, 0, 1, 3]]
    h = classifier.class_histogram(logits, 4)
    np.testing.assert_allclose(h["class_fractions"], [0.5, 0.25, 0.0, 0.25])
    assert h["class_entropy_bits"] == pytest.approx(1.5)
    assert h["num_classes_covered"] == 3
    balanced = classifier.class_histogram(np.eye(10), 10)
    assert balanced["class_entropy_bits"] == pytest.approx(np.log2(10))


def test_predict_pads_the_last_batch():
    model = classifier.Classifier(features=(4,), hidden=8)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"]
    x = np.random.default_rng(1).uniform(-1, 1, (7, 28, 28, 1)).astype(np.float32)
    apply_fn = classifier.make_apply_fn(model)
    logits, features = classifier.predict(apply_fn, params, x, batch_size=3)
    want_logits, want_features = model.apply({"params": params}, x)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(features, want_features, rtol=1e-5, atol=1e-6)
