"""The report's tables, built from discovered run dirs: the study's five tables with our numbers
beside its own, then the protocol tables. Each builder returns a Table whose rows are already
formatted cells (the same cells go to REPORT.md and to W&B), or a Table with `not_run` set
when the runs it needs are missing.

The study's numbers live here, in one place (its DIP PSNR ones come from dipddpm.dip.table,
which prints them beside every fit_dip table).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from dipddpm.artifacts import DASH, fmt
from dipddpm.config import result_keys
from dipddpm.dip.table import STUDY_ITERS, STUDY_PSNR
from dipddpm.report.discover import Run, Runs

# The original study (FashionMNIST, Colab T4), as printed in its tables.
STUDY_DEVICE = "Colab T4"
STUDY_TRAIN_T = 1000
STUDY_TRAIN_SECONDS = {"ddpm": 34 * 60 + 18.67, "dip_in_training": 36 * 60 + 8.40}
STUDY_TS = [200, 400, 600, 800, 1000]
STUDY_SAMPLE_SECONDS = {"dip_in_training": [1.25, 2.63, 3.87, 4.83, 6.26],
                        "ddpm": [1.38, 3.43, 4.13, 6.02, 6.35]}
STUDY_LOSS = {"dip_in_training": [0.45, 0.52, 0.53, 0.56, 0.58],
              "ddpm": [0.065, 0.050, 0.043, 0.039, 0.032]}
STUDY_DIP_ITERS_TRIED, STUDY_DIP_ITERS_CHOSEN = [100, 50, 10, 3], 3
STUDY_EPOCHS_TRIED, STUDY_EPOCHS_CHOSEN = list(range(5, 21)), 15
VARIANTS = {"ddpm": "DDPM", "dip_in_training": "DIP+DDPM"}

# The sections that set what a training run computes, apart from where and how its data is read;
# within them, neutral keys (dipddpm.config: logging, cadence, ...) do not tell runs apart either.
_TRAINING = ("run", "model", "diffusion", "train", "dip")
# ES-WMV settings only stop DIP fits, never the variant's few-iteration DIP noise
_NOT_TRAINING = ("dip.es_window", "dip.es_patience")
DIP_ROWS_AFTER_STUDY = 12  # a 3000-iteration fit records 60 points: thin those past 400


@dataclass
class Table:
    key: str  # W&B table name
    heading: str
    columns: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    intro: list = field(default_factory=list)  # lines before the table
    notes: list = field(default_factory=list)  # lines after it
    not_run: Optional[str] = None
    plots: list = field(default_factory=list)  # (title, PNG path) shown beside the table


def fmt_loss(v) -> str:
    return DASH if v is None else f"{v:.4g}"


def fmt_study_loss(v) -> str:
    """The study's losses as it printed them (0.050, not 0.05)."""
    return f"{v:.3f}" if v < 0.1 else f"{v:.2f}"


def minutes(seconds: Optional[float]) -> str:
    if seconds is None:
        return DASH
    m, s = divmod(float(seconds), 60)
    return f"{int(m)} min {s:.2f} s" if m else f"{s:.2f} s"


def rel(path, root) -> str:
    return os.path.relpath(path, root)


# ----------------------------------------------------------------------------- training runs

def epochs_of(run: Run) -> float:
    """The epochs a run was set to train (its config), or, when train.max_steps cut it short,
    the epochs it read (3 significant digits: 0.005 and 0.01 stay apart)."""
    configured = run.cfg("train.epochs")
    if configured is not None and run.cfg("train.max_steps") is None:
        return float(configured)
    return float(f"{float(run.results['epochs']):.3g}")


def plain_runs(runs: Runs) -> list[Run]:
    """The training runs of the main comparison: the study's DIP iterations (3) or the Gaussian
    path, at the number of epochs most of them ran (ties: the longer)."""
    plain = [r for r in runs["train"] if r.results["dip_iters"] in (None, 3)]
    if not plain:
        return []
    counts = Counter(epochs_of(r) for r in plain)
    epochs = max(counts, key=lambda e: (counts[e], e))
    return [r for r in plain if epochs_of(r) == epochs]


def _latest(rs: list[Run]) -> Run:
    """Of runs of the same setting, the one that saw most images (then the newest)."""
    return max(rs, key=lambda r: (r.results["images_seen"],
                                  os.path.getmtime(r.path / "results.json")))


def by_variant_T(rs: list[Run]) -> dict:
    groups: dict = {}
    for r in rs:
        groups.setdefault((r.results["variant"], int(r.results["T"])), []).append(r)
    return {k: _latest(v) for k, v in groups.items()}


