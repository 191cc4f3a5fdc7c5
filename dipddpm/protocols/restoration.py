"""The restoration protocol: DIP, DIP-start diffusion and their baselines on the same test images.

For each task (denoising at each sigma of protocol.sigmas, centre-box inpainting, random-pixel
inpainting) the first protocol.num_images images of protocol.split are degraded with
`dipddpm.dip.degrade.degrade` (noise and masks seeded per key by run.seed), and every arm
restores the same observations:

  observation   y itself (inpainting: holes at 0)                          compute 0
  cheap         the cheap estimate alone: blur of y / blur-filled hole      compute 0
  dip_budget    DIP estimate (output EMA) after dip.iters iterations         dip.iters
  dip_es_wmv    DIP estimate at ES-WMV's pick (no clean image needed); its compute is the
                iterations ES-WMV runs to decide: pick + es_patience (capped at dip.iters)
  dip_oracle    the best DIP output (raw or EMA) at each image's best iteration: needs the
                clean image, an upper bound, never a method (flagged "oracle": true)
  direct        denoising only: y scaled to the diffusion's x_{t*} (no prior), K steps
  dip_start     the DIP budget estimate diffused to t0, K reverse steps
  cheap_start   the cheap estimate diffused to t0, K reverse steps: what DIP adds over it
Samplers: ddpm (eta 1, respaced when K < t0) and ddim (eta 0); see protocols/arms.py. For
inpainting the chains keep the observed pixels consistent when protocol.inpaint_consistency
(RePaint's simple replacement); otherwise they are the unconditioned SDEdit/CCDF start.
The chains of every arm share their random numbers (one seed per batch).

Compute per image: `nfe` U-Net evaluations plus `dip_iters` DIP iterations (one forward and one
backward pass of the DIP net each); `passes` = nfe + dip_iters. Wall time per image
`seconds_per_image` = the DIP fit's share (fit wall time / images; from the priors manifest when
precomputed priors are used, i.e. on the machine that fitted them) + the reverse chain's.

results.json:
  {"protocol": "restoration", "split": str, "num_images": N, "keys": [str],
   "device": str, "model": {...load_trained info...}, "T": int,
   "dip": {"iters", "settings"...}, "blur_sigma": float, "inpaint_consistency": bool,
   "tasks": {"<task>": {            # task names: "denoise-s25", "inpaint_box", ...
       "task": str, "sigma": float|null, "t_star": int|null,
       "dip_source": "fitted" | "priors:<dir>", "dip_seconds_per_image": float,
       "skipped": [str],            # sweep points dropped (t0 > T) and why
       "rows": [{"arm": str, "sampler": str|null, "t0": int|null, "steps": int|null,
                 "nfe": int, "dip_iters": float, "passes": float,
                 "psnr": dB, "psnr_std": dB, "ssim": float|null,
                 "seconds_per_image": float, "reverse_seconds_per_image": float,
                 "oracle": bool}]}}}
PSNR/SSIM are means over images on [0, 1] against the clean image (PSNR capped at 100 dB).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dipddpm.config import Config, ConfigError, UserError
from dipddpm.diffusion import Diffusion
from dipddpm.dip.degrade import degrade
from dipddpm.dip.fit import FitSettings, fit_by_key
from dipddpm.evaluate.image_metrics import psnr, ssim
from dipddpm.models.dip import SkipSpec
from dipddpm.protocols.arms import cheap_estimate, direct_start, run_chain
from dipddpm.report.tables import fmt

MAX_DB = 100.0
COLUMNS = ["task", "arm", "sampler", "t0", "steps", "nfe", "dip_iters", "passes", "psnr",
           "psnr_std", "ssim", "seconds_per_image", "oracle"]


def task_name(task: str, sigma: Optional[float]) -> str:
    return f"denoise-s{sigma:g}" if task == "denoise" else task


def task_list(cfg: Config) -> list[tuple[str, Optional[float]]]:
    out = []
    for task in cfg.protocol.tasks:
        if task == "denoise":
            out += [("denoise", float(s)) for s in cfg.protocol.sigmas]
        else:
            out.append((task, None))
    return out


def load_images(cfg: Config) -> tuple[np.ndarray, list[str]]:
    """The first protocol.num_images images of protocol.split, float32 [N,1,28,28] in [0, 1]."""
    from dipddpm.data import load_split

    images, _, keys = load_split(cfg.data.dir, cfg.protocol.split)
    n = cfg.protocol.num_images
    if n > len(images):
        raise ConfigError(f"protocol.num_images = {n}: the {cfg.protocol.split} split of "
                          f"{cfg.data.dir} has only {len(images)} images")
    return images[:n].astype(np.float32)[:, None] / 255.0, list(keys[:n])


def observe(cfg: Config, clean: np.ndarray, keys: list[str], task: str,
            sigma: Optional[float]) -> tuple[np.ndarray, np.ndarray]:
    return degrade(clean, keys, task, run_seed=cfg.run.seed,
                   sigma=sigma if sigma is not None else 0.0, box=cfg.dip.box,
                   keep_fraction=cfg.dip.keep_fraction)


# ----------------------------------------------------------------------------- DIP estimates

@dataclass
class DipEstimate:
    u: torch.Tensor  # [N,C,H,W] budget estimate in [0, 1]
    iters: np.ndarray  # [N] iterations behind u
    seconds_per_image: float
    source: str
    es_u: Optional[np.ndarray] = None  # [N] PSNR at ES-WMV's pick (None with priors)
    es_iters: Optional[np.ndarray] = None  # [N] iterations ES-WMV runs to decide
    oracle_psnr: Optional[np.ndarray] = None  # [N]
    oracle_iters: Optional[np.ndarray] = None  # [N]


def fit_dip(cfg: Config, clean, keys, y, mask, device) -> DipEstimate:
    """Fit one DIP per image to the observation (dip.batch_size nets at once), to the full
    budget; ES-WMV's pick and the oracle peak are read off the same fit."""
    dip = cfg.dip
    spec = SkipSpec.from_config(dip)
    settings = FitSettings.from_config(dip, stop="budget")
    est, es_psnr, es_iter, peak, peak_iter = [], [], [], [], []
    start = time.perf_counter()
    for _, r in fit_by_key(y, mask, clean, keys, spec, settings, run_seed=cfg.run.seed,
                           batch_size=dip.batch_size, device=device):
        est.append(r.estimate.float())
        budget_psnr = r.psnr_est[-1].numpy()
        # ES-WMV never filling its window means it never stops: the budget estimate is reported
        picked = r.es_iter.numpy() > 0
        es_psnr.append(np.where(picked, r.es_psnr.numpy(), budget_psnr))
        es_iter.append(np.where(picked, np.minimum(r.es_iter.numpy() + dip.es_patience,
                                                   dip.iters), dip.iters))
        # the best output the fit produced, raw or averaged: ES-WMV reports a raw output, so an
        # upper bound over the EMA alone could sit below it early in the fit
        best = np.maximum(r.psnr_est.numpy(), r.psnr_raw.numpy())  # [T, B]
        peak.append(best.max(0))
        peak_iter.append(best.argmax(0) + 1)
    seconds = time.perf_counter() - start
    return DipEstimate(torch.cat(est).clamp(0, 1), np.full(len(keys), float(dip.iters)),
                       seconds / len(keys), "fitted", np.concatenate(es_psnr),
                       np.concatenate(es_iter).astype(float), np.concatenate(peak),
                       np.concatenate(peak_iter).astype(float))


