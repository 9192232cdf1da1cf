"""Microbenchmark of the Fashion-MNIST UNet's convolutions: JAX formulations vs PyTorch.

XLA flags must be set before JAX starts, so compare flag sets by running this
script once per `XLA_FLAGS` value; every run also times PyTorch on the same
shapes in the same process, so each JAX/PyTorch ratio comes from one run.

    .venv/bin/python bench/conv_micro.py --op depthwise --impl lax,shifted,fast
    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= .venv/bin/python bench/conv_micro.py

Times are `min (median)` in ms of `--repeats` calls after one warm-up call (the
machine is shared, so the min is the figure to compare); "fwd" is
the output, "fwdbwd" the output plus the gradients wrt input, kernel and bias.
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from ddpm_jax import conv  # noqa: E402  (needs the repository root on the path)

BATCH = 128

# (resolution, channels) of every 7x7 depthwise conv in Unet(dim=28, dim_mults=(1, 2, 4)),
# and the distinct shapes of its 3x3 convs (resolution, in, out).
DEPTHWISE = [(28, 18), (28, 28), (14, 28), (14, 56), (14, 112), (7, 56), (7, 112), (7, 224)]
DENSE3 = [(28, 18, 56), (28, 28, 56), (28, 56, 28), (14, 28, 112), (14, 112, 56),
                    (14, 56, 112), (7, 56, 224), (7, 224, 112), (7, 112, 224)]


def median_ms(fn, repeats):
    """(min, median) wall time of fn() in ms after one warm-up call; min resists other load."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times), 1e3 * statistics.median(times)


def lax_conv(x, kernel, bias, groups):
    """What flax nn.Conv does: one conv_general_dilated in NHWC."""
    k = kernel.shape[0]
    y = jax.lax.conv_general_dilated(
            x, kernel, (1, 1), [(k // 2, k // 2)] * 2,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups)
    return y + bias


def lax_conv_nchw(x, kernel, bias, groups):
    """The same conv computed in NCHW/OIHW layout (transposes at both ends)."""
    k = kernel.shape[0]
    y = jax.lax.conv_general_dilated(
        x.transpose(0, 3, 1, 2), kernel.transpose(3, 2, 0, 1), (1, 1), [(k // 2, k // 2)] * 2,
        dimension_numbers=('NCHW', 'OIHW', 'NCHW'), feature_group_count=groups)
    return y.transpose(0, 2, 3, 1) + bias


def shifted_autodiff(x, kernel, bias):
    """Depthwise conv as 49 shifted multiply-adds, differentiated by JAX."""
    k = kernel.shape[0]
    h, w = x.shape[1:3]
    p = k // 2
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    out = bias
    for i in range(k):
        for j in range(k):
            out = out + xp[:, i:i + h, j:j + w, :] * kernel[i, j, 0]
    return out


DEPTHWISE_IMPLS = {
        'lax': lambda x, k, b: lax_conv(x, k, b, x.shape[-1]),
        'lax_nchw': lambda x, k, b: lax_conv_nchw(x, k, b, x.shape[-1]),
        'shifted': shifted_autodiff,
        'fast': conv.depthwise_conv2d,
}
DENSE_IMPLS = {
        'lax': lambda x, k, b: lax_conv(x, k, b, 1),
        'lax_nchw': lambda x, k, b: lax_conv_nchw(x, k, b, 1),
}


def jax_fns(impl):
    """Jitted forward and forward+backward (grads wrt x, kernel, bias) of impl."""
    fwd = jax.jit(impl)

    def fwdbwd(x, k, b, ct):
        y, vjp = jax.vjp(impl, x, k, b)
        return y, vjp(ct)

    return fwd, jax.jit(fwdbwd)


def bench_case(name, x_shape, k_shape, groups, impls, repeats, modes):
    """Times every impl and torch on one conv shape; prints one row per impl."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape, dtype=np.float32)
    kernel = rng.standard_normal(k_shape, dtype=np.float32) * 0.1
    bias = rng.standard_normal(k_shape[-1:], dtype=np.float32)
    out_shape = x_shape[:3] + k_shape[-1:]
    ct = rng.standard_normal(out_shape, dtype=np.float32)

    tx = torch.tensor(x.transpose(0, 3, 1, 2)).contiguous().requires_grad_()
    tk = torch.tensor(kernel.transpose(3, 2, 0, 1)).contiguous().requires_grad_()
    tb = torch.tensor(bias).requires_grad_()
    tct = torch.tensor(ct.transpose(0, 3, 1, 2)).contiguous()
    pad = k_shape[0] // 2

    def torch_fwd():
        with torch.no_grad():
            F.conv2d(tx, tk, tb, padding=pad, groups=groups)

    def torch_fwdbwd():
        tx.grad = tk.grad = tb.grad = None
        F.conv2d(tx, tk, tb, padding=pad, groups=groups).backward(tct)

    row = {'torch': {}}
    if 'fwd' in modes:
        row['torch']['fwd'] = median_ms(torch_fwd, repeats)
    if 'fwdbwd' in modes:
        row['torch']['fwdbwd'] = median_ms(torch_fwdbwd, repeats)
    jx, jk, jb, jct = map(jnp.asarray, (x, kernel, bias, ct))
    for impl_name, impl in impls.items():
        fwd, fwdbwd = jax_fns(impl)
        row[impl_name] = {}
        if 'fwd' in modes:
            row[impl_name]['fwd'] = median_ms(lambda: fwd(jx, jk, jb).block_until_ready(), repeats)
        if 'fwdbwd' in modes:
            row[impl_name]['fwdbwd'] = median_ms(
            lambda: jax.block_until_ready(fwdbwd(jx, jk, jb, jct)), repeats)
    for impl_name, times in row.items():
        cells = '  '.join(f'{m} {t[0]:7.1f} ({t[1]:7.1f})' for m, t in times.items())
        print(f'{name:28s} {impl_name:10s} {cells}', flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--op', choices=['depthwise', 'dense3'], default='depthwise')
    parser.add_argument('--impl', default='', help='comma-separated; default: all')
    parser.add_argument('--modes', default='fwd,fwdbwd')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--only', default='', help='comma-separated case indices')
    args = parser.parse_args()

    all_impls = DEPTHWISE_IMPLS if args.op == 'depthwise' else DENSE_IMPLS
    names = args.impl.split(',') if args.impl else list(all_impls)
    unknown = set(names) - set(all_impls)
    if unknown:
        parser.error(f'--impl {sorted(unknown)}: valid choices are {sorted(all_impls)}')
    impls = {n: all_impls[n] for n in names}
    modes = args.modes.split(',')
    print(f'jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads),'
          f' XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}, batch {BATCH}')
    cases = DEPTHWISE if args.op == 'depthwise' else DENSE3
    only = [int(i) for i in args.only.split(',')] if args.only else range(len(cases))
    for idx in only:
        if args.op == 'depthwise':
            res, c = cases[idx]
            bench_case(f'dw7 {res}x{res} C={c}', (BATCH, res, res, c), (7, 7, 1, c), c,
                       impls, args.repeats, modes)
        else:
            res, cin, cout = cases[idx]
            bench_case(f'conv3 {res}x{res} {cin}->{cout}', (BATCH, res, res, cin),
                       (3, 3, cin, cout), 1, impls, args.repeats, modes)


if __name__ == '__main__':
    main()
