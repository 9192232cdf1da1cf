"""The Fréchet distance: closed forms, scipy's sqrtm, and real Fashion-MNIST features."""
import numpy as np
import pytest
import scipy.linalg

from ddpm_jax.data import input_pipeline
from ddpm_jax.evaluation import classifier, fid


def _random_features(seed, n=400, d=12, shift=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return shift + scale * rng.normal(size=(n, d)) @ mixing


def _scipy_frechet(a, b):
    """The textbook formula with scipy's general matrix square root."""
    covmean = scipy.linalg.sqrtm(a.cov @ b.cov).real
    diff = a.mean - b.mean
    return diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2 * np.trace(covmean)


def test_closed_form_for_diagonal_covariances():
    # FD of N(m1, diag(s1)) and N(m2, diag(s2)) = |m1 - m2|^2 + sum (sqrt(s1) - sqrt(s2))^2.
    m1, m2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    got = fid.frechet_distance(fid.FeatureStatistics(m1, np.diag(s1), 0),
                               fid.FeatureStatistics(m2, np.diag(s2), 0))
    want = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert got == pytest.approx(want, rel=1e-12)


def test_matches_scipy_sqrtm_and_is_symmetric():
    a = fid.feature_statistics(_random_features(0))
    b = fid.feature_statistics(_random_features(1, shift=0.3, scale=1.5))
    ab, ba = fid.frechet_distance(a, b), fid.frechet_distance(b, a)
    assert ab == pytest.approx(_scipy_frechet(a, b), rel=1e-9)
    assert ab == pytest.approx(ba, rel=1e-10)
    assert ab > 1.0


def test_distance_of_a_set_to_itself_is_zero_even_when_singular():
    for n, d in [(400, 12), (50, 128)]:  # the second covariance has rank 49 < 128
        stats = fid.feature_statistics(_random_features(2, n=n, d=d))
        assert fid.frechet_distance(stats, stats) < 1e-8 * np.trace(stats.cov)


def test_singular_covariances_give_finite_distances():
    a = fid.feature_statistics(_random_features(3, n=20, d=64))
    b = fid.feature_statistics(_random_features(4, n=20, d=64, shift=0.1))
    distance = fid.frechet_distance(a, b)
    assert np.isfinite(distance) and distance > 0
    assert distance == pytest.approx(fid.frechet_distance(b, a), rel=1e-8)


def test_statistics_round_trip_in_pytorch_fid_format(tmp_path):
    stats = fid.feature_statistics(_random_features(5))
    path = tmp_path / "stats.npz"
    fid.save_statistics(str(path), stats)
    with np.load(path) as data:
        assert {"mu", "sigma"} <= set(data.files)
    loaded = fid.load_statistics(str(path))
    np.testing.assert_array_equal(loaded.cov, stats.cov)
    assert loaded.count == 400
    np.savez(tmp_path / "bad.npz", mean=stats.mean)
    with pytest.raises(ValueError, match="lacks"):
        fid.load_statistics(str(tmp_path / "bad.npz"))


def test_feature_statistics_rejects_a_single_vector():
    with pytest.raises(ValueError, match="N >= 2"):
        fid.feature_statistics(np.zeros((1, 4)))


@pytest.fixture(scope="module")
def fashion_features(fashion_mnist_dirs):
    """Features of a briefly trained classifier for train, test and noise images."""
    def split(name, n):
        source = input_pipeline.open_source(
            "fashion_mnist", name, image_size=28, channels=1,
            data_dir=fashion_mnist_dirs.data_dir, manual_dir=fashion_mnist_dirs.manual_dir)
        return input_pipeline.load_labeled(source, n)

    train_images, train_labels = split("train", 6400)
    test_images, _ = split("test", 2000)
    model = classifier.Classifier()
    params = classifier.train_classifier(model, train_images, train_labels,
                                         classifier.TrainSettings(epochs=1), log=None)
    apply_fn = classifier.make_apply_fn(model)
    noise = np.random.default_rng(0).uniform(-1, 1, test_images.shape).astype(np.float32)
    features = lambda images: classifier.predict(apply_fn, params, images)[1]  # noqa: E731
    return {"train": features(train_images[:2000]), "test": features(test_images),
            "noise": features(noise)}


def test_real_splits_are_close_and_noise_is_far(fashion_features):
    stats = {k: fid.feature_statistics(v) for k, v in fashion_features.items()}
    scale = np.trace(stats["test"].cov)
    test_train = fid.frechet_distance(stats["test"], stats["train"])
    noise_test = fid.frechet_distance(stats["noise"], stats["test"])
    print(f"classifier FD: test-train {test_train:.3f}, noise-test {noise_test:.3f}, "
          f"tr(cov test) {scale:.3f}")
    assert test_train < 0.05 * scale
    assert noise_test > 0.5 * scale
    assert noise_test > 20 * test_train