def priors_for(cfg: Config, task: str, sigma: Optional[float], keys, y) -> Optional[DipEstimate]:
    """The precomputed estimates in protocol.priors_dir when they were made for this task,
    sigma, split and run seed; None otherwise (the caller fits instead)."""
    from dipddpm.dip.priors import load_priors
    from dipddpm.runs import read_json

    folder = cfg.protocol.priors_dir
    if not folder:
        return None
    path = Path(folder) / "manifest.json"
    manifest = read_json(path) if path.exists() else None
    if manifest is None:
        raise UserError(f"protocol.priors_dir = {folder!r}: no manifest.json there; run "
                        f"python -m jobs.precompute_priors first")
    s = manifest["settings"]
    if (s["dip"]["task"] != task or (task == "denoise" and float(s["dip"]["sigma"]) != sigma)
            or s["split"] != cfg.protocol.split or s["run_seed"] != cfg.run.seed):
        return None
    p = load_priors(folder)
    index = {k: i for i, k in enumerate(p["key"])}
    missing = [k for k in keys if k not in index]
    if missing:
        raise UserError(f"protocol.priors_dir = {folder!r}: no prior for {len(missing)} of the "
                        f"protocol's images (first: {missing[0]}); precompute all shards")
    rows = np.array([index[k] for k in keys])
    if not np.allclose(p["obs"][rows], y, atol=1e-6):
        raise UserError(f"protocol.priors_dir = {folder!r}: its observations differ from this "
                        f"run's (data or degradation settings changed); recompute the priors")
    fitted = sum(e.get("fitted_images") or e["count"] for e in manifest["shards"])
    wall = sum(e.get("wall_s", 0.0) for e in manifest["shards"])
    return DipEstimate(torch.from_numpy(p["x0_hat"][rows]).float(), p["iters"][rows].astype(float),
                       wall / max(fitted, 1), f"priors:{folder}")


