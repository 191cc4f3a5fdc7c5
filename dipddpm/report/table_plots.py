"""A PNG beside each table of the report that holds numbers: the study's tables 2-5, the DIP
stopping rows of table 1, every generation run's KID (with its error bars) and its memorisation
distances. Each plot draws what its table prints, from the same run dirs picked the same way
(the selectors live in tables.py); a table that is not run gets no plot.

    attach_plots(runs, tables, out_dir)   # writes the PNGs, appends (title, path) to Table.plots

The study's numbers (FashionMNIST, Colab T4) are drawn dashed with crosses, ours solid with
dots; an oracle quantity (it needs the clean image) is drawn grey and labelled as a bound.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np

from dipddpm.artifacts import pyplot, save_png
from dipddpm.report.discover import Run, Runs
from dipddpm.report.tables import (STUDY_DEVICE, STUDY_DIP_ITERS_CHOSEN, STUDY_EPOCHS_CHOSEN,
                                   STUDY_LOSS, STUDY_SAMPLE_SECONDS, STUDY_TRAIN_SECONDS,
                                   STUDY_TRAIN_T, STUDY_TS, VARIANTS, Table, best_fit, by_variant_T,
                                   dip_iters_ablation, epochs_ablation, epochs_of, main_T,
                                   plain_runs, sampling_points)

STUDY_STYLE = dict(linestyle="--", marker="x", markersize=6)
OURS_STYLE = dict(linestyle="-", marker="o", markersize=4)
COLORS = {"ddpm": "tab:blue", "dip_in_training": "tab:orange"}


def attach_plots(runs: Runs, tables: list[Table], out_dir) -> list[tuple[str, Path]]:
    """Draw every plot whose table has numbers into out_dir; append (title, path) to that
    table's `plots` and return them all (for W&B)."""
    out_dir = Path(out_dir)
    by_key = {t.key: t for t in tables if not t.not_run}
    made: list[tuple[str, Path]] = []

    def put(key: str, title: str, draw, path: Path):
        if key not in by_key:
            return
        path = draw(path)
        if path is not None:
            by_key[key].plots.append((title, path))
            made.append((title, path))

    put("dip_psnr", "DIP stopping rules", lambda p: stopping_plot(runs, p),
        out_dir / "dip_stopping.png")
    put("training_time", "Training time and final loss", lambda p: training_time_plot(runs, p),
        out_dir / "training_time.png")
    put("sampling_time", "Sampling time vs T", lambda p: sampling_time_plot(runs, p),
        out_dir / "sampling_time.png")
    put("loss_vs_T", "Loss vs T", lambda p: loss_vs_T_plot(runs, p), out_dir / "loss_vs_T.png")
    put("ablation_dip_iters", "Ablation: DIP iterations", lambda p: dip_iters_plot(runs, p),
        out_dir / "ablation_dip_iters.png")
    put("ablation_epochs", "Ablation: epochs", lambda p: epochs_plot(runs, p),
        out_dir / "ablation_epochs.png")
    for run in runs["generation"]:
        key, slug = f"generation/{run.name}", re.sub(r"[^A-Za-z0-9_-]", "_", run.name)
        put(key, "KID per arm", lambda p, r=run: kid_plot(r, p), out_dir / f"kid-{slug}.png")
        put(key, "Memorisation: distances to the nearest training image",
            lambda p, r=run: memorisation_plot(r, p), out_dir / f"memorisation-{slug}.png")
    return made


# ----------------------------------------------------------------------------- the study's tables

def stopping_plot(runs: Runs, path) -> Optional[Path]:
    """Table 1's stopping rows per σ: the noisy input, ES-WMV's pick, the budget's last
    iteration, and the oracle peak (a bound: it needs the clean image)."""
    fits = runs["fit_dip"]
    if not fits:
        return None
    run = best_fit(fits)
    sig = run.results["sigma"]
    rules = [("noisy input", "noisy_psnr", "tab:red"), ("ES-WMV pick", "es_wmv_psnr", "tab:green"),
             ("budget (last iteration)", "budget_psnr", "tab:blue"),
             ("oracle peak (needs the clean image: a bound)", "oracle_psnr", "grey")]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    x = np.arange(len(sig))
    for j, (label, key, color) in enumerate(rules):
        xs, ys = [], []
        for i, v in enumerate(sig.values()):
            if v.get(key) is not None:
                xs.append(x[i] + (j - 1.5) * 0.12)
                ys.append(v[key])
        ax.plot(xs, ys, "D" if key == "oracle_psnr" else "o", color=color, label=label,
                markerfacecolor="none" if key == "oracle_psnr" else color)
        for xi, yi in zip(xs, ys):
            ax.annotate(f"{yi:.2f}", (xi, yi), textcoords="offset points", xytext=(4, 0),
                        fontsize=7, va="center")
    ax.set_xticks(x, [f"σ = {s}" for s in sig])
    ax.set_xlim(-0.6, len(sig) - 0.4)
    ax.set_ylabel("PSNR vs clean (dB), mean over images")
    ax.set_title(f"DIP stopping rules, N = {run.results['num_images']} images per σ")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return save_png(fig, path)


