import json
import signal
import subprocess
import sys
import time

import pytest

from dipddpm.config import load_config
from dipddpm.data import load_split
from dipddpm.data.shards import sha256_file
from dipddpm.dip.priors import READS, load_priors, precompute
from dipddpm.runs import check_run_dir, prepare_run_dir
from tests.conftest import REPO, make_shards, run_module

# A small net keeps these tests quick; the study's net is the default of configs/priors.yaml.
SMALL = ["dip.channels_down=8", "dip.channels_up=8", "dip.iters=6", "dip.batch_size=2",
         "wandb.mode=disabled", "priors.name=small"]


@pytest.fixture
def data_dir(tmp_path):
    return make_shards(tmp_path, 16, 16, 8)


def cfg_for(data_dir, tmp_path, *extra):
    return load_config("configs/priors.yaml", [f"data.dir={data_dir}",
                                               f"run.dir={tmp_path / 'run'}", *SMALL, *extra])


def test_priors_have_the_shard_keys_and_a_manifest(data_dir, tmp_path):
    result = precompute(cfg_for(data_dir, tmp_path), progress=False)
    assert [e["name"] for e in result["shards"]] == ["test-000000.tar", "test-000001.tar"]
    assert result["manifest"]["count"] == 16
    priors = load_priors(data_dir / "priors" / "small")
    _, _, keys = load_split(data_dir, "test")
    assert priors["key"] == keys
    assert priors["x0_hat"].shape == (16, 1, 28, 28)
    assert 0 <= priors["x0_hat"].min() and priors["x0_hat"].max() <= 1
    assert (priors["iters"] == 6).all()
    # The observation is the seeded degradation of the clean image: noisy PSNR ~ 20 dB at sigma 25
    assert 18 < priors["noisy_psnr"].mean() < 23
    again = precompute(cfg_for(data_dir, tmp_path), progress=False)
    assert all(e["skipped"] for e in again["shards"])


def test_one_shard_then_the_other_merge_into_one_manifest(data_dir, tmp_path):
    precompute(cfg_for(data_dir, tmp_path, "priors.shard=1"), progress=False)
    m = precompute(cfg_for(data_dir, tmp_path, "priors.shard=0"), progress=False)["manifest"]
    assert [e["name"] for e in m["shards"]] == ["test-000000.tar", "test-000001.tar"]


def test_changed_settings_recompute(data_dir, tmp_path):
    precompute(cfg_for(data_dir, tmp_path, "priors.shard=0"), progress=False)
    r = precompute(cfg_for(data_dir, tmp_path, "priors.shard=0", "dip.iters=3"), progress=False)
    assert not r["shards"][0]["skipped"] and r["shards"][0]["iters_mean"] == 3


def test_the_batch_size_changes_no_prior(data_dir, tmp_path):
    """dip.batch_size (nets fitted at once) is neutral: other batches give the same priors up
    to float rounding, and a rerun into the same run dir may change it."""
    out = data_dir / "priors" / "small"
    cfg = cfg_for(data_dir, tmp_path, "priors.shard=0")
    prepare_run_dir(cfg, reads=READS)
    precompute(cfg, progress=False)
    in_twos = load_priors(out)
    for p in (out / "test-000000.tar", out / "entries/test-000000.json"):
        p.unlink()
    cfg = cfg_for(data_dir, tmp_path, "priors.shard=0", "dip.batch_size=5")
    assert check_run_dir(cfg, READS) == {"dip.batch_size": [2, 5]}
    r = precompute(cfg, progress=False)
    in_fives = load_priors(out)
    assert not r["shards"][0]["skipped"] and in_fives["key"] == in_twos["key"]
    assert (in_fives["iters"] == in_twos["iters"]).all()
    # float rounding of another batch's grouped convolutions, grown over Adam's steps
    assert abs(in_fives["x0_hat"] - in_twos["x0_hat"]).max() < 1e-3
    assert abs(in_fives["psnr_clean"] - in_twos["psnr_clean"]).max() < 0.01  # dB


def test_bad_shard_index_is_one_line(data_dir, tmp_path):
    r = run_module("jobs.precompute_priors", f"data.dir={data_dir}", f"run.dir={tmp_path}/r",
                   "shard=7", *SMALL)
    assert r.returncode == 2
    assert r.stderr.strip().endswith("priors.shard = 7: the test split of "
                                     f"{data_dir} has 2 shards")


@pytest.mark.slow
def test_killed_task_resumes_after_the_last_batch(data_dir, tmp_path):
    args = [f"data.dir={data_dir}", "shard=0", *SMALL, "dip.iters=20", "dip.batch_size=2"]
    partial = data_dir / "priors" / "small" / ".partial" / "test-000000"
    proc = subprocess.Popen([sys.executable, "-m", "jobs.precompute_priors",
                             f"run.dir={tmp_path}/a", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (partial / "000002-000004.npz").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (partial / "000000-000002.npz").exists()
    tar = data_dir / "priors" / "small" / "test-000000.tar"
    assert not tar.exists()  # nothing complete-looking after the kill
    r = run_module("jobs.precompute_priors", f"run.dir={tmp_path}/b", *args)
    assert r.returncode == 0, r.stderr
    entry = json.loads((data_dir / "priors/small/entries/test-000000.json").read_text())
    assert entry["fitted_images"] <= 4  # at least the first two batches were reused
    resumed = sha256_file(tar)
    # An uninterrupted run from scratch writes the same bytes.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for p in data_dir.glob("*.tar"):
        (fresh / p.name).write_bytes(p.read_bytes())
    (fresh / "manifest.json").write_bytes((data_dir / "manifest.json").read_bytes())
    r = run_module("jobs.precompute_priors", f"run.dir={tmp_path}/c",
                   *[a.replace(str(data_dir), str(fresh)) for a in args])
    assert r.returncode == 0, r.stderr
    assert sha256_file(fresh / "priors/small/test-000000.tar") == resumed
    assert not partial.exists()


def test_a_rerun_logs_each_shard_once(data_dir, tmp_path):
    """A rerun (after a requeue, or of a finished task) keeps the shard lines there are."""
    from dipddpm.runs import read_jsonl
    from jobs.precompute_priors import main

    argv = ["--config", "configs/priors.yaml", f"data.dir={data_dir}", f"run.dir={tmp_path}/r",
            *SMALL]
    main(argv)
    first = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert [(m["step"], m["shard"], m["skipped"]) for m in first] == \
        [(0, "test-000000.tar", False), (1, "test-000001.tar", False)]
    main(argv)
    assert read_jsonl(tmp_path / "r" / "metrics.jsonl") == first
