"""PSNR and SSIM per image, batched, on images in [0, 1] (data range 1).

Shapes: [B, H, W] or [B, C, H, W]; both functions return one value per image, shape [B].

PSNR = 10 log10(1 / MSE). Identical images have MSE 0 and PSNR +inf; pass `max_db` to cap it
(useful before averaging over images, where one inf would swamp the mean). A mask restricts the
MSE to the observed pixels (inpainting).

SSIM follows Wang et al. 2004 with the usual constants: an 11x11 Gaussian window of sigma 1.5,
K1 = 0.01, K2 = 0.03, population (not sample) variances, the map taken over 'valid' window
positions only and averaged (per channel, then over channels). This equals scikit-image's
`structural_similarity(x, y, data_range=1, gaussian_weights=True, sigma=1.5,
use_sample_covariance=False)`: skimage filters with a truncated (radius 5) Gaussian and then
crops 5 pixels from every border, which leaves exactly the valid positions.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _as_bchw(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() == 3:
        return x.unsqueeze(1)
    if x.dim() != 4:
        raise ValueError(f"{name}: expected [B,H,W] or [B,C,H,W], got shape {tuple(x.shape)}")
    return x


def _pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    # float64: the SSIM variances are differences of nearly equal means on tiny images
    return _as_bchw(x, "x").double(), _as_bchw(y, "y").double()


def psnr(x: torch.Tensor, y: torch.Tensor, max_db: float | None = None,
         mask: torch.Tensor | None = None) -> torch.Tensor:
    """PSNR in dB of each image of x against y, both in [0, 1]; +inf (or max_db) when equal.

    Computed in float64; returned as float64 for float64 x, else float32.

    With a mask (x's shape, 1 = counted) the MSE is the mean over the counted pixels only.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)  # float64 inputs keep their precision
    x, y = _pair(x, y)
    err = (x - y).pow(2).flatten(1)
    if mask is None:
        mse = err.mean(1)
    else:
        m = _as_bchw(mask, "mask").to(err).flatten(1)
        mse = (err * m).sum(1) / m.sum(1).clamp_min(1)
    out = 10.0 * torch.log10(1.0 / mse)  # mse 0 -> +inf, by IEEE rules, no warning
    if max_db is not None:
        out = out.clamp(max=max_db)
    return out.to(dtype)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 2-D Gaussian window [size, size], float64."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim_map(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The SSIM map over valid window positions, [B, C, H-10, W-10], float64."""
    x, y = _pair(x, y)
    b, c, h, w = x.shape
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {h}x{w}")
    win = gaussian_window().to(x.device).expand(c, 1, SSIM_WINDOW, SSIM_WINDOW)

    def filt(t):
        return F.conv2d(t, win, groups=c)

    mx, my = filt(x), filt(y)
    vx = filt(x * x) - mx * mx
    vy = filt(y * y) - my * my
    cxy = filt(x * y) - mx * my
    c1, c2 = (SSIM_K1 * 1.0) ** 2, (SSIM_K2 * 1.0) ** 2  # data range 1
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of each image of x against y, both in [0, 1]: shape [B], float32."""
    return ssim_map(x, y).mean(dim=(1, 2, 3)).float()


def psnr_from_mse(mse: float) -> float:
    """Scalar helper for tables: 10 log10(1/mse), inf when mse is 0."""
    return math.inf if mse <= 0 else 10.0 * math.log10(1.0 / mse)
