"""Sample quality of this project against the PyTorch design at an equal budget (issue 14).

Trains the design (the tests' reference: `tests/torch_ref_unet.py` and the loop of
`tests/torch_ref_diffusion.py`, Adam, no EMA) and this project (`training.train_step`)
on configs/fashion.py's recipe, from the same initial weights, on the same batches and
with the same timesteps and noise (`training.step_draws`), for --steps steps of
--batch_size: the two runs are one run in two frameworks, and differ only by float
rounding. Then samples --num_samples images of each variant and scores them with the
project's classifier: the Fréchet distance of its features against the test split, the
entropy of the predicted-class histogram, and (ours) bits/dim of --bpd_images test
images. Variants:

  design-ddpm200-eq11   the design's own code end to end: its network, its sampler
                        (Equation 11) in PyTorch, its own noise
  designnet-...         the design's network through this project's sampler
  {raw,ema,emaold}-...  ours: raw parameters, the EMA (with `optim.ema_warmup`) and the
                        EMA without warmup (the behaviour before issue 14);
                        ddpm{T} or ddim{K}; eq11 (the design's step) or clip
                        (through x0 clipped to [-1, 1], `sampling.clip_denoised`)

Every variant but `design` samples from the same noise (`sampling.generate` with one
seed: image i starts from the same x_T), so two of them are compared image by image:
for each pair of COMPARISONS present, the ratio of their distances with a 95 % paired
bootstrap interval (the same resampled image indices for both), which says whether a
difference is larger than the meter's noise at this N. `raw-ddpm{T}-eq11` is the
design's sampler on this project's network (equal to the design's code number for
number: tests/sampling_test.py), the fair reference for the default
`ema-ddpm{T}-clip`: same network, same noise, only the sampling choices differ.

At each of --eval_at steps, raw / EMA / EMA-without-warmup are also scored with
--eval_sampler (cheap), to see whether the EMA is worse than raw at any step count.
`real-train` scores --num_samples training images: the floor of the meter at that N.
Writes <out_dir>/quality.json, <out_dir>/grids/<variant>.png (the first 64 images),
<out_dir>/features.npz (each variant's classifier features) and <out_dir>/params.msgpack
(the final raw / EMA / design parameters), for re-analysis and re-sampling.

    nice -n 10 python bench/quality.py --classifier_dir=CLS --out_dir=OUT
    (CLS from `python train_classifier.py --output_dir=CLS`)
"""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from ddpm_jax import cpu_defaults  # noqa: E402

cpu_defaults.apply_cpu_defaults(restart=__name__ == "__main__")  # before JAX starts

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import fashion  # noqa: E402
from flax import serialization  # noqa: E402

from ddpm_jax import (config_validation, convert, evaluation, fid, images,  # noqa: E402
                      input_pipeline, parallel, sampling, train_state, training)
from ddpm_jax.schedules import make_schedule  # noqa: E402

DEFAULT_VARIANTS = ("design-ddpm200-eq11", "designnet-ddpm200-eq11", "raw-ddpm200-eq11",
                    "ema-ddpm200-clip", "ema-ddpm200-eq11", "raw-ddpm200-clip",
                    "emaold-ddpm200-eq11", "ema-ddim50-clip", "raw-ddim50-clip")
PARAMS = ("design", "designnet", "raw", "ema", "emaold")
# (a, b, what the ratio FD(a) / FD(b) answers); the sampler steps are filled in per run.
COMPARISONS = (
    ("ema-ddpm{T}-clip", "raw-ddpm{T}-eq11", "the default against the design's sampler"),
    ("ema-ddpm{T}-clip", "designnet-ddpm{T}-eq11",
     "the default against the design's sampler on the design's network"),
    ("designnet-ddpm{T}-eq11", "raw-ddpm{T}-eq11", "the port: the design's network against ours"),
    ("ema-ddpm{T}-clip", "raw-ddpm{T}-clip", "EMA against raw"),
    ("ema-ddpm{T}-eq11", "raw-ddpm{T}-eq11", "EMA against raw, Eq. 11"),
    ("ema-ddpm{T}-clip", "ema-ddpm{T}-eq11", "clipped against Eq. 11"),
    ("emaold-ddpm{T}-eq11", "ema-ddpm{T}-eq11", "EMA without warmup against with"),
    ("ema-ddim50-clip", "ema-ddpm{T}-clip", "DDIM 50 against DDPM, clipped"),
    ("ema-ddim50-clip", "raw-ddim50-clip", "EMA against raw, DDIM 50"),
)


