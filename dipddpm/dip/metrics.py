"""PSNR on [0, 1] images, per sample: 10 log10(1 / MSE)."""
from __future__ import annotations

import torch

MAX_DB = 100.0  # identical images: report a finite ceiling instead of inf


def psnr(x: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample PSNR of x [N, ...] against ref; x is clipped to [0, 1] first.

    With a mask (1 = counted) the MSE is the mean over counted pixels only.
    """
    err = (x.clamp(0, 1) - ref) ** 2
    dims = tuple(range(1, err.dim()))
    if mask is None:
        mse = err.mean(dims)
    else:
        mse = (err * mask).sum(dims) / mask.sum(dims).clamp_min(1)
    return (-10.0 * torch.log10(mse.clamp_min(10 ** (-MAX_DB / 10)))).clamp(max=MAX_DB)