def main_T(runs: Runs) -> tuple[Optional[int], dict]:
    """The largest T that has both variants among the plain runs (else the largest T at all),
    and {variant: run} at that T."""
    table = by_variant_T(plain_runs(runs))
    if not table:
        return None, {}
    both = [T for (v, T) in table if v == "ddpm" and ("dip_in_training", T) in table]
    T = max(both) if both else max(T for _, T in table)
    return T, {v: r for (v, t), r in table.items() if t == T}


def setting(run: Run, varying: tuple) -> tuple:
    """What the run's config fixes, apart from `varying` and the keys that do not matter."""
    keep = {k: v for k, v in result_keys(run.config, _TRAINING).items()
            if k not in varying and k not in _NOT_TRAINING}
    return tuple(sorted((k, repr(v)) for k, v in keep.items()))


def ablation_group(rs: list[Run], varying: tuple, value) -> list[Run]:
    """The largest set of runs that differ only in `varying` (>= 2 distinct values), sorted by
    value; [] when no two runs differ only there."""
    groups: dict = {}
    for r in rs:
        groups.setdefault(setting(r, varying), []).append(r)
    best: list = []
    for members in groups.values():
        by_value: dict = {}
        for r in members:
            by_value.setdefault(value(r), []).append(r)
        if len(by_value) >= 2 and len(by_value) > len(best):
            best = [_latest(v) for _, v in sorted(by_value.items())]
    return best


# ----------------------------------------------------------------------------- the study's tables

def best_fit(fits: list[Run]) -> Run:
    """The fit_dip run behind table 1: most images, then the longest budget, most sigmas, newest."""
    def longest(r):
        return max((max(v["iters"], default=0) for v in r.results["sigma"].values()), default=0)

    return max(fits, key=lambda r: (r.results["num_images"], longest(r), len(r.results["sigma"]),
                                    os.path.getmtime(r.path / "results.json")))


