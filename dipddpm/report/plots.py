"""Plots written as PNG files (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from dipddpm.runs import atomic_path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    return plt


def dip_psnr_plot(path, curves: Sequence,
                  study: tuple[Sequence[int], Sequence[float]] | None = None,
                  title: str = "DIP denoising") -> Path:
    """PSNR vs iteration per sigma: estimate mean ± std (band), raw mean (dashed), noisy input
    (dotted); the study's numbers as markers. `curves` are dipddpm.dip.study.SigmaCurves."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, c in enumerate(curves):
        color = colors[i % len(colors)]
        it = np.arange(1, c.psnr_est.shape[0] + 1)
        mean, std = c.psnr_est.mean(1), c.psnr_est.std(1)
        ax.plot(it, mean, color=color, label=f"σ={c.sigma:g} estimate (EMA)")
        ax.fill_between(it, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
        ax.plot(it, c.psnr_raw.mean(1), color=color, linestyle="--", linewidth=0.8,
                label=f"σ={c.sigma:g} raw output")
        ax.axhline(c.noisy.mean(), color=color, linestyle=":", linewidth=1,
                   label=f"σ={c.sigma:g} noisy input")
    if study is not None:
        ax.plot(study[0], study[1], "kx", label="study (reported)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("PSNR vs clean (dB)")
    ax.set_title(f"{title}, N = {curves[0].psnr_est.shape[1]}" if curves else title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return save_png(fig, path, dpi=120)


def save_png(fig, path, dpi: int = 110) -> Path:
    """Lay out, write atomically (a killed job leaves no half-written PNG) and close the figure."""
    plt = pyplot()
    path = Path(path)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return path


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
