"""FID and KID on classifier features, the cached real-data features, and the real-vs-real floor.

FID = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64. tr((S1 S2)^(1/2)) is the sum of
the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2): that matrix is symmetric positive
semi-definite and has the same eigenvalues as S1 S2, so two `eigh` calls do it without scipy
and without the complex parts sqrtm produces on near-singular covariances.

KID (Binkowski et al. 2018) is the unbiased MMD^2 with the cubic kernel k(x, y) = (x.y/d + 1)^3,
averaged over random subsets; unlike FID it has no bias in N, so small-N numbers compare.

FID is biased upwards at small N: every FID we report states N and the floor at that N, the FID
between two disjoint sets of real images of the same size (`real_vs_real_floor`).

Caches, beside the classifier checkpoint and keyed by its sha256 (so a retrained classifier
never reads features of the old one): cache-<sha16>-<split>-features.npy (float32 [N, D]),
cache-<sha16>-train-stats.npz (mu, sigma, n, sha256) and cache-<sha16>-floors.json (the
real-vs-real floors computed so far, by N and seed).

Inception FID is optional: dipddpm/evaluate/inception.py (the FID Inception through
torch-fidelity, weights from the local file classifier.inception_weights) reuses this module's
math. On 28x28 grey images the classifier
features stay the measure this project reports.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dipddpm.config import UserError
from dipddpm.data import load_split
from dipddpm.runs import atomic_path, atomic_write_json, read_json


# ----------------------------------------------------------------------------- the math

def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (N-1 normalised, as the reference FID code) in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need features [N>=2, D], got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    s2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"shape mismatch: {mu1.shape}/{s1.shape} vs {mu2.shape}/{s2.shape}")
    r1 = _sqrt_psd(s1)
    inner = r1 @ s2 @ r1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    # rounding can push a true 0 slightly negative
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt, 0.0))


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def kid(a: np.ndarray, b: np.ndarray, subset_size: int = 1000, num_subsets: int = 100,
        seed: int = 0) -> tuple[float, float]:
    """KID (unbiased MMD^2, cubic polynomial kernel): mean and std over random subsets.

    Each subset draws m = min(subset_size, len(a), len(b)) rows of each set without replacement;
    when m equals both set sizes every subset is the whole set, one estimate, and the std is 0.
    The scale depends on the features (here ~0.3 of noise between real sets at m = 1000).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: {a.shape[1]} vs {b.shape[1]}")
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError("KID needs at least 2 images in each set")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets)
    for i in range(num_subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        off = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values[i] = off - 2 * kxy.sum() / (m * m)
    return float(values.mean()), float(values.std())


# ----------------------------------------------------------------------------- cached real data

def cache_tag(sha256: str) -> str:
    return f"cache-{sha256[:16]}-"


def split_features(clf, data_dir, split: str) -> np.ndarray:
    """Features of every image of a split (index order), cached beside the classifier."""
    path = Path(clf.dir) / f"{cache_tag(clf.sha256)}{split}-features.npy"
    if path.is_file():
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            pass  # a damaged cache is rebuilt below
    images, _, _ = load_split(data_dir, split)
    feats = clf.features(images)
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, feats, allow_pickle=False)
    return feats


def cached_stats(path, sha256: str, features) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, n) of `features()`, cached at `path` for the feature net `sha256`; a damaged
    or foreign cache is rebuilt."""
    path = Path(path)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["sha256"]) == sha256:
                    return z["mu"], z["sigma"], int(z["n"])
        except (OSError, ValueError, KeyError):
            pass
    feats = features()
    mu, sigma = feature_stats(feats)
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, mu=mu, sigma=sigma, n=len(feats), sha256=np.array(sha256))
    return mu, sigma, len(feats)


def train_stats(clf, data_dir) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, n) of the train split's features, cached; the reference for sample FID."""
    return cached_stats(Path(clf.dir) / f"{cache_tag(clf.sha256)}train-stats.npz", clf.sha256,
                        lambda: split_features(clf, data_dir, "train"))


def sample_metrics(clf, data_dir, images, kid_subset_size: int = 1000, kid_num_subsets: int = 100,
                   seed: int = 0) -> dict:
    """FID against the whole train split's statistics and KID against the train features.

    `images`: uint8 [N,28,28] or float [N,1,28,28] in [-1,1]. Quote the result with
    `real_vs_real_floor(clf, data_dir, N)`.
    """
    feats = clf.features(images)
    mu, sigma, n_train = train_stats(clf, data_dir)
    k_mean, k_std = kid(feats, split_features(clf, data_dir, "train"), kid_subset_size,
                        kid_num_subsets, seed)
    return {"n": len(feats), "fid": frechet_distance(*feature_stats(feats), mu, sigma),
            "kid": k_mean, "kid_std": k_std, "reference": f"train ({n_train} images)",
            "classifier_sha256": clf.sha256}


def real_vs_real_floor(clf, data_dir, n: int, seed: int = 0, kid_subset_size: int = 1000,
                       kid_num_subsets: int = 100) -> dict:
    """The FID a perfect generator would get at N: real test images vs real train images.

    fid:           N test images vs N other (train) images: two disjoint real sets of N.
    fid_vs_train:  N test images vs the whole train split's statistics, the same reference
                   `sample_metrics` uses, so it is the floor to quote beside a sample FID.
    kid:           N test vs N train images (unbiased: ~0 up to noise).
    """
    cache = Path(clf.dir) / f"{cache_tag(clf.sha256)}floors.json"
    key = f"n={n},seed={seed},kid={kid_subset_size}x{kid_num_subsets}"
    floors = _read_floors(cache)
    if key in floors:
        return floors[key]
    test = split_features(clf, data_dir, "test")
    train = split_features(clf, data_dir, "train")
    if not 2 <= n <= min(len(test), len(train)):
        raise UserError(f"real-vs-real floor: N = {n} must be in 2..{min(len(test), len(train))} "
                        f"(the test split holds {len(test)} images)")
    rng = np.random.default_rng(seed)
    a = test[rng.choice(len(test), n, replace=False)]
    b = train[rng.choice(len(train), n, replace=False)]
    mu, sigma, _ = train_stats(clf, data_dir)
    k_mean, k_std = kid(a, b, kid_subset_size, kid_num_subsets, seed)
    result = {"n": n, "fid": fid_from_features(a, b),
              "fid_vs_train": frechet_distance(*feature_stats(a), mu, sigma),
              "kid": k_mean, "kid_std": k_std, "seed": seed, "classifier_sha256": clf.sha256}
    floors = _read_floors(cache)  # again: another process may have added floors meanwhile
    floors[key] = result
    atomic_write_json(cache, floors)
    return result


def _read_floors(path: Path) -> dict:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return {}
