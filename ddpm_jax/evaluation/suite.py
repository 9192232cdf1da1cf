"""Sample quality and bits/dim of a model, on demand or every K training steps.

Bits/dim is `bpd.bits_per_dim`. Sample quality is the Fréchet distance between
features of generated images and of the held-out split, in the penultimate layer
of the project's own classifier (`classifier`, comparable only between runs that
use the same classifier), with the class histogram of the samples (mode
coverage). When the user provides pytorch-fid's Inception weights
(`eval.inception_weights`), the standard Inception FID (`inception`) is reported
too: the number to compare with papers, against the training split or
precomputed statistics. Samples are quantized to 8 bits first, as saved images
are.

Everything runs jitted on a 1-D 'data' mesh: the batch split over devices,
parameters replicated, results replicated so every process can read them.
"""
import logging
from typing import Any, Callable, Dict, Optional, Tuple

import ml_collections
import numpy as np
from jax.sharding import Mesh

from ddpm_jax import sampling
from ddpm_jax.data import input_pipeline
from ddpm_jax.evaluation import bpd, classifier, conditional_eval, fid, inception
from ddpm_jax.models import unet
from ddpm_jax.schedules import schedule_from_config

log = logging.getLogger(__name__)


def default_config() -> ml_collections.ConfigDict:
    """`config.eval`: what to evaluate, how often (in steps; 0 = never) and on how much data."""
    return ml_collections.ConfigDict(dict(
        split="test",              # the held-out split of config.data.dataset
        seed=0,                    # noise of the bound and of the samples
        bpd_every=0,               # bits/dim every this many training steps; 0 = off
        bpd_num_images=256,        # first N images of the split (full split: 10000)
        bpd_batch_size=64,         # images per compiled call (rounded up to the devices)
        fid_every=0,               # sample quality every this many training steps; 0 = off
        fid_num_samples=1000,      # generated images per evaluation
        fid_reference_images=0,    # first N split images for the reference; 0 = all
        classifier_dir="",         # from train_classifier.py; '' = no classifier FD
        inception_weights="",      # pytorch-fid's pt_inception-2015-12-05-6726825d.pth;
                                   # '' = no Inception FID
        inception_reference_stats="",  # pytorch-fid .npz (mu, sigma); '' = the train split
    ))


def validate_config(eval_config) -> None:
    """Raise ValueError naming the first bad `config.eval` field."""
    for field in ("bpd_every", "fid_every", "fid_reference_images"):
        if eval_config[field] < 0:
            raise ValueError(f"config.eval.{field} must be >= 0, got {eval_config[field]}")
    for field in ("bpd_num_images", "bpd_batch_size"):
        if eval_config[field] < 1:
            raise ValueError(f"config.eval.{field} must be >= 1, got {eval_config[field]}")
    if eval_config.fid_num_samples < 2:
        raise ValueError(f"config.eval.fid_num_samples must be >= 2 (a covariance needs two), "
                         f"got {eval_config.fid_num_samples}")
    if eval_config.fid_every > 0 and not (eval_config.classifier_dir
                                          or eval_config.inception_weights):
        raise ValueError("config.eval.fid_every > 0 needs config.eval.classifier_dir "
                         "(train one with `python train_classifier.py --output_dir=DIR`) "
                         "and/or config.eval.inception_weights (pytorch-fid's .pth file)")


# --- Bits per dimension ---------------------------------------------------------------------

def quantize(images: np.ndarray) -> np.ndarray:
    """Clip to [-1, 1] and round to the 256 levels of an 8-bit image, as a saved PNG holds it."""
    levels = np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5)
    return (levels / 127.5 - 1.0).astype(np.float32)


class ClassifierScorer:
    """Fréchet distance in a trained classifier's features, and the class histogram."""

    def __init__(self, classifier_dir: str, reference_images: np.ndarray):
        self.model, self.params, self.metadata = classifier.load_classifier(classifier_dir)
        self._apply = classifier.make_apply_fn(self.model)
        _, features = classifier.predict(self._apply, self.params, reference_images)
        self.reference = fid.feature_statistics(features)

    def __call__(self, samples: np.ndarray) -> Dict[str, float]:
        return self.scores_and_features(samples)[0]

    def scores_and_features(self, samples: np.ndarray) -> Tuple[Dict[str, float], np.ndarray]:
        """The scores, and the features [N, D] behind them (for bootstrap intervals)."""
        logits, features = classifier.predict(self._apply, self.params, samples)
        histogram = classifier.class_histogram(logits, self.model.num_classes)
        scores = {"classifier_fd": fid.frechet_distance(fid.feature_statistics(features),
                                                        self.reference),
                  "class_entropy_bits": histogram["class_entropy_bits"],
                  "num_classes_covered": histogram["num_classes_covered"]}
        scores.update({f"class_fraction_{k}": float(f)
                       for k, f in enumerate(histogram["class_fractions"])})
        return scores, features


