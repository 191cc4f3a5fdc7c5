"""A study's finished stages as a folder that can live in a repository (`jobs.study --export`).

For every finished stage (its stage.json is there) the stage's run dir is copied without its
weights, checkpoints, W&B files, caches and per-sample arrays: config.yaml, stage.json,
results.json, metrics.jsonl, table.md, its figures (*.png) and sample grids (samples/*.png,
with jobs.sample's samples/*.json). Absolute paths inside the copied text files are rewritten so
that nothing of the machine that ran the study leaks out and the copies point at each other:
the study dir becomes the export folder (relative to where the export runs, normally the
repository's root), a project config named by its path in a checkout `configs/NAME.yaml`, the
data dir `EXPORT_DATA`. `export.json` beside them records, per planned stage, its estimate
(dipddpm/study/estimate.py, before anything ran), its wall time and where that comes from, and
the machine. `python -m jobs.report <folder>` then writes RESULTS.md there (see
dipddpm/report/study_report.py), the same bytes every time from the same files.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from dipddpm.config import Config, UserError
from dipddpm.report.study_report import EXPORT_FILE
from dipddpm.runs import (CONFIG_FILE, METRICS_FILE, RESULTS_FILE, STAGE_FILE,
                          atomic_write_json, machine_description, read_json)
from dipddpm.study.estimate import estimate
from dipddpm.study.plan import Stage

EXPORT_DATA = "data/fashion-mnist"  # what the data dir's path becomes in the copies
TOP_FILES = (CONFIG_FILE, STAGE_FILE, RESULTS_FILE, METRICS_FILE, "table.md")
TEXT_SUFFIXES = (".json", ".jsonl", ".yaml", ".md")


def stage_seconds(kind: str, results: dict, stage: dict) -> tuple[float, str]:
    """(wall seconds, what they are) of a finished stage: the job's own accumulated time where
    it keeps one across interruptions, else the last run of the stage (stage.json)."""
    if kind in ("train", "train_main", "ablation_dip_iters", "ablation_epochs") \
            and "train_seconds" in results:
        return float(results["train_seconds"]), "training loop, all resumes"
    if kind == "restore" and all("seconds" in t for t in results.get("tasks", {}).values()):
        total = sum(t["seconds"]["dip_fits"] + t["seconds"]["rest"]
                    for t in results["tasks"].values())
        return float(total), "DIP fits (the original fits' time) + chains, all resumes"
    if kind == "fid_curve" and results.get("points"):
        final = results.get("final") or {"seconds_per_sample": 0.0, "n": 0}
        return (float(sum(q["seconds_per_sample"] for q in results["points"]) * results["n"]
                      + final["seconds_per_sample"] * final["n"]),
                "sampling, all snapshots and the final draw")
    if kind in ("generation", "generation_front") and results.get("arms"):
        chains = sum(r["reverse_seconds_per_sample"] for r in results["arms"]) * results["n"]
        fits = sum(s["dip_seconds_per_image"] * s["n"] for s in results["sources"].values())
        return float(chains + fits), "chains, all resumes + the sources' DIP fits"
    return float(stage.get("seconds", 0.0)), "the stage's last run"


# a project config file named by its absolute path in some checkout (a stage's argv)
CONFIG_PATH = re.compile(r"(?:/[\w.+-]+)+/(configs/[\w.+-]+\.yaml)")
# an absolute path left after the rewrites: refused, it would name the machine's folders
ABSOLUTE = re.compile(r"(?<![\w.:/])/(?:[\w.+-]+/)+[\w.+-]*")


def _copy_text(src: Path, dst: Path, subs: list[tuple[str, str]]) -> None:
    text = src.read_text()
    for old, new in subs:
        text = text.replace(old, new)
    text = CONFIG_PATH.sub(r"\1", text)
    left = ABSOLUTE.search(text)
    if left:
        raise UserError(f"{src}: an absolute path would be exported ({left.group(0)!r}); "
                        f"export a study whose run dirs lie under its run.dir")
    dst.write_text(text)


def export_study(cfg: Config, stages: list[Stage], study_dir: Path, out_dir: Path,
                 project_root: Path, done) -> dict:
    """Copy the finished stages of `stages` into out_dir and write export.json; return it."""
    out_dir = Path(out_dir)
    if out_dir.resolve() == study_dir.resolve() or study_dir.resolve() in out_dir.resolve().parents:
        raise UserError(f"--export {out_dir}: must be outside the study dir {study_dir}")
    costs = estimate(stages, cfg, done=lambda s: False, progress=False)  # as before it ran
    here = os.path.relpath(out_dir)  # the copies point at each other from where one runs
    subs = [(str(study_dir.resolve()), here), (str(study_dir), here),
            (str(Path(cfg.data.dir).resolve()), EXPORT_DATA), (str(cfg.data.dir), EXPORT_DATA),
            (str(project_root.resolve()) + "/", "")]
    record = {"study": study_dir.name, "machine": machine_description(), "stages": {}}
    # every stage is copied into a staging folder first: a refused file leaves out_dir as it was
    staging = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for s in stages:
            entry = {"kind": s.kind, "job": s.job, "estimate_seconds": costs[s.name].seconds,
                     "done": bool(done(s))}
            if entry["done"]:
                entry.update(_copy_stage(s, study_dir / s.name, staging / s.name, subs))
            record["stages"][s.name] = entry
        for name, entry in record["stages"].items():
            if entry["done"]:
                final = out_dir / name
                if final.exists():
                    shutil.rmtree(final)
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / name, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    atomic_write_json(out_dir / EXPORT_FILE, record)
    return record


def _copy_stage(s: Stage, src: Path, dst: Path, subs: list[tuple[str, str]]) -> dict:
    """Copy one finished stage's files into dst; return its wall time and what it counts."""
    dst.mkdir(parents=True)
    for path in [src / f for f in TOP_FILES] + sorted(src.glob("*.png")) \
            + sorted((src / "samples").glob("*.png")) + sorted((src / "samples").glob("*.json")):
        if not path.is_file():
            continue
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix in TEXT_SUFFIXES:
            _copy_text(path, target, subs)
        else:
            shutil.copyfile(path, target)
    results = read_json(src / RESULTS_FILE) if (src / RESULTS_FILE).exists() else {}
    seconds, what = stage_seconds(s.kind, results, read_json(src / STAGE_FILE))
    return {"seconds": seconds, "seconds_are": what}
