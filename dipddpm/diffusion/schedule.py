"""Noise schedules, the forward process q(x_t | x_0), the posterior, and the training loss.

Timesteps are 0-indexed: t in [0, T-1], and index t is the paper's step t+1, so
    abar[t] = prod_{s <= t} (1 - beta[s]),   q(x_t | x_0) = N(sqrt(abar[t]) x_0, (1 - abar[t]) I).
x at index T-1 is (nearly) pure noise; the model is called as model(x_t, t) with int64 t.
See dipddpm/diffusion/__init__.py for the whole API.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02,
                 scale: bool = True) -> torch.Tensor:
    """DDPM's linear betas. `scale` multiplies both ends by 1000/T (improved DDPM), so every T
    ends at the same noise level as T=1000 (abar[T-1] ~ 4e-5); without it, T=200 ends at
    abar ~ 0.13: the last "noise" still holds a third of the image's amplitude."""
    s = 1000.0 / T if scale else 1.0
    return torch.linspace(beta_start * s, min(beta_end * s, 0.999), T, dtype=torch.float64)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021): abar(t) = cos^2((t/T + s)/(1 + s) * pi/2), betas clipped."""
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def gather(a: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """a[t] shaped [B,1,1,1] in x's dtype and device."""
    return a.to(device=x.device)[t.to(x.device)].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


class Diffusion:
    """A DDPM schedule plus the maps between x_0, eps, v and x_t that training and samplers use.

    Tables are float64 on the CPU; `gather` moves the rows it needs to x's device and dtype, so
    one object serves CPU and GPU, fp32 and fp64 callers.
    """

    def __init__(self, betas: torch.Tensor, prediction: str = "eps", loss: str = "mse"):
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        if loss not in ("mse", "huber"):
            raise ValueError(f"loss must be 'mse' or 'huber', got {loss!r}")
        self.prediction, self.loss_type = prediction, loss
        self.betas = betas.to(torch.float64)
        self.T = len(betas)
        self.alphas = 1.0 - self.betas
        self.abar = torch.cumprod(self.alphas, 0)
        self.abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.abar[:-1]])
        self.sqrt_abar = self.abar.sqrt()
        self.sqrt_one_minus_abar = (1 - self.abar).sqrt()
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, var); var[0] = 0 (x_0 is given).
        self.posterior_var = self.betas * (1 - self.abar_prev) / (1 - self.abar)
        self.posterior_coef1 = self.betas * self.abar_prev.sqrt() / (1 - self.abar)
        self.posterior_coef2 = (1 - self.abar_prev) * self.alphas.sqrt() / (1 - self.abar)

    @classmethod
    def from_config(cls, d) -> "Diffusion":
        """Build from a DiffusionConfig (dipddpm.config)."""
        if d.schedule == "linear":
            betas = linear_betas(d.T, d.beta_start, d.beta_end, scale=d.scale_betas)
        else:
            betas = cosine_betas(d.T)
        return cls(betas, prediction=d.prediction, loss=d.loss)

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar[t]) x0 + sqrt(1 - abar[t]) noise."""
        return gather(self.sqrt_abar, t, x0) * x0 + gather(self.sqrt_one_minus_abar, t, x0) * noise

    def posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean and variance of q(x_{t-1} | x_t, x_0); at t = 0 the variance is 0."""
        mean = gather(self.posterior_coef1, t, x_t) * x0 + gather(self.posterior_coef2, t, x_t) * x_t
        return mean, gather(self.posterior_var, t, x_t)

    # ------------------------------------------------------------------ parameterisations
    def v_target(self, x0, t, noise):
        """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho, 2022)."""
        return gather(self.sqrt_abar, t, x0) * noise - gather(self.sqrt_one_minus_abar, t, x0) * x0

    def target(self, x0, t, noise):
        return noise if self.prediction == "eps" else self.v_target(x0, t, noise)

    def predict_x0_eps(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor):
        """(x0, eps) implied by the network output `out` at (x_t, t)."""
        a, s = gather(self.sqrt_abar, t, x_t), gather(self.sqrt_one_minus_abar, t, x_t)
        if self.prediction == "eps":
            return (x_t - s * out) / a, out
        return a * x_t - s * out, s * x_t + a * out

    def eps_from_x0(self, x_t, t, x0):
        a, s = gather(self.sqrt_abar, t, x_t), gather(self.sqrt_one_minus_abar, t, x_t)
        return (x_t - a * x0) / s

    # ------------------------------------------------------------------ training
    def loss(self, model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Mean loss of model(q_sample(x0, t, noise), t) against the eps or v target."""
        out = model(self.q_sample(x0, t, noise), t)
        target = self.target(x0, t, noise)
        out = out.float()  # the loss in fp32 under autocast
        if self.loss_type == "mse":
            return F.mse_loss(out, target.float())
        return F.smooth_l1_loss(out, target.float())  # Huber, delta 1 (Annotated Diffusion)


def noise_levels(diffusion: Diffusion) -> torch.Tensor:
    """s_t = sqrt((1 - abar[t]) / abar[t]) for every 0-indexed t (float64 [T]): the noise-to-
    signal ratio of step t, in the images' [-1, 1] units, since x_t / sqrt(abar[t]) = x0 + s_t eps.
    It rises monotonically with t for every schedule here."""
    return ((1 - diffusion.abar) / diffusion.abar).sqrt()


def t_for_sigma(diffusion: Diffusion, sigma: float) -> int:
    """The 0-indexed t whose noise level s_t (see `noise_levels`) is nearest to sigma ([-1, 1]
    units); ties go to the smaller t. y = x0 + sigma * n scaled by sqrt(abar[t]) is then (nearly)
    a sample of q(x_t | x0). The one rule every start by noise level uses: the same sigma gives
    the same noise level at any T and schedule, up to half a step of the schedule's grid."""
    return int(torch.argmin((noise_levels(diffusion) - float(sigma)).abs()))


def sigma_at(diffusion: Diffusion, t0: int) -> float:
    """The noise level s of the paper's 1-indexed step t0 (index t0 - 1)."""
    return float(noise_levels(diffusion)[int(t0) - 1])
