"""Sample quality of training recipes and samplers at an equal budget, against the design.

Trains one network per recipe (`variants.RECIPES`: config overrides of --config,
e.g. the terminal-SNR schedule, the v / x0 objectives, Min-SNR weighting) and, unless
--no_torch, the design itself (the tests' reference: `torch_reference/unet.py` and the loop
of `torch_reference/diffusion.py`, Adam, no EMA, on the CPU), all from the design's initial
weights, on the same batches and with the same timesteps and noise (`train_step.step_draws`),
for --steps steps of --batch_size. The design and the `design` recipe are one run in two
frameworks, and differ only by float rounding. Then samples --num_samples images of each
variant of each network and scores them with the project's classifier: the Fréchet
distance of its features against the test split ("FD"), the entropy of the
predicted-class histogram, the time per image of the sampler (`generate`'s sampling time,
compilation excluded, / N) and, for the `design` recipe, bits/dim of --bpd_images test
images. Variants (`variants`), named `{recipe}/{params}-{sampler}-{step}`:

  design-ddpm200-eq11   the design's own code end to end: its network, its sampler
                        (Equation 11) in PyTorch, its own noise
  designnet-...         the design's network through this project's sampler
  {raw,ema,emaold}-...  this project: raw parameters, the EMA (with `optim.ema_warmup`) and
                        the EMA without warmup (the behaviour before `optim.ema_warmup`)
  ...-{ddpm200,ddim50,dpmpp2m20,...}-{eq11,clip}  the sampler and its step

--variants are sampled on the `design` recipe, --recipe_variants on every other one. Every
variant but `design-` samples from the same noise, whatever the network (`sampling.generate`
with one seed and one image shape: image i starts from the same x_T), so any two of them
are compared image by image: the ratio of their distances with a 95 % paired bootstrap
interval (the same resampled image indices for both), which says whether a difference is
larger than the meter's noise at this N. Compared: each pair of COMPARISONS within a
recipe; every variant against THE reference, `design/raw-ddpm{T}-eq11` (the design's
sampler on the design's recipe, equal to the design's code number for number:
tests/sampling_test.py); and every other sampler against DDPM with all T steps on the same
parameters.

At each of --eval_at steps, raw / EMA / EMA-without-warmup of the `design` recipe are also
scored with --eval_sampler (cheap), to see whether the EMA is worse than raw at any step.
`real-train` scores --num_samples training images: the floor of the meter at that N.
Writes <out_dir>/quality.json (rewritten after each variant), <out_dir>/grids/
<recipe>__<variant>.png (the first 64 images), <out_dir>/features.npz (each variant's
classifier features) and, unless --no_params, <out_dir>/params.msgpack (the `design`
recipe's final raw / EMA / design parameters), for re-analysis and re-sampling.

    nice -n 10 python -m experiments.quality.run --classifier_dir=CLS --out_dir=OUT
    (CLS from `python train_classifier.py --output_dir=CLS`)

Runs of other recipes on the same draws (same budget, seed, data) combine into one table,
compared image by image: `python -m experiments.quality.combine RUN_DIR RUN_DIR --out_dir=OUT`.

Without TFDS (the lent GPU): --data_npz and a --classifier_dir .msgpack written by
experiments/quality/data.py; experiments/quality/run_gpu.sh is the whole GPU call.
"""
import os

from ddpm_jax.runtime import cpu_defaults

cpu_defaults.apply_cpu_defaults(restart=__name__ == "__main__")  # before JAX starts

import argparse  # noqa: E402
import ast  # noqa: E402
import concurrent.futures  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import serialization  # noqa: E402

from ddpm_jax import config_validation, sampling  # noqa: E402
from ddpm_jax.data import input_pipeline  # noqa: E402
from ddpm_jax.evaluation import bpd, suite  # noqa: E402
from ddpm_jax.models import torch_weights, unet  # noqa: E402
from ddpm_jax.runtime import images, parallel  # noqa: E402
from ddpm_jax.training import train_state, train_step  # noqa: E402
from ddpm_jax.schedules import make_schedule  # noqa: E402

