"""What experiments/quality/run.py trains and samples: recipes (config overrides), variants (parameters,
sampler, step) and the paired bootstrap that compares them.

A recipe is a set of config overrides applied to the base config, one network each; the
overrides name fields as `section.field`, and a field this checkout does not have raises
(the base config is locked) before anything is built. A variant is
`{params}-{sampler}-{step}`, sampled on a recipe's network and named `{recipe}/{variant}`:

  params   design | designnet | raw | ema | emaold (design / designnet / emaold: the
           `design` recipe only; see run.py)
  sampler  ddpm{T} (ancestral, all T steps) | ddim{K} (K steps, eta 0) |
           dpmpp{order}m{N}[time] (DPM-Solver++ 2M or 3M, N network calls, steps uniform in
           log-SNR, or in time with the suffix `time`)
  step     eq11 (the design's step) | clip (through x0 clipped to [-1, 1])

Each sampler is a dict of `sampling.generate` keyword arguments; a sampler or objective this
checkout's `generate` lacks is refused with the argument it needs.
"""
import concurrent.futures
import inspect
import os
import re
from typing import Dict, NamedTuple

import numpy as np

from ddpm_jax import sampling
from ddpm_jax.evaluation import fid

# The design's recipe first: every other is compared against its sampler on its network.
RECIPES = {
    "design": {},
    # The DDPM paper's loss instead of the design's Huber: a second network on any checkout.
    "design-l2": {"diffusion.loss_type": "l2"},
    "scaled": {"diffusion.terminal_snr": "scaled"},
    "scaled-v": {"diffusion.terminal_snr": "scaled", "diffusion.objective": "v"},
    "scaled-v-minsnr": {"diffusion.terminal_snr": "scaled", "diffusion.objective": "v",
                        "diffusion.loss_weighting": "min_snr"},
    "zero-v-minsnr": {"diffusion.terminal_snr": "zero", "diffusion.objective": "v",
                      "diffusion.loss_weighting": "min_snr"},
    "scaled-x0": {"diffusion.terminal_snr": "scaled", "diffusion.objective": "x0"},
    "scaled-x0-minsnr": {"diffusion.terminal_snr": "scaled", "diffusion.objective": "x0",
                         "diffusion.loss_weighting": "min_snr"},
    "scaled-eps-minsnr": {"diffusion.terminal_snr": "scaled", "diffusion.objective": "eps",
                          "diffusion.loss_weighting": "min_snr"},
}
REFERENCE_RECIPE = "design"
PARAMS = ("design", "designnet", "raw", "ema", "emaold")
DESIGN_ONLY = ("design", "designnet", "emaold")
_SAMPLER = re.compile(r"(ddpm|ddim)(\d+)$|dpmpp([23])m(\d+)(time)?$")


class Variant(NamedTuple):
    params: str
    sampler: Dict  # sampling.generate's keyword arguments, clip_denoised included
    label: str     # the sampler and step, e.g. 'dpmpp2m20-clip'


def apply_overrides(config, recipe: str):
    """The base config (locked) with the recipe's overrides; an unknown recipe or field raises."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; valid: {', '.join(RECIPES)}")
    config = config.copy_and_resolve_references()
    for key, value in RECIPES[recipe].items():
        *parents, field = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        if field not in node:
            raise ValueError(
                f"recipe {recipe!r}: config field {key} does not exist in this checkout (fields "
                f"of {'.'.join(parents)}: {', '.join(sorted(node.keys()))})")
        node[field] = value
    return config


def sampler_kwargs(token: str, step: str) -> Dict:
    """'ddim50', 'clip' -> {'sampler': 'ddim', 'ddim_steps': 50, 'clip_denoised': True}."""
    match = _SAMPLER.match(token)
    if not match:
        raise ValueError(f"bad sampler {token!r}: want ddpm<T>, ddim<K> or dpmpp<2|3>m<N>[time]")
    kind, count, order, calls, time_spacing = match.groups()
    if kind == "ddpm":
        kwargs = {"sampler": "ddpm"}
    elif kind == "ddim":
        kwargs = {"sampler": "ddim", "ddim_steps": int(count)}
    else:
        kwargs = {"sampler": "dpmpp", "steps": int(calls), "solver_order": int(order),
                  "step_spacing": "time" if time_spacing else "logsnr"}
    return {**kwargs, "clip_denoised": step == "clip"}


def check_generate_accepts(kwargs: Dict, what: str) -> None:
    """Raise if this checkout's `sampling.generate` lacks a sampler or an argument of `kwargs`."""
    accepted = inspect.signature(sampling.generate).parameters
    missing = [k for k in kwargs if k not in accepted]
    if kwargs.get("sampler", "ddpm") not in sampling.SAMPLERS or missing:
        raise ValueError(
            f"{what} needs sampling.generate({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
            f", which this checkout lacks (samplers: {', '.join(sampling.SAMPLERS)}; "
            f"missing arguments: {', '.join(missing) or 'none'})")


def parse_variant(name: str) -> Variant:
    """'ema-ddim50-clip' -> Variant('ema', {'sampler': 'ddim', 'ddim_steps': 50,
    'clip_denoised': True}, 'ddim50-clip')."""
    parts = name.split("-")
    ok = len(parts) == 3 and parts[0] in PARAMS and parts[2] in ("eq11", "clip")
    if ok:
        params, token, step = parts
        try:
            kwargs = sampler_kwargs(token, step)
        except ValueError:
            ok = False
    if ok and params == "design":
        ok = kwargs == {"sampler": "ddpm", "clip_denoised": False}
    if not ok:
        raise ValueError(f"bad variant {name!r}: want {{{','.join(PARAMS)}}}-"
                         f"{{ddpm<T>,ddim<K>,dpmpp<2|3>m<N>[time]}}-{{eq11,clip}} "
                         f"(design: ddpm...-eq11 only)")
    if params != "design":
        check_generate_accepts(kwargs, f"variant {name!r}")
    return Variant(params, kwargs, f"{token}-{step}")


