"""REPORT.md from run dirs: the answer (does a DIP start pay off?), the study's five tables with
our numbers beside its own, the protocol tables, plots, and a "How to read this" paragraph
computed from what is there.

    build_report(cfg, runs_dir)   # what `python -m jobs.report RUNS_DIR` runs

Reads only run dirs (config.yaml, results.json, metrics.jsonl, samples/), never W&B; writes
RUNS_DIR/REPORT.md (atomically), PNG plots into cfg.run.dir (RUNS_DIR/report by default) and
logs the same tables and plots to that dir's W&B run. A table whose runs are missing becomes
one "not run: ..." line.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Optional

from dipddpm.artifacts import DASH, fmt
from dipddpm.config import Config
from dipddpm.dip.table import STUDY_PSNR
from dipddpm.evaluate.inception import describe as describe_inception
from dipddpm.protocols.restoration import (TABLE_COLUMNS, answer_sentences, table_cells,
                                           task_intro)
from dipddpm.report.discover import Runs, discover
from dipddpm.report.plots import fid_vs_nfe_plot, loss_curves_plot
from dipddpm.report.series import report_series
from dipddpm.report.table_plots import attach_plots
from dipddpm.report.tables import (VARIANTS, Table, best_fit, fmt_loss, main_T, minutes, rel,
                                   study_tables)
from dipddpm.runs import (METRICS_FILE, SAMPLES_DIR, atomic_path, atomic_write_text,
                          prepare_run_dir, read_json, read_jsonl)
from dipddpm.tracking import Tracker

REPORT_FILE = "REPORT.md"
# a study's results exported for a repository (jobs.study --export) carry export.json; their
# report is RESULTS.md and opens with the stages' estimated and real wall times
EXPORT_FILE = "export.json"
RESULTS_REPORT_FILE = "RESULTS.md"


def report_overrides(runs_dir) -> list[str]:
    """The report's own defaults: its run dir is RUNS_DIR/report; an exported study (export.json)
    gets no W&B run either, since that folder is the record and rebuilding it must write nothing
    beside RESULTS.md and its plots."""
    own = [f"run.dir={Path(runs_dir) / 'report'}"]
    return own + (["wandb.mode=disabled"] if (Path(runs_dir) / EXPORT_FILE).is_file() else [])


# ----------------------------------------------------------------------------- protocol tables

def _current(res: dict) -> bool:
    """Restoration results with FLOPs and intervals (older runs lack them: rerun jobs.restore)."""
    return "gflop" in res and all("gflop_per_image" in r for t in res["tasks"].values()
                                  for r in t["rows"])


def restoration_tables(runs: Runs) -> list[Table]:
    out = []
    for run in runs["restoration"]:
        res = run.results
        if not _current(res):
            out.append(Table(f"restoration/{run.name}",
                             f"Restoration (`{rel(run.path, runs.root)}`)",
                             not_run="made by an older version (no FLOPs, intervals or deltas): "
                                     "rerun python -m jobs.restore"))
            continue
        g = res["gflop"]
        for name, task in res["tasks"].items():
            t = Table(f"restoration/{name}", f"Restoration: {name} (`{rel(run.path, runs.root)}`)")
            t.intro = [f"N = {res.get('num_images')} {res.get('split', '')} images, T = "
                       f"{res.get('T')}, {res.get('observation')} observation, device "
                       f"{res.get('device')}; compute = NFE x {g['unet_forward']:.3f} + DIP "
                       f"iterations x {g['dip_iteration']:.3f} GFLOP. " + task_intro(res, task)
                       + " PSNR with its bootstrap 95% interval; Δ: paired per-image difference "
                       "to the best baseline at equal or lower GFLOP. Oracle rows need the clean "
                       "image: upper bounds, not methods."]
            t.columns = list(TABLE_COLUMNS)
            t.rows = [table_cells(r) for r in task["rows"]]
            if task.get("skipped"):
                t.notes.append("Skipped: " + "; ".join(task["skipped"]))
            out.append(t)
    if not out:
        out.append(Table("restoration", "Restoration protocol",
                         not_run="no restoration run (python -m jobs.restore) under RUNS_DIR"))
    return out


def answer_lines(runs: Runs) -> list[str]:
    """The answer section: per restoration run, one sentence per task and sigma."""
    usable = [r for r in runs["restoration"] if _current(r.results)]
    if not usable:
        return ["Not yet: no restoration run with FLOP accounting under this folder "
                "(python -m jobs.restore)."]
    lines = []
    for run in usable:
        if len(usable) > 1:
            lines.append(f"From `{rel(run.path, runs.root)}`:")
        lines += [f"- {s}" for s in (run.results.get("answer") or answer_sentences(run.results))]
        lines.append("")
    lines.append("Each sentence compares the best DIP start (a DDPM chain started from a DIP "
                 "estimate diffused to sigma_t0) with the best baseline that needs no DIP at equal "
                 "or lower GFLOP per image; the interval is a bootstrap over the same images. "
                 "The break-even is the most DIP iterations a DIP start could cost and still "
                 "match the baselines' front, given the reverse steps it saves. The figures "
                 "`front_<task>.png` show every point against that front.")
    return lines


def held_out(res: dict) -> str:
    """What a generation run's held-out reference is."""
    excluded = ((res.get("references") or {}).get("heldout") or {}).get("excluded")
    return "the test split without the held-out start images" if excluded is None or excluded \
        else "the whole test split: no held-out start images"


