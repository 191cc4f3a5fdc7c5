"""FID against training time: has the DDPM reached its plateau?

For the EMA weights a training run kept every train.weights_every_images (run.dir/weights/
ema-img-<images>.pt; every protocol.curve_every-th of them, and always the last), draw
protocol.curve_num_images samples from pure noise with DDIM (eta 0, protocol.curve_steps steps;
the same per-batch noise for every snapshot) and take the classifier FID/KID against the train
split's statistics, beside the real-vs-real floor at the same N. The plateau is the first
snapshot whose FID is within PLATEAU (10%) of the best snapshot's: the training length past it
buys little FID at this N. With protocol.curve_final_num_images the last snapshot is drawn once
more at that N with protocol.curve_final_steps DDIM steps: the trained model's headline FID,
beside the floor at the same N (FID falls with N, so only same-N numbers compare). That draw
keeps each finished batch in run.dir/final/<stem>/, so an interrupted run resumes inside it.

    python -m jobs.fid_curve --config configs/generation.yaml protocol.checkpoint=runs/ddpm

results.json:
  {"protocol": "fid_curve", "n": N, "sampler": "ddim", "steps": K, "train_images": int,
   "floor": {...real_vs_real_floor...}, "plateau": null | {"rule": str, "images_seen": int,
   "epoch": float, "fid": float},
   "points": [{"weights": str, "images_seen": int, "epoch": float, "step": int,
               "fid": float, "kid": float, "kid_std": float, "seconds_per_sample": float,
               "grid": "samples/<stem>.png"}],
   "final": null | {"weights": str, "epoch": float, "n": int, "steps": int, "nfe": int,
                    "fid": float, "kid": float, "kid_std": float, "seconds_per_sample": float,
                    "floor": {...real_vs_real_floor at n...}, "grid": "samples/final-<stem>.png"}}
Each finished snapshot is kept in run.dir/points/<stem>.json, so a rerun resumes after it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dipddpm.artifacts import pyplot, save_grid, save_png
from dipddpm.config import Config, UserError
from dipddpm.data.shards import load_manifest
from dipddpm.evaluate.classifier import classifier_dir, load_classifier
from dipddpm.evaluate.fid import real_vs_real_floor, sample_metrics
from dipddpm.progress import bar
from dipddpm.protocols.generation import draw
from dipddpm.runs import (RESULTS_FILE, atomic_write_json, prepare_run_dir, read_json)
from dipddpm.tracking import Tracker
from dipddpm.train.checkpoint import SNAPSHOTS_DIR, kept_snapshots
from dipddpm.train.sampling import load_trained

PLATEAU = 0.10  # within 10% of the best snapshot's FID
GRID = 64  # samples in each snapshot's grid


def snapshots(run_dir: Path, every: int) -> list[tuple[int, Path]]:
    """(images seen, weights file) of every `every`-th kept snapshot, and the last one."""
    found = kept_snapshots(run_dir)
    if not found:
        raise UserError(f"protocol.checkpoint = {str(run_dir)!r}: no {SNAPSHOTS_DIR}/ema-img-*.pt "
                        f"there (train with train.weights_every_images set)")
    picked = found[every - 1::every]
    if not picked or picked[-1] != found[-1]:
        picked.append(found[-1])
    return picked


def plateau(points: list[dict]) -> dict | None:
    if not points:
        return None
    best = min(p["fid"] for p in points)
    first = next(p for p in points if p["fid"] <= best * (1 + PLATEAU))
    return {"rule": f"first snapshot with FID within {PLATEAU:.0%} of the best",
            "images_seen": first["images_seen"], "epoch": first["epoch"], "fid": first["fid"]}


def fid_curve(cfg: Config, run_dir: Path, device=None, log=print) -> dict:
    p, c = cfg.protocol, cfg.classifier
    train_dir = Path(p.checkpoint)
    picked = snapshots(train_dir, p.curve_every)
    clf = load_classifier(classifier_dir(cfg), device or "cpu")
    n_train = load_manifest(cfg.data.dir)["splits"]["train"]["count"]
    n = p.curve_num_images
    floor = real_vs_real_floor(clf, cfg.data.dir, n, seed=cfg.run.seed,
                               kid_subset_size=c.kid_subset_size,
                               kid_num_subsets=c.kid_num_subsets)
    points = []
    for images_seen, weights in bar(len(picked), "snapshots", iterable=picked, unit="weights"):
        done = run_dir / "points" / f"{weights.stem}.json"
        if done.exists():
            points.append(read_json(done))
            continue
        model, diffusion, _ = load_trained(weights, cfg, device)
        dev = next(model.parameters()).device
        x, nfe, seconds = draw(model, diffusion, n, p.batch_size, cfg.run.seed, dev,
                               sampler="ddim", steps=p.curve_steps)
        m = sample_metrics(clf, cfg.data.dir, x, c.kid_subset_size, c.kid_num_subsets, cfg.run.seed)
        grid = f"samples/{weights.stem}.png"
        save_grid(x[:GRID], run_dir / grid)
        step = int(torch.load(weights, map_location="cpu", weights_only=True).get("step", 0))
        point = {"weights": str(weights), "images_seen": images_seen,
                 "epoch": images_seen / n_train, "step": step, "nfe": nfe, "fid": m["fid"],
                 "kid": m["kid"], "kid_std": m["kid_std"], "seconds_per_sample": seconds,
                 "grid": grid}
        log(f"  epoch {point['epoch']:5.2f}: FID {m['fid']:.2f} (floor {floor['fid_vs_train']:.2f}"
            f" at N = {n})")
        atomic_write_json(done, point)
        points.append(point)
    final = None
    if p.curve_final_num_images:
        final = final_fid(cfg, run_dir, clf, picked[-1][1], points[-1]["epoch"], device, log)
    return {"protocol": "fid_curve", "n": n, "sampler": "ddim", "steps": p.curve_steps,
            "train_images": n_train, "checkpoint": str(train_dir), "floor": floor,
            "plateau": plateau(points), "points": points, "final": final}


def final_fid(cfg: Config, run_dir: Path, clf, weights: Path, epoch: float, device, log) -> dict:
    """The last snapshot at protocol.curve_final_num_images samples, DDIM
    protocol.curve_final_steps steps, with the floor at that N."""
    p, c = cfg.protocol, cfg.classifier
    n = p.curve_final_num_images
    floor = real_vs_real_floor(clf, cfg.data.dir, n, seed=cfg.run.seed,
                               kid_subset_size=c.kid_subset_size,
                               kid_num_subsets=c.kid_num_subsets)
    model, diffusion, _ = load_trained(weights, cfg, device)
    x, nfe, seconds = draw(model, diffusion, n, p.batch_size, cfg.run.seed,
                           next(model.parameters()).device, sampler="ddim",
                           steps=p.curve_final_steps, cache=run_dir / "final" / weights.stem)
    m = sample_metrics(clf, cfg.data.dir, x, c.kid_subset_size, c.kid_num_subsets, cfg.run.seed)
    grid = f"samples/final-{weights.stem}.png"
    save_grid(x[:GRID], run_dir / grid)
    log(f"  final, epoch {epoch:5.2f}: FID {m['fid']:.2f} (floor {floor['fid_vs_train']:.2f} "
        f"at N = {n}), DDIM {p.curve_final_steps} steps")
    return {"weights": str(weights), "epoch": epoch, "n": n, "steps": p.curve_final_steps,
            "nfe": nfe, "fid": m["fid"], "kid": m["kid"], "kid_std": m["kid_std"],
            "seconds_per_sample": seconds, "floor": floor, "grid": grid}


def curve_plot(results: dict, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    pts = results["points"]
    ax.plot([q["epoch"] for q in pts], [q["fid"] for q in pts], "o-", label="DDPM (EMA)")
    ax.axhline(results["floor"]["fid_vs_train"], color="gray", ls="--",
               label=f"real vs real at N = {results['n']}")
    if results["plateau"]:
        ax.axvline(results["plateau"]["epoch"], color="C2", ls=":", label="plateau")
    ax.set_yscale("log")
    ax.set_xlabel("epochs trained")
    ax.set_ylabel("FID (classifier features)")
    ax.set_title(f"FID vs training, DDIM {results['steps']} steps, N = {results['n']}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return save_png(fig, path)


def run_fid_curve(cfg: Config, device=None) -> dict:
    """The job: snapshots of a training run -> results.json, fid_vs_epochs.png, grids, W&B."""
    if not cfg.protocol.checkpoint:
        raise UserError("protocol.checkpoint: set it to the training run dir whose weights/ "
                        "snapshots to evaluate")
    snapshots(Path(cfg.protocol.checkpoint), cfg.protocol.curve_every)  # before run.dir is written
    n_test = load_manifest(cfg.data.dir)["splits"]["test"]["count"]
    for key in ("curve_num_images", "curve_final_num_images"):
        if getattr(cfg.protocol, key) > n_test:  # each floor draws N real test images
            raise UserError(f"protocol.{key} = {getattr(cfg.protocol, key)}: its real-vs-real "
                            f"floor needs that many test images; the test split holds {n_test}")
    load_classifier(classifier_dir(cfg))
    run_dir = prepare_run_dir(cfg)
    with Tracker(run_dir, cfg, "fid_curve") as tracker:
        results = fid_curve(cfg, run_dir, device)
        atomic_write_json(run_dir / RESULTS_FILE, results)
        plot = curve_plot(results, run_dir / "fid_vs_epochs.png")
        tracker.log_image("fid_vs_epochs", plot, step=0)
        if results["final"]:
            tracker.log_image("final_samples", run_dir / results["final"]["grid"], step=0)
        for q in results["points"]:
            tracker.log({"fid": q["fid"], "kid": q["kid"], "epoch": q["epoch"]},
                        step=q["images_seen"])
        final = results["final"] or {"floor": {}}
        tracker.summary({"floor/fid_vs_train": results["floor"]["fid_vs_train"],
                         "plateau_epoch": (results["plateau"] or {}).get("epoch"),
                         "final/fid": final.get("fid"),
                         "final/floor_fid_vs_train": final["floor"].get("fid_vs_train")})
    return results
