"""The files every layer writes beside its numbers: PNG figures, image grids, table cells.

- `pyplot()`: matplotlib set up for files only (no display on a cluster node), and
  `save_png(fig, path)`: lay out, write atomically (a killed job leaves no half-written PNG),
  close;
- `grid_array(images)` / `save_grid(images, path)`: images in [-1, 1] as one PNG grid (numpy +
  PIL: importing torchvision costs seconds);
- `fmt(v)` and `DASH`: how a number or a missing value reads in a markdown table.

Kept at the ground beside dipddpm.runs, so that fitting, training, the protocols and the report
share one implementation without importing each other.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from dipddpm.runs import atomic_path

if TYPE_CHECKING:  # torch is not imported here: `import dipddpm.artifacts` stays cheap
    import torch

DASH = "—"  # a table cell with no value


def fmt(v, digits: int = 2) -> str:
    """A table cell: floats to `digits` places, None or NaN as DASH, anything else as str()."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return DASH
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only)."""
    # late: importing matplotlib costs ~0.5 s, and most jobs that import this module never plot
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path, dpi: int = 110) -> Path:
    """Lay out, write atomically (a killed job leaves no half-written PNG) and close the figure."""
    plt = pyplot()
    path = Path(path)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return path


def grid_array(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """images in [-1, 1], [N, C, H, W] (C = 1 or 3) -> uint8 [rows, cols(, 3)], white padding."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().numpy().astype(np.uint8)
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
    """images in [-1, 1] as one PNG grid at `path`, written atomically."""
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(grid_array(images, nrow)).save(tmp, format="PNG")
