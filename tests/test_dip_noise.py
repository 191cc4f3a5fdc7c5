"""The study's own variant (DIP output as the training noise) and training's results.json."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from dipddpm.config import load_config
from dipddpm.data import make_loader
from dipddpm.models.unet import build_unet, count_parameters
from dipddpm.runs import read_jsonl
from dipddpm.tracking import read_wandb_offline
from dipddpm.train.checkpoint import TrainState
from dipddpm.train.dip_noise import DipNoise
from dipddpm.train.loop import training_noise
from tests.conftest import make_shards, run_module

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
TINY = ["--config", "configs/ddpm_tiny.yaml"]
SMALL_DIP = ["dip.channels_down=8", "dip.channels_up=8"]  # a fast net for the logic tests
KEYS = {"job", "variant", "model", "params", "T", "epochs", "steps", "images_seen",
        "train_seconds", "final_loss", "dip_iters", "world_size", "device", "mixed_precision"}


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    """64 random train images in 4 shards of 16 (8 batches of 8), 16 test images."""
    return make_shards(tmp_path_factory.mktemp("dipnoise"), 64, 16, 16)


def train(run_dir, data_dir, *overrides, wandb="disabled"):
    r = run_module("jobs.train", *TINY, f"run.dir={run_dir}", f"data.dir={data_dir}",
                   f"wandb.mode={wandb}", "train.checkpoint_every_images=16", *overrides,
                   env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def results(run_dir):
    return json.loads((Path(run_dir) / "results.json").read_text())


def losses(run_dir):
    return [r["loss"] for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def gauss_run(tiny_shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("gauss") / "run"
    train(run, tiny_shards, "train.max_steps=2")
    return run


def first_batch(shards, n=8):
    return next(iter(make_loader(shards, "train", n, rank=0, world_size=1, num_workers=0,
                                 seed=0, shuffle_buffer=0)))["image"]


def test_variant_runs_end_to_end_with_the_studys_net(tiny_shards, gauss_run, tmp_path):
    # the study's default DIP net (1.25M parameters), two steps of 8 images
    run = tmp_path / "run"
    r = train(run, tiny_shards, "train.max_steps=2", "train.noise=dip", wandb="offline")
    # the bar in a log (stderr is a pipe here): a line at the start and one at the end
    bar_lines = [ln for ln in r.stderr.splitlines() if ln.startswith("train:")]
    assert len(bar_lines) == 2 and "2/2" in bar_lines[-1] and "\r" not in r.stderr, r.stderr
    res = results(run)
    assert set(res) == KEYS
    assert res == {**res, "job": "train", "variant": "dip_in_training", "dip_iters": 3,
                   "model": "unet-tiny", "T": 50, "steps": 2, "images_seen": 16,
                   "world_size": 1, "epochs": 0.25}
    assert res["params"] == count_parameters(build_unet("unet-tiny"))
    assert res["final_loss"] == losses(run)[-1] and res["train_seconds"] > 0
    # same batches, same t draws: only the noise differs from the Gaussian run
    assert losses(run)[0] != losses(gauss_run)[0]
    w = read_wandb_offline(run)
    assert w["summary"]["train_seconds"] == pytest.approx(res["train_seconds"])
    # W&B charts every training metric against images seen, not its own step
    assert {"name": "images_seen"} in w["metrics"]
    assert {"glob_name": "*", "step_metric": "images_seen"} in w["metrics"]
    scalars = [h for h in w["history"] if "loss" in h]
    assert scalars and all(h["images_seen"] == 8 * h["_step"] for h in scalars)


def test_variant_noise_is_not_gaussian_but_the_default_is(tiny_shards, one_thread):
    x0 = first_batch(tiny_shards)
    gen = torch.Generator().manual_seed(5)
    gauss = training_noise(x0, gen, None, 5)
    dip = training_noise(x0, gen, DipNoise(load_config(None, []).dip, 3), 5)  # the study's net
    assert dip.shape == gauss.shape == x0.shape and not dip.requires_grad
    assert abs(gauss.mean()) < 0.1 and abs(gauss.std() - 1) < 0.1 and gauss.abs().max() > 2
    # a sigmoid image mapped to [-1, 1] (std ~0.45 here), not eps
    assert dip.min() >= -1 and dip.max() <= 1 and dip.std() < 0.7


def test_dip_noise_is_reproducible_and_leaves_the_global_rng(tiny_shards, one_thread):
    dip_cfg = load_config(None, SMALL_DIP).dip
    x0 = first_batch(tiny_shards)
    rng = torch.get_rng_state()
    a = DipNoise(dip_cfg, 3)(x0, 123)
    assert torch.equal(torch.get_rng_state(), rng)
    b = DipNoise(dip_cfg, 3)(x0, 123)
    c = DipNoise(dip_cfg, 3)(x0, 124)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the fit moves the output: 3 Adam steps differ from 1
    assert not torch.equal(a, DipNoise(dip_cfg, 1)(x0, 123))


def test_gaussian_results_and_train_seconds_survive_a_resume(gauss_run, tiny_shards, tmp_path):
    first = results(gauss_run)
    assert set(first) == KEYS
    assert first == {**first, "variant": "ddpm", "dip_iters": None, "steps": 2}
    ckpt = json.loads((gauss_run / "checkpoints" / "img-000000000016" / "train_state.json")
                      .read_text())
    assert ckpt["train_seconds"] == first["train_seconds"] > 0

    run = tmp_path / "run"
    shutil.copytree(gauss_run, run)
    r = train(run, tiny_shards, "train.max_steps=4")
    assert "resumed from img-000000000016" in r.stdout
    resumed = results(run)
    assert resumed["steps"] == 4 and resumed["images_seen"] == 32
    assert resumed["train_seconds"] > first["train_seconds"]
    assert resumed["final_loss"] == losses(run)[-1]


def test_checkpoints_without_train_seconds_still_load():
    old = {"step": 3, "images_seen": 24, "epoch": 0, "batch_in_epoch": 3, "loss_sum": 0.5,
           "loss_count": 1}
    assert TrainState(**old).train_seconds == 0.0


def test_variant_config_and_its_errors(capsys):
    from dipddpm.cli import run_job
    from jobs.train import main

    cfg = load_config("configs/ddpm_dip_in_training.yaml", [])
    assert (cfg.train.noise, cfg.train.dip_iters, cfg.diffusion.T) == ("dip", 3, 1000)
    assert cfg.run.dir == "runs/ddpm_dip_in_training"
    assert load_config(None, []).train.noise == "gaussian"
    for bad, message in (("train.noise=foo", "train.noise = 'foo': must be one of gaussian, dip"),
                         ("train.dip_iters=0", "train.dip_iters = 0: must be >= 1")):
        assert run_job(main, [*TINY, bad]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
