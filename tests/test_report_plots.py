"""jobs.report draws a PNG beside every table with numbers: tables 2-5, the DIP stopping rows,
the KID of each generation run (with error bars) and its memorisation distances. The PNGs are
real files named in REPORT.md right below their tables, and logged to the report's W&B run."""
from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from dipddpm.cli import run_job
from dipddpm.runs import atomic_write_json, read_json
from dipddpm.tracking import read_wandb_offline
from jobs.report import main as report_main
from tests.conftest import run_module
from tests.test_report import (PNG_MAGIC, fit_dip_run, generation_run, run_dir, sample_json,
                               section, train_run)

BESIDE = {"### 1. DIP PSNR": "dip_stopping.png", "### 2. Training time": "training_time.png",
          "### 3. Sampling time": "sampling_time.png", "### 4. Loss vs T": "loss_vs_T.png",
          "### 5a. Ablation": "ablation_dip_iters.png", "### 5b. Ablation": "ablation_epochs.png"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("plots") / "runs"
    a = train_run(root / "a", "ddpm", 1000, 0.031, 2000.0)
    train_run(root / "b", "ddpm", 200, 0.061, 1000.0)
    v = train_run(root / "v", "dip_in_training", 1000, 0.57, 2170.0, dip_iters=3)
    train_run(root / "w", "dip_in_training", 1000, 0.5125, 2500.0, dip_iters=10)
    train_run(root / "y", "ddpm", 1000, 0.0415, 700.0, epochs=5)
    sample_json(root / "s", T=1000, t0=1000, num=16, seconds=7.5, weights=str(a / "ema.pt"))
    (a / "ema.pt").write_bytes(b"weights")
    sample_json(v, T=1000, t0=1000, num=16, seconds=6.1, weights="elsewhere/ema.pt")
    fit_dip_run(root / "d", 16, 17.11)
    g = generation_run(root / "g")
    # the dip_start arm's memorisation distances, as the generation protocol saves them
    rng = np.random.default_rng(0)
    np.savez(g / "dip_start.npz", pixels_samples=rng.uniform(0, 2, 1000).astype(np.float32),
             pixels_test=rng.uniform(3, 6, 200).astype(np.float32),
             features_samples=np.ones(1000, np.float32), features_test=np.ones(200, np.float32))
    res = read_json(g / "results.json")
    res["arms"][-1]["memorisation"]["distances"] = "dip_start.npz"
    atomic_write_json(g / "results.json", res)

    r = run_module("jobs.report", str(root), env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return {"root": root, "text": (root / "REPORT.md").read_text()}


def links(text: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)


def real_png(path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("L"), np.float32)
    assert pixels.shape[1] > 300 and pixels.std() > 5  # a drawn figure, not a blank canvas
    return pixels


def test_each_table_shows_its_plot_below_it(report):
    root, text = report["root"], report["text"]
    for heading, name in BESIDE.items():
        part = section(text, heading)
        assert links(part) == [f"report/{name}"], heading
        last_row = max(i for i, line in enumerate(part.splitlines()) if line.startswith("|"))
        link_line = next(i for i, line in enumerate(part.splitlines()) if line.startswith("!["))
        assert link_line > last_row  # below the table, inside its section
        real_png(root / "report" / name)
    gen = section(text, "### Generation")
    assert links(gen) == ["report/kid-g.png", "report/memorisation-g.png"]
    for name in ("kid-g.png", "memorisation-g.png"):
        real_png(root / "report" / name)


def test_plots_are_logged_to_the_reports_wandb_run(report):
    read = read_wandb_offline(report["root"] / "report")
    logged = {k: v for row in read["history"] for k, v in row.items() if isinstance(v, dict)}
    for name in [*BESIDE.values(), "kid-g.png", "memorisation-g.png"]:
        assert logged[f"plot/{name[:-4]}"]["_type"] == "image-file", name


def test_tables_without_numbers_get_no_plot(tmp_path):
    root = tmp_path / "runs"
    g = generation_run(root / "g")  # its memorisation entries name no distances file
    run_dir(root / "c", results={"classifier": {"test_accuracy": 0.5}, "floors": []})
    assert run_job(report_main, [str(root), "wandb.mode=disabled"]) == 0
    text = (root / "REPORT.md").read_text()
    made = sorted(x for x in links(text) if x.startswith("report/"))
    assert made == ["report/fid_vs_steps.png", "report/kid-g.png"]
    assert not (root / "report" / "training_time.png").exists()
    assert (g / "results.json").is_file()
