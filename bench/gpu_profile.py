"""Where the Fashion-MNIST step's GPU time goes, and which conv formulations help (issue 7).

One call on a lent GPU (`bash bench/run_gpu.sh profile`), within a deadline:
  micro    the UNet's depthwise 7x7 and transposed 4x4 convs at their training
           shapes, forward and forward+backward, in each candidate formulation,
           beside PyTorch's `nn.Conv2d(groups=C)` / `nn.ConvTranspose2d`;
  step     the whole train step with the default formulations and with the
           fastest of the micro study, float32 and bfloat16, timed synced per
           step and pipelined (N steps dispatched, one sync); the forward pass
           at the sampler's batch of 64;
  profile  the top GPU kernels of both steps (JAX profiler) and of PyTorch's
           eager step (torch.profiler);
  cifar    the CIFAR-10 config's step, float32 and bfloat16, beside PyTorch eager.
Candidates are swapped in through `ddpm_jax.unet._depthwise` / `_upsample`.
Prints tables; writes profile.json (and the traces) to --out.
"""
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import collections  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark as bm  # noqa: E402
import gpu_trace  # noqa: E402
from ddpm_jax import conv, unet  # noqa: E402

START = time.perf_counter()


# --- Candidate formulations --------------------------------------------------------------------

def _lax_depthwise(x, kernel):
    return unet._lax_depthwise(x, kernel, 0)


def _stacked_kernel_grad(x, g, k):
    """dk[i, j, c] = sum_{b,h,w} xpad[b, h+i, w+j, c] g[b, h, w, c] as one reduction."""
    h, w = x.shape[1:3]
    xp = conv._pad_same(x, k // 2)
    taps = jnp.stack([xp[:, i:i + h, j:j + w, :] for i in range(k) for j in range(k)], axis=3)
    dk = jnp.sum(taps * g[:, :, :, None, :], axis=(0, 1, 2), dtype=jnp.float32)
    return dk.reshape(k, k, 1, -1)


def _make_depthwise(forward, input_grad, kernel_grad):
    """A depthwise conv from a forward, an input-gradient and a kernel-gradient formulation."""
    @jax.custom_vjp
    def f(x, kernel):
        return forward(x, kernel)

    def fwd(x, kernel):
        return f(x, kernel), (x, kernel)

    def bwd(res, g):
        x, kernel = res
        return input_grad(g, kernel), kernel_grad(x, g, kernel.shape[0]).astype(kernel.dtype)

    f.defvjp(fwd, bwd)
    return lambda x, kernel, bias: f(x, kernel) + bias


def _shifted_input_grad(g, kernel):
    return conv._depthwise_chunk(g, kernel[::-1, ::-1])


def _lax_input_grad(g, kernel):
    return _lax_depthwise(g, kernel[::-1, ::-1])


DEPTHWISE = {
    "lax": unet._lax_depthwise,
    "shifted_autodiff": functools.partial(conv.depthwise_conv2d, cache_blocked_grad=False),
    "shifted_cpu_chunks": conv.depthwise_conv2d,
    "shifted_stacked": _make_depthwise(conv._depthwise_chunk, _shifted_input_grad,
                                       _stacked_kernel_grad),
    "lax_fwd_stacked_dk": _make_depthwise(_lax_depthwise, _lax_input_grad,
                                          _stacked_kernel_grad),
}


UPSAMPLE = {"lax": unet._lax_upsample, "four_2x2": conv.upsample_conv_transpose}


class use:
    """Swap the UNet's depthwise / upsample formulations while tracing."""

    def __init__(self, depthwise: str, upsample: str):
        self.new = (DEPTHWISE[depthwise], UPSAMPLE[upsample])

    def __enter__(self):
        self.old = (unet._depthwise, unet._upsample)
        unet._depthwise, unet._upsample = self.new

    def __exit__(self, *exc):
        unet._depthwise, unet._upsample = self.old


# --- Timing ------------------------------------------------------------------------------------

def per_call(fn, sync, iters: int, reps: int = 5) -> float:
    """Seconds per call of `fn` after one synced call, pipelined (`benchmark.pipelined_seconds`)."""
    sync(fn())
    return bm.pipelined_seconds(fn, sync, iters, reps)


def conv_shapes(config, batch: int):
    """Input shapes of every depthwise and upsample call of the config's UNet at `batch`."""
    seen = collections.defaultdict(list)
    recorders = (lambda x, k, b: seen["depthwise"].append(x.shape) or
                 unet._lax_depthwise(x, k, b),
                 lambda x, k, b: seen["upsample"].append((x.shape, k.shape)) or
                 unet._lax_upsample(x, k, b))
    old = (unet._depthwise, unet._upsample)
    unet._depthwise, unet._upsample = recorders
    try:
        model = bm.train_state.create_model(config)
        size, ch = config.data.image_size, config.data.channels
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((batch, size, size, ch)),
                                          jnp.zeros((batch,), jnp.int32)))
    finally:
        unet._depthwise, unet._upsample = old
    return {k: sorted(set(v), key=str) for k, v in seen.items()}


