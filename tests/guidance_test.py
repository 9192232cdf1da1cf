"""Class-conditional DDPM with classifier-free guidance.

The unconditional network is untouched (its numbers are the PyTorch cross-check
tests'); here: the conditional network is the design's plus a class embedding,
label dropout, the guidance algebra, the samplers' labels and noise, labelled
input, config checks, exact resume and 8-device equality of the conditional
step, and a short real training run whose model uses its labels.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import tiny, tiny_cond
from ddpm_jax import config_validation, diffusion, sampling
from ddpm_jax.data import input_pipeline
from ddpm_jax.evaluation import classifier
from ddpm_jax.models import embeddings, unet
from ddpm_jax.training import loop, train_state, train_step
from ddpm_jax.schedules import make_schedule
from tests.parallel_test import STEPS, _assert_same_run
from tests.support.train_helpers import (REPO, enable_compilation_cache, losses, restored_state,
                                 run_train_py, subprocess_env, tiny_config)

NUM_CLASSES = 10


def _init(config, seed=0):
    model = unet.create_model(config)
    state = train_state.create_train_state(config, model, train_state.make_optimizer(config),
                                           jax.random.key(seed))
    return model, state.params


@pytest.fixture(scope="module")
def models():
    """(unconditional model, its params, conditional model, its params), same init key."""
    return (*_init(tiny.get_config()), *_init(tiny_cond.get_config()))


def _inputs(batch=4, seed=1):
    x = jax.random.normal(jax.random.key(seed), (batch, 28, 28, 1))
    t = jnp.arange(batch, dtype=jnp.int32) * 3
    return x, t


def test_unconditional_network_has_no_class_embedding_and_conditional_adds_only_it(models):
    _, params, _, cond_params = models
    assert "class_emb" not in params
    assert set(cond_params) == set(params) | {"class_emb"}
    table = cond_params["class_emb"]["embedding"]["embedding"]
    assert table.shape == (NUM_CLASSES + 1, 4 * tiny.get_config().model.dim)  # + "no class"
    for a, b in zip(jax.tree.leaves(params),
                    jax.tree.leaves({k: v for k, v in cond_params.items() if k != "class_emb"})):
        assert np.array_equal(a, b)  # the same init for every shared parameter


def test_conditional_network_with_zero_embedding_is_bitwise_the_unconditional(models):
    model, params, cond_model, cond_params = models
    x, t = _inputs()
    zeroed = dict(cond_params, class_emb=jax.tree.map(jnp.zeros_like, cond_params["class_emb"]))
    expected = model.apply({"params": params}, x, t)
    got = cond_model.apply({"params": zeroed}, x, t, jnp.array([0, 3, 9, 10]))
    assert np.array_equal(expected, got)
    varied = cond_model.apply({"params": cond_params}, x, t, jnp.array([0, 3, 9, 10]))
    assert np.abs(varied - expected).max() > 1e-3  # a real embedding changes the prediction


def test_network_refuses_missing_or_unexpected_labels(models):
    model, params, cond_model, cond_params = models
    x, t = _inputs()
    with pytest.raises(ValueError, match="num_classes=10 needs int labels"):
        cond_model.apply({"params": cond_params}, x, t)
    with pytest.raises(ValueError, match="unconditional network"):
        model.apply({"params": params}, x, t, jnp.zeros(4, jnp.int32))


def test_label_dropout_rate_and_null_row():
    n, rate = 10_000, 0.1
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(7), i))(jnp.arange(n))
    labels = jnp.arange(n, dtype=jnp.int32) % NUM_CLASSES
    dropped = np.asarray(train_step.drop_labels(labels, keys, rate, NUM_CLASSES))
    is_null = dropped == embeddings.null_label(NUM_CLASSES)
    sigma = np.sqrt(rate * (1 - rate) / n)
    assert abs(is_null.mean() - rate) < 4 * sigma, is_null.mean()
    np.testing.assert_array_equal(dropped[~is_null], np.asarray(labels)[~is_null])
    assert not np.any(np.asarray(train_step.drop_labels(labels, keys, 0.0, NUM_CLASSES)) == 10)
    assert np.all(np.asarray(train_step.drop_labels(labels, keys, 1.0, NUM_CLASSES)) == 10)


def test_guidance_algebra(models):
    _, _, cond_model, cond_params = models
    apply = sampling.ModelApply(cond_model)
    x, t = _inputs()
    labels = jnp.array([1, 4, 7, 2], jnp.int32)
    null = jnp.full(4, NUM_CLASSES, jnp.int32)
    conditional = apply(cond_params, x, t, labels)
    unconditional = apply(cond_params, x, t, null)
    np.testing.assert_array_equal(apply(cond_params, x, t), unconditional)  # no labels: null

    def guided(w):
        return diffusion.guided_denoise_fn(lambda *a: apply(cond_params, *a), NUM_CLASSES,
                                           w)(x, t, labels)
    # One batched call of 2B equals the two separate calls (up to the batch size's rounding).
    np.testing.assert_allclose(guided(0.0), conditional, rtol=0, atol=1e-5)
    for w in (1.0, 2.5):
        np.testing.assert_allclose(guided(w), (1 + w) * conditional - w * unconditional,
                                   rtol=0, atol=1e-4)
    assert np.abs(guided(2.5) - conditional).max() > 1e-3


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp"])
def test_guided_samples_keep_each_images_noise(models, sampler):
    """With a class embedding that is zero, eps(x, c) = eps(x, none): any guidance scale must
    then give the unconditional network's images from the same seed (the same noise)."""
    model, params, cond_model, cond_params = models
    zeroed = dict(cond_params, class_emb=jax.tree.map(jnp.zeros_like, cond_params["class_emb"]))
    schedule = make_schedule("linear", 20)
    common = dict(seed=3, sampler=sampler, steps=5)
    plain = sampling.generate(sampling.ModelApply(model), params, schedule, (28, 28, 1), 6,
                              **common).images
    labels = np.array([0, 1, 2, 3, 4, 5])
    for w in (0.0, 3.0):
        guided = sampling.generate(sampling.ModelApply(cond_model), zeroed, schedule,
                                   (28, 28, 1), 6, labels=labels, guidance=w, **common).images
        np.testing.assert_allclose(guided, plain, rtol=0, atol=1e-3)
    # With the real embedding, image i is a function of its own label only: sampled alone
    # (another chunk, another batch) it is the same image.
    apply = sampling.ModelApply(cond_model)
    batch = sampling.generate(apply, cond_params, schedule, (28, 28, 1), 6, labels=labels,
                              guidance=2.0, **common).images
    alone = sampling.generate(apply, cond_params, schedule, (28, 28, 1), 6, labels=labels,
                              guidance=2.0, chunk_size=1, **common).images
    np.testing.assert_allclose(batch, alone, rtol=0, atol=1e-4)
    assert np.abs(batch - plain).max() > 1e-2


