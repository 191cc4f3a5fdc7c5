"""The training job end to end on CPU: exact resume, two real processes, W&B read back, sampling."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dipddpm.config import load_config
from dipddpm.runs import read_jsonl
from dipddpm.tracking import read_wandb_offline
from dipddpm.train.loop import lr_at
from tests.conftest import REPO, make_shards, run_module

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny nets on a shared 2-core box: 1 thread is faster
TINY = ["--config", "configs/ddpm_tiny.yaml"]


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    """64 train images in 4 shards of 16 (8 batches of 8 per epoch), 16 test images."""
    return make_shards(tmp_path_factory.mktemp("tiny"), 64, 16, 16)


def train(run_dir, data_dir, *overrides, wandb="disabled"):
    r = run_module("jobs.train", *TINY, f"run.dir={run_dir}", f"data.dir={data_dir}",
                   f"wandb.mode={wandb}", *overrides, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def losses(run_dir):
    return [(r["step"], r["images_seen"], r["loss"], r["lr"], r.get("partial", False))
            for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if "loss" in r]


def file_hash(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# log every 2 steps, checkpoint every 2 steps, 4 steps per epoch (grad_accum 2): the stop at
# step 3 falls mid log interval and mid epoch, and the full run crosses two epoch boundaries.
RUN = ["train.grad_accum=2", "train.log_every_images=32", "train.checkpoint_every_images=32",
       "train.keep_checkpoints=2", "train.lr_schedule=cosine", "train.warmup_images=40"]


@pytest.fixture(scope="module")
def full_run(tiny_shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("full") / "run"
    train(run, tiny_shards, *RUN, "train.max_steps=10", "train.weights_every_images=48")
    return run


def test_weights_are_kept_at_every_multiple_and_the_last_is_the_final(full_run):
    # 16 images a step, 10 steps: multiples of 48 are crossed at 48, 96 and 144 images
    kept = sorted(p.name for p in (full_run / "weights").iterdir())
    assert kept == [f"ema-img-{n:012d}.pt" for n in (48, 96, 144)]
    snap = torch.load(full_run / "weights" / kept[-1], weights_only=True)
    final = torch.load(full_run / "ema.pt", weights_only=True)
    assert snap["images_seen"] == 144 and final["images_seen"] == 160
    assert snap["model_name"] == "unet-tiny"
    differs = [not torch.equal(a, b) for a, b in zip(snap["ema"]["model"].values(),
                                                     final["ema"]["model"].values())]
    assert any(differs)  # a snapshot is that point's weights, not the final ones


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run_exactly(full_run, tiny_shards, tmp_path):
    run = tmp_path / "run"
    train(run, tiny_shards, *RUN, "train.max_steps=3")
    stopped = losses(run)
    assert stopped[-1][0] == 3 and stopped[-1][4]  # a partial log line at the stop
    r = train(run, tiny_shards, *RUN, "train.max_steps=10")
    assert "resumed from img-000000000048" in r.stdout

    expected = losses(full_run)
    assert [row[0] for row in expected] == [2, 4, 6, 8, 10]
    assert losses(run) == expected  # bit-exact floats, and the stop's partial line is gone
    assert len({row[3] for row in expected}) > 1  # the cosine schedule moved the lr
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["img-000000000128", "img-000000000160"]  # the last K=2
    for name in ckpts:
        for f in ("model.safetensors", "ema.pt"):
            a, b = run / "checkpoints" / name / f, full_run / "checkpoints" / name / f
            if f == "model.safetensors":
                assert file_hash(a) == file_hash(b)
            else:
                sa, sb = (torch.load(p, weights_only=True)["ema"]["model"] for p in (a, b))
                assert all(torch.equal(sa[k], sb[k]) for k in sa)
    state = json.loads((run / "checkpoints" / ckpts[-1] / "train_state.json").read_text())
    assert state == {**state, "step": 10, "images_seen": 160, "epoch": 2, "batch_in_epoch": 4}
    assert (run / "ema.pt").exists() and list((run / "samples").glob("img-*.png"))


@pytest.mark.slow
def test_two_real_processes_split_the_data_and_agree(real_shards, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "jobs.train", *TINY, f"run.dir={run}", f"data.dir={real_shards}",
           "wandb.mode=offline", "train.max_steps=3", "train.rank_debug=true",
           "train.log_every_images=16", "data.num_workers=1"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, **ONE_THREAD, "ACCELERATE_USE_CPU": "true"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout

    states = [json.loads((run / "debug" / f"state-rank{i}.json").read_text()) for i in (0, 1)]
    assert [s["world"] for s in states] == [2, 2] and [s["step"] for s in states] == [3, 3]
    assert states[0]["model"] == states[1]["model"] and states[0]["ema"] == states[1]["ema"]
    keys = []
    for i in (0, 1):
        lines = (run / "debug" / f"keys-rank{i}.txt").read_text().split("\n")
        keys.append([k for line in lines if line for k in line.split()[1:]])
    assert len(keys[0]) == len(keys[1]) == 3 * 8
    assert not set(keys[0]) & set(keys[1]) and len(set(keys[0])) == 24
    assert all(k.startswith("train-") for k in keys[0] + keys[1])

    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert [(r["step"], r["images_seen"]) for r in rows] == [(1, 16), (2, 32), (3, 48)]
    history = read_wandb_offline(run)["history"]
    logged = {h["_step"]: h["loss"] for h in history if "loss" in h}
    assert logged == {r["step"]: r["loss"] for r in rows}
    assert any("samples" in h for h in history)  # the grid went to W&B as an image too


def accelerate_launch(run_dir, data_dir, launcher_precision, *overrides):
    """A real `accelerate launch --mixed_precision P -m jobs.train` of one process on CPU."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
           "--num_machines", "1", "--mixed_precision", launcher_precision,
           "--dynamo_backend", "no", "-m", "jobs.train", *TINY, f"run.dir={run_dir}",
           f"data.dir={data_dir}", "wandb.mode=disabled", "train.max_steps=2", *overrides]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, **ONE_THREAD, "ACCELERATE_USE_CPU": "true"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r, json.loads((Path(run_dir) / "results.json").read_text())


