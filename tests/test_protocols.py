"""The restoration protocol: start-state math, the t0 rule by noise level, the posterior mean,
NFE and FLOP accounting, the statistics, the inpainting consistency, and the job end to end on
tiny data with a tiny random U-Net (the generation protocol: tests/test_generation.py)."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from dipddpm.config import ConfigError, UserError, load_config
from dipddpm.diffusion import Diffusion, cosine_betas, linear_betas, noise_levels
from dipddpm.dip.degrade import degrade
from dipddpm.evaluate.flops import count_flops, forward_flops, train_step_flops
from dipddpm.evaluate.stats import bootstrap_ci, paired_delta, pareto_front
from dipddpm.protocols.arms import (CountingModel, cheap_estimate, direct_start, oracle_error,
                                    residual_error, run_chain, start_at, to_diffusion, to_unit)
from dipddpm.protocols.restoration import add_deltas, chain_plan, effective_steps
from tests.conftest import make_tiny_world, run_module

TINY_DIP = ["dip.channels_down=8", "dip.channels_up=8", "dip.channels_skip=2", "dip.iters=5",
            "dip.batch_size=4", "dip.es_window=2", "dip.es_patience=2"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny tensors, 1 thread


class ZeroEps(nn.Module):
    """A legitimate (if useless) eps-model: predicts no noise, so x0_hat = x_t / sqrt(abar)."""

    def forward(self, x, t):
        return torch.zeros_like(x)


class OracleEps(nn.Module):
    """An eps-model that knows the clean image x0 ([-1, 1]): the exact noise of any x_t."""

    def __init__(self, diffusion, x0):
        super().__init__()
        self.d, self.x0 = diffusion, x0

    def forward(self, x, t):
        a = self.d.sqrt_abar[t].float().view(-1, 1, 1, 1)
        s = self.d.sqrt_one_minus_abar[t].float().view(-1, 1, 1, 1)
        return (x - a * self.x0) / s


def flat_images(n, value=0.5):
    return torch.full((n, 1, 28, 28), value)


def test_direct_start_has_the_forward_processes_noise_level():
    d = Diffusion(linear_betas(1000))
    clean = np.full((64, 1, 28, 28), 0.5, np.float32)  # mid-grey: the clip to [0,1] never bites
    keys = [f"test-{i:06d}" for i in range(64)]
    y, _ = degrade(clean, keys, "denoise", run_seed=0, sigma=25.0)
    x_start, t0 = direct_start(torch.from_numpy(y), d, 25.0)
    # sigma 25 on [0,1] is 50/255 = 0.196 on [-1,1]: t* index 56, paper step 57
    assert t0 == 57
    resid = x_start - d.sqrt_abar[t0 - 1].float() * to_diffusion(torch.from_numpy(clean))
    assert float(resid.mean()) == pytest.approx(0.0, abs=2e-3)
    assert float(resid.std()) == pytest.approx(float(d.sqrt_one_minus_abar[t0 - 1]), rel=0.03)
    assert direct_start(torch.from_numpy(y), d, 50.0)[1] > t0


@pytest.mark.parametrize("value", [0.2, 0.7])
def test_dip_start_state_moments_on_the_diffusion_scale(value):
    # With eps = 0 one DDIM step returns x_t0 / sqrt(abar): the start state, back on [0, 1]
    d = Diffusion(linear_betas(1000))
    t0 = 20
    r = run_chain(ZeroEps(), d, sampler="ddim", steps=1, t0=t0, u_hat=flat_images(64, value))
    ratio = math.sqrt((1 - float(d.abar[t0 - 1])) / float(d.abar[t0 - 1]))
    assert r.u.shape == (64, 1, 28, 28) and r.nfe == 1
    assert float(r.u.mean()) == pytest.approx(value, abs=2e-3)
    assert float(r.u.std()) == pytest.approx(ratio / 2, rel=0.03)  # std on [0,1] is half


def test_direct_arm_with_a_zero_model_returns_the_observation():
    d = Diffusion(linear_betas(1000))
    clean = np.random.default_rng(0).random((8, 1, 28, 28)).astype(np.float32)
    y, _ = degrade(clean, [f"k{i}" for i in range(8)], "denoise", run_seed=1, sigma=50.0)
    x_start, t0 = direct_start(torch.from_numpy(y), d, 50.0)
    r = run_chain(ZeroEps(), d, sampler="ddim", steps=1, t0=t0, x_start=x_start)
    assert torch.allclose(r.u, torch.from_numpy(y), atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("masked", [False, True])
def test_an_oracle_model_restores_the_clean_image_exactly(sampler, masked):
    d = Diffusion(linear_betas(100))
    clean = torch.rand(4, 1, 28, 28)
    model = OracleEps(d, to_diffusion(clean))
    u_hat = torch.rand(4, 1, 28, 28)  # a bad estimate: the oracle must fix it anyway
    kw = {}
    if masked:
        mask = torch.ones_like(clean)
        mask[..., 9:19, 9:19] = 0
        kw = dict(y=clean * mask, mask=mask)
    r = run_chain(model, d, sampler=sampler, steps=7, t0=60, u_hat=u_hat, **kw)
    assert r.nfe == 7
    assert float((r.u - clean).abs().max()) < 1e-4


def test_inpainting_keeps_the_observed_pixels_and_changes_the_hole():
    d = Diffusion(linear_betas(100))
    clean = torch.rand(3, 1, 28, 28)
    mask = torch.ones_like(clean)
    mask[..., 9:19, 9:19] = 0
    y = clean * mask
    r = run_chain(ZeroEps(), d, sampler="ddpm", steps=10, t0=40, u_hat=torch.rand_like(clean),
                  y=y, mask=mask, seed=3)
    assert torch.equal(r.u[mask > 0], y[mask > 0])
    assert float((r.u - clean)[mask == 0].abs().mean()) > 0.01  # the hole was not copied from y
    assert 0 <= float(r.u.min()) and float(r.u.max()) <= 1


@pytest.mark.parametrize("masked", [False, True])
def test_nfe_is_the_models_call_count(masked):
    d = Diffusion(linear_betas(100))
    outer = CountingModel(ZeroEps())
    u = flat_images(2)
    kw = dict(y=u, mask=torch.zeros_like(u)) if masked else {}
    for sampler in ("ddpm", "ddim"):
        for t0, k, want in [(10, 3, 3), (10, 10, 10), (10, 50, 10), (1, 5, 1)]:
            outer.calls = 0
            r = run_chain(outer, d, sampler=sampler, steps=k, t0=t0, u_hat=u, **kw)
            assert r.nfe == outer.calls == want, (sampler, t0, k)
    assert effective_steps([5, 10, 20, 50], 12) == [5, 10, 12]
    # K = 1 is one step to x_0 whatever the sampler: it runs once
    assert chain_plan(["ddpm", "ddim"], [1, 5, 50], 12) == [("ddim", 1), ("ddpm", 5), ("ddim", 5),
                                                             ("ddpm", 12), ("ddim", 12)]


def test_cheap_estimate_blurs_noise_and_fills_the_hole():
    clean = flat_images(4, 0.6)
    noisy = (clean + 0.1 * torch.randn_like(clean)).clamp(0, 1)
    est = cheap_estimate(noisy, torch.ones_like(clean), 1.0)
    assert float((est - clean).pow(2).mean()) < 0.2 * float((noisy - clean).pow(2).mean())
    mask = torch.ones_like(clean)
    mask[..., 9:19, 9:19] = 0
    filled = cheap_estimate(clean * mask, mask, 1.0)
    assert torch.equal(filled[mask > 0], clean[mask > 0])
    assert float((filled - clean).abs().max()) < 1e-3  # a constant image is filled with itself


# ----------------------------------------------------------------------------- t0, e, Tweedie


@pytest.mark.parametrize("betas", [linear_betas, cosine_betas])
def test_the_same_start_is_the_same_noise_level_at_any_T(betas):
    c, e = 1.5, 0.12  # CCDF: sigma_t0 = c x e, e in [-1, 1] units
    got = {}
    for T in (250, 500, 1000):
        d = Diffusion(betas(T))
        t0, sigma = start_at(d, c * e)
        s = noise_levels(d)
        assert float(s[t0 - 1]) == sigma  # the realised level is the step's own
        # the nearest level of the schedule: no other step is closer to the request
        assert abs(sigma - c * e) == pytest.approx(float((s - c * e).abs().min()))
        assert sigma == pytest.approx(c * e, rel=0.03)
        got[T] = t0
    assert got[250] < got[500] < got[1000]  # the index moves with T, the level does not


class GaussianEps(nn.Module):
    """The exact eps-model (the MMSE predictor E[eps | x_t]) for data x0 ~ N(mu, tau^2) per
    pixel: x_t = a x0 + b eps, so E[eps | x_t] = b (x_t - a mu) / (a^2 tau^2 + b^2)."""

    def __init__(self, diffusion, mu, tau):
        super().__init__()
        self.d, self.mu, self.tau = diffusion, mu, tau

    def forward(self, x, t):
        a = self.d.sqrt_abar[t].view(-1, 1, 1, 1).to(x)
        b = self.d.sqrt_one_minus_abar[t].view(-1, 1, 1, 1).to(x)
        return b * (x - a * self.mu) / (a ** 2 * self.tau ** 2 + b ** 2)


def test_one_step_from_the_direct_start_is_the_mmse_denoiser():
    # Gaussian data and the exact eps-model: the posterior mean E[x0 | y] is known in closed
    # form, mu + tau^2 / (tau^2 + s^2) (y - mu); the K = 1 direct arm must return it
    d = Diffusion(linear_betas(1000), prediction="eps")
    mu, tau = 0.1, 0.2  # [-1, 1] units: far from the clip at +-1
    t_star = 57
    s = float(noise_levels(d)[t_star - 1])  # the observation's noise matches step t* exactly
    g = torch.Generator().manual_seed(0)
    x0 = mu + tau * torch.randn(256, 1, 28, 28, generator=g, dtype=torch.float64)
    y = x0 + s * torch.randn(x0.shape, generator=g, dtype=torch.float64)  # [-1, 1] units
    x_start = y * d.sqrt_abar[t_star - 1]
    r = run_chain(GaussianEps(d, mu, tau), d, sampler="ddpm", steps=1, t0=t_star, x_start=x_start)
    mmse = mu + tau ** 2 / (tau ** 2 + s ** 2) * (y - mu)
    assert r.nfe == 1
    assert torch.allclose(r.u.double(), to_unit(mmse), atol=1e-6)
    # and its error is the Bayes error tau^2 s^2 / (tau^2 + s^2), well below the noise's s^2
    mse = float(((2 * r.u.double() - 1) - x0).pow(2).mean())
    assert mse == pytest.approx(tau ** 2 * s ** 2 / (tau ** 2 + s ** 2), rel=0.02)
    assert mse < 0.6 * s ** 2


def test_the_error_estimated_from_y_and_its_low_bias():
    g = torch.Generator().manual_seed(1)
    clean = torch.rand(64, 1, 28, 28, generator=g, dtype=torch.float64)
    noise = (25 / 255) * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    y = clean + noise  # the gaussian observation model
    # an estimate whose error is independent of the noise: e_hat is right (2x on [-1, 1])
    u = clean + 0.03 * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    assert residual_error(u, y, 25) == pytest.approx(0.06, rel=0.05)
    assert oracle_error(u, clean) == pytest.approx(0.06, rel=0.05)
    # an estimate that kept some of the noise (as a DIP fitted to y does): e_hat is biased low
    u = clean + 0.5 * noise
    assert residual_error(u, y, 25) < 0.7 * oracle_error(u, clean)
    # the oracle error of an inpainting estimate over the hole alone
    hole = torch.zeros_like(clean)
    hole[..., 9:19, 9:19] = 1
    u = clean + 0.2 * hole
    assert oracle_error(u, clean, hole) == pytest.approx(0.4)
    assert oracle_error(u, clean) < 0.2


# ----------------------------------------------------------------------------- FLOPs, statistics


def test_flop_counts_match_a_hand_count():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 1),
                        nn.Flatten(), nn.Linear(36, 5))
    x = torch.randn(1, 2, 6, 6)
    conv1 = 2 * (4 * 6 * 6) * (2 * 3 * 3)  # 2 FLOPs per multiply-add, per output element
    conv2 = 2 * (1 * 6 * 6) * 4
    linear = 2 * 5 * 36
    assert forward_flops(net, x) == conv1 + conv2 + linear
    # backward: weight gradients everywhere (as many FLOPs as the forward) and input gradients
    # for every layer but the first (x needs none, as the DIP's input z)
    target = torch.zeros(1, 5)
    assert train_step_flops(net, x, target) == 2 * (conv1 + conv2 + linear) + conv2 + linear
    assert count_flops(lambda: net(torch.randn(3, 2, 6, 6))) == 3 * (conv1 + conv2 + linear)


def test_pareto_front_and_paired_deltas_on_a_constructed_table():
    costs = [0, 0, 1, 2, 2, 5, 8, 10]
    values = [20, 18, 19, 22, 21, 22, 25, 24]
    # 0/20 first; 1/19 and 0/18 are beaten by 0/20; 2/22 on; 2/21 and 5/22 are not better
    # than 2/22; 8/25 on; 10/24 beaten by 8/25
    assert pareto_front(costs, values) == [0, 3, 6]
    assert pareto_front([3, 1, 2], [1.0, 1.0, 2.0]) == [1, 2]
    # rows: deltas against the best baseline at equal or lower GFLOP, per image, paired
    def row(arm, gflop, per_image, baseline=True):
        return {"arm": arm, "gflop_per_image": gflop, "psnr": float(np.mean(per_image)),
                "psnr_images": per_image, "baseline": baseline, "oracle": False,
                "estimate": None, "start_rule": None, "t0": None, "steps": None,
                "delta_psnr": None, "delta_ci95": None, "delta_vs": None}
    rows = [row("observation", 0.0, [20.0, 21.0, 22.0]), row("direct", 5.0, [23.0, 24.0, 25.0]),
            row("dip_start", 4.0, [21.0, 23.0, 22.0], baseline=False),
            row("dip_start", 6.0, [24.0, 24.5, 26.0], baseline=False)]
    assert add_deltas(rows, "psnr") == [0, 1]
    assert rows[2]["delta_psnr"] == pytest.approx(1.0) and rows[2]["delta_vs"] == "observation"
    assert rows[3]["delta_psnr"] == pytest.approx(5 / 6) and rows[3]["delta_vs"] == "direct"
    assert rows[1]["delta_psnr"] == pytest.approx(3.0)  # a baseline against the others
    lo, hi = rows[3]["delta_ci95"]
    assert lo <= 5 / 6 <= hi


def test_bootstrap_intervals():
    rng = np.random.default_rng(0)
    v = rng.normal(25.0, 1.0, 400)
    lo, hi = bootstrap_ci(v)
    assert lo < v.mean() < hi and hi - lo == pytest.approx(2 * 1.96 / 20, rel=0.15)
    assert bootstrap_ci(v) == [lo, hi]  # a fixed seed: the same table every time
    assert bootstrap_ci([3.0] * 5) == [3.0, 3.0]
    # paired: a shared image-to-image spread cancels
    a = rng.normal(0, 3.0, 200)
    d, (dlo, dhi) = paired_delta(a + 0.5 + rng.normal(0, 0.1, 200), a)
    assert d == pytest.approx(0.5, abs=0.05) and dlo > 0.4 and dhi < 0.6


# ----------------------------------------------------------------------------- jobs end to end


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    return make_tiny_world(tmp_path_factory.mktemp("protocols"), n_test=16, T=30)


def restore_args(world, run_dir, *extra):
    return ["--config", "configs/restore.yaml", f"run.dir={run_dir}", f"data.dir={world['data']}",
            f"protocol.checkpoint={world['ddpm']}", "protocol.num_images=4",
            "protocol.start_c=[1]", "protocol.sigma_t0s=[0.3]", "protocol.t0s=[5,99]",
            "protocol.steps=[2]", "protocol.samplers=[ddim]", "protocol.batch_size=3",
            *TINY_DIP, *extra]


ROW_KEYS = {"arm", "estimate", "output", "sampler", "steps", "nfe", "start_rule", "c", "e",
            "sigma_t0_requested", "sigma_t0", "t0", "dip_iters", "gflop_per_image",
            "seconds_per_image", "reverse_seconds_per_image", "psnr", "psnr_std", "psnr_ci95",
            "psnr_hole", "psnr_hole_ci95", "ssim", "delta_psnr", "delta_ci95", "delta_vs",
            "baseline", "oracle", "es_decided", "psnr_images", "psnr_hole_images"}
DIP_ROWS = {("budget", "ema"), ("es_wmv", "raw"), ("es_wmv", "ema"), ("oracle", "raw"),
            ("oracle", "ema"), ("oracle", "best")}


def test_restore_job_writes_results_table_figures_and_wandb(tiny_world, tmp_path):
    from dipddpm.tracking import read_wandb_offline
    from jobs.restore import main

    run_dir = tmp_path / "restore"
    main(restore_args(tiny_world, run_dir, "wandb.mode=offline", "protocol.sigmas=[25]",
                      "protocol.ddpm_only_steps=[1000]"))
    res = json.loads((run_dir / "results.json").read_text())
    assert res["protocol"] == "restoration" and res["num_images"] == 4 and res["T"] == 30
    assert res["steps"] == [2] and res["ddpm_only_steps"] == [1000]
    assert res["observation"] == "gaussian" and len(res["answer"]) == 2
    g_unet, g_dip = res["gflop"]["unet_forward"], res["gflop"]["dip_iteration"]
    assert g_unet == pytest.approx(0.1178, rel=0.01) and g_dip > 0
    d = Diffusion(linear_betas(30))
    levels = noise_levels(d)
    assert set(res["tasks"]) == {"denoise-s25", "inpaint_box"}
    for name, t in res["tasks"].items():
        inpaint = name == "inpaint_box"
        assert t["primary"] == ("psnr_hole" if inpaint else "psnr")
        assert sum("t0=99" in s for s in t["skipped"]) == 4  # 3 DIP estimates + the blur
        arms = {r["arm"] for r in t["rows"]}
        assert arms == {"observation", "cheap", "dip", "dip_start", "cheap_start",
                        "noise_start" if inpaint else "direct"}
        assert {(r["estimate"], r["output"]) for r in t["rows"] if r["arm"] == "dip"} == DIP_ROWS
        assert {r["estimate"] for r in t["rows"] if r["arm"] == "dip_start"} == \
            {"budget", "es_wmv", "oracle"}
        by = {(r["estimate"], r["output"]): r for r in t["rows"] if r["arm"] == "dip"}
        assert by[("oracle", "best")]["psnr"] >= max(by[("oracle", "raw")]["psnr"],
                                                     by[("oracle", "ema")]["psnr"]) - 0.2
        # ES-WMV's cost is what it ran to decide: at least pick + patience where it decided
        es = t["es_wmv"]
        assert es["n"] == 4 and by[("es_wmv", "raw")]["dip_iters"] == es["cost_mean"] >= 5
        for r in t["rows"]:
            assert set(r) == ROW_KEYS
            assert r["gflop_per_image"] == pytest.approx(r["nfe"] * g_unet
                                                         + r["dip_iters"] * g_dip)
            lo, hi = r["psnr_ci95"]
            assert 0 < r["psnr"] <= 100 and lo <= r["psnr"] <= hi and len(r["psnr_images"]) == 4
            assert (r["psnr_hole"] is not None) == inpaint
            assert r["delta_psnr"] is not None and r["delta_vs"]
            assert r["oracle"] == (r["estimate"] == "oracle" or r["start_rule"] == "c*e_oracle")
            assert r["baseline"] == (r["arm"] in ("observation", "cheap", "direct",
                                                  "cheap_start", "noise_start")
                                     and not r["oracle"])
            if r["sampler"] is not None:  # a chain
                assert r["nfe"] == min(r["steps"], r["t0"])
                assert r["sigma_t0"] == pytest.approx(float(levels[r["t0"] - 1]))
                assert r["seconds_per_image"] >= r["reverse_seconds_per_image"] > 0
            if r["start_rule"] in ("c*e", "c*e_oracle"):
                assert r["sigma_t0_requested"] == pytest.approx(r["c"] * r["e"])
            if r["start_rule"] == "sigma":
                assert r["sigma_t0_requested"] == 0.3
            if r["arm"] == "dip_start" and r["estimate"] == "budget":
                assert r["dip_iters"] == 5
            if r["arm"] == "cheap_start":
                assert r["dip_iters"] == 0
        rules = {r["start_rule"] for r in t["rows"] if r["arm"] == "dip_start"}
        # inpainting: no e from y, so CCDF's rule runs with the oracle e only
        assert rules == ({"c*e_oracle", "sigma", "t0"} if inpaint
                         else {"c*e", "c*e_oracle", "sigma", "t0"})
        # the DDPM alone also runs ddpm_only_steps (K = 1000 runs its whole chain), the starts
        # from an estimate only protocol.steps
        assert {r["steps"] for r in t["rows"] if r["arm"] in ("dip_start", "cheap_start")} \
            <= {1, 2}
        if inpaint:
            noise = [r for r in t["rows"] if r["arm"] == "noise_start"]
            assert {r["t0"] for r in noise} == {30} and [r["steps"] for r in noise] == [2, 30]
        else:
            direct = [r for r in t["rows"] if r["arm"] == "direct"]
            assert direct[0]["t0"] == t["t_star"]
            assert [r["steps"] for r in direct] == sorted({1, 2, t["t_star"]})
        assert t["front"] and all(t["rows"][i]["baseline"] for i in t["front"])
        assert set(t["answer"]["best"]) >= {"delta_psnr", "delta_ci95", "break_even_iters"}
        pc = t["answer"]["prior_check"]
        if inpaint:
            assert pc is None  # no direct start
        else:
            tweedie = next(r for r in t["rows"] if r["arm"] == "direct" and r["steps"] == 1)
            assert pc["tweedie"] == tweedie["psnr"]
            assert pc["dip_oracle"] == by[("oracle", "best")]["psnr"]
            assert pc["delta_psnr"] == pytest.approx(pc["tweedie"] - pc["dip_oracle"])
            assert pc["delta_ci95"][0] <= pc["delta_psnr"] <= pc["delta_ci95"][1]
    table = (run_dir / "table.md").read_text()
    assert "## The answer" in table and "**denoise-s25**" in table and "dip (oracle)" in table
    assert "one-step posterior mean (Tweedie" in table
    for png in ("front_denoise-s25.png", "front_inpaint_box.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    w = read_wandb_offline(run_dir)
    logged = {k for row in w["history"] for k in row}
    assert "denoise-s25/dip_start_best_psnr" in logged and "restoration" in logged
    assert "inpaint_box/noise_start_best_psnr_hole" in logged


def test_restore_shares_dip_fits_through_the_cache_and_resumes_by_task(tiny_world, tmp_path,
                                                                      monkeypatch):
    import dipddpm.dip.fit as fit
    from jobs.restore import main

    cache = tmp_path / "dip-cache"
    args = lambda d, *x: restore_args(tiny_world, d, "protocol.sigmas=[25]",  # noqa: E731
                                      f"protocol.dip_cache={cache}", *x)
    main(args(tmp_path / "a"))
    a = json.loads((tmp_path / "a/results.json").read_text())
    assert len(list(cache.glob("*.pt"))) == 2  # 2 tasks x one batch of 4 nets
    curve = a["tasks"]["denoise-s25"]["dip_curve"]
    assert curve["iters"] and len(curve["raw"]) == len(curve["ema_ci95"]) == len(curve["iters"])

    calls = []
    real = fit.fit_batch
    monkeypatch.setattr(fit, "fit_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    main(args(tmp_path / "b"))  # another run on the same images and DIP settings: no refit
    assert calls == []
    b = json.loads((tmp_path / "b/results.json").read_text())
    for name in a["tasks"]:
        dip = lambda res: [(r["estimate"], r["output"], r["psnr_images"], r["dip_iters"])  # noqa
                           for r in res["tasks"][name]["rows"] if r["arm"] == "dip"]
        assert dip(a) == dip(b)
        assert a["tasks"][name]["dip_seconds_per_iteration"] == \
            b["tasks"][name]["dip_seconds_per_iteration"]  # the original fit's time
    main(args(tmp_path / "c", "dip.lr=0.02"))  # other DIP settings: fitted anew
    assert calls and len(list(cache.glob("*.pt"))) == 4

    # a finished task is read back by a rerun into the same run dir
    done = tmp_path / "a/tasks/denoise-s25.json"
    task = json.loads(done.read_text())
    task["answer"]["marker"] = 1
    done.write_text(json.dumps(task))
    (tmp_path / "a/results.json").unlink()
    main(args(tmp_path / "a"))
    again = json.loads((tmp_path / "a/results.json").read_text())
    assert again["tasks"]["denoise-s25"]["answer"]["marker"] == 1

    # a task killed mid-way resumes chain by chain: kept chains are read back (same outputs,
    # same times, the task's seconds include them), a lost one runs again with the same seeds
    import dipddpm.protocols.restoration as rest

    chains = sorted((tmp_path / "a/tasks/inpaint_box").glob("*/batch-00000.pt"))
    assert len(chains) >= 3 and any(c.parent.name.startswith("noise_start-") for c in chains)
    chains[0].unlink()
    (tmp_path / "a/tasks/inpaint_box.json").unlink()
    (tmp_path / "a/results.json").unlink()
    ran = []
    real_chain = rest.run_chain
    monkeypatch.setattr(rest, "run_chain", lambda *a, **k: ran.append(1) or real_chain(*a, **k))
    main(args(tmp_path / "a"))
    assert len(ran) == 1
    resumed = json.loads((tmp_path / "a/results.json").read_text())["tasks"]["inpaint_box"]
    first = a["tasks"]["inpaint_box"]
    rows = lambda t: [(r["arm"], r["steps"], r["psnr_images"],  # noqa: E731
                       r["reverse_seconds_per_image"]) for r in t["rows"] if r["nfe"]]
    assert [r[:3] for r in rows(resumed)] == [r[:3] for r in rows(first)]
    assert sum(r[3] != q[3] for r, q in zip(rows(resumed), rows(first))) >= 1  # the rerun chain
    assert resumed["seconds"]["rest"] >= 0.5 * first["seconds"]["rest"]


def test_restore_job_uses_precomputed_priors(tiny_world, tmp_path):
    from dipddpm.dip.priors import load_priors, precompute
    from jobs.restore import main

    cfg = load_config("configs/priors.yaml", [f"data.dir={tiny_world['data']}",
                                              f"run.dir={tmp_path / 'pri'}", "priors.name=tiny",
                                              "wandb.mode=disabled", *TINY_DIP])
    precompute(cfg, progress=False)
    pdir = tiny_world["data"] / "priors" / "tiny"
    run_dir = tmp_path / "restore"
    main(restore_args(tiny_world, run_dir, "wandb.mode=disabled", "protocol.tasks=[denoise]",
                      "protocol.sigmas=[25,50]", f"protocol.priors_dir={pdir}",
                      "protocol.t0s=[]", "protocol.oracle_e=false"))
    res = json.loads((run_dir / "results.json").read_text())
    s25, s50 = res["tasks"]["denoise-s25"], res["tasks"]["denoise-s50"]
    assert s25["dip_source"] == f"priors:{pdir}" and s50["dip_source"] == "fitted"
    budget = next(r for r in s25["rows"] if r["arm"] == "dip")
    assert (budget["estimate"], budget["output"]) == ("budget", "ema")
    p = load_priors(pdir)
    assert budget["psnr"] == pytest.approx(float(np.mean(p["psnr_clean"][:4])), abs=0.02)
    # the priors hold the budget estimate only: no ES-WMV or oracle rows, and they say so
    assert [r["estimate"] for r in s25["rows"] if r["arm"] == "dip"] == ["budget"]
    assert {r["estimate"] for r in s25["rows"] if r["arm"] == "dip_start"} == {"budget"}
    assert any("dip_start es_wmv" in s for s in s25["skipped"])
    # priors made with another observation model are not used: the DIP is fitted here
    main(restore_args(tiny_world, tmp_path / "clipped", "wandb.mode=disabled",
                      "protocol.tasks=[denoise]", "protocol.sigmas=[25]",
                      f"protocol.priors_dir={pdir}", "protocol.observation=clipped",
                      "protocol.t0s=[]", "protocol.oracle_e=false"))
    res = json.loads((tmp_path / "clipped" / "results.json").read_text())
    assert res["tasks"]["denoise-s25"]["dip_source"] == "fitted"


def test_restore_job_rejects_bad_input_before_writing(tiny_world, tmp_path):
    from jobs.restore import main

    run_dir = tmp_path / "r"
    with pytest.raises(UserError, match="priors_dir"):
        main(restore_args(tiny_world, run_dir, "wandb.mode=disabled",
                          f"protocol.priors_dir={tmp_path / 'nothing'}"))
    with pytest.raises(ConfigError, match="protocol.tasks"):
        main(restore_args(tiny_world, run_dir, "protocol.tasks=[deblur]"))
    with pytest.raises(ConfigError, match="num_images"):
        main(restore_args(tiny_world, run_dir, "protocol.num_images=99"))
    with pytest.raises(UserError, match="no EMA weights"):  # a missing checkpoint
        main(restore_args(tiny_world, run_dir, f"protocol.checkpoint={tmp_path / 'none'}"))
    with pytest.raises(UserError, match="protocol.sigma_t0s"):  # every level beyond the model's
        main(restore_args(tiny_world, run_dir, "protocol.sigma_t0s=[1e6]"))
    # e from y exists for denoising only: inpainting needs an explicit or an oracle rule
    with pytest.raises(UserError, match="inpaint_box has no start rule"):
        main(restore_args(tiny_world, run_dir, "protocol.tasks=[inpaint_box]", "protocol.t0s=[]",
                          "protocol.sigma_t0s=[]", "protocol.oracle_e=false"))
    assert not run_dir.exists()  # nothing was written, not even config.yaml


def test_restore_with_no_runnable_start_is_one_line_and_exit_2(tiny_world, tmp_path):
    run_dir = tmp_path / "r"
    r = run_module("jobs.restore", *restore_args(tiny_world, run_dir, "wandb.mode=disabled",
                                                 "protocol.t0s=[40,99]", "protocol.start_c=[]",
                                                 "protocol.sigma_t0s=[]"), timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "protocol.t0s" in lines[0] and "T = 30" in lines[0]
    assert not run_dir.exists()
