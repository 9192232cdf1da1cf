"""The Fréchet distance between Gaussian fits of two sets of features.

FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))   (Heusel et al. 2017)

Everything is float64 numpy on the host. The trace of the matrix square root
is computed without `scipy.linalg.sqrtm` (whose Schur iteration returns complex
parts and NaNs on the singular covariances that few samples give): S1 S2 is
similar to the symmetric positive semi-definite A = S1^(1/2) S2 S1^(1/2), so
tr((S1 S2)^(1/2)) = sum(sqrt(eig(A))). S1^(1/2) comes from the eigen-
decomposition of S1, and round-off negatives among the eigenvalues of S1 and A
are clipped to zero. The statistics files use pytorch-fid's `.npz` keys
(`mu`, `sigma`), so its precomputed statistics load here too.
"""
import dataclasses

import numpy as np
from etils import epath

from ddpm_jax.runtime import storage


@dataclasses.dataclass(frozen=True)
class FeatureStatistics:
    """Mean [D] and covariance [D, D] (float64) of `count` feature vectors."""
    mean: np.ndarray
    cov: np.ndarray
    count: int


def feature_statistics(features) -> FeatureStatistics:
    """The mean and the unbiased covariance of features [N, D] (N >= 2)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must have shape [N, D] with N >= 2, got {features.shape}")
    return FeatureStatistics(mean=features.mean(axis=0), cov=np.cov(features, rowvar=False),
                             count=features.shape[0])


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix."""
    eigvals, eigvecs = np.linalg.eigh(0.5 * (matrix + matrix.T))
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray) -> float:
    """tr((cov1 cov2)^(1/2)) for covariance matrices, via eig(cov1^(1/2) cov2 cov1^(1/2))."""
    root1 = _psd_sqrt(np.asarray(cov1, np.float64))
    inner = root1 @ np.asarray(cov2, np.float64) @ root1
    eigvals = np.linalg.eigvalsh(0.5 * (inner + inner.T))
    return float(np.sum(np.sqrt(np.clip(eigvals, 0.0, None))))


def frechet_distance(a: FeatureStatistics, b: FeatureStatistics) -> float:
    """The Fréchet distance between N(a.mean, a.cov) and N(b.mean, b.cov)."""
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"feature dimensions differ: {a.mean.shape} vs {b.mean.shape}")
    diff = a.mean - b.mean
    distance = (diff @ diff + np.trace(a.cov) + np.trace(b.cov)
                - 2.0 * trace_sqrt_product(a.cov, b.cov))
    return max(float(distance), 0.0)  # Round-off can leave -1e-12 for identical sets.


def save_statistics(path: str, stats: FeatureStatistics) -> None:
    """Writes `mu`, `sigma` (pytorch-fid's keys) and `count` to an .npz file."""
    storage.write_encoded(path, lambda f: np.savez(f, mu=stats.mean, sigma=stats.cov,
                                                   count=stats.count))


def load_statistics(path: str) -> FeatureStatistics:
    """Reads an .npz file with `mu` and `sigma` (ours or pytorch-fid's; `count` optional)."""
    with epath.Path(path).open("rb") as f, np.load(f) as data:
        missing = {"mu", "sigma"} - set(data.files)
        if missing:
            raise ValueError(f"{path}: statistics file lacks {sorted(missing)}; "
                             f"it has {sorted(data.files)}")
        count = int(data["count"]) if "count" in data.files else 0
        return FeatureStatistics(mean=np.asarray(data["mu"], np.float64),
                                 cov=np.asarray(data["sigma"], np.float64), count=count)
