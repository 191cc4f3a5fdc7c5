import math

import pytest
import torch

from dipddpm.config import load_config
from dipddpm.diffusion import (Diffusion, cosine_betas, ddim_sample, ddim_timesteps, ddpm_sample,
                               linear_betas, sample, t_for_sigma)
from dipddpm.models.unet import UNet, UNetConfig


pytestmark = pytest.mark.usefixtures("one_thread")


def test_schedules():
    lin = Diffusion(linear_betas(1000))
    assert lin.abar[-1] == pytest.approx(4.04e-5, rel=0.01)
    # scaled linear betas end near pure noise for any T; the literal range does not at T=200
    assert Diffusion(linear_betas(200)).abar[-1] < 1e-4
    assert Diffusion(linear_betas(200, scale=False)).abar[-1] > 0.1
    cos = Diffusion(cosine_betas(1000))
    assert torch.all(cos.abar[1:] < cos.abar[:-1]) and cos.abar[-1] < 1e-8
    # noise std 25/255 on [0,1] is 50/255 on [-1,1] -> t* ~ 56 for T=1000 linear
    assert t_for_sigma(lin, 2 * 25 / 255) == 56


def test_from_config_reads_the_section():
    cfg = load_config(None, ["diffusion.T=300", "diffusion.schedule=cosine", "diffusion.prediction=v",
                             "diffusion.loss=huber"])
    d = Diffusion.from_config(cfg.diffusion)
    assert (d.T, d.prediction, d.loss_type) == (300, "v", "huber")
    assert torch.allclose(d.betas, cosine_betas(300))


def test_q_sample_moments():
    d = Diffusion(linear_betas(100))
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.full((n, 1, 1, 1), 0.7, dtype=torch.float64)
    for step in (0, 30, 99):
        t = torch.full((n,), step)
        x = d.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
        assert x.mean().item() == pytest.approx(0.7 * math.sqrt(d.abar[step]), abs=0.01)
        assert x.std().item() == pytest.approx(math.sqrt(1 - d.abar[step]), rel=0.01)


def test_posterior_matches_a_monte_carlo_regression():
    """Draw x_{t-1} ~ q(.|x0), then x_t ~ q(x_t|x_{t-1}); E[x_{t-1}|x_t] is linear in x_t and the
    residual variance is the posterior variance: both must match the closed forms."""
    d = Diffusion(linear_betas(50))
    g = torch.Generator().manual_seed(1)
    n, step, x0v = 400_000, 20, -0.4
    x0 = torch.full((n, 1, 1, 1), x0v, dtype=torch.float64)
    prev = d.q_sample(x0, torch.full((n,), step - 1), torch.randn(x0.shape, generator=g, dtype=torch.float64))
    xt = d.alphas[step].sqrt() * prev + d.betas[step].sqrt() * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    a, b = xt.flatten(), prev.flatten()
    slope = ((a - a.mean()) * (b - b.mean())).mean() / a.var()
    resid = (b - b.mean() - slope * (a - a.mean())).var()
    mean, var = d.posterior_mean_variance(x0[:1], xt[:1], torch.tensor([step]))
    assert slope.item() == pytest.approx(d.posterior_coef2[step].item(), rel=0.01)
    assert resid.item() == pytest.approx(var.item(), rel=0.01)
    predicted = d.posterior_coef1[step] * x0v + d.posterior_coef2[step] * a
    assert (b - predicted).mean().abs().item() < 3e-3
    assert d.posterior_mean_variance(x0[:1], xt[:1], torch.tensor([0]))[1].item() == 0


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_parameterisations_invert(prediction):
    d = Diffusion(linear_betas(100), prediction=prediction)
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(4, 1, 28, 28, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 5, 50, 99])
    xt = d.q_sample(x0, t, eps)
    x0_hat, eps_hat = d.predict_x0_eps(xt, t, d.target(x0, t, eps))
    assert torch.allclose(x0_hat, x0, atol=1e-10) and torch.allclose(eps_hat, eps, atol=1e-10)


def test_losses_against_a_zero_model():
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(8, 1, 28, 28, generator=g) * 2 - 1
    noise = 3 * torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 100, (8,), generator=g)
    mse = Diffusion(linear_betas(100), loss="mse").loss(zero, x0, t, noise)
    huber = Diffusion(linear_betas(100), loss="huber").loss(zero, x0, t, noise)
    assert mse.item() == pytest.approx(noise.square().mean().item(), rel=1e-5)
    a = noise.abs()
    assert huber.item() == pytest.approx(torch.where(a < 1, 0.5 * a * a, a - 0.5).mean().item(), rel=1e-5)


# ----------------------------------------------------------------------------- samplers

