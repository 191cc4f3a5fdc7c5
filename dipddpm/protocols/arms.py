"""The building blocks every protocol arm shares: unit conversions, start states, estimates,
the estimate's error, and one reverse-chain call that counts its network evaluations.

Scales. The DIP, PSNR and SSIM work on u in [0, 1]; the diffusion on x = 2u - 1 in [-1, 1]. A
noise std s on [0, 1] is 2s on [-1, 1]: denoising at sigma = 25 (0-255 scale) is std 50/255 =
0.196 on the diffusion's scale, so its direct start is t* = 57 for linear betas 1e-4..0.02,
T = 1000 (sigma 50 -> 115).

Starts by noise level. Step t's noise level is s_t = sqrt((1 - abar_t) / abar_t) ([-1, 1] units,
`dipddpm.diffusion.noise_levels`). A start asks for a level sigma_t0 and gets the step whose s_t
is nearest (`start_at`, the same rule as the direct start's t*), so the same request is the same
noise level at any T and schedule; both the requested and the realised level are recorded.

The estimate's error e (RMS of u_hat - x0 in [-1, 1] units), for CCDF's rule sigma_t0 = c x e:
  `residual_error`: without the clean image, for denoising: e^2 = 4 max(mean (u_hat - y)^2 -
      (sigma/255)^2, floor) over all images and pixels (the residual against y minus the known
      noise variance). Biased LOW for a DIP: it was fitted to y, so its error correlates with
      the noise and the residual is smaller than error^2 + noise^2 (the more it fitted the noise,
      the lower). With the clipped observation the noise variance is below sigma^2 and e is
      biased low again. The floor is one grey level, (1/255)^2.
  `oracle_error`: with the clean image (a bound, flagged oracle): the true RMS error, over the
      pixels that the chain does not keep (inpainting: the hole).

Samplers. "ddpm" is DDIM with eta = 1 over K evenly spaced steps: with K >= t0 it is ancestral
DDPM exactly (same draws, see dipddpm/diffusion), with K < t0 it is the respaced ancestral chain
(posterior variances of the coarser schedule). "ddim" is eta = 0. NFE = min(K, t0) either way.
K = 1 is one step to x_0: the posterior mean (Tweedie) x0 = (x_t - sqrt(1 - abar) eps_hat) /
sqrt(abar), the same for both samplers.

Inpainting consistency (RePaint's simple form, without its resampling loops): after every
reverse step to index s, the observed pixels are replaced by the observation diffused to s,
sqrt(abar[s]) y + sqrt(1 - abar[s]) eps with fresh eps; the final x_0 keeps y where observed.
Without it (`consistency=False`) the chain is the plain SDEdit/CCDF start, unconditioned.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from dipddpm.diffusion import Diffusion, ddim_sample, sigma_at, t_for_sigma
from dipddpm.runs import atomic_path

ETA = {"ddpm": 1.0, "ddim": 0.0}


def to_diffusion(u: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]."""
    return u * 2.0 - 1.0


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clipped: the image a sample is."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def sigma_on_diffusion_scale(sigma255: float) -> float:
    """Std of N(0, (sigma/255)^2) noise on [0, 1], seen on [-1, 1]."""
    return 2.0 * sigma255 / 255.0


def start_at(diffusion: Diffusion, sigma: float) -> tuple[int, float]:
    """(t0, realised sigma_t0) for a start at noise level sigma ([-1, 1] units): the 1-indexed
    step whose s_t is nearest to sigma (`dipddpm.diffusion.t_for_sigma`)."""
    t0 = t_for_sigma(diffusion, sigma) + 1
    return t0, sigma_at(diffusion, t0)


def direct_t0(diffusion: Diffusion, sigma255: float) -> int:
    """1-indexed t* whose noise level s_t matches the observation's noise std (see start_at)."""
    return start_at(diffusion, sigma_on_diffusion_scale(sigma255))[0]


def direct_start(y: torch.Tensor, diffusion: Diffusion,
                 sigma255: float) -> tuple[torch.Tensor, int]:
    """(x at index t*-1, t*) from a noisy observation y in [0, 1], no prior: y = x0 + s n on
    [-1, 1] scaled by sqrt(abar) is sqrt(abar) x0 + sqrt(abar) s n, and sqrt(abar) s ~
    sqrt(1 - abar) at t*. Exact for the "gaussian" observation model; with the "clipped" one
    the noise near black and white is not Gaussian (half-rectified on the black background)."""
    t0 = direct_t0(diffusion, sigma255)
    scale = float(diffusion.sqrt_abar[t0 - 1])
    return to_diffusion(y) * scale, t0


ERROR_FLOOR = 1.0 / 255  # [0, 1] units: one grey level


def residual_error(u_hat: torch.Tensor, y: torch.Tensor, sigma255: float) -> float:
    """e ([-1, 1] units) of a denoising estimate from y alone (module docstring: biased low)."""
    mse = float(((u_hat.double() - y.double()) ** 2).mean())
    return 2.0 * math.sqrt(max(mse - (sigma255 / 255.0) ** 2, ERROR_FLOOR ** 2))