class InceptionScorer:
    """The standard FID: pool3 features of pytorch-fid's Inception-v3 (compare with papers).

    The reference is pytorch-fid statistics (`reference_stats_path`, an .npz of
    mu and sigma) or the features of `reference_images` (papers: the whole
    training split). The weights load first, so a missing file fails early.
    """

    def __init__(self, weights_path: str, *, reference_stats_path: str = "",
                 reference_images: Optional[np.ndarray] = None, mesh: Optional[Mesh] = None):
        self.model, self.variables = inception.load_inception(weights_path)
        self.mesh = mesh
        if reference_stats_path:
            self.reference = fid.load_statistics(reference_stats_path)
        elif reference_images is not None:
            self.reference = fid.feature_statistics(self.features(reference_images))
        else:
            raise ValueError("InceptionScorer needs reference_stats_path or reference_images")

    def features(self, images: np.ndarray) -> np.ndarray:
        return inception.inception_features(self.model, self.variables, images, mesh=self.mesh)

    def __call__(self, samples: np.ndarray) -> Dict[str, float]:
        stats = fid.feature_statistics(self.features(samples))
        return {"inception_fid": fid.frechet_distance(stats, self.reference)}


# --- During training and by command ---------------------------------------------------------

def load_split_images(config, split: str, num_images: Optional[int],
                      split_field: str = "config.eval.split", labeled: bool = False):
    """The first `num_images` (None: all) images of `split` of the config's dataset, [-1, 1];
    with `labeled`, (images, int32 labels)."""
    source = input_pipeline.open_config_source(config.data, split, split_field)
    if num_images is not None and num_images > len(source):
        raise ValueError(f"{num_images} images were asked of split {split!r}, which has "
                         f"{len(source)}")
    if labeled:
        return input_pipeline.load_labeled(source, num_images)
    return np.concatenate(list(input_pipeline.eval_batches(source, 1000, num_images)))