@pytest.mark.slow
def test_the_launchers_mixed_precision_holds_unless_the_config_sets_one(tiny_shards, tmp_path):
    r, results = accelerate_launch(tmp_path / "launcher", tiny_shards, "bf16")
    assert results["mixed_precision"] == "bf16"
    assert "warning" not in r.stdout + r.stderr
    saved = load_config(tmp_path / "launcher" / "config.yaml")
    assert saved.train.mixed_precision is None  # the run dir records "the launcher's"

    r, results = accelerate_launch(tmp_path / "config", tiny_shards, "bf16",
                                   "train.mixed_precision=no")
    assert results["mixed_precision"] == "no"
    warnings = [line for line in (r.stdout + r.stderr).splitlines() if "mixed_precision" in line]
    assert warnings == ["warning: train.mixed_precision = no (config) holds over the "
                        "launcher's bf16 (ACCELERATE_MIXED_PRECISION)"]


def test_fewer_processes_than_launched_fails_loudly():
    torchrun = Path(sys.executable).with_name("torchrun")
    r = subprocess.run([str(torchrun), "--nproc_per_node", "2", "tests/scripts/plain_accelerator.py"],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, **ONE_THREAD})
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "WORLD_SIZE=2 but Accelerate sees 1 process(es)" in out
    assert "trained alone" not in out


