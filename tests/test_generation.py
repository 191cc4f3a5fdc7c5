"""The generation protocol: starts by noise level, the three DIP-start sources and the clean-image
control, the held-out reference that excludes the held-out starts, the baseline front at equal
NFE, memorisation, the retired index key, and the report's generation table, on tiny data with a
tiny random U-Net (tests/conftest.py's tiny world)."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from dipddpm.cli import run_job
from dipddpm.config import ConfigError, config_from_dict, load_config
from dipddpm.diffusion import Diffusion, linear_betas, t_for_sigma
from dipddpm.evaluate import classifier_dir, load_classifier, split_features, to_uint8
from dipddpm.protocols.arms import start_at, to_diffusion
from dipddpm.protocols.generation import (_memorisation, data_free_source, first_images,
                                          generation, heldout_reference)
from dipddpm.train.sampling import load_trained
from jobs.generate_eval import main as generate_main
from jobs.report import main as report_main
from tests.conftest import make_tiny_world

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny tensors, 1 thread

TINY_DIP = ["dip.channels_down=8", "dip.channels_up=8", "dip.channels_skip=2", "dip.iters=5",
            "dip.batch_size=4", "dip.es_window=2", "dip.es_patience=2"]
N = 6  # samples per arm: two chain batches of 4 and 2


class ZeroEps(nn.Module):
    """Predicts no noise: one DDIM step from x_t returns x_t / sqrt(abar), clipped."""

    def forward(self, x, t):
        return torch.zeros_like(x)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from dipddpm.evaluate import train_classifier

    w = make_tiny_world(tmp_path_factory.mktemp("generation"), n_test=16, T=30)
    w["base"] = [f"data.dir={w['data']}", f"classifier.dir={w['root'] / 'clf'}",
                 "classifier.max_steps=2", "classifier.batch_size=8",
                 "classifier.kid_num_subsets=3"]
    train_classifier(load_config(None, w["base"]), log=lambda *a: None)
    w["clf"] = load_classifier(classifier_dir(load_config(None, w["base"])))
    return w


def job_args(world, run_dir, *extra):
    return ["--config", "configs/generation.yaml", f"run.dir={run_dir}",
            f"protocol.checkpoint={world['ddpm']}", f"protocol.gen_num_images={N}",
            "protocol.gen_ddim_steps=[2,5]", "protocol.gen_sigma_t0s=[0.3,1.0,1.01,1e6]",
            "protocol.gen_steps=3", "protocol.batch_size=4", "wandb.mode=disabled",
            *TINY_DIP, *world["base"], *extra]


@pytest.fixture(scope="module")
def job(world, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("gen") / "gen"
    generate_main(job_args(world, run_dir))
    return run_dir, json.loads((run_dir / "results.json").read_text())


def test_start_t0_gives_the_same_noise_level_at_any_T():
    for sigma in (0.3, 1.0, 3.0):
        realised = []
        for T in (250, 500, 1000):
            d = Diffusion(linear_betas(T))
            t0, s = start_at(d, sigma)
            assert t0 == t_for_sigma(d, sigma) + 1
            abar = float(d.abar[t0 - 1])
            assert s == pytest.approx(math.sqrt((1 - abar) / abar), rel=1e-12)
            realised.append(s)
        # the grid of noise levels is a few percent apart at T = 250: the same level at any T
        assert max(realised) / min(realised) < 1.05
        assert all(abs(s / sigma - 1) < 0.05 for s in realised)
    d = Diffusion(linear_betas(250))
    assert start_at(d, 1e6)[0] == 250  # past the schedule's end: the start is pure noise


def test_generation_job_rows_references_and_memorisation(world, job):
    run_dir, res = job
    d = Diffusion(linear_betas(30))
    assert res["n"] == N and res["T"] == 30
    assert res["floor"]["n"] == N and res["floor_heldout"]["n"] == N
    assert res["floor"]["fid_vs_train"] > 0 and res["floor_heldout"]["fid"] > 0
    assert res["references"]["heldout"] == {"n": 16 - N,
                                            "excluded": ["test-000000", f"test-00000{N - 1}"]}
    # 1.01 lands on 1.0's step; 1e6 on t0 = T, where the estimate is no longer used
    assert [(s["sigma_t0"], s["why"][:6]) for s in res["skipped"]] == \
        [(1.01, "same t"), (1e6, "t0 = T")]
    arms = [(r["arm"], r["source"], r["sigma_t0"], r["steps"], r["nfe"]) for r in res["arms"]]
    starts = [a for a in arms if a[0] in ("dip_start", "clean_start")]
    assert arms[:7] == [("ddpm", None, None, k, k) for k in (2, 3, 5, 30)] + \
        [("ddim", None, None, k, k) for k in (2, 3, 5)]  # K = 3: the starts' NFE, added
    assert starts == [(arm, src, s, 3, 3) for src in ("train", "heldout", "data_free")
                      for s in (0.3, 1.0) for arm in ("dip_start", "clean_start")
                      if not (src == "data_free" and arm == "clean_start")]
    assert [(r["arm"], r["source"]) for r in res["arms"] if r["arm"] == "dip_estimate"] == \
        [("dip_estimate", s) for s in ("train", "heldout", "data_free")]
    unet_g = next(r["gflop_per_sample"] / r["nfe"] for r in res["arms"] if r["arm"] == "ddim")
    dip_g = next(r["gflop_per_sample"] / r["dip_iters"] for r in res["arms"]
                 if r["arm"] == "dip_estimate" and r["source"] == "train")
    assert unet_g > 0 and dip_g > 0
    for r in res["arms"]:
        assert (run_dir / r["grid"]).is_file()
        assert {"nfe", "dip_iters", "seconds_per_sample", "fid", "kid", "fid_heldout",
                "kid_heldout", "kid_std_heldout"} <= set(r)
        assert "passes" not in r
        # compute: nfe U-Net forwards + dip_iters DIP iterations, each counted once per model
        assert r["gflop_per_sample"] == pytest.approx(r["nfe"] * unet_g + r["dip_iters"] * dip_g)
        assert r["fid"] >= 0 and r["fid_heldout"] >= 0
        if r["sigma_t0"] is not None:  # the t0 used is the one the noise level maps to
            assert (r["t0"], r["sigma_t0_realised"]) == pytest.approx(start_at(d, r["sigma_t0"]))
        mem = r["memorisation"]
        if r["source"] in ("train", "heldout"):  # beside every start from data
            assert 0 <= mem["source_match"] <= 1 and mem["source_distance_median"] >= 0
            assert mem["features"]["test"]["median"] > 0
        elif r["source"] == "data_free":
            assert "source_match" not in mem and r["dip_iters"] == 0
        if r["arm"] == "dip_start" and r["source"] != "data_free":
            assert r["dip_iters"] == 5 and r["seconds_per_sample"] > r["reverse_seconds_per_sample"]
        if r["arm"] == "clean_start":
            assert r["dip_iters"] == 0
    assert res["sources"]["data_free"]["dip_source"] == "untrained"
    assert res["sources"]["heldout"]["keys"] == ["test-000000", f"test-00000{N - 1}"]
    assert next(r for r in res["arms"] if r["arm"] == "ddim" and r["steps"] == 5)["memorisation"]
    table = (run_dir / "table.md").read_text()
    assert "| clean_start | train | 0.3 (" in table and "floor FID" in table
    assert "skipped sigma_t0 = 1.01" in table
    assert (run_dir / "fid_vs_steps.png").is_file()


def test_heldout_reference_excludes_the_start_images(world, job):
    _, res = job
    clf, data = world["clf"], world["data"]
    feats, ref_keys, excluded = heldout_reference(clf, data, N)
    _, start_keys = first_images(data, "test", N, "protocol.gen_num_images")
    assert excluded == start_keys and not set(ref_keys) & set(start_keys)
    from dipddpm.data import load_split

    _, _, all_keys = load_split(data, "test")
    assert sorted(ref_keys + start_keys) == sorted(all_keys)
    rows = [list(all_keys).index(k) for k in ref_keys]
    np.testing.assert_array_equal(feats, split_features(clf, data, "test")[rows])
    assert res["references"]["heldout"]["n"] == len(ref_keys)


def test_front_alone_one_sampler_at_its_own_n(world, job, tmp_path):
    """The study's generation_front stages: no DIP start, one sampler. DDPM alone with no K but
    the full T-step chain gives one row, memorisation beside it; with no held-out source the
    held-out reference is the whole test split; its samples are the protocol's own (common
    random numbers): the same as the T-step DDPM row of the full protocol."""
    run_dir = tmp_path / "front"
    generate_main(job_args(world, run_dir, "protocol.gen_sources=[]",
                           "protocol.gen_samplers=[ddpm]", "protocol.gen_ddim_steps=[]"))
    res = json.loads((run_dir / "results.json").read_text())
    assert [(r["arm"], r["steps"], r["nfe"]) for r in res["arms"]] == [("ddpm", 30, 30)]
    assert res["arms"][0]["memorisation"]["features"]["test"]["median"] > 0
    assert res["sources"] == {} and res["references"]["heldout"] == {"n": 16, "excluded": []}
    assert "no held-out start images to exclude" in (run_dir / "table.md").read_text()
    for b in range(2):  # the same chains as the full protocol's T-step DDPM, batch by batch
        name = f"draws/ddpm-k30/batch-{b:05d}.pt"
        torch.testing.assert_close(torch.load(run_dir / name)["x"],
                                   torch.load(job[0] / name)["x"], rtol=0, atol=0)
    ddim = tmp_path / "ddim"
    generate_main(job_args(world, ddim, "protocol.gen_sources=[]", "protocol.gen_samplers=[ddim]",
                           "protocol.gen_ddpm=true"))
    res = json.loads((ddim / "results.json").read_text())
    # gen_ddpm adds the T-step chain to DDPM only; the memorisation goes beside the largest K
    assert [(r["arm"], r["steps"], r["memorisation"] is not None) for r in res["arms"]] == \
        [("ddim", 2, False), ("ddim", 5, True)]
    with pytest.raises(ConfigError, match="protocol.gen_samplers"):
        load_config(None, ["protocol.gen_samplers=[ddim, ddim]"])
    with pytest.raises(ConfigError, match="protocol.gen_samplers"):
        load_config(None, ["protocol.gen_samplers=[]"])
    with pytest.raises(ConfigError, match="protocol.gen_ddim_steps = \\[\\]: with no DIP source"):
        load_config(None, ["protocol.gen_sources=[]", "protocol.gen_ddim_steps=[]",
                           "protocol.gen_samplers=[ddim]"])
    from dipddpm.report.study_report import held_out
    assert held_out(res).startswith("the whole test split")  # the report's wording of it


def test_clean_control_is_the_forward_diffused_image(world, tmp_path):
    """With a model that predicts no noise, one DDIM step from x_t0 returns x_t0 / sqrt(abar):
    the clean_start rows' samples must be exactly the source images diffused to t0 with the
    protocol's per-batch noise, so their distance to the source is known to the last bit."""
    cfg = load_config("configs/generation.yaml", [
        f"protocol.gen_num_images={N}", "protocol.gen_ddim_steps=[1]", "protocol.gen_ddpm=false",
        "protocol.gen_sigma_t0s=[0.05]", "protocol.gen_steps=1", "protocol.batch_size=4",
        "protocol.gen_sources=[train, heldout]", f"run.dir={tmp_path}", *TINY_DIP,
        *world["base"]])
    _, diffusion, _ = load_trained(world["ddpm"], cfg, "cpu")
    res = generation(cfg, ZeroEps(), diffusion, torch.device("cpu"), world["clf"], tmp_path,
                     log=lambda *a: None)
    t0, _ = start_at(diffusion, 0.05)
    t = torch.full((N,), t0 - 1, dtype=torch.long)
    for source, split in (("train", "train"), ("heldout", "test")):
        clean, _ = first_images(world["data"], split, N, "protocol.gen_num_images")
        x0 = to_diffusion(torch.from_numpy(clean))
        eps = torch.cat([torch.randn((m, 1, 28, 28), generator=torch.Generator("cpu").manual_seed(
            cfg.run.seed * 1_000_003 + b)) for b, m in enumerate((4, N - 4))])
        x = (diffusion.q_sample(x0, t, eps) / diffusion.sqrt_abar[t0 - 1].float()).clamp(-1, 1)
        a = to_uint8(x).reshape(N, -1).astype(np.float64) / 255
        b = to_uint8(x0).reshape(N, -1).astype(np.float64) / 255
        expected = float(np.median(np.sqrt(((a - b) ** 2).sum(1))))
        rows = {r["arm"]: r for r in res["arms"] if r["source"] == source}
        got = rows["clean_start"]["memorisation"]["source_distance_median"]
        assert got == pytest.approx(expected, abs=1e-12) and expected > 0
        # the DIP start of the same images, same noise, is not the clean image's chain
        assert rows["dip_start"]["memorisation"]["source_distance_median"] != \
            pytest.approx(expected, abs=1e-6)
        assert rows["clean_start"]["t0"] == t0 and rows["clean_start"]["nfe"] == 1


