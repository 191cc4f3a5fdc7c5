"""The study's own variant: a DIP output in place of the Gaussian noise of the DDPM objective.

The study's code is not public; this is our reading of its description, kept to regenerate its
tables and to show its failure in numbers, not as a way to train a DDPM. For every training batch
x0 ([B, 1, 28, 28] in [-1, 1]):
  - one DIP skip net (the study's, `SkipNet(SkipSpec.from_config(cfg.dip))`) is initialised from
    the step's seed, with a fixed input z ~ U[0, dip.input_scale) of shape [B, 3, 28, 28] drawn
    from the same seed;
  - it is fitted for `train.dip_iters` Adam steps (lr dip.lr, the study chose 3 iterations) with
    MSE to the batch mapped to [0, 1];
  - its output after those steps, mapped back to [-1, 1] and detached, is the "noise": it goes
    into both x_t = sqrt(abar) x0 + sqrt(1 - abar) * noise and the eps target.
One net serves the whole batch: the study's wall-clock numbers (DIP+DDPM 36 min vs DDPM 34 min
at T=1000) leave no room for a net per image. Its BatchNorm therefore normalises over the batch.

Why it fails: the "noise" is a blurry copy of x0 in [-1, 1],
not N(0, I), so x_t no longer follows q(x_t | x0), the network is asked to predict a function of
x0 instead of eps, and sampling from pure Gaussian noise starts off the training distribution.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dipddpm.models.dip import SkipNet, SkipSpec


class DipNoise:
    """Callable: (x0 in [-1, 1], seed) -> the study's DIP "noise" for that batch, in [-1, 1]."""

    def __init__(self, dip_cfg, iters: int):
        self.spec = SkipSpec.from_config(dip_cfg)
        self.lr = dip_cfg.lr
        self.input_scale = dip_cfg.input_scale
        self.iters = iters

    def __call__(self, x0: torch.Tensor, seed: int) -> torch.Tensor:
        device = x0.device
        # Initialise on the CPU generator forked from the global one, so the variant leaves the
        # loop's own RNG stream (dropout) where it was and the init does not depend on the device.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = SkipNet(self.spec)
        net.to(device)
        gen = torch.Generator(device=device).manual_seed(seed)
        z = torch.rand((x0.shape[0], self.spec.in_channels, *x0.shape[2:]), device=device,
                       generator=gen) * self.input_scale
        target = (x0.detach().float() + 1) / 2
        opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        # The caller may be under no_grad (or inference) elsewhere; this fit has its own graph.
        with torch.enable_grad():
            for _ in range(self.iters):
                opt.zero_grad(set_to_none=True)
                loss = F.mse_loss(net(z), target)
                loss.backward()
                opt.step()
        with torch.no_grad():
            out = net(z)
        return (2 * out - 1).detach().to(x0.dtype)
