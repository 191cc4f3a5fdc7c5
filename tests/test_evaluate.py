"""Evaluation: PSNR/SSIM against closed forms and an independent reference, FID/KID against
Gaussian closed forms, memorisation, and the classifier job (tiny data; real data when present)."""
import math

import numpy as np
import pytest
import torch

from dipddpm.config import load_config
from dipddpm.evaluate import (feature_stats, fid_from_features, frechet_distance, kid,
                              load_classifier, memorisation_report, nearest, psnr,
                              sample_metrics, ssim, train_classifier)
from dipddpm.evaluate.classifier import CHECKPOINT, METRICS
from dipddpm.evaluate.fid import cache_tag
from dipddpm.runs import read_json
from dipddpm.tracking import read_wandb_offline
from tests.conftest import REPO, make_shards, run_module


# ----------------------------------------------------------------------------- PSNR / SSIM

def test_psnr_identical_is_inf_or_capped_and_shift_is_closed_form():
    x = torch.rand(3, 1, 28, 28) * 0.5
    assert torch.isinf(psnr(x, x)).all()
    assert torch.equal(psnr(x, x, max_db=60.0), torch.full((3,), 60.0))
    for d in (0.01, 0.1, 0.25):
        expected = -20 * math.log10(d)  # MSE = d^2
        assert psnr(x + d, x).tolist() == pytest.approx([expected] * 3, abs=1e-4)
    # per image, not pooled: two different errors give two values
    y = x.clone()
    y[0] += 0.1
    y[1] += 0.01
    assert psnr(y, x).tolist() == pytest.approx([20.0, 40.0, math.inf], abs=1e-4)


def test_ssim_identical_is_one_and_constant_images_match_closed_form():
    x = torch.rand(2, 28, 28)
    assert ssim(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    # constant images: no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    c1 = 0.01 ** 2
    for a, b in ((0.2, 0.6), (0.5, 0.5), (0.0, 1.0)):
        got = ssim(torch.full((1, 1, 28, 28), a), torch.full((1, 1, 28, 28), b)).item()
        assert got == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-5)


