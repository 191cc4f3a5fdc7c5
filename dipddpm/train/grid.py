"""Image grids as PNG, written atomically (numpy + PIL: importing torchvision costs seconds)."""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from dipddpm.runs import atomic_path


def grid_array(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """images in [-1, 1], [N, C, H, W] (C = 1 or 3) -> uint8 [rows, cols(, 3)], white padding."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    n, c, h, w = x.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    out = np.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        out[:, pad + r * (h + pad): pad + r * (h + pad) + h,
            pad + q * (w + pad): pad + q * (w + pad) + w] = x[i]
    return out[0] if c == 1 else out.transpose(1, 2, 0)


def save_grid(images: torch.Tensor, path, nrow: int | None = None) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(grid_array(images, nrow)).save(tmp, format="PNG")
