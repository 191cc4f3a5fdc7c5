"""The DIP fits' PSNR: the estimate clipped to [0, 1] first, identical images capped at 100 dB."""
from __future__ import annotations

import torch

from dipddpm.evaluate.image_metrics import psnr as image_psnr

MAX_DB = 100.0  # identical images: a finite ceiling, so means over images stay finite


def psnr(x: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample PSNR [N] of x against ref; with a mask (1 = counted), over counted pixels only."""
    return image_psnr(x.clamp(0, 1), ref, max_db=MAX_DB, mask=mask)