def test_data_free_source_needs_no_image(tmp_path):
    base = [f"data.dir={tmp_path / 'no-data-here'}", f"protocol.gen_num_images={N}", *TINY_DIP]
    untrained = data_free_source(load_config(None, base), "cpu")
    again = data_free_source(load_config(None, base), "cpu")
    fitted = data_free_source(load_config(None, [*base, "protocol.gen_data_free_iters=3"]), "cpu")
    assert untrained.keys == [f"noise-{i:06d}" for i in range(N)] and untrained.clean is None
    assert (untrained.dip_source, untrained.dip_iters) == ("untrained", 0.0)
    assert (fitted.dip_source, fitted.dip_iters) == ("fitted to noise", 3.0)
    for src in (untrained, fitted):
        assert src.estimate.shape == (N, 1, 28, 28)
        assert 0 <= float(src.estimate.min()) and float(src.estimate.max()) <= 1
    torch.testing.assert_close(untrained.estimate, again.estimate, rtol=0, atol=0)
    assert not torch.equal(untrained.estimate, fitted.estimate)
    assert not torch.equal(untrained.estimate[0], untrained.estimate[1])  # one net per key


def test_fitted_estimates_are_kept_in_the_dip_cache(world, tmp_path, monkeypatch):
    import dipddpm.dip.fit as fit
    from dipddpm.protocols.generation import fit_estimates

    cfg = load_config(None, [*world["base"], *TINY_DIP, f"protocol.dip_cache={tmp_path}"])
    clean, keys = first_images(world["data"], "test", N, "protocol.gen_num_images")
    first = fit_estimates(cfg, clean, keys, "cpu")
    assert len(list(tmp_path.glob("*.pt"))) == 2  # batches of 4 and 2 nets
    monkeypatch.setattr(fit, "fit_batch", None)  # a rerun must not fit
    again = fit_estimates(cfg, clean, keys, "cpu")
    torch.testing.assert_close(first[0], again[0], rtol=0, atol=0)
    assert first[1:] == again[1:]  # iterations and the original fit's seconds per image