def generation_tables(runs: Runs) -> list[Table]:
    out = []
    for run in runs["generation"]:
        res = run.results
        f = res.get("floor") or {}
        fh = res.get("floor_heldout") or {}
        t = Table(f"generation/{run.name}", f"Generation (`{rel(run.path, runs.root)}`)")
        t.intro = [f"N = {res.get('n')} samples per arm, T = {res.get('T')}; FID/KID on the "
                   f"project classifier's features (test accuracy "
                   f"{(res.get('classifier') or {}).get('test_accuracy')}); real-vs-real floor "
                   f"at N = {f.get('n')}: FID {fmt(f.get('fid_vs_train'))} (vs train "
                   f"statistics), KID {fmt(f.get('kid'), 4)}"
                   + (f"; vs held-out statistics ({held_out(res)}): FID {fmt(fh.get('fid'))}, "
                      f"KID {fmt(fh.get('kid'), 4)}" if fh else "")
                   + ". 'nearest = source': share of samples whose own start image is at least "
                   "as near as their nearest training image. DIP starts run DDIM from the t0 "
                   "whose noise level matches sigma_t0 ([-1, 1] units, realised value in "
                   "brackets); clean_start is the start image itself at that level, the "
                   "zero-cost control; ddpm/ddim rows start from pure noise."]
        inception = "inception" in res  # the optional Inception FID (classifier.inception_weights)
        if inception:
            t.intro.append(f"{describe_inception(res['inception'])}: floor "
                           f"{fmt(f.get('fid_inception'))}.")
        # the held-out columns come last: older results (one reference, t0 by index) lack them
        t.columns = ["arm", "t0", "K", "NFE", "FID vs train", "KID vs train", "s/sample",
                     "nearest = source", "source", "sigma_t0", "FID vs held-out",
                     "KID vs held-out", "DIP iters"] + (["Inception FID"] if inception else [])
        for r in res["arms"]:
            mem = r.get("memorisation") or {}
            sig = r.get("sigma_t0")
            t.rows.append([r["arm"], fmt(r.get("t0")), fmt(r.get("steps")), str(r["nfe"]),
                           fmt(r["fid"]), fmt(r["kid"], 4), fmt(r.get("seconds_per_sample"), 4),
                           fmt(mem.get("source_match")), fmt(r.get("source")),
                           DASH if sig is None else
                           f"{sig:g} ({fmt(r.get('sigma_t0_realised'), 3)})",
                           fmt(r.get("fid_heldout")), fmt(r.get("kid_heldout"), 4),
                           fmt(r.get("dip_iters"), 0)]
                          + ([fmt(r.get("fid_inception"))] if inception else []))
        out.append(t)
    if not out:
        out.append(Table("generation", "Generation protocol",
                         not_run="no generation run (python -m jobs.generate_eval) under "
                                 "RUNS_DIR"))
    return out


def classifier_tables(runs: Runs) -> list[Table]:
    out = []
    for run in runs["classifier"]:
        c = run.results["classifier"]
        t = Table(f"classifier/{run.name}",
                  f"Classifier and FID floors (`{rel(run.path, runs.root)}`)")
        t.intro = [f"Test accuracy {fmt(c.get('test_accuracy'), 4)} on "
                   f"{c.get('test_images', '?')} test images. Floors: real vs real at N."]
        t.columns = ["N", "FID (test vs train, N each)", "FID vs all-train stats", "KID"]
        for f in run.results["floors"]:
            t.rows.append([str(f["n"]), fmt(f["fid"]), fmt(f["fid_vs_train"]),
                           fmt(f["kid"], 4)])
        out.append(t)
    if not out:
        out.append(Table("classifier", "Classifier and FID floors",
                         not_run="no classifier run (python -m jobs.train_classifier)"))
    return out


