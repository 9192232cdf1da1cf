"""A depthwise convolution that XLA:CPU runs fast, equal to `lax.conv_general_dilated`
with `feature_group_count=C` up to float32 rounding (same products, other summation order).

XLA:CPU (jaxlib 0.10.2) runs a grouped convolution with as many groups as
channels 20-50x slower than PyTorch, and its kernel gradient worse still
(bench/NOTES_cpu.md). Written as K*K shifted multiply-adds, the forward pass
and the input gradient become one fused elementwise loop each; the kernel
gradient, K*K sums over batch and space, is taken over a few images at a time
so that each product stays in cache.
"""

import jax
import jax.numpy as jnp

# Bytes of one batch chunk of the input in the kernel-gradient loop: small
# enough for the K*K products of a chunk to stay in a core's L2 cache.
_CHUNK_BYTES = 256 * 1024


def _pad_same(x, p):
    return jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))


def _shifted_sum(xp, kernel, out_hw):
    """sum_ij xp[:, i:i+H, j:j+W, :] * kernel[i, j]: depthwise cross-correlation of padded xp."""
    h, w = out_hw
    out = None
    for i in range(kernel.shape[0]):
        for j in range(kernel.shape[1]):
            term = xp[:, i:i + h, j:j + w, :] * kernel[i, j]
            out = term if out is None else out + term
    return out


def _chunk_size(x):
    """Largest divisor of the batch whose images fit in _CHUNK_BYTES (at least 1)."""
    image_bytes = x[0].size * x.dtype.itemsize
    return max([n for n in range(1, x.shape[0] + 1)
                if x.shape[0] % n == 0 and n * image_bytes <= _CHUNK_BYTES] or [1])


def _kernel_grad(x, g, k):
    """dk[i, j, c] = sum_{b,h,w} xpad[b, h+i, w+j, c] * g[b, h, w, c], accumulated in float32."""
    b, h, w, c = x.shape
    n = _chunk_size(x)
    xp = _pad_same(x, k // 2).reshape(b // n, n, h + k - 1, w + k - 1, c)
    gs = g.reshape(b // n, n, h, w, c)

    def add_chunk(acc, chunk):
        xpc, gc = chunk
        sums = [[jnp.sum(xpc[:, i:i + h, j:j + w, :] * gc, axis=(0, 1, 2), dtype=jnp.float32)
                 for j in range(k)] for i in range(k)]
        return acc + jnp.array(sums), None

    dk, _ = jax.lax.scan(add_chunk, jnp.zeros((k, k, c), jnp.float32), (xp, gs))
    return dk


@jax.custom_vjp
def _depthwise(x, kernel):
    k = kernel.shape[0]
    return _shifted_sum(_pad_same(x, k // 2), kernel[:, :, 0, :], x.shape[1:3])


def _depthwise_fwd(x, kernel):
    return _depthwise(x, kernel), (x, kernel)


def _depthwise_bwd(residuals, g):
    x, kernel = residuals
    k = kernel.shape[0]
    # The input gradient is the correlation of g with the kernel flipped in space.
    dx = _shifted_sum(_pad_same(g, k // 2), kernel[::-1, ::-1, 0, :], x.shape[1:3])
    dk = _kernel_grad(x, g, k)[:, :, None, :].astype(kernel.dtype)
    return dx, dk


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def depthwise_conv2d(x, kernel, bias):
    """PyTorch `nn.Conv2d(C, C, K, padding=K // 2, groups=C)` in NHWC.

    Args:
        x: [B, H, W, C] input.
        kernel: [K, K, 1, C], K odd (flax's HWIO layout for `feature_group_count=C`).
        bias: [C].

    Returns:
        [B, H, W, C]; differentiable in all three arguments.
    """
    if x.ndim != 4:
        raise ValueError(f'x: expected [B, H, W, C], got shape {x.shape}')
    k = kernel.shape[0]
    if kernel.shape != (k, k, 1, x.shape[-1]) or k % 2 == 0:
        raise ValueError(f'kernel: expected [K, K, 1, {x.shape[-1]}] with K odd, got shape '
                         f'{kernel.shape}')
    if bias.shape != (x.shape[-1],):
        raise ValueError(f'bias: expected [{x.shape[-1]}], got shape {bias.shape}')
    return _depthwise(x, kernel) + bias
