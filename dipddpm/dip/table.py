"""The study's first table done right: DIP denoising PSNR vs iterations on FashionMNIST.

For each sigma: N test images, each observed as clip(x + N(0, (sigma/255)^2)) with noise seeded
by its key (the DIP author's clipped observation; the restoration protocol has its own key,
protocol.observation), each fitted by its own net to the full budget (B nets at once). The
curve is the PSNR of the estimate (output EMA) against the clean image every `record_every`
iterations, mean and std over images; beside it the noisy input's PSNR, the oracle (each image's
best iteration within the budget, known only with the clean image), ES-WMV's pick (found without
the clean image) and the fixed budget's last iteration.

ES-WMV as published (dipddpm/dip/stopping.py): window dip.es_window, patience dip.es_patience
(1000 by default), its pick frozen at the first stop; a net runs on past the budget until
ES-WMV has decided (at most dip.iters + dip.es_patience iterations), so its pick and cost are
the rule's, not cut at the budget. It is compared like with like: its raw output against the
raw output's oracle, and the EMA at its pick against the EMA's oracle (the restoration protocol
uses the same definitions).

results.json is
  {"sigma": {"25": {"iters", "psnr_mean", "psnr_std", "noisy_psnr",
                    "oracle_psnr",          # EMA: each image's best iteration (mean PSNR)
                    "oracle_raw_psnr",      # raw output: each image's best iteration
                    "es_wmv_psnr",          # raw output at ES-WMV's pick (the published output)
                    "es_wmv_ema_psnr",      # EMA at ES-WMV's pick
                    "es_wmv_iters",         # mean pick
                    "es_wmv_cost_iters",    # mean iterations run to decide (pick + patience)
                    "es_wmv_decided",       # images for which it decided (of N)
                    "budget_psnr"}, ...}, "num_images": N}
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from dipddpm.artifacts import pyplot, save_png
from dipddpm.progress import bar as progress_bar
from dipddpm.config import Config, ConfigError, DIPConfig, is_neutral
from dipddpm.data import load_split
from dipddpm.dip.degrade import degrade
from dipddpm.dip.fit import FitSettings, fit_by_key
from dipddpm.dip.metrics import psnr
from dipddpm.models.dip import SkipSpec
from dipddpm.precision import default_device
from dipddpm.runs import (RESULTS_FILE, atomic_path, atomic_write_json, atomic_write_text,
                          prepare_run_dir)
from dipddpm.tracking import Tracker

# The study's DIP PSNR (dB) at 50, 100, ..., 400 iterations (its noise level is not stated).
STUDY_ITERS = [50, 100, 150, 200, 250, 300, 350, 400]
STUDY_PSNR = [6.71, 8.33, 8.79, 8.64, 8.25, 8.24, 8.32, 8.43]


@dataclass
class SigmaCurves:
    """Per-image numbers of one sigma; columns are images."""
    sigma: float
    psnr_est: np.ndarray  # [T, N] estimate (EMA) vs clean, every iteration
    psnr_raw: np.ndarray  # [T, N] raw output vs clean
    noisy: np.ndarray  # [N] observation vs clean
    es_psnr: np.ndarray  # [N] raw output at ES-WMV's pick
    es_iter: np.ndarray  # [N] the pick (0: none)
    backtracks: np.ndarray  # [N]
    seconds: float
    es_psnr_ema: np.ndarray = None  # [N] EMA at ES-WMV's pick
    es_stop: np.ndarray = None  # [N] iteration ES-WMV decided at (0: not within the fit)
    iters_run: np.ndarray = None  # [N] iterations each net ran

    def es_cost(self) -> np.ndarray:
        """Iterations ES-WMV ran to decide: pick + patience, or all a net ran when undecided."""
        return np.where(self.es_stop > 0, self.es_stop, self.iters_run)


def load_clean(cfg: Config):
    images, _, keys = load_split(cfg.data.dir, cfg.dip.split)
    n = cfg.dip.num_images
    if n > len(images):
        raise ConfigError(f"dip.num_images = {n}: the {cfg.dip.split} split in {cfg.data.dir} "
                          f"has only {len(images)} images")
    clean = images[:n].astype(np.float32)[:, None] / 255.0
    return clean, list(keys[:n])


# fit_dip's sweep: which images, which sigmas, how often the table records; not one net's fit
SWEEP_KEYS = ("num_images", "sigmas", "record_every")
# dip settings that do not change a batch's numbers: the sweep and the neutral keys
_NOT_IN_FINGERPRINT = set(SWEEP_KEYS) | {f.name for f in fields(DIPConfig)
                                            if is_neutral(f"dip.{f.name}")}
# the keys fit_dip's results depend on (its run dir's rerun check)
READS = ("run", "data.dir", "dip")


def _fingerprint(cfg: Config, sigma: float, keys: list[str]) -> str:
    dip = {k: v for k, v in cfg.dip.fit_identity().items() if k not in _NOT_IN_FINGERPRINT}
    text = json.dumps([dip, cfg.run.seed, sigma, keys], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_BATCH_FIELDS = ("psnr_est", "psnr_raw", "es_psnr", "es_psnr_ema", "es_iter", "es_stop",
                 "iters_run", "backtracks", "seconds")


def _load_batch(path: Path, fingerprint: str) -> Optional[dict]:
    """A finished batch's arrays, or None when absent, unreadable or from other settings."""
    try:
        with np.load(path) as f:
            if str(f["fingerprint"]) != fingerprint:
                return None
            return {k: f[k] for k in _BATCH_FIELDS}
    except (OSError, KeyError, ValueError):
        return None