def fid_curve_tables(runs: Runs) -> list[Table]:
    out = []
    for run in runs["fid_curve"]:
        r = run.results
        t = Table(f"fid_curve/{run.name}", f"FID vs training (`{rel(run.path, runs.root)}`)")
        floor = r["floor"]["fid_vs_train"]
        t.intro = [f"DDIM {r['steps']} steps from noise, N = {r['n']} samples per snapshot, "
                   f"classifier FID against the train statistics; real vs real at the same N: "
                   f"{fmt(floor)}."]
        t.columns = ["epochs", "images", "FID", "KID", "s/sample"]
        for q in r["points"]:
            t.rows.append([f"{q['epoch']:.2f}", f"{q['images_seen']:,}", fmt(q["fid"]),
                           fmt(q["kid"], 4), fmt(q["seconds_per_sample"], 3)])
        if r.get("plateau"):
            sentence = plateau_sentence(r)
            t.notes = [sentence[0].upper() + sentence[1:] + "."]
        if r.get("final"):
            t.notes.append("The last weights again: " + final_fid_sentence(r["final"]))
        plot = run.path / "fid_vs_epochs.png"
        if plot.is_file():
            t.plots.append(("FID vs epochs", plot))
        out.append(t)
    return out


def final_fid_sentence(f: dict) -> str:
    floor = f["floor"]
    return (f"epoch {f['epoch']:.2f}, N = {f['n']:,}, DDIM {f['steps']} steps: FID "
            f"{fmt(f['fid'])}, KID {fmt(f['kid'], 4)}; real vs real at the same N: FID "
            f"{fmt(floor['fid_vs_train'])}, KID {fmt(floor['kid'], 4)}.")


# ----------------------------------------------------------------------------- findings

def findings(runs: Runs) -> list[str]:
    """One sentence per comparison whose numbers are present; nothing is hard-coded."""
    out = []
    fits = runs["fit_dip"]
    if fits:
        run = best_fit(fits)
        for s, v in run.results["sigma"].items():
            best = max(v["psnr_mean"])
            out.append(f"DIP at σ={s} (N = {run.results['num_images']}): the estimate peaks at "
                       f"{best:.2f} dB against {v['noisy_psnr']:.2f} dB for the noisy input "
                       f"({best - v['noisy_psnr']:+.2f} dB); the study reported at most "
                       f"{max(STUDY_PSNR):.2f} dB.")
    T, at = main_T(runs)
    if T is not None and len(at) == 2:
        d, v = at["ddpm"].results, at["dip_in_training"].results
        if d["final_loss"] and v["final_loss"] is not None:
            out.append(f"Training at T = {T}: the study's variant ends at loss "
                       f"{fmt_loss(v['final_loss'])} against {fmt_loss(d['final_loss'])} for "
                       f"DDPM ({v['final_loss'] / d['final_loss']:.3g}x), and takes "
                       f"{v['train_seconds'] / max(d['train_seconds'], 1e-9):.2f}x DDPM's "
                       "training time.")
    for run in runs["fid_curve"]:
        r = run.results
        if r.get("final"):
            out.append("The trained DDPM (its last weights): " + final_fid_sentence(r["final"]))
        if r.get("plateau"):
            out.append(f"FID vs training (N = {r['n']:,}, DDIM {r['steps']} steps): "
                       f"{plateau_sentence(r)}.")
    for run in runs["restoration"]:
        if not _current(run.results):
            continue
        for name, task in run.results["tasks"].items():
            best = {}
            for r in task["rows"]:
                if r.get("oracle"):
                    continue
                key = task["primary"]
                if r["arm"] not in best or r[key] > best[r["arm"]][key]:
                    best[r["arm"]] = r
            what = "hole PSNR" if task["primary"] == "psnr_hole" else "PSNR"
            parts = [f"{label} {best[arm][task['primary']]:.2f} dB "
                     f"({best[arm]['gflop_per_image']:,.1f} GFLOP)"
                     for arm, label in (("dip_start", "best DIP start"),
                                        ("direct", "best direct start"),
                                        ("noise_start", "best noise start"),
                                        ("cheap_start", "best blur start"), ("dip", "DIP alone"),
                                        ("observation", "the observation")) if arm in best]
            if parts:
                out.append(f"Restoration {name} ({what}, best per arm, not at equal compute: "
                           "the answer above compares at equal compute): " + ", ".join(parts)
                           + ".")
    for run in runs["generation"]:
        out += generation_findings(run.results)
    return out


