"""The Flax FID Inception against a PyTorch reference of pytorch-fid's network.

No real weights exist on this machine, so equality is checked with weights
ported from a randomly initialised reference (`torch_reference/inception.py`), whose
state_dict keys are checked against names known from pytorch-fid's file.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax.traverse_util import flatten_dict

from ddpm_jax.evaluation import inception, suite
from ddpm_jax.models import torch_weights, unet
from ddpm_jax.runtime.parallel import make_mesh
from torch_reference.inception import BasicConv2d, FIDInceptionV3 as TorchFIDInceptionV3
from tests.support.train_helpers import tiny_config

# torchvision's Inception3 without AuxLogits has 94 conv+BN layers: 5 tensors each
# (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var) plus fc.weight, fc.bias.
NUM_PYTORCH_FID_TENSORS = 94 * 5 + 2
KNOWN_PYTORCH_FID_KEYS = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:  # model in eval mode
    """He-normal convolutions and random BatchNorm affine and running statistics.

    The running statistics are those of the layer's own input on a random
    batch, perturbed, so the activations keep an O(1) scale through the 94
    layers (with torch's default init and unit statistics they shrink to
    ~1e-8, where a comparison would test nothing).
    """
    generator = torch.Generator().manual_seed(seed)

    def uniform(shape, low, high):
        return low + (high - low) * torch.rand(shape, generator=generator)

    def calibrate(module, inputs, output):
        x = module.conv(inputs[0])
        mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3))
        module.bn.running_mean.copy_(mean + 0.1 * var.sqrt() * uniform(mean.shape, -1, 1))
        module.bn.running_var.copy_(var * uniform(var.shape, 0.7, 1.4))
        return F.relu(module.bn(x))  # the next layer calibrates on the new statistics

    hooks = []
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BasicConv2d):
                weight = module.conv.weight
                fan_in = weight.shape[1] * weight.shape[2] * weight.shape[3]
                weight.copy_(torch.randn(weight.shape, generator=generator)
                             * math.sqrt(2.0 / fan_in))
                module.bn.weight.copy_(uniform(module.bn.weight.shape, 0.5, 1.5))
                module.bn.bias.copy_(uniform(module.bn.bias.shape, -0.2, 0.2))
                hooks.append(module.register_forward_hook(calibrate))
        model(torch.rand((4, 3, 40, 40), generator=generator))  # calibrates layer by layer
    for hook in hooks:
        hook.remove()


@pytest.fixture(scope="module")
def ported():
    """(torch reference in eval mode, Flax model, ported variables)."""
    torch.manual_seed(0)
    reference = TorchFIDInceptionV3().eval()
    _randomize(reference, seed=1)
    model = inception.FIDInceptionV3()
    variables = torch_weights.inception_variables(reference.state_dict(),
                                                  inception.variables_template(model))
    return reference, model, variables


def _torch_features(reference, images: np.ndarray) -> np.ndarray:
    """pytorch-fid's path: [0, 1] RGB NCHW in, as its dataset feeds PNGs read as RGB."""
    x = torch.from_numpy((images + 1.0) / 2.0).permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    with torch.no_grad():
        return reference(x).numpy()


@pytest.mark.parametrize("shape", [(2, 28, 28, 1), (2, 32, 32, 3)])
def test_features_match_pytorch_reference(ported, shape):
    reference, model, variables = ported
    images = np.random.RandomState(shape[-1]).uniform(-1, 1, shape).astype(np.float32)
    expected = _torch_features(reference, images)
    got = inception.inception_features(model, variables, images)
    assert got.shape == (2, inception.FEATURE_DIM)
    assert 0.05 < np.abs(expected).mean() < 20  # a scale at which a mismatch would show
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-4
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())
    # The two images differ, and so do their features (no collapse to a constant).
    assert np.linalg.norm(got[0] - got[1]) > 0.1 * np.linalg.norm(got[0])


def test_fid_pooling_variants_matter(ported, monkeypatch):
    """torchvision's average pool (padding counted) gives other features: the test above can
    tell pytorch-fid's blocks from torchvision's."""
    reference, _, _ = ported
    images = np.random.RandomState(3).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    fid_features = _torch_features(reference, images)
    avg_pool2d = F.avg_pool2d
    monkeypatch.setattr(F, "avg_pool2d",
                        lambda x, **kw: avg_pool2d(x, **{**kw, "count_include_pad": True}))
    torchvision_features = _torch_features(reference, images)
    assert np.linalg.norm(fid_features - torchvision_features) > 1e-3 * np.linalg.norm(
        fid_features)