# ----------------------------------------------------------------------------- metrics

def score(u: torch.Tensor, clean: torch.Tensor) -> tuple[float, float, float]:
    """(mean PSNR, std PSNR, mean SSIM) over images."""
    p = psnr(u.cpu(), clean, max_db=MAX_DB).double()
    return float(p.mean()), float(p.std(unbiased=False)), float(ssim(u.cpu(), clean).mean())


def _row(arm, u, clean, *, sampler=None, t0=None, steps=None, nfe=0, dip_iters=0.0,
         dip_s=0.0, rev_s=0.0, oracle=False, psnr_values=None) -> dict:
    if psnr_values is not None:  # only the PSNR is known (ES-WMV, oracle): no image to score
        p, ps, s = float(np.mean(psnr_values)), float(np.std(psnr_values)), None
    else:
        p, ps, s = score(u, clean)
    return {"arm": arm, "sampler": sampler, "t0": t0, "steps": steps, "nfe": int(nfe),
            "dip_iters": float(dip_iters), "passes": float(nfe + dip_iters), "psnr": p,
            "psnr_std": ps, "ssim": s, "seconds_per_image": float(dip_s + rev_s),
            "reverse_seconds_per_image": float(rev_s), "oracle": oracle}


def effective_steps(steps: list[int], t0: int) -> list[int]:
    """The K values that give distinct chains at t0 (K >= t0 all run t0 steps)."""
    out = sorted({min(k, t0) for k in steps})
    return out


def chain_batched(model, diffusion, clean_n, *, batch_size, seed, **kw):
    """run_chain over batches of the arrays in kw (u_hat, x_start, y, mask); -> (u, nfe, s/img)."""
    arrays = {k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in kw.items() if not isinstance(v, torch.Tensor)}
    outs, nfe, seconds = [], None, 0.0
    for b, lo in enumerate(range(0, clean_n, batch_size)):
        part = {k: v[lo:lo + batch_size] for k, v in arrays.items()}
        r = run_chain(model, diffusion, seed=seed * 1_000_003 + b, **part, **rest)
        outs.append(r.u.cpu())
        nfe = r.nfe if nfe is None else nfe
        seconds += r.seconds
    return torch.cat(outs), nfe, seconds / clean_n


def run_task(cfg: Config, model, diffusion: Diffusion, clean_np, keys, task, sigma, device,
             log=print) -> dict:
    p = cfg.protocol
    y_np, mask_np = observe(cfg, clean_np, keys, task, sigma)
    clean = torch.from_numpy(clean_np)
    y, mask = torch.from_numpy(y_np), torch.from_numpy(mask_np)
    dip = priors_for(cfg, task, sigma, keys, y_np)
    if dip is None:
        dip = fit_dip(cfg, clean_np, keys, y_np, mask_np, device)
    log(f"{task_name(task, sigma)}: DIP estimates {dip.source}, "
        f"{dip.seconds_per_image:.2f} s/image")
    cheap = cheap_estimate(y, mask, p.blur_sigma)
    rows = [_row("observation", y, clean), _row("cheap", cheap, clean),
            _row("dip_budget", dip.u, clean, dip_iters=float(dip.iters.mean()),
                 dip_s=dip.seconds_per_image)]
    if dip.es_u is not None:
        frac = float(dip.es_iters.mean() / max(dip.iters.mean(), 1))
        rows.append(_row("dip_es_wmv", None, clean, dip_iters=float(dip.es_iters.mean()),
                         dip_s=dip.seconds_per_image * frac, psnr_values=dip.es_u))
        frac = float(dip.oracle_iters.mean() / max(dip.iters.mean(), 1))
        rows.append(_row("dip_oracle", None, clean, dip_iters=float(dip.oracle_iters.mean()),
                         dip_s=dip.seconds_per_image * frac, psnr_values=dip.oracle_psnr,
                         oracle=True))
    dev = lambda t: t.to(device)  # noqa: E731
    common = dict(batch_size=p.batch_size, seed=cfg.run.seed)
    inpaint = task != "denoise"
    cons = dict(y=dev(y), mask=dev(mask)) if inpaint and p.inpaint_consistency else {}
    skipped, t_star = [], None
    if task == "denoise":
        x_start, t_star = direct_start(y, diffusion, sigma)
        if t_star > diffusion.T:
            skipped.append(f"direct: t*={t_star} > T={diffusion.T}")
        else:
            for sampler in p.samplers:
                for k in effective_steps(p.steps, t_star):
                    u, nfe, s = chain_batched(model, diffusion, len(keys), sampler=sampler,
                                              steps=k, t0=t_star, x_start=dev(x_start), **common)
                    rows.append(_row("direct", u, clean, sampler=sampler, t0=t_star, steps=k,
                                     nfe=nfe, rev_s=s))
    starts = [("dip_start", dip.u, float(dip.iters.mean()), dip.seconds_per_image),
              ("cheap_start", cheap, 0.0, 0.0)]
    for t0 in p.t0s:
        if t0 > diffusion.T:
            skipped.append(f"t0={t0} > T={diffusion.T}")
            continue
        for sampler in p.samplers:
            for k in effective_steps(p.steps, t0):
                for arm, u_hat, iters, dip_s in starts:
                    u, nfe, s = chain_batched(model, diffusion, len(keys), sampler=sampler,
                                              steps=k, t0=t0, u_hat=dev(u_hat), **cons, **common)
                    rows.append(_row(arm, u, clean, sampler=sampler, t0=t0, steps=k, nfe=nfe,
                                     dip_iters=iters, dip_s=dip_s, rev_s=s))
    for r in rows:
        log(f"  {r['arm']:<12} {r['sampler'] or '':<5} t0={r['t0'] or '':<4} "
            f"K={r['steps'] or '':<4} nfe={r['nfe']:<4} psnr {r['psnr']:.2f}")
    return {"task": task, "sigma": sigma, "t_star": t_star, "dip_source": dip.source,
            "dip_seconds_per_image": dip.seconds_per_image, "skipped": skipped, "rows": rows}