from experiments.quality import data as quality_data  # noqa: E402
from experiments.quality.variants import (DESIGN_ONLY, RECIPES, REFERENCE, REFERENCE_RECIPE,  # noqa: E402
                              PairedBootstrap, apply_overrides, compare, objective_kwargs,
                              parse_variant, table)

DEFAULT_VARIANTS = ("design-ddpm200-eq11", "designnet-ddpm200-eq11", "raw-ddpm200-eq11",
                    "ema-ddpm200-clip", "ema-ddpm200-eq11", "raw-ddpm200-clip",
                    "emaold-ddpm200-eq11", "ema-ddim50-clip", "raw-ddim50-clip")
DEFAULT_RECIPE_VARIANTS = ("ema-ddpm200-clip", "ema-ddim50-clip")


class Design:
    """The design's network, training step and sampler in PyTorch (CPU)."""

    def __init__(self, config, seed: int, threads: int):
        import torch

        from torch_reference import diffusion as torch_ref_diffusion, unet as torch_ref_unet
        self.torch, self.ref, self.config = torch, torch_ref_diffusion, config
        m = config.model
        # On a CPU shared with other processes use one thread: two OpenMP threads wait on
        # each other (a forward pass of 8 images took 3.5 s with 2 threads, 0.2 s with 1).
        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.net = torch_ref_unet.Unet(
            dim=m.dim, channels=config.data.channels, dim_mults=tuple(m.dim_mults),
            with_time_emb=m.with_time_emb, resnet_block_groups=m.resnet_block_groups,
            use_convnext=m.use_convnext, convnext_mult=m.convnext_mult)
        o = config.optim
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=o.learning_rate,
                                          betas=(o.b1, o.b2), eps=o.eps)
        self.constants = torch_ref_diffusion.Constants(
            torch_ref_diffusion.linear_beta_schedule(config.diffusion.timesteps, torch.float32))

    def state_dict(self):
        return self.net.state_dict()

    def train_step(self, batch: np.ndarray, t: np.ndarray, noise: np.ndarray) -> float:
        """The design's loop body on given timesteps and noise: p_losses, Adam."""
        nchw = lambda a: self.torch.from_numpy(a.transpose(0, 3, 1, 2).copy())  # noqa: E731
        self.net.train()
        self.optimizer.zero_grad()
        loss = self.ref.p_losses(self.constants, self.net, nchw(batch),
                                 self.torch.from_numpy(np.asarray(t, np.int64)), nchw(noise),
                                 self.config.diffusion.loss_type)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def sample(self, num_images: int, seed: int) -> np.ndarray:
        """The design's `p_sample_loop` (Equation 11, all T steps) -> NHWC images."""
        torch, size = self.torch, self.config.data.image_size
        generator = torch.Generator().manual_seed(seed)
        shape = (num_images, self.config.data.channels, size, size)
        x_T = torch.randn(shape, generator=generator)
        noises = [torch.randn(shape, generator=generator)
                  for _ in range(self.config.diffusion.timesteps)]
        self.net.eval()
        return self.ref.p_sample_loop(self.constants, self.net, x_T, noises)[-1].transpose(
            0, 2, 3, 1)


def base_config(args):
    """--config with the bench's budget (the config stays locked: overrides of fields it
    lacks raise)."""
    config = importlib.import_module(f"configs.{args.config}").get_config()
    t = config.training
    t.batch_size, t.num_train_steps, t.steps_per_call = args.batch_size, args.steps, \
        args.steps_per_call
    t.log_every = t.checkpoint_every = args.steps  # unused here; multiples of steps_per_call
    t.sample_every = 0
    config.seed = args.seed
    if args.ema_start is not None:
        config.optim.ema_start = args.ema_start
    for item in args.override:
        field, _, value = item.partition("=")
        *parents, name = field.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[name] = type(node[name])(ast.literal_eval(value) if not isinstance(node[name], str)
                                      else value)
    return config


