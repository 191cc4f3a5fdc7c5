"""Find the run dirs under a folder and sort them by what they hold, never by their names.

A run dir is a folder with config.yaml. What it is comes from its results.json:
  train        {"job": "train", "variant", "T", "final_loss", "train_seconds", ...}
  fit_dip      {"sigma": {...}, "num_images"}               (dipddpm/dip/table.py)
  restoration  {"protocol": "restoration", "tasks": {...}}  (dipddpm/protocols/restoration.py)
  generation   {"protocol": "generation", "arms": [...]}    (dipddpm/protocols/generation.py)
  classifier   {"classifier": {...}, "floors": [...]}       (jobs/train_classifier.py)
  fid_curve    {"protocol": "fid_curve", "points": [...]}   (dipddpm/protocols/fid_curve.py)
and any run dir's samples/<tag>.json written by jobs.sample is a sampling-time measurement,
matched to the training run whose weights it used. Run dirs whose results are unreadable or
incomplete are listed in `skipped` with the reason, so the report can say what it left out.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from dipddpm.config import UserError, migrate
from dipddpm.runs import CHECKPOINTS_DIR, CONFIG_FILE, RESULTS_FILE, SAMPLES_DIR

TRAIN_KEYS = ("variant", "model", "params", "T", "epochs", "steps", "images_seen",
              "train_seconds", "final_loss", "dip_iters", "world_size")
SAMPLE_KEYS = ("sampler", "t0", "num", "nfe_per_sample", "seconds")
KINDS = ("train", "fit_dip", "restoration", "generation", "classifier", "fid_curve")
# W&B keeps its own files (and never a config.yaml of ours) here: no need to walk them
_NOT_RUNS = {"wandb", "checkpoints", "batches", "__pycache__"}


@dataclass
class Run:
    path: Path  # as found under the runs dir (not resolved: relative links stay readable)
    kind: str
    config: dict
    results: dict

    @property
    def name(self) -> str:
        return self.path.name

    def cfg(self, dotted: str, default=None):
        node = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node


@dataclass
class Sampling:
    """One jobs.sample measurement: `num` images drawn in `seconds`."""
    path: Path  # the samples/<tag>.json file
    info: dict
    train: Optional[Run]  # the training run whose weights drew them, when found
    variant: Optional[str]
    T: Optional[int]


@dataclass
class Runs:
    root: Path
    by_kind: dict = field(default_factory=lambda: {k: [] for k in KINDS})
    sampling: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (path, reason)
    run_dirs: int = 0

    def __getitem__(self, kind: str) -> list:
        return self.by_kind[kind]


def _read(path: Path, loader):
    try:
        with open(path) as f:
            return loader(f), None
    except (OSError, ValueError, yaml.YAMLError) as e:
        return None, f"{path.name} unreadable ({type(e).__name__})"


def classify(results) -> tuple[Optional[str], Optional[str]]:
    """(kind, None), or (None, why not) for results the report cannot use."""
    if not isinstance(results, dict):
        return None, "results.json is not an object"
    if results.get("job") == "train":
        missing = [k for k in TRAIN_KEYS if k not in results]
        return ("train", None) if not missing else (None, f"training results lack {missing}")
    if results.get("protocol") == "restoration":
        return ("restoration", None) if isinstance(results.get("tasks"), dict) \
            else (None, "restoration results without tasks")
    if results.get("protocol") == "generation":
        return ("generation", None) if isinstance(results.get("arms"), list) \
            else (None, "generation results without arms")
    if results.get("protocol") == "fid_curve":
        return ("fid_curve", None) if isinstance(results.get("points"), list) \
            else (None, "fid_curve results without points")
    if "classifier" in results and "floors" in results:
        return "classifier", None
    if "sigma" in results and "num_images" in results:
        return "fit_dip", None
    return None, "results.json of an unknown kind"


def _walk(root: Path, exclude: set):
    """(folder, has config.yaml) for every folder under root that holds config.yaml or a
    samples/ folder (jobs.sample into a run dir made before it wrote config.yaml), following
    links once."""
    seen = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen or real in exclude:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if d not in _NOT_RUNS and not d.startswith("."))
        if CONFIG_FILE in files or SAMPLES_DIR in dirs:
            yield Path(folder), CONFIG_FILE in files


def _candidates(text: str, root: Path) -> list[Path]:
    """A path written by a job, relative to wherever that job ran: try the usual places."""
    p = Path(text)
    if p.is_absolute():
        return [p]
    # a tail of the path may be relative to the runs dir (the report runs from elsewhere, or
    # the runs dir was moved): runs/quickstart/train/x/ema.pt -> <root>/train/x/ema.pt
    return [Path.cwd() / p, root.parent / p] + [root.joinpath(*p.parts[i:])
                                                for i in range(len(p.parts))]


def _source_run(info: dict, run: Run, root: Path, known: dict) -> Optional[Run]:
    """The discovered run dir whose weights drew these samples: the weights file the json
    records (a run's ema.pt, or one in checkpoints/img-*/), else sample.checkpoint (empty: the
    sampling run's own dir). Never a folder further up: the runs dir itself may be a run dir."""
    texts = [info.get("weights") or "", run.cfg("sample.checkpoint") or str(run.path)]
    for text in filter(None, texts):
        for cand in _candidates(text, root):
            if not cand.exists():
                continue
            cand = cand.resolve()
            if cand.is_file():
                chain = [cand.parent, *list(cand.parents)[1:3]]  # run/ema.pt, run/checkpoints/x/
            else:
                chain = [cand] + ([cand.parent.parent] if cand.parent.name == CHECKPOINTS_DIR
                                  else [])
            for folder in chain:
                if folder in known:
                    return known[folder]
    return None


def _sampling(run: Run, runs: Runs, known: dict) -> None:
    for path in sorted((run.path / SAMPLES_DIR).glob("*.json")):
        info, why = _read(path, json.load)
        if not isinstance(info, dict) or any(k not in info for k in SAMPLE_KEYS):
            continue  # not a jobs.sample record (e.g. some other json a job keeps there)
        src = _source_run(info, run, runs.root, known)
        T = (info.get("diffusion") or {}).get("T")
        if src is not None and src.kind == "train":
            variant, T = src.results["variant"], int(src.results["T"])
        elif src is not None and src.cfg("train.noise") is not None:
            # a training run that has not written results.json (older runs): its config says
            variant = "dip_in_training" if src.cfg("train.noise") == "dip" else "ddpm"
            T = T or src.cfg("diffusion.T")
        else:
            variant = None
        runs.sampling.append(Sampling(path, info, src if src and src.kind == "train" else None,
                                      variant, T))


def discover(runs_dir, exclude=()) -> Runs:
    """Every run dir under runs_dir, sorted by kind; `exclude`: folders not to look into (the
    report's own run dir). Raises UserError when there is no run dir at all."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise UserError(f"RUNS_DIR = {str(runs_dir)!r}: no such directory")
    runs = Runs(root)
    all_runs = []
    for folder, has_config in _walk(root, {os.path.realpath(e) for e in exclude}):
        if not has_config:
            all_runs.append(Run(folder, "", {}, {}))  # only a sampling measurement, if any
            continue
        runs.run_dirs += 1
        config, why = _read(folder / CONFIG_FILE, yaml.safe_load)
        if why:
            runs.skipped.append((folder, why))
            continue
        config = migrate(config, stored=True) if isinstance(config, dict) else {}
        results, kind = {}, None
        if (folder / RESULTS_FILE).exists():
            results, why = _read(folder / RESULTS_FILE, json.load)
            if why is None:
                kind, why = classify(results)
            if why:
                runs.skipped.append((folder, why))
        run = Run(folder, kind or "", config, results if kind else {})
        all_runs.append(run)
        if kind:
            runs.by_kind[kind].append(run)
    known = {r.path.resolve(): r for r in all_runs if r.config}
    for run in all_runs:
        before = len(runs.sampling)
        _sampling(run, runs, known)
        # the runs dir itself may be a run dir (jobs.study keeps its config there), and a
        # jobs.sample run dir has its samples/*.json instead of results.json: not misses
        if run.config and not run.kind and not (run.path / RESULTS_FILE).exists() \
                and run.path != root and len(runs.sampling) == before:
            runs.skipped.append((run.path, "no results.json yet (unfinished, or a job without "
                                           "one)"))
    if runs.run_dirs == 0 and not runs.sampling:
        raise UserError(f"RUNS_DIR = {str(runs_dir)!r}: no run dirs under it (folders with "
                        f"{CONFIG_FILE})")
    return runs
