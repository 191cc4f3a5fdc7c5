"""Plots written as PNG files (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from dipddpm.runs import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    return plt


def dip_psnr_plot(path, curves: Sequence,
                  study: tuple[Sequence[int], Sequence[float]] | None = None,
                  title: str = "DIP denoising") -> Path:
    """PSNR vs iteration per sigma: estimate mean ± std (band), raw mean (dashed), noisy input
    (dotted); the study's numbers as markers. `curves` are dipddpm.dip.study.SigmaCurves."""
    plt = _pyplot()
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
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path