def fit_sigma(cfg: Config, clean: np.ndarray, keys: list[str], sigma: float, *,
              device="cpu", on_iter: Optional[Callable[[int, int], None]] = None,
              batch_dir: Optional[Path] = None) -> SigmaCurves:
    """Fit every image at one sigma, dip.batch_size nets at a time, to the full budget.

    With batch_dir, each finished batch is saved there (atomically) and a rerun with the same
    settings loads it instead of fitting again: a preempted run loses at most one batch."""
    dip, seed = cfg.dip, cfg.run.seed
    y, _ = degrade(clean, keys, "denoise", run_seed=seed, sigma=sigma)
    spec = SkipSpec.from_config(dip)
    # the curve needs every iteration up to the budget; ES-WMV's pick is recorded on the way,
    # and a net runs on past the budget until ES-WMV has decided
    settings = FitSettings.from_config(dip, stop="budget", es_decide=True)
    batches = []
    for lo in range(0, len(keys), dip.batch_size):
        hi = min(lo + dip.batch_size, len(keys))
        path = None if batch_dir is None else batch_dir / f"{lo:06d}-{hi:06d}.npz"
        fp = _fingerprint(cfg, sigma, keys[lo:hi])
        # looked up just before fitting: a second process on the same batch_dir skips what
        # the first has finished
        done = None if path is None else _load_batch(path, fp)
        if done is not None:
            if on_iter is not None:
                on_iter(dip.iters - 1, (hi - lo) * dip.iters)  # the whole batch, for progress
            batches.append(done)
            continue
        start = time.perf_counter()
        (_, r), = fit_by_key(y[lo:hi], None, clean[lo:hi], keys[lo:hi], spec, settings,
                             run_seed=seed, batch_size=hi - lo, device=device, on_iter=on_iter)
        es_iter = r.es_iter.numpy()
        at_pick = r.psnr_est.numpy()[np.maximum(es_iter, 1) - 1, np.arange(len(es_iter))]
        done = {"psnr_est": r.psnr_est.numpy()[:dip.iters],
                "psnr_raw": r.psnr_raw.numpy()[:dip.iters],
                "es_psnr": r.es_psnr.numpy(), "es_iter": es_iter,
                "es_psnr_ema": np.where(es_iter > 0, at_pick, np.nan),
                "es_stop": r.es_stop.numpy(), "iters_run": r.iters_run.numpy(),
                "backtracks": r.backtracks.numpy(), "seconds": time.perf_counter() - start}
        if path is not None:
            with atomic_path(path, ".npz") as tmp:
                np.savez(tmp, fingerprint=fp, **done)
        batches.append(done)
    cat = lambda k, axis=0: np.concatenate([b[k] for b in batches], axis)  # noqa
    noisy = psnr(torch.from_numpy(y), torch.from_numpy(clean)).numpy()
    return SigmaCurves(sigma, cat("psnr_est", 1), cat("psnr_raw", 1), noisy, cat("es_psnr"),
                       cat("es_iter"), cat("backtracks"),
                       float(sum(float(b["seconds"]) for b in batches)),
                       es_psnr_ema=cat("es_psnr_ema"), es_stop=cat("es_stop"),
                       iters_run=cat("iters_run"))


def record_iters(iters: int, every: int) -> list[int]:
    marks = list(range(every, iters + 1, every))
    if not marks or marks[-1] != iters:
        marks.append(iters)
    return marks


def sigma_key(sigma: float) -> str:
    return f"{sigma:g}"


def _mean_finite(v: np.ndarray) -> Optional[float]:
    return float(np.nanmean(v)) if np.isfinite(v).any() else None


