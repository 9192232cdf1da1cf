"""Convolutions that XLA:CPU runs fast, equal to their `lax` forms up to float32 rounding
(same products, other summation order): the UNet's depthwise 7x7 convolution
(`lax.conv_general_dilated` with `feature_group_count=C`; also used on GPU), its
stride-2 4x4 transposed convolution (Upsample) and the gradient of its stride-2 4x4
convolution (Downsample). docs/speed.md has the measurements. `upsample`,
`downsample` and `depthwise` pick each one's form by backend for the UNet.

XLA:CPU (jaxlib 0.10.2) runs a grouped convolution with as many groups as
channels 20-50x slower than PyTorch, and its kernel gradient worse still.
Written as K*K shifted multiply-adds, the forward pass and the input gradient
become one elementwise loop each, run over a few images at a time (in a loop,
so that XLA cannot fuse, and recompute, the 49 taps inside a later transpose);
the kernel gradient, K*K sums over batch and space, is likewise taken over a
few images at a time so that each product stays in cache.
"""

import jax
import jax.numpy as jnp
from jax import lax

# Bytes of one batch chunk of the input in the kernel-gradient loop: small
# enough for the K*K products of a chunk to stay in a core's L2 cache.
_CHUNK_BYTES = 256 * 1024


def _pad_same(x, p):
    return jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))


def _shifted_sum(xp, kernel, out_hw):
    """sum_ij xp[:, i:i+H, j:j+W, :] * kernel[i, j]: depthwise cross-correlation of padded xp.

    Accumulated in float32 whatever the input dtype (a bfloat16 sum of K*K terms
    would lose most of its digits), returned in the input dtype.
    """
    h, w = out_hw
    out = None
    for i in range(kernel.shape[0]):
        for j in range(kernel.shape[1]):
            term = (xp[:, i:i + h, j:j + w, :].astype(jnp.float32)
                    * kernel[i, j].astype(jnp.float32))
            out = term if out is None else out + term
    return out.astype(xp.dtype)


def _chunk_size(x, max_bytes=_CHUNK_BYTES):
    """Largest divisor of the batch whose images fit in max_bytes (at least 1)."""
    image_bytes = x[0].size * x.dtype.itemsize
    return max([n for n in range(1, x.shape[0] + 1)
                if x.shape[0] % n == 0 and n * image_bytes <= max_bytes] or [1])


def _sum_over_chunks(chunk_sums, k, c, *batched):
    """sum over batch chunks of chunk_sums(*chunk) ([K, K, C] each), in a scan."""
    def add_chunk(acc, chunk):
        return acc + chunk_sums(*chunk), None

    dk, _ = jax.lax.scan(add_chunk, jnp.zeros((k, k, c), jnp.float32), batched)
    return dk


