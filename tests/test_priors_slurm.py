"""The DIP-prior job as a real SLURM array over real FashionMNIST shards."""
import gzip

import numpy as np
import pytest

from dipddpm.config import load_config
from dipddpm.data.prepare import prepare_data
from dipddpm.data.shards import sha256_file
from dipddpm.dip.priors import load_priors
from dipddpm.launch.plan import make_plan
from dipddpm.launch.status import wait
from dipddpm.launch.submit import submit
from dipddpm.runs import read_json
from tests.conftest import REPO, write_idx


def real_subset(src, dst, n):
    """The first n real test images (and n train images) as IDX files."""
    dst.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        with gzip.open(src / f"{prefix}-images-idx3-ubyte.gz") as f:
            images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n]
        with gzip.open(src / f"{prefix}-labels-idx1-ubyte.gz") as f:
            labels = np.frombuffer(f.read(), np.uint8, offset=8)[:n]
        write_idx(dst / f"{prefix}-images-idx3-ubyte", images, 0x803)
        write_idx(dst / f"{prefix}-labels-idx1-ubyte", labels, 0x801)
    return dst


@pytest.mark.slow
def test_priors_array_over_real_shards_verifies(slurm_cluster, real_data_dir, tmp_path):
    data = tmp_path / "data"
    prepare_data(load_config(None, [f"data.source={real_subset(real_data_dir, tmp_path / 'idx', 16)}",
                                    f"data.dir={data}", "data.shard_size=4"]), progress=False)
    plan = make_plan("precompute_priors", str(REPO / "configs/priors.yaml"), array="shards",
                     name="priors", overrides=[
                         f"data.dir={data}", f"launch.folder={tmp_path / 'subs'}",
                         "launch.mem_gb=0.5", "wandb.mode=disabled", "priors.name=small",
                         "dip.channels_down=8", "dip.channels_up=8", "dip.iters=5"])
    assert [t.values for t in plan.tasks] == [{"priors.shard": k} for k in range(4)]
    record, jobs = submit(plan, "slurm")
    assert len({j.job_id.split("_")[0] for j in jobs}) == 1
    assert wait(record, timeout_s=240) == ["COMPLETED"] * 4
    out = data / "priors" / "small"
    manifest = read_json(out / "manifest.json")
    assert [e["name"] for e in manifest["shards"]] == [f"test-{k:06d}.tar" for k in range(4)]
    assert all(sha256_file(out / e["name"]) == e["sha256"] for e in manifest["shards"])
    priors = load_priors(out)
    assert priors["key"] == [f"test-{i:06d}" for i in range(16)]
    assert np.isfinite(priors["psnr_clean"]).all() and (priors["iters"] == 5).all()
