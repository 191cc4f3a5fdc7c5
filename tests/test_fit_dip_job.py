"""jobs.fit_dip end to end: tiny nets, few images and iterations, real files out."""
import json
import shutil

import numpy as np
import pytest

from dipddpm.config import ConfigError
from tests.conftest import make_shards, run_module

KEYS = {"iters", "psnr_mean", "psnr_std", "noisy_psnr", "oracle_psnr", "oracle_raw_psnr",
        "es_wmv_psnr", "es_wmv_ema_psnr", "es_wmv_iters", "es_wmv_cost_iters", "es_wmv_decided",
        "budget_psnr"}
TINY = ["dip.channels_down=8", "dip.channels_up=8", "dip.channels_skip=2", "dip.num_images=3",
        "dip.iters=6", "dip.record_every=2", "dip.batch_size=2", "dip.es_window=2",
        "dip.es_patience=2"]


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("dipdata"), 10, 10, 5)


def _check_run(run_dir, n, iters, every, sigmas=("25", "50")):
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results) == {"sigma", "num_images"} and results["num_images"] == n
    assert list(results["sigma"]) == list(sigmas)
    marks = list(range(every, iters + 1, every))
    for entry in results["sigma"].values():
        assert set(entry) == KEYS
        assert entry["iters"] == marks
        assert len(entry["psnr_mean"]) == len(entry["psnr_std"]) == len(marks)
        assert all(np.isfinite(entry["psnr_mean"])) and min(entry["psnr_std"]) >= 0
        assert entry["oracle_psnr"] >= max(entry["psnr_mean"]) - 1e-9
        assert entry["budget_psnr"] == pytest.approx(entry["psnr_mean"][-1])
        # ES-WMV (window 2, patience 2) decides after the budget here: the nets ran on for it
        assert 0 <= entry["es_wmv_decided"] <= n
        assert entry["es_wmv_cost_iters"] >= entry["es_wmv_iters"]
        assert iters <= entry["es_wmv_cost_iters"] <= iters + 2
    # more noise -> a worse observation
    s = results["sigma"]
    if "25" in s and "50" in s:
        assert s["25"]["noisy_psnr"] > s["50"]["noisy_psnr"] + 3
    table = (run_dir / "table.md").read_text()
    assert "6.71" in table and "8.79" in table and f"N = {n}" in table
    assert (run_dir / "psnr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return results


def test_fit_dip_writes_table_plot_results_and_wandb(small_shards, tmp_path, monkeypatch):
    from jobs.fit_dip import main
    from dipddpm.tracking import read_wandb_offline

    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    main(["--config", "configs/dip_denoise.yaml", f"run.dir={run_dir}",
          f"data.dir={small_shards}", *TINY])
    _check_run(run_dir, 3, 6, 2)
    history = read_wandb_offline(run_dir)["history"]
    steps = [h for h in history if "psnr/sigma25" in h]
    assert [h["_step"] for h in steps] == [2, 4, 6]
    results = json.loads((run_dir / "results.json").read_text())
    assert steps[-1]["psnr/sigma50"] == pytest.approx(results["sigma"]["50"]["psnr_mean"][-1])


@pytest.mark.slow
def test_fit_dip_on_real_images(real_shards, tmp_path):
    run_dir = tmp_path / "real"
    r = run_module("jobs.fit_dip", "--config", "configs/dip_denoise.yaml", f"run.dir={run_dir}",
                   f"data.dir={real_shards}", "wandb.mode=disabled", "dip.sigmas=[25]",
                   "dip.num_images=2", "dip.iters=4", "dip.record_every=2", "dip.batch_size=2",
                   "dip.es_window=2", "dip.es_patience=2")  # ES-WMV runs on at most 2 more
    assert r.returncode == 0, r.stderr[-2000:]
    results = _check_run(run_dir, 2, 4, 2, sigmas=("25",))
    # the first real test images at sigma 25: clipping makes the noisy input ~21.9 dB
    assert 20.5 < results["sigma"]["25"]["noisy_psnr"] < 23.5


@pytest.mark.parametrize("override, names", [
    ("dip.num_images=0", "dip.num_images"),
    ("dip.scales=6", "dip.scales"),
    ("dip.num_images=11", "dip.num_images = 11"),  # more than the split holds
])
def test_bad_input_is_one_line_and_exit_2(small_shards, tmp_path, override, names):
    r = run_module("jobs.fit_dip", f"run.dir={tmp_path / 'r'}", f"data.dir={small_shards}",
                   "wandb.mode=disabled", override, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and names in lines[0] and "Traceback" not in r.stderr


def test_rerun_loads_finished_batches_and_refits_changed_ones(small_shards, tmp_path):
    from jobs.fit_dip import main

    run_dir = tmp_path / "run"
    argv = ["--config", "configs/dip_denoise.yaml", f"run.dir={run_dir}",
            f"data.dir={small_shards}", "wandb.mode=disabled", "dip.sigmas=[25]", *TINY]
    main(argv)
    first = (run_dir / "results.json").read_text()
    batches = sorted((run_dir / "batches" / "sigma25").glob("*.npz"))
    assert [b.name for b in batches] == ["000000-000002.npz", "000002-000003.npz"]
    stamps = {b: b.stat().st_mtime_ns for b in batches}
    # a half-written batch file is never loaded: it is refitted
    batches[1].write_bytes(b"not an npz")
    main(argv)
    assert (run_dir / "results.json").read_text() == first
    assert batches[0].stat().st_mtime_ns == stamps[batches[0]]  # loaded, not refitted
    assert batches[1].read_bytes()[:2] == b"PK"
    # other settings in the same run dir: refused before anything is touched
    with pytest.raises(ConfigError, match="dip.lr = 0.01 there, 0.02 now"):
        main(argv + ["dip.lr=0.02"])
    assert batches[0].stat().st_mtime_ns == stamps[batches[0]]
    # batches carried into a new run dir under other settings make other numbers: not reused
    other = tmp_path / "other"
    shutil.copytree(run_dir / "batches", other / "batches")
    main([a.replace(str(run_dir), str(other)) for a in argv] + ["dip.lr=0.02"])
    for b in batches:
        assert (other / "batches" / "sigma25" / b.name).read_bytes() != b.read_bytes()
    assert (other / "results.json").read_text() != first