def parse_variant(name: str):
    """'ema-ddim50-clip' -> ('ema', 'ddim', 50, True)."""
    params, sampler, step = name.split("-")
    kind = sampler.rstrip("0123456789")
    design_ok = params != "design" or (kind, step) == ("ddpm", "eq11")
    if params not in PARAMS or kind not in sampling.SAMPLERS or \
            step not in ("eq11", "clip") or not design_ok:
        raise ValueError(f"bad variant {name!r}: want {{{','.join(PARAMS)}}}-"
                         f"{{ddpm,ddim}}<steps>-{{eq11,clip}} (design: ddpm...-eq11 only)")
    return params, kind, int(sampler[len(kind):]), step == "clip"


def bootstrap_ratio(reference: fid.FeatureStatistics, a: np.ndarray, b: np.ndarray,
                    num_resamples: int = 200, seed: int = 0) -> dict:
    """FD(a) / FD(b) of two feature sets [N, D] of the same images' noise, with a 95 %
    interval: the 2.5 and 97.5 percentiles of the ratio over resamples of the image indices
    shared by a and b, shifted by the resamples' mean offset from the full-sample ratio
    (a resample repeats images, which inflates both distances by their N-bias)."""
    if a.shape != b.shape:
        raise ValueError(f"paired feature sets differ in shape: {a.shape} vs {b.shape}")

    def ratio(rows):
        return (fid.frechet_distance(fid.feature_statistics(a[rows]), reference)
                / fid.frechet_distance(fid.feature_statistics(b[rows]), reference))

    rng = np.random.default_rng(seed)
    draws = [ratio(rng.integers(0, len(a), len(a))) for _ in range(num_resamples)]
    point = ratio(np.arange(len(a)))
    low, high = np.percentile(draws, [2.5, 97.5]) - (np.mean(draws) - point)
    return {"ratio": point, "low": float(low), "high": float(high)}


def compare(reference, features: dict, timesteps: int, num_resamples: int,
            latest: str) -> list:
    """Every COMPARISONS pair whose two variants were sampled from the same noise; prints
    those with `latest`."""
    out = []
    for a, b, question in COMPARISONS:
        a, b = a.format(T=timesteps), b.format(T=timesteps)
        if a in features and b in features:
            out.append({"a": a, "b": b, "question": question,
                        **bootstrap_ratio(reference, features[a], features[b], num_resamples)})
            if latest in (a, b):
                print(f"  {a} / {b}: {out[-1]['ratio']:.3f} [{out[-1]['low']:.3f}, "
                      f"{out[-1]['high']:.3f}] ({question})", flush=True)
    return out


class Design:
    """The design's network, training step and sampler in PyTorch (CPU)."""

    def __init__(self, config, seed: int, threads: int):
        import torch

        from tests import torch_ref_diffusion, torch_ref_unet
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


def recipe(args):
    config = fashion.get_config()
    config.unlock()
    config.training.batch_size = args.batch_size
    config.training.num_train_steps = args.steps
    config.seed = args.seed
    if args.ema_start is not None:
        config.optim.ema_start = args.ema_start
    return config


