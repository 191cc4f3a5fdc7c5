import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dipddpm.config import load_config
from dipddpm.data import load_split, make_loader, verify_dataset
from dipddpm.data.prepare import prepare_data
from dipddpm.data.shards import MANIFEST, PARTIAL
from tests.conftest import REPO, make_idx_folder, run_module, write_idx


def prepare(src, out, *extra):
    return prepare_data(load_config(None, [f"data.source={src}", f"data.dir={out}", *extra]),
                        progress=False)


def test_shards_round_trip_and_manifest(idx_folder, tmp_path):
    out = tmp_path / "shards"
    manifest = prepare(idx_folder, out, "data.shard_size=16")
    train = manifest["splits"]["train"]
    assert train["count"] == 40 and [s["count"] for s in train["shards"]] == [16, 16, 8]
    assert train["per_class"] == {str(c): 4 for c in range(10)}
    assert verify_dataset(out) == []
    images, labels, keys = load_split(out, "train")
    with gzip.open(idx_folder / "train-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    np.testing.assert_array_equal(images, raw)
    assert labels.tolist() == [i % 10 for i in range(40)]
    assert keys[:2] == ["train-000000", "train-000001"]


def test_uncompressed_idx_and_rerun_keeps_verified_shards(tmp_path):
    src = make_idx_folder(tmp_path / "raw", compress=False)
    out = tmp_path / "shards"
    first = prepare(src, out, "data.shard_size=10")
    again = prepare(src, out, "data.shard_size=10")
    assert again["kept_shards"] == 6 and first["splits"] == again["splits"]
    # A damaged shard is detected and rebuilt byte-identically.
    victim = out / "train-000001.tar"
    victim.write_bytes(victim.read_bytes()[:-100])
    assert verify_dataset(out) == ["train-000001.tar"]
    third = prepare(src, out, "data.shard_size=10")
    assert third["kept_shards"] == 5 and verify_dataset(out) == []


def corrupt(folder, how):
    img = folder / "train-images-idx3-ubyte.gz"
    if how == "truncated":
        img.write_bytes(img.read_bytes()[:300])
    elif how == "magic":
        write_idx(folder / "train-images-idx3-ubyte", np.zeros((40, 28, 28), np.uint8), 0x801)
    elif how == "counts":
        write_idx(folder / "train-labels-idx1-ubyte", np.zeros(39, np.uint8), 0x801)
    elif how == "short-payload":
        data = gzip.decompress(img.read_bytes())[:-5]
        img.write_bytes(gzip.compress(data))


@pytest.mark.parametrize("how, needle", [
    ("truncated", "train-images-idx3-ubyte.gz: unreadable or truncated"),
    ("magic", "train-images-idx3-ubyte.gz: wrong IDX magic number 0x00000801"),
    ("counts", "train-labels-idx1-ubyte.gz: 39 labels for 40 images"),
    ("short-payload", "train-images-idx3-ubyte.gz: truncated"),
])
def test_bad_input_is_one_line_and_leaves_nothing(idx_folder, tmp_path, how, needle):
    corrupt(idx_folder, how)
    out = tmp_path / "out"
    r = run_module("jobs.prepare_data", "--source", str(idx_folder), "--out", str(out))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert not out.exists() or not any(out.glob("*.tar")) and not (out / MANIFEST).exists()


def test_missing_source_names_env_var(tmp_path, monkeypatch):
    monkeypatch.delenv("DIPDDPM_DATA", raising=False)
    r = run_module("jobs.prepare_data", "--out", str(tmp_path / "o"),
                   env={"DIPDDPM_DATA": ""})
    assert r.returncode == 2 and "DIPDDPM_DATA" in r.stderr


def test_unequal_shards_give_equal_batch_counts(idx_folder, tmp_path):
    out = tmp_path / "shards"
    prepare(idx_folder, out, "data.shard_size=7")  # train: 6 shards of 7, one of 5 -> uneven
    for epoch in range(3):
        counts, keys = [], []
        for rank in range(2):
            loader = make_loader(out, "train", 4, rank=rank, world_size=2, num_workers=2,
                                 seed=0, epoch=epoch, shuffle_buffer=8)
            batches = list(loader)
            counts.append(len(batches))
            assert len(batches) == len(loader)
            keys += [k for b in batches for k in b["key"]]
        assert counts[0] == counts[1]
        assert len(keys) == len(set(keys))  # capped, never duplicated


def test_epochs_reshuffle_and_resume_skips_exactly(idx_folder, tmp_path):
    out = tmp_path / "shards"
    prepare(idx_folder, out, "data.shard_size=10")
    order = lambda epoch, skip=0: [k for b in make_loader(
        out, "train", 4, num_workers=2, seed=3, epoch=epoch, shuffle_buffer=16,
        skip_batches=skip) for k in b["key"]]
    e0, e1 = order(0), order(1)
    assert sorted(e0) == sorted(e1) and e0 != e1 and order(0) == e0
    assert order(0, skip=3) == e0[12:]
    batch = next(iter(make_loader(out, "train", 4)))
    assert batch["image"].shape == (4, 1, 28, 28) and batch["image"].dtype.is_floating_point
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0


@pytest.mark.slow
def test_real_data_counts_and_rerun_verifies(real_data_dir, real_shards):
    manifest = json.loads((real_shards / MANIFEST).read_text())
    for split, n in (("train", 60000), ("test", 10000)):
        info = manifest["splits"][split]
        assert info["count"] == n
        assert info["per_class"] == {str(c): n // 10 for c in range(10)}
        assert len(info["shards"]) == n // 2500
    assert verify_dataset(real_shards) == []
    again = prepare(real_data_dir, real_shards)
    assert again["kept_shards"] == 28


@pytest.mark.slow
def test_killed_preparation_resumes_to_a_verified_manifest(real_data_dir, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "jobs.prepare_data", "--source",
                             str(real_data_dir), "--out", str(out), "--shard-size", "1000"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until a few shards landed, then kill hard
        partial = out / PARTIAL
        if partial.exists() and len(json.loads(partial.read_text())["shards"]) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / MANIFEST).exists()  # the dir does not look complete
    finished = len(json.loads((out / PARTIAL).read_text())["shards"])
    assert 3 <= finished < 70
    r = run_module("jobs.prepare_data", "--source", str(real_data_dir), "--out", str(out),
                   "--shard-size", "1000")
    assert r.returncode == 0, r.stderr
    assert f"{finished} of 70 shards verified and kept" in r.stdout
    assert verify_dataset(out) == [] and not (out / PARTIAL).exists()
    assert not list(out.glob(".*.tmp"))


@pytest.mark.slow
def test_exactly_once_across_two_ranks_and_two_workers(real_shards, tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "tests.scripts.epoch_keys",
           str(real_shards), "test", str(tmp_path), "64", "2"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert [x["world"] for x in ranks] == [2, 2]
    assert ranks[0]["batches"] == ranks[1]["batches"] == ranks[0]["len"]
    a, b = set(ranks[0]["keys"]), set(ranks[1]["keys"])
    assert len(ranks[0]["keys"]) == len(a) == 5000 and len(b) == 5000
    assert not a & b and len(a | b) == 10000


def test_source_from_environment(idx_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("DIPDDPM_DATA", str(idx_folder))
    manifest = prepare_data(load_config(None, [f"data.dir={tmp_path / 'env'}"]), progress=False)
    assert manifest["splits"]["test"]["count"] == 20 and verify_dataset(tmp_path / "env") == []
