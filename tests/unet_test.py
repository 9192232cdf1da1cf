"""The Flax UNet against the design's PyTorch UNet: every block, the whole net, gradients.

Weights come from randomly initialised PyTorch modules through the converter;
images are non-square so that a transposed height/width would show.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import linen as nn
from flax import traverse_util

from ddpm_jax.models import unet, unet_checks
from ddpm_jax.models.torch_weights import abstract_params, torch_to_flax
from torch_reference import unet as ref

pytestmark = pytest.mark.newest_stack

ATOL = 1e-5       # forward outputs, float32
GRAD_RTOL = 1e-4  # gradients, relative to each tensor's largest PyTorch gradient
FASHION = dict(dim=28, dim_mults=(1, 2, 4), channels=1)
CIFAR = dict(dim=128, dim_mults=(1, 2, 2, 2), channels=3, use_convnext=False)
FASHION_ARCH = {k: v for k, v in FASHION.items() if k != "channels"}
CIFAR_ARCH = {k: v for k, v in CIFAR.items() if k != "channels"}
TINY_CONVNEXT = dict(dim=8, dim_mults=(1, 2), channels=3)
TINY_RESNET = dict(dim=8, dim_mults=(1, 2), channels=3, use_convnext=False, resnet_block_groups=4)
TIMESTEPS = [0, 57, 199]


@pytest.fixture(autouse=True)
def _seed():
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)


def _nhwc(x: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(x.detach().numpy().transpose(0, 2, 3, 1))


def _torch_nhwc(y: torch.Tensor) -> np.ndarray:
    return y.detach().numpy().transpose(0, 2, 3, 1)


def _port(torch_module, flax_module, *inputs):
    template = jax.eval_shape(flax_module.init, jax.random.key(0), *inputs)["params"]
    return torch_to_flax(torch_module.state_dict(), template)


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("config", [FASHION, CIFAR], ids=["fashion_convnext", "cifar_resnet"])
def test_parameter_count_matches_pytorch(config):
    torch_count = sum(p.numel() for p in ref.Unet(**config).parameters())
    assert _count(abstract_params(unet.Unet(**config))) == torch_count
    if config is FASHION:
        assert torch_count == 2_996_315  # the design's network, minus signs restored


def test_sinusoidal_embeddings_match_pytorch():
    t = torch.tensor([0, 1, 57, 199, 999])
    expected = ref.SinusoidalPositionEmbeddings(28)(t).numpy()
    got = unet.SinusoidalPositionEmbeddings(28)(jnp.asarray(t.numpy(), jnp.int32))
    assert got.shape == (5, 28)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


# name -> (PyTorch module, Flax module, input channels, time embedding width or None)
BLOCKS = {
    "Block": (lambda: ref.Block(8, 16, groups=8), lambda: unet.Block(16, groups=8), 8, None),
    "ResnetBlock": (lambda: ref.ResnetBlock(8, 16, time_emb_dim=32, groups=4),
                    lambda: unet.ResnetBlock(16, groups=4), 8, 32),
    "ResnetBlock_identity_residual": (lambda: ref.ResnetBlock(16, 16, groups=8),
                                      lambda: unet.ResnetBlock(16, groups=8), 16, None),
    "ConvNextBlock": (lambda: ref.ConvNextBlock(8, 16, time_emb_dim=32, mult=2),
                      lambda: unet.ConvNextBlock(16, mult=2), 8, 32),
    "ConvNextBlock_no_norm_identity_residual": (
        lambda: ref.ConvNextBlock(16, 16, mult=3, norm=False),
        lambda: unet.ConvNextBlock(16, mult=3, norm=False), 16, None),
    "DepthwiseConv": (lambda: torch.nn.Conv2d(8, 8, 7, padding=3, groups=8),
                      lambda: unet.DepthwiseConv(7), 8, None),
    "Attention": (lambda: ref.Attention(8), lambda: unet.Attention(), 8, None),
    "LinearAttention": (lambda: ref.LinearAttention(8), lambda: unet.LinearAttention(), 8, None),
    "Residual_PreNorm_LinearAttention": (
        lambda: ref.Residual(ref.PreNorm(8, ref.LinearAttention(8))),
        lambda: unet.Residual(unet.PreNorm(unet.LinearAttention())), 8, None),
    "Downsample": (lambda: ref.Downsample(8), lambda: unet.Downsample(8), 8, None),
    "Upsample": (lambda: ref.Upsample(8), lambda: unet.Upsample(8), 8, None),
}


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_block_matches_pytorch(name):
    make_torch, make_flax, channels, time_dim = BLOCKS[name]
    torch_block, flax_block = make_torch(), make_flax()
    x = torch.randn(3, channels, 8, 6) * 2
    torch_args, flax_args = [x], [_nhwc(x)]
    if time_dim is not None:
        emb = torch.randn(3, time_dim)
        torch_args.append(emb)
        flax_args.append(jnp.asarray(emb.numpy()))
    params = _port(torch_block, flax_block, *flax_args)
    expected = _torch_nhwc(torch_block(*torch_args))
    got = flax_block.apply({"params": params}, *flax_args)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def _ported_unet(config, batch=3, height=4, width=6, timesteps=TIMESTEPS):
    """PyTorch and Flax Unets with the same (PyTorch-initialised) weights, and inputs."""
    torch_model = ref.Unet(**config)
    model = unet.Unet(**config)
    params = torch_to_flax(torch_model.state_dict(), abstract_params(model))
    x = torch.randn(batch, config["channels"], height, width)
    t = torch.tensor(timesteps)
    return torch_model, model, params, x, t


@pytest.mark.parametrize("config", [
    TINY_CONVNEXT,
    TINY_RESNET,
    dict(dim=12, init_dim=10, out_dim=2, dim_mults=(1, 2), channels=1, with_time_emb=False),
], ids=["convnext", "resnet", "no_time_emb_init_dim_out_dim"])
def test_unet_matches_pytorch(config):
    torch_model, model, params, x, t = _ported_unet(config)
    expected = _torch_nhwc(torch_model(x, t))
    got = jax.jit(model.apply)({"params": params}, _nhwc(x), jnp.asarray(t.numpy(), jnp.int32))
    assert got.shape == expected.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def test_fashion_mnist_unet_matches_pytorch():
    torch_model, model, params, x, t = _ported_unet(FASHION, batch=2, height=28, width=28,
                                                     timesteps=[3, 150])
    expected = _torch_nhwc(torch_model(x, t))
    got = jax.jit(model.apply)({"params": params}, _nhwc(x), jnp.asarray(t.numpy(), jnp.int32))
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("config", [TINY_CONVNEXT, TINY_RESNET], ids=["convnext", "resnet"])
def test_loss_gradients_match_pytorch(config):
    """Gradients of the huber loss (smooth_l1, the design's) w.r.t. every parameter."""
    torch_model, model, params, x, t = _ported_unet(config)
    target = torch.randn(x.shape) * 1.5  # wide enough that both huber branches occur
    torch_loss = F.smooth_l1_loss(target, torch_model(x, t))
    torch_loss.backward()
    torch_grads = torch_to_flax({k: p.grad for k, p in torch_model.named_parameters()},
                                abstract_params(model))

    def loss_fn(p):
        diff = model.apply({"params": p}, _nhwc(x), jnp.asarray(t.numpy(), jnp.int32)) - \
            _nhwc(target)
        abs_diff = jnp.abs(diff)
        return jnp.mean(jnp.where(abs_diff < 1.0, 0.5 * diff ** 2, abs_diff - 0.5))

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    assert float(loss) == pytest.approx(torch_loss.item(), rel=1e-5)
    expected = traverse_util.flatten_dict(torch_grads)
    got = traverse_util.flatten_dict(grads)
    assert got.keys() == expected.keys()
    for path, g in expected.items():
        g = np.asarray(g)
        scale = np.abs(g).max()
        assert scale > 0, path
        rel = np.abs(np.asarray(got[path]) - g).max() / scale
        assert rel < GRAD_RTOL, (path, rel)


@pytest.mark.parametrize("torch_layer, flax_layer, in_channels", [
    (lambda: ref.ConvNextBlock(16, 32, time_emb_dim=64), lambda: unet.ConvNextBlock(32), 16),
    (lambda: ref.ResnetBlock(16, 32, time_emb_dim=64), lambda: unet.ResnetBlock(32), 16),
    (lambda: ref.Upsample(32), lambda: unet.Upsample(32), 32),
    (lambda: ref.Downsample(32), lambda: unet.Downsample(32), 32),
    (lambda: ref.Attention(32), lambda: unet.Attention(), 32),
], ids=["convnext", "resnet", "upsample", "downsample", "attention"])
def test_initialisation_follows_pytorch_defaults(torch_layer, flax_layer, in_channels):
    """Each parameter's mean and spread are those of PyTorch's default init, so training
    from scratch starts where the design's does."""
    x, emb = jnp.zeros((1, 4, 4, in_channels)), jnp.zeros((1, 64))
    layer = flax_layer()
    args = (x, emb) if isinstance(layer, (unet.ConvNextBlock, unet.ResnetBlock)) else (x,)
    flax_init = traverse_util.flatten_dict(jax.jit(layer.init)(jax.random.key(1), *args)["params"])
    torch_init = traverse_util.flatten_dict(_port(torch_layer(), layer, *args))
    assert flax_init.keys() == torch_init.keys()
    for path, expected in torch_init.items():
        expected, got = np.asarray(expected), np.asarray(flax_init[path])
        if expected.size < 32:  # too few values for a stable spread
            continue
        spread = np.std(expected)
        assert np.std(got) == pytest.approx(spread, rel=0.25, abs=1e-7), path
        assert abs(np.mean(got) - np.mean(expected)) <= 0.5 * spread + 1e-7, path
        assert np.abs(got).max() <= np.abs(expected).max() * 1.1 + 1e-7, path


def test_dropout_acts_only_in_train_mode_with_an_rng():
    config = dict(dim=8, dim_mults=(1,), channels=1)
    _, model, params, x, t = _ported_unet(config)
    x, t = _nhwc(x), jnp.asarray(t.numpy(), jnp.int32)
    no_dropout = model.apply({"params": params}, x, t)
    model = model.clone(dropout=0.3)
    np.testing.assert_array_equal(model.apply({"params": params}, x, t), no_dropout)

    def train(key):
        return model.apply({"params": params}, x, t, train=True,
                           rngs={"dropout": jax.random.key(key)})

    first, again, other = train(1), train(1), train(2)
    np.testing.assert_array_equal(first, again)
    assert float(jnp.abs(first - no_dropout).max()) > 1e-2
    assert float(jnp.abs(first - other).max()) > 1e-2
    # Without dropout, train mode changes nothing and needs no rng.
    np.testing.assert_array_equal(
        model.clone(dropout=0.0).apply({"params": params}, x, t, train=True), no_dropout)


@pytest.mark.parametrize("torch_block, block", [
    (lambda: ref.ResnetBlock(8, 16, time_emb_dim=32, groups=4),
     unet.ResnetBlock(16, groups=4, dropout=1.0)),
    (lambda: ref.ConvNextBlock(8, 16, time_emb_dim=32), unet.ConvNextBlock(16, dropout=1.0)),
], ids=["resnet", "convnext"])
def test_dropout_sits_inside_the_residual_branch(torch_block, block):
    """With everything dropped, the branch no longer depends on x: output - res_conv(x) is
    the same for any x, so dropout cuts block1 (ResNet) / the first conv (ConvNeXt) off."""
    x1, x2 = _nhwc(torch.randn(2, 8, 4, 6)), _nhwc(torch.randn(2, 8, 4, 6))
    emb = jnp.asarray(torch.randn(2, 32).numpy())
    params = _port(torch_block(), block, x1, emb)

    def branch(x, train):
        out = block.apply({"params": params}, x, emb, train=train,
                          rngs={"dropout": jax.random.key(4)})
        return out - nn.Conv(16, (1, 1)).apply({"params": params["res_conv"]}, x)

    np.testing.assert_allclose(branch(x1, True), branch(x2, True), rtol=0, atol=1e-5)
    assert float(jnp.abs(branch(x1, False) - branch(x2, False)).max()) > 1e-2


@pytest.mark.parametrize("config", [TINY_CONVNEXT, TINY_RESNET], ids=["convnext", "resnet"])
def test_bfloat16_compute_stays_close_to_float32(config):
    """bfloat16 activations, float32 parameters and output, against PyTorch's float32."""
    torch_model, model, params, x, t = _ported_unet(config)
    full = _torch_nhwc(torch_model(x, t))
    half_model = model.clone(dtype=jnp.bfloat16)
    x, t = _nhwc(x), jnp.asarray(t.numpy(), jnp.int32)
    abstract = jax.eval_shape(half_model.init, jax.random.key(0), x, t)["params"]
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(abstract))
    apply = jax.jit(functools.partial(half_model.apply, capture_intermediates=True))
    half, state = apply({"params": params}, x, t)
    assert half.dtype == jnp.float32
    assert state["intermediates"]["mid_block1"]["__call__"][0].dtype == jnp.bfloat16
    rel_rms = float(jnp.sqrt(jnp.mean((half - full) ** 2) / jnp.mean(full ** 2)))
    assert 0 < rel_rms < 0.05