def _kernel_grad(x, g, k):
    """dk[i, j, c] = sum_{b,h,w} xpad[b, h+i, w+j, c] * g[b, h, w, c], accumulated in float32.

    Each of the K*K sums runs over a few images at a time (in cache). Images at
    least _FLAT_MIN_WIDTH wide take `_kernel_grad_flat`'s layout instead.
    """
    b, h, w, c = x.shape
    if w >= _FLAT_MIN_WIDTH:
        return _kernel_grad_flat(x, g, k)
    n = _chunk_size(x)
    xp = _pad_same(x, k // 2).reshape(b // n, n, h + k - 1, w + k - 1, c)
    gs = g.reshape(b // n, n, h, w, c)

    def chunk_sums(xpc, gc):
        return jnp.array([[jnp.sum(xpc[:, i:i + h, j:j + w, :] * gc, axis=(0, 1, 2),
                                   dtype=jnp.float32) for j in range(k)] for i in range(k)])

    return _sum_over_chunks(chunk_sums, k, c, xp, gs)


# The flat layout's sums cover (W + K - 1) / W times the products: 1.9x at W = 7, where
# the sums above win; from W = 14 the flat ones are 1.3-1.9x faster (docs/speed.md).
_FLAT_MIN_WIDTH = 14
_FLAT_CHUNK_BYTES = 64 * 1024


def _kernel_grad_flat(x, g, k):
    """`_kernel_grad` with each sum along one long contiguous axis.

    With channels outermost and each image's padded rows flattened, tap (i, j)
    is the flat offset i * (W + K - 1) + j, and g, given K - 1 zero columns,
    lines up with it: the products that wrap around a row end are zero. The
    sums then vectorize along H * (W + K - 1) elements instead of C channels.
    """
    b, h, w, c = x.shape
    p = k // 2
    width = w + 2 * p
    length = h * width
    xf = _pad_same(x, p).transpose(0, 3, 1, 2).reshape(b, c, (h + 2 * p) * width)
    xf = jnp.pad(xf, ((0, 0), (0, 0), (0, 2 * p)))  # the last tap reads 2p past the end
    gf = jnp.pad(g, ((0, 0), (0, 0), (0, 2 * p), (0, 0))).transpose(0, 3, 1, 2)
    gf = gf.reshape(b, c, length)
    n = _chunk_size(xf, _FLAT_CHUNK_BYTES)

    def chunk_sums(xc, gc):
        return jnp.stack([jnp.sum(xc[:, :, i * width + j:i * width + j + length] * gc,
                                  axis=(0, 2), dtype=jnp.float32)
                          for i in range(k) for j in range(k)]).reshape(k, k, c)

    return _sum_over_chunks(chunk_sums, k, c, xf.reshape(b // n, n, c, -1),
                            gf.reshape(b // n, n, c, length))


def _in_chunks(fn, x, *args):
    """fn over cache-sized batch chunks of x, in a loop XLA cannot fuse into its consumers."""
    n = _chunk_size(x)
    chunks = x.reshape(x.shape[0] // n, n, *x.shape[1:])
    y = jax.lax.map(lambda c: fn(c, *args), chunks)
    return y.reshape(x.shape[0], *y.shape[2:])


def _depthwise_chunk(x, kernel):
    k = kernel.shape[0]
    return _shifted_sum(_pad_same(x, k // 2), kernel[:, :, 0, :], x.shape[1:3])


@jax.custom_vjp
def _depthwise(x, kernel):
    return _in_chunks(_depthwise_chunk, x, kernel)


def _depthwise_fwd(x, kernel):
    return _depthwise(x, kernel), (x, kernel)


def _depthwise_bwd(residuals, g):
    x, kernel = residuals
    k = kernel.shape[0]
    # The input gradient is the correlation of g with the kernel flipped in space.
    dx = _in_chunks(_depthwise_chunk, g, kernel[::-1, ::-1])
    dk = _kernel_grad(x, g, k)[:, :, None, :].astype(kernel.dtype)
    return dx, dk


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def depthwise_conv2d(x, kernel, bias, *, cache_blocked_grad: bool = True):
    """PyTorch `nn.Conv2d(C, C, K, padding=K // 2, groups=C)` in NHWC.

    Args:
        x: [B, H, W, C] input.
        kernel: [K, K, 1, C], K odd (flax's HWIO layout for `feature_group_count=C`).
        bias: [C].
        cache_blocked_grad: the custom gradient above (for CPUs). False: XLA's own
            autodiff of the shifted sum, which XLA:GPU fuses into a few kernels
            and runs 5x faster than its grouped convolution's gradient, where the
            CPU gradient's loop over batch chunks would run serially.

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
    if cache_blocked_grad:
        return _depthwise(x, kernel) + bias
    return _depthwise_chunk(x, kernel) + bias


def upsample_conv_transpose(x, kernel, bias):
    """PyTorch `nn.ConvTranspose2d(C, D, 4, stride=2, padding=1)` in NHWC, as four 2x2 convs.

    XLA:CPU runs the transposed conv (a conv over the input dilated with
    zeros) 5-8x slower than PyTorch; but output pixel (2m + a, 2n + c) only
    sees taps (3 - a, 1 - a) x (3 - c, 1 - c) of the kernel at input rows
    m - 1 + a, m + a (and likewise columns), so each of the four output
    parities is a plain 2x2 "valid" conv of the input padded by 1, and the
    four results interleave into the output. Same products as the transposed
    conv, other summation order (equal up to float32 rounding).

    Args:
        x: [B, H, W, C] input.
        kernel: [4, 4, D, C], the layout of flax's `ConvTranspose(..., transpose_kernel=True)`
            (PyTorch's [C, D, kh, kw] weight transposed to [kh, kw, D, C]).
        bias: [D].

    Returns:
        [B, 2H, 2W, D]; differentiable in all three arguments.
    """
    if x.ndim != 4:
        raise ValueError(f'x: expected [B, H, W, C], got shape {x.shape}')
    if kernel.shape[:2] != (4, 4) or kernel.ndim != 4 or kernel.shape[3] != x.shape[-1]:
        raise ValueError(f'kernel: expected [4, 4, D, {x.shape[-1]}], got shape {kernel.shape}')
    if bias.shape != kernel.shape[2:3]:
        raise ValueError(f'bias: expected [{kernel.shape[2]}], got shape {bias.shape}')
    b, h, w, _ = x.shape
    xp = _pad_same(x, 1)
    kernel = jnp.swapaxes(kernel, 2, 3)  # HWIO of each 2x2 conv: [4, 4, C, D]
    rows = []
    for a in range(2):
        cols = [jax.lax.conv_general_dilated(
                    xp[:, a:a + h + 1, c:c + w + 1], kernel[3 - a::-2, 3 - c::-2], (1, 1),
                    'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
                for c in range(2)]
        rows.append(jnp.stack(cols, axis=3))            # [B, H, W, 2 (c), D]
    y = jnp.stack(rows, axis=2)                          # [B, H, 2 (a), W, 2 (c), D]
    return y.reshape(b, 2 * h, 2 * w, -1) + bias


def strided_conv(x, kernel):
    """XLA's PyTorch `nn.Conv2d(C, D, 4, stride=2, padding=1)` without bias, NHWC / HWIO."""
    return jax.lax.conv_general_dilated(x, kernel, (2, 2), ((1, 1), (1, 1)),
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@jax.custom_vjp
def _downsample(x, kernel):
    return strided_conv(x, kernel)


def _downsample_fwd(x, kernel):
    return strided_conv(x, kernel), (x, kernel)


def _downsample_bwd(residuals, g):
    x, kernel = residuals
    # The input gradient of a stride-2 4x4 conv with padding 1 is the transposed conv
    # of g with the same kernel: [4, 4, C, D] in HWIO is upsample's [4, 4, out, in].
    dx = upsample_conv_transpose(g, kernel, jnp.zeros(kernel.shape[2], g.dtype))
    _, kernel_vjp = jax.vjp(lambda k: strided_conv(x, k), kernel)
    return dx, kernel_vjp(g)[0]


_downsample.defvjp(_downsample_fwd, _downsample_bwd)


def downsample_conv(x, kernel, bias):
    """PyTorch `nn.Conv2d(C, D, 4, stride=2, padding=1)` in NHWC, with a faster input gradient.

    XLA:CPU computes the input gradient of a strided conv as a conv over the
    cotangent dilated with zeros, 3-6x slower than PyTorch (the largest
    single op of the Fashion step). That gradient is the
    transposed conv of the cotangent, which `upsample_conv_transpose` computes
    as four 2x2 convs. Forward and kernel gradient are XLA's own.

    Args:
        x: [B, H, W, C] input, H and W even.
        kernel: [4, 4, C, D] (HWIO).
        bias: [D].

    Returns:
        [B, H/2, W/2, D]; differentiable in all three arguments.
    """
    if x.ndim != 4 or x.shape[1] % 2 or x.shape[2] % 2:
        raise ValueError(f'x: expected [B, H, W, C] with H and W even, got shape {x.shape}')
    if kernel.shape[:3] != (4, 4, x.shape[-1]) or kernel.ndim != 4:
        raise ValueError(f'kernel: expected [4, 4, {x.shape[-1]}, D], got shape {kernel.shape}')
    if bias.shape != kernel.shape[3:]:
        raise ValueError(f'bias: expected [{kernel.shape[3]}], got shape {bias.shape}')
    return _downsample(x, kernel) + bias


# --- The UNet's convolutions, each in the fastest form of the backend ----------------------------

def _lax_upsample(x, kernel, bias):
    """XLA's own transposed conv (`Upsample`)."""
    y = lax.conv_transpose(x, kernel, (2, 2), ((2, 2), (2, 2)),
                           dimension_numbers=("NHWC", "HWIO", "NHWC"), transpose_kernel=True)
    return y + bias


def _lax_depthwise(x, kernel, bias):
    """XLA's own grouped conv (`DepthwiseConv`)."""
    k = kernel.shape[0]
    y = lax.conv_general_dilated(x, kernel, (1, 1), [(k // 2, k // 2)] * 2,
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 feature_group_count=x.shape[-1])
    return y + bias


def upsample(x, kernel, bias):
    """`Upsample`'s transposed conv: `upsample_conv_transpose` on CPU, else XLA's."""
    if jax.default_backend() == "cpu":
        return upsample_conv_transpose(x, kernel, bias)
    return _lax_upsample(x, kernel, bias)


def downsample(x, kernel, bias):
    """`Downsample`'s strided conv: on CPU with `downsample_conv`'s faster input
    gradient, else XLA's."""
    if jax.default_backend() == "cpu":
        return downsample_conv(x, kernel, bias)
    return strided_conv(x, kernel) + bias


def depthwise(x, kernel, bias):
    """`DepthwiseConv`'s grouped conv: shifted multiply-adds (`depthwise_conv2d`) on CPU
    and GPU, where XLA's grouped convolution is slow (on GPU its gradient is 5x slower than the
    shifted form's, docs/speed.md); XLA's elsewhere (TPU)."""
    backend = jax.default_backend()
    if backend in ("cpu", "gpu"):
        return depthwise_conv2d(x, kernel, bias, cache_blocked_grad=backend == "cpu")
    return _lax_depthwise(x, kernel, bias)
