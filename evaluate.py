"""Evaluate the newest checkpoint of a training run: test bits/dim and sample quality.

    python evaluate.py --workdir=runs/fashion --bpd_images=1000
    python evaluate.py --workdir=runs/fashion --fid_samples=10000 \\
        --classifier_dir=classifiers/fashion_mnist
    python evaluate.py --workdir=runs/cifar10 --fid_samples=50000 \
        --inception_weights=pt_inception-2015-12-05-6726825d.pth \
        [--fid_reference_stats=cifar10_train_stats.npz]

Settings come from the checkpoint's `config.eval` (defaults:
`ddpm_jax.evaluation.suite.default_config`), overridden by the flags. The numbers
are printed, written as JSON to --output (default
<workdir>/eval/step_<step>.json) and appended to <workdir>/eval/metrics.jsonl
and TensorBoard (<workdir>/eval/tensorboard), apart from the training run's
own metrics file, which a running training may still be writing. Every path
(flags and the checkpoint's config) may be relative, `~/...`, absolute or a
gs:// URL; the messages show it resolved.

For a class-conditional model, sample quality is measured at each
classifier-free guidance scale of --guidance (e.g. 0,1,2,4; default
config.sampling.guidance), every class equally often and the same noise for
every scale, with per-class class accuracy and Fréchet distances
(`ddpm_jax.evaluation.conditional_eval`); the curve over the scales is also drawn to
--curve (default <workdir>/eval/guidance_step_<step>.png) and TensorBoard.
"""

from ddpm_jax.runtime import cpu_defaults

cpu_defaults.apply_cpu_defaults(restart=__name__ == "__main__")  # before JAX starts

import json  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from etils import epath  # noqa: E402

from ddpm_jax import config_validation, sampling  # noqa: E402
from ddpm_jax.evaluation import conditional_eval, suite  # noqa: E402
from ddpm_jax.runtime import console, images, parallel, storage  # noqa: E402
from ddpm_jax.training import checkpointing  # noqa: E402
from ddpm_jax.runtime.metrics_writer import MetricsWriter  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The training run's --workdir.", required=True)
flags.DEFINE_integer("bpd_images", 0, "Bits/dim of the first N images of the split; 0 = skip.")
flags.DEFINE_integer("fid_samples", 0, "Sample quality from N generated images; 0 = skip.")
flags.DEFINE_string("classifier_dir", None, "Classifier for sample quality "
                    "(default: config.eval.classifier_dir).")
flags.DEFINE_string("inception_weights", None,
                    "pytorch-fid's pt_inception-2015-12-05-6726825d.pth: adds the standard "
                    "Inception FID (default: config.eval.inception_weights).")
flags.DEFINE_string("fid_reference_stats", None,
                    "pytorch-fid .npz statistics (mu, sigma) of the Inception FID's reference "
                    "(default: config.eval.inception_reference_stats; '' = the train split).")
flags.DEFINE_integer("fid_reference_images", None,
                     "Reference images of the split; 0 = all (default: config.eval's).")
flags.DEFINE_string("split", None, "Held-out split (default: config.eval.split, 'test').")
flags.DEFINE_integer("seed", None, "Seed of the bound's noise and of the samples.")
flags.DEFINE_integer("bpd_batch_size", None, "Images per compiled bits/dim call.")
flags.DEFINE_enum("sampler", None, ["ddpm", "ddim", "dpmpp"],
                  "Sampler (default: config.sampling's).")
flags.DEFINE_integer("steps", None, "Network calls of ddim and dpmpp (default: "
                     "config.sampling's).")
flags.DEFINE_integer("ddim_steps", None, "The older name of --steps.")
flags.DEFINE_integer("solver_order", None, "dpmpp: 1, 2 or 3 (default: config.sampling's).")
flags.DEFINE_enum("step_spacing", None, ["time", "logsnr"], "dpmpp: steps uniform in time or "
                  "in log-SNR (default: config.sampling's).")
flags.DEFINE_bool("clip_denoised", None, "Step through the predicted x0 clipped to [-1, 1] "
                  "(default: config.sampling's).")
flags.DEFINE_boolean("use_ema", True, "Evaluate the EMA parameters (else the raw ones).")
flags.DEFINE_string("tfds_data_dir", None, "Override config.data.tfds_data_dir.")
flags.DEFINE_string("manual_dir", None, "Override config.data.manual_dir.")
flags.DEFINE_string("output", None, "JSON file of the results.")
flags.DEFINE_list("guidance", None, "Conditional models: guidance scales to sweep, e.g. 0,1,2,4 "
                  "(default: config.sampling.guidance).")
flags.DEFINE_string("curve", None, "Conditional models: PNG of class accuracy and Fréchet "
                    "distance over --guidance.")


