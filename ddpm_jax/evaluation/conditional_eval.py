"""Sample quality of a class-conditional model, per class and over guidance scales.

For samples generated with known labels, the project's classifier
(`ddpm_jax.evaluation.classifier`) says how often a sample of class k is recognised as
k (`class_accuracy_k`; `class_accuracy` over all samples) and the Fréchet
distance in its features is taken between the samples of class k and the
held-out images of class k (`classifier_fd_k`; over all classes it is
`suite.ClassifierScorer`'s `classifier_fd`). Swept over guidance
scales w with the same seed (the same noise for every w), it shows the
fidelity/diversity trade of classifier-free guidance: accuracy rises with w,
the Fréchet distance falls, then rises again as the samples lose variety.
The per-class distances come from fewer samples than the classifier has
features, so they are biased upwards; compare them between scales and runs
with equal sample counts only.
"""
from typing import Dict, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ddpm_jax.evaluation import classifier, fid


def balanced_labels(num_samples: int, num_classes: int) -> np.ndarray:
    """Labels 0, 1, ..., K-1, 0, 1, ...: every class equally often (up to one)."""
    return (np.arange(num_samples) % num_classes).astype(np.int32)


class ConditionalScorer:
    """Class accuracy (per class and overall) and per-class Fréchet distances of labelled
    samples."""

    def __init__(self, classifier_dir: str, reference_images: np.ndarray,
                 reference_labels: np.ndarray):
        self.model, self.params, _ = classifier.load_classifier(classifier_dir)
        self._apply = classifier.make_apply_fn(self.model)
        _, features = classifier.predict(self._apply, self.params, reference_images)
        self.reference_by_class = {
            k: fid.feature_statistics(features[reference_labels == k])
            for k in np.unique(reference_labels) if np.sum(reference_labels == k) > 1}

    def __call__(self, samples: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
        logits, features = classifier.predict(self._apply, self.params, samples)
        correct = np.argmax(logits, axis=-1) == labels
        scores = {"class_accuracy": float(np.mean(correct))}
        for k in np.unique(labels):
            mine = labels == k
            scores[f"class_accuracy_{k}"] = float(np.mean(correct[mine]))
            if np.sum(mine) > 1 and k in self.reference_by_class:
                scores[f"classifier_fd_{k}"] = fid.frechet_distance(
                    fid.feature_statistics(features[mine]), self.reference_by_class[k])
        return scores


def plot_guidance_curve(results: Dict[float, Dict[str, float]], size=(640, 300)) -> np.ndarray:
    """A picture (uint8 [H, W, 3]) of class accuracy (left) and classifier Fréchet distance
    (right) against w.

    Drawn with PIL (already a dependency) rather than matplotlib, which the
    project does not otherwise need: two line plots with labelled end points.
    """
    ws = sorted(results)
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for panel, (key, title) in enumerate((("class_accuracy", "class accuracy"),
                                          ("classifier_fd", "classifier Frechet distance"))):
        values = [results[w][key] for w in ws]
        left, top = panel * width // 2 + 40, 30
        right, bottom = (panel + 1) * width // 2 - 15, height - 35
        draw.rectangle([left, top, right, bottom], outline="black")
        draw.text((left, 8), f"{title} vs guidance w", fill="black")
        low, high = (0.0, 1.0) if key == "class_accuracy" else (0.0, max(values) * 1.1 or 1.0)
        span = max(ws[-1] - ws[0], 1e-9)
        points = [(left + (w - ws[0]) / span * (right - left),
                   bottom - (v - low) / (high - low) * (bottom - top)) for w, v in zip(ws, values)]
        if len(points) > 1:
            draw.line(points, fill="blue", width=2)
        for (x, y), w, v in zip(points, ws, values):
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill="blue")
            draw.text((x - 12, y - 15), f"{v:.3g}", fill="black")
            draw.text((x - 6, bottom + 5), f"{w:g}", fill="black")
        draw.text((left - 35, top), f"{high:.3g}", fill="gray")
        draw.text((left - 35, bottom - 10), f"{low:.3g}", fill="gray")
    return np.asarray(image)


def parse_guidance(values: Sequence[str]) -> list:
    """`--guidance` values (strings) as floats; ValueError naming a bad one."""
    out = []
    for value in values:
        try:
            out.append(float(value))
        except ValueError:
            raise ValueError(f"--guidance: {value!r} is not a number (give e.g. 0,1,2,4)") from None
    if not out:
        raise ValueError("--guidance needs at least one scale, e.g. 0,1,2,4")
    return out