def restoration(cfg: Config, model, diffusion: Diffusion, device, info: dict | None = None,
                log=print) -> dict:
    """Every task of the protocol on the same images; returns the results.json dict."""
    clean, keys = load_images(cfg)
    tasks = {}
    for task, sigma in task_list(cfg):
        tasks[task_name(task, sigma)] = run_task(cfg, model, diffusion, clean, keys, task, sigma,
                                                 device, log)
    dip_keys = ("iters", "scales", "channels_down", "channels_up", "channels_skip", "lr",
                "reg_noise_std", "exp_weight", "backtrack_db", "es_window", "es_patience", "box",
                "keep_fraction", "batch_size")
    return {"protocol": "restoration", "split": cfg.protocol.split, "num_images": len(keys),
            "keys": keys, "device": str(device), "model": info or {}, "T": diffusion.T,
            "dip": {k: getattr(cfg.dip, k) for k in dip_keys},
            "blur_sigma": cfg.protocol.blur_sigma,
            "inpaint_consistency": cfg.protocol.inpaint_consistency, "tasks": tasks}


# ----------------------------------------------------------------------------- outputs

def table_markdown(results: dict) -> str:
    n = results["num_images"]
    lines = [f"# Restoration protocol, FashionMNIST {results['split']} images (N = {n})", "",
             f"T = {results['T']}, DIP {results['dip']['iters']} iterations "
             f"({results['dip']['channels_down']} channels), cheap estimate = Gaussian blur "
             f"σ={results['blur_sigma']:g} px (inpainting: blur-filled hole), inpainting "
             f"consistency {'on' if results['inpaint_consistency'] else 'off'}, device "
             f"{results['device']}. PSNR (mean ± std, dB) and SSIM vs the clean image. "
             "Compute per image: NFE (U-Net evaluations) + DIP iterations (forward + backward); "
             "time per image includes the DIP fit. dip_oracle needs the clean image: an upper "
             "bound, not a method.", ""]
    for name, t in results["tasks"].items():
        lines += [f"## {name}" + (f" (direct start t* = {t['t_star']})" if t["t_star"] else ""),
                  "", f"DIP estimates: {t['dip_source']}, {t['dip_seconds_per_image']:.2f} s "
                  "per image.", "",
                  "| arm | sampler | t0 | K | NFE | DIP iters | passes | PSNR | SSIM | s/image |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in t["rows"]:
            lines.append(
                f"| {r['arm']}{' (oracle)' if r['oracle'] else ''} | {fmt(r['sampler'])} "
                f"| {fmt(r['t0'])} | {fmt(r['steps'])} | {r['nfe']} | {r['dip_iters']:.0f} "
                f"| {r['passes']:.0f} | {r['psnr']:.2f} ± {r['psnr_std']:.2f} "
                f"| {fmt(r['ssim'], 3)} | {r['seconds_per_image']:.3f} |")
        if t["skipped"]:
            lines += ["", "Skipped: " + "; ".join(t["skipped"])]
        lines.append("")
    return "\n".join(lines)


def plots(results: dict, run_dir: Path) -> list[Path]:
    """psnr_vs_steps.png (PSNR vs NFE) and psnr_vs_time.png (PSNR vs s/image incl. DIP), one
    panel per task: colour = t0, line = start (solid DIP, dashed cheap, dotted direct),
    marker = sampler; DIP alone and the observation as horizontal references."""
    from dipddpm.report.plots import pyplot, save_png

    plt = pyplot()
    tasks = results["tasks"]
    paths = []
    for xkey, fname, xlabel in (("nfe", "psnr_vs_steps.png", "reverse steps (NFE)"),
                                ("seconds_per_image", "psnr_vs_time.png",
                                 "wall time per image incl. DIP fit (s)")):
        fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.2), squeeze=False)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for ax, (name, t) in zip(axes[0], tasks.items()):
            t0s = sorted({r["t0"] for r in t["rows"] if r["t0"] is not None})
            groups: dict = {}
            for r in t["rows"]:
                if r["sampler"] is not None:
                    groups.setdefault((r["arm"], r["sampler"], r["t0"]), []).append(r)
            for (arm, sampler, t0), rs in sorted(groups.items()):
                rs = sorted(rs, key=lambda r: r[xkey])
                style = {"dip_start": "-", "cheap_start": "--", "direct": ":"}[arm]
                ax.plot([r[xkey] for r in rs], [r["psnr"] for r in rs], style,
                        marker="o" if sampler == "ddpm" else "s", markersize=3,
                        color="k" if arm == "direct" else colors[t0s.index(t0) % len(colors)],
                        label=f"{arm} {sampler} t0={t0}")
            for r in t["rows"]:
                if r["arm"] in ("observation", "dip_budget", "cheap"):
                    ax.axhline(r["psnr"], color="grey", linewidth=0.8,
                               linestyle={"observation": ":", "dip_budget": "-",
                                          "cheap": "--"}[r["arm"]])
                    ax.annotate(r["arm"], (0, r["psnr"]), xycoords=("axes fraction", "data"),
                                fontsize=6, color="grey", va="bottom")
                if xkey == "seconds_per_image" and r["sampler"] is None and r["dip_iters"]:
                    ax.plot([r[xkey]], [r["psnr"]], "k*", markersize=6)  # DIP alone
                    ax.annotate(r["arm"][4:], (r[xkey], r["psnr"]), fontsize=6,
                                xytext=(3, -8), textcoords="offset points")
            if xkey == "seconds_per_image":
                ax.set_xscale("log")
            ax.set_title(f"{name}, N = {results['num_images']}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("PSNR vs clean (dB)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=5, loc="lower right", ncol=2)
        paths.append(save_png(fig, run_dir / fname))
    return paths