def test_generate_and_class_label_requests_are_checked(models):
    model, params, cond_model, cond_params = models
    schedule = make_schedule("linear", 20)
    with pytest.raises(ValueError, match="unconditional"):
        sampling.generate(sampling.ModelApply(model), params, schedule, (28, 28, 1), 2,
                          labels=[0, 1])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 9\]"):
        sampling.generate(sampling.ModelApply(cond_model), cond_params, schedule, (28, 28, 1),
                          2, labels=[0, 11])
    labels, per_row = sampling.class_labels("all", 10, 64)
    assert per_row == 6 and labels.tolist() == np.repeat(np.arange(10), 6).tolist()
    labels, per_row = sampling.class_labels("3,5", 10, 8)
    assert per_row == 4 and labels.tolist() == [3] * 4 + [5] * 4
    assert sampling.class_labels("7", 10, 5)[0].tolist() == [7] * 5
    for bad in ("10", "x", "1,,2", "-1"):
        with pytest.raises(ValueError, match="a class in 0..9"):
            sampling.class_labels(bad, 10, 4)
    with pytest.raises(ValueError, match="unconditional"):
        sampling.class_labels("1", 0, 4)


def test_sample_grid_has_one_row_per_class():
    labels = loop.sample_grid_labels(10, 25)
    assert labels.tolist() == np.repeat(np.arange(10), 2).tolist()
    assert loop.sample_grid_labels(0, 25) is None


def test_config_checks_labels_before_anything_compiles(tmp_path):
    config = tiny_cond.get_config()
    config.model.num_classes = 7
    with pytest.raises(config_validation.ConfigError, match="fashion_mnist has 10 classes"):
        config_validation.validate_config(config)
    config.model.num_classes = 10
    config.training.label_dropout = 1.5
    with pytest.raises(config_validation.ConfigError, match="training.label_dropout"):
        config_validation.validate_config(config)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("L", (8, 8)).save(flat / "a.png")
    config = tiny_cond.get_config()
    config.data.dataset, config.data.folder = "folder", str(flat)
    with pytest.raises(config_validation.ConfigError, match="no class subfolders"):
        config_validation.validate_config(config)


