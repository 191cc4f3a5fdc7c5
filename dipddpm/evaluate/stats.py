"""Statistics the comparisons rest on: bootstrap intervals over images and the Pareto front.

  bootstrap_ci(values)          95% percentile interval of the mean over images
  paired_delta(a, b)            mean of a - b over the same images, with its interval
  pareto_front(costs, values)   the points no other point beats at equal or lower cost

The bootstrap resamples images with replacement (BOOTSTRAP_RESAMPLES times, a fixed seed, so
a table is reproducible) and takes the 2.5 and 97.5 percentiles of the resampled means. Paired
differences resample the per-image differences: the image-to-image spread both arms share
cancels, so the interval is much narrower than the two separate intervals suggest.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def bootstrap_ci(values: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> list[float]:
    """[low, high]: the 95% bootstrap percentile interval of the mean of `values`."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return [float(lo), float(hi)]


def paired_delta(a: Sequence[float], b: Sequence[float], **kw) -> tuple[float, list[float]]:
    """(mean of a - b, its 95% bootstrap interval) over paired values (the same images)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values differ in shape: {a.shape} vs {b.shape}")
    d = a - b
    return float(d.mean()), bootstrap_ci(d, **kw)


def pareto_front(costs: Sequence[float], values: Sequence[float]) -> list[int]:
    """Indices of the points on the front, by rising cost: a point is on it when no other point
    has cost <= its cost and value >= its value with one of them strictly better. Of points
    with equal cost and value the first is kept."""
    c, v = np.asarray(costs, dtype=np.float64), np.asarray(values, dtype=np.float64)
    order = sorted(range(len(c)), key=lambda i: (c[i], -v[i], i))
    front, best = [], -np.inf
    for i in order:
        if v[i] > best:
            front.append(i)
            best = v[i]
    return front


def best_at_cost(costs: Sequence[float], values: Sequence[float], budget: float,
                 exclude: int | None = None) -> int | None:
    """Index of the highest value among points with cost <= budget (None if there is none);
    ties go to the cheaper, then the first."""
    best = None
    for i, (c, v) in enumerate(zip(costs, values)):
        if i == exclude or c > budget * (1 + 1e-9) + 1e-12:
            continue
        if best is None or (v, -c) > (values[best], -costs[best]):
            best = i
    return best