def generation_findings(res: dict) -> list[str]:
    """Best FID per arm (and source); then, where the run has the held-out reference, per
    DIP-start source its best row by held-out FID against the best baseline from noise at equal
    or lower NFE and against its own clean-image control, each as FID vs train / vs held-out."""
    best: dict = {}
    for r in res["arms"]:
        label = r["arm"] + (f" ({r['source']})" if r.get("source") else "")
        if label not in best or r["fid"] < best[label]["fid"]:
            best[label] = r
    floor = (res.get("floor") or {}).get("fid_vs_train")
    parts = [f"{label} FID {r['fid']:.2f} ({r['nfe'] or 'no'} NFE)" for label, r in best.items()]
    if not parts:
        return []
    out = [f"Generation (N = {res.get('n')}, floor {fmt(floor)}): best " + ", ".join(parts) + "."]
    if "floor_heldout" not in res:
        return out
    both = lambda r: f"{r['fid']:.2f} / {r['fid_heldout']:.2f}"  # noqa: E731
    baselines = [r for r in res["arms"] if r["arm"] in ("ddpm", "ddim")]
    for source in dict.fromkeys(r["source"] for r in res["arms"] if r["arm"] == "dip_start"):
        rows = [r for r in res["arms"] if r["arm"] == "dip_start" and r["source"] == source]
        d = min(rows, key=lambda r: r["fid_heldout"])
        what = {"train": "training images", "heldout": "held-out test images",
                "data_free": "no image (data_free)"}.get(source, source)
        text = (f"DIP start from {what}, FID vs train / vs held-out statistics: best "
                f"{both(d)} (sigma_t0 {d['sigma_t0']:g}, {d['nfe']} NFE + "
                f"{d['dip_iters']:.0f} DIP iterations)")
        front = [b for b in baselines if b["nfe"] <= d["nfe"]]
        if front:
            b = min(front, key=lambda r: r["fid_heldout"])
            text += f"; {b['arm'].upper()} from noise at {b['nfe']} NFE {both(b)}"
        ctrl = [r for r in res["arms"] if r["arm"] == "clean_start" and r["source"] == source
                and r["t0"] == d["t0"]]
        if ctrl:
            text += f"; the clean image itself at that sigma_t0 {both(ctrl[0])}"
        out.append(text + ".")
    return out


# ----------------------------------------------------------------------------- plots

def _copy_png(src: Path, dst: Path) -> Path:
    with atomic_path(dst, suffix=".png") as tmp:
        shutil.copyfile(src, tmp)
    return dst


def _last_grid(run) -> Optional[Path]:
    grids = sorted((run.path / SAMPLES_DIR).glob("img-*.png"))  # named by images seen: sortable
    return grids[-1] if grids else None


