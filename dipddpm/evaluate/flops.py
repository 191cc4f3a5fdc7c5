"""Compute in FLOPs, measured with torch's FLOP counter (torch.utils.flop_counter).

FlopCounterMode counts the FLOPs of matrix products and convolutions (2 per multiply-add),
forward and backward, and of attention; elementwise work (activations, normalisation, the
optimiser's update, the sampler's arithmetic) is not counted: it is small next to the
convolutions here and costs memory traffic rather than FLOPs.

The two units the protocols charge, per image:
  unet_forward_gflop(model)   one U-Net forward (one network evaluation, NFE) at 28x28
  dip_iteration_gflop(spec)   one DIP iteration: the skip net's forward plus the backward pass
                              of the MSE loss into its parameters (the input needs no gradient)
Each is counted once per model (per U-Net object, per SkipSpec) on one image and cached; FLOPs
of these nets are linear in the batch. Measured: the study's DIP net 1.33 GFLOP per iteration,
unet-small 0.45 GFLOP per forward, unet-tiny 0.12.

A row's compute is then gflop = nfe * unet_forward_gflop + dip_iters * dip_iteration_gflop
(+ the cheap estimates' blurs, ~0).
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from dipddpm.models.dip import SkipNet, SkipSpec

IMAGE = (1, 28, 28)  # FashionMNIST: channels, height, width


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of everything fn() runs (forward and, if fn calls it, backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def forward_flops(model: torch.nn.Module, *inputs) -> int:
    """FLOPs of one forward pass, no gradients."""
    def run():
        with torch.no_grad():
            model(*inputs)
    return count_flops(run)


def train_step_flops(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> int:
    """FLOPs of one forward, MSE to target and backward into the model's parameters (x needs
    no gradient, as the DIP's input z). The parameters' .grad are left as they were."""
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        loss = ((model(x) - target) ** 2).mean()
        torch.autograd.grad(loss, params)
    return count_flops(run)


_UNET: "weakref.WeakKeyDictionary[torch.nn.Module, float]" = weakref.WeakKeyDictionary()
_DIP: dict = {}


def unet_forward_gflop(model: torch.nn.Module, image=IMAGE) -> float:
    """GFLOP of one eps-model forward on one image (counted once per model object)."""
    if model not in _UNET:
        p = next(model.parameters(), None)  # a parameter-free model (an analytic one): CPU fp32
        dtype, device = (torch.float32, "cpu") if p is None else (p.dtype, p.device)
        x = torch.zeros((1, *image), dtype=dtype, device=device)
        t = torch.zeros(1, dtype=torch.long, device=device)
        _UNET[model] = forward_flops(model, x, t) / 1e9
    return _UNET[model]


def dip_iteration_gflop(spec: SkipSpec, image=IMAGE) -> float:
    """GFLOP of one DIP iteration (forward + backward) on one image (counted once per spec)."""
    key = (spec, tuple(image))
    if key not in _DIP:
        net = SkipNet(spec)
        z = torch.zeros((1, spec.in_channels, *image[1:]))
        target = torch.zeros((1, spec.out_channels, *image[1:]))
        _DIP[key] = train_step_flops(net, z, target) / 1e9
    return _DIP[key]
