"""Plots written as PNG files (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from dipddpm.artifacts import pyplot, save_png


def loss_curves_plot(path, curves: Sequence[tuple[str, Sequence[float], Sequence[float]]],
                     title: str = "Training loss") -> Path:
    """Loss vs images seen, one line per (label, images_seen, loss); log y, because the study's
    variant and a sound DDPM differ by an order of magnitude."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, x, y in curves:
        ax.plot(x, y, label=label, linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("images seen")
    ax.set_ylabel("loss (mean of a log interval)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return save_png(fig, path)


def fid_vs_nfe_plot(path, series: Sequence[tuple[str, Sequence[int], Sequence[float]]],
                    floors: Sequence[tuple[str, float]] = (),
                    title: str = "Generation: FID vs reverse steps") -> Path:
    """FID vs NFE, one line per (label, nfe, fid) (an arm of a generation run); real-vs-real
    floors as horizontal lines, since no FID below its floor means anything."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, nfe, fid in series:
        order = np.argsort(nfe)
        ax.plot(np.asarray(nfe)[order], np.asarray(fid)[order], "o-", markersize=4, label=label)
    for label, value in floors:
        ax.axhline(value, color="grey", linestyle=":", linewidth=1)
        ax.annotate(label, (0, value), xycoords=("axes fraction", "data"), fontsize=7,
                    color="grey", va="bottom")
    ax.set_xscale("log")
    ax.set_xlabel("reverse steps (NFE per sample)")
    ax.set_ylabel("FID (classifier features)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return save_png(fig, path)