def make_plots(runs: Runs, out_dir: Path) -> tuple[list, list]:
    """(plots made or copied into out_dir, images linked where they lie): (title, path)."""
    made, linked = [], []
    fits = [r for r in runs["fit_dip"] if (r.path / "psnr.png").is_file()]
    if fits:
        run = best_fit(fits)
        made.append(("PSNR vs DIP iterations", _copy_png(run.path / "psnr.png",
                                                         out_dir / "dip_psnr.png")))
    T, at = main_T(runs)
    curves = []
    for v, run in sorted(at.items()):
        rows = [r for r in read_jsonl(run.path / METRICS_FILE) if "loss" in r]
        if rows:
            curves.append((f"{VARIANTS[v]} ({run.name})", [r["images_seen"] for r in rows],
                           [r["loss"] for r in rows]))
    if curves:
        made.append(("Loss curves", loss_curves_plot(out_dir / "loss_curves.png", curves,
                                                     title=f"Training loss at T = {T}")))
    for run in runs["restoration"]:
        for f in sorted(run.path.glob("front_*.png")):
            linked.append((f"Restoration {f.stem[len('front_'):]}: PSNR vs GFLOP and vs time, "
                           f"the baselines' front ({run.name})", f))
    series, floors = [], []
    for run in runs["generation"]:
        res = run.results
        tag = f" ({run.name})" if len(runs["generation"]) > 1 else ""
        arms: dict = {}
        for r in res["arms"]:
            if r["nfe"] > 0:  # the DIP estimates alone run no chain: nothing to put on a log axis
                # a start runs the same K from every noise level: one series (marker) per level
                level = f" sigma_t0={r['sigma_t0']:g}" if r.get("sigma_t0") is not None else \
                    (f" t0={r['t0']}" if r.get("t0") else "")
                key = r["arm"] + (f" {r['source']}" if r.get("source") else "") + level
                arms.setdefault(key, []).append(r)
        for arm, rs in arms.items():
            series.append((arm + tag, [r["nfe"] for r in rs], [r["fid"] for r in rs]))
        f = (res.get("floor") or {}).get("fid_vs_train")
        if f is not None:
            floors.append((f"real-vs-real floor, N = {res['floor'].get('n')}{tag}", f))
        if (run.path / "fid_vs_steps.png").is_file():  # the run's own: both references
            linked.append((f"Generation: FID vs NFE against train and held-out statistics{tag}",
                           run.path / "fid_vs_steps.png"))
        for r in res["arms"]:
            if r.get("grid") and (run.path / r["grid"]).is_file():
                label = r["arm"] + (f" {r['source']}" if r.get("source") else "") + \
                    (f" sigma_t0={r['sigma_t0']:g}" if r.get("sigma_t0") is not None else
                     f" t0={r['t0']}" if r.get("t0") else "") + \
                    (f" K={r['steps']}" if r.get("steps") else "")
                linked.append((f"Generation samples: {label}{tag}", run.path / r["grid"]))
    if series:
        made.append(("FID vs steps", fid_vs_nfe_plot(out_dir / "fid_vs_steps.png", series,
                                                     floors)))
    for v, run in sorted(at.items()):
        grid = _last_grid(run)
        if grid is not None:
            linked.append((f"Samples of {VARIANTS[v]} at T = {T} ({run.name}, {grid.stem})",
                           grid))
    return made, linked


# ----------------------------------------------------------------------------- assembly

