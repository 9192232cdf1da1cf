"""experiments/quality/run.py: the design and this project train on the same draws, and the paired
bootstrap ratio behind its comparisons."""
import jax
import numpy as np
import pytest

from ddpm_jax.data import input_pipeline
from ddpm_jax.evaluation import fid, suite
from ddpm_jax.models import torch_weights, unet
from ddpm_jax.runtime import parallel
from ddpm_jax.training import loop, train_state, train_step
from ddpm_jax.schedules import make_schedule
from experiments.quality import data as quality_data, run as quality, variants as quality_variants
from tests.support.train_helpers import REPO, enable_compilation_cache, tiny_config


def test_design_and_project_train_on_the_same_draws(fashion_mnist_dirs):
    """Same initial weights, real batches, and the timesteps and noise of
    `train_step.step_draws`: the design's PyTorch loss equals the jitted step's to float
    rounding at every step, while one timestep off already changes it by far more."""
    enable_compilation_cache()
    config = tiny_config(fashion_mnist_dirs)
    design = quality.Design(config, seed=0, threads=1)
    model, optimizer = unet.create_model(config), train_state.make_optimizer(config)
    schedule = make_schedule(config.diffusion.beta_schedule, config.diffusion.timesteps)
    params0 = torch_weights.torch_to_flax(design.state_dict(), torch_weights.abstract_params(model))
    state = train_state.create_train_state(config, model, optimizer, jax.random.key(0))
    copy = lambda tree: jax.tree.map(np.array, tree)  # noqa: E731  (the step donates each)
    mesh = parallel.make_mesh()
    state = jax.device_put(state.replace(params=copy(params0), ema_params=copy(params0),
                                         opt_state=optimizer.init(params0)),
                           parallel.replicated(mesh))
    step_fn = train_step.make_train_step(config, model, schedule, optimizer, mesh)
    batches = input_pipeline.TrainIterator(loop.open_train_source(config),
                                           config.training.batch_size, config.seed,
                                           random_flip=config.data.random_flip)
    for _ in range(4):
        batch = next(batches)
        t, noise = jax.device_get(train_step.step_draws(state.rng, state.step, batch,
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
    bootstrap = quality_variants.PairedBootstrap(
        fid.feature_statistics(rng.normal(size=(4000, 8))), 50)
    a = rng.normal(size=(500, 8))
    assert bootstrap.ratio(a, a) == {"ratio": 1.0, "low": 1.0, "high": 1.0}
    worse = bootstrap.ratio(a + 0.3, a, "worse", "a")  # FD grows by about 8 x 0.09
    assert 1.0 < worse["low"] <= worse["ratio"] <= worse["high"]
    # Each set's resampled distances are computed once and shared by every pair it is in.
    assert bootstrap.ratio(a, a + 0.3, "a", "worse")["ratio"] == pytest.approx(
        1 / worse["ratio"], rel=1e-12)
    assert set(bootstrap._cache) == {"worse", "a"}
    with pytest.raises(ValueError, match="differ in shape"):
        bootstrap.ratio(a, a[:100])


def test_comparisons_pair_recipes_samplers_and_the_reference():
    """Within a recipe (T filled in), each variant against the design's sampler on the
    design's recipe, each sampler against DDPM on the same parameters; only pairs whose both
    variants were sampled."""
    rng = np.random.default_rng(1)
    bootstrap = quality_variants.PairedBootstrap(
        fid.feature_statistics(rng.normal(size=(1000, 4))), 10)
    names = ("design/ema-ddpm20-clip", "design/raw-ddpm20-eq11", "scaled-v/ema-ddpm20-clip",
             "scaled-v/ema-dpmpp2m10-clip")
    features = {name: rng.normal(size=(50, 4)) for name in names}
    pairs = quality_variants.compare(bootstrap, features, {"design": 20, "scaled-v": 20},
                                     latest="design/raw-ddpm20-eq11")
    reference = "design/raw-ddpm20-eq11"
    assert sorted((p["a"], p["b"]) for p in pairs) == sorted([
        ("design/ema-ddpm20-clip", reference), ("scaled-v/ema-ddpm20-clip", reference),
        ("scaled-v/ema-dpmpp2m10-clip", reference),
        ("scaled-v/ema-dpmpp2m10-clip", "scaled-v/ema-ddpm20-clip")])
    first = next(p for p in pairs if p["a"] == "design/ema-ddpm20-clip")
    assert first["question"] == "the default against the design's sampler"
    fd = lambda name: fid.frechet_distance(  # noqa: E731
        fid.feature_statistics(features[name]), bootstrap.reference)
    assert first["ratio"] == pytest.approx(fd("design/ema-ddpm20-clip") / fd(reference),
                                           rel=1e-12)
    assert "| scaled-v/ema-dpmpp2m10-clip |" in quality_variants.table(
        {"reference": reference, "comparisons": pairs, "variants": {
            name: {"classifier_fd": fd(name), "s_per_image": 0.01} for name in names}})


@pytest.mark.parametrize("name", ["design-ddim50-eq11", "design-ddpm200-clip", "best-ddpm200-clip",
                                  "ema-ddpm200-exact", "ema-dpmpp4m20-clip", "ema-ddpm200"])
def test_bad_variants_are_refused(name):
    with pytest.raises(ValueError, match="bad variant"):
        quality_variants.parse_variant(name)


def test_solver_variants_need_a_generate_that_takes_them(monkeypatch):
    """DPM-Solver++ variants parse into generate's arguments, and are refused, naming what
    is missing, where `sampling.generate` lacks the sampler or its arguments."""
    def old_generate(apply_fn, params, schedule, image_shape, num_images, *, sampler="ddpm",
                     ddim_steps=50, clip_denoised=False):
        raise AssertionError("not called")

    def new_generate(apply_fn, params, schedule, image_shape, num_images, *, sampler="ddpm",
                     steps=20, solver_order=2, step_spacing="logsnr", clip_denoised=False):
        raise AssertionError("not called")

    monkeypatch.setattr(quality_variants.sampling, "generate", old_generate)
    monkeypatch.setattr(quality_variants.sampling, "SAMPLERS", ("ddpm", "ddim"))
    with pytest.raises(ValueError, match="missing arguments: steps, solver_order, step_spacing"):
        quality_variants.parse_variant("ema-dpmpp2m20-clip")
    monkeypatch.setattr(quality_variants.sampling, "generate", new_generate)
    with pytest.raises(ValueError, match="samplers: ddpm, ddim"):
        quality_variants.parse_variant("ema-dpmpp2m20-clip")
    monkeypatch.setattr(quality_variants.sampling, "SAMPLERS", ("ddpm", "ddim", "dpmpp"))
    assert quality_variants.parse_variant("raw-dpmpp3m15time-eq11") == quality_variants.Variant(
        "raw", {"sampler": "dpmpp", "steps": 15, "solver_order": 3, "step_spacing": "time",
                "clip_denoised": False}, "dpmpp3m15time-eq11")


def test_recipes_override_existing_fields_only(monkeypatch):
    base = quality.base_config(quality.parse_args(["--classifier_dir", str(REPO),
                                                   "--out_dir", "unused"]))
    l2 = quality_variants.apply_overrides(base, "design-l2")
    assert (l2.diffusion.loss_type, base.diffusion.loss_type) == ("l2", "huber")
    assert l2.training.batch_size == 128 and l2.diffusion.timesteps == 200
    monkeypatch.setitem(quality_variants.RECIPES, "typo", {"diffusion.objectiv": "v"})
    with pytest.raises(ValueError, match="config field diffusion.objectiv does not exist.*"
                                         "loss_type"):
        quality_variants.apply_overrides(base, "typo")
    with pytest.raises(ValueError, match="unknown recipe 'best'"):
        quality_variants.apply_overrides(base, "best")


def test_design_variants_are_checked_only_with_the_design_recipe(capsys):
    """--variants (by default the PyTorch design's too) are sampled on the design recipe only:
    a run of other recipes with --no_torch starts; one with the design is refused."""
    common = ["--classifier_dir", str(REPO), "--out_dir", "unused", "--no_torch"]
    assert quality.parse_args(common + ["--recipes", "scaled", "scaled-v"]).recipes == [
        "scaled", "scaled-v"]
    with pytest.raises(SystemExit):
        quality.parse_args(common + ["--recipes", "design", "scaled"])
    assert "variant design-ddpm200-eq11 needs the PyTorch design" in capsys.readouterr().err


def test_npz_data_and_msgpack_classifier(tmp_path):
    """The carried forms of the data and the classifier read back as the originals."""
    from ddpm_jax.evaluation import classifier
    rng = np.random.default_rng(0)
    arrays = {f"{split}_images": rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
              for split, n in (("train", 40), ("test", 10))}
    np.savez_compressed(tmp_path / "d.npz", **arrays)
    data = quality_data.NpzData(str(tmp_path / "d.npz"), (28, 28, 1))
    assert np.array_equal(data.train_source().read([3, 1]), arrays["train_images"][[3, 1]])
    assert np.array_equal(data.images("test", 4), input_pipeline.to_float(
        arrays["test_images"][:4]))
    with pytest.raises(ValueError, match="the config wants uint8 \\[N, 32, 32, 3\\]"):
        quality_data.NpzData(str(tmp_path / "d.npz"), (32, 32, 3))

    model = classifier.Classifier(num_classes=10, features=(4,), hidden=8)
    params = model.init(jax.random.key(0), data.images("test", 1))["params"]
    classifier.save_classifier(str(tmp_path / "orbax"), model, params, {"test_accuracy": 0.5})
    quality_data.export_classifier(str(tmp_path / "orbax"), str(tmp_path / "c.msgpack"))
    directory = quality_data.classifier_dir(str(tmp_path / "c.msgpack"), str(tmp_path / "new"))
    loaded, loaded_params, metadata = classifier.load_classifier(directory)
    assert (loaded, metadata) == (model, {"test_accuracy": 0.5})
    jax.tree.map(np.testing.assert_array_equal, loaded_params, params)


def test_scores_and_features_match_the_plain_scores(fashion_mnist_dirs, tmp_path):
    """The features handed to the bootstrap are the ones behind the reported distance."""
    from ddpm_jax.evaluation import classifier
    config = tiny_config(fashion_mnist_dirs)
    images = suite.load_split_images(config, "test", 200)
    model = classifier.Classifier(num_classes=10, features=(4,), hidden=8)
    params = model.init(jax.random.key(0), images[:1])["params"]  # an untrained one will do
    classifier.save_classifier(str(tmp_path), model, params, {})
    scorer = suite.ClassifierScorer(str(tmp_path), images)
    scores, features = scorer.scores_and_features(images[:100])
    assert scores == scorer(images[:100])
    assert scores["classifier_fd"] == pytest.approx(fid.frechet_distance(
        fid.feature_statistics(features), scorer.reference), rel=1e-12)


def _write_run(directory, recipes, features, reference, classifier_dir="c.msgpack", **changed):
    """A finished run.py --out_dir: quality.json and features.npz of `features`."""
    import json
    args = {"classifier_dir": classifier_dir, "config": "fashion", "data_npz": "d.npz",
            "override": [], "ema_start": None, "seed": 0, "steps": 1200, "batch_size": 64,
            "steps_per_call": 1, "num_samples": 50, "bootstrap": 20, **changed}
    variants = {name: {"classifier_fd": fid.frechet_distance(fid.feature_statistics(rows),
                                                             reference)}
                for name, rows in features.items()}
    directory.mkdir()
    (directory / "quality.json").write_text(json.dumps({
        "args": args, "variants": variants, "train": {r: {"loss_last_25": 0.1} for r in recipes},
        "reference": "design/raw-ddpm20-eq11" if "design" in recipes else None,
        "recipes": {r: {"config": {"diffusion": {"timesteps": 20}}} for r in recipes},
        "seconds": {"total": 1.0}}))
    np.savez(directory / "features.npz", **features)
    return str(directory)


def test_combined_runs_compare_across_runs_as_one_run(tmp_path):
    """Two runs with the same draws give the comparisons one run of both recipes gives; runs
    that are not paired, share a recipe or were scored with another classifier are refused."""
    from experiments.quality import combine
    rng = np.random.default_rng(2)
    reference = fid.feature_statistics(rng.normal(size=(1000, 4)))
    design = {"design/raw-ddpm20-eq11": rng.normal(size=(50, 4)),
              "design/ema-ddpm20-clip": rng.normal(size=(50, 4))}
    scaled = {"scaled/ema-ddpm20-clip": rng.normal(size=(50, 4)) * 0.8,
              "scaled/ema-dpmpp2m10-clip": rng.normal(size=(50, 4)) * 0.9}
    first = _write_run(tmp_path / "a", ["design"], design, reference)
    second = _write_run(tmp_path / "b", ["scaled"], scaled, reference)
    combined = combine.combine([first, second], reference)
    assert set(combined["recipes"]) == {"design", "scaled"}
    assert combined["reference"] == "design/raw-ddpm20-eq11"
    one_run = quality_variants.compare(quality_variants.PairedBootstrap(reference, 20),
                                       {**design, **scaled}, {"design": 20, "scaled": 20}, None)
    assert combined["comparisons"] == one_run
    across = {(c["a"], c["b"]): c["ratio"] for c in combined["comparisons"]}
    assert across["scaled/ema-ddpm20-clip", "design/raw-ddpm20-eq11"] == pytest.approx(
        combined["variants"]["scaled/ema-ddpm20-clip"]["classifier_fd"]
        / combined["variants"]["design/raw-ddpm20-eq11"]["classifier_fd"], rel=1e-12)
    assert "| scaled/ema-dpmpp2m10-clip |" in quality_variants.table(combined)

    other_budget = _write_run(tmp_path / "c", ["scaled-v"], scaled, reference, steps=400)
    with pytest.raises(ValueError, match="--steps is 1200 in .*a and 400 in .*c"):
        combine.combine([first, other_budget], reference)
    with pytest.raises(ValueError, match="recipe 'design' is in both"):
        combine.combine([first, _write_run(tmp_path / "d", ["design"], design, reference)],
                        reference)
    other = fid.feature_statistics(rng.normal(size=(1000, 4)) + 1.0)
    with pytest.raises(ValueError, match="another classifier or test split"):
        combine.combine([first, _write_run(tmp_path / "e", ["scaled"], scaled, other)],
                        reference)


def test_combine_command_from_the_runs_directory(tmp_path, monkeypatch, capsys):
    """`python -m experiments.quality.combine a b --out_dir=ab` with the runs' relative paths:
    the table of both, and a clear error for a directory without a finished run."""
    from ddpm_jax.evaluation import classifier
    from experiments.quality import combine
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(3)
    arrays = {f"{split}_images": rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
              for split, n in (("train", 10), ("test", 60))}
    np.savez_compressed("d.npz", **arrays)
    test_images = input_pipeline.to_float(arrays["test_images"])
    model = classifier.Classifier(num_classes=10, features=(4,), hidden=8)
    params = model.init(jax.random.key(0), test_images[:1])["params"]
    classifier.save_classifier(str(tmp_path / "orbax"), model, params, {})
    quality_data.export_classifier(str(tmp_path / "orbax"), "c.msgpack")
    scorer = suite.ClassifierScorer(str(tmp_path / "orbax"), test_images)
    features = lambda images: scorer.scores_and_features(images)[1]  # noqa: E731
    _write_run(tmp_path / "a", ["design"], {"design/raw-ddpm20-eq11": features(
        test_images[:50])}, scorer.reference)
    _write_run(tmp_path / "b", ["scaled"], {"scaled/ema-ddpm20-clip": features(
        test_images[10:60])}, scorer.reference)
    combine.main(["a", "b", "--out_dir=ab"])
    written = (tmp_path / "ab" / "table.md").read_text()
    assert "| scaled/ema-ddpm20-clip |" in written and "| design/raw-ddpm20-eq11 |" in written
    with pytest.raises(SystemExit):
        combine.main(["a", "missing", "--out_dir=ab"])
    assert "no quality.json and features.npz of a finished run in: missing" in (
        capsys.readouterr().err)
