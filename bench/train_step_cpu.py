"""One training step of the Fashion-MNIST UNet (batch 128): JAX, with the depthwise conv as
`lax` (grouped conv) or `fast` (ddpm_jax.conv), against the PyTorch design, in one process.

  .venv/bin/python bench/train_step_cpu.py --steps 2
  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= .venv/bin/python bench/train_step_cpu.py

Forward + backward + Adam(1e-3) on the huber loss of random inputs; prints the
compile time and the min (median) seconds of `--steps` steps after it.
"""
import argparse
import os
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))
from ddpm_jax import conv, unet  # noqa: E402
import torch_ref_unet  # noqa: E402


class FastDepthwiseConv(nn.Module):
    """unet.DepthwiseConv computed by ddpm_jax.conv (same parameters); swapped in for the A/B test."""
    kernel_size: int = 7
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        channels, k = x.shape[-1], self.kernel_size
        kernel = self.param('kernel', unet._torch_kernel_init(), (k, k, 1, channels), jnp.float32)
        bias = self.param('bias', unet._torch_bias_init(k * k), (channels,), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return conv.depthwise_conv2d(x, kernel, bias)


LAX_DEPTHWISE_CONV = unet.DepthwiseConv


def times(fn, steps):
    out = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return f'{min(out):6.2f} s ({statistics.median(out):6.2f})'


def jax_step_time(impl, batch, steps):
    unet.DepthwiseConv = FastDepthwiseConv if impl == 'fast' else LAX_DEPTHWISE_CONV
    model = unet.Unet(dim=28, dim_mults=(1, 2, 4), channels=1)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, 28, 28, 1)).astype(np.float32))
    t = jnp.arange(batch, dtype=jnp.int32) % 200
    params = model.init(jax.random.key(0), x, t)['params']
    opt = optax.adam(1e-3)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, x, t, noise):
        loss_fn = lambda p: optax.huber_loss(model.apply({'params': p}, x, t), noise).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    noise = x[::-1]
    start = time.perf_counter()
    state = step(params, opt_state, x, t, noise)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - start
    run = lambda: jax.block_until_ready(step(params, opt_state, x, t, noise))
    return f'compile+1st {compile_s:5.1f} s, step {times(run, steps)}'


def torch_step_time(batch, steps):
    torch.manual_seed(0)
    model = torch_ref_unet.Unet(dim=28, dim_mults=(1, 2, 4), channels=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(batch, 1, 28, 28) * 2 - 1
    t = torch.arange(batch) % 200
    noise = x.flip(0)

    def run():
        opt.zero_grad()
        torch.nn.functional.smooth_l1_loss(model(x, t), noise).backward()
        opt.step()

    run()
    return f'step {times(run, steps)}'


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--impl', default='torch,lax,fast', help='comma-separated, run in order')
    parser.add_argument('--steps', type=int, default=2)
    parser.add_argument('--batch', type=int, default=128)
    args = parser.parse_args()
    print(f'jax {jax.__version__}, torch {torch.__version__}, '
          f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}, batch {args.batch}', flush=True)
    for impl in args.impl.split(','):
        if impl == 'torch':
            result = torch_step_time(args.batch, args.steps)
        elif impl in ('lax', 'fast'):
            result = jax_step_time(impl, args.batch, args.steps)
        else:
            parser.error(f'--impl {impl!r}: valid choices are torch, lax, fast')
        print(f'{impl:6s} {result}', flush=True)


if __name__ == '__main__':
    main()