def summarise(curves: SigmaCurves, record_every: int) -> dict:
    """One sigma's entry of results.json (all PSNR in dB, means over images)."""
    t = curves.psnr_est.shape[0]
    marks = record_iters(t, record_every)
    at = curves.psnr_est[np.array(marks) - 1]
    picked = curves.es_iter > 0
    return {
        "iters": marks,
        "psnr_mean": [float(v) for v in at.mean(1)],
        "psnr_std": [float(v) for v in at.std(1)],
        "noisy_psnr": float(curves.noisy.mean()),
        "oracle_psnr": float(curves.psnr_est.max(0).mean()),
        "oracle_raw_psnr": float(curves.psnr_raw.max(0).mean()),
        "es_wmv_psnr": _mean_finite(curves.es_psnr),
        "es_wmv_ema_psnr": _mean_finite(curves.es_psnr_ema),
        "es_wmv_iters": float(curves.es_iter[picked].mean()) if picked.any() else None,
        "es_wmv_cost_iters": float(curves.es_cost().mean()),
        "es_wmv_decided": int((curves.es_stop > 0).sum()),
        "budget_psnr": float(curves.psnr_est[-1].mean()),
    }


def results_json(all_curves: list[SigmaCurves], record_every: int) -> dict:
    return {"sigma": {sigma_key(c.sigma): summarise(c, record_every) for c in all_curves},
            "num_images": int(all_curves[0].psnr_est.shape[1]) if all_curves else 0}


def _pm(values: np.ndarray) -> str:
    return f"{values.mean():.2f} ± {values.std():.2f}"