def test_sample_job_from_noise_and_from_t0(full_run, tiny_shards, capsys):
    from dipddpm.cli import run_job
    from jobs.sample import main

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        common = [*TINY, f"run.dir={full_run}", f"data.dir={tiny_shards}", "sample.num_images=5",
                  "sample.batch_size=3"]
        assert run_job(main, [*common, "sample.steps=3"]) == 0
        out = np.load(full_run / "samples" / "ddim-3steps-eta0-t050-n5.npz")
        assert out["images"].shape == (5, 28, 28) and out["images"].dtype == np.uint8
        assert out["nfe"].tolist() == [3, 3]
        assert (full_run / "samples" / "ddim-3steps-eta0-t050-n5.png").stat().st_size > 0

        assert run_job(main, [*common, "sample.sampler=ddpm", "sample.t0=4"]) == 0
        res = json.loads((full_run / "samples" / "ddpm-4steps-eta0-t04-n5.json").read_text())
        assert res["nfe_per_sample"] == 4 and res["model"] == "unet-tiny"
        assert res["weights"] == str(full_run / "ema.pt")
        capsys.readouterr()

        assert run_job(main, [*common, "sample.t0=51"]) == 2
        err = capsys.readouterr().err
        assert "sample.t0 = 51" in err and err.count("\n") == 1
        assert run_job(main, [*common, f"sample.checkpoint={full_run}/nothing"]) == 2
        assert "no EMA weights here" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def test_sample_job_logs_its_run_and_under_slurm_prints_few_progress_lines(full_run, tiny_shards,
                                                                          tmp_path):
    out = tmp_path / "drawn"
    r = run_module("jobs.sample", *TINY, f"run.dir={out}", f"sample.checkpoint={full_run}",
                   f"data.dir={tiny_shards}", "sample.num_images=6", "sample.batch_size=2",
                   "sample.sampler=ddpm", "wandb.mode=offline",
                   env={**ONE_THREAD, "SLURM_JOB_ID": "123"})
    assert r.returncode == 0, r.stderr[-3000:]
    # 3 batches x 50 ancestral steps on one bar; under SLURM a line at most every 30 s (and
    # at the start and the end), never tqdm's redraws: no carriage returns in the log
    lines = [ln for ln in r.stderr.splitlines() if "sample ddpm-50steps" in ln]
    assert 2 <= len(lines) <= 4 and "150/150" in lines[-1], r.stderr
    assert "\r" not in r.stderr
    tag = out / "samples" / "ddpm-50steps-eta0-t050-n6"
    w = read_wandb_offline(tag)
    assert w["job_type"] == "sample" and w["config"]["sample"]["num_images"] == 6
    assert [(h["_step"], h["images"], h["nfe"]) for h in w["history"] if "images" in h] == \
        [(0, 2, 50), (1, 4, 50), (2, 6, 50)]
    assert w["summary"]["nfe_per_sample"] == 50 and "samples" in w["history"][-1]
    assert [row["images"] for row in read_jsonl(tag / "metrics.jsonl")] == [2, 4, 6]


def test_lr_schedule_counts_images():
    cfg = load_config(None, ["train.lr=1e-3", "train.warmup_images=1000", "train.lr_schedule=cosine"])
    assert lr_at(500, cfg, 10_000) == pytest.approx(0.5e-3 * 0.5 * (1 + np.cos(np.pi * 0.05)))
    assert lr_at(5_000, cfg, 10_000) == pytest.approx(0.5e-3)
    assert lr_at(20_000, cfg, 10_000) == 0.0
    cfg = load_config(None, ["train.lr=1e-3", "train.warmup_images=0"])
    assert lr_at(0, cfg, 10_000) == 1e-3


def test_ema_decay_warms_up_and_the_ema_follows():
    from dipddpm.train.ema import EMA
    from dipddpm.train.loop import ema_decay_at

    t = load_config(None, ["train.ema_decay=0.999", "train.ema_start_images=100"]).train
    assert ema_decay_at(0, 50, t) == 0.0
    assert ema_decay_at(0, 100, t) == pytest.approx(0.1)
    assert ema_decay_at(150, 10_000, t) == pytest.approx(151 / 160)
    assert ema_decay_at(100_000, 10**8, t) == 0.999
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, 0.9)
    before = ema.model.weight.clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    assert torch.allclose(ema.model.weight, before + 0.1)
    ema.update(net, 0.0)
    assert torch.equal(ema.model.weight, net.weight)


