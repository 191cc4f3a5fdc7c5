"""The restoration protocol: start-state math, NFE and compute accounting, the inpainting
consistency, and the job end to end on tiny data with a tiny random U-Net (the generation
protocol: tests/test_generation.py)."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from dipddpm.config import ConfigError, UserError, load_config
from dipddpm.diffusion import Diffusion, linear_betas
from dipddpm.dip.degrade import degrade
from dipddpm.protocols.arms import (CountingModel, cheap_estimate, direct_start, run_chain,
                                    to_diffusion)
from dipddpm.protocols.restoration import effective_steps
from tests.conftest import make_tiny_world

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
    # sigma 25 on [0,1] is 50/255 on [-1,1]: t* index 56 (ANCHORS), paper step 57
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


# ----------------------------------------------------------------------------- jobs end to end


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    return make_tiny_world(tmp_path_factory.mktemp("protocols"), n_test=16, T=30)


def restore_args(world, run_dir, *extra):
    return ["--config", "configs/restore.yaml", f"run.dir={run_dir}", f"data.dir={world['data']}",
            f"protocol.checkpoint={world['ddpm']}", "protocol.num_images=4",
            "protocol.t0s=[5,10,99]", "protocol.steps=[2,20]", "protocol.batch_size=3",
            *TINY_DIP, *extra]


ROW_KEYS = {"arm", "sampler", "t0", "steps", "nfe", "dip_iters", "passes", "psnr", "psnr_std",
            "ssim", "seconds_per_image", "reverse_seconds_per_image", "oracle"}


def test_restore_job_writes_results_table_plots_and_wandb(tiny_world, tmp_path):
    from dipddpm.tracking import read_wandb_offline
    from jobs.restore import main

    run_dir = tmp_path / "restore"
    main(restore_args(tiny_world, run_dir, "wandb.mode=offline"))
    res = json.loads((run_dir / "results.json").read_text())
    assert res["protocol"] == "restoration" and res["num_images"] == 4 and res["T"] == 30
    assert set(res["tasks"]) == {"denoise-s25", "denoise-s50", "inpaint_box"}
    for name, t in res["tasks"].items():
        assert t["skipped"] == ["t0=99 > T=30"]
        arms = {r["arm"] for r in t["rows"]}
        want = {"observation", "cheap", "dip_budget", "dip_es_wmv", "dip_oracle", "dip_start",
                "cheap_start"} | ({"direct"} if name.startswith("denoise") else set())
        assert arms == want
        for r in t["rows"]:
            assert set(r) == ROW_KEYS
            assert 0 < r["psnr"] <= 100 and r["passes"] == r["nfe"] + r["dip_iters"]
            if r["arm"] in ("dip_start", "cheap_start", "direct"):
                assert r["nfe"] == min(r["steps"], r["t0"])
                assert r["seconds_per_image"] >= r["reverse_seconds_per_image"] > 0
            if r["arm"] == "dip_start":
                assert r["dip_iters"] == 5
                assert r["seconds_per_image"] == pytest.approx(
                    r["reverse_seconds_per_image"] + t["dip_seconds_per_image"])
            if r["arm"] == "cheap_start":
                assert r["dip_iters"] == 0
        assert [r["oracle"] for r in t["rows"] if r["arm"] == "dip_oracle"] == [True]
        by = {r["arm"]: r for r in t["rows"] if r["sampler"] is None}
        assert by["dip_oracle"]["psnr"] >= by["dip_budget"]["psnr"] - 1e-6
        assert by["dip_oracle"]["psnr"] >= by["dip_es_wmv"]["psnr"] - 1e-6
        # (dip_start, ddpm, t0 in {5, 10}, K in {2, t0}) and ddim alike: 8 chains per start
        assert sum(r["arm"] == "dip_start" for r in t["rows"]) == 8
    assert res["tasks"]["denoise-s25"]["t_star"] < res["tasks"]["denoise-s50"]["t_star"] <= 30
    table = (run_dir / "table.md").read_text()
    assert "## denoise-s25" in table and "dip_oracle (oracle)" in table
    for png in ("psnr_vs_steps.png", "psnr_vs_time.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    w = read_wandb_offline(run_dir)
    logged = {k for row in w["history"] for k in row}
    assert "denoise-s25/dip_start_best_psnr" in logged and "restoration" in logged


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
                      "protocol.t0s=[5]", "protocol.samplers=[ddim]"))
    res = json.loads((run_dir / "results.json").read_text())
    s25, s50 = res["tasks"]["denoise-s25"], res["tasks"]["denoise-s50"]
    assert s25["dip_source"] == f"priors:{pdir}" and s50["dip_source"] == "fitted"
    budget = next(r for r in s25["rows"] if r["arm"] == "dip_budget")
    p = load_priors(pdir)
    assert budget["psnr"] == pytest.approx(float(np.mean(p["psnr_clean"][:4])), abs=0.02)
    assert not any(r["arm"] == "dip_es_wmv" for r in s25["rows"])  # not in the priors


def test_restore_job_rejects_bad_input(tiny_world, tmp_path):
    from jobs.restore import main

    with pytest.raises(UserError, match="priors_dir"):
        main(restore_args(tiny_world, tmp_path / "r", "wandb.mode=disabled",
                          f"protocol.priors_dir={tmp_path / 'nothing'}"))
    with pytest.raises(ConfigError, match="protocol.tasks"):
        main(restore_args(tiny_world, tmp_path / "r", "protocol.tasks=[deblur]"))
    with pytest.raises(ConfigError, match="num_images"):
        main(restore_args(tiny_world, tmp_path / "r", "protocol.num_images=99"))