def table_markdown(all_curves: list[SigmaCurves], cfg: Config) -> str:
    dip = cfg.dip
    n = all_curves[0].psnr_est.shape[1]
    t = all_curves[0].psnr_est.shape[0]
    marks = sorted(set(record_iters(t, dip.record_every)) | set(STUDY_ITERS))
    study = dict(zip(STUDY_ITERS, STUDY_PSNR))
    lines = [
        f"# DIP denoising, FashionMNIST {dip.split} images (N = {n})",
        "",
        f"PSNR (dB) against the clean image, mean ± std over the {n} images. Estimate = output "
        f"EMA ({dip.exp_weight}); raw = the net's output at that iteration. Study's net "
        f"({dip.scales} scales, {dip.channels_down}/{dip.channels_up}/{dip.channels_skip} "
        f"channels, {dip.in_channels} input channels), Adam lr {dip.lr}, reg noise "
        f"{dip.reg_noise_std:.4f}, backtracking at {dip.backtrack_db} dB.",
        "The study's column is its reported DIP PSNR (noise level not stated).",
        "",
    ]
    head = ["iters", "study"]
    for c in all_curves:
        head += [f"σ={sigma_key(c.sigma)} estimate", f"σ={sigma_key(c.sigma)} raw"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i in marks:
        row = [str(i), f"{study[i]:.2f}" if i in study else ""]
        for c in all_curves:
            row += ([_pm(c.psnr_est[i - 1]), _pm(c.psnr_raw[i - 1])] if i <= t else ["—", "—"])
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "## Stopping",
        "",
        "Like with like: ES-WMV's raw output against the raw output's oracle, and the EMA at "
        "ES-WMV's pick against the EMA's oracle. Oracles need the clean image (bounds); their "
        "iteration is each image's best within the budget.",
        "",
        "| σ | noisy input | raw: oracle (iteration) | raw: ES-WMV (pick; cost) "
        "| EMA: oracle (iteration) | EMA at ES-WMV's pick | EMA at the budget "
        f"({t} iters) | ES-WMV decided | backtracks | fit time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in all_curves:
        picked = c.es_iter > 0
        if picked.any():
            es_raw = (f"{_pm(c.es_psnr[picked])} ({c.es_iter[picked].mean():.0f}; "
                      f"{c.es_cost().mean():.0f})")
            es_ema = _pm(c.es_psnr_ema[picked])
        else:
            es_raw = es_ema = "window never filled"
        lines.append(
            f"| {sigma_key(c.sigma)} | {_pm(c.noisy)} | {_pm(c.psnr_raw.max(0))} "
            f"({(c.psnr_raw.argmax(0) + 1).mean():.0f}) | {es_raw} "
            f"| {_pm(c.psnr_est.max(0))} ({(c.psnr_est.argmax(0) + 1).mean():.0f}) | {es_ema} "
            f"| {_pm(c.psnr_est[-1])} | {int((c.es_stop > 0).sum())} of {len(c.es_stop)} "
            f"| {int(c.backtracks.sum())} | {c.seconds:.0f} s |")
    lines += ["", f"ES-WMV: window {dip.es_window}, patience {dip.es_patience}, on the raw "
              "outputs, its pick frozen at the first stop; cost = the iterations it runs to "
              f"decide (pick + patience; a net runs on past the budget, at most {t} + "
              f"{dip.es_patience}, until it has). Observation: clip(x + n, 0, 1).", ""]
    return "\n".join(lines)


def dip_psnr_plot(path, curves: Sequence,
                  study: tuple[Sequence[int], Sequence[float]] | None = None,
                  title: str = "DIP denoising") -> Path:
    """PSNR vs iteration per sigma: estimate mean ± std (band), raw mean (dashed), noisy input
    (dotted); the study's numbers as markers. `curves` are SigmaCurves."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, c in enumerate(curves):
        color = colors[i % len(colors)]
        it = np.arange(1, c.psnr_est.shape[0] + 1)
        mean, std = c.psnr_est.mean(1), c.psnr_est.std(1)
        ax.plot(it, mean, color=color, label=f"σ={c.sigma:g} estimate (EMA)")
        ax.fill_between(it, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
        ax.plot(it, c.psnr_raw.mean(1), color=color, linestyle="--", linewidth=0.8,
                label=f"σ={c.sigma:g} raw output")
        ax.axhline(c.noisy.mean(), color=color, linestyle=":", linewidth=1,
                   label=f"σ={c.sigma:g} noisy input")
    if study is not None:
        ax.plot(study[0], study[1], "kx", label="study (reported)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("PSNR vs clean (dB)")
    ax.set_title(f"{title}, N = {curves[0].psnr_est.shape[1]}" if curves else title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return save_png(fig, path, dpi=120)


def run_dip_table(cfg: Config, *, progress: bool = True) -> dict:
    """Fit every sigma of dip.sigmas, write run.dir/{results.json, table.md, psnr.png}, log to
    W&B; return the results dict."""
    run_dir = prepare_run_dir(cfg, reads=READS)
    clean, keys = load_clean(cfg)
    device = default_device()
    total = len(cfg.dip.sigmas) * len(keys) * cfg.dip.iters
    all_curves = []
    with Tracker(run_dir, cfg, "fit_dip") as tracker, \
            progress_bar(total, unit="img-it", disable=not progress, smoothing=0.1) as bar:
        for sigma in cfg.dip.sigmas:
            bar.set_description(f"σ={sigma:g}")
            curves = fit_sigma(cfg, clean, keys, sigma, device=device,
                               on_iter=lambda t, b: bar.update(b),
                               batch_dir=run_dir / "batches" / f"sigma{sigma_key(sigma)}")
            all_curves.append(curves)
            print(f"sigma {sigma:g}: {len(keys)} images x {cfg.dip.iters} iterations in "
                  f"{curves.seconds:.0f} s ({len(keys) * cfg.dip.iters / curves.seconds:.1f} "
                  f"image-iterations/s on {device})", flush=True)
        results = results_json(all_curves, cfg.dip.record_every)
        atomic_write_json(run_dir / RESULTS_FILE, results)
        atomic_write_text(run_dir / "table.md", table_markdown(all_curves, cfg))
        plot = dip_psnr_plot(run_dir / "psnr.png", all_curves, (STUDY_ITERS, STUDY_PSNR))
        marks = record_iters(cfg.dip.iters, cfg.dip.record_every)
        for j, it in enumerate(marks):
            metrics = {}
            for c in all_curves:
                k = sigma_key(c.sigma)
                metrics[f"psnr/sigma{k}"] = results["sigma"][k]["psnr_mean"][j]
                metrics[f"psnr_raw/sigma{k}"] = float(c.psnr_raw[it - 1].mean())
            tracker.log(metrics, step=it)
        tracker.log_image("psnr_plot", plot, step=marks[-1])
        names = ("noisy_psnr", "oracle_raw_psnr", "es_wmv_psnr", "oracle_psnr",
                 "es_wmv_ema_psnr", "budget_psnr", "es_wmv_cost_iters")
        rows = [[k] + [v[name] for name in names] for k, v in results["sigma"].items()]
        tracker.log_table("stopping", ["sigma", "noisy", "oracle_raw", "es_wmv_raw",
                                       "oracle_ema", "es_wmv_ema", "budget", "es_wmv_cost"],
                          rows)
        tracker.summary({f"{name}/sigma{k}": v[name] for k, v in results["sigma"].items()
                         for name in names})
    return results
