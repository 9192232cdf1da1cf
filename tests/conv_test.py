"""ddpm_jax.models.conv's CPU formulations equal the lax convolutions they replace, value and gradient."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models import conv


def _reference(x, kernel, bias):
    """What flax nn.Conv(C, (K, K), padding=K // 2, feature_group_count=C) computes."""
    p = kernel.shape[0] // 2
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), [(p, p)] * 2,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=x.shape[-1])
    return y + bias


def _inputs(shape, k, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = rng.standard_normal(shape, dtype=np.float32)
    kernel = rng.standard_normal((k, k, 1, c), dtype=np.float32) / k
    bias = rng.standard_normal((c,), dtype=np.float32)
    ct = rng.standard_normal(shape, dtype=np.float32)
    return tuple(map(jnp.asarray, (x, kernel, bias, ct)))


def _float64_reference(x, kernel, bias, ct):
    """Output and gradients wrt (x, kernel, bias) of the depthwise conv, in float64 numpy."""
    x, kernel, bias, ct = (np.asarray(a, np.float64) for a in (x, kernel, bias, ct))
    k = kernel.shape[0]
    p = k // 2
    h, w = x.shape[1:3]
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    ctp = np.pad(ct, ((0, 0), (p, p), (p, p), (0, 0)))
    y = bias + sum(xp[:, i:i + h, j:j + w] * kernel[i, j, 0] for i in range(k) for j in range(k))
    dx = sum(ctp[:, i:i + h, j:j + w] * kernel[k - 1 - i, k - 1 - j, 0]
             for i in range(k) for j in range(k))
    dk = np.array([[(xp[:, i:i + h, j:j + w] * ct).sum((0, 1, 2)) for j in range(k)]
                   for i in range(k)])[:, :, None, :]
    return (y, dx, dk, ct.sum((0, 1, 2)))


def _rel_err(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    return np.abs(actual - expected).max() / np.abs(expected).max()


def _assert_close(actual, expected, rtol):
    """Relative to the largest magnitude: float32 rounding of a reordered sum."""
    err = _rel_err(actual, expected)
    assert err < rtol, err


# Shapes of the Fashion-MNIST network (odd batch and channel counts included) and
# a 3x3 kernel on a non-square image.
# Both gradients: the CPU's cache-blocked one and XLA's autodiff (used on GPU).
@pytest.mark.parametrize("cache_blocked_grad", [True, False])
@pytest.mark.parametrize("shape,k", [((6, 28, 28, 18), 7), ((4, 14, 14, 56), 7),
                                     ((5, 7, 7, 224), 7), ((3, 9, 11, 5), 3)])
def test_value_and_gradients_match_lax_conv(shape, k, cache_blocked_grad):
    x, kernel, bias, ct = _inputs(shape, k)
    y_ref, vjp_ref = jax.vjp(_reference, x, kernel, bias)
    f = functools.partial(conv.depthwise_conv2d, cache_blocked_grad=cache_blocked_grad)
    y, vjp = jax.jit(lambda *a: jax.vjp(f, *a))(x, kernel, bias)
    exact = _float64_reference(x, kernel, bias, ct)
    for got, want, true in zip((y, *vjp(ct)), (y_ref, *vjp_ref(ct)), exact):
        # Float32 rounding only: close to XLA's own conv, and about as close to float64:
        # within 2x XLA's error, or the sqrt(n) * 2^-24 typical of a float32 sum of n
        # terms (the kernel gradient sums n = B*H*W products; XLA's own conv is off by
        # 1.5e-6 there with its default flags, by 3.8e-7 with YNN fusions off).
        _assert_close(got, want, 5e-6)
        n_terms = shape[0] * shape[1] * shape[2]
        assert _rel_err(got, true) <= max(2 * _rel_err(want, true), np.sqrt(n_terms) * 2.0 ** -24)


def test_bfloat16_input_is_accumulated_in_float32():
    # Accumulated in float32, only two roundings to bfloat16 remain (the sum, then the
    # bias add), each <= 2^-8 of the largest value: 4.2e-3 here, as XLA's own bfloat16
    # conv. The 49 products summed in bfloat16 would be off by 9.8e-3.
    x, kernel, bias, _ = _inputs((4, 14, 14, 56), 7)
    x16, kernel16, bias16 = (a.astype(jnp.bfloat16) for a in (x, kernel, bias))
    exact = _float64_reference(x16, kernel16, bias16, x16)[0]
    for blocked in (True, False):
        y = jax.jit(functools.partial(conv.depthwise_conv2d, cache_blocked_grad=blocked))(
            x16, kernel16, bias16)
        assert y.dtype == jnp.bfloat16
        assert _rel_err(y, exact) <= 2.0 ** -7


# Both layouts of the kernel gradient (flat from _FLAT_MIN_WIDTH = 14), each with images
# larger than its chunk: one image per chunk, two chunks.
@pytest.mark.parametrize("shape", [(2, 64, 64, 40), (2, 13, 13, 400)])
def test_kernel_gradient_sums_over_several_chunks(shape):
    x, kernel, _, ct = _inputs(shape, 7)
    assert conv._chunk_size(x) == 1 and conv._chunk_size(x, conv._FLAT_CHUNK_BYTES) == 1
    dk = conv._kernel_grad(x, ct, 7)
    dk_first = conv._kernel_grad(x[:1], ct[:1], 7)
    dk_second = conv._kernel_grad(x[1:], ct[1:], 7)
    _assert_close(dk, dk_first + dk_second, 1e-6)


def test_grad_under_jit_matches_lax_conv():
    x, kernel, bias, _ = _inputs((2, 7, 7, 3), 7)
    loss = lambda k: jnp.sum(conv.depthwise_conv2d(x, k, bias) ** 2)
    ref_loss = lambda k: jnp.sum(_reference(x, k, bias) ** 2)
    _assert_close(jax.jit(jax.grad(loss))(kernel), jax.grad(ref_loss)(kernel), 2e-6)


@pytest.mark.parametrize("x_shape,k_shape,b_shape,field", [
    ((2, 8, 8), (7, 7, 1, 8), (8,), "x"),
    ((2, 8, 8, 4), (7, 7, 4, 4), (4,), "kernel"),
    ((2, 8, 8, 4), (6, 6, 1, 4), (4,), "kernel"),
    ((2, 8, 8, 4), (7, 7, 1, 4), (3,), "bias"),
])
def test_bad_shapes_name_the_argument(x_shape, k_shape, b_shape, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        conv.depthwise_conv2d(jnp.zeros(x_shape), jnp.zeros(k_shape), jnp.zeros(b_shape))


def _lax_upsample(x, kernel, bias):
    """The transposed conv as flax's `ConvTranspose(transpose_kernel=True)` computes it."""
    return jax.lax.conv_transpose(x, kernel, (2, 2), ((2, 2), (2, 2)),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  transpose_kernel=True) + bias


@pytest.mark.parametrize("x_shape,out_dim", [((3, 7, 7, 56), 56), ((2, 5, 6, 8), 12)])
def test_upsample_matches_lax_conv_transpose(x_shape, out_dim):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((4, 4, out_dim, x_shape[-1])) * 0.1, jnp.float32)
    bias = jnp.asarray(rng.standard_normal(out_dim), jnp.float32)
    cot = jnp.asarray(rng.standard_normal((x_shape[0], 2 * x_shape[1], 2 * x_shape[2], out_dim)),
                      jnp.float32)
    loss = lambda f: lambda *a: jnp.sum(f(*a) * cot)
    got = conv.upsample_conv_transpose(x, kernel, bias)
    want = _lax_upsample(x, kernel, bias)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    grads = jax.grad(loss(conv.upsample_conv_transpose), argnums=(0, 1, 2))(x, kernel, bias)
    want_grads = jax.grad(loss(_lax_upsample), argnums=(0, 1, 2))(x, kernel, bias)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4)


def test_upsample_bad_shapes_name_the_argument():
    x = jnp.zeros((1, 4, 4, 3))
    with pytest.raises(ValueError, match="kernel"):
        conv.upsample_conv_transpose(x, jnp.zeros((3, 3, 5, 3)), jnp.zeros(5))
    with pytest.raises(ValueError, match="bias"):
        conv.upsample_conv_transpose(x, jnp.zeros((4, 4, 5, 3)), jnp.zeros(4))


@pytest.mark.parametrize("x_shape,out_dim", [((3, 28, 28, 28), 28), ((2, 6, 10, 5), 7)])
def test_downsample_matches_lax_strided_conv(x_shape, out_dim):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((4, 4, x_shape[-1], out_dim)) * 0.1, jnp.float32)
    bias = jnp.asarray(rng.standard_normal(out_dim), jnp.float32)
    cot = jnp.asarray(rng.standard_normal((x_shape[0], x_shape[1] // 2, x_shape[2] // 2,
                                           out_dim)), jnp.float32)
    loss = lambda f: lambda *a: jnp.sum(f(*a) * cot)
    got, want = conv.downsample_conv(x, kernel, bias), conv.strided_conv(x, kernel) + bias
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # the same XLA conv
    grads = jax.jit(jax.grad(loss(conv.downsample_conv), argnums=(0, 1, 2)))(x, kernel, bias)
    want_grads = jax.grad(loss(lambda x, k, b: conv.strided_conv(x, k) + b),
                          argnums=(0, 1, 2))(x, kernel, bias)
    for g, w in zip(grads, want_grads):
        _assert_close(g, w, 2e-6)


@pytest.mark.parametrize("x_shape,k_shape,b_shape,field", [
    ((1, 5, 4, 3), (4, 4, 3, 6), (6,), "x"),
    ((1, 4, 4, 3), (3, 3, 3, 6), (6,), "kernel"),
    ((1, 4, 4, 3), (4, 4, 2, 6), (6,), "kernel"),
    ((1, 4, 4, 3), (4, 4, 3, 6), (5,), "bias"),
])
def test_downsample_bad_shapes_name_the_argument(x_shape, k_shape, b_shape, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        conv.downsample_conv(jnp.zeros(x_shape), jnp.zeros(k_shape), jnp.zeros(b_shape))