def test_folder_labels_follow_imagefolder(tmp_path):
    for name, count in (("cat", 2), ("ant", 1), ("dog", 3)):
        (tmp_path / name).mkdir()
        for i in range(count):
            Image.new("L", (8, 8), color=40 * i).save(tmp_path / name / f"{i}.png")
    (tmp_path / "dog" / "broken.png").write_bytes(b"not an image")
    source = input_pipeline.open_source("folder", image_size=8, channels=1,
                                        folder=str(tmp_path), folder_labels=True)
    images, labels = source.read_labeled(range(len(source)))
    assert labels.tolist() == [0, 1, 1, 2, 2, 2]  # ant, cat, dog (sorted), unreadable dropped
    assert images.shape == (6, 8, 8, 1)
    config = tiny_cond.get_config()
    config.data.dataset, config.data.folder, config.model.num_classes = "folder", str(tmp_path), 2
    with pytest.raises(config_validation.ConfigError, match="has 3 class subfolders"):
        config_validation.validate_config(config)
    unlabeled = input_pipeline.open_source("folder", image_size=8, channels=1,
                                           folder=str(tmp_path))
    with pytest.raises(ValueError, match="no labels"):
        unlabeled.read_labeled([0])


def test_labeled_batches_carry_the_images_labels(fashion_mnist_dirs):
    source = input_pipeline.open_source("fashion_mnist", image_size=28, channels=1,
                                        data_dir=fashion_mnist_dirs.data_dir)
    images, labels = input_pipeline.train_batch(source, 32, 0, 5, random_flip=True, with_labels=True)
    plain = input_pipeline.train_batch(source, 32, 0, 5, random_flip=True)
    np.testing.assert_array_equal(images, plain)  # the unconditional batch, bit for bit
    indices = input_pipeline.global_batch_indices(len(source), 32, 0, 5)
    np.testing.assert_array_equal(labels, source.read_labeled(indices)[1])


@pytest.fixture(scope="module")
def conditional_run(fashion_mnist_dirs, tmp_path_factory):
    """STEPS conditional steps on one device, uninterrupted: (config, losses, params, state,
    workdir)."""
    enable_compilation_cache()
    workdir = tmp_path_factory.mktemp("conditional")
    config = tiny_config(fashion_mnist_dirs, training__num_train_steps=STEPS,
                         training__log_every=1, training__checkpoint_every=2,
                         model__num_classes=NUM_CLASSES, training__label_dropout=0.5)
    result = loop.train(config, str(workdir))
    state = jax.tree.map(np.asarray, result.state)
    return config, losses(workdir), state.params, state, workdir


@pytest.mark.slow
def test_conditional_resume_is_bitwise_exact_and_grids_show_a_row_per_class(conditional_run,
                                                                           tmp_path):
    config, reference_losses, _, reference_state, _ = conditional_run
    first = config.copy_and_resolve_references()
    first.training.num_train_steps = STEPS // 2
    first.training.sample_every, first.training.num_sample_images = STEPS // 2, 20
    loop.train(first, str(tmp_path))
    grid = Image.open(tmp_path / "samples" / f"step_{STEPS // 2:07d}.png")
    assert grid.size == (2 + 2 * 30, 2 + 10 * 30)  # one row of two per class
    loop.train(config, str(tmp_path))
    state, step = restored_state(tmp_path, config)
    assert step == STEPS
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(reference_state)):
        assert np.array_equal(a, b)
    assert losses(tmp_path) == reference_losses


@pytest.mark.slow
def test_conditional_steps_per_call_follow_single_steps(conditional_run, tmp_path):
    """Images and labels stacked for k = 2 steps per call: the run follows the single-step
    one to float32 rounding (a scanned step compiles differently: docs/speed.md)."""
    config, reference_losses, params, _, _ = conditional_run
    config = config.copy_and_resolve_references()
    config.training.steps_per_call = 2
    config.training.log_every = 2
    result = loop.train(config, str(tmp_path))
    assert result.step == STEPS
    got = losses(tmp_path)
    for step, loss in got.items():  # rows are means over the 2 steps of each call
        expected = np.mean([reference_losses[step - 1], reference_losses[step]])
        np.testing.assert_allclose(loss, expected, rtol=1e-4)
    # Adam moves each weight by up to lr a step whatever the gradient's size, so rounding-level
    # gradient differences bound the weights' only by lr x steps.
    bound = config.optim.learning_rate * STEPS
    for a, b in zip(jax.tree.leaves(jax.tree.map(np.asarray, result.state.params)),
                    jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, rtol=0, atol=bound)


@pytest.mark.slow
@pytest.mark.subprocess
def test_conditional_step_on_eight_devices_matches_one(conditional_run, tmp_path):
    config, reference_losses, params, _, _ = conditional_run
    env = subprocess_env("--xla_force_host_platform_device_count=8")
    result = run_train_py(config, tmp_path, env, ["--config.model.num_classes=10"])
    assert result.returncode == 0, result.stdout[-3000:]
    assert "on 8 device(s), 1 process(es)" in result.stdout
    _assert_same_run(tmp_path, config, reference_losses, params)


