"""This project against the PyTorch design, side by side on one device.

One process measures, for each chosen config:
  train   images/s of the JAX train step (float32; with --steps-per-call k > 1
          also k steps per compiled call), of the design's PyTorch loop (eager)
          and of the same loop with `torch.compile(model)`, in its default mode
          and in mode='reduce-overhead' (CUDA graphs); compile time (JAX: first
          step; torch.compile: first call) and peak device memory;
  bf16    the JAX train step with the model computing in bfloat16 (params,
          optimizer and loss in float32);
  sample  64 images x 200 DDPM steps and x 50 DDIM steps: JAX's
          `p_sample_loop` / `ddim_sample_loop` (one compiled scan each)
          against a Python loop of the design's `p_sample` under
          `torch.no_grad()`, and a DDIM loop written the same way;
  loss    bfloat16 vs float32 losses over N train steps from the same
          initialisation, batches, timesteps and noise.
Every ratio is "JAX speedup" = PyTorch time / JAX time. The data is synthetic
(uniform in [-1, 1]), so nothing here needs TFDS or TensorFlow. Every training
and sampling result also holds its model FLOPs per image and its model-FLOPs
utilisation (`mfu`) against the device's peak for its dtype (`bench/flops.py`:
training = 3 x XLA's forward count, sampling = steps x forward; the same model
FLOPs for JAX and PyTorch).

Fairness: the PyTorch side is made no slower than the design's own code. Its
diffusion constants live on the device (the design's `extract` copies t to
the host, a device sync, in every call), the sampling loops keep no
trajectory, cuDNN autotuning is on and float32 matmuls may use TF32 (as JAX
does by default on GPU). The CIFAR-10 config's dropout (not in the design)
is added to the PyTorch ResNet blocks where `ddpm_jax.models.unet` has it. The JAX
step does more work than the PyTorch loop: it also updates an EMA of the
weights and checks loss and gradients for NaN/inf.

    .venv/bin/python -m bench.benchmark --configs fashion --out bench.json
    .venv/bin/python -m bench.benchmark --quick ...        # CPU: few steps, scaled sampling
    .venv/bin/python -m bench.benchmark --report a.json b.json   # one table from several runs
"""
import os
import sys

from ddpm_jax.runtime import cpu_defaults

# As train.py and sample.py run, for JAX and PyTorch alike (before JAX starts).
cpu_defaults.apply_cpu_defaults(restart=__name__ == "__main__")
# PyTorch shares the GPU with JAX: JAX must not take 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import types  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from bench import flops  # noqa: E402
from bench.report import markdown_table  # noqa: E402
from ddpm_jax import diffusion  # noqa: E402
from ddpm_jax.models import unet  # noqa: E402
from ddpm_jax.runtime import parallel  # noqa: E402
from ddpm_jax.training import train_state  # noqa: E402
from ddpm_jax.training.train_step import make_train_step  # noqa: E402
from ddpm_jax.schedules import make_schedule  # noqa: E402

# Absent on the GPU machine (ml_collections travels there as a wheel, see run_gpu.sh).
HEAVY_MODULES = ("tensorflow", "tensorflow_datasets")
SAMPLE_IMAGES, DDPM_STEPS, DDIM_STEPS = 64, 200, 50
PARTS = ("train", "bf16", "sample", "loss")
# torch_compile_ro: torch.compile(mode="reduce-overhead"), CUDA graphs on a GPU.
FRAMEWORKS = ("jax", "torch", "torch_compile", "torch_compile_ro")


# --- Configs -----------------------------------------------------------------------------------