@pytest.mark.parametrize("in_shape", [(28, 28), (320, 301), (17, 40)])
def test_resize_matches_torch_interpolate(in_shape):
    images = np.random.RandomState(0).randn(2, *in_shape, 3).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2), size=(299, 299),
                             mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
    got = np.asarray(inception.resize_bilinear(images, 299))
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_state_dict_keys_are_pytorch_fids():
    keys = TorchFIDInceptionV3().state_dict()
    tensors = {k: v.shape for k, v in keys.items() if not k.endswith(".num_batches_tracked")}
    assert len(tensors) == NUM_PYTORCH_FID_TENSORS
    for key, shape in KNOWN_PYTORCH_FID_KEYS.items():
        assert tuple(tensors[key]) == shape, key
    # Every variable of the Flax network has exactly one of these keys; only fc is left over.
    template = inception.variables_template(inception.FIDInceptionV3())
    flax_keys = [torch_weights.inception_key(path) for path in flatten_dict(dict(template))]
    assert len(flax_keys) == len(set(flax_keys))
    assert set(tensors) - set(flax_keys) == {"fc.weight", "fc.bias"}
    assert set(flax_keys) <= set(tensors)


def test_convert_names_first_mismatching_parameter(ported):
    reference, model, _ = ported
    template = inception.variables_template(model)
    original = {k: v.numpy() for k, v in reference.state_dict().items()}
    state_dict = dict(original)
    state_dict["Mixed_6b.branch7x7_2.conv.weight"] = np.zeros((128, 128, 7, 1), np.float32)
    state_dict["Mixed_7c.branch_pool.conv.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    with pytest.raises(ValueError, match=r"'Mixed_6b\.branch7x7_2\.conv\.weight' has shape "
                                         r"\(128, 128, 7, 1\).*expects \(128, 128, 1, 7\)"):
        torch_weights.inception_variables(state_dict, template)

    missing = {k: v for k, v in original.items() if not k.startswith("Mixed_7")}
    with pytest.raises(ValueError, match="lacks .* parameters.*Mixed_7a"):
        torch_weights.inception_variables(missing, template)

    unexpected = {"AuxLogits.conv0.conv.weight": np.zeros((128, 768, 1, 1)), **original}
    with pytest.raises(ValueError, match="'AuxLogits.conv0.conv.weight'.*not in FIDInceptionV3"):
        torch_weights.inception_variables(unexpected, template)


def test_missing_weights_file_says_where_to_get_it(tmp_path):
    path = str(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    with pytest.raises(FileNotFoundError) as error:
        inception.load_inception(path)
    message = str(error.value)
    for needed in (path, inception.FID_WEIGHTS_URL, "--inception_weights",
                   "config.eval.inception_weights"):
        assert needed in message


def test_pth_file_round_trip_and_scorer_inputs(ported, tmp_path):
    """A .pth saved by torch loads to the same variables; the scorer reads pytorch-fid
    statistics files and computes the reference network's features."""
    reference, model, variables = ported
    path = str(tmp_path / "weights.pth")
    torch.save(reference.state_dict(), path)
    loaded_model, loaded = inception.load_inception(path)
    assert loaded_model == model
    np.testing.assert_array_equal(
        np.asarray(loaded["params"]["Mixed_7c"]["branch_pool"]["conv"]["kernel"]),
        np.asarray(variables["params"]["Mixed_7c"]["branch_pool"]["conv"]["kernel"]))

    rng = np.random.RandomState(0)
    stats_path = str(tmp_path / "stats.npz")
    np.savez(stats_path, mu=rng.normal(size=2048), sigma=np.eye(2048))  # pytorch-fid's keys
    scorer = suite.InceptionScorer(path, reference_stats_path=stats_path)
    np.testing.assert_array_equal(scorer.reference.cov, np.eye(2048))
    images = rng.uniform(-1, 1, (2, 28, 28, 1)).astype(np.float32)
    expected = _torch_features(reference, images)
    assert np.linalg.norm(scorer.features(images) - expected) < 1e-4 * np.linalg.norm(expected)


def test_evaluator_reports_inception_fid(ported, fashion_mnist_dirs, tmp_path):
    """config.eval.inception_weights alone (no classifier) gives `inception_fid` against the
    train split, through sampling and the metrics dict. (A 2048-d Fréchet distance takes
    ~15 s on a busy CPU.)"""
    reference, _, _ = ported
    config = tiny_config(fashion_mnist_dirs, sampling__sampler="ddim", sampling__steps=2)
    config.unlock()
    config.eval = suite.default_config()
    config.eval.update(fid_every=10, fid_num_samples=4, fid_reference_images=4,
                       inception_weights=str(tmp_path / "weights.pth"))
    torch.save(reference.state_dict(), config.eval.inception_weights)
    params = unet.create_model(config).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,), jnp.int32))["params"]
    lines = []
    evaluator = suite.Evaluator(config, make_mesh(), log_fn=lines.append)
    scores = evaluator(params, 10)
    assert np.isfinite(scores["eval/inception_fid"]) and scores["eval/inception_fid"] > 0
    assert "eval/classifier_fd" not in scores and "Inception FID" in lines[0]