def table_markdown(t: Table, root: Optional[Path] = None) -> list[str]:
    lines = [f"### {t.heading}", ""]
    if t.not_run:
        return lines + [f"not run: {t.not_run}", ""]
    lines += [*t.intro, ""] if t.intro else []
    lines += ["| " + " | ".join(t.columns) + " |", "|" + "---|" * len(t.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in t.rows]
    lines += [""] + ([*t.notes, ""] if t.notes else [])
    lines += plot_markdown(t.plots, root)
    return lines


def plot_markdown(plots: list, root: Optional[Path]) -> list[str]:
    """The table's plots right below it, linked relative to REPORT.md's folder."""
    return [f"![{title}]({Path(rel(path, root) if root else path).as_posix()})\n"
            for title, path in plots]


def plateau_sentence(r: dict) -> str:
    """The fid_curve's plateau; when that is its last snapshot the curve is still falling, and
    the sentence says so rather than calling the end of training a plateau."""
    pl, pts = r["plateau"], r["points"]
    if len(pts) > 1 and pl["images_seen"] == pts[-1]["images_seen"]:
        return (f"no plateau by the last snapshot: FID still fell from {fmt(pts[-2]['fid'])} "
                f"(epoch {pts[-2]['epoch']:.2f}) to {fmt(pts[-1]['fid'])} (epoch "
                f"{pts[-1]['epoch']:.2f}), more than the plateau rule's margin ({pl['rule']})")
    return f"plateau at epoch {pl['epoch']:.2f}, FID {fmt(pl['fid'])} ({pl['rule']})"


def stage_lines(export: dict) -> list[str]:
    """The exported study's stages: estimate before the run, wall time, and what it counts."""
    lines = ["## Stages", "", f"Study `{export['study']}`, run on: {export['machine']}.", "",
             "| stage | job | estimate | wall time | ratio | wall time is |", "|---|---|---|---|---|---|"]
    for name, st in export["stages"].items():
        est = st["estimate_seconds"]
        est_cell = minutes(est) if est else "not counted"  # the classifier: small, no FLOP model
        if st["done"]:
            wall = st["seconds"]
            ratio = fmt(wall / est) if est else DASH
            lines.append(f"| {name} | {st['job']} | {est_cell} | {minutes(wall)} | {ratio} "
                         f"| {st['seconds_are']} |")
        else:
            lines.append(f"| {name} | {st['job']} | {est_cell} | not finished | {DASH} | |")
    return lines + [""]


def report_markdown(runs: Runs, study: list, protocols: list, found: list, images: list,
                    root: Path, export: Optional[dict] = None) -> str:
    counts = ", ".join(f"{len(v)} {k}" for k, v in runs.by_kind.items() if v)
    lines = ["# dipddpm results" if export else "# dipddpm report", "",
             f"Built from {runs.run_dirs} run dirs under this folder ({counts or 'none usable'}"
             f"; {len(runs.sampling)} sampling measurements), never from W&B.", "",
             "## The answer: does a DIP start pay off?", ""] + answer_lines(runs) + [
             "", "## How to read this", ""]
    lines += [" ".join(found) if found else "No finished runs to compare yet.", "",
              "The study's numbers (FashionMNIST, Colab T4) stand beside ours; a table whose runs "
              "are missing says what is missing. The study's variant (DIP+DDPM) replaced the "
              "Gaussian noise of the DDPM objective with a DIP output, so its loss is not "
              "comparable with an epsilon-prediction loss: it measures a different target.", ""]
    lines += stage_lines(export) if export else []
    lines += ["## The study's tables, ours beside", ""]
    for t in study:
        lines += table_markdown(t, root)
    lines += ["## Protocols", ""]
    for t in protocols:
        lines += table_markdown(t, root)
    lines += ["## Plots", ""]
    if not images:
        lines += ["not run: no run dir with plots or sample grids", ""]
    for title, path in images:
        lines += [f"### {title}", "", f"![{title}]({Path(rel(path, root)).as_posix()})", ""]
    if runs.skipped:
        lines += ["## Run dirs not used", ""]
        lines += [f"- `{rel(p, root)}`: {why}" for p, why in runs.skipped] + [""]
    return "\n".join(lines)


def build_report(cfg: Config, runs_dir) -> dict:
    """Discover run dirs under runs_dir, write runs_dir/REPORT.md and plots into cfg.run.dir,
    log the tables and plots to W&B there; return {"report", "tables", "plots", "runs"}."""
    root = Path(runs_dir)
    out_dir = Path(cfg.run.dir)
    runs = discover(root, exclude=[out_dir])  # before any file is written: a wrong
    # RUNS_DIR leaves nothing behind
    prepare_run_dir(cfg, reads=())  # the report is rebuilt from the runs every time
    study = study_tables(runs)
    protocols = (restoration_tables(runs) + generation_tables(runs) + fid_curve_tables(runs)
                 + classifier_tables(runs))
    made, linked = make_plots(runs, out_dir)
    beside = attach_plots(runs, study + protocols, out_dir)  # shown below their tables
    found = findings(runs)
    export = read_json(root / EXPORT_FILE) if (root / EXPORT_FILE).is_file() else None
    name = RESULTS_REPORT_FILE if export else REPORT_FILE
    text = report_markdown(runs, study, protocols, found, made + linked, root, export)
    atomic_write_text(root / name, text)
    with Tracker(out_dir, cfg, "report") as tracker:
        for t in study + protocols:
            if not t.not_run:
                tracker.log_table(t.key, t.columns, t.rows, step=0)
        for title, path in made + beside:
            tracker.log_image(f"plot/{path.stem}", path, step=0)
        for title, path in linked:  # plots and grids of other runs, under their run's name
            name = re.sub(r"[^A-Za-z0-9_/-]", "_", Path(rel(path, root)).with_suffix("").as_posix())
            tracker.log_image(f"linked/{name}", path, step=0)
        for s in report_series(runs):  # native W&B line charts of what the PNGs draw
            tracker.log_lines(s.key, s.lines, title=s.title, xname=s.xname, step=0)
        tracker.summary({"findings": " ".join(found),
                         "not_run": [t.key for t in study + protocols if t.not_run]})
    print(f"{root / name}: {sum(not t.not_run for t in study)} of {len(study)} study "
          f"tables, {sum(not t.not_run for t in protocols)} protocol tables, "
          f"{len(made) + len(beside)} plots in {out_dir}")
    return {"report": root / name, "tables": study + protocols,
            "plots": [p for _, p in made + beside], "runs": runs}