def oracle_error(u_hat: torch.Tensor, clean: torch.Tensor,
                 region: Optional[torch.Tensor] = None) -> float:
    """The true e ([-1, 1] units) over `region` (1 = counted; None: every pixel). Needs the
    clean image: what it gives is a bound."""
    err = (u_hat.double() - clean.double()) ** 2
    if region is not None:
        w = region.double().expand_as(err)
        mse = float((err * w).sum() / w.sum().clamp_min(1))
    else:
        mse = float(err.mean())
    return 2.0 * math.sqrt(max(mse, ERROR_FLOOR ** 2))


def gaussian_blur(u: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflection padding, radius ceil(3 sigma); [B,C,H,W]."""
    r = max(1, math.ceil(3.0 * sigma))
    k = torch.arange(-r, r + 1, dtype=u.dtype, device=u.device)
    k = torch.exp(-k ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    c = u.shape[1]
    x = F.pad(u, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def cheap_estimate(y: torch.Tensor, mask: torch.Tensor, blur_sigma: float,
                   fill_sigma: float = 1.0, fill_iters: int = 200) -> torch.Tensor:
    """The no-learning estimate that isolates what DIP adds. Denoising (mask all ones): a
    Gaussian blur of y. Inpainting: the hole filled by repeated blurring (fill_sigma, fixed so
    that 200 rounds reach the middle of a 10-pixel box) with the observed pixels held fixed (a
    discrete heat-equation fill, started from the mean observed value)."""
    if bool((mask > 0.5).all()):
        return gaussian_blur(y, blur_sigma).clamp(0, 1)
    known = mask > 0.5
    mean = (y * mask).sum((1, 2, 3), keepdim=True) / mask.sum((1, 2, 3), keepdim=True).clamp_min(1)
    cur = torch.where(known, y, mean.expand_as(y))
    for _ in range(fill_iters):
        cur = torch.where(known, y, gaussian_blur(cur, fill_sigma))
    return cur.clamp(0, 1)


class CountingModel(torch.nn.Module):
    """Wraps an eps-model and counts its calls per image, so NFE is measured, not assumed."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        return self.model(x, t)


def keep_observed(y: torch.Tensor, mask: torch.Tensor, diffusion: Diffusion):
    """ddim_sample's after_step for inpainting: the observed pixels (mask 1) of y ([-1, 1])
    replaced by y diffused to the step's noise level, with fresh noise."""
    def after_step(x, prev, gen):
        eps = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        return mask * diffusion.q_sample(y, prev, eps) + (1 - mask) * x
    return after_step


@dataclass
class ChainResult:
    u: torch.Tensor  # [B, C, H, W] in [0, 1]
    nfe: int  # network evaluations per image
    seconds: float  # wall time of the whole batch's chain


def run_chain(model, diffusion: Diffusion, *, sampler: str, steps: int, t0: int,
              u_hat: Optional[torch.Tensor] = None, x_start: Optional[torch.Tensor] = None,
              y: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
              seed: int = 0, progress=False) -> ChainResult:
    """One reverse chain for a batch: from the estimate u_hat in [0, 1] diffused to t0
    (x_t0 = sqrt(abar) (2 u_hat - 1) + sqrt(1 - abar) eps) or from a given state x_start at
    index t0-1. With y and a mask that is not all ones (inpainting), the observed pixels are
    kept consistent (see the module docstring). NFE is counted from the model's calls.
    `progress`: as for the samplers (a bar that counts the reverse steps, or True)."""
    if sampler not in ETA:
        raise ValueError(f"unknown sampler {sampler!r}; choose ddpm or ddim")
    counter = CountingModel(model)
    device = (u_hat if u_hat is not None else x_start).device
    gen = torch.Generator(device=device).manual_seed(int(seed))
    x0_hat = None if u_hat is None else to_diffusion(u_hat)
    start = time.perf_counter()
    masked = mask is not None and y is not None and not bool((mask > 0.5).all())
    after = keep_observed(to_diffusion(y), mask, diffusion) if masked else None
    x, _ = ddim_sample(counter, diffusion, None, steps=steps, eta=ETA[sampler], x0_hat=x0_hat,
                       t0=t0, x_start=x_start, generator=gen, after_step=after, progress=progress)
    if masked:
        x = mask * to_diffusion(y) + (1 - mask) * x  # the final image keeps y where observed
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return ChainResult(to_unit(x), counter.calls, time.perf_counter() - start)


def kept_batch(path: Optional[Path], make: Callable[[], dict]) -> tuple[dict, bool]:
    """One batch of a chain, kept on disk: with `path` an existing file, its dict read back
    (True); else `make()`, saved to `path` (atomically) when one is given (False). The folder
    belongs to one chain of one run dir, whose config the run dir guards, so what is read back
    is what `make` would give again (same seeds); an interrupted chain resumes batch by batch."""
    if path is not None and path.is_file():
        return torch.load(path, weights_only=True), True
    batch = make()
    if path is not None:
        with atomic_path(path, suffix=".pt") as tmp:
            torch.save(batch, tmp)
    return batch, False