def objective_kwargs(config) -> Dict:
    """`generate`'s `objective` argument for a config that has the field (checked); {} else."""
    objective = config.diffusion.get("objective", "eps")
    if "objective" not in config.diffusion:
        return {}
    kwargs = {"objective": objective}
    check_generate_accepts(kwargs, f"objective {objective!r}")
    return kwargs


class PairedBootstrap:
    """Fréchet distances of feature sets [N, D] of the same images' noise over one set of
    resampled image indices, so that any two sets' ratio has a paired 95 % interval: the 2.5
    and 97.5 percentiles of the ratio over the resamples, shifted by the resamples' mean
    offset from the full-sample ratio (a resample repeats images, which inflates both
    distances by their N-bias). Each set's distances are computed once, whatever the pairs."""

    def __init__(self, reference: fid.FeatureStatistics, num_resamples: int = 200,
                 seed: int = 0):
        self.reference, self.num_resamples, self.seed = reference, num_resamples, seed
        self._cache = {}

    def distances(self, features: np.ndarray, key=None):
        """(FD of all rows, FDs of the resamples [num_resamples]); cached under `key`."""
        if key is not None and key in self._cache:
            return self._cache[key]
        rng, n = np.random.default_rng(self.seed), len(features)
        resamples = [rng.integers(0, n, n) for _ in range(self.num_resamples)]
        fd = lambda rows: fid.frechet_distance(  # noqa: E731
            fid.feature_statistics(features[rows]), self.reference)
        # LAPACK releases the GIL: the resamples in threads (a 128-d FD takes ~5-20 ms).
        with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            out = (fd(np.arange(n)), np.array(list(pool.map(fd, resamples))))
        if key is not None:
            self._cache[key] = out
        return out

    def ratio(self, a: np.ndarray, b: np.ndarray, key_a=None, key_b=None) -> dict:
        """FD(a) / FD(b) with its interval."""
        if a.shape != b.shape:
            raise ValueError(f"paired feature sets differ in shape: {a.shape} vs {b.shape}")
        (point_a, draws_a), (point_b, draws_b) = self.distances(a, key_a), self.distances(b, key_b)
        point, draws = point_a / point_b, draws_a / draws_b
        low, high = np.percentile(draws, [2.5, 97.5]) - (np.mean(draws) - point)
        return {"ratio": point, "low": float(low), "high": float(high)}


REFERENCE = "raw-ddpm{T}-eq11"
# (a, b, what the ratio FD(a) / FD(b) answers) within a recipe; the steps are filled in per run.
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


def comparisons(names, timesteps: dict) -> list:
    """(a, b, question) for every pair of sampled variants `names` ('recipe/variant') to
    compare: COMPARISONS within each recipe, each variant against THE reference, and each
    sampler against DDPM with all T steps on the same parameters and step."""
    names, pairs = set(names), {}
    reference = f"{REFERENCE_RECIPE}/{REFERENCE.format(T=timesteps.get(REFERENCE_RECIPE))}"
    for recipe, T in timesteps.items():
        for a, b, question in COMPARISONS:
            pairs[f"{recipe}/{a.format(T=T)}", f"{recipe}/{b.format(T=T)}"] = question
    for name in sorted(names):
        recipe, variant = name.split("/")
        pairs.setdefault((name, reference), "against the design's sampler on the design's recipe")
        params, sampler, step = variant.split("-")
        ddpm = f"ddpm{timesteps[recipe]}"
        pairs.setdefault((name, f"{recipe}/{params}-{ddpm}-{step}"),
                         f"{sampler} against {ddpm} on the same parameters")
    return [(a, b, q) for (a, b), q in pairs.items() if a != b and a in names and b in names]


def compare(bootstrap: PairedBootstrap, features: dict, timesteps: dict, latest: str) -> list:
    """Every pair of `comparisons` among the variants sampled from the shared noise; prints
    those with `latest`."""
    out = []
    for a, b, question in comparisons(features, timesteps):
        out.append({"a": a, "b": b, "question": question,
                    **bootstrap.ratio(features[a], features[b], a, b)})
        if latest in (a, b):
            print(f"  {a} / {b}: {out[-1]['ratio']:.3f} [{out[-1]['low']:.3f}, "
                  f"{out[-1]['high']:.3f}] ({question})", flush=True)
    return out


def table(results: dict) -> str:
    """Markdown: each variant's FD, its ratio to THE reference and to DDPM with all T steps
    on the same parameters (95 % intervals), and its sampling time per image."""
    by_question = {}
    for c in results["comparisons"]:
        if c["b"] == results.get("reference"):
            by_question.setdefault("reference", {})[c["a"]] = c
        elif c["question"].endswith("on the same parameters"):
            by_question.setdefault("ddpm", {})[c["a"]] = c

    def ratio(kind, name):
        c = by_question.get(kind, {}).get(name)
        return f"{c['ratio']:.3f} [{c['low']:.3f}, {c['high']:.3f}]" if c else "-"

    rows = ["| variant | FD | / reference | / DDPM, same params | ms per image |",
            "|---|---:|---:|---:|---:|"]
    for name, s in results["variants"].items():
        ms = f"{1e3 * s['s_per_image']:.2f}" if "s_per_image" in s else "-"
        rows.append(f"| {name} | {s['classifier_fd']:.1f} | {ratio('reference', name)} | "
                    f"{ratio('ddpm', name)} | {ms} |")
    return "\n".join(rows)
