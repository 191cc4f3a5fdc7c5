"""Ancestral DDPM and DDIM samplers that start from pure noise or from an estimate at t0.

Both return (samples, nfe). Conventions (also in dipddpm/diffusion/__init__.py):
- t is 0-indexed, t in [0, T-1]; index t is the paper's step t+1.
- t0 counts in the paper's 1-indexed steps, t0 in [1, T]: the chain starts at index t0-1 from
      x = sqrt(abar[t0-1]) x0_hat + sqrt(1 - abar[t0-1]) eps,
  i.e. the paper's x_{t0} = sqrt(abar_{t0}) x0_hat + sqrt(1 - abar_{t0}) eps. The ancestral
  DDPM then takes exactly t0 steps (nfe = t0); t0 = 1 is a single denoising step from x_1.
- t0 = T (or t0 None, or x0_hat None) is ordinary sampling: the start is N(0, I), as in DDPM,
  and x0_hat is not used (its weight sqrt(abar[T-1]) is < 1% for the default schedules).
- `x_start` gives the state at index t0-1 directly (no noise is added), e.g. a noisy
  observation already scaled to match q(x_t | x_0): y = x0 + sigma n times sqrt(abar_t) at the
  step t whose noise level sqrt((1 - abar_t) / abar_t) is sigma (the restoration protocol's
  direct start, docs/protocols.md).
- Randomness comes only from `generator` (a torch.Generator on the samples' device, or an int
  seed): the first draw is the start noise (shape of the batch), then one draw per step that
  adds noise. DDPM and DDIM with eta = 1 over all steps draw identically, so with the same seed
  they return the same samples up to rounding (tested).
- `progress=True` shows a bar over the reverse steps (dipddpm.progress); off by default, for
  calls that run inside another bar. A bar (anything with `update(n)`) passed as `progress`
  counts this chain's steps instead, e.g. one bar over every batch of a sampling job.
"""
from __future__ import annotations

from typing import Optional

import torch

from dipddpm.diffusion.schedule import Diffusion, gather
from dipddpm.progress import bar


def _generator(generator, device) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    g = torch.Generator(device=device)
    if generator is not None:
        g.manual_seed(int(generator))
    else:
        g.seed()
    return g


def _randn(shape, gen: torch.Generator, dtype) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=gen.device, dtype=dtype)


def start_state(diffusion: Diffusion, shape, *, x0_hat=None, t0: Optional[int] = None,
                x_start=None, generator=None, dtype=torch.float32, device=None):
    """(x at index t0-1, t0) for the conventions above; draws the start noise from generator."""
    T = diffusion.T
    t0 = T if t0 is None else int(t0)
    if not 1 <= t0 <= T:
        raise ValueError(f"t0 must be in [1, {T}], got {t0}")
    if x_start is not None:
        if x0_hat is not None:
            raise ValueError("give x0_hat or x_start, not both")
        return x_start, t0
    ref = x0_hat
    if shape is None:
        if ref is None:
            raise ValueError("need shape when neither x0_hat nor x_start is given")
        shape = ref.shape
    if ref is not None:
        dtype = ref.dtype
    gen = _generator(generator, device if device is not None else
                     (ref.device if ref is not None else "cpu"))
    eps = _randn(shape, gen, dtype)
    if ref is None:
        if t0 != T:
            raise ValueError(f"t0={t0} < T={T} needs an estimate x0_hat (or x_start) to start from")
        return eps, T
    if t0 == T:
        return eps, T
    t = torch.full((shape[0],), t0 - 1, dtype=torch.long, device=eps.device)
    return diffusion.q_sample(ref.to(eps.device), t, eps), t0


class _StepsBar:
    """The reverse-step bar of one chain: its own (progress=True), the caller's, or none."""

    def __init__(self, progress, total: int, desc: str):
        self.own = progress is True
        self.bar = bar(total, desc, unit="step", leave=False) if self.own else \
            progress if hasattr(progress, "update") else None

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.own:
            self.bar.close()


def _model_x0_eps(model, diffusion, x, t, clip_x0):
    out = model(x, t).to(x.dtype)
    x0, eps = diffusion.predict_x0_eps(x, t, out)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        eps = diffusion.eps_from_x0(x, t, x0)  # keep the pair consistent with x_t
    return x0, eps


