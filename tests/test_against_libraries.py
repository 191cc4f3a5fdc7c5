"""Our hand-written schedules, sampler steps and SSIM against their well-kept twins: diffusers'
DDPMScheduler / DDIMScheduler (the `bench` extra) and scikit-image's structural_similarity (the
`test` extra), to float tolerance. Without either package these tests skip; under CI=true they
fail."""
import importlib.util

import numpy as np
import pytest
import torch

from dipddpm.diffusion import Diffusion, cosine_betas, ddim_sample, ddim_timesteps, \
    ddpm_sample, linear_betas
from dipddpm.evaluate import ssim
from tests.conftest import skip_or_fail

pytestmark = pytest.mark.usefixtures("one_thread")


def need(module: str, extra: str):
    if importlib.util.find_spec(module) is None:
        skip_or_fail(f'{module} is not installed: pip install -c constraints.txt -e ".[{extra}]"')
    return importlib.import_module(module)


def diffusers_scheduler(kind: str, T: int, schedule: str, **kw):
    """diffusers' scheduler with our schedule: linear betas with our 1000/T scaling of both
    ends (the end capped at 0.999) passed as its beta_start/beta_end; cosine is its
    `squaredcos_cap_v2`."""
    schedulers = need("diffusers", "bench")
    cls = {"ddpm": schedulers.DDPMScheduler, "ddim": schedulers.DDIMScheduler}[kind]
    if schedule == "linear":
        s = 1000.0 / T
        return cls(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4 * s,
                   beta_end=min(0.02 * s, 0.999), **kw)
    return cls(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", **kw)


def ours(T: int, schedule: str) -> Diffusion:
    return Diffusion(linear_betas(T) if schedule == "linear" else cosine_betas(T))


def pair(kind: str, T: int, schedule: str, **kw):
    """(ours, diffusers') for the step tests, both in float64 on the same table: diffusers keeps
    alphas_cumprod in float32 (checked against ours in test_alphas_cumprod_match_diffusers),
    whose rounding the 1/sqrt(abar) of the x0 prediction would amplify past any tight
    tolerance; with the same float64 table the two steps must agree to rounding."""
    d = ours(T, schedule)
    theirs = diffusers_scheduler(kind, T, schedule, **kw)
    torch.testing.assert_close(d.abar, theirs.alphas_cumprod.double(), rtol=2e-5, atol=1e-9)
    theirs.alphas_cumprod = d.abar.clone()
    return d, theirs


def randn(*shape, seed: int):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def model(x, t):
    """A fixed, non-trivial eps 'network' of (x, t), identical for both samplers: its x0
    predictions leave [-1, 1] at large t, so the clipping paths are exercised too."""
    return torch.sin(3 * x + t.to(x.dtype).view(-1, 1, 1, 1) / 7) + 0.3 * x


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("T", [1000, 200])
def test_alphas_cumprod_match_diffusers(schedule, T):
    theirs = diffusers_scheduler("ddpm", T, schedule)
    d = ours(T, schedule)
    # diffusers builds its tables in float32, ours in float64
    torch.testing.assert_close(d.betas, theirs.betas.double(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(d.abar, theirs.alphas_cumprod.double(), rtol=2e-5, atol=1e-9)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("t", [0, 1, 17, 49])
def test_one_ddpm_posterior_step_matches_diffusers(schedule, t):
    """Our ancestral step as ddpm_sample takes it (x0 from eps, clipped to [-1, 1], the
    posterior mean, beta-tilde variance, no noise at t = 0) against DDPMScheduler.step
    (fixed_small variance) on the same model output and noise."""
    d, theirs = pair("ddpm", 50, schedule, clip_sample=True, variance_type="fixed_small")
    x_t = randn(4, 1, 28, 28, seed=1)
    tt = torch.full((4,), t, dtype=torch.long)
    ref = theirs.step(model(x_t, tt), t, x_t, generator=torch.Generator().manual_seed(2))
    x0, _ = d.predict_x0_eps(x_t, tt, model(x_t, tt))
    mean, var = d.posterior_mean_variance(x0.clamp(-1, 1), x_t, tt)
    got = mean + var.sqrt() * randn(*x_t.shape, seed=2)
    torch.testing.assert_close(got, ref.prev_sample, rtol=1e-12, atol=1e-12)
    assert (var == 0).all() == (t == 0)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_a_short_ddpm_trajectory_matches_diffusers(schedule):
    """Every step of ddpm_sample from a given x_T against DDPMScheduler, the step noise drawn
    from one generator in the same order by both."""
    T = 12
    d, theirs = pair("ddpm", T, schedule, clip_sample=True)
    x = randn(3, 1, 28, 28, seed=0)
    got, nfe = ddpm_sample(model, d, x_start=x, t0=T, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    for t in reversed(range(T)):
        x = theirs.step(model(x, torch.full((3,), t)), t, x, generator=gen).prev_sample
    assert nfe == T
    torch.testing.assert_close(got, x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("clip", [True, False])
def test_an_eta0_ddim_trajectory_matches_diffusers(schedule, clip):
    """ddim_sample (eta = 0, 8 steps of T = 50) against DDIMScheduler on the same model output.

    The grid: ours runs from t0-1 down to 0 with both ends included, which is diffusers'
    'linspace' spacing (checked below). diffusers' step then takes the previous index as
    t - T // num_inference_steps, exact only on its 'leading' grid, so each of its steps is
    given the gap of our grid (constant here: 49 / 7 = 7 = 50 // 7). The last step lands on the
    predicted x0 (set_alpha_to_one). With clipping, ours re-derives eps from the clipped x0
    (diffusers' use_clipped_model_output=True)."""
    T, steps = 50, 8
    d, theirs = pair("ddim", T, schedule, clip_sample=clip, set_alpha_to_one=True,
                     timestep_spacing="linspace")
    theirs.set_timesteps(steps)
    grid = ddim_timesteps(T, steps)
    assert grid == theirs.timesteps.tolist()
    gaps = {a - b for a, b in zip(grid, grid[1:])}
    assert gaps == {7}
    x = randn(3, 1, 28, 28, seed=0)
    got, nfe = ddim_sample(model, d, x_start=x, t0=T, steps=steps, eta=0.0, clip_x0=clip,
                           dtype=torch.float64)
    theirs.num_inference_steps = T // 7  # the step's gap, see above
    for t in grid:
        x = theirs.step(model(x, torch.full((3,), t)), t, x, eta=0.0,
                        use_clipped_model_output=clip).prev_sample
    assert nfe == steps
    torch.testing.assert_close(got, x, rtol=1e-10, atol=1e-10)
    assert got.abs().max() > 0.5  # a real image-sized signal, not two zeros compared


# ----------------------------------------------------------------------------- SSIM

def test_ssim_matches_scikit_image():
    """Our SSIM equals skimage's structural_similarity with the settings our docstring names
    (data_range=1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False), per image
    and on multi-channel images (skimage: mean over channels)."""
    need("skimage", "test")
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:28, 0:28] / 27.0
    clean = 0.5 + 0.4 * np.sin(6 * xx) * np.cos(4 * yy)
    others = [np.clip(clean + rng.normal(0, 0.1, clean.shape), 0, 1), 0.5 * clean,
              rng.random((28, 28)), np.clip(clean + 0.2, 0, 1)]
    x = torch.tensor(np.stack([clean] * len(others)))
    y = torch.tensor(np.stack(others))
    got = ssim(x, y).double().numpy()
    want = [structural_similarity(clean, o, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False) for o in others]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert len(set(np.round(want, 3))) == len(want)  # four different values, not one

    a, b = rng.random((3, 32, 30)), rng.random((3, 32, 30))  # C, H, W
    rgb = ssim(torch.tensor(a)[None], torch.tensor(b)[None]).item()
    assert rgb == pytest.approx(structural_similarity(
        a, b, channel_axis=0, data_range=1.0, gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False), abs=1e-6)