def micro(rows, config, batch, torch_side):
    shapes = conv_shapes(config, batch)
    rng = np.random.default_rng(0)
    for shape in shapes.get("depthwise", []):
        x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        c = shape[-1]
        kernel = jnp.asarray(rng.standard_normal((7, 7, 1, c)) / 7, jnp.float32)
        bias = jnp.zeros((c,), jnp.float32)
        g = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        ref = None
        for name, f in DEPTHWISE.items():
            fwd = jax.jit(f)
            grad = jax.jit(jax.grad(lambda x, k, b, f=f: jnp.sum(f(x, k, b) * g), (0, 1, 2)))
            value = fwd(x, kernel, bias)
            grads = grad(x, kernel, bias)
            if ref is None:
                ref = (value, grads)
            err = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
                      for a, b in zip([value, *grads], [ref[0], *ref[1]]))
            rows.append(dict(part="micro", op="depthwise", shape=shape, impl=name,
                             fwd_ms=1e3 * per_call(lambda: fwd(x, kernel, bias),
                                                   jax.block_until_ready, 20),
                             fwd_bwd_ms=1e3 * per_call(lambda: grad(x, kernel, bias),
                                                       jax.block_until_ready, 20),
                             rel_err_vs_lax=err))
            print(rows[-1], flush=True)
        if torch_side is not None:
            rows.append(dict(part="micro", op="depthwise", shape=shape, impl="torch",
                             **torch_conv(torch_side, shape, groups=True)))
            print(rows[-1], flush=True)
    for shape, kshape in shapes.get("upsample", []):
        x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        kernel = jnp.asarray(rng.standard_normal(kshape) / 8, jnp.float32)
        bias = jnp.zeros((kshape[2],), jnp.float32)
        for name, f in UPSAMPLE.items():
            g = jnp.ones((shape[0], 2 * shape[1], 2 * shape[2], kshape[2]), jnp.float32)
            fwd = jax.jit(f)
            grad = jax.jit(jax.grad(lambda x, k, b, f=f: jnp.sum(f(x, k, b) * g), (0, 1, 2)))
            rows.append(dict(part="micro", op="upsample", shape=shape, impl=name,
                             fwd_ms=1e3 * per_call(lambda: fwd(x, kernel, bias),
                                                   jax.block_until_ready, 20),
                             fwd_bwd_ms=1e3 * per_call(lambda: grad(x, kernel, bias),
                                                       jax.block_until_ready, 20)))
            print(rows[-1], flush=True)
        if torch_side is not None:
            rows.append(dict(part="micro", op="upsample", shape=shape, impl="torch",
                             **torch_conv(torch_side, shape, groups=False)))
            print(rows[-1], flush=True)


def torch_conv(side, shape, groups: bool):
    torch = side.torch
    b, h, w, c = shape
    layer = (torch.nn.Conv2d(c, c, 7, padding=3, groups=c) if groups
             else torch.nn.ConvTranspose2d(c, c, 4, 2, 1)).to(side.device)
    x = torch.randn(b, c, h, w, device=side.device, requires_grad=True)

    def fwd():
        with torch.no_grad():
            return layer(x)

    def fwd_bwd():
        layer(x).sum().backward()
        return x.grad

    return dict(fwd_ms=1e3 * per_call(fwd, side.sync, 20),
                fwd_bwd_ms=1e3 * per_call(fwd_bwd, side.sync, 20))


def best(rows, op, key):
    totals = collections.defaultdict(float)
    for r in rows:
        if r["part"] == "micro" and r["op"] == op and r["impl"] != "torch":
            totals[r["impl"]] += r[key]
    counts = collections.Counter(r["impl"] for r in rows if r["part"] == "micro"
                                 and r["op"] == op)
    full = [k for k in totals if counts[k] == max(counts.values())]
    return min(full, key=totals.get)


# --- Whole step --------------------------------------------------------------------------------