def bench_config(name: str, batch_size: int, dtype: str = "float32"):
    """configs/fashion.py or configs/cifar10.py as plain namespaces (no ml_collections).

    Only the fields the train step and `train_state` read; CIFAR-10's warmup
    is left out (a constant learning rate costs the same).
    """
    ns = types.SimpleNamespace
    if name == "fashion":
        return ns(
            name=name, seed=0,
            data=ns(image_size=28, channels=1),
            diffusion=ns(timesteps=200, beta_schedule="linear", loss_type="huber"),
            model=ns(dim=28, init_dim=None, dim_mults=(1, 2, 4), with_time_emb=True,
                     resnet_block_groups=8, use_convnext=True, convnext_mult=2, dropout=0.0,
                     dtype=dtype),
            optim=ns(learning_rate=1e-3, warmup_steps=0, grad_clip_norm=0.0, b1=0.9, b2=0.999,
                     eps=1e-8, ema_decay=0.995),
            training=ns(batch_size=batch_size))
    if name == "cifar10":
        return ns(
            name=name, seed=0,
            data=ns(image_size=32, channels=3),
            diffusion=ns(timesteps=1000, beta_schedule="linear", loss_type="l2"),
            model=ns(dim=128, init_dim=None, dim_mults=(1, 2, 2, 2), with_time_emb=True,
                     resnet_block_groups=32, use_convnext=False, convnext_mult=2, dropout=0.1,
                     dtype=dtype),
            optim=ns(learning_rate=2e-4, warmup_steps=0, grad_clip_norm=1.0, b1=0.9, b2=0.999,
                     eps=1e-8, ema_decay=0.9999),
            training=ns(batch_size=batch_size))
    raise ValueError(f"unknown config {name!r}; valid choices: ['fashion', 'cifar10']")


def synthetic_images(config, batch: int, seed: int = 0) -> np.ndarray:
    """Uniform noise in [-1, 1], NHWC float32."""
    size, channels = config.data.image_size, config.data.channels
    return np.random.default_rng(seed).uniform(
        -1, 1, (batch, size, size, channels)).astype(np.float32)


# --- The JAX train step ------------------------------------------------------------------------

class JaxTrainer:
    """A config's model, optimizer and schedule; its train step compiled on first use (ahead
    of time, as `loop.train` does, so that it cannot recompile). steps_per_call k > 1:
    the step program runs k steps on batches stacked [k, B, ...]."""

    def __init__(self, config, make_train_step, steps_per_call: int = 1):
        self.config, self._make_train_step, self.k = config, make_train_step, steps_per_call
        self._forward_flops = None
        self.mesh = parallel.make_mesh(jax.devices()[:1])
        self.model = unet.create_model(config)
        self.optimizer = train_state.make_optimizer(config)
        self.schedule = make_schedule(config.diffusion.beta_schedule, config.diffusion.timesteps)
        self._init = jax.jit(
            lambda key: train_state.create_train_state(config, self.model, self.optimizer, key),
            out_shardings=parallel.replicated(self.mesh))
        self._step, self.compile_s = None, None

    @property
    def step(self):
        if self._step is None:
            abstract_state = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                               sharding=parallel.replicated(self.mesh)),
                jax.eval_shape(self._init, jax.random.key(0)))
            size, channels = self.config.data.image_size, self.config.data.channels
            shape = (self.config.training.batch_size, size, size, channels)
            abstract_images = jax.ShapeDtypeStruct(
                shape if self.k == 1 else (self.k, *shape), jnp.float32,
                sharding=self._sharding(self.k > 1))
            start = time.perf_counter()
            self._step = self._make_train_step(
                self.config, self.model, self.schedule, self.optimizer, self.mesh,
                self.k).lower(abstract_state, abstract_images).compile()
            self.compile_s = time.perf_counter() - start
        return self._step

    def init_state(self, seed: int = 0):
        return self._init(jax.random.key(seed))

    def _sharding(self, stacked: bool):
        return (parallel.stacked_batch_sharded if stacked else parallel.batch_sharded)(self.mesh)

    def put(self, images: np.ndarray):
        """A batch [B, H, W, C], or k of them stacked [k, B, H, W, C], onto the mesh."""
        return jax.device_put(images, self._sharding(images.ndim == 5))

    def forward_flops_per_image(self) -> float:
        """XLA's count of the compiled forward pass at the training batch, per image."""
        if self._forward_flops is None:
            params = jax.eval_shape(self._init, jax.random.key(0)).params
            batch = self.config.training.batch_size
            self._forward_flops = flops.forward_flops_by_xla(
                self.model, params, batch, self.config.data.image_size) / batch
        return self._forward_flops


