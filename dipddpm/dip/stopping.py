"""ES-WMV (Wang et al., arXiv 2112.06074): early stopping on the windowed moving variance.

The variance of the last W raw outputs (mean over pixels of each pixel's variance over the
window, population variance) falls while the net fits the image and rises once it starts
fitting the noise. The rule keeps the raw output at the lowest variance seen and stops after
`patience` iterations without a new minimum (the paper's W = 100, patience 1000). The decision
is final: once a row has stopped, its pick is frozen, even when the fit goes on (a budget fit
that records ES-WMV on the way) and a lower variance comes later. Keeping the minimum moving
after the stop would be a look-ahead the rule does not have. Its cost is the iterations it runs
to decide: pick + patience.

Works on a batch: every row is one net, all at the same iteration.
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
        # the iteration at which each row stopped (0: not yet): its pick is final from then on
        self.stop_iter = torch.zeros(batch, dtype=torch.int64, device=device)

    @property
    def stopped(self) -> torch.Tensor:
        return self.stop_iter > 0

    def update(self, out: torch.Tensor, iteration: int):
        """Feed outputs [B, ...] of `iteration`; return (new_min [B] bool, stopped [B] bool).

        new_min is never True for a row that has stopped; stopped stays True once it is."""
        flat = out.detach().reshape(out.shape[0], -1)
        if self.buffer is None:
            self.buffer = flat.new_zeros((self.window, *flat.shape))
        self.buffer[self.seen % self.window] = flat
        self.seen += 1
        if self.seen < self.window:
            none = torch.zeros(flat.shape[0], dtype=torch.bool, device=flat.device)
            return none, self.stopped.clone()
        var = self.buffer.var(0, correction=0).mean(1).to(torch.float64)
        live = ~self.stopped
        new_min = (var < self.best) & live
        self.best = torch.where(new_min, var, self.best)
        self.best_iter = torch.where(new_min, iteration, self.best_iter)
        self.since = torch.where(new_min, 0, self.since + live.long())
        self.stop_iter = torch.where(live & (self.since >= self.patience), iteration,
                                     self.stop_iter)
        return new_min, self.stopped.clone()

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the rows in `keep` (indices), e.g. when stopped nets leave a batch."""
        if self.buffer is not None:
            self.buffer = self.buffer[:, keep]
        self.best, self.best_iter = self.best[keep], self.best_iter[keep]
        self.since, self.stop_iter = self.since[keep], self.stop_iter[keep]