def step_variant(rows, name, config_name, batch, dtype, depthwise, upsample, out_dir,
                 profile: bool):
    config = bm.bench_config(config_name, batch, dtype)
    with use(depthwise, upsample):
        trainer = bm.JaxTrainer(config, bm.make_train_step)
        step = trainer.step
        images = trainer.put(bm.synthetic_images(config, batch))
        holder = {"state": trainer.init_state()}

        def run():
            holder["state"], metrics = step(holder["state"], images)
            return metrics

        synced = per_call(run, jax.block_until_ready, 1, reps=15)
        pipelined = per_call(run, jax.block_until_ready, 20, reps=3)
        row = dict(part="step", config=config_name, variant=name, dtype=dtype, batch=batch,
                   depthwise=depthwise, upsample=upsample, compile_s=trainer.compile_s,
                   synced_ms=1e3 * synced, pipelined_ms=1e3 * pipelined,
                   images_per_s=batch / pipelined)
        if config_name == "fashion" and dtype == "float32":
            model, params = trainer.model, holder["state"].params
            x = jnp.ones((64, 28, 28, 1), jnp.float32)
            t = jnp.full((64,), 100, jnp.int32)
            forward = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))
            row["forward64_ms"] = 1e3 * per_call(lambda: forward(params, x, t),
                                                 jax.block_until_ready, 50)
        rows.append(row)
        print(row, flush=True)
        if profile:
            trace_dir = os.path.join(out_dir, f"trace_{name}")
            row["top_kernels"] = gpu_trace.jax_profile(run, trace_dir, keep_trace=True)
            gpu_trace.print_kernels(f"JAX {name}", row["top_kernels"])


def torch_step(rows, side, config_name, batch, profile: bool):
    torch = side.torch
    config = bm.bench_config(config_name, batch)
    net, run = side.train_step(config)
    synced = per_call(run, side.sync, 1, reps=15)
    pipelined = per_call(run, side.sync, 20, reps=3)
    row = dict(part="step", config=config_name, variant="torch_eager", dtype="float32",
               batch=batch, synced_ms=1e3 * synced, pipelined_ms=1e3 * pipelined,
               images_per_s=batch / pipelined)
    if config_name == "fashion":
        net.eval()
        x = torch.ones(64, 1, 28, 28, device=side.device)
        t = torch.full((64,), 100, device=side.device, dtype=torch.long)
        with torch.no_grad():
            row["forward64_ms"] = 1e3 * per_call(lambda: net(x, t), side.sync, 50)
        net.train()
    if profile:
        from torch.profiler import ProfilerActivity, profile as tprofile
        with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                run()
            side.sync()
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25,
                                          max_name_column_width=70)
        row["profile_table"] = table
        print(f"--- PyTorch eager {config_name}: 5 steps\n{table}", flush=True)
    rows.append(row)
    print({k: v for k, v in row.items() if k != "profile_table"}, flush=True)


# --- Main --------------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--deadline", type=float, default=260, help="seconds for the study")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--parts", default="micro,step,cifar")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    parts = args.parts.split(",")
    jax.block_until_ready(jnp.ones(()))
    side = None if args.no_torch else bm.TorchSide()
    rows = []
    result = dict(meta=dict(device=str(jax.devices()[0].device_kind), versions=bm.versions()),
                  rows=rows, errors=[])

    def save():
        with open(os.path.join(args.out, "profile.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)

    def part(label, fn, *a, **kw):
        left = args.deadline - (time.perf_counter() - START)
        if left < 15:
            print(f"SKIPPED (deadline): {label}", flush=True)
            result["errors"].append(dict(part=label, error="skipped: deadline"))
            return
        print(f"[{time.perf_counter() - START:6.1f}s] {label}", flush=True)
        try:
            fn(*a, **kw)
        except Exception as e:  # noqa: BLE001  (a failing part must not stop the others)
            traceback.print_exc()
            result["errors"].append(dict(part=label, error=f"{type(e).__name__}: {e}"[:1500]))
        save()

    fashion = bm.bench_config("fashion", args.batch)
    if "micro" in parts:
        part("micro", micro, rows, fashion, args.batch, side)
    dw = best(rows, "depthwise", "fwd_bwd_ms") if "micro" in parts else "shifted_stacked"
    up = best(rows, "upsample", "fwd_bwd_ms") if "micro" in parts else "lax"
    print(f"chosen from the micro study: depthwise={dw} upsample={up}", flush=True)
    if "step" in parts:
        if side is not None:
            part("torch fashion step", torch_step, rows, side, "fashion", args.batch, True)
        part("jax fashion default", step_variant, rows, "default", "fashion", args.batch,
             "float32", "lax", "lax", args.out, True)
        if (dw, up) != ("lax", "lax"):
            part("jax fashion best", step_variant, rows, "best", "fashion", args.batch,
                 "float32", dw, up, args.out, True)
        part("jax fashion best bf16", step_variant, rows, "best_bf16", "fashion", args.batch,
             "bfloat16", dw, up, args.out, False)
    if "cifar" in parts:
        if side is not None:
            part("torch cifar10 step", torch_step, rows, side, "cifar10", args.batch, False)
        part("jax cifar10 bf16", step_variant, rows, "cifar_bf16", "cifar10", args.batch,
             "bfloat16", "lax", up, args.out, True)
        part("jax cifar10 f32", step_variant, rows, "cifar_f32", "cifar10", args.batch,
             "float32", "lax", up, args.out, False)
    save()
    print("=== summary", flush=True)
    for r in rows:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
               if k not in ("top_kernels", "profile_table")})
    for e in result["errors"]:
        print("ERROR", e)


if __name__ == "__main__":
    main()
