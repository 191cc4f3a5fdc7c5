"""jobs.report: REPORT.md, plots and W&B tables from a folder of run dirs.

The RUNS_DIR holds run dirs written the way each job writes them (a resolved config.yaml from
the real schema, results.json in the job's schema, metrics.jsonl, PNGs) with numbers chosen so
every table cell can be checked, plus one real tiny training run and a real jobs.sample run on
it. Folder names are deliberately unhelpful: the report must group runs by what they hold.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dipddpm.cli import run_job
from dipddpm.config import dump_config, load_config
from dipddpm.runs import atomic_write_json, atomic_write_text, read_json
from dipddpm.tracking import read_wandb_offline
from jobs.report import main as report_main
from tests.conftest import REPO, make_shards, run_module

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((30, 30), value, np.uint8)).save(path)
    return path


def run_dir(folder: Path, overrides=(), results=None) -> Path:
    cfg = load_config(REPO / "configs/base.yaml", [f"run.dir={folder}", *overrides])
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "config.yaml", dump_config(cfg))
    if results is not None:
        atomic_write_json(folder / "results.json", results)
    return folder


def train_run(folder: Path, variant: str, T: int, loss: float, seconds: float, *,
              epochs: float = 15, dip_iters=None, images: int = 900_000, extra=()) -> Path:
    dip = variant == "dip_in_training"
    overrides = [f"diffusion.T={T}", f"train.epochs={epochs}",
                 f"train.noise={'dip' if dip else 'gaussian'}",
                 f"train.dip_iters={dip_iters if dip else 3}", *extra]
    results = {"job": "train", "variant": variant, "model": "unet-small", "params": 1_234_567,
               "T": T, "epochs": float(epochs), "steps": images // 128, "images_seen": images,
               "train_seconds": seconds, "final_loss": loss,
               "dip_iters": dip_iters if dip else None, "world_size": 1}
    run_dir(folder, overrides, results)
    with open(folder / "metrics.jsonl", "w") as f:
        for i in range(1, 6):  # loss falls to the final value; one event row without loss
            f.write(json.dumps({"step": i, "images_seen": i * 1280, "loss": loss * (6 - i)}) + "\n")
        f.write(json.dumps({"step": 5, "event": "checkpoint"}) + "\n")
    png(folder / "samples" / "img-000000001280.png", 10)
    png(folder / "samples" / "img-000000006400.png", 200)
    return folder


def sample_json(folder: Path, *, T: int, t0: int, num: int, seconds: float, weights: str):
    atomic_write_json(folder / "samples" / f"ddpm-{t0}steps-eta0-t0{t0}-n{num}.json", {
        "sampler": "ddpm", "steps": 50, "eta": 0.0, "t0": t0, "num": num,
        "nfe_per_sample": t0, "seconds": seconds, "seed": 0, "weights": weights,
        "model": "unet-small", "diffusion": {"T": T}})


def fit_dip_run(folder: Path, n: int, first: float) -> Path:
    iters = [50, 100, 150, 200, 250, 300, 350, 400]
    curve = {"iters": iters, "psnr_mean": [first + 0.5 * i for i in range(8)],
             "psnr_std": [0.5] * 8, "noisy_psnr": 21.87, "oracle_psnr": 24.75,
             "es_wmv_psnr": 23.5, "budget_psnr": first + 3.5}
    run_dir(folder, results={"sigma": {"25": curve}, "num_images": n})
    png(folder / "psnr.png", 128)
    return folder


def restoration_run(folder: Path) -> Path:
    """A restoration run's results as jobs.restore writes them (rows made by the protocol's own
    row, delta and answer functions from per-image PSNRs), N = 4."""
    from dipddpm.protocols.restoration import (Scored, add_deltas, answer, answer_sentences,
                                               make_row)

    g = {"gflop_unet": 0.4, "gflop_dip": 1.2}

    def sc(mean):
        return Scored(np.array([mean - 0.3, mean - 0.1, mean + 0.1, mean + 0.3]), None, 0.75)

    rows = [make_row("observation", sc(21.72), **g),
            make_row("dip", sc(22.84), estimate="budget", output="ema", dip_iters=300.0,
                     dip_s=1.4, **g),
            make_row("dip", sc(23.61), estimate="oracle", output="best", dip_iters=300.0,
                     dip_s=1.4, oracle=True, **g),
            make_row("direct", sc(25.87), sampler="ddim", steps=5, nfe=5, rev_s=0.1,
                     start={"rule": "t*", "requested": 0.196, "sigma": 0.196, "t0": 57}, **g),
            make_row("dip_start", sc(22.43), estimate="budget", sampler="ddim", steps=5, nfe=5,
                     dip_iters=300.0, dip_s=1.4, rev_s=0.1,
                     start={"rule": "c*e", "c": 1.0, "e": 0.2, "requested": 0.2,
                            "sigma": 0.201, "t0": 58}, **g),
            make_row("cheap_start", sc(22.59), sampler="ddim", steps=5, nfe=5, rev_s=0.1,
                     start={"rule": "sigma", "requested": 0.2, "sigma": 0.201, "t0": 58}, **g)]
    task = {"task": "denoise", "sigma": 25.0, "sigma_obs": 0.196, "t_star": 57,
            "primary": "psnr", "dip_source": "fitted", "dip_seconds_per_iteration": 0.0047,
            "dip_seconds_per_image": 1.4, "es_wmv": None, "skipped": [],
            "errors": {"dip_start/budget": {"estimated": 0.2, "oracle": 0.21}},
            "front": add_deltas(rows, "psnr"), "rows": rows}
    task["answer"] = answer(task, g["gflop_unet"], g["gflop_dip"])
    res = {"protocol": "restoration", "split": "test", "num_images": 4, "device": "cpu",
           "T": 1000, "observation": "gaussian",
           "dip": {"iters": 300, "es_window": 100, "es_patience": 1000},
           "gflop": {"unet_forward": 0.4, "dip_iteration": 1.2},
           "tasks": {"denoise-s25": task}}
    res["answer"] = answer_sentences(res)
    run_dir(folder, results=res)
    png(folder / "front_denoise-s25.png", 60)
    return folder


def generation_run(folder: Path) -> Path:
    def arm(name, nfe, fid, *, steps=None, t0=None, match=None):
        tag = name + (f"-t0{t0}" if t0 else "") + (f"-k{steps}" if steps else "")
        png(folder / "samples" / f"{tag}.png", 90)
        return {"arm": name, "steps": steps, "t0": t0, "nfe": nfe, "dip_iters": 0.0,
                "passes": float(nfe), "fid": fid, "kid": 0.0123, "kid_std": 0.001,
                "seconds_per_sample": 0.01, "grid": f"samples/{tag}.png",
                "memorisation": None if match is None else {"source_match": match}}
    arms = [arm("ddpm", 1000, 12.34, steps=1000), arm("ddim", 10, 30.5, steps=10),
            arm("ddim", 50, 15.25, steps=50), arm("dip_estimate", 0, 40.0, match=1.0),
            arm("dip_start", 50, 8.75, steps=50, t0=100, match=0.9)]
    run_dir(folder, results={
        "protocol": "generation", "n": 1000, "T": 1000, "device": "cpu",
        "classifier": {"test_accuracy": 0.901},
        "floor": {"n": 1000, "fid": 6.73, "fid_vs_train": 3.43, "kid": 0.2171},
        "dip_source": "fitted", "dip_seconds_per_image": 1.0, "arms": arms})
    return folder


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    root = tmp / "runs"
    a = train_run(root / "grid" / "a", "ddpm", 1000, 0.031, 2000.0)
    train_run(root / "grid" / "b", "ddpm", 200, 0.061, 1000.0)
    v = train_run(root / "x" / "1", "dip_in_training", 1000, 0.57, 2170.0, dip_iters=3)
    train_run(root / "x" / "2", "dip_in_training", 200, 0.44, 1100.0, dip_iters=3)
    train_run(root / "x" / "3", "dip_in_training", 1000, 0.5125, 2500.0, dip_iters=10)
    train_run(root / "x" / "4", "dip_in_training", 1000, 0.5375, 4000.0, dip_iters=50)
    train_run(root / "y", "ddpm", 1000, 0.0415, 700.0, epochs=5)
    # differs from y in the learning rate too: not an epochs ablation partner
    train_run(root / "z", "ddpm", 1000, 0.0777, 650.0, epochs=5, extra=["train.lr=0.001"])
    # a jobs.sample dir (no config.yaml of its own) naming the weights by absolute path ...
    sample_json(root / "s1", T=1000, t0=1000, num=16, seconds=7.5, weights=str(a / "ema.pt"))
    sample_json(root / "s1", T=1000, t0=200, num=16, seconds=99.99, weights=str(a / "ema.pt"))
    (a / "ema.pt").write_bytes(b"weights")
    # ... and one written into the training run dir itself, as `run.dir=<training run>` does
    sample_json(v, T=1000, t0=1000, num=16, seconds=6.1, weights="elsewhere/ema.pt")
    # a study-style sampling dir: config.yaml names the checkpoint relative to RUNS_DIR's parent
    b = root / "grid" / "b"
    run_dir(root / "s2", [f"sample.checkpoint={b.relative_to(tmp)}"])
    sample_json(root / "s2", T=200, t0=200, num=8, seconds=2.5, weights="gone/ema.pt")
    # the runs dir itself is a run dir (jobs.study keeps its own config there, train.noise
    # gaussian): a sampling of the variant must still be matched to the variant's run
    run_dir(root)
    sample_json(root / "s3", T=200, t0=200, num=8, seconds=3.25,
                weights=str(root / "x" / "2" / "ema.pt"))
    (root / "x" / "2" / "ema.pt").write_bytes(b"weights")
    # short epochs must not be rounded together
    train_run(root / "e" / "p", "dip_in_training", 1000, 0.61, 30.0, epochs=0.005, dip_iters=3)
    train_run(root / "e" / "q", "dip_in_training", 1000, 0.6, 60.0, epochs=0.01, dip_iters=3)
    fit_dip_run(root / "d" / "small", 4, 99.0)
    fit_dip_run(root / "d" / "big", 16, 17.11)
    restoration_run(root / "r")
    generation_run(root / "g")
    run_dir(root / "c", results={"classifier": {"test_accuracy": 0.901, "test_images": 10000},
                                 "floors": [{"n": 1000, "fid": 6.73, "fid_vs_train": 3.43,
                                             "kid": 0.2171}]})
    broken = run_dir(root / "broken")
    (broken / "results.json").write_text("{not json")

    r = run_module("jobs.report", str(root), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    return {"root": root, "text": (root / "REPORT.md").read_text()}


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    """A real tiny training run (2 steps) and a real full-chain jobs.sample of its weights."""
    tmp = tmp_path_factory.mktemp("real")
    shards = make_shards(tmp / "tiny", 64, 16, 16)
    root = tmp / "runs"
    real = root / "tiny"
    r = run_module("jobs.train", "--config", "configs/ddpm_tiny.yaml", f"run.dir={real}",
                   f"data.dir={shards}", "wandb.mode=disabled", "train.max_steps=2",
                   env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_module("jobs.sample", "--config", "configs/ddpm_tiny.yaml",
                   f"run.dir={root / 'sampled'}", f"sample.checkpoint={real}",
                   "sample.sampler=ddpm", "sample.num_images=1", f"data.dir={shards}",
                   "wandb.mode=disabled", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    return {"root": root, "results": read_json(real / "results.json"),
            "sample": read_json(next((root / "sampled" / "samples").glob("*.json")))}


def section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n### ", start + 1)
    return text[start:end if end > 0 else None]


def test_five_tables_with_study_numbers_beside_ours(report):
    text = report["text"]
    for h in ("### 1. DIP PSNR vs iterations", "### 2. Training time", "### 3. Sampling time",
              "### 4. Loss vs T", "### 5a. Ablation: DIP iterations", "### 5b. Ablation: epochs"):
        assert h in text
    dip = section(text, "### 1.")
    assert "| 50 | 6.71 | 17.11 ± 0.50 |" in dip and "| 400 | 8.43 | 20.61 ± 0.50 |" in dip
    assert "N = 16" in dip and "99.00" not in dip  # the run with the most images
    assert "| EMA: oracle peak (needs the clean image) | — | 24.75 |" in dip
    assert "| raw: oracle peak (needs the clean image) | — | — |" in dip  # an older run
    train = section(text, "### 2.")
    assert "| train time | 34 min 18.67 s | 33 min 20.00 s | 36 min 8.40 s | 36 min 10.00 s |" \
        in train
    assert f"| images/s | — | {900_000 / 2000:.1f} | — | {900_000 / 2170:.1f} |" in train
    assert "| final loss | 0.032 | 0.031 | 0.58 | 0.57 |" in train
    assert "T = 1000" in train
    sampling = section(text, "### 3.")
    assert "| 1000 | 6.26 | 6.10 (16) | 6.35 | 7.50 (16) |" in sampling
    assert "99.99" not in sampling  # a chain started at t0 < T is no full sampling run
    assert "| 200 | 1.25 | 3.25 (8) | 1.38 | 2.50 (8) |" in sampling
    loss = section(text, "### 4.")
    assert "| 200 | 0.45 | 0.44 | 0.065 | 0.061 |" in loss
    assert "| 1000 | 0.58 | 0.57 | 0.032 | 0.031 |" in loss


def test_a_real_training_run_and_its_samples(real_runs):
    res, sample = real_runs["results"], real_runs["sample"]
    assert run_job(report_main, [str(real_runs["root"]), "wandb.mode=disabled"]) == 0
    text = (real_runs["root"] / "REPORT.md").read_text()
    train = section(text, "### 2.")
    assert f"| final loss | 0.032 | {res['final_loss']:.4g} | 0.58 | — |" in train
    assert f"unet-tiny ({res['params']:,})" in train
    assert f"{res['epochs']:g} / {res['steps']} / {res['images_seen']:,}" in train
    assert "not run: DIP+DDPM at T = 50" in train
    assert f"| 50 | — | — | — | {sample['seconds']:.2f} (1) |" in section(text, "### 3.")
    assert f"| 50 | — | — | — | {res['final_loss']:.4g} |" in section(text, "### 4.")
    curve = real_runs["root"] / "report" / "loss_curves.png"
    assert curve.read_bytes()[:8] == PNG_MAGIC


def test_ablations_group_runs_by_config_not_folder(report):
    a = section(report["text"], "### 5a.")
    rows = [line for line in a.splitlines() if line.startswith("| ") and "`" in line]
    assert [r.split(" | ")[:3] for r in rows] == [["| 3", "chosen", "0.57"],
                                                 ["| 10", "tried", "0.5125"],
                                                 ["| 50", "tried", "0.5375"]]
    b = section(report["text"], "### 5b.")
    assert "| DDPM | 5 | tried | 0.0415 |" in b and "| DDPM | 15 | chosen | 0.031 |" in b
    assert "0.0777" not in b  # run z also changed the learning rate
    assert "| DIP+DDPM | 0.005 | — | 0.61 |" in b and "| DIP+DDPM | 0.01 | — | 0.6 |" in b
    assert "| DIP+DDPM | 15 | chosen | 0.57 |" in b


def test_protocol_tables_and_findings(report):
    text = report["text"]
    rest = section(text, "### Restoration: denoise-s25")
    assert "| dip (oracle) | oracle/best |  |  | 0 | 300 | 360.0 | 23.61 [" in rest
    assert "| direct |  | t*: 0.196 → 57 | ddim 5 | 5 | 0 | 2.0 | 25.87 [" in rest
    # the DIP start against the best baseline at <= its 362 GFLOP: the direct start, paired
    assert ("| dip_start | budget | 1×ê (0.200) = 0.201 → 58 | ddim 5 | 5 | 300 | 362.0 | "
            "22.43 [") in rest and "| -3.44 [-3.44, -3.44] | 1.500 |" in rest
    answer = text[text.index("## The answer"):text.index("## How to read this")]
    assert "**denoise-s25** (N = 4, gaussian observation, PSNR)" in answer
    assert "is -3.44 dB [-3.44, -3.44] against the best baseline" in answer
    assert "break-even DIP budget is 0 iterations" in answer
    gen = section(text, "### Generation")
    assert "N = 1000 samples per arm" in gen and "FID 3.43" in gen
    assert "| dip_start | 100 | 50 | 50 | 8.75 | 0.0123 | 0.0100 | 0.90 |" in gen
    assert "| 1000 | 6.73 | 3.43 | 0.2171 |" in section(text, "### Classifier")
    how = text[text.index("## How to read this"):text.index("## The study's tables")]
    assert f"({0.57 / 0.031:.3g}x)" in how
    assert f"{2170 / 2000:.2f}x" in how
    assert "best DIP start 22.43 dB (362.0 GFLOP)" in how
    assert "best direct start 25.87 dB (2.0 GFLOP)" in how
    assert "DIP alone 22.84 dB" in how and "dip_start FID 8.75" in how
    assert "`broken`: results.json unreadable" in text
    assert "- `.`" not in text  # the runs dir's own config.yaml is no missing run


def test_every_linked_image_is_a_png(report):
    root, text = report["root"], report["text"]
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    for made in ("report/dip_psnr.png", "report/loss_curves.png", "report/fid_vs_steps.png",
                 "r/front_denoise-s25.png", "g/samples/dip_start-t0100-k50.png",
                 "grid/a/samples/img-000000006400.png", "x/1/samples/img-000000006400.png"):
        assert made in links
    for link in links:
        path = root / link
        assert path.read_bytes()[:8] == PNG_MAGIC, link
        with Image.open(path) as im:
            im.verify()
    with Image.open(root / "report" / "loss_curves.png") as im:
        assert im.size[0] > 300


def test_wandb_run_holds_the_same_tables(report):
    read = read_wandb_offline(report["root"] / "report")
    files = Path(read["files"][0]).parent / "files"
    logged = {k: v for row in read["history"] for k, v in row.items() if isinstance(v, dict)}
    table = json.loads((files / logged["loss_vs_T"]["path"]).read_text())
    assert table["columns"] == ["T", "study DIP+DDPM", "ours DIP+DDPM", "study DDPM", "ours DDPM"]
    assert ["1000", "0.58", "0.57", "0.032", "0.031"] in table["data"]
    assert {"dip_psnr", "training_time", "sampling_time", "ablation_dip_iters",
            "ablation_epochs"} <= set(logged)
    assert logged["plot/loss_curves"]["_type"] == "image-file"
    # the series as native line charts, beside the PNGs
    charts = {k for k in logged if k.startswith("series/")}
    assert {"series/loss_vs_T_table", "series/sampling_time_vs_T_table",
            "series/ablation_dip_iters_table", "series/ablation_epochs_table",
            "series/dip_psnr_vs_iterations_table", "series/r/denoise-s25_vs_gflop_table"} <= charts
    points = json.loads((files / logged["series/loss_vs_T_table"]["path"]).read_text())["data"]
    assert [1000, "study DDPM", 0.032] in points and [1000, "ours DDPM", 0.031] in points
    assert [1000, "ours DIP+DDPM", 0.57] in points and len(points) == 14  # 2 x (5 study + 2 ours)


def test_missing_runs_give_not_run_lines(tmp_path, capsys):
    root = tmp_path / "runs"
    run_dir(root / "only", results={"classifier": {"test_accuracy": 0.5}, "floors": []})
    assert run_job(report_main, [str(root), "wandb.mode=disabled"]) == 0
    text = (root / "REPORT.md").read_text()
    # six study tables, restoration, generation, plots
    assert text.count("\nnot run: ") == 9
    assert "not run: no fit_dip run" in text and "not run: no training run" in text
    assert "not run: no run dir with plots" in text
    assert "| 0.5000 |" not in text and "Test accuracy 0.5000" in text


def test_no_run_dirs_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    # run_job is what `python -m jobs.report` exits with (cli.exit_with)
    assert run_job(report_main, [str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: RUNS_DIR = ")
    assert "no run dirs under it" in err
    assert not (tmp_path / "empty" / "REPORT.md").exists()
    assert not (tmp_path / "empty" / "report").exists()
    assert run_job(report_main, [str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_the_committed_study_results_are_what_the_report_writes_from_them(tmp_path):
    """results/cpu-study/RESULTS.md is rebuilt byte for byte by the plain command from the
    files beside it: no number in it is typed by hand, and a change to the report that would
    alter it needs the results exported again."""
    import shutil

    copy = tmp_path / "cpu-study"
    shutil.copytree(REPO / "results/cpu-study", copy)
    committed = (copy / "RESULTS.md").read_text()
    (copy / "RESULTS.md").unlink()
    r = run_module("jobs.report", str(copy), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (copy / "RESULTS.md").read_text() == committed


def test_a_plateau_at_the_last_snapshot_is_reported_as_still_falling():
    from dipddpm.report.study_report import plateau_sentence

    rule = "first snapshot with FID within 10% of the best"
    pts = [{"images_seen": i * 100, "epoch": float(i), "fid": f}
           for i, f in ((2, 30.0), (4, 8.0), (6, 7.5))]
    falling = {"points": pts[:2], "plateau": {**pts[1], "rule": rule}}
    assert plateau_sentence(falling).startswith("no plateau by the last snapshot: FID still fell "
                                                "from 30.00 (epoch 2.00) to 8.00 (epoch 4.00)")
    flat = {"points": pts, "plateau": {**pts[1], "rule": rule}}
    assert plateau_sentence(flat) == f"plateau at epoch 4.00, FID 8.00 ({rule})"
