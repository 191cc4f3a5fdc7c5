"""Readers check shards against manifest.json: damaged shards and manifests are one line naming
the file and the repair command, exit 2, for training and for whole-split reads; the sha256 is
hashed once per content."""
import json
import os
import shutil

import numpy as np
import pytest

import dipddpm.data.shards as shards
from dipddpm.cli import run_job
from dipddpm.data import load_split
from dipddpm.data.idx import DataError
from dipddpm.data.shards import MANIFEST, VERIFIED, sha256_file, shard_samples
from tests.conftest import make_shards

SAMPLE_BYTES = 2560  # one sample: a cls and an npy member, each a 512-byte header + data


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """32 train images in 4 shards of 8, 8 test images in one shard."""
    return make_shards(tmp_path_factory.mktemp("pristine"), 32, 8, 8)


@pytest.fixture
def data(pristine, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(pristine, out)
    return out


def damage(path, how):
    raw = path.read_bytes()
    if how == "at_header":  # ends exactly where the 4th sample's first header starts
        path.write_bytes(raw[:3 * SAMPLE_BYTES])
    elif how == "mid_member":  # inside the 4th sample's npy data (its header ends at +1536)
        path.write_bytes(raw[:3 * SAMPLE_BYTES + 1536 + 400])
    elif how == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(len(raw)))


def wrong_sha(data, name):
    manifest = json.loads((data / MANIFEST).read_text())
    for split in manifest["splits"].values():
        for e in split["shards"]:
            if e["name"] == name:
                e["sha256"] = "0" * 64
    (data / MANIFEST).write_text(json.dumps(manifest))



def expect_one_line(err, shard, needle):
    """One error line (the training's progress bar may share stderr), no traceback."""
    assert err.count("error: ") == 1 and "Traceback" not in err, err
    line = err.split("error: ", 1)[1].split("\n", 1)[0]
    assert line.startswith(f"{shard}: ") and needle in line, err
    assert line.endswith(f"python -m jobs.prepare_data --source SRC --out {shard.parent}"), err


@pytest.mark.parametrize("how, needle", [
    ("at_header", f"{3 * SAMPLE_BYTES} bytes, manifest.json says {{size}}"),
    ("mid_member", f"{3 * SAMPLE_BYTES + 1936} bytes, manifest.json says {{size}}"),
    ("garbage", "sha256 differs from manifest.json"),
    ("wrong_sha", "sha256 differs from manifest.json"),
])
def test_damaged_shard_stops_training_and_split_reads(data, tmp_path, capsys, how, needle):
    from jobs.train import main

    shard = data / "train-000002.tar"
    needle = needle.format(size=shard.stat().st_size)
    if how == "wrong_sha":
        wrong_sha(data, shard.name)
    else:
        damage(shard, how)
    run = tmp_path / "run"
    assert run_job(main, ["--config", "configs/ddpm_tiny.yaml", f"run.dir={run}",
                          f"data.dir={data}", "wandb.mode=disabled", "train.max_steps=2"]) == 2
    expect_one_line(capsys.readouterr().err, shard, needle)
    assert not (run / "checkpoints").exists()
    # a whole-split read (restoration, fit_dip, the classifier, jobs.sample from t0)
    with pytest.raises(DataError) as e:
        load_split(data, "train")
    expect_one_line(f"error: {e.value}\n", shard, needle)
    assert load_split(data, "test")[0].shape == (8, 28, 28)  # the other split is fine


@pytest.mark.parametrize("how, needle", [
    ("at_header", "3 samples, manifest.json says 8"),
    ("mid_member", "not a readable tar after 3 samples (unexpected end of data)"),
    ("garbage", "not a readable tar after 0 samples (invalid header)"),
])
def test_reading_counts_samples_and_names_tar_errors(data, how, needle):
    """Beneath the size and sha256 checks (a manifest that agrees with a damaged file), reading
    itself checks each shard's sample count and turns tar errors into the same one line."""
    shard = data / "test-000000.tar"
    damage(shard, how)
    [entry] = json.loads((data / MANIFEST).read_text())["splits"]["test"]["shards"]
    with pytest.raises(DataError) as e:
        list(shard_samples(data, [entry], "HINT"))
    assert str(e.value) == f"{shard}: {needle}; HINT"