def run_restoration(cfg: Config, device=None) -> dict:
    """The job: load the trained model, run every arm, write results.json, table.md and the
    plots into run.dir, and log them to W&B."""
    from dipddpm.runs import RESULTS_FILE, atomic_write_json, atomic_write_text, prepare_run_dir
    from dipddpm.tracking import Tracker
    from dipddpm.train.generate import load_trained

    run_dir = prepare_run_dir(cfg)
    model, diffusion, info = load_trained(cfg.protocol.checkpoint or cfg.run.dir, cfg, device)
    device = next(model.parameters()).device
    with Tracker(run_dir, cfg, "restore") as tracker:
        results = restoration(cfg, model, diffusion, device, info)
        atomic_write_json(run_dir / RESULTS_FILE, results)
        atomic_write_text(run_dir / "table.md", table_markdown(results))
        for i, path in enumerate(plots(results, run_dir)):
            tracker.log_image(path.stem, path, step=0)
        rows = [[name] + [r.get(c) for c in COLUMNS[1:]]
                for name, t in results["tasks"].items() for r in t["rows"]]
        tracker.log_table("restoration", COLUMNS, rows)
        summary = {}
        for name, t in results["tasks"].items():
            for arm in ("observation", "cheap", "dip_budget", "dip_es_wmv", "dip_oracle",
                        "direct", "dip_start", "cheap_start"):
                best = [r["psnr"] for r in t["rows"] if r["arm"] == arm]
                if best:
                    summary[f"{name}/{arm}_best_psnr"] = max(best)
        tracker.log(summary, step=0)
        tracker.summary(summary)
    return results