def save(results: dict, out_dir: str) -> str:
    path = os.path.join(out_dir, "quality.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=float)
    return path


def run(args) -> dict:
    """Everything the module docstring lists; quality.json is rewritten after each variant,
    so a run stopped early keeps what it measured."""
    start = time.perf_counter()
    config = recipe(args)
    config_validation.resolve_paths(config)
    variants = [parse_variant(v) for v in args.variants]
    eval_sampler = parse_variant(f"raw-{args.eval_sampler}")
    training.configure_compilation_cache(config)
    mesh = parallel.make_mesh()
    replicated = parallel.replicated(mesh)
    model, optimizer = train_state.create_model(config), train_state.make_optimizer(config)
    schedule = make_schedule(config.diffusion.beta_schedule, config.diffusion.timesteps)
    apply_fn = sampling.ModelApply(model)
    image_shape = (config.data.image_size,) * 2 + (config.data.channels,)

    test_images = evaluation.load_split_images(config, "test", None)
    scorer = evaluation.ClassifierScorer(args.classifier_dir, test_images)
    results = {"args": vars(args), "config": config.to_dict(), "variants": {}, "by_step": {},
               "comparisons": {}, "seconds": {}}
    real = evaluation.load_split_images(config, "train", args.num_samples)
    results["variants"]["real-train"] = scorer(evaluation.quantize(real))

    # Both frameworks start from the design's initialisation.
    design = Design(config, args.seed, args.torch_threads)
    template = convert.abstract_params(model)
    params0 = convert.torch_to_flax(design.state_dict(), template)
    state = train_state.create_train_state(config, model, optimizer, jax.random.key(args.seed))
    copy = lambda tree: jax.tree.map(np.array, tree)  # noqa: E731
    state = jax.device_put(state.replace(params=copy(params0), ema_params=copy(params0),
                                         opt_state=optimizer.init(params0)), replicated)
    emaold = jax.device_put(copy(params0), replicated)
    decay = config.optim.ema_decay
    ema_update = jax.jit(lambda e, p: jax.tree.map(lambda a, b: decay * a + (1 - decay) * b,
                                                   e, p))
    step_fn = training.make_train_step(config, model, schedule, optimizer, mesh)
    draws = jax.jit(lambda rng, step, x: training.step_draws(rng, step, x,
                                                             schedule.num_timesteps)[1:3])
    batches = input_pipeline.TrainIterator(
        training.open_train_source(config), config.training.batch_size, config.seed,
        random_flip=config.data.random_flip)

    def params_of(kind):
        if kind == "designnet":
            return jax.device_put(convert.torch_to_flax(design.state_dict(), template),
                                  replicated)
        return {"raw": state.params, "ema": state.ema_params, "emaold": emaold}[kind]

    def ours(kind, sampler, steps, clip):
        return sampling.generate(apply_fn, params_of(kind), schedule, image_shape,
                                 args.num_samples, seed=args.seed, sampler=sampler,
                                 ddim_steps=steps, clip_denoised=clip, mesh=mesh).images

    def score(name, sample):
        begin = time.perf_counter()
        samples = sample()
        scores, features = scorer.scores_and_features(evaluation.quantize(samples))
        scores["sample_s"] = time.perf_counter() - begin
        print(f"  {name}: classifier FD {scores['classifier_fd']:.1f}, class entropy "
              f"{scores['class_entropy_bits']:.2f} bits ({scores['sample_s']:.0f} s)", flush=True)
        return scores, samples, features

    features = {}  # of every variant sampled from the shared noise, saved for re-analysis
    losses = {"jax": [], "torch": []}
    train_s = {"jax": 0.0, "torch": 0.0}
    for step in range(1, args.steps + 1):
        batch = next(batches)
        begin = time.perf_counter()
        t, noise = jax.device_get(draws(state.rng, state.step, batch))
        state, metrics = step_fn(state, parallel.global_batch(batch, mesh))
        emaold = ema_update(emaold, state.params)
        losses["jax"].append(float(metrics["loss"]))
        train_s["jax"] += time.perf_counter() - begin
        begin = time.perf_counter()
        losses["torch"].append(design.train_step(batch, t, noise))
        train_s["torch"] += time.perf_counter() - begin
        if step % 25 == 0:
            print(f"step {step}: loss jax {np.mean(losses['jax'][-25:]):.4f} torch "
                  f"{np.mean(losses['torch'][-25:]):.4f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
        if step in args.eval_at:
            print(f"step {step}: {args.eval_sampler} of raw / EMA / EMA without warmup",
                  flush=True)
            _, sampler, steps, clip = eval_sampler
            scored = {kind: score(f"{kind}-{args.eval_sampler}",
                                  lambda kind=kind: ours(kind, sampler, steps, clip))
                      for kind in ("raw", "ema", "emaold")}
            results["by_step"][step] = {kind: s[0] for kind, s in scored.items()}
            features.update({f"step{step}-{kind}-{args.eval_sampler}": s[2]
                             for kind, s in scored.items()})
            results["by_step"][step]["ema_over_raw"] = bootstrap_ratio(
                scorer.reference, scored["ema"][2], scored["raw"][2], args.bootstrap)
            print(f"  EMA / raw: {results['by_step'][step]['ema_over_raw']}", flush=True)
            save(results, args.out_dir)
    batches.close()
    results["seconds"]["train"] = train_s
    results["losses_last_25"] = {k: float(np.mean(v[-25:])) for k, v in losses.items()}
    results["loss_gap"] = {"mean_abs": float(np.mean(np.abs(np.subtract(*losses.values())))),
                           "last_25_mean_abs": float(np.mean(np.abs(np.subtract(
                               losses["jax"][-25:], losses["torch"][-25:]))))}
    print(f"  mean |loss jax - loss torch| per step: {results['loss_gap']}", flush=True)
    with open(os.path.join(args.out_dir, "params.msgpack"), "wb") as f:
        f.write(serialization.msgpack_serialize(jax.device_get(
            {kind: params_of(kind) for kind in ("designnet", "raw", "ema", "emaold")})))

    for kind in ("raw", "ema") if args.bpd_images else ():
        bpd = evaluation.bits_per_dim(apply_fn, params_of(kind), schedule,
                                      test_images[:args.bpd_images], mesh=mesh, seed=args.seed,
                                      batch_size=args.bpd_images)
        results[f"bpd_{kind}"] = evaluation.summarize_bpd(bpd)
        print(f"  bits/dim {kind}: {results[f'bpd_{kind}']['bpd']:.3f}", flush=True)
    grid_dir = os.path.join(args.out_dir, "grids")
    os.makedirs(grid_dir, exist_ok=True)
    print(f"step {args.steps}: the variants", flush=True)
    for name, (kind, sampler, steps, clip) in zip(args.variants, variants):
        if kind == "design":
            scores, samples, _ = score(name, lambda: design.sample(args.num_samples, args.seed))
        else:
            scores, samples, features[name] = score(
                name, lambda: ours(kind, sampler, steps, clip))
        results["variants"][name] = scores
        results["comparisons"] = compare(scorer.reference, features,
                                         config.diffusion.timesteps, args.bootstrap, name)
        results["seconds"]["so_far"] = time.perf_counter() - start
        save(results, args.out_dir)
        np.savez(os.path.join(args.out_dir, "features.npz"), **features)
        images.save_grid(samples[:64], os.path.join(grid_dir, f"{name}.png"), nrow=8)
    results["seconds"]["total"] = time.perf_counter() - start
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classifier_dir", required=True,
                        help="a classifier saved by train_classifier.py")
    parser.add_argument("--out_dir", required=True, help="where quality.json and grids/ go")
    parser.add_argument("--steps", type=int, default=2340,
                        help="train steps of each framework (the design: 5 epochs at 128)")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--num_samples", type=int, default=2000, help="images per variant")
    parser.add_argument("--bpd_images", type=int, default=16,
                        help="test images whose bits/dim to compute (0 = none)")
    parser.add_argument("--eval_at", type=int, nargs="*", default=(),
                        help="steps at which raw / EMA / EMA-without-warmup are compared")
    parser.add_argument("--eval_sampler", default="ddim50-clip",
                        help="the sampler of --eval_at, e.g. ddim50-clip or ddpm200-eq11")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                        help="variants sampled at the end (see the module docstring)")
    parser.add_argument("--bootstrap", type=int, default=200,
                        help="resamples behind each ratio's 95%% interval")
    parser.add_argument("--torch_threads", type=int, default=1,
                        help="PyTorch's CPU threads (1 on a CPU shared with other work)")
    parser.add_argument("--ema_start", type=int, default=None,
                        help="config.optim.ema_start of the EMA variants (default: the config's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in list(args.variants) + [f"raw-{args.eval_sampler}"]:
        try:
            parse_variant(name)
        except ValueError as e:
            parser.error(str(e))
    if not os.path.isdir(args.classifier_dir):
        parser.error(f"--classifier_dir={args.classifier_dir} is not a directory; train one "
                     f"with train_classifier.py --output_dir=...")
    args.eval_at = sorted(set(args.eval_at))
    if any(not 1 <= s <= args.steps for s in args.eval_at):
        parser.error(f"--eval_at steps must be in [1, --steps={args.steps}]")
    return args


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    results = run(args)
    print(f"wrote {save(results, args.out_dir)} ({results['seconds']['total']:.0f} s)")


if __name__ == "__main__":
    main()