def test_short_shard_in_a_loader_worker_is_one_line(data, tmp_path, capsys):
    """A manifest that agrees with a shard cut at a member boundary (sha256 and size of the cut
    file): training reads it in a dataloader worker and still stops with one line."""
    from jobs.train import main

    shard = data / "train-000001.tar"
    damage(shard, "at_header")
    manifest = json.loads((data / MANIFEST).read_text())
    for e in manifest["splits"]["train"]["shards"]:
        if e["name"] == shard.name:
            e.update(sha256=sha256_file(shard), bytes=shard.stat().st_size)
    (data / MANIFEST).write_text(json.dumps(manifest))
    assert run_job(main, ["--config", "configs/ddpm_tiny.yaml", f"run.dir={tmp_path / 'run'}",
                          f"data.dir={data}", "wandb.mode=disabled", "data.num_workers=1",
                          "train.epochs=1"]) == 2
    expect_one_line(capsys.readouterr().err, shard, "3 samples, manifest.json says 8")


@pytest.mark.parametrize("text, needle", [
    ("garbage", "not valid JSON"),
    ('{"splits": {"train": {"shards": [{"name": "train-000000.tar"}]}}}',
     "not a dataset manifest (splits.train.shards[0] is not a shard entry"),
    ("[1, 2]", "not a dataset manifest (no 'splits' mapping)"),
])
def test_bad_manifest_is_one_line(data, text, needle):
    (data / MANIFEST).write_text(text)
    with pytest.raises(DataError) as e:
        load_split(data, "test")
    msg = str(e.value)
    assert msg.startswith(f"{data / MANIFEST}: {needle}") and "\n" not in msg
    assert msg.endswith(f"python -m jobs.prepare_data --source SRC --out {data}")


def test_sha256_is_hashed_once_per_content(data, monkeypatch):
    # prepare_data records the shards it hashed, so the first reader need not hash them again
    recorded = json.loads((data / VERIFIED).read_text())
    assert len(recorded) == 5 and recorded["test-000000.tar"][2] == sha256_file(
        data / "test-000000.tar")
    calls = []
    real = shards.sha256_file
    monkeypatch.setattr(shards, "sha256_file", lambda p: calls.append(p.name) or real(p))
    (data / VERIFIED).unlink()  # start from nothing
    monkeypatch.setattr(shards, "_VERIFIED", {})
    load_split(data, "test")
    assert calls == ["test-000000.tar"]
    load_split(data, "test")  # the same process: remembered
    monkeypatch.setattr(shards, "_VERIFIED", {})
    load_split(data, "test")  # another process: data.dir/.verified.json
    assert calls == ["test-000000.tar"]
    os.utime(data / "test-000000.tar")  # touched: hashed again (and still fine)
    load_split(data, "test")
    assert calls == ["test-000000.tar"] * 2


def test_priors_readers_check_their_tars(tmp_path):
    """The priors of a shard (dipddpm/dip/priors.py) are read with the same checks."""
    from dipddpm.dip.priors import MANIFEST as PRIORS_MANIFEST, _write_prior_tar, load_priors

    n, keys = 4, [f"test-{i:06d}" for i in range(4)]
    part = {k: np.zeros((n, 1, 28, 28), np.float32) for k in ("x0_hat", "obs", "mask")}
    part.update(iters=np.arange(n), psnr_obs=np.ones(n), psnr_clean=np.ones(n),
                noisy_psnr=np.ones(n))
    tar = tmp_path / "test-000000.tar"
    _write_prior_tar(tar, keys, part)
    (tmp_path / PRIORS_MANIFEST).write_text(json.dumps(
        {"shards": [{"name": tar.name, "count": n, "sha256": sha256_file(tar)}]}))
    assert load_priors(tmp_path)["key"] == keys
    tar.write_bytes(tar.read_bytes()[:5000])
    with pytest.raises(DataError, match=f"{tar}: sha256 differs from manifest.json; recompute: "
                                        "rerun python -m jobs.precompute_priors"):
        load_priors(tmp_path)
    (tmp_path / PRIORS_MANIFEST).write_text("{}")
    with pytest.raises(DataError, match="not a priors manifest"):
        load_priors(tmp_path)