def tiny_net():
    """A real (very small) U-Net: time-conditioned, with attention, non-linear in x."""
    torch.manual_seed(0)
    net = UNet(UNetConfig(dim=8, mults=(1, 2), num_res_blocks=1, attn_levels=(1,), groups=2,
                          head_dim=16)).double().eval()
    torch.nn.init.normal_(net.head[-1].weight, std=0.05)  # a non-trivial eps prediction
    return net


class Oracle(torch.nn.Module):
    """The exact eps for one known x0: every sampler must then return x0 itself."""

    def __init__(self, d, x0):
        super().__init__()
        self.d, self.x0 = d, x0

    def forward(self, x, t):
        return self.d.eps_from_x0(x, t, self.x0)


@pytest.fixture(scope="module")
def setup():
    T = 10
    d = Diffusion(linear_betas(T))
    g = torch.Generator().manual_seed(4)
    x0 = (torch.rand(2, 1, 28, 28, generator=g, dtype=torch.float64) * 2 - 1) * 0.9
    return d, tiny_net(), x0


def test_ddim_eta1_over_all_steps_is_ancestral_ddpm(setup):
    d, net, x0 = setup
    shape = x0.shape
    for kw in ({}, {"x0_hat": x0, "t0": 7}):
        a, nfe_a = ddpm_sample(net, d, shape, generator=11, dtype=torch.float64, **kw)
        b, nfe_b = ddim_sample(net, d, shape, steps=d.T, eta=1.0, generator=11, dtype=torch.float64, **kw)
        assert nfe_a == nfe_b == kw.get("t0", d.T)
        assert torch.allclose(a, b, atol=1e-9), (a - b).abs().max()
    # and eta=0 is a different (deterministic) sampler
    c, _ = ddim_sample(net, d, shape, steps=d.T, eta=0.0, x0_hat=x0, t0=7, generator=11,
                       dtype=torch.float64)
    assert not torch.allclose(a, c)


def test_start_at_t0_equal_T_is_the_pure_noise_start(setup):
    d, net, x0 = setup
    for name in ("ddpm", "ddim"):
        kw = dict(sampler=name, steps=5, eta=0.5, generator=5, dtype=torch.float64)
        pure, n1 = sample(net, d, x0.shape, **kw)
        from_t, n2 = sample(net, d, None, x0_hat=x0, t0=d.T, **kw)
        assert torch.equal(pure, from_t) and n1 == n2
        near, _ = sample(net, d, None, x0_hat=x0, t0=d.T - 1, **kw)
        assert not torch.equal(pure, near)


def test_oracle_denoiser_returns_x0_from_any_t0(setup):
    d, _, x0 = setup
    oracle = Oracle(d, x0)
    for t0 in (1, 5, d.T):
        x, _ = ddpm_sample(oracle, d, x0.shape, x0_hat=x0, t0=t0, generator=1, dtype=torch.float64)
        assert torch.allclose(x, x0, atol=1e-9)
        y, _ = ddim_sample(oracle, d, x0.shape, steps=3, eta=0.0, x0_hat=x0 if t0 < d.T else None,
                           t0=t0, generator=1, dtype=torch.float64)
        assert torch.allclose(y, x0, atol=1e-9)


def test_small_t0_from_true_x0_stays_close_and_large_t0_does_not(setup):
    _, net, x0 = setup
    d = Diffusion(linear_betas(1000))
    near, nfe = ddpm_sample(net, d, None, x0_hat=x0, t0=3, generator=3, dtype=torch.float64)
    far, _ = ddim_sample(net, d, None, steps=4, x0_hat=x0, t0=d.T, generator=3, dtype=torch.float64)
    assert nfe == 3
    assert (near - x0).abs().mean() < 0.05
    assert (far - x0).abs().mean() > 0.3


def test_determinism_nfe_and_timesteps(setup):
    d, net, x0 = setup
    a, _ = ddim_sample(net, d, (1, 1, 28, 28), steps=3, eta=1.0, generator=9, dtype=torch.float64)
    b, _ = ddim_sample(net, d, (1, 1, 28, 28), steps=3, eta=1.0, generator=9, dtype=torch.float64)
    c, _ = ddim_sample(net, d, (1, 1, 28, 28), steps=3, eta=1.0, generator=10, dtype=torch.float64)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert ddim_timesteps(1000, 50)[:2] == [999, 979] and ddim_timesteps(1000, 50)[-1] == 0
    assert len(ddim_timesteps(1000, 50)) == 50
    assert ddim_timesteps(10, 50) == list(range(9, -1, -1))
    assert ddim_timesteps(57, 1) == [56]
    _, nfe = ddim_sample(net, d, None, steps=8, x0_hat=x0, t0=3, generator=1, dtype=torch.float64)
    assert nfe == 3
    with pytest.raises(ValueError, match="needs an estimate"):
        ddpm_sample(net, d, (1, 1, 28, 28), t0=5)
    with pytest.raises(ValueError, match="t0 must be"):
        ddpm_sample(net, d, None, x0_hat=x0, t0=d.T + 1)