def test_fit_sources_only_fills_the_cache_the_generation_job_then_reads(world, tmp_path,
                                                                        monkeypatch, capsys):
    """--fit-sources-only (beside a long training): no DDPM, classifier or run dir needed;
    the generation job afterwards fits nothing, and a rerun draws nothing."""
    import dipddpm.dip.fit as fit
    import dipddpm.protocols.generation as gen_protocol
    from dipddpm.config import ConfigError

    cache, run_dir = tmp_path / "dip-cache", tmp_path / "gen"
    sources = ["protocol.gen_sources=[heldout, data_free]", "protocol.gen_data_free_iters=2"]
    with pytest.raises(ConfigError, match="protocol.dip_cache = '': --fit-sources-only"):
        generate_main(job_args(world, run_dir, *sources, "--fit-sources-only"))
    out = generate_main(job_args(world, run_dir, *sources, f"protocol.dip_cache={cache}",
                                 "protocol.checkpoint=no-such-ddpm", "--fit-sources-only"))
    assert set(out) == {"heldout", "data_free"} and not run_dir.exists()
    assert len(list(cache.glob("*.pt"))) == 4  # each source: batches of 4 and 2 nets
    assert "heldout source: 6 DIP estimates in" in capsys.readouterr().out
    monkeypatch.setattr(fit, "fit_batch", None)  # the generation job must not fit
    results = generate_main(job_args(world, run_dir, *sources, f"protocol.dip_cache={cache}"))
    assert results["sources"]["heldout"] == out["heldout"]
    draws = sorted(d.name for d in (run_dir / "draws").iterdir())
    assert "ddim-k2" in draws and "dip_start-heldout-t" in " ".join(draws)
    # a rerun (as after an interruption) reads every arm's batches back: the same rows
    monkeypatch.setattr(gen_protocol, "ddim_sample", None)
    again = generate_main(job_args(world, run_dir, *sources, f"protocol.dip_cache={cache}"))
    assert again["arms"] == results["arms"]
    # a source served from a priors dir has nothing to fit here
    assert generate_main(job_args(world, run_dir, "protocol.gen_sources=[train]",
                                  "protocol.gen_priors_dir=not-built-yet",
                                  f"protocol.dip_cache={cache}", "--fit-sources-only")) == {}