def compiled_bytes(compiled) -> int:
    """XLA's own estimate of a program's peak memory: arguments + outputs - aliased + temps."""
    m = compiled.memory_analysis()
    if m is None:
        return 0
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)


def jax_peak_bytes():
    """The device's peak memory in use so far in this process (GPU/TPU), else None."""
    stats = jax.devices()[0].memory_stats()
    return stats.get("peak_bytes_in_use") if stats else None


def pipelined_seconds(fn, sync, calls: int, windows: int = 3) -> float:
    """Median over `windows` of (wall time of `calls` calls of `fn` dispatched back to back,
    then one sync) / `calls`: as a training or sampling loop runs, the host free to queue
    work ahead of the device."""
    times = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn()
        sync(out)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def time_steps(run_step, sync, warmup: int, steps: int) -> dict:
    """Seconds per step after `warmup` synced calls: `step_s` pipelined (over windows of
    `steps` steps; the images/s reported come from it), `synced_step_s` the median of
    `steps` calls each followed by a sync (host and device never overlap), kept for
    comparison with earlier runs."""
    for _ in range(warmup):
        sync(run_step())
    synced = []
    for _ in range(steps):
        start = time.perf_counter()
        sync(run_step())
        synced.append(time.perf_counter() - start)
    return dict(step_s=pipelined_seconds(run_step, sync, steps),
                synced_step_s=statistics.median(synced), step_times_s=synced)


def jax_train(trainer: JaxTrainer, warmup: int, steps: int, trace_dir: str = "") -> dict:
    """Timings per call of the step program (k steps if steps_per_call k > 1); images/s over
    all its steps; XLA's FLOP count of the whole step program per image (k = 1: a scan's
    count would hold its body once)."""
    batch, k = trainer.config.training.batch_size, trainer.k
    images = synthetic_images(trainer.config, batch)
    images = trainer.put(images if k == 1 else np.stack([images] * k))
    holder = {"state": trainer.init_state()}
    step = trainer.step  # compiles
    jax.block_until_ready(holder["state"])

    def run_step():
        holder["state"], metrics = step(holder["state"], images)
        return holder["state"], metrics

    start = time.perf_counter()
    jax.block_until_ready(run_step())
    first_run_s = time.perf_counter() - start
    timing = time_steps(run_step, jax.block_until_ready, max(warmup - 1, 0), steps)
    result = dict(images_per_s=batch * k / timing["step_s"], **timing, steps_per_call=k,
                  compile_s=trainer.compile_s, first_step_s=trainer.compile_s + first_run_s,
                  program_bytes=compiled_bytes(step), device_peak_bytes=jax_peak_bytes(),
                  xla_step_flops_per_image=flops.xla_flops(step) / batch if k == 1 else None)
    if trace_dir:  # where the step's device time goes: its top kernels
        import gpu_trace
        result["top_kernels"] = gpu_trace.jax_profile(run_step, trace_dir)
        gpu_trace.print_kernels(trace_dir, result["top_kernels"])
    return result


