"""The DIP baseline of bench.run: one net, fp32, Adam, a plain loop, as the DIP paper runs it.

Written after the denoising notebook of the Deep Image Prior repository (Ulyanov et al.,
denoising.ipynb: `closure()` inside `optimize()`), not with dipddpm's fitting machinery, so the
baseline cannot move when ours changes. Per iteration: input noise plus fresh N(0, reg_noise_std)
jitter, forward, MSE to the noisy image, backward; the output EMA; three PSNRs on numpy copies
of the output (to the noisy image, the clean one, and the EMA to the clean one); backtracking
(restore the parameters saved at the last iteration when the PSNR to the noisy image dropped by
more than 5 dB, otherwise save them, the notebook's `last_net`, on the CPU); Adam's step (taken
after a restore too, as the notebook's `optimize()` does). The
network is the study's skip net (the notebook builds the same one with `skip()`).
"""
from __future__ import annotations

import numpy as np
import torch

from dipddpm.models.dip import SkipNet, SkipSpec

REG_NOISE_STD = 1.0 / 30
LR = 0.01
EXP_WEIGHT = 0.99
SHOW_EVERY = 100  # the notebook's `show_every`: iterations i % 100 == 0 skip the backtracking check


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a - b) ** 2)))


def fit_reference(img_noisy: np.ndarray, img_clean: np.ndarray, iters: int, seed: int = 0,
                  device="cpu") -> dict:
    """Fit one net to one image [1, H, W] in [0, 1]; returns the notebook's last PSNRs."""
    torch.manual_seed(seed)
    net = SkipNet(SkipSpec()).to(device)
    h, w = img_noisy.shape[-2:]
    net_input = (torch.rand(1, 3, h, w) * 0.1).to(device)  # get_noise(..., 'noise').uniform_() / 10
    net_input_saved = net_input.detach().clone()
    noise = net_input.detach().clone()
    img_noisy_torch = torch.from_numpy(img_noisy[None]).to(device)
    mse = torch.nn.MSELoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=LR)
    out_avg, last_net, psrn_noisy_last = None, None, 0.0
    psrn_noisy = psrn_gt = psrn_gt_sm = float("nan")
    for i in range(iters):
        optimizer.zero_grad()
        net_input = net_input_saved + noise.normal_() * REG_NOISE_STD
        out = net(net_input)
        out_avg = out.detach() if out_avg is None else \
            out_avg * EXP_WEIGHT + out.detach() * (1 - EXP_WEIGHT)
        total_loss = mse(out, img_noisy_torch)
        total_loss.backward()
        out_np = out.detach().cpu().numpy()[0]
        psrn_noisy = _psnr(img_noisy, out_np)
        psrn_gt = _psnr(img_clean, out_np)
        psrn_gt_sm = _psnr(img_clean, out_avg.detach().cpu().numpy()[0])
        if i % SHOW_EVERY:
            if psrn_noisy - psrn_noisy_last < -5:  # backtrack (the notebook still steps after)
                for new_param, net_param in zip(last_net, net.parameters()):
                    net_param.data.copy_(new_param.to(device))
            else:
                # .cpu() is a copy on a GPU; on a CPU the notebook's list would alias the live
                # parameters, so clone to keep the saved copy the notebook means
                last_net = [x.detach().cpu().clone() for x in net.parameters()]
                psrn_noisy_last = psrn_noisy
        optimizer.step()
    return {"psnr_noisy": psrn_noisy, "psnr_gt": psrn_gt, "psnr_gt_sm": psrn_gt_sm}


def time_reference(n: int, iters: int, device="cpu") -> float:
    """image-iterations/s of the reference loop fitting n images one after another."""
    from bench.common import now, sync
    from bench.dip_throughput import _data

    noisy, clean = _data(n)
    fit_reference(noisy[0], clean[0], 3, 0, device)  # warm-up: oneDNN primitives, allocator
    sync(device)
    start = now()
    for i in range(n):
        fit_reference(noisy[i], clean[i], iters, i, device)
    sync(device)
    return n * iters / (now() - start)