def test_image_size_that_cannot_be_halved_is_rejected():
    model = unet.Unet(**FASHION)
    with pytest.raises(ValueError, match=r"30x30 .*multiples of 4 \(nearest to 30: 28 or 32\)"):
        model.init(jax.random.key(0), jnp.zeros((1, 30, 30, 1)), jnp.zeros((1,), jnp.int32))
    with pytest.raises(ValueError, match=r"28x6 .*multiples of 4 \(nearest to 6: 4 or 8\)"):
        unet_checks.validate_unet_config((28, 6), **FASHION_ARCH)
    unet_checks.validate_unet_config(28, **FASHION_ARCH)
    unet_checks.validate_unet_config((32, 12), **FASHION_ARCH)


def test_wrong_input_shapes_are_rejected():
    init = jax.random.key(0)
    with pytest.raises(ValueError, match=r"channels=1.*\(1, 28, 28, 3\)"):
        unet.Unet(**FASHION).init(init, jnp.zeros((1, 28, 28, 3)), jnp.zeros((1,), jnp.int32))
    with pytest.raises(ValueError, match=r"time must be .*\(2,\), got shape \(2, 1\)"):
        unet.Unet(**FASHION).init(init, jnp.zeros((2, 28, 28, 1)), jnp.zeros((2, 1), jnp.int32))