def _ours_label(r: Run) -> str:
    return f"ours ({r.results.get('device') or 'device not recorded'} × {r.results['world_size']})"


def training_time_plot(runs: Runs, path) -> Optional[Path]:
    """Table 2: training time and final loss per variant at the main T, the study's beside."""
    T, at = main_T(runs)
    if T is None:
        return None
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 4.6))
    x = np.arange(len(VARIANTS))
    study_loss = {v: STUDY_LOSS[v][STUDY_TS.index(STUDY_TRAIN_T)] for v in VARIANTS}
    for ax, what, study, ours, log in (
            (a, "training time (min)", {v: STUDY_TRAIN_SECONDS[v] / 60 for v in VARIANTS},
             {v: r.results["train_seconds"] / 60 for v, r in at.items()}, False),
            (b, "final loss", study_loss,
             {v: r.results["final_loss"] for v, r in at.items()
              if r.results["final_loss"] is not None}, True)):
        ax.bar(x - 0.2, [study[v] for v in VARIANTS], 0.4, color="lightgrey", edgecolor="k",
               label=f"study ({STUDY_DEVICE}, T = {STUDY_TRAIN_T})")
        xs = [x[i] + 0.2 for i, v in enumerate(VARIANTS) if v in ours]
        ax.bar(xs, [ours[v] for v in VARIANTS if v in ours], 0.4,
               color=[COLORS[v] for v in VARIANTS if v in ours],
               label=_ours_label(next(iter(at.values()))) + f", T = {T}")
        for xi, v in zip(xs, [v for v in VARIANTS if v in ours]):
            ax.annotate(f"{ours[v]:.3g}", (xi, ours[v]), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, list(VARIANTS.values()))
        ax.set_ylabel(what)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y", which="both")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    a.set_title(f"Training time ({epochs_of(next(iter(at.values()))):g} epochs)")
    b.set_title("Final loss (variant: vs the DIP output)")
    return save_png(fig, path)