def recipe_configs(args) -> dict:
    """{recipe: its validated config}; raises ValueError / ConfigError naming the field."""
    base = base_config(args)
    configs = {name: apply_overrides(base, name) for name in args.recipes}
    for config in configs.values():
        config_validation.resolve_paths(config)
        config_validation.validate_config(config, num_devices=jax.device_count())
        schedule_of(config)  # what a recipe needs of this checkout fails here, not on a GPU
        objective_kwargs(config)
    return configs


def schedule_of(config):
    """The schedule the config's training uses (its terminal-SNR setting, where it has one)."""
    d = config.diffusion
    extra = {"terminal_snr": d.terminal_snr} if "terminal_snr" in d else {}
    return make_schedule(d.beta_schedule, d.timesteps, **extra)


def save(results: dict, out_dir: str) -> str:
    path = os.path.join(out_dir, "quality.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=float)
    return path


class Network:
    """One recipe's model, schedule, training state (from `params0`) and compiled step."""

    def __init__(self, name: str, config, params0, mesh):
        self.name, self.config, self.mesh = name, config, mesh
        self.model = unet.create_model(config)
        self.optimizer = train_state.make_optimizer(config)
        self.schedule = schedule_of(config)
        self.apply_fn = sampling.ModelApply(self.model)
        self.objective = objective_kwargs(config)
        copy = lambda tree: jax.tree.map(np.array, tree)  # noqa: E731  (the step donates each)
        state = train_state.create_train_state(config, self.model, self.optimizer,
                                               jax.random.key(config.seed))
        self.state = jax.device_put(
            state.replace(params=copy(params0), ema_params=copy(params0),
                          opt_state=self.optimizer.init(params0)), parallel.replicated(mesh))
        self.losses, self.step_fn = [], None

    def compile(self) -> float:
        """Compiles the train step ahead of time (threads compile the recipes in parallel)."""
        begin = time.perf_counter()
        c = self.config
        k = c.training.steps_per_call
        shape = (c.training.batch_size, c.data.image_size, c.data.image_size, c.data.channels)
        sharding = (parallel.batch_sharded(self.mesh) if k == 1
                    else parallel.stacked_batch_sharded(self.mesh))
        batch = jax.ShapeDtypeStruct(shape if k == 1 else (k, *shape), jnp.float32,
                                     sharding=sharding)
        self.step_fn = train_step.make_train_step(c, self.model, self.schedule, self.optimizer,
                                                  self.mesh, k).lower(self.state, batch).compile()
        return time.perf_counter() - begin

    def train(self, batch) -> None:
        self.state, metrics = self.step_fn(self.state, batch)
        self.losses.append(metrics["loss"])

    def generate(self, params, kwargs: dict, args, num_images=None) -> sampling.SampleResult:
        image_shape = (self.config.data.image_size,) * 2 + (self.config.data.channels,)
        return sampling.generate(self.apply_fn, params, self.schedule, image_shape,
                                 num_images or args.num_samples, seed=args.seed,
                                 chunk_size=args.chunk_size, mesh=self.mesh, **kwargs,
                                 **self.objective)


def precompile(networks: dict, sampled: dict, args) -> dict:
    """Compiles every train step and every distinct sampling program at once, in threads
    (XLA compiles without the GIL; each program takes ~15-60 s on a GPU host, most of a
    short run): the sampling programs by generating one chunk of the initial network,
    which leaves them in JAX's caches for the real calls. Returns {program: seconds}."""
    jobs, seen = {}, set()
    for net in networks.values():
        jobs[f"train {net.name}"] = net.compile
        c, devices = net.config.data, jax.device_count()
        chunk = sampling.plan_chunks(args.num_samples, devices, args.chunk_size or sampling
                                     .default_chunk_size((c.image_size,) * 2, devices))
        for variant in sampled[net.name]:
            key = json.dumps([net.objective.get("objective", "eps"), variant.sampler],
                             sort_keys=True)
            if variant.params != "design" and key not in seen:
                seen.add(key)
                jobs[f"sample {net.name} {variant.label}"] = (
                    lambda net=net, v=variant: net.generate(net.state.params, v.sampler, args,
                                                            chunk.chunk_size))
    begin = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.compile_threads) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        seconds = {name: f.result() for name, f in futures.items()}
    seconds = {k: v if isinstance(v, float) else v.compile_s for k, v in seconds.items()}
    print(f"compiled {len(jobs)} programs in {time.perf_counter() - begin:.0f} s "
          f"({args.compile_threads} threads)", flush=True)
    return seconds