@pytest.mark.parametrize("kwargs, message", [
    (dict(dim=28, dim_mults=(1, 2, 4), use_convnext=False, resnet_block_groups=8),
     r"resnet_block_groups=8 does not divide 28.*\[1, 2, 4, 7, 14, 28\]"),
    (dict(dim=16, dim_mults=(2, 4)), r"dim_mults\[0\] must be 1"),
    (dict(dim=15, dim_mults=(1, 2)), r"even.*dim=15"),
    (dict(dim=16, dim_mults=(1, 2), dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(dim=16, dim_mults=()), r"non-empty"),
], ids=["groups", "first_mult", "odd_dim", "dropout", "no_levels"])
def test_bad_architecture_is_rejected_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        unet.Unet(**kwargs)
    with pytest.raises(ValueError, match=message):
        unet_checks.validate_unet_config(32, **kwargs)


def test_groups_that_divide_every_channel_count_are_accepted():
    unet_checks.validate_unet_config(32, **CIFAR_ARCH)
    unet_checks.validate_unet_config(28, dim=28, dim_mults=(1, 2, 4), use_convnext=False,
                                     resnet_block_groups=7)
    unet_checks.validate_unet_config(28, dim=28, dim_mults=(1, 2, 4), with_time_emb=False,
                                     init_dim=5)
