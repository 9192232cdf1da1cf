"""One table from several runs of experiments/quality/run.py, compared image by image.

A 2-core CPU trains two networks of the study in about an hour (a GPU trains all its
recipes in minutes): combining lets the recipes be trained in several runs and compared as if
one run had trained them. That is sound because a run's draws do not depend on its recipes:
every network starts from the design's initial weights and sees the same batches,
timesteps and noise, and every variant samples image i from the same x_T. So the paired
bootstrap of run.py (the same resampled image indices for both sets) holds across runs.

Refused, naming the field: runs whose budget, seed, base config or data differ, runs that
share a recipe, and a run whose stored distances this classifier and test split do not
reproduce (another classifier).

    python -m experiments.quality.combine RUN_DIR RUN_DIR ... --out_dir=OUT

writes OUT/quality.json (run.py's keys, plus `runs`) and OUT/table.md.
"""
import argparse
import json
import os
from typing import Dict, List, Tuple

import numpy as np

from ddpm_jax.evaluation import fid, suite
from experiments.quality import data as quality_data, run
from experiments.quality.variants import PairedBootstrap, compare, table

# The arguments that decide a run's draws and what its scores are measured against.
PAIRED_ARGS = ("config", "data_npz", "override", "ema_start", "seed", "steps", "batch_size",
               "steps_per_call", "num_samples", "bootstrap")


def load_run(directory: str) -> Tuple[dict, Dict[str, np.ndarray]]:
    """(quality.json, {variant: classifier features}) of one run's --out_dir."""
    with open(os.path.join(directory, "quality.json")) as f:
        results = json.load(f)
    with np.load(os.path.join(directory, "features.npz")) as stored:
        features = {name: stored[name] for name in stored.files if name in results["variants"]}
    return results, features


def check_paired(runs: Dict[str, dict]) -> None:
    """Raises ValueError unless the runs share PAIRED_ARGS and no two train one recipe."""
    (first_dir, first), *others = runs.items()
    for directory, results in others:
        for field in PAIRED_ARGS:
            if results["args"].get(field) != first["args"].get(field):
                raise ValueError(
                    f"runs are not paired: --{field} is {first['args'].get(field)!r} in "
                    f"{first_dir} and {results['args'].get(field)!r} in {directory}")
    seen = {}
    for directory, results in runs.items():
        for recipe in results["recipes"]:
            if recipe in seen:
                raise ValueError(f"recipe {recipe!r} is in both {seen[recipe]} and {directory}: "
                                 f"keep it in one run")
            seen[recipe] = directory


def check_scored_alike(reference: fid.FeatureStatistics, runs: Dict[str, dict],
                       features: Dict[str, Dict[str, np.ndarray]]) -> None:
    """Each run's stored distances are reproduced from its features against `reference`."""
    for directory, run_features in features.items():
        if not run_features:
            raise ValueError(f"{directory}: features.npz holds no variant of its quality.json")
        name, rows = next(iter(run_features.items()))
        stored = runs[directory]["variants"][name]["classifier_fd"]
        again = fid.frechet_distance(fid.feature_statistics(rows), reference)
        if not np.isclose(again, stored, rtol=1e-4):
            raise ValueError(
                f"{directory}: {name} scores {again:.4f} against this classifier's test split "
                f"but {stored:.4f} in its quality.json: the runs used another classifier or "
                f"test split")


def combine(directories: List[str], reference: fid.FeatureStatistics) -> dict:
    """run.py's results for the union of the runs' recipes, comparisons over all of them."""
    loaded = {d: load_run(d) for d in directories}
    runs = {d: results for d, (results, _) in loaded.items()}
    features = {d: run_features for d, (_, run_features) in loaded.items()}
    check_paired(runs)
    check_scored_alike(reference, runs, features)
    first = runs[directories[0]]
    combined = {"runs": list(directories),
                "args": {field: first["args"].get(field) for field in PAIRED_ARGS},
                "reference": next((r["reference"] for r in runs.values() if r["reference"]),
                                  None),
                "recipes": {}, "variants": {}, "comparisons": [], "train": {},
                "seconds": {d: r["seconds"].get("total") for d, r in runs.items()}}
    for results in runs.values():
        combined["recipes"].update(results["recipes"])
        combined["variants"].update(results["variants"])
        combined["train"].update(results["train"])
    timesteps = {name: recipe["config"]["diffusion"]["timesteps"]
                 for name, recipe in combined["recipes"].items()}
    all_features = {name: rows for run_features in features.values()
                    for name, rows in run_features.items()}
    bootstrap = PairedBootstrap(reference, first["args"]["bootstrap"])
    combined["comparisons"] = compare(bootstrap, all_features, timesteps, latest=None)
    return combined


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="--out_dir of each experiments.quality.run")
    parser.add_argument("--out_dir", required=True, help="where quality.json and table.md go")
    args = parser.parse_args(argv)
    missing = [d for d in args.runs if not os.path.exists(os.path.join(d, "features.npz"))]
    if missing:
        parser.error(f"no quality.json and features.npz of a finished run in: {', '.join(missing)}")
    os.makedirs(args.out_dir, exist_ok=True)
    first = load_run(args.runs[0])[0]["args"]
    data = quality_data.open_data(run.base_config(argparse.Namespace(**first)), first["data_npz"])
    scorer = suite.ClassifierScorer(
        quality_data.classifier_dir(first["classifier_dir"], args.out_dir), data.images("test"))
    try:
        results = combine(args.runs, scorer.reference)
    except ValueError as e:
        parser.error(str(e))
    with open(os.path.join(args.out_dir, "quality.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    with open(os.path.join(args.out_dir, "table.md"), "w") as f:
        f.write(table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