def _command(script, *args, expect_ok=True):
    done = subprocess.run([sys.executable, script, *args], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert (done.returncode == 0) == expect_ok, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
@pytest.mark.subprocess
def test_sample_command_one_class_per_row(conditional_run, tmp_path):
    workdir = conditional_run[4]
    fast = ["--sampler=ddim", "--ddim_steps=2", f"--workdir={workdir}"]
    _command("sample.py", "--sampler=dpmpp", "--steps=20", f"--workdir={workdir}",
             "--class_label=all", "--num_images=20", "--guidance=1.5",
             f"--output={tmp_path / 'grid.png'}", f"--save_npz={tmp_path / 's.npz'}")
    saved = np.load(tmp_path / "s.npz")
    assert saved["labels"].tolist() == np.repeat(np.arange(10), 2).tolist()
    assert float(saved["guidance"]) == 1.5
    # T = 20: 21 points from 19 to 0 round to 20 distinct timesteps, t = 0 left to the end.
    assert str(saved["sampler"]) == "dpmpp" and int(saved["steps"]) == 19
    width, height = Image.open(tmp_path / "grid.png").size
    assert (width, height) == (2 + 2 * 30, 2 + 10 * 30)  # 2 columns, one row per class
    done = _command("sample.py", *fast, "--class_label=10", expect_ok=False)
    assert "--class_label: '10' is not a class in 0..9" in done.stderr


@pytest.mark.slow
@pytest.mark.subprocess
def test_evaluate_command_sweeps_guidance(conditional_run, tmp_path):
    """Every per-class number and the curve from one command (an untrained classifier: the
    numbers are checked for consistency, their values by the long run in docs/conditional.md)."""
    workdir = conditional_run[4]
    model = classifier.Classifier()
    untrained = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"]
    classifier.save_classifier(str(tmp_path / "classifier"), model, untrained, {})
    output, curve = tmp_path / "eval.json", tmp_path / "curve.png"
    _command("evaluate.py", f"--workdir={workdir}", "--fid_samples=40", "--guidance=0,2",
             "--sampler=ddim", "--ddim_steps=2", "--fid_reference_images=500",
             f"--classifier_dir={tmp_path / 'classifier'}", f"--output={output}",
             f"--curve={curve}")
    record = json.loads(output.read_text())
    sweep = record["guidance_sweep"]
    assert sorted(sweep) == ["0", "2"] and record["guidance_curve"] == str(curve)
    for w, scores in sweep.items():
        assert scores["guidance"] == float(w)
        per_class = [scores[f"class_accuracy_{k}"] for k in range(10)]
        assert scores["class_accuracy"] == pytest.approx(np.mean(per_class))  # 4 of each
        assert all(scores[f"classifier_fd_{k}"] > 0 for k in range(10))
        assert scores["classifier_fd"] > 0
    assert Image.open(curve).size == (640, 300)
    assert os.listdir(workdir / "eval" / "tensorboard")


@pytest.mark.slow
def test_a_short_real_run_learns_to_use_its_labels(fashion_mnist_dirs, tmp_path):
    """200 steps of the tiny conditional model (T = 200) on real Fashion-MNIST: its denoising
    loss on noisy test images (t >= 100) is lower with their true labels than with wrong ones,
    by more than 4 standard errors of the paired per-image difference. (Class accuracy of
    samples needs a longer run: docs/conditional.md.)"""
    enable_compilation_cache()
    config = tiny_config(fashion_mnist_dirs, training__num_train_steps=200,
                         training__checkpoint_every=200, training__log_every=50,
                         model__num_classes=NUM_CLASSES, diffusion__timesteps=200)
    params = loop.train(config, str(tmp_path)).state.params
    test = input_pipeline.open_source("fashion_mnist", "test", image_size=28, channels=1,
                                      data_dir=fashion_mnist_dirs.data_dir)
    images, labels = input_pipeline.load_labeled(test, 512)
    apply = sampling.ModelApply(unet.create_model(config))
    schedule = make_schedule("linear", config.diffusion.timesteps)
    t = jax.random.randint(jax.random.key(1), (512,), 100, 200)
    noise = jax.random.normal(jax.random.key(0), images.shape)

    @jax.jit  # everything as arguments: closed-over arrays would be constant-folded
    def per_image_loss(params, images, noise, y):
        x_t = diffusion.q_sample(schedule, images, t, noise)
        return jnp.mean((apply(params, x_t, t, y) - noise) ** 2, axis=(1, 2, 3))
    true = per_image_loss(params, images, noise, labels)
    wrong = per_image_loss(params, images, noise, (labels + 5) % NUM_CLASSES)
    gain = np.asarray(wrong - true, np.float64)  # paired: same image, time and noise
    stderr = gain.std(ddof=1) / np.sqrt(len(gain))
    assert gain.mean() > 4 * stderr, (gain.mean(), stderr)