def _eval_config(config):
    """The checkpoint's config with a complete `eval` section and the flags applied."""
    eval_config = suite.default_config()
    if "eval" in config:
        eval_config.update(config.eval.to_dict())
    overrides = dict(split=FLAGS.split, seed=FLAGS.seed, bpd_batch_size=FLAGS.bpd_batch_size,
                     classifier_dir=FLAGS.classifier_dir,
                     inception_weights=FLAGS.inception_weights,
                     inception_reference_stats=FLAGS.fid_reference_stats,
                     fid_reference_images=FLAGS.fid_reference_images)
    eval_config.update({k: v for k, v in overrides.items() if v is not None})
    if FLAGS.bpd_images:
        eval_config.bpd_num_images = FLAGS.bpd_images
    if FLAGS.fid_samples:
        eval_config.fid_num_samples = FLAGS.fid_samples
    config.eval = eval_config
    for field, value in (("tfds_data_dir", FLAGS.tfds_data_dir), ("manual_dir", FLAGS.manual_dir)):
        if value is not None:
            config.data[field] = value
    if FLAGS.ddim_steps is not None and FLAGS.steps not in (None, FLAGS.ddim_steps):
        raise app.UsageError("--steps and its older name --ddim_steps disagree; give --steps")
    for field in ("sampler", "steps", "solver_order", "step_spacing", "clip_denoised"):
        if FLAGS[field].value is not None:
            config.sampling[field] = FLAGS[field].value
    if FLAGS.ddim_steps is not None:
        config.sampling.steps = FLAGS.ddim_steps
    config_validation.resolve_paths(config)  # a stored relative path means the same here
    try:
        sampling.check_settings(config.diffusion.timesteps, sampling.settings(config))
    except ValueError as e:
        raise app.UsageError(f"--{e}") from None
    return config


def _guidances(evaluator):
    """The --guidance scales of a conditional model ([] for an unconditional one)."""
    if not evaluator.num_classes:
        if FLAGS.guidance:
            raise app.UsageError("--guidance needs a class-conditional model; this one is "
                                 "unconditional (config.model.num_classes=0)")
        return []
    if not FLAGS.guidance:
        return [evaluator.config.sampling.guidance]
    try:
        return conditional_eval.parse_guidance(FLAGS.guidance)
    except ValueError as e:
        raise app.UsageError(str(e)) from None


def main(argv):
    del argv
    console.quiet_libraries()
    if not FLAGS.bpd_images and not FLAGS.fid_samples:
        raise app.UsageError("nothing to evaluate: pass --bpd_images=N and/or --fid_samples=N")
    storage.absolute_flags("workdir", "classifier_dir", "inception_weights",
                           "fid_reference_stats", "tfds_data_dir", "manual_dir", "output",
                           "curve")
    parallel.maybe_initialize_distributed()
    mesh = parallel.make_mesh()
    config, params, step = checkpointing.load_inference_params(FLAGS.workdir, FLAGS.use_ema,
                                                               mesh=mesh)
    config = _eval_config(config)
    primary = jax.process_index() == 0
    say = print if primary else (lambda _: None)
    say(f"evaluating {FLAGS.workdir} at step {step} ({'EMA' if FLAGS.use_ema else 'raw'} "
        f"parameters) on {mesh.devices.size} device(s)")
    evaluator = suite.Evaluator(config, mesh, with_bpd=bool(FLAGS.bpd_images),
                                with_sample_quality=bool(FLAGS.fid_samples))
    guidances = _guidances(evaluator)
    scores, sweep = {}, {}
    if FLAGS.bpd_images:
        scores.update(evaluator.bits_per_dim(
            params, progress=console.progress_printer("bits/dim batch", primary)))
    if FLAGS.fid_samples:
        progress = console.progress_printer("sampling chunk", primary)
        for w in guidances:
            sweep[w] = evaluator.sample_quality(params, guidance=w, progress=progress)
            say(f"step {step}, guidance {w:g}: {suite.format_scores(sweep[w])}")
        scores.update(sweep[guidances[0]] if guidances
                      else evaluator.sample_quality(params, progress=progress))
    say(f"step {step}: {suite.format_scores(scores)}")

    eval_dir = epath.Path(FLAGS.workdir) / "eval"
    writer = MetricsWriter(str(eval_dir), enabled=primary, resume_step=step)
    writer.write_scalars(step, {f"eval/{k}": v for k, v in scores.items()})
    for w, w_scores in sweep.items():
        writer.write_scalars(step, {f"eval_guidance_{w:g}/{k}": v for k, v in w_scores.items()})
    curve = None
    if primary and len(sweep) > 1 and "class_accuracy" in scores:
        curve = FLAGS.curve or str(eval_dir / f"guidance_step_{step}.png")
        picture = conditional_eval.plot_guidance_curve(sweep)
        images.save_png(picture, curve)
        writer.write_image(step, "eval/guidance_curve", picture)
        say(f"guidance curve: {curve}")
    writer.close()
    if primary:
        output = FLAGS.output or str(eval_dir / f"step_{step}.json")
        record = {"workdir": FLAGS.workdir, "step": step, "use_ema": FLAGS.use_ema,
                  "eval": config.eval.to_dict(), "sampling": config.sampling.to_dict(),
                  "scores": scores}
        if sweep:
            record["guidance_sweep"] = {f"{w:g}": s for w, s in sweep.items()}
            record["guidance_curve"] = curve
        storage.write_encoded(output, lambda f: f.write(json.dumps(record, indent=1).encode()))
        say(f"results: {output}")


if __name__ == "__main__":
    app.run(main)
