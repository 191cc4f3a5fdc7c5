"""Exponential moving average of a model's weights, kept on every rank.

Every rank holds the same weights after each optimizer step (DDP all-reduces the gradients),
so updating an EMA copy on every rank keeps the copies identical without any communication,
and any rank can sample or save. (diffusers' multi-GPU EMA bug came from updating it on one.)
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        for p in self.model.parameters():
            p.data = p.data.float()  # averaging in fp32 whatever the training precision

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        """ema <- decay * ema + (1 - decay) * model; decay 0 copies the weights."""
        d = self.decay if decay is None else decay
        ema_p = list(self.model.parameters())
        src = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src, 1.0 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.model.load_state_dict(state["model"])
