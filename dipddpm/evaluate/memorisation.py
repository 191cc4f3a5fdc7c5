"""Memorisation: how close each sample is to its nearest training image, next to real test images.

A generator that copies its training set puts samples much closer to a training image than
unseen real images are. So the reference is the same distance measured for test images: if the
samples' nearest-neighbour distances sit well below the test images', the model memorises.
Distances are Euclidean, in pixels (images on [0, 1], 784 values) and in classifier features.

Search: float32 matrix products find the k nearest candidates, then the winner's distance is
recomputed exactly in float64, so an exact copy reports 0 and not sqrt(rounding error).
"""
from __future__ import annotations

import numpy as np
import torch

from dipddpm.data import load_split
from dipddpm.evaluate.classifier import to_uint8
from dipddpm.evaluate.fid import split_features


def _flat_unit(images) -> np.ndarray:
    """uint8 [N,28,28] -> float32 [N,784] on [0,1].

    Float images [N,1,28,28] on [-1,1] are first rounded to uint8 levels, the image a sample
    becomes when saved: a sample that reproduces a training image then sits at distance 0.
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu()
        if images.dtype != torch.uint8:
            images = to_uint8(images)
        images = np.asarray(images)
    x = np.asarray(images)
    if x.dtype != np.uint8:
        x = to_uint8(torch.from_numpy(x))
    return (x.astype(np.float32) / 255.0).reshape(len(x), -1)


def nearest(queries: np.ndarray, reference: np.ndarray, chunk: int = 256,
            candidates: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, (distance to, index of) its nearest reference row (Euclidean)."""
    q = np.asarray(queries, np.float32)
    r = np.asarray(reference, np.float32)
    if q.ndim != 2 or r.ndim != 2 or q.shape[1] != r.shape[1]:
        raise ValueError(f"need [N, D] and [M, D], got {q.shape} and {r.shape}")
    k = min(candidates, len(r))
    rt = torch.from_numpy(r)
    r_sq = rt.pow(2).sum(1)
    dist = np.empty(len(q))
    index = np.empty(len(q), dtype=np.int64)
    for s in range(0, len(q), chunk):
        qt = torch.from_numpy(q[s:s + chunk])
        d2 = qt.pow(2).sum(1, keepdim=True) + r_sq[None] - 2 * qt @ rt.T
        cand = torch.topk(d2, k, dim=1, largest=False).indices.numpy()  # [n, k]
        exact = ((q[s:s + chunk, None, :].astype(np.float64)
                  - r[cand].astype(np.float64)) ** 2).sum(-1)
        best = exact.argmin(1)
        rows = np.arange(len(cand))
        dist[s:s + chunk] = np.sqrt(exact[rows, best])
        index[s:s + chunk] = cand[rows, best]
    return dist, index


def _summary(d: np.ndarray) -> dict:
    return {"min": float(d.min()), "p05": float(np.percentile(d, 5)),
            "median": float(np.median(d)), "mean": float(d.mean())}


def memorisation_report(samples, train_images, test_images, sample_feats=None,
                        train_feats=None, test_feats=None, train_keys=None) -> dict:
    """Nearest-training-image distances of samples vs of test images, in pixels (and features).

    images: uint8 [N,28,28] or float [N,1,28,28] on [-1,1]; features: [N, D] from the same
    classifier (all three or none). Returns summaries plus the per-sample distances (and the
    test images' own, `test_distances`) and the key (or index) of each sample's nearest
    training image. `closer_than_test_p01` is the fraction of
    samples nearer to the train set than 99% of test images are: near 0.01 for a generator that
    does not copy, much more for one that does.
    """
    train_px = _flat_unit(train_images)
    out: dict = {"n_samples": int(len(samples)), "n_train": int(len(train_px)),
                 "n_test": int(len(test_images))}
    spaces = [("pixels", _flat_unit(samples), _flat_unit(test_images), train_px)]
    if sample_feats is not None:
        if train_feats is None or test_feats is None:
            raise ValueError("features need all three: samples, train and test")
        spaces.append(("features", sample_feats, test_feats, train_feats))
    for name, s, t, r in spaces:
        ds, idx = nearest(s, r)
        dt, _ = nearest(t, r)
        floor = float(np.percentile(dt, 1))
        out[name] = {"samples": _summary(ds), "test": _summary(dt),
                     "ratio_median": float(np.median(ds) / max(np.median(dt), 1e-12)),
                     "closer_than_test_p01": float((ds < floor).mean()),
                     "exact_copies": int((ds == 0).sum()),
                     "distances": ds.tolist(),
                     "test_distances": dt.tolist(),
                     "nearest": [train_keys[i] for i in idx] if train_keys is not None
                     else idx.tolist()}
    return out


def memorisation_check(clf, data_dir, samples, n_test: int = 1000, seed: int = 0) -> dict:
    """`memorisation_report` of `samples` against the whole train split of `data_dir`, with
    `n_test` random test images as the reference, in pixels and in `clf`'s features (cached)."""
    train, _, keys = load_split(data_dir, "train")
    test, _, _ = load_split(data_dir, "test")
    pick = np.sort(np.random.default_rng(seed).choice(len(test), min(n_test, len(test)),
                                                      replace=False))
    return memorisation_report(samples, train, test[pick], clf.features(samples),
                               split_features(clf, data_dir, "train"),
                               split_features(clf, data_dir, "test")[pick], train_keys=keys)