def bf16_loss_check(trainers, config_name: str, steps: int, batch: int) -> dict:
    """Losses of `steps` float32 and bfloat16 steps from one init on the same fixed data.

    Both runs share the state's key, so each step draws the same timesteps and
    noise: the per-step differences come from the compute dtype alone.
    """
    pool = synthetic_images(trainers["float32"].config, 512, seed=1)
    curves = {}
    for dtype, trainer in trainers.items():
        state = trainer.init_state(seed=0)
        losses = []
        for i in range(steps):
            images = pool[(i * batch + np.arange(batch)) % len(pool)]
            state, metrics = trainer.step(state, trainer.put(images))
            losses.append(metrics["loss"])
        curves[dtype] = np.asarray(jax.device_get(losses), np.float64)
    f32, bf16 = curves["float32"], curves["bfloat16"]
    tail = max(steps // 5, 1)
    se = math.sqrt((f32[-tail:].var() + bf16[-tail:].var()) / tail)
    diff = bf16[-tail:].mean() - f32[-tail:].mean()
    return dict(config=config_name, steps=steps, batch=batch, tail=tail,
                float32_first=f32[0], bfloat16_first=bf16[0],
                float32_tail_mean=f32[-tail:].mean(), bfloat16_tail_mean=bf16[-tail:].mean(),
                tail_diff=diff, noise_se=se, within_noise=bool(abs(diff) <= 2 * se),
                float32_curve=f32.tolist(), bfloat16_curve=bf16.tolist())


# --- JAX sampling ------------------------------------------------------------------------------

def jax_sampling(trainer: JaxTrainer, sampler: str, num_steps: int) -> dict:
    """Seconds of one compiled sampling scan over 64 images (compiled ahead, then run twice:
    the first run's extra time, if any, is warm-up)."""
    config, model = trainer.config, trainer.model
    size, channels = config.data.image_size, config.data.channels
    shape = (SAMPLE_IMAGES, size, size, channels)
    params = trainer.init_state().params

    def sample(params, key):
        def denoise(x, t):
            return model.apply({"params": params}, x, t, train=False)
        if sampler == "ddpm":
            return diffusion.p_sample_loop(make_schedule("linear", num_steps), denoise, shape, key)
        return diffusion.ddim_sample_loop(trainer.schedule, denoise, shape, key, num_steps)

    key = jax.random.key(0)
    start = time.perf_counter()
    compiled = jax.jit(sample).lower(params, key).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(params, key))
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(params, jax.random.key(1)))
    seconds = time.perf_counter() - start
    if not np.isfinite(np.asarray(out)).all():
        raise FloatingPointError(f"JAX {sampler} samples are not finite")
    return dict(seconds=seconds, compile_s=compile_s, program_bytes=compiled_bytes(compiled),
                device_peak_bytes=jax_peak_bytes())


# --- PyTorch -----------------------------------------------------------------------------------

