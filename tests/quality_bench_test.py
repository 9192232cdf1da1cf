"""bench/quality.py: the design and this project train on the same draws, and the paired
bootstrap ratio behind its comparisons."""
import sys

import jax
import numpy as np
import pytest

from ddpm_jax import convert, evaluation, fid, input_pipeline, parallel, train_state, training
from ddpm_jax.schedules import make_schedule
from tests.train_helpers import REPO, enable_compilation_cache, tiny_config

sys.path.insert(0, str(REPO / "bench"))
import quality  # noqa: E402


def test_design_and_project_train_on_the_same_draws(fashion_mnist_dirs):
    """Same initial weights, real batches, and the timesteps and noise of
    `training.step_draws`: the design's PyTorch loss equals the jitted step's to float
    rounding at every step, while one timestep off already changes it by far more."""
    enable_compilation_cache()
    config = tiny_config(fashion_mnist_dirs)
    design = quality.Design(config, seed=0, threads=1)
    model, optimizer = train_state.create_model(config), train_state.make_optimizer(config)
    schedule = make_schedule(config.diffusion.beta_schedule, config.diffusion.timesteps)
    params0 = convert.torch_to_flax(design.state_dict(), convert.abstract_params(model))
    state = train_state.create_train_state(config, model, optimizer, jax.random.key(0))
    copy = lambda tree: jax.tree.map(np.array, tree)  # noqa: E731  (the step donates each)
    mesh = parallel.make_mesh()
    state = jax.device_put(state.replace(params=copy(params0), ema_params=copy(params0),
                                         opt_state=optimizer.init(params0)),
                           parallel.replicated(mesh))
    step_fn = training.make_train_step(config, model, schedule, optimizer, mesh)
    batches = input_pipeline.TrainIterator(training.open_train_source(config),
                                           config.training.batch_size, config.seed,
                                           random_flip=config.data.random_flip)
    for _ in range(4):
        batch = next(batches)
        t, noise = jax.device_get(training.step_draws(state.rng, state.step, batch,
                                                      schedule.num_timesteps)[1:3])
        state, metrics = step_fn(state, parallel.global_batch(batch, mesh))
        loss = float(metrics["loss"])
        assert design.train_step(batch, t, noise) == pytest.approx(loss, abs=2e-6)
    batches.close()
    shifted = quality.Design(config, seed=0, threads=1)
    off_by_one = shifted.train_step(batch, (t + 1) % schedule.num_timesteps, noise)
    assert abs(off_by_one - loss) > 1e-4


def test_bootstrap_ratio_of_identical_and_of_shifted_features():
    rng = np.random.default_rng(0)
    reference = fid.feature_statistics(rng.normal(size=(4000, 8)))
    a = rng.normal(size=(500, 8))
    assert quality.bootstrap_ratio(reference, a, a, 50) == {"ratio": 1.0, "low": 1.0,
                                                            "high": 1.0}
    worse = quality.bootstrap_ratio(reference, a + 0.3, a, 50)  # FD grows by about 8 x 0.09
    assert 1.0 < worse["low"] <= worse["ratio"] <= worse["high"]
    with pytest.raises(ValueError, match="differ in shape"):
        quality.bootstrap_ratio(reference, a, a[:100])


def test_comparisons_need_both_variants_and_fill_in_the_timesteps():
    rng = np.random.default_rng(1)
    reference = fid.feature_statistics(rng.normal(size=(1000, 4)))
    features = {name: rng.normal(size=(50, 4)) for name in
                ("ema-ddpm20-clip", "raw-ddpm20-eq11", "raw-ddim50-clip")}
    pairs = quality.compare(reference, features, 20, 10, latest="raw-ddpm20-eq11")
    assert [(p["a"], p["b"]) for p in pairs] == [("ema-ddpm20-clip", "raw-ddpm20-eq11")]
    want = (fid.frechet_distance(fid.feature_statistics(features["ema-ddpm20-clip"]), reference)
            / fid.frechet_distance(fid.feature_statistics(features["raw-ddpm20-eq11"]),
                                   reference))
    assert pairs[0]["ratio"] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("name", ["design-ddim50-eq11", "design-ddpm200-clip", "best-ddpm200-clip",
                                  "ema-ddpm200-exact"])
def test_bad_variants_are_refused(name):
    with pytest.raises(ValueError, match="bad variant"):
        quality.parse_variant(name)


def test_scores_and_features_match_the_plain_scores(fashion_mnist_dirs, tmp_path):
    """The features handed to the bootstrap are the ones behind the reported distance."""
    from ddpm_jax import classifier
    config = tiny_config(fashion_mnist_dirs)
    images = evaluation.load_split_images(config, "test", 200)
    model = classifier.Classifier(num_classes=10, features=(4,), hidden=8)
    params = model.init(jax.random.key(0), images[:1])["params"]  # an untrained one will do
    classifier.save_classifier(str(tmp_path), model, params, {})
    scorer = evaluation.ClassifierScorer(str(tmp_path), images)
    scores, features = scorer.scores_and_features(images[:100])
    assert scores == scorer(images[:100])
    assert scores["classifier_fd"] == pytest.approx(fid.frechet_distance(
        fid.feature_statistics(features), scorer.reference), rel=1e-12)
