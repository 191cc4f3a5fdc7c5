"""Degradations of clean images in [0, 1]: Gaussian noise and inpainting masks.

Observation models for the noise (`OBSERVATIONS`): "clipped" is clip(x + n, 0, 1), the DIP
author's get_noisy_image (a valid image; the DIP PSNR table keeps it); "gaussian" is x + n
unclipped, the model a diffusion's direct start assumes (y = x0 + sigma n exactly). On
FashionMNIST about half the pixels are black background, where clipping half-rectifies the
noise: the clipped observation is not a Gaussian observation.

Every random draw is seeded per sample from (run seed, sample key), so an observation is the
same whichever shard, task or batch the sample lands in.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from dipddpm.dip.seeds import sample_seed
from dipddpm.registry import TASKS  # the schema checks protocol.tasks against the same names
OBSERVATIONS = ("gaussian", "clipped")


def _rng(run_seed: int, key: str, purpose: str) -> np.random.Generator:
    return np.random.default_rng(sample_seed(run_seed, key, purpose))


def add_noise(clean: np.ndarray, keys: Sequence[str], sigma: float, run_seed: int,
              clip: bool = True) -> np.ndarray:
    """clean [N, ...] in [0, 1] plus N(0, (sigma/255)^2); clipped to [0, 1] like the DIP
    author's get_noisy_image when `clip` (the "clipped" model), else left as is ("gaussian").
    The noise itself is the same either way (seeded by key)."""
    out = np.empty_like(clean, dtype=np.float32)
    for i, key in enumerate(keys):
        noise = _rng(run_seed, key, "noise").standard_normal(clean.shape[1:])
        noisy = clean[i] + noise * (sigma / 255.0)
        out[i] = np.clip(noisy, 0.0, 1.0) if clip else noisy
    return out


def box_mask(shape: Sequence[int], box: int) -> np.ndarray:
    """1 = observed, 0 = missing: a centred box of side `box` is missing."""
    mask = np.ones(shape, dtype=np.float32)
    h, w = shape[-2:]
    top, left = (h - box) // 2, (w - box) // 2
    mask[..., top:top + box, left:left + box] = 0.0
    return mask


def random_masks(shape: Sequence[int], keys: Sequence[str], keep_fraction: float,
                 run_seed: int) -> np.ndarray:
    """One mask per key; each pixel kept with probability keep_fraction (shared by channels)."""
    n = len(keys)
    out = np.empty((n, *shape), dtype=np.float32)
    for i, key in enumerate(keys):
        keep = _rng(run_seed, key, "mask").random(shape[-2:]) < keep_fraction
        out[i] = np.broadcast_to(keep, shape)
    return out


def degrade(clean: np.ndarray, keys: Sequence[str], task: str, *, run_seed: int,
            sigma: float = 25.0, box: int = 10, keep_fraction: float = 0.5,
            observation: str = "clipped"):
    """Return (observation, mask), both [N, C, H, W] float32; mask is 1 where y is observed.
    `observation` (one of OBSERVATIONS) applies to the noise of denoising."""
    if len(keys) != len(clean):
        raise ValueError(f"{len(keys)} keys for {len(clean)} images")
    if observation not in OBSERVATIONS:
        raise ValueError(f"unknown observation model {observation!r}; choose from "
                         f"{', '.join(OBSERVATIONS)}")
    clean = clean.astype(np.float32)
    if task == "denoise":
        return (add_noise(clean, keys, sigma, run_seed, clip=observation == "clipped"),
                np.ones_like(clean))
    if task == "inpaint_box":
        mask = np.broadcast_to(box_mask(clean.shape[1:], box), clean.shape).copy()
    elif task == "inpaint_random":
        mask = random_masks(clean.shape[1:], keys, keep_fraction, run_seed)
    else:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    return clean * mask, mask