class TorchSide:
    """The design's network and loops in PyTorch, on the GPU if there is one."""

    def __init__(self):
        import torch
        from torch_reference import unet as torch_ref_unet
        self.torch, self.ref = torch, torch_ref_unet
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.set_float32_matmul_precision("high")  # TF32, as JAX's default on GPU

    def settings(self) -> dict:
        torch = self.torch
        out = dict(device=str(self.device), threads=torch.get_num_threads())
        if self.device.type == "cuda":
            out.update(name=torch.cuda.get_device_name(), cudnn_benchmark=True,
                       float32_matmul_precision=torch.get_float32_matmul_precision(),
                       cudnn_version=torch.backends.cudnn.version())
        return out

    def sync(self, _=None):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def reset_peak(self):
        if self.device.type == "cuda":
            self.torch.cuda.reset_peak_memory_stats()

    def peak_bytes(self):
        if self.device.type == "cuda":
            return self.torch.cuda.max_memory_allocated()
        return None

    def model(self, config):
        """The design's Unet for `config`, with dropout before each ResNet block's block2 (where
        ddpm_jax.models.unet has it) when the config asks for dropout."""
        torch, m = self.torch, config.model
        torch.manual_seed(0)
        net = self.ref.Unet(dim=m.dim, dim_mults=m.dim_mults, channels=config.data.channels,
                            with_time_emb=m.with_time_emb,
                            resnet_block_groups=m.resnet_block_groups,
                            use_convnext=m.use_convnext, convnext_mult=m.convnext_mult)
        if m.dropout:
            for block in net.modules():
                if isinstance(block, self.ref.ResnetBlock):
                    block.block2 = torch.nn.Sequential(torch.nn.Dropout(m.dropout), block.block2)
        return net.to(self.device)

    def constants(self, timesteps: int):
        """The design's constants (ddpm_jax's float32 values) as device tensors."""
        schedule = make_schedule("linear", timesteps)
        return {k: self.torch.tensor(np.asarray(getattr(schedule, k)), device=self.device)
                for k in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")}

    def train_step(self, config, compile_mode=None):
        """One step of the design's training loop (Adam, p_losses; plus clipping where the
        config clips) on synthetic images: (the network, a function of nothing that runs
        the step and returns the loss). compile_mode: None (eager), or torch.compile's mode
        for the network ('default', or 'reduce-overhead': CUDA graphs)."""
        torch = self.torch
        functional = torch.nn.functional
        losses = dict(l1=functional.l1_loss, l2=functional.mse_loss,
                      huber=functional.smooth_l1_loss)
        loss_fn = losses[config.diffusion.loss_type]
        net = self.model(config).train()
        forward = net if compile_mode is None else torch.compile(net, mode=compile_mode)
        # CUDA graphs reuse their output buffers: each step starts a new graph run.
        mark_step = (torch.compiler.cudagraph_mark_step_begin
                     if compile_mode == "reduce-overhead" else lambda: None)
        optimizer = torch.optim.Adam(net.parameters(), lr=config.optim.learning_rate,
                                     betas=(config.optim.b1, config.optim.b2),
                                     eps=config.optim.eps)
        c = self.constants(config.diffusion.timesteps)
        batch = config.training.batch_size
        images = torch.as_tensor(synthetic_images(config, batch).transpose(0, 3, 1, 2),
                                 device=self.device)
        clip = config.optim.grad_clip_norm

        def run_step():
            mark_step()
            optimizer.zero_grad()
            t = torch.randint(0, config.diffusion.timesteps, (batch,), device=self.device)
            noise = torch.randn_like(images)
            x_noisy = (c["sqrt_alphas_cumprod"][t].view(-1, 1, 1, 1) * images
                       + c["sqrt_one_minus_alphas_cumprod"][t].view(-1, 1, 1, 1) * noise)
            loss = loss_fn(noise, forward(x_noisy, t))
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            optimizer.step()
            return loss

        return net, run_step

    def train(self, config, warmup: int, steps: int, compile_mode=None) -> dict:
        """Images/s, first-step time and peak memory of `train_step`."""
        _, run_step = self.train_step(config, compile_mode)
        batch = config.training.batch_size
        self.reset_peak()
        start = time.perf_counter()
        self.sync(run_step())
        first_step_s = time.perf_counter() - start
        timing = time_steps(run_step, self.sync, max(warmup - 1, 0), steps)
        return dict(images_per_s=batch / timing["step_s"], **timing,
                    first_step_s=first_step_s, device_peak_bytes=self.peak_bytes())

    def sampling(self, config, sampler: str, num_steps: int) -> dict:
        """Seconds of the design's Python loop (DDPM) or the same loop for DDIM (eta 0), after
        one warm-up forward pass."""
        torch = self.torch
        size, channels = config.data.image_size, config.data.channels
        net = self.model(config).eval()
        if sampler == "ddpm":
            s = make_schedule("linear", num_steps)
            timesteps = list(range(num_steps - 1, -1, -1))
        else:
            s = make_schedule("linear", config.diffusion.timesteps)
            timesteps = [int(t) for t in diffusion.ddim_timesteps(config.diffusion.timesteps,
                                                                  num_steps)]
        s = {k: np.asarray(getattr(s, k), np.float64) for k in (
            "betas", "sqrt_recip_alphas", "sqrt_one_minus_alphas_cumprod", "posterior_variance",
            "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "alphas_cumprod")}
        generator = torch.Generator(self.device).manual_seed(0)
        x = torch.randn((SAMPLE_IMAGES, channels, size, size), device=self.device,
                        generator=generator)

        def full(t):
            return torch.full((SAMPLE_IMAGES,), t, device=self.device, dtype=torch.long)

        with torch.no_grad():
            self.sync(net(x, full(timesteps[0])))
            self.reset_peak()
            start = time.perf_counter()
            for i, t in enumerate(timesteps):
                eps = net(x, full(t))
                if sampler == "ddpm":  # the design's p_sample
                    mean = s["sqrt_recip_alphas"][t] * (
                        x - s["betas"][t] * eps / s["sqrt_one_minus_alphas_cumprod"][t])
                    x = mean if t == 0 else mean + math.sqrt(s["posterior_variance"][t]) * (
                        torch.randn(x.shape, device=self.device, generator=generator))
                else:  # DDIM, eta = 0
                    x_start = (s["sqrt_recip_alphas_cumprod"][t] * x
                               - s["sqrt_recipm1_alphas_cumprod"][t] * eps)
                    prev = timesteps[i + 1] if i + 1 < len(timesteps) else None
                    alpha_bar_prev = 1.0 if prev is None else s["alphas_cumprod"][prev]
                    x = math.sqrt(alpha_bar_prev) * x_start + math.sqrt(1 - alpha_bar_prev) * eps
            self.sync()
            seconds = time.perf_counter() - start
        if not torch.isfinite(x).all():
            raise FloatingPointError(f"PyTorch {sampler} samples are not finite")
        return dict(seconds=seconds, device_peak_bytes=self.peak_bytes())


# --- The run -----------------------------------------------------------------------------------

def versions() -> dict:
    import flax
    import jaxlib
    out = dict(python=platform.python_version(), jax=jax.__version__, jaxlib=jaxlib.__version__,
               flax=flax.__version__, optax=optax.__version__, numpy=np.__version__)
    try:
        import torch
        out["torch"] = torch.__version__
    except ImportError:
        out["torch"] = "not installed"
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


class Recorder:
    """Results and errors, written to the JSON file after each one (a later crash keeps them)."""

    def __init__(self, path: str, meta: dict):
        self.path, self.data = path, dict(meta=meta, results=[], errors=[])
        self.write()

    def write(self):
        if self.path:
            with open(self.path, "w") as f:
                json.dump(self.data, f, indent=1, default=float)

    def run(self, what: dict, fn):
        """Run `fn()`, record its dict under the keys of `what`; record a failure and go on."""
        label = " ".join(f"{k}={v}" for k, v in what.items())
        print(f"[{time.strftime('%H:%M:%S')}] {label} (load {os.getloadavg()[0]:.1f}) ...",
              flush=True)
        start = time.perf_counter()
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001  (one failing part must not stop the others)
            tb = traceback.format_exc()
            print(tb, flush=True)
            self.data["errors"].append(dict(what, error=f"{type(e).__name__}: {e}"[:2000],
                                             traceback=tb[-4000:]))
            self.write()
            return None
        result = dict(what, **result, wall_s=time.perf_counter() - start,
                      load_avg=os.getloadavg()[0], rss_peak_bytes=rss_peak_bytes())
        brief = {k: v for k, v in result.items() if not isinstance(v, list)}
        print(f"    {brief}", flush=True)
        self.data["results"].append(result)
        self.write()
        return result


def rss_peak_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_benchmark(args) -> dict:
    device = jax.devices()[0]
    jax.block_until_ready(jnp.ones(()))  # start JAX's backend before PyTorch loads its libraries
    torch_side = TorchSide() if set(FRAMEWORKS[1:]) & set(args.frameworks) else None
    meta = dict(
        command=" ".join([os.path.basename(sys.executable)] + sys.argv),
        quick=args.quick, time=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        jax_device=f"{device.platform}: {device.device_kind}", cpu=cpu_model(),
        cpu_count=os.cpu_count(), load_avg_start=os.getloadavg(), versions=versions(),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
        torch=torch_side.settings() if torch_side else None,
        sample_steps=dict(ddpm=args.ddpm_steps, ddim=args.ddim_steps))
    print(json.dumps(meta, indent=1, default=str), flush=True)
    rec = Recorder(args.out, meta)
    peaks = meta["peak_flops"] = {}

    def with_mfu(result: dict, forward_flops: float, per_image: float, dtype: str) -> dict:
        """`result` with model FLOPs per image (`per_image` forward passes of `forward_flops`
        each) and the model-FLOPs utilisation against the device's peak for `dtype`."""
        if dtype not in peaks:
            peaks[dtype] = flops.peak_flops(device, dtype)
        model_flops = per_image * forward_flops
        rate = result.get("images_per_s") or SAMPLE_IMAGES / result["seconds"]
        return dict(result, forward_flops_per_image=forward_flops,
                    model_flops_per_image=model_flops, peak_flops=peaks[dtype],
                    mfu=model_flops * rate / peaks[dtype] if peaks[dtype] else None)

    for name in args.configs:
        batch = args.batch or 128
        trainers = {}

        def trainer(dtype, batch=batch, name=name, k=1):
            if (dtype, batch, k) not in trainers:
                trainers[dtype, batch, k] = JaxTrainer(bench_config(name, batch, dtype),
                                                       make_train_step, k)
            return trainers[dtype, batch, k]

        def forward(dtype="float32"):
            """XLA's forward FLOPs per image (the model FLOPs of JAX and PyTorch alike)."""
            return trainer(dtype).forward_flops_per_image()

        def train_mfu(fn, dtype="float32"):  # training: 3 x forward per image
            return lambda: with_mfu(fn(), forward(dtype), 3, dtype)

        config = bench_config(name, batch)
        timing = dict(warmup=args.warmup, steps=args.steps)
        trace, trace16 = (os.path.join(args.trace_dir, f"trace_{name}_{d}") if args.trace_dir
                          else "" for d in ("f32", "bf16"))
        base = dict(config=name, label=args.label)
        for k in args.steps_per_call:
            what = dict(base, part="train", framework="jax", batch=batch, steps_per_call=k)
            if "train" in args.parts and "jax" in args.frameworks:
                rec.run(dict(what, dtype="float32"), train_mfu(
                    lambda k=k: jax_train(trainer("float32", k=k), **timing,
                                          trace_dir=trace if k == 1 else "")))
            if "bf16" in args.parts and "jax" in args.frameworks:
                rec.run(dict(what, dtype="bfloat16"), train_mfu(
                    lambda k=k: jax_train(trainer("bfloat16", k=k), **timing,
                                          trace_dir=trace16 if k == 1 else ""), "bfloat16"))
            if k == 1 and "train" in args.parts and "torch" in args.frameworks:
                rec.run(dict(base, part="train", framework="torch", dtype="float32",
                             batch=batch),
                        train_mfu(lambda: torch_side.train(config, **timing)))
        if "sample" in args.parts:
            for sampler, steps, full in (("ddpm", args.ddpm_steps, DDPM_STEPS),
                                         ("ddim", args.ddim_steps, DDIM_STEPS)):
                what = dict(base, part="sample", sampler=sampler, images=SAMPLE_IMAGES,
                            steps=steps, reported_steps=full)
                runners = []
                if "jax" in args.frameworks:
                    runners.append(("jax", lambda s=sampler, n=steps:
                                    jax_sampling(trainer("float32"), s, n)))
                if "torch" in args.frameworks:
                    runners.append(("torch", lambda s=sampler, n=steps:
                                    torch_side.sampling(config, s, n)))
                for framework, fn in runners:  # sampling: one forward pass per step and image
                    rec.run(dict(what, framework=framework),
                            lambda fn=fn, scale=full / steps, full=full: with_mfu(
                                scaled(fn(), scale), forward(), full, "float32"))
        if "loss" in args.parts and "jax" in args.frameworks:
            loss_batch = args.loss_batch or batch
            rec.run(dict(base, part="loss", framework="jax"),
                    lambda: bf16_loss_check({d: trainer(d, loss_batch)
                                             for d in ("float32", "bfloat16")},
                                            name, args.loss_steps, loss_batch))
        for framework, mode in (("torch_compile", "default"),
                                ("torch_compile_ro", "reduce-overhead")):
            if "train" in args.parts and framework in args.frameworks:
                rec.run(dict(base, part="train", framework=framework, dtype="float32",
                             batch=batch),
                        train_mfu(lambda mode=mode: torch_side.train(config, **timing,
                                                                     compile_mode=mode)))
        trainers.clear()
    rec.data["meta"]["load_avg_end"] = os.getloadavg()
    rec.write()
    return rec.data


def scaled(result: dict, scale: float) -> dict:
    """A sampling result measured over fewer steps, extrapolated to the reported count."""
    return dict(result, measured_s=result["seconds"], seconds=result["seconds"] * scale)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="fashion,cifar10",
                        help="comma-separated: fashion, cifar10")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {PARTS}")
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS),
                        help=f"comma-separated: {FRAMEWORKS}")
    parser.add_argument("--batch", type=int, default=0, help="training batch (default 128)")
    parser.add_argument("--steps-per-call", default="1",
                        help="comma-separated: the JAX train step's steps per compiled call "
                             "(config.training.steps_per_call), each measured, e.g. 1,8")
    parser.add_argument("--label", default="",
                        help="names this run's rows in the table, e.g. the XLA_FLAGS variant")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed training steps first (the first one compiles)")
    parser.add_argument("--ddpm-steps", type=int, default=DDPM_STEPS,
                        help=f"DDPM steps to run; times are scaled to {DDPM_STEPS}")
    parser.add_argument("--ddim-steps", type=int, default=DDIM_STEPS,
                        help=f"DDIM steps to run; times are scaled to {DDIM_STEPS}")
    parser.add_argument("--loss-steps", type=int, default=200,
                        help="train steps of the bf16-vs-f32 loss check")
    parser.add_argument("--loss-batch", type=int, default=0,
                        help="batch of the loss check (default: the training batch)")
    parser.add_argument("--quick", action="store_true",
                        help="CPU smoke run: 2 timed steps after 1, sampling 10 DDPM and 5 DDIM "
                             "steps (scaled), loss check 10 steps at batch 16")
    parser.add_argument("--out", default="", help="JSON file for the results")
    parser.add_argument("--trace-dir", default="",
                        help="profile the JAX float32 step there and list its top GPU kernels")
    parser.add_argument("--report", nargs="+", metavar="JSON",
                        help="print the table of earlier runs' JSON files and exit")
    args = parser.parse_args(argv)
    if args.report:
        return args
    for field, valid in (("configs", ("fashion", "cifar10")), ("parts", PARTS),
                         ("frameworks", FRAMEWORKS)):
        values = [v for v in getattr(args, field).split(",") if v]
        bad = [v for v in values if v not in valid]
        if bad:
            parser.error(f"--{field}: unknown {bad}; valid choices: {list(valid)}")
        setattr(args, field, values)
    if args.quick:
        defaults = parser.parse_args([])
        for field, value in (("steps", 2), ("warmup", 1), ("ddpm_steps", 10), ("ddim_steps", 5),
                             ("loss_steps", 10), ("loss_batch", 16)):
            if getattr(args, field) == getattr(defaults, field):
                setattr(args, field, value)
    try:
        args.steps_per_call = [int(v) for v in args.steps_per_call.split(",") if v]
    except ValueError:
        parser.error(f"--steps-per-call: integers separated by commas, got "
                     f"{args.steps_per_call!r}")
    if not args.steps_per_call or min(args.steps_per_call) < 1:
        parser.error("--steps-per-call: each value must be >= 1")
    for field in ("steps", "ddpm_steps", "ddim_steps", "loss_steps"):
        if getattr(args, field) < 1:
            parser.error(f"--{field.replace('_', '-')} must be >= 1")
    if args.ddpm_steps > DDPM_STEPS or args.ddim_steps > DDIM_STEPS:
        parser.error(f"--ddpm-steps <= {DDPM_STEPS} and --ddim-steps <= {DDIM_STEPS}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        runs = []
        for path in args.report:
            try:
                with open(path) as f:
                    runs.append(json.load(f))
            except (OSError, ValueError) as e:
                print(f"skipping {path}: {e}")
        print(markdown_table(runs))
        return
    data = run_benchmark(args)
    heavy = [m for m in HEAVY_MODULES if m in sys.modules]
    if heavy:
        print(f"WARNING: this run imported {heavy}, which the GPU machine does not have")
    print()
    print(markdown_table([data]))


if __name__ == "__main__":
    main()