def test_fid_curve_over_a_runs_snapshots_resumes_and_finds_the_plateau(world, tmp_path,
                                                                       monkeypatch):
    import shutil

    import dipddpm.protocols.generation as gen_protocol
    from dipddpm.config import UserError
    from jobs.fid_curve import main as curve_main
    from dipddpm.report.study_report import plateau_sentence

    run = tmp_path / "train"
    shutil.copytree(world["ddpm"], run)
    payload = torch.load(run / "ema.pt", weights_only=True)
    for i, images in enumerate((16, 32, 48)):
        noisy = {k: v + 0.05 * i * torch.randn_like(v) if v.is_floating_point() else v
                 for k, v in payload["ema"]["model"].items()}
        (run / "weights").mkdir(exist_ok=True)
        torch.save({"ema": {"model": noisy}, "step": images // 8, "images_seen": images},
                   run / f"weights/ema-img-{images:012d}.pt")
    args = ["--config", "configs/generation.yaml", f"protocol.checkpoint={run}",
            "protocol.curve_num_images=6", "protocol.curve_steps=2", "protocol.batch_size=4",
            "protocol.curve_every=2", "protocol.curve_final_num_images=7",
            "protocol.curve_final_steps=3", "wandb.mode=disabled", *world["base"]]
    out = tmp_path / "curve"
    res = curve_main([*args, f"run.dir={out}"])
    assert [q["images_seen"] for q in res["points"]] == [32, 48]  # every 2nd, and the last
    assert [q["epoch"] for q in res["points"]] == [2.0, 3.0]  # 16 training images
    assert res["n"] == 6 and res["floor"]["n"] == 6 and all(q["nfe"] == 2 for q in res["points"])
    best = min(q["fid"] for q in res["points"])
    assert res["plateau"]["fid"] <= 1.1 * best
    assert (out / "fid_vs_epochs.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / res["points"][0]["grid"]).is_file()
    # the last weights again at their own N and K, with the floor at that N; kept by batch
    final = res["final"]
    assert (final["n"], final["steps"], final["nfe"], final["floor"]["n"]) == (7, 3, 3, 7)
    assert final["weights"] == res["points"][-1]["weights"] and final["epoch"] == 3.0
    assert final["fid"] != res["points"][-1]["fid"] and (out / final["grid"]).is_file()
    batches = sorted((out / "final/ema-img-000000000048").glob("batch-*.pt"))
    assert [b.name for b in batches] == ["batch-00000.pt", "batch-00001.pt"]  # 4 + 3 images
    # a draw cut short resumes inside itself: the missing batch is drawn again, the same
    batches[1].unlink()
    assert curve_main([*args, f"run.dir={out}"])["final"]["fid"] == pytest.approx(final["fid"])
    monkeypatch.setattr(gen_protocol, "ddim_sample", None)  # a rerun reads everything back
    assert curve_main([*args, f"run.dir={out}"])["points"] == res["points"]
    report_main([str(tmp_path), "wandb.mode=disabled"])
    report = (tmp_path / "REPORT.md").read_text()
    sentence = plateau_sentence(res)  # a plateau, or still falling at the last snapshot
    assert "FID vs training" in report and sentence[0].upper() + sentence[1:] + "." in report
    assert "](curve/fid_vs_epochs.png)" in report
    assert "The trained DDPM (its last weights): epoch 3.00, N = 7, DDIM 3 steps: FID " in report
    with pytest.raises(UserError, match="no weights/ema-img-"):
        curve_main([*args, f"run.dir={tmp_path / 'x'}", f"protocol.checkpoint={world['ddpm']}"])
    with pytest.raises(UserError, match="protocol.curve_final_num_images = 100000: its real-vs"):
        curve_main([*args, f"run.dir={tmp_path / 'x'}", "protocol.curve_final_num_images=100000"])
    assert not (tmp_path / "x").exists()


def test_memorisation_detects_copies_of_the_source(world):
    from dipddpm.data import load_split

    train, _, _ = load_split(world["data"], "train")
    u = torch.from_numpy(train[:N]).float().div(255).unsqueeze(1)
    mem = _memorisation(world["clf"], world["data"], to_diffusion(u), u)
    assert mem["source_match"] == 1.0 and mem["pixels"]["exact_copies"] == N
    assert mem["pixels"]["ratio_median"] == 0.0 and mem["source_distance_median"] == 0.0
    # the same samples against other images as their "sources": not theirs
    mem = _memorisation(world["clf"], world["data"], to_diffusion(u), u.flip(0))
    assert mem["source_match"] == 0.0


def test_retired_index_key_and_bad_generation_keys(world, tmp_path, capsys):
    run_dir = tmp_path / "gen"
    assert run_job(generate_main, job_args(world, run_dir, "protocol.gen_t0s=[5]")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: protocol.gen_t0s = [5]: retired")
    assert not run_dir.exists()  # nothing half-written
    with pytest.raises(ConfigError, match="protocol.gen_sources"):
        load_config(None, ["protocol.gen_sources=[train, nope]"])
    with pytest.raises(ConfigError, match="protocol.gen_sigma_t0s"):
        load_config(None, ["protocol.gen_sigma_t0s=[0.5, 0]"])
    with pytest.raises(ConfigError, match="protocol.gen_data_free_iters"):
        load_config(None, ["protocol.gen_data_free_iters=-1"])
    # a config.yaml written before the key was retired (a training run's) still loads
    old = load_config(None, []).to_dict()
    old["protocol"]["gen_t0s"] = [100, 250, 500]
    assert config_from_dict(old).protocol.gen_t0s == [100, 250, 500]


def test_report_shows_both_references_and_the_controls(job):
    run_dir, res = job
    root = run_dir.parent
    assert run_job(report_main, [str(root), f"run.dir={root / 'report'}",
                                 "wandb.mode=disabled"]) == 0
    text = (root / "REPORT.md").read_text()
    gen = text[text.index("### Generation"):]
    assert "FID vs held-out" in gen and "without the held-out start images" in gen
    row = next(r for r in res["arms"] if r["arm"] == "clean_start" and r["source"] == "heldout")
    assert f"| heldout | {row['sigma_t0']:g} ({row['sigma_t0_realised']:.3f}) " \
           f"| {row['fid_heldout']:.2f} |" in gen
    how = text[text.index("## How to read this"):text.index("## The study's tables")]
    d = min((r for r in res["arms"] if r["arm"] == "dip_start" and r["source"] == "heldout"),
            key=lambda r: r["fid_heldout"])
    assert (f"DIP start from held-out test images, FID vs train / vs held-out statistics: best "
            f"{d['fid']:.2f} / {d['fid_heldout']:.2f} (sigma_t0 {d['sigma_t0']:g}, 3 NFE + 5 DIP "
            f"iterations); ") in how
    assert "; the clean image itself at that sigma_t0 " in how
    assert "gen/fid_vs_steps.png" in text