def dip_psnr_table(runs: Runs) -> Table:
    t = Table("dip_psnr", "1. DIP PSNR vs iterations")
    fits = runs["fit_dip"]
    if not fits:
        t.not_run = "no fit_dip run (python -m jobs.fit_dip) under RUNS_DIR"
        return t
    run = best_fit(fits)
    sig = run.results["sigma"]
    n = run.results["num_images"]
    t.intro = [f"Ours: `{rel(run.path, runs.root)}`, N = {n} FashionMNIST test images per σ; "
               "PSNR (dB) of the DIP estimate (output EMA) against the clean image, mean ± std "
               "over images. The study's column is its reported DIP PSNR (noise level not "
               "stated)."]
    t.columns = ["iterations", "study"] + [f"ours σ={s}" for s in sig]
    study = dict(zip(STUDY_ITERS, STUDY_PSNR))
    ours = sorted(set().union(*[set(v["iters"]) for v in sig.values()]))
    late = [i for i in ours if i > max(STUDY_ITERS)]
    step = -(-len(late) // DIP_ROWS_AFTER_STUDY)  # ceil: at most that many rows, last kept
    late = late[::-1][::step][::-1] if late else []
    iters = sorted(set(STUDY_ITERS) | {i for i in ours if i <= max(STUDY_ITERS)} | set(late))
    for i in iters:
        row = [str(i), fmt(study.get(i))]
        for v in sig.values():
            j = v["iters"].index(i) if i in v["iters"] else None
            row.append(DASH if j is None else f"{v['psnr_mean'][j]:.2f} ± {v['psnr_std'][j]:.2f}")
        t.rows.append(row)
    for label, key in (("noisy input", "noisy_psnr"),
                       ("raw: oracle peak (needs the clean image)", "oracle_raw_psnr"),
                       ("raw: ES-WMV pick", "es_wmv_psnr"),
                       ("EMA: oracle peak (needs the clean image)", "oracle_psnr"),
                       ("EMA at ES-WMV's pick", "es_wmv_ema_psnr"),
                       ("ES-WMV cost (iterations: pick + patience)", "es_wmv_cost_iters"),
                       ("budget (last iteration)", "budget_psnr")):
        # older results lack the raw oracle and the EMA at ES-WMV's pick: a dash
        t.rows.append([label, DASH] + [fmt(v.get(key), 0 if "cost" in key else 2)
                                       for v in sig.values()])
    t.notes.append("ES-WMV is compared like with like: its raw output against the raw "
                   "output's oracle, the EMA at its pick against the EMA's oracle.")
    return t


def training_time_table(runs: Runs) -> Table:
    t = Table("training_time", "2. Training time: DDPM vs DIP+DDPM")
    T, at = main_T(runs)
    if T is None:
        t.not_run = ("no training run (python -m jobs.train, results.json with job 'train' and "
                     "dip_iters 3 or null) under RUNS_DIR")
        return t
    epochs = epochs_of(next(iter(at.values())))
    t.intro = [f"Ours at T = {T} (the largest T with both variants), {epochs:g} epochs; the "
               f"study at T = {STUDY_TRAIN_T} on a {STUDY_DEVICE}. images/s counts training "
               "images over the loop's wall time (sample grids excluded)."]
    t.columns = ["", "study DDPM", "ours DDPM", "study DIP+DDPM", "ours DIP+DDPM"]

    def row(label, study_ddpm, study_variant, f):
        ours = {v: DASH if at.get(v) is None else f(at[v]) for v in VARIANTS}
        t.rows.append([label, study_ddpm, ours["ddpm"], study_variant, ours["dip_in_training"]])

    i = STUDY_TS.index(STUDY_TRAIN_T)
    row("train time", minutes(STUDY_TRAIN_SECONDS["ddpm"]),
        minutes(STUDY_TRAIN_SECONDS["dip_in_training"]),
        lambda r: minutes(r.results["train_seconds"]))

    def per_second(r):
        seconds = r.results["train_seconds"]
        return fmt(r.results["images_seen"] / seconds, 1) if seconds else DASH

    row("images/s", DASH, DASH, per_second)
    row("final loss", fmt_study_loss(STUDY_LOSS["ddpm"][i]),
        fmt_study_loss(STUDY_LOSS["dip_in_training"][i]),
        lambda r: fmt_loss(r.results["final_loss"]))
    row("model (params)", DASH, DASH, lambda r: f"{r.results['model']} ({r.results['params']:,})")
    row("epochs / steps / images", "15 / — / —", "15 / — / —",
        lambda r: f"{r.results['epochs']:g} / {r.results['steps']} / {r.results['images_seen']:,}")
    # a "device" key is optional in a training run's results.json (older runs lack it)
    row("device × processes (precision)", f"{STUDY_DEVICE} × 1", f"{STUDY_DEVICE} × 1",
        lambda r: f"{r.results.get('device') or 'not recorded'} × {r.results['world_size']} "
                  f"({r.results.get('mixed_precision') or DASH})")
    row("run dir", DASH, DASH, lambda r: f"`{rel(r.path, runs.root)}`")
    missing = [VARIANTS[v] for v in VARIANTS if v not in at]
    if missing:
        t.notes.append(f"not run: {' and '.join(missing)} at T = {T}")
    return t


def _vs_T_table(t: Table, ours: dict, study: dict, cell, what: str) -> Table:
    if not ours:
        t.not_run = what
        return t
    t.columns = ["T", "study DIP+DDPM", "ours DIP+DDPM", "study DDPM", "ours DDPM"]
    Ts = sorted(set(STUDY_TS) | {T for _, T in ours})
    for T in Ts:
        i = STUDY_TS.index(T) if T in STUDY_TS else None
        s = {v: DASH if i is None else cell(study[v][i], None) for v in VARIANTS}
        o = {v: cell(None, ours[(v, T)]) if (v, T) in ours else DASH for v in VARIANTS}
        t.rows.append([str(T), s["dip_in_training"], o["dip_in_training"], s["ddpm"], o["ddpm"]])
    missing = [f"{VARIANTS[v]}" for v in VARIANTS if not any(k[0] == v for k in ours)]
    if missing:
        t.notes.append(f"not run: {' and '.join(missing)} at any T")
    return t


def sampling_points(runs: Runs) -> dict:
    """{(variant, T): Sampling}: full T-step ancestral DDPM sampling from noise, per (variant,
    T) the measurement with the most images."""
    full = [s for s in runs.sampling
            if s.variant and s.info["sampler"] == "ddpm" and s.T and int(s.info["t0"]) == s.T]
    ours: dict = {}
    for s in full:
        key = (s.variant, s.T)
        if key not in ours or s.info["num"] > ours[key].info["num"]:
            ours[key] = s
    return ours


def sampling_table(runs: Runs) -> Table:
    t = Table("sampling_time", "3. Sampling time vs T")
    ours = sampling_points(runs)
    t.intro = ["Seconds to draw the stated number of images with all T ancestral DDPM steps "
               "(python -m jobs.sample sample.sampler=ddpm, from noise), EMA weights of the "
               "training run; the study's images per measurement are not stated."]
    models = sorted({s.info.get("model", "?") for s in ours.values()})
    if models:
        t.intro.append(f"Ours: model {', '.join(models)}; cells are seconds (images).")

    def cell(study, s):
        return fmt(study) if s is None else f"{s.info['seconds']:.2f} ({s.info['num']})"

    return _vs_T_table(t, ours, STUDY_SAMPLE_SECONDS, cell,
                       "no jobs.sample run with sample.sampler=ddpm from noise (t0 = T) whose "
                       "weights match a training run under RUNS_DIR")


def loss_table(runs: Runs) -> Table:
    t = Table("loss_vs_T", "4. Loss vs T")
    ours = by_variant_T(plain_runs(runs))
    t.intro = ["Final training loss (mean of the last log interval; epsilon MSE for DDPM, the "
               "same objective against the DIP output for DIP+DDPM)."]

    def cell(study, r):
        return fmt_study_loss(study) if r is None else fmt_loss(r.results["final_loss"])

    return _vs_T_table(t, ours, STUDY_LOSS, cell, "no training runs under RUNS_DIR")


def dip_iters_ablation(runs: Runs) -> list[Run]:
    """DIP+DDPM runs that differ only in train.dip_iters, by DIP iterations (table 5a)."""
    variant_runs = [r for r in runs["train"] if r.results["variant"] == "dip_in_training"]
    return ablation_group(variant_runs, ("train.dip_iters",), lambda r: r.results["dip_iters"])


def epochs_ablation(runs: Runs) -> dict:
    """{variant: runs of it that differ only in train.epochs, by epochs} (table 5b)."""
    out = {}
    for v in VARIANTS:
        rs = [r for r in runs["train"] if r.results["variant"] == v]
        out[v] = ablation_group(rs, ("train.epochs", "train.max_steps"), epochs_of)
    return out


def ablation_tables(runs: Runs) -> list[Table]:
    a = Table("ablation_dip_iters", "5a. Ablation: DIP iterations (DIP+DDPM)")
    group = dip_iters_ablation(runs)
    if not group:
        a.not_run = ("no two DIP+DDPM training runs that differ only in train.dip_iters "
                     f"(the study tried {'/'.join(map(str, STUDY_DIP_ITERS_TRIED))}, chose "
                     f"{STUDY_DIP_ITERS_CHOSEN})")
    else:
        a.intro = [f"Runs at T = {group[0].results['T']}, {epochs_of(group[0]):g} epochs, "
                   f"differing only in train.dip_iters. The study tried "
                   f"{'/'.join(map(str, STUDY_DIP_ITERS_TRIED))} and chose "
                   f"{STUDY_DIP_ITERS_CHOSEN} (no numbers reported)."]
        a.columns = ["DIP iterations", "study", "final loss", "train time", "run dir"]
        for r in group:
            it = r.results["dip_iters"]
            st = ("chosen" if it == STUDY_DIP_ITERS_CHOSEN else
                  "tried" if it in STUDY_DIP_ITERS_TRIED else DASH)
            a.rows.append([str(it), st, fmt_loss(r.results["final_loss"]),
                           minutes(r.results["train_seconds"]), f"`{rel(r.path, runs.root)}`"])
    b = Table("ablation_epochs", "5b. Ablation: epochs")
    b.columns = ["variant", "epochs", "study", "final loss", "train time", "run dir"]
    for v, group in epochs_ablation(runs).items():
        name = VARIANTS[v]
        for r in group:
            e = epochs_of(r)
            st = ("chosen" if e == STUDY_EPOCHS_CHOSEN else
                  "tried" if e in STUDY_EPOCHS_TRIED else DASH)
            b.rows.append([name, f"{e:g}", st, fmt_loss(r.results["final_loss"]),
                           minutes(r.results["train_seconds"]), f"`{rel(r.path, runs.root)}`"])
    if not b.rows:
        b.not_run = ("no two training runs of one variant that differ only in train.epochs "
                     f"(the study tried {STUDY_EPOCHS_TRIED[0]}..{STUDY_EPOCHS_TRIED[-1]}, "
                     f"chose {STUDY_EPOCHS_CHOSEN})")
    else:
        b.intro = ["Runs of one variant differing only in train.epochs (as configured; as "
                   "read when train.max_steps cut a run short). The study tried "
                   f"{STUDY_EPOCHS_TRIED[0]}..{STUDY_EPOCHS_TRIED[-1]} and chose "
                   f"{STUDY_EPOCHS_CHOSEN} (no numbers reported)."]
    return [a, b]


def study_tables(runs: Runs) -> list[Table]:
    return [dip_psnr_table(runs), training_time_table(runs), sampling_table(runs),
            loss_table(runs), *ablation_tables(runs)]