def run(args) -> dict:
    """Everything the module docstring lists; quality.json is rewritten after each variant,
    so a run stopped early keeps what it measured."""
    start = time.perf_counter()
    configs = recipe_configs(args)
    base = configs.get(REFERENCE_RECIPE, next(iter(configs.values())))
    sampled = {name: {v: parse_variant(v) for v in (
        args.variants if name == REFERENCE_RECIPE else args.recipe_variants)}
        for name in configs}
    eval_kwargs = parse_variant(f"raw-{args.eval_sampler}").sampler
    parallel.configure_compilation_cache(base)
    mesh = parallel.make_mesh()
    data = quality_data.open_data(base, args.data_npz)

    test_images = data.images("test")
    scorer = suite.ClassifierScorer(
        quality_data.classifier_dir(args.classifier_dir, args.out_dir), test_images)
    bootstrap = PairedBootstrap(scorer.reference, args.bootstrap)
    results = {"args": vars(args), "reference": None, "recipes": {}, "variants": {},
               "by_step": {}, "comparisons": [], "train": {}, "seconds": {}}
    real = data.images("train", args.num_samples)
    results["variants"]["real-train"] = scorer(suite.quantize(real))
    timesteps = {name: c.diffusion.timesteps for name, c in configs.items()}
    if REFERENCE_RECIPE in configs:
        results["reference"] = f"{REFERENCE_RECIPE}/{REFERENCE.format(T=timesteps['design'])}"

    # Every network and the PyTorch design start from the design's initialisation.
    design = Design(base, args.seed, args.torch_threads)
    params0 = torch_weights.torch_to_flax(
        design.state_dict(), torch_weights.abstract_params(unet.create_model(base)))
    networks = {name: Network(name, c, params0, mesh) for name, c in configs.items()}
    for name, net in networks.items():
        results["recipes"][name] = {"overrides": RECIPES[name], "objective": net.objective,
                                    "config": net.config.to_dict()}
    print(f"set up in {time.perf_counter() - start:.0f} s (data, classifier, reference "
          f"features, initial weights); compiling", flush=True)
    eval_variant = [parse_variant(f"raw-{args.eval_sampler}")] if args.eval_at else []
    results["seconds"]["compile"] = precompile(
        networks, {name: list(v.values()) + (eval_variant if name == REFERENCE_RECIPE else [])
                   for name, v in sampled.items()}, args)
    ref = networks.get(REFERENCE_RECIPE)
    emaold = jax.device_put(jax.tree.map(np.array, params0), parallel.replicated(mesh))
    keep_emaold = ref is not None and args.steps_per_call == 1 and (bool(args.eval_at) or any(
        v.params == "emaold" for v in sampled[REFERENCE_RECIPE].values()))
    decay = base.optim.ema_decay
    ema_update = jax.jit(lambda e, p: jax.tree.map(lambda a, b: decay * a + (1 - decay) * b,
                                                   e, p))
    draws = jax.jit(lambda rng, step, x: train_step.step_draws(rng, step, x, ref.schedule
                                                               .num_timesteps)[1:3])
    batches = input_pipeline.TrainIterator(data.train_source(), args.batch_size, args.seed,
                                           random_flip=base.data.random_flip)

    def params_of(net, kind):
        if kind == "designnet":
            return jax.device_put(torch_weights.torch_to_flax(
                design.state_dict(), torch_weights.abstract_params(net.model)),
                parallel.replicated(mesh))
        return {"raw": net.state.params, "ema": net.state.ema_params, "emaold": emaold}[kind]

    def score(name, sample):
        """Scores of `sample()` -> (images, sampling s, compile s)."""
        samples, sample_s, compile_s = sample()
        scores, features = scorer.scores_and_features(suite.quantize(samples))
        scores.update(sample_s=sample_s, compile_s=compile_s,
                      s_per_image=sample_s / len(samples))
        print(f"  {name}: classifier FD {scores['classifier_fd']:.1f}, class entropy "
              f"{scores['class_entropy_bits']:.2f} bits ({1e3 * scores['s_per_image']:.2f} ms "
              f"per image)", flush=True)
        return scores, samples, features

    def ours(net, kind, kwargs):
        result = net.generate(params_of(net, kind), kwargs, args)
        return result.images, result.sample_s, result.compile_s

    def torch_design():
        begin = time.perf_counter()
        samples = design.sample(args.num_samples, args.seed)
        return samples, time.perf_counter() - begin, 0.0

    features, step_features = {}, {}  # of every variant sampled from the shared noise
    torch_losses, k = [], args.steps_per_call
    begin_train = time.perf_counter()
    for step in range(k, args.steps + 1, k):
        parts = [next(batches) for _ in range(k)]
        batch = (parallel.global_batch(parts[0], mesh) if k == 1
                 else parallel.global_batches(np.stack(parts), mesh))
        noise = ([jax.device_get(draws(ref.state.rng, ref.state.step + i, part))
                  for i, part in enumerate(parts)] if ref and not args.no_torch else [])
        for net in networks.values():
            net.train(batch)
        if keep_emaold:
            emaold = ema_update(emaold, ref.state.params)
        torch_losses += [design.train_step(part, *tn) for part, tn in zip(parts, noise)]
        if step % args.log_every < k:  # reading the losses waits for the steps
            print(f"step {step}: loss " + ", ".join(
                f"{name} {float(np.mean(net.losses[-1])):.4f}" for name, net in networks.items())
                + (f", torch {torch_losses[-1]:.4f}" if torch_losses else "")
                + f" ({time.perf_counter() - start:.0f} s)", flush=True)
            if args.max_train_s and time.perf_counter() - begin_train > args.max_train_s:
                print(f"step {step}: --max_train_s={args.max_train_s} reached; every network "
                      f"stops here", flush=True)
                break
        if step in args.eval_at:
            print(f"step {step}: {args.eval_sampler} of raw / EMA / EMA without warmup",
                  flush=True)
            scored = {kind: score(f"{kind}-{args.eval_sampler}",
                                  lambda kind=kind: ours(ref, kind, eval_kwargs))
                      for kind in ("raw", "ema") + ("emaold",) * keep_emaold}
            results["by_step"][step] = {kind: s[0] for kind, s in scored.items()}
            step_features.update({f"step{step}-{kind}-{args.eval_sampler}": s[2]
                                  for kind, s in scored.items()})
            results["by_step"][step]["ema_over_raw"] = bootstrap.ratio(
                scored["ema"][2], scored["raw"][2])
            print(f"  EMA / raw: {results['by_step'][step]['ema_over_raw']}", flush=True)
            save(results, args.out_dir)
    batches.close()
    results["train"]["steps"] = step
    for net in networks.values():
        losses = np.concatenate([np.ravel(x) for x in jax.device_get(net.losses)])
        results["train"][net.name] = {"loss_last_25": float(np.mean(losses[-25:]))}
        if net is ref and torch_losses:
            gap = np.abs(losses - np.asarray(torch_losses))
            results["train"]["torch"] = {"loss_last_25": float(np.mean(torch_losses[-25:])),
                                         "gap_mean_abs": float(np.mean(gap)),
                                         "gap_last_25_mean_abs": float(np.mean(gap[-25:]))}
    results["seconds"]["train"] = time.perf_counter() - begin_train
    print(f"trained in {results['seconds']['train']:.0f} s: {results['train']}", flush=True)
    if ref and not args.no_params:
        kinds = ("raw", "ema") + ("emaold",) * keep_emaold + ("designnet",) * (not args.no_torch)
        with open(os.path.join(args.out_dir, "params.msgpack"), "wb") as f:
            f.write(serialization.msgpack_serialize(jax.device_get(
                {kind: params_of(ref, kind) for kind in kinds})))

    for kind in ("raw", "ema") if ref and args.bpd_images else ():
        per_image = bpd.bits_per_dim(ref.apply_fn, params_of(ref, kind), ref.schedule,
                                     test_images[:args.bpd_images], mesh=mesh, seed=args.seed,
                                     batch_size=args.bpd_images)
        results[f"bpd_{kind}"] = bpd.summarize_bpd(per_image)
        print(f"  bits/dim {kind}: {results[f'bpd_{kind}']['bpd']:.3f}", flush=True)
    grid_dir = os.path.join(args.out_dir, "grids")
    os.makedirs(grid_dir, exist_ok=True)
    print(f"step {step}: the variants", flush=True)
    # Round-robin over the networks (each one's first variant, then each one's second, ...):
    # a run cut short by a time limit keeps the first variants of every network.
    order = [(net, *item) for i in range(max(map(len, sampled.values())))
             for net in networks.values() for item in list(sampled[net.name].items())[i:i + 1]]
    for net, variant_name, variant in order:
        name = f"{net.name}/{variant_name}"
        if variant.params == "design":
            scores, samples, _ = score(name, torch_design)
        else:
            scores, samples, features[name] = score(
                name, lambda: ours(net, variant.params, variant.sampler))
        results["variants"][name] = {"recipe": net.name, "params": variant.params,
                                     "sampler": variant.sampler, **scores}
        results["comparisons"] = compare(bootstrap, features, timesteps, name)
        results["seconds"]["so_far"] = time.perf_counter() - start
        save(results, args.out_dir)
        np.savez(os.path.join(args.out_dir, "features.npz"), **features, **step_features)
        images.save_grid(samples[:64], os.path.join(grid_dir, name.replace("/", "__")
                                                    + ".png"), nrow=8)
    results["seconds"]["total"] = time.perf_counter() - start
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classifier_dir", required=True,
                        help="a classifier saved by train_classifier.py, or its .msgpack "
                             "written by experiments/quality/data.py")
    parser.add_argument("--out_dir", required=True, help="where quality.json and grids/ go")
    parser.add_argument("--config", default="fashion", help="the base config, configs/<name>.py")
    parser.add_argument("--data_npz", default="",
                        help="the train and test images as experiments/quality/data.py writes them "
                             "(default: the config's dataset through TFDS)")
    parser.add_argument("--recipes", nargs="+", default=[REFERENCE_RECIPE],
                        help=f"networks to train: {', '.join(RECIPES)}")
    parser.add_argument("--steps", type=int, default=2340,
                        help="train steps of each network (the design: 5 epochs at 128)")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps_per_call", type=int, default=1,
                        help="train steps per compiled call (> 1 on a GPU; not with emaold "
                             "variants)")
    parser.add_argument("--num_samples", type=int, default=2000, help="images per variant")
    parser.add_argument("--chunk_size", type=int, default=None,
                        help="images per compiled sampling call (default: generate's)")
    parser.add_argument("--bpd_images", type=int, default=16,
                        help="test images whose bits/dim to compute (0 = none)")
    parser.add_argument("--eval_at", type=int, nargs="*", default=(),
                        help="steps at which raw / EMA / EMA-without-warmup are compared")
    parser.add_argument("--eval_sampler", default="ddim50-clip",
                        help="the sampler of --eval_at, e.g. ddim50-clip or ddpm200-eq11")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                        help="variants sampled on the design recipe (module docstring)")
    parser.add_argument("--recipe_variants", nargs="+", default=DEFAULT_RECIPE_VARIANTS,
                        help="variants sampled on every other recipe")
    parser.add_argument("--bootstrap", type=int, default=200,
                        help="resamples behind each ratio's 95%% interval")
    parser.add_argument("--no_torch", action="store_true",
                        help="do not train the PyTorch design (no design-/designnet- variants)")
    parser.add_argument("--no_params", action="store_true", help="do not write params.msgpack")
    parser.add_argument("--torch_threads", type=int, default=1,
                        help="PyTorch's CPU threads (1 on a CPU shared with other work)")
    parser.add_argument("--compile_threads", type=int, default=8,
                        help="programs compiled at once before training")
    parser.add_argument("--log_every", type=int, default=100, help="print losses every N steps")
    parser.add_argument("--max_train_s", type=float, default=0,
                        help="stop training every network at the first --log_every step past "
                             "this many seconds (0 = train --steps): equal budgets in a time limit")
    parser.add_argument("--check_only", action="store_true",
                        help="check the arguments, recipes and samplers against this checkout "
                             "and exit")
    parser.add_argument("--ema_start", type=int, default=None,
                        help="config.optim.ema_start of the EMA variants (default: the config's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--override", nargs="*", default=(), metavar="SECTION.FIELD=VALUE",
                        help="set fields of the base config, e.g. diffusion.timesteps=200 "
                             "model.dim=16 (a field it lacks raises)")
    args = parser.parse_args(argv)
    if args.steps % args.steps_per_call:
        parser.error(f"--steps={args.steps} is not a multiple of --steps_per_call="
                     f"{args.steps_per_call}")
    args.eval_at = sorted(set(args.eval_at))
    if any(not 1 <= s <= args.steps or s % args.steps_per_call for s in args.eval_at):
        parser.error(f"--eval_at steps must be in [1, --steps={args.steps}] and multiples of "
                     f"--steps_per_call={args.steps_per_call}")
    try:
        # --variants are sampled on the design recipe only: without it they are not checked.
        variants = list(args.variants) if REFERENCE_RECIPE in args.recipes else []
        for name in variants + list(args.recipe_variants) + [f"raw-{args.eval_sampler}"]:
            params = parse_variant(name).params
            if params in DESIGN_ONLY and name in args.recipe_variants:
                raise ValueError(f"--recipe_variants {name}: {params} exists on the design "
                                 f"recipe only")
            if params in ("design", "designnet") and args.no_torch:
                raise ValueError(f"variant {name} needs the PyTorch design: drop --no_torch")
            if params == "emaold" and args.steps_per_call > 1:
                raise ValueError(f"variant {name} updates its EMA at every step: "
                                 f"--steps_per_call=1")
        recipe_configs(args)
    except (ValueError, config_validation.ConfigError) as e:
        parser.error(str(e))
    if args.eval_at and REFERENCE_RECIPE not in args.recipes:
        parser.error(f"--eval_at scores the {REFERENCE_RECIPE} recipe: add it to --recipes")
    if not os.path.exists(args.classifier_dir):
        parser.error(f"--classifier_dir={args.classifier_dir} does not exist; train one "
                     f"with train_classifier.py --output_dir=...")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.check_only:
        print(f"recipes {args.recipes} and their variants work with this checkout")
        return
    os.makedirs(args.out_dir, exist_ok=True)
    results = run(args)
    print(table(results))
    print(f"wrote {save(results, args.out_dir)} ({results['seconds']['total']:.0f} s)")


if __name__ == "__main__":
    main()
