"""Per-block CPU profile of the Fashion-MNIST UNet (batch 128): each block type of the network, jitted
alone, against the same PyTorch block (tests/torch_ref_unet.py), forward and forward+backward.

  .venv/bin/python bench/block_profile.py [--reps 3] [--only gelu,gn]

Prints a markdown table of median milliseconds (JAX, PyTorch, ratio). fwd+bwd differentiates the
sum of output * a fixed cotangent with respect to the input and all parameters.
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
from flax import linen as nn

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))
from ddpm_jax import unet  # noqa: E402
import torch_ref_unet as tr  # noqa: E402

B = 128


class _GeluJ(nn.Module):
    def __call__(self, x):
        return unet.gelu(x)


class _GroupNormJ(nn.Module):
    @nn.compact
    def __call__(self, x):
        return unet._group_norm(1, dtype=jnp.float32, name='gn')(x)


def _conv3j(cout):
    class _Conv3J(nn.Module):
        @nn.compact
        def __call__(self, x):
            return unet._conv(cout, 3, x.shape[-1], padding=1, dtype=jnp.float32, name='c')(x)
    return _Conv3J()


def _attn_j(cls):
    class _AttnJ(nn.Module):
        @nn.compact
        def __call__(self, x):
            return unet._attention_layer(cls, dtype=jnp.float32, name='a')(x)
    return _AttnJ()


def cases():
    """(name, flax module, torch module, NHWC input shape)."""
    out = []
    for hw, c, co in [(28, 28, 28), (14, 56, 56), (7, 112, 112), (28, 18, 28)]:
        out.append((f'convnext {hw}x{hw} {c}->{co}', unet.ConvNextBlock(co, dtype=jnp.float32),
                    tr.ConvNextBlock(c, co), (B, hw, hw, c)))
    for hw, c in [(28, 28), (14, 56), (7, 112)]:
        out.append((f'linattn {hw}x{hw} {c}', _attn_j(unet.LinearAttention),
                    tr.Residual(tr.PreNorm(c, tr.LinearAttention(c))), (B, hw, hw, c)))
    out.append(('attn 7x7 112', _attn_j(unet.Attention),
                tr.Residual(tr.PreNorm(112, tr.Attention(112))), (B, 7, 7, 112)))
    out.append(('conv3x3 28x28 28->56', _conv3j(56), torch.nn.Conv2d(28, 56, 3, padding=1),
                (B, 28, 28, 28)))
    out.append(('conv3x3 28x28 56->28', _conv3j(28), torch.nn.Conv2d(56, 28, 3, padding=1),
                (B, 28, 28, 56)))
    out.append(('gelu 28x28x56', _GeluJ(), torch.nn.GELU(), (B, 28, 28, 56)))
    out.append(('groupnorm(1) 28x28x56', _GroupNormJ(), torch.nn.GroupNorm(1, 56),
                (B, 28, 28, 56)))
    out.append(('upsample 14->28 28', unet.Upsample(28), tr.Upsample(28), (B, 14, 14, 28)))
    out.append(('downsample 28->14 28', unet.Downsample(28), tr.Downsample(28), (B, 28, 28, 28)))
    return out


def median_ms(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def profile_jax(module, shape, reps):
    x = jax.random.normal(jax.random.PRNGKey(0), shape, jnp.float32)
    params = module.init(jax.random.PRNGKey(1), x)
    out_shape = jax.eval_shape(lambda p, x: module.apply(p, x), params, x).shape
    g = jax.random.normal(jax.random.PRNGKey(2), out_shape, jnp.float32)
    fwd = jax.jit(lambda p, x: module.apply(p, x))
    bwd = jax.jit(jax.grad(lambda p, x: jnp.sum(module.apply(p, x) * g), argnums=(0, 1)))
    f = median_ms(lambda: jax.block_until_ready(fwd(params, x)), reps)
    b = median_ms(lambda: jax.block_until_ready(bwd(params, x)), reps)
    return f, b


def profile_torch(module, shape, reps):
    n, h, w, c = shape
    x = torch.randn(n, c, h, w)
    with torch.no_grad():
        out_shape = module(x).shape
    g = torch.randn(out_shape)

    def fwd():
        with torch.no_grad():
            module(x)

    def bwd():
        xg = x.clone().requires_grad_(True)
        module.zero_grad(set_to_none=True)
        (module(xg) * g).sum().backward()

    return median_ms(fwd, reps), median_ms(bwd, reps)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--reps', type=int, default=3)
    parser.add_argument('--only', default='', help='comma-separated substrings of case names')
    args = parser.parse_args()
    print(f'jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), '
          f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
    print('| block | JAX fwd | torch fwd | ratio | JAX fwd+bwd | torch fwd+bwd | ratio |')
    print('|---|---|---|---|---|---|---|')
    for name, jmod, tmod, shape in cases():
        if args.only and not any(s in name for s in args.only.split(',')):
            continue
        jf, jb = profile_jax(jmod, shape, args.reps)
        tf, tb = profile_torch(tmod, shape, args.reps)
        print(f'| {name} | {jf:.1f} | {tf:.1f} | {jf / tf:.2f} | {jb:.1f} | {tb:.1f} | '
              f'{jb / tb:.2f} |', flush=True)


if __name__ == '__main__':
    main()
