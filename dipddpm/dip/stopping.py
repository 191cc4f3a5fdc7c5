"""ES-WMV (Wang et al., arXiv 2112.06074): early stopping on the windowed moving variance.

The variance of the last W outputs (mean over pixels of each pixel's variance over the window)
falls while the net fits the image and rises once it starts fitting the noise. The rule keeps
the output at the lowest variance seen and stops after `patience` iterations without a new
minimum. Works on a batch: every row is one net, all at the same iteration.
"""
from __future__ import annotations

import torch


class EsWmv:
    def __init__(self, batch: int, window: int, patience: int, device=None):
        self.window, self.patience = window, patience
        self.buffer: torch.Tensor | None = None  # [W, B, D] ring of recent outputs
        self.seen = 0
        self.best = torch.full((batch,), float("inf"), dtype=torch.float64, device=device)
        self.best_iter = torch.full((batch,), -1, dtype=torch.int64, device=device)
        self.since = torch.zeros(batch, dtype=torch.int64, device=device)

    def update(self, out: torch.Tensor, iteration: int):
        """Feed outputs [B, ...] of `iteration`; return (new_min [B] bool, stop [B] bool)."""
        flat = out.detach().reshape(out.shape[0], -1)
        if self.buffer is None:
            self.buffer = flat.new_zeros((self.window, *flat.shape))
        self.buffer[self.seen % self.window] = flat
        self.seen += 1
        if self.seen < self.window:
            none = torch.zeros(flat.shape[0], dtype=torch.bool, device=flat.device)
            return none, none
        var = self.buffer.var(0, correction=0).mean(1).to(torch.float64)
        new_min = var < self.best
        self.best = torch.where(new_min, var, self.best)
        self.best_iter = torch.where(new_min, iteration, self.best_iter)
        self.since = torch.where(new_min, 0, self.since + 1)
        return new_min, self.since >= self.patience

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the rows in `keep` (indices), e.g. when stopped nets leave a batch."""
        if self.buffer is not None:
            self.buffer = self.buffer[:, keep]
        self.best, self.best_iter = self.best[keep], self.best_iter[keep]
        self.since = self.since[keep]