def test_fast_cpu_path_keeps_the_loss_curve_and_resumes(full_run, tiny_shards, tmp_path):
    """channels_last + fused AdamW (+ auto precision, fp32 where bf16 is not native) trains the
    plain run's model: same batches, losses within rounding, step by step; and a run stopped
    on the plain layout and optimizer resumes on the fast ones (both are neutral keys; the
    precision is a result key, so it is the same in both parts)."""
    from dipddpm.precision import native_bf16

    auto = "train.mixed_precision=auto"
    fast = ["train.channels_last=true", "train.optimizer_impl=fused"]
    run = tmp_path / "fast"
    train(run, tiny_shards, *RUN, "train.max_steps=3", auto)  # plain, stopped mid-run
    train(run, tiny_shards, *RUN, "train.max_steps=10", auto, *fast)
    plain, quick = losses(full_run), losses(run)
    assert [r[:2] for r in quick] == [r[:2] for r in plain]
    a, b = np.array([r[2] for r in plain]), np.array([r[2] for r in quick])
    tol = 0.05 if native_bf16("cpu") else 1e-3
    assert np.all(np.abs(a - b) <= tol * a), (a, b)
    results = json.loads((run / "results.json").read_text())
    assert results["mixed_precision"] == ("bf16" if native_bf16("cpu") else "no")


def test_bf16_autocast_keeps_the_loss_curve_of_fp32(full_run, tiny_shards, tmp_path):
    """The mixed-precision fast path trains the same model: same batches, same t and noise,
    losses within bf16's rounding of the fp32 run's, step by step."""
    run = tmp_path / "bf16"
    train(run, tiny_shards, *RUN, "train.max_steps=10", "train.mixed_precision=bf16")
    fp32, bf16 = losses(full_run), losses(run)
    assert [r[:2] for r in bf16] == [r[:2] for r in fp32]  # same steps, same images
    a, b = np.array([r[2] for r in fp32]), np.array([r[2] for r in bf16])
    assert np.all(np.abs(a - b) <= 0.05 * a), (a, b)
    assert not np.array_equal(a, b)  # it did run in bf16


def test_a_resume_on_an_epoch_boundary_logs_every_line_once(tiny_shards, tmp_path):
    """Checkpoints every epoch (64 images, 8 steps): the epoch line of step 8 is written while
    step 9 runs, after checkpoint 8. A kill during the save of checkpoint 10 leaves its .tmp
    folder; the rerun resumes from 8, cuts what came after it, and logs each line once: with
    the rows count the checkpoint records, and from a checkpoint written before it did."""
    run = tmp_path / "run"
    train(run, tiny_shards, "train.max_steps=10", "train.sample_num_images=0")
    first = read_jsonl(run / "metrics.jsonl")
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["img-000000000064", "img-000000000080"]
    state_file = ckpts / "img-000000000064" / "train_state.json"
    timing = ("img_per_s", "epoch_time_s")
    for recorded in (True, False):
        (ckpts / "img-000000000080").rename(ckpts / ".tmp-img-000000000080")  # killed mid-save
        if not recorded:  # as written before train_state.json held metrics_rows
            state = json.loads(state_file.read_text())
            state.pop("metrics_rows")
            state_file.write_text(json.dumps(state))
        r = train(run, tiny_shards, "train.max_steps=10", "train.sample_num_images=0")
        assert "resumed from img-000000000064" in r.stdout
        again = read_jsonl(run / "metrics.jsonl")
        assert [(m["step"], m["epoch"]) for m in again if "epoch_time_s" in m] == [(8, 1)]
        assert [m["step"] for m in again if "loss" in m] == list(range(1, 11))
        assert [{k: v for k, v in m.items() if k not in timing} for m in again] == \
            [{k: v for k, v in m.items() if k not in timing} for m in first]  # bit-exact redo
