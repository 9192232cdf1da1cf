"""Model FLOPs of the UNet, counted by hand and by XLA, and the peaks MFU is measured against.

Model-FLOPs utilisation (MFU) = model FLOPs per second / the device's peak for the dtype:
  forward   XLA's cost analysis of the compiled forward pass (`xla_flops`), cross-checked
            against `forward_flops_by_hand` (tests/flops_test.py: within 6% for the tiny
            and Fashion networks; XLA also counts the elementwise ops the hand count leaves out);
  training  3 x forward per image (forward, plus input and weight gradients: the usual
            convention, which does not credit recomputation, the optimizer or the EMA);
            XLA's count of the whole compiled step is reported beside it;
  sampling  steps x forward per image.
The hand count is the multiply-adds (x2) of every convolution, dense layer and attention
einsum, over the taps that meet the image (padding excluded, as XLA counts).
"""
import collections
import time
from typing import Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models import unet

# Dense (no sparsity) peak FLOP/s by device kind, from the vendors' datasheets:
#   NVIDIA H100 / H200 SXM datasheets: BF16 tensor 989.4 T, TF32 tensor 494.7 T (the
#   "with sparsity" figures halved); H100 PCIe: 756 / 378 T; A100 datasheet: BF16 312 T,
#   TF32 156 T. JAX runs float32 convolutions and matmuls in TF32 on these GPUs by default
#   (jax.default_matmul_precision), so TF32 is the float32 peak.
#   Google Cloud TPU system architecture pages: v4 275 T, v5e 197 T, v5p 459 T, v6e (Trillium)
#   918 T bf16 per chip. JAX's default precision computes float32 matmuls in one bf16 pass on
#   TPU, so the bf16 peak is the float32 peak.
PEAKS = (  # (substring of jax's device_kind, {dtype: FLOP/s}); first match wins
    ("H100 PCIe", {"bfloat16": 756e12, "float32": 378e12}),
    ("H100", {"bfloat16": 989.4e12, "float32": 494.7e12}),
    ("H200", {"bfloat16": 989.4e12, "float32": 494.7e12}),
    ("A100", {"bfloat16": 312e12, "float32": 156e12}),
    ("TPU v4", {"bfloat16": 275e12, "float32": 275e12}),
    ("TPU v5 lite", {"bfloat16": 197e12, "float32": 197e12}),
    ("TPU v5e", {"bfloat16": 197e12, "float32": 197e12}),
    ("TPU v5", {"bfloat16": 459e12, "float32": 459e12}),
    ("TPU v6", {"bfloat16": 918e12, "float32": 918e12}),
)


def xla_flops(compiled) -> float:
    """XLA's FLOP count of a compiled program (`jax.stages.Compiled`)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
        analysis = analysis[0]
    return float(analysis["flops"])


def _valid_taps(size: int, kernel: int, stride: int, pad: int, out: int) -> int:
    """(output position, kernel tap) pairs along one axis whose input lies inside the image."""
    return sum(1 for o in range(out) for j in range(kernel) if 0 <= o * stride - pad + j < size)


def _conv_flops(x_shape, out_shape, kernel: int, stride: int, pad: int, per_output: int) -> int:
    """2 x multiply-adds of a square conv; per_output: input channels feeding one output."""
    (b, h, w, _), (_, oh, ow, cout) = x_shape, out_shape
    taps = _valid_taps(h, kernel, stride, pad, oh) * _valid_taps(w, kernel, stride, pad, ow)
    return 2 * b * taps * per_output * cout


def _transposed_conv_flops(x_shape, out_shape) -> int:
    """`Upsample`'s ConvTranspose2d(4, 2, 1): each input pixel meets the taps inside the
    output."""
    (b, h, w, cin), cout = x_shape, out_shape[-1]
    along = [sum(1 for i in range(n) for j in range(4) if 0 <= 2 * i - 1 + j < 2 * n)
             for n in (h, w)]
    return 2 * b * along[0] * along[1] * cin * cout


def forward_flops_by_hand(model: unet.Unet, batch: int, image_size: int) -> Dict[str, int]:
    """FLOPs of one forward pass of `model` on [batch, size, size, channels], by layer kind,
    from the shapes each layer sees (traced with `jax.eval_shape`, nothing computed)."""
    counts: Dict[str, int] = collections.Counter()

    def count(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__":
            return out
        x = args[0] if args else None
        if isinstance(module, nn.Conv):
            pad = module.padding if isinstance(module.padding, int) else 0
            counts["conv"] += _conv_flops(x.shape, out.shape, module.kernel_size[0],
                                          module.strides[0], pad, x.shape[-1])
        elif isinstance(module, nn.Dense):
            rows = x.size // x.shape[-1]
            counts["dense"] += 2 * rows * x.shape[-1] * out.shape[-1]
        elif isinstance(module, unet.Downsample):
            counts["conv"] += _conv_flops(x.shape, out.shape, 4, 2, 1, x.shape[-1])
        elif isinstance(module, unet.Upsample):
            counts["conv"] += _transposed_conv_flops(x.shape, out.shape)
        elif isinstance(module, unet.DepthwiseConv):
            k = module.kernel_size
            counts["depthwise"] += _conv_flops(x.shape, out.shape, k, 1, k // 2, 1)
        elif isinstance(module, (unet.Attention, unet.LinearAttention)):
            b, h, w, _ = x.shape
            n, heads, d = h * w, module.heads, module.dim_head
            # Two einsums each: q.k and attn.v (n x n), or k.v and context.q (d x d).
            inner = n if isinstance(module, unet.Attention) else d
            counts["attention"] += 2 * (2 * b * heads * n * inner * d)
        return out

    x = jax.ShapeDtypeStruct((batch, image_size, image_size, model.channels), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.int32)
    with nn.intercept_methods(count):
        jax.eval_shape(lambda x, t: model.init_with_output(jax.random.key(0), x, t), x, t)
    counts = dict(counts)
    counts["total"] = sum(counts.values())
    return counts


def forward_flops_by_xla(model: unet.Unet, params, batch: int, image_size: int) -> float:
    """XLA's count of one compiled forward pass (inference mode) on `batch` images."""
    x = jax.ShapeDtypeStruct((batch, image_size, image_size, model.channels), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.int32)
    apply = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t, train=False))
    return xla_flops(apply.lower(params, x, t).compile())


def measured_matmul_rate(dtype: str = "float32", n: int = 1024, seconds: float = 1.0) -> float:
    """FLOP/s of jnp.dot on square [n, n] matrices on the default device: the CPU's 'peak'."""
    a = jnp.ones((n, n), dtype)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, a))
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        out = dot(a, a)
        calls += 1
    jax.block_until_ready(out)
    return 2 * n ** 3 * calls / (time.perf_counter() - start)


def peak_flops(device: jax.Device, dtype: str) -> Optional[float]:
    """The device's dense peak FLOP/s for `dtype` from `PEAKS`; on CPU the measured jnp.dot
    rate; None for a device kind not in the table."""
    if device.platform == "cpu":
        return measured_matmul_rate(dtype)
    for kind, peaks in PEAKS:
        if kind.lower() in device.device_kind.lower():
            return peaks[dtype]
    return None
