"""Sample quality of this project against the PyTorch design at an equal budget (issue 14).

Trains the design (the tests' reference: `tests/torch_ref_unet.py` and the loop of
`tests/torch_ref_diffusion.py`, Adam, no EMA) and this project (`training.train_step`)
on configs/fashion.py's recipe, from the same initial weights and on the same batches,
for --steps steps of --batch_size. Then samples --num_samples images of each variant,
every variant of ours from the same noise (`sampling.generate` with one seed), and
scores them with the project's classifier: the Fréchet distance of its features
against the test split, the entropy of the predicted-class histogram, and (ours)
bits/dim of --bpd_images test images. Variants:

  design-ddpm200-eq11   the design's own sampler (Equation 11) on its own network
  {raw,ema,emaold}-...  ours: raw parameters, the EMA (with `optim.ema_warmup`) and the
                        EMA without warmup (the behaviour before issue 14);
                        ddpm{T} or ddim{K}; eq11 (the design's step) or clip
                        (through x0 clipped to [-1, 1], `sampling.clip_denoised`)

At each of --eval_at steps, raw / EMA / EMA-without-warmup are also scored with
--eval_sampler (cheap), to see whether the EMA is worse than raw at any step count.
`real-train` scores --num_samples training images: the floor of the meter at that N.
Writes <out_dir>/quality.json and <out_dir>/grids/<variant>.png (the first 64 images).

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
from ddpm_jax import (convert, evaluation, images, input_pipeline, parallel,  # noqa: E402
                      sampling, train_state, training)
from ddpm_jax.schedules import make_schedule  # noqa: E402

DEFAULT_VARIANTS = ("design-ddpm200-eq11", "raw-ddpm200-eq11", "emaold-ddpm200-eq11",
                    "ema-ddpm200-eq11", "ema-ddpm200-clip", "raw-ddpm200-clip",
                    "ema-ddim50-eq11", "ema-ddim50-clip")


def parse_variant(name: str):
    """'ema-ddim50-clip' -> ('ema', 'ddim', 50, True)."""
    params, sampler, step = name.split("-")
    kind = sampler.rstrip("0123456789")
    if params not in ("design", "raw", "ema", "emaold") or kind not in sampling.SAMPLERS or \
            step not in ("eq11", "clip") or (params == "design" and step == "clip"):
        raise ValueError(f"bad variant {name!r}: want {{design,raw,ema,emaold}}-"
                         f"{{ddpm,ddim}}<steps>-{{eq11,clip}} (design: eq11 only)")
    return params, kind, int(sampler[len(kind):]), step == "clip"


class Design:
    """The design's network, training step and sampler in PyTorch (CPU)."""

    def __init__(self, config, seed: int):
        import torch

        from tests import torch_ref_diffusion, torch_ref_unet
        self.torch, self.ref, self.config = torch, torch_ref_diffusion, config
        m = config.model
        # One thread: on a CPU shared with other processes, two OpenMP threads wait on each
        # other (a forward pass of 8 images took 3.5 s with 2 threads, 0.2 s with 1).
        torch.set_num_threads(1)
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
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self):
        return self.net.state_dict()

    def train_step(self, batch: np.ndarray) -> float:
        """The design's loop body: random t and noise, p_losses, Adam."""
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))
        t = torch.randint(0, self.config.diffusion.timesteps, (x.shape[0],),
                          generator=self.generator)
        noise = torch.randn(x.shape, generator=self.generator)
        self.net.train()
        self.optimizer.zero_grad()
        loss = self.ref.p_losses(self.constants, self.net, x, t, noise,
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
               "seconds": {}}
    real = evaluation.load_split_images(config, "train", args.num_samples)
    results["variants"]["real-train"] = scorer(evaluation.quantize(real))

    # Both frameworks start from the design's initialisation.
    design = Design(config, args.seed)
    params0 = convert.torch_to_flax(design.state_dict(), convert.abstract_params(model))
    state = train_state.create_train_state(config, model, optimizer, jax.random.key(args.seed))
    copy = lambda tree: jax.tree.map(np.array, tree)  # noqa: E731
    state = jax.device_put(state.replace(params=copy(params0), ema_params=copy(params0),
                                         opt_state=optimizer.init(params0)), replicated)
    emaold = jax.device_put(copy(params0), replicated)
    decay = config.optim.ema_decay
    ema_update = jax.jit(lambda e, p: jax.tree.map(lambda a, b: decay * a + (1 - decay) * b,
                                                   e, p))
    step_fn = training.make_train_step(config, model, schedule, optimizer, mesh)
    batches = input_pipeline.TrainIterator(
        training.open_train_source(config), config.training.batch_size, config.seed,
        random_flip=config.data.random_flip)

    def params_of(kind):
        return {"raw": state.params, "ema": state.ema_params, "emaold": emaold}[kind]

    def ours(kind, sampler, steps, clip):
        return sampling.generate(apply_fn, params_of(kind), schedule, image_shape,
                                 args.num_samples, seed=args.seed, sampler=sampler,
                                 ddim_steps=steps, clip_denoised=clip, mesh=mesh).images

    def score(name, sample):
        begin = time.perf_counter()
        samples = sample()
        scores = scorer(evaluation.quantize(samples))
        scores["sample_s"] = time.perf_counter() - begin
        print(f"  {name}: classifier FD {scores['classifier_fd']:.1f}, class entropy "
              f"{scores['class_entropy_bits']:.2f} bits ({scores['sample_s']:.0f} s)", flush=True)
        return scores, samples

    losses = {"jax": [], "torch": []}
    train_s = {"jax": 0.0, "torch": 0.0}
    for step in range(1, args.steps + 1):
        batch = next(batches)
        begin = time.perf_counter()
        state, metrics = step_fn(state, parallel.global_batch(batch, mesh))
        emaold = ema_update(emaold, state.params)
        losses["jax"].append(float(metrics["loss"]))
        train_s["jax"] += time.perf_counter() - begin
        begin = time.perf_counter()
        losses["torch"].append(design.train_step(batch))
        train_s["torch"] += time.perf_counter() - begin
        if step % 25 == 0:
            print(f"step {step}: loss jax {np.mean(losses['jax'][-25:]):.4f} torch "
                  f"{np.mean(losses['torch'][-25:]):.4f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
        if step in args.eval_at:
            print(f"step {step}: {args.eval_sampler} of raw / EMA / EMA without warmup",
                  flush=True)
            _, sampler, steps, clip = eval_sampler
            results["by_step"][step] = {
                kind: score(f"{kind}-{args.eval_sampler}",
                            lambda kind=kind: ours(kind, sampler, steps, clip))[0]
                for kind in ("raw", "ema", "emaold")}
            save(results, args.out_dir)
    batches.close()
    results["seconds"]["train"] = train_s
    results["losses_last_25"] = {k: float(np.mean(v[-25:])) for k, v in losses.items()}

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
            scores, samples = score(name, lambda: design.sample(args.num_samples, args.seed))
        else:
            scores, samples = score(name, lambda: ours(kind, sampler, steps, clip))
        results["variants"][name] = scores
        results["seconds"]["so_far"] = time.perf_counter() - start
        save(results, args.out_dir)
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
