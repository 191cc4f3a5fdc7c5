"""The study's series as numbers, for native W&B line charts beside the report's PNGs.

    for s in report_series(runs):   # Series(key, title, xname, lines={name: [(x, y), ...]})
        tracker.log_lines(s.key, s.lines, title=s.title, xname=s.xname)

Each series takes its runs with the same selectors as the tables and PNGs (tables.py), so a
chart shows what its table prints; a series with no run of ours is left out. The study's
numbers (FashionMNIST, Colab T4) are lines named "study ...", ours "ours ...".
"""
from __future__ import annotations

from dataclasses import dataclass, field

from dipddpm.report.discover import Runs
from dipddpm.report.tables import (STUDY_LOSS, STUDY_SAMPLE_SECONDS, STUDY_TS, VARIANTS,
                                   best_fit, by_variant_T, dip_iters_ablation, epochs_ablation,
                                   epochs_of, plain_runs, sampling_points)


@dataclass
class Series:
    key: str
    title: str
    xname: str
    lines: dict = field(default_factory=dict)  # line name -> [(x, y), ...], x ascending


def _vs_T(key: str, title: str, ours: dict, study: dict) -> Series | None:
    """ours: {(variant, T): y}; study: {variant: [y per STUDY_TS]}."""
    if not ours:
        return None
    s = Series(key, title, "T")
    for v, name in VARIANTS.items():
        s.lines[f"study {name}"] = list(zip(STUDY_TS, study[v]))
        mine = sorted((T, y) for (vv, T), y in ours.items() if vv == v and y is not None)
        if mine:
            s.lines[f"ours {name}"] = mine
    return s


def _front(points: list) -> list:
    """The points that beat every cheaper one: an arm's best value at or below each cost."""
    out: list = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y is not None and (not out or y > out[-1][1]):
            out.append((x, y))
    return out


def report_series(runs: Runs) -> list[Series]:
    """Every series some run of ours feeds (see the module docstring)."""
    out = [
        _vs_T("series/loss_vs_T", "Final training loss vs T",
              {k: r.results["final_loss"] for k, r in by_variant_T(plain_runs(runs)).items()},
              STUDY_LOSS),
        _vs_T("series/sampling_time_vs_T", "Seconds for T-step ancestral sampling vs T",
              {k: s.info["seconds"] for k, s in sampling_points(runs).items()},
              STUDY_SAMPLE_SECONDS),
    ]
    group = dip_iters_ablation(runs)
    if group:
        out.append(Series("series/ablation_dip_iters", "Ablation: final loss vs DIP iterations",
                          "DIP iterations per batch", {"ours DIP+DDPM": sorted(
                              (r.results["dip_iters"], r.results["final_loss"]) for r in group
                              if r.results["final_loss"] is not None)}))
    groups = {v: g for v, g in epochs_ablation(runs).items() if g}
    if groups:
        out.append(Series("series/ablation_epochs", "Ablation: final loss vs epochs", "epochs",
                          {f"ours {VARIANTS[v]}": sorted(
                              (epochs_of(r), r.results["final_loss"]) for r in g
                              if r.results["final_loss"] is not None)
                           for v, g in groups.items()}))
    if runs["fit_dip"]:
        run = best_fit(runs["fit_dip"])
        out.append(Series("series/dip_psnr_vs_iterations",
                          f"DIP: PSNR vs iterations (mean over {run.results['num_images']} "
                          "images)", "DIP iterations",
                          {f"σ = {s}": list(zip(v["iters"], v["psnr_mean"]))
                           for s, v in run.results["sigma"].items()}))
    for run in runs["restoration"]:
        for name, task in run.results.get("tasks", {}).items():
            primary, lines = task["primary"], {}
            for r in task["rows"]:
                if r["gflop_per_image"] > 0:
                    label = r["arm"] + (f" ({r['estimate']})" if r.get("estimate") else "") + \
                        (" [oracle: a bound]" if r.get("oracle") else "")
                    lines.setdefault(label, []).append((r["gflop_per_image"], r[primary]))
            if lines:
                out.append(Series(f"series/{run.name}/{name}_vs_gflop",
                                  f"{name}: best {primary} per arm at each cost vs GFLOP per "
                                  f"image ({run.name}, N = {run.results.get('num_images')})",
                                  "GFLOP per image", {k: _front(v) for k, v in lines.items()}))
    return [s for s in out if s is not None and any(s.lines.values())]