@torch.no_grad()
def ddpm_sample(model, diffusion: Diffusion, shape=None, *, x0_hat=None, t0=None, x_start=None,
                generator=None, clip_x0: bool = True, device=None, dtype=torch.float32,
                progress=False):
    """Ancestral sampling with the posterior variance, from index t0-1 down to 0. -> (x, nfe)."""
    gen = _generator(generator, device if device is not None else
                     (x0_hat.device if x0_hat is not None else
                      x_start.device if x_start is not None else "cpu"))
    x, t0 = start_state(diffusion, shape, x0_hat=x0_hat, t0=t0, x_start=x_start,
                        generator=gen, dtype=dtype)
    nfe = 0
    with _StepsBar(progress, t0, "ddpm") as steps_bar:
        for i in reversed(range(t0)):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            x0, _ = _model_x0_eps(model, diffusion, x, t, clip_x0)
            nfe += 1
            mean, var = diffusion.posterior_mean_variance(x0, x, t)
            x = mean + var.sqrt() * _randn(x.shape, gen, x.dtype) if i > 0 else mean
            steps_bar.update()
    return x, nfe


def ddim_timesteps(t0: int, steps: int) -> list[int]:
    """`steps` indices evenly spaced from t0-1 down to 0, both ends included (fewer if t0 is
    small). Starting exactly at t0-1 matters: that is where the start state lives."""
    steps = max(1, min(steps, t0))
    if steps == 1:
        return [t0 - 1]
    ts = torch.linspace(t0 - 1, 0, steps, dtype=torch.float64).round().long().tolist()
    return sorted(set(ts), reverse=True)


@torch.no_grad()
def ddim_sample(model, diffusion: Diffusion, shape=None, *, steps: int = 50, eta: float = 0.0,
                x0_hat=None, t0=None, x_start=None, generator=None, clip_x0: bool = True,
                device=None, dtype=torch.float32, after_step=None, progress=False):
    """DDIM (Song et al., 2021) over `steps` indices from t0-1 to 0; eta=0 is deterministic after
    the start, eta=1 over all steps is ancestral DDPM. -> (x, nfe).

    `after_step(x, prev, gen) -> x`, when given, sees the state after every step but the last
    (at index `prev`, an int64 tensor [B]) and may change it: e.g. re-impose observed pixels
    for inpainting. Its random draws come from `gen`, after the step's own."""
    gen = _generator(generator, device if device is not None else
                     (x0_hat.device if x0_hat is not None else
                      x_start.device if x_start is not None else "cpu"))
    x, t0 = start_state(diffusion, shape, x0_hat=x0_hat, t0=t0, x_start=x_start,
                        generator=gen, dtype=dtype)
    ts = ddim_timesteps(t0, steps)
    with _StepsBar(progress, len(ts), "ddim") as steps_bar:
        return _ddim_loop(model, diffusion, x, ts, eta, gen, clip_x0, after_step, steps_bar)


def _ddim_loop(model, diffusion, x, ts, eta, gen, clip_x0, after_step, steps_bar):
    nfe = 0
    for k, i in enumerate(ts):
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        x0, eps = _model_x0_eps(model, diffusion, x, t, clip_x0)
        nfe += 1
        steps_bar.update()
        if k == len(ts) - 1:  # the last step lands on x_0 itself (abar_prev = 1)
            x = x0
            break
        prev = torch.full_like(t, ts[k + 1])
        ab, ab_prev = gather(diffusion.abar, t, x), gather(diffusion.abar, prev, x)
        sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
        x = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        if eta > 0:
            x = x + sigma * _randn(x.shape, gen, x.dtype)
        if after_step is not None:
            x = after_step(x, prev, gen)
    return x, nfe


def sample(model, diffusion: Diffusion, shape=None, *, sampler: str = "ddim", steps: int = 50,
           eta: float = 0.0, **kw):
    """Dispatch on the sampler's name ('ddpm' or 'ddim'); `steps`/`eta` only matter for DDIM."""
    if sampler == "ddpm":
        return ddpm_sample(model, diffusion, shape, **kw)
    if sampler == "ddim":
        return ddim_sample(model, diffusion, shape, steps=steps, eta=eta, **kw)
    raise ValueError(f"unknown sampler {sampler!r}; choose ddpm or ddim")