def reference_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. written out window by window in numpy: the skimage recipe
    (gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)."""
    r = np.arange(11) - 5.0
    g = np.exp(-r ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            a, b = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
            cab = (w * (a - ma) * (b - mb)).sum()
            vals.append((2 * ma * mb + c1) * (2 * cab + c2)
                        / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_matches_windowed_reference_on_structured_images():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:28, 0:28] / 27.0
    clean = 0.5 + 0.4 * np.sin(6 * xx) * np.cos(4 * yy)
    noisy = np.clip(clean + rng.normal(0, 0.1, clean.shape), 0, 1)
    dark = 0.5 * clean
    for other in (noisy, dark, rng.random((28, 28))):
        got = ssim(torch.tensor(clean)[None], torch.tensor(other)[None]).item()
        assert got == pytest.approx(reference_ssim(clean, other), abs=1e-6)
    # and SSIM orders degradations the way it should
    s_noisy = ssim(torch.tensor(clean)[None], torch.tensor(noisy)[None]).item()
    s_rand = ssim(torch.tensor(clean)[None], torch.tensor(rng.random((28, 28)))[None]).item()
    assert 1.0 > s_noisy > s_rand


# ----------------------------------------------------------------------------- FID / KID

def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(500, 6))
    mu, sigma = feature_stats(a)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-8)
    # commuting (diagonal) covariances: |mu1-mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    m1, m2 = np.array([0.0, 1.0, 2.0]), np.array([3.0, 1.0, 0.0])
    want = ((m1 - m2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert frechet_distance(m1, np.diag(s1), m2, np.diag(s2)) == pytest.approx(want, rel=1e-10)
    # non-commuting full covariances: the trace term against scipy-free sqrtm by eigh of S1 S2
    q = np.linalg.qr(rng.normal(size=(4, 4)))[0]
    c1 = q @ np.diag([1.0, 2.0, 3.0, 4.0]) @ q.T
    c2 = np.diag([2.0, 1.0, 0.5, 3.0])
    ev = np.linalg.eigvals(c1 @ c2)  # real positive: similar to an SPD matrix
    want = np.trace(c1) + np.trace(c2) - 2 * np.sqrt(ev.real).sum()
    assert frechet_distance(np.zeros(4), c1, np.zeros(4), c2) == pytest.approx(want, rel=1e-10)


def test_fid_grows_with_mean_shift_and_matches_gaussian_samples():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(4000, 8))
    fids = [fid_from_features(a, rng.normal(size=(4000, 8)) + s) for s in (0.0, 0.5, 1.0, 2.0)]
    assert fids == sorted(fids)
    # shift s in all 8 dims: FID = 8 s^2 (plus the small-sample bias of the no-shift case)
    assert fids[3] == pytest.approx(8 * 4.0, rel=0.05)
    assert fids[0] < 0.1


def test_kid_unbiased_near_zero_same_distribution_and_positive_when_shifted():
    rng = np.random.default_rng(3)
    same = [kid(rng.normal(size=(300, 16)), rng.normal(size=(300, 16)), 100, 20, seed=s)[0]
            for s in range(5)]
    shifted, _ = kid(rng.normal(size=(300, 16)), rng.normal(size=(300, 16)) + 0.5, 100, 20)
    assert abs(np.mean(same)) < 0.01 < shifted


# ----------------------------------------------------------------------------- memorisation

def test_memorisation_finds_exact_copy_at_zero_and_separates_copies():
    rng = np.random.default_rng(4)
    train = rng.integers(0, 256, (300, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)
    copies = train[[7, 123, 299]]
    d, idx = nearest(copies.reshape(3, -1) / 255.0, train.reshape(300, -1) / 255.0)
    assert d.tolist() == [0.0, 0.0, 0.0] and idx.tolist() == [7, 123, 299]
    # floats on [-1,1] (the sampler's output) find the same copies
    as_float = torch.from_numpy(copies).float().div(127.5).sub(1).unsqueeze(1)
    keys = [f"train-{i:06d}" for i in range(300)]
    report = memorisation_report(as_float, train, test, train_keys=keys)
    px = report["pixels"]
    assert px["exact_copies"] == 3 and px["nearest"] == ["train-000007", "train-000123",
                                                           "train-000299"]
    assert px["samples"]["median"] < 1e-5 < px["test"]["min"]
    assert px["closer_than_test_p01"] == 1.0
    fresh = memorisation_report(rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), train, test)
    assert fresh["pixels"]["exact_copies"] == 0 and fresh["pixels"]["ratio_median"] > 0.9


# ----------------------------------------------------------------------------- classifier job

@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("tiny"), 200, 60, 100)


def test_classifier_job_caches_checkpoint_and_reuses_it(tiny_data, tmp_path):
    args = ["--config", "configs/classifier.yaml", f"data.dir={tiny_data}",
            f"run.dir={tmp_path / 'run'}", "classifier.max_steps=3", "classifier.batch_size=32",
            "classifier.floor_num_images=[20]", "classifier.kid_subset_size=10",
            "classifier.kid_num_subsets=5"]
    r = run_module("jobs.train_classifier", *args, timeout=300)
    assert r.returncode == 0, r.stderr
    folder = tiny_data / "classifier"
    metrics = read_json(folder / METRICS)
    assert metrics["steps"] == 3 and 0.0 <= metrics["test_accuracy"] <= 1.0
    assert metrics["test_images"] == 60
    results = read_json(tmp_path / "run" / "results.json")
    assert results["classifier"]["reused"] is False
    assert results["floors"][0]["n"] == 20 and results["floors"][0]["fid"] >= 0
    # the job logged its run: loss against images seen (every step here: max_steps=3 < 100
    # logs the last), the floors table, the accuracy
    w = read_wandb_offline(tmp_path / "run")
    assert w["job_type"] == "train_classifier"
    assert {"glob_name": "*", "step_metric": "images_seen"} in w["metrics"]
    assert [(h["_step"], h["images_seen"]) for h in w["history"] if "loss" in h] == [(3, 96)]
    assert w["summary"]["test_accuracy"] == metrics["test_accuracy"]
    assert any("floors" in h for h in w["history"])
    stamp = (folder / CHECKPOINT).stat().st_mtime_ns
    tag = cache_tag(metrics["sha256"])
    assert (folder / f"{tag}train-features.npy").is_file()
    assert (folder / f"{tag}train-stats.npz").is_file()

    r = run_module("jobs.train_classifier", *args, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "reusing" in r.stdout
    assert (folder / CHECKPOINT).stat().st_mtime_ns == stamp
    assert read_json(tmp_path / "run" / "results.json")["classifier"]["reused"] is True

    # a damaged checkpoint is not trusted: it is retrained, and the old caches go
    (folder / CHECKPOINT).write_bytes(b"junk")
    cfg = load_config(REPO / "configs/classifier.yaml", args[2:])
    again = train_classifier(cfg, log=lambda *a: None)
    assert again["reused"] is False
    assert not (folder / f"{tag}train-features.npy").exists() or \
        again["sha256"][:16] == metrics["sha256"][:16]
    clf = load_classifier(folder)
    assert clf.sha256 == again["sha256"]
    m = sample_metrics(clf, tiny_data, np.zeros((30, 28, 28), np.uint8), 10, 5)
    assert m["n"] == 30 and m["fid"] > 0


def test_classifier_job_bad_data_dir_is_one_line(tmp_path):
    r = run_module("jobs.train_classifier", "--config", "configs/classifier.yaml",
                   f"data.dir={tmp_path / 'nothing'}", f"run.dir={tmp_path / 'run'}")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "manifest.json" in r.stderr


def test_load_classifier_without_checkpoint_is_user_error(tmp_path):
    from dipddpm.config import UserError

    with pytest.raises(UserError, match="no verified classifier"):
        load_classifier(tmp_path)


@pytest.mark.slow
def test_classifier_on_real_shards_is_accurate_and_real_fid_is_small(real_shards, tmp_path):
    # ~100 s on 2 busy cores, most of it reading the 60k train images; 100 steps of 128
    # images already separate the classes well; the full job (2 epochs) reaches ~90%.
    from dipddpm.data import load_split

    cfg = load_config(REPO / "configs/classifier.yaml", [
        f"data.dir={real_shards}", f"classifier.dir={tmp_path / 'clf'}",
        "classifier.max_steps=100", "classifier.batch_size=128"])
    metrics = train_classifier(cfg, log=lambda *a: None)
    assert metrics["test_accuracy"] > 0.75, metrics
    clf = load_classifier(tmp_path / "clf")
    test, _, _ = load_split(real_shards, "test")
    a, b = clf.features(test[:2500]), clf.features(test[2500:5000])
    blank = clf.features(np.zeros((2500, 28, 28), np.uint8))
    real_fid, blank_fid = fid_from_features(a, b), fid_from_features(a, blank)
    # two disjoint real sets are close; real vs blank images is far
    assert 0 < real_fid < blank_fid / 20, (real_fid, blank_fid)
    assert abs(kid(a, b, 500, 10)[0]) < kid(a, blank, 500, 10)[0] / 20