def _vs_T_plot(path, ours: dict, study: dict, ylabel: str, title: str, *, log: bool,
               note=None) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for v, name in VARIANTS.items():
        ax.plot(STUDY_TS, study[v], color=COLORS[v], label=f"study {name}", **STUDY_STYLE)
        pts = sorted((T, y, extra) for (vv, T), (y, extra) in ours.items() if vv == v)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=COLORS[v],
                    label=f"ours {name}", **OURS_STYLE)
            for T, y, extra in pts:
                if extra:
                    ax.annotate(extra, (T, y), textcoords="offset points", xytext=(4, 4),
                                fontsize=7)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("T (diffusion steps)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if note:
        ax.annotate(note, (0.01, 0.01), xycoords="axes fraction", fontsize=7, color="grey")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return save_png(fig, path)


def sampling_time_plot(runs: Runs, path) -> Optional[Path]:
    """Table 3: seconds for T-step ancestral sampling vs T; ours labelled with the number of
    images each measurement drew (the study's is not stated)."""
    pts = sampling_points(runs)
    if not pts:
        return None
    ours = {k: (s.info["seconds"], f"{s.info['num']} img") for k, s in pts.items()}
    return _vs_T_plot(path, ours, STUDY_SAMPLE_SECONDS, "seconds per measurement",
                      "Sampling time vs T (all T ancestral steps from noise)", log=False,
                      note=f"study: {STUDY_DEVICE}, images per measurement not stated")


def loss_vs_T_plot(runs: Runs, path) -> Optional[Path]:
    """Table 4: final training loss vs T (log scale: the variant's target differs)."""
    table = by_variant_T(plain_runs(runs))
    ours = {k: (r.results["final_loss"], None) for k, r in table.items()
            if r.results["final_loss"] is not None}
    if not ours:
        return None
    return _vs_T_plot(path, ours, STUDY_LOSS, "final loss (mean of the last log interval)",
                      "Loss vs T", log=True)


def _log_ticks(ax, values) -> None:
    """A log x axis labelled at the values themselves (3, 10, 50), not at powers of ten."""
    ax.set_xscale("log")
    ax.set_xticks(list(values), [f"{v:g}" for v in values])
    ax.minorticks_off()


def dip_iters_plot(runs: Runs, path) -> Optional[Path]:
    """Table 5a: final loss and training time vs the variant's DIP iterations."""
    group = dip_iters_ablation(runs)
    if not group:
        return None
    it = [r.results["dip_iters"] for r in group]
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 4))
    for ax, ys, label in ((a, [r.results["final_loss"] for r in group], "final loss"),
                          (b, [r.results["train_seconds"] / 60 for r in group],
                           "training time (min)")):
        pts = [(i, y) for i, y in zip(it, ys) if y is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=COLORS["dip_in_training"],
                label="ours DIP+DDPM", **OURS_STYLE)
        ax.axvline(STUDY_DIP_ITERS_CHOSEN, color="grey", linestyle=":",
                   label=f"study's choice ({STUDY_DIP_ITERS_CHOSEN}; no numbers reported)")
        _log_ticks(ax, it)
        ax.set_xlabel("DIP iterations per batch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    a.set_title(f"T = {group[0].results['T']}, {epochs_of(group[0]):g} epochs")
    b.set_title("Training time")
    return save_png(fig, path)


def epochs_plot(runs: Runs, path) -> Optional[Path]:
    """Table 5b: final loss vs epochs, one line per variant."""
    groups = {v: g for v, g in epochs_ablation(runs).items() if g}
    if not groups:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for v, group in groups.items():
        pts = [(epochs_of(r), r.results["final_loss"]) for r in group
               if r.results["final_loss"] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=COLORS[v],
                label=f"ours {VARIANTS[v]}", **OURS_STYLE)
    ax.axvline(STUDY_EPOCHS_CHOSEN, color="grey", linestyle=":",
               label=f"study's choice ({STUDY_EPOCHS_CHOSEN}; no numbers reported)")
    _log_ticks(ax, sorted({epochs_of(r) for g in groups.values() for r in g}
                          | {STUDY_EPOCHS_CHOSEN}))
    ax.set_yscale("log")
    ax.set_xlabel("epochs")
    ax.set_ylabel("final loss")
    ax.set_title("Ablation: epochs")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return save_png(fig, path)


# ----------------------------------------------------------------------------- generation runs

def arm_label(r: dict) -> str:
    return r["arm"] + (f" t0={r['t0']}" if r.get("t0") else "") + \
        (f" K={r['steps']}" if r.get("steps") else "")


def kid_plot(run: Run, path) -> Optional[Path]:
    """KID per arm with error bars of ± its std over the random subsets KID averages, and the
    real-vs-real KID floor at the same N."""
    res = run.results
    arms = [r for r in res["arms"] if r.get("kid") is not None]
    if not arms:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(arms) + 2), 4.2))
    x = np.arange(len(arms))
    ax.errorbar(x, [r["kid"] for r in arms], yerr=[r.get("kid_std") or 0 for r in arms],
                fmt="o", capsize=4, label="KID ± std over subsets")
    floor = res.get("floor") or {}
    if floor.get("kid") is not None:
        ax.axhline(floor["kid"], color="grey", linestyle=":",
                   label=f"real-vs-real floor (N = {floor.get('n')})")
    ax.set_xticks(x, [arm_label(r) for r in arms], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("KID (classifier features)")
    ax.set_title(f"KID per arm, N = {res.get('n')} samples each ({run.name})")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return save_png(fig, path)


def memorisation_plot(run: Run, path) -> Optional[Path]:
    """Per arm with a memorisation check: histograms of each sample's distance to its nearest
    training image and of the same for real test images (pixels on [0, 1]); the dotted line is
    the test images' 1st percentile (samples left of it are closer than 99% of real images)."""
    checked = []
    for r in run.results["arms"]:
        file = (r.get("memorisation") or {}).get("distances")
        if file and (run.path / file).is_file():
            with np.load(run.path / file) as d:
                checked.append((arm_label(r), d["pixels_samples"], d["pixels_test"]))
    if not checked:
        return None
    plt = pyplot()
    cols = min(3, len(checked))
    rows = -(-len(checked) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(5.0, 3.8 * cols), 3.2 * rows + 0.4),
                             squeeze=False)
    for ax, (label, ds, dt) in zip(axes.flat, checked):
        bins = np.linspace(0, max(ds.max(), dt.max()) * 1.02 + 1e-6, 30)
        p01 = np.percentile(dt, 1)
        ax.hist(dt, bins=bins, density=True, alpha=0.5, color="grey",
                label=f"real test images ({len(dt)})")
        ax.hist(ds, bins=bins, density=True, alpha=0.6, color="tab:red",
                label=f"samples ({len(ds)}; {(ds < p01).mean():.0%} left of the line)")
        ax.axvline(p01, color="k", linestyle=":", linewidth=1)
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("distance to nearest train image (px)", fontsize=7)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(checked):]:
        ax.axis("off")
    fig.suptitle(f"Memorisation ({run.name}): nearest-training-image distances", fontsize=9)
    return save_png(fig, path)