class Evaluator:
    """The evaluations of one model config; build once, call with each step's parameters.

    The held-out images, the classifier and its reference statistics are loaded
    once, when their evaluation is enabled (`config.eval.bpd_every` or
    `fid_every` > 0, or `with_bpd` / `with_sample_quality` True). Sample
    quality uses the classifier (`eval.classifier_dir`) and/or the Inception
    network (`eval.inception_weights`; reference: `eval.inception_reference_stats`,
    else the first `fid_reference_images` images of the train split). `__call__(params, step)` runs
    what is due at `step` and returns flat scalars for the metrics writer.
    """

    def __init__(self, config, mesh: Mesh, *, with_bpd: Optional[bool] = None,
                 with_sample_quality: Optional[bool] = None,
                 log_fn: Callable[[str], None] = log.info):
        e = config.eval
        validate_config(e)
        self.config, self.mesh, self.log = config, mesh, log_fn
        self.bpd_enabled = e.bpd_every > 0 if with_bpd is None else with_bpd
        self.fid_enabled = e.fid_every > 0 if with_sample_quality is None else with_sample_quality
        self.schedule = schedule_from_config(config.diffusion)
        self.apply_fn = sampling.ModelApply(unet.create_model(config))
        self.num_classes = config.model.num_classes
        self.class_scorer = None  # a conditional model's per-class scores
        self.bpd_images = (load_split_images(config, e.split, e.bpd_num_images)
                           if self.bpd_enabled else None)
        self.scorers = []
        if self.fid_enabled:
            if not (e.classifier_dir or e.inception_weights):
                raise ValueError("sample quality needs config.eval.classifier_dir (train one "
                                 "with `python train_classifier.py --output_dir=DIR`) and/or "
                                 "config.eval.inception_weights (pytorch-fid's .pth file)")
            if e.classifier_dir:
                reference = load_split_images(config, e.split, e.fid_reference_images or None,
                                              labeled=bool(self.num_classes))
                reference, labels = reference if self.num_classes else (reference, None)
                self.scorers.append(ClassifierScorer(e.classifier_dir, reference))
                if self.num_classes:
                    self.class_scorer = conditional_eval.ConditionalScorer(
                        e.classifier_dir, reference, labels)
            if e.inception_weights:
                train_images = (None if e.inception_reference_stats else load_split_images(
                    config, config.data.train_split, e.fid_reference_images or None,
                    "config.data.train_split"))
                self.scorers.append(InceptionScorer(
                    e.inception_weights, reference_stats_path=e.inception_reference_stats,
                    reference_images=train_images, mesh=mesh))

    def bits_per_dim(self, params, progress=None) -> Dict[str, float]:
        e = self.config.eval
        per_image = bpd.bits_per_dim(self.apply_fn, params, self.schedule, self.bpd_images,
                                     mesh=self.mesh, seed=e.seed, batch_size=e.bpd_batch_size,
                                     objective=self.config.diffusion.objective, progress=progress)
        return bpd.summarize_bpd(per_image)

    def sample_quality(self, params, num_samples: Optional[int] = None,
                       guidance: Optional[float] = None, progress=None) -> Dict[str, float]:
        """Scores of `num_samples` samples; a conditional model's are of every class equally
        often, guided by `guidance` (default config.sampling.guidance), with class scores."""
        c = self.config
        n = c.eval.fid_num_samples if num_samples is None else num_samples
        scores, conditional = {"fid_num_samples": n}, {}
        if self.num_classes:
            guidance = c.sampling.guidance if guidance is None else guidance
            conditional = dict(labels=conditional_eval.balanced_labels(n, self.num_classes),
                               guidance=guidance)
            scores["guidance"] = guidance
        result = sampling.generate(
            self.apply_fn, params, self.schedule,
            (c.data.image_size, c.data.image_size, c.data.channels), n, seed=c.eval.seed,
            mesh=self.mesh, progress=progress, **sampling.settings(c), **conditional)
        samples = quantize(result.images)
        for scorer in self.scorers:
            scores.update(scorer(samples))
        if self.class_scorer is not None:
            scores.update(self.class_scorer(samples, conditional["labels"]))
        return scores

    def _bpd_due(self, step: int) -> bool:
        every = self.config.eval.bpd_every
        return self.bpd_enabled and every > 0 and step % every == 0

    def _fid_due(self, step: int) -> bool:
        every = self.config.eval.fid_every
        return self.fid_enabled and every > 0 and step % every == 0

    def due(self, step: int) -> bool:
        """Whether `__call__(params, step)` would evaluate anything (the loop may skip it)."""
        return self._bpd_due(step) or self._fid_due(step)

    def __call__(self, params, step: int) -> Dict[str, Any]:
        """The evaluations due at `step` (bits/dim, sample quality), prefixed 'eval/'."""
        out = {}
        if self._bpd_due(step):
            out.update(self.bits_per_dim(params))
        if self._fid_due(step):
            out.update(self.sample_quality(params))
        if out:
            self.log(f"eval at step {step}: " + format_scores(out))
        return {f"eval/{k}": v for k, v in out.items()}


def format_scores(scores: Dict[str, Any]) -> str:
    """The headline numbers on one line."""
    parts = []
    if "bpd" in scores:
        parts.append(f"bits/dim {scores['bpd']:.4f} +- {scores['bpd_stderr']:.4f} "
                     f"({scores['bpd_num_images']} images; prior {scores['bpd_prior']:.4f}, "
                     f"KL terms {scores['bpd_kl']:.4f}, decoder {scores['bpd_decoder']:.4f})")
    if "inception_fid" in scores:
        parts.append(f"Inception FID {scores['inception_fid']:.3f} "
                     f"({scores['fid_num_samples']} samples)")
    if "class_accuracy" in scores:
        parts.append(f"guidance {scores['guidance']:g}: class accuracy "
                     f"{scores['class_accuracy']:.3f}")
    if "classifier_fd" in scores:
        parts.append(f"classifier FD {scores['classifier_fd']:.4f} "
                     f"({scores['fid_num_samples']} samples; class entropy "
                     f"{scores['class_entropy_bits']:.3f} bits, "
                     f"{scores['num_classes_covered']} classes covered)")
    return "; ".join(parts)
