"""The restoration protocol: does a DIP start make a DDPM restore better for its compute?

For each task (denoising at each sigma of protocol.sigmas, centre-box inpainting, random-pixel
inpainting) the first protocol.num_images images of protocol.split are degraded with
`dipddpm.dip.degrade.degrade` (noise and masks seeded per key by run.seed; the noise model is
protocol.observation, "gaussian" by default: y = x + n unclipped, the model the direct start
assumes), and every arm restores the same observations y. docs/protocols.md explains the
estimator of e, the t0 rule, the FLOP accounting, the statistics and how to read the figure.

Rows without a chain (compute: their DIP iterations only)
  observation   y itself, clipped to [0, 1] (inpainting: holes at 0)
  cheap         the no-learning estimate: blur of y / blur-filled hole
  dip           a DIP estimate, `estimate` x `output`:
                  budget/ema   the output EMA at dip.iters                  (dip.iters)
                  es_wmv/raw   ES-WMV's pick, as published: the raw output at the variance
                               minimum, frozen at its first stop; costs pick + patience, the
                               iterations it runs to decide (the fit runs on past dip.iters
                               until it has, at most dip.iters + dip.es_patience)
                  es_wmv/ema   the EMA at ES-WMV's pick (EMA-vs-EMA), same cost
                  oracle/raw, oracle/ema, oracle/best   each image's best iteration within the
                               budget for the raw output, the EMA, or whichever is better:
                               needs the clean image, a bound, never a method (oracle: true)
Chains (compute: nfe U-Net forwards + the DIP iterations of their estimate), K reverse steps for
each K of protocol.steps; the chains of the DDPM alone (direct, noise_start) also for each K of
protocol.ddpm_only_steps, so that the baselines' front reaches the DIP starts' cost
  direct        denoising only: y scaled to the diffusion's x_{t*} (t*: the step whose noise
                level matches the observation's), no prior; K = 1 is one step to the posterior
                mean (Tweedie), K > 1 the respaced chain
  dip_start     a DIP estimate (`estimate` budget | es_wmv | oracle, protocol.start_estimates)
                diffused to sigma_t0, then K reverse steps
  cheap_start   the cheap estimate diffused to sigma_t0: what the DIP adds over a blur
  noise_start   inpainting only: pure noise at t0 = T with the same known-pixel consistency
Starts by noise level sigma_t0 ([-1, 1] units; the step whose s_t is nearest, arms.start_at):
  start_rule "c*e"        sigma_t0 = c x e_hat, e_hat the estimate's RMS error estimated from y
                          (denoising only; biased low for a DIP, see arms.residual_error)
  start_rule "c*e_oracle" sigma_t0 = c x the true e (needs the clean image: oracle: true)
  start_rule "sigma"      an explicit level of protocol.sigma_t0s
  start_rule "t0"         an explicit step of protocol.t0s (its sigma_t0 is the step's level)
  start_rule "t*" / "T"   the direct start / the noise start
A start whose level is at or beyond the schedule's last step would be pure noise: it is
skipped (listed in "skipped"). Samplers: ddpm (eta 1, respaced when K < t0) and ddim (eta 0);
K = 1 is the same step for both and runs once (as ddim). For inpainting the chains keep the
observed pixels consistent when protocol.inpaint_consistency (RePaint's simple replacement).
Denoising chains get no data consistency. The chains of every arm share their random numbers
(one seed per batch).

Compute per image (`dipddpm.evaluate.flops`): gflop_per_image = nfe x one U-Net forward +
dip_iters x one DIP iteration (forward + backward), counted with torch's FLOP counter once per
model; the cheap estimates' blurs are ~0. seconds_per_image on the machine that ran it = DIP
iterations x the fit's wall time per image-iteration (from the priors manifest when precomputed
priors are used, i.e. on the machine that fitted them) + the reverse chain's wall time.

Statistics (`dipddpm.evaluate.stats`): over the N images, psnr_ci95 is the bootstrap 95%
interval of the mean (2000 resamples, seed 0); delta_psnr / delta_ci95 the mean per-image
difference (and its interval) against the best baseline row (arms observation, cheap, direct,
cheap_start, noise_start, non-oracle) at equal or lower gflop_per_image, named by delta_vs.
Each task's `primary` PSNR (the one deltas, fronts and the answer use) is psnr for denoising
and psnr_hole (the hole alone) for inpainting, where the copied pixels give full-image PSNR
~9 dB for free.

results.json:
  {"protocol": "restoration", "split": str, "num_images": N, "keys": [str],
   "device": str, "model": {...load_trained info...}, "T": int, "observation": str,
   "dip": {"iters", "es_window", "es_patience", "settings"...}, "blur_sigma": float,
   "inpaint_consistency": bool, "start_c": [float], "sigma_t0s": [float], "t0s": [int],
   "steps": [int], "ddpm_only_steps": [int],
   "oracle_e": bool, "start_estimates": [str],
   "gflop": {"unet_forward": float, "dip_iteration": float},
   "bootstrap": {"resamples": int, "seed": int},
   "answer": [str],                 # one sentence per task (see `answer`)
   "tasks": {"<task>": {            # task names: "denoise-s25", "inpaint_box", ...
       "task": str, "sigma": float|null, "sigma_obs": float|null ([-1, 1] units),
       "t_star": int|null, "primary": "psnr" | "psnr_hole",
       "dip_source": "fitted" | "priors:<dir>", "dip_seconds_per_iteration": float,
       "dip_seconds_per_image": float,   # at dip.iters
       "errors": {"<start source>": {"estimated": float|null, "oracle": float}},
       "es_wmv": null | {"decided": int, "n": int, "pick_mean": float, "cost_mean": float},
       "dip_curve": null | {"iters": [int], "raw": [dB], "ema": [dB], "raw_ci95": [[lo, hi]],
                    "ema_ci95": [[lo, hi]]},   # mean PSNR vs DIP iterations (fitted here)
       "seconds": {"dip_fits": s, "rest": s},  # wall time of the task: its DIP fits (the
                                       # original fits' when read from protocol.dip_cache or
                                       # priors) and the chains and scoring after them
       "skipped": [str],            # starts dropped and why
       "front": [int],              # row indices of the baselines' Pareto front
       "answer": {...},             # see `answer`
       "rows": [{"arm": str, "estimate": str|null, "output": str|null,
                 "sampler": str|null, "steps": int|null, "nfe": int,
                 "start_rule": str|null, "c": float|null, "e": float|null,
                 "sigma_t0_requested": float|null, "sigma_t0": float|null, "t0": int|null,
                 "dip_iters": float, "gflop_per_image": float,
                 "seconds_per_image": float, "reverse_seconds_per_image": float,
                 "psnr": dB, "psnr_std": dB, "psnr_ci95": [lo, hi],
                 "psnr_hole": dB|null, "psnr_hole_ci95": [lo, hi]|null, "ssim": float,
                 "delta_psnr": dB|null, "delta_ci95": [lo, hi]|null, "delta_vs": str|null,
                 "baseline": bool, "oracle": bool, "es_decided": float|null,
                 "psnr_images": [dB], "psnr_hole_images": [dB]|null}]}}}
PSNR/SSIM are means over images on [0, 1] against the clean image (PSNR capped at 100 dB).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dipddpm.artifacts import fmt, pyplot, save_png
from dipddpm.config import Config, ConfigError, UserError
from dipddpm.data import load_split
from dipddpm.diffusion import Diffusion, ddim_timesteps, noise_levels
from dipddpm.dip.degrade import degrade
from dipddpm.dip.fit import FitSettings, fit_by_key
from dipddpm.dip.priors import priors_for_keys
from dipddpm.evaluate.flops import dip_iteration_gflop, unet_forward_gflop
from dipddpm.evaluate.image_metrics import psnr, ssim
from dipddpm.evaluate.stats import (BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, best_at_cost,
                                    bootstrap_ci, paired_delta, pareto_front)
from dipddpm.models.dip import SkipSpec
from dipddpm.progress import bar
from dipddpm.protocols.arms import (cheap_estimate, direct_start, kept_batch, oracle_error,
                                    residual_error, run_chain, sigma_on_diffusion_scale, start_at)
from dipddpm.runs import (RESULTS_FILE, atomic_write_json, atomic_write_text, prepare_run_dir,
                          read_json)
from dipddpm.tracking import Tracker
from dipddpm.train.sampling import load_trained

MAX_DB = 100.0
BASELINE_ARMS = ("observation", "cheap", "direct", "cheap_start", "noise_start")
DDPM_ONLY_ARMS = ("direct", "noise_start")  # chains from no estimate: y itself, pure noise
COLUMNS = ["task", "arm", "estimate", "output", "sampler", "start_rule", "c",
           "sigma_t0_requested", "sigma_t0", "t0", "steps", "nfe", "dip_iters",
           "gflop_per_image", "psnr", "psnr_hole", "ssim", "delta_psnr", "delta_vs",
           "seconds_per_image", "oracle"]


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
                   keep_fraction=cfg.dip.keep_fraction, observation=cfg.protocol.observation)


# ----------------------------------------------------------------------------- DIP estimates

@dataclass
class Pick:
    """One DIP estimate of every image and the DIP iterations it costs each image."""
    u: torch.Tensor  # [N, C, H, W] in [0, 1]
    iters: np.ndarray  # [N]
    output: str  # "ema", "raw" or "best" (of the two, per image)
    oracle: bool = False  # chosen with the clean image


@dataclass
class DipEstimate:
    u: torch.Tensor  # [N,C,H,W] the budget estimate in [0, 1]
    iters: np.ndarray  # [N] iterations behind u
    seconds_per_image: float  # the budget estimate's fit time per image
    source: str
    seconds_per_iteration: float = 0.0  # fit wall time per image-iteration
    # (estimate, output) -> Pick: ("budget", "ema"), ("es_wmv", "raw"), ("es_wmv", "ema"),
    # ("oracle", "raw"), ("oracle", "ema"), ("oracle", "best"); only the budget with priors
    picks: dict = field(default_factory=dict)
    es_decided: Optional[np.ndarray] = None  # [N] bool: ES-WMV decided within the fit
    es_pick: Optional[np.ndarray] = None  # [N] ES-WMV's picked iteration (0: none)
    curve: Optional[dict] = None  # PSNR vs iterations within the budget (`dip_curve`)
    fit_seconds: float = 0.0  # wall time of all the fits (the original fits' when cached)


CURVE_POINTS = 16  # points of a task's `dip_curve` (every 25 iterations of a 400 budget)


def dip_curve(raw: np.ndarray, ema: np.ndarray) -> dict:
    """Mean PSNR of the raw output and of the EMA over the images, with bootstrap intervals,
    at CURVE_POINTS evenly spaced iterations of the budget (curves [iters, N]; every net ran
    the budget)."""
    every = max(1, raw.shape[0] // CURVE_POINTS)
    its = list(range(every, raw.shape[0] + 1, every))
    out = {"iters": its}
    for name, c in (("raw", raw), ("ema", ema)):
        out[name] = [float(c[i - 1].mean()) for i in its]
        out[f"{name}_ci95"] = [list(bootstrap_ci(c[i - 1])) for i in its]
    return out


# the pick each start estimate diffuses: ES-WMV's own (raw) output; the oracle's better one
START_PICK = {"budget": ("budget", "ema"), "es_wmv": ("es_wmv", "raw"),
              "oracle": ("oracle", "best")}


def dip_estimates(cfg: Config, clean, keys, y, mask, device,
                  es_decide: bool = False) -> DipEstimate:
    """Fit one DIP per image to the observation (dip.batch_size nets at once) to the budget,
    and with es_decide on until ES-WMV has decided (at most dip.es_patience more iterations;
    without it, ES-WMV's picks are those it had at the budget, not all decided); every pick is
    read off the same fit. The restoration protocol fits with es_decide."""
    dip = cfg.dip
    spec = SkipSpec.from_config(dip)
    settings = FitSettings.from_config(dip, stop="budget", es_decide=es_decide)
    parts: dict = {k: [] for k in ("budget", "es_raw", "es_ema", "best_raw", "best_ema",
                                   "es_cost", "es_iter", "decided", "raw_iter", "ema_iter",
                                   "raw_psnr", "ema_psnr", "run", "curve_raw", "curve_ema")}
    # the most the fits can run: nets that ES-WMV has decided stop early, so it may end short
    fits_bar = bar(len(keys) * settings.max_iters, "DIP fits", unit="img-it", unit_scale=True)
    seconds = 0.0
    for _, r in fit_by_key(y, mask, clean, keys, spec, settings, run_seed=cfg.run.seed,
                           batch_size=dip.batch_size, device=device,
                           on_iter=lambda t, n: fits_bar.update(n),
                           cache=cfg.protocol.dip_cache or None):
        seconds += r.seconds
        parts["budget"].append(r.estimate.float())
        parts["es_raw"].append(r.es_raw.float())
        parts["es_ema"].append(r.es_ema.float())
        parts["best_raw"].append(r.best_raw.float())
        parts["best_ema"].append(r.best_ema.float())
        decided = r.es_stop.numpy() > 0
        parts["decided"].append(decided)
        # undecided by its last iteration: ES-WMV has cost at least what the net ran
        parts["es_cost"].append(np.where(decided, r.es_stop.numpy(), r.iters_run.numpy()))
        parts["es_iter"].append(r.es_iter.numpy())
        for name, it, curve in (("raw", r.best_raw_iter, r.psnr_raw),
                                ("ema", r.best_ema_iter, r.psnr_est)):
            it = it.numpy()
            parts[f"{name}_iter"].append(it)
            parts[f"{name}_psnr"].append(curve.numpy()[it - 1, np.arange(len(it))])
        parts["run"].append(r.iters_run.numpy())
        parts["curve_raw"].append(r.psnr_raw.numpy()[:dip.iters])
        parts["curve_ema"].append(r.psnr_est.numpy()[:dip.iters])
    fits_bar.close()
    curves = [np.concatenate(parts.pop(k), axis=1) for k in ("curve_raw", "curve_ema")]
    cat = {k: (torch.cat(v) if isinstance(v[0], torch.Tensor) else np.concatenate(v))
           for k, v in parts.items()}
    # ES-WMV never filling its window has no pick: its "pick" is then the budget estimate
    no_pick = torch.from_numpy(cat["es_iter"] == 0)
    es_raw = torch.where(no_pick[:, None, None, None], cat["budget"], cat["es_raw"])
    es_ema = torch.where(no_pick[:, None, None, None], cat["budget"], cat["es_ema"])
    es_cost = cat["es_cost"].astype(float)
    raw_better = cat["raw_psnr"] >= cat["ema_psnr"]
    best = torch.where(torch.from_numpy(raw_better)[:, None, None, None], cat["best_raw"],
                       cat["best_ema"])
    best_iter = np.where(raw_better, cat["raw_iter"], cat["ema_iter"]).astype(float)
    n = len(keys)
    spi = seconds / max(int(cat["run"].sum()), 1)
    budget_iters = np.full(n, float(dip.iters))
    picks = {("budget", "ema"): Pick(cat["budget"].clamp(0, 1), budget_iters, "ema"),
             ("es_wmv", "raw"): Pick(es_raw.clamp(0, 1), es_cost, "raw"),
             ("es_wmv", "ema"): Pick(es_ema.clamp(0, 1), es_cost, "ema"),
             ("oracle", "raw"): Pick(cat["best_raw"].clamp(0, 1),
                                     cat["raw_iter"].astype(float), "raw", True),
             ("oracle", "ema"): Pick(cat["best_ema"].clamp(0, 1),
                                     cat["ema_iter"].astype(float), "ema", True),
             ("oracle", "best"): Pick(best.clamp(0, 1), best_iter, "best", True)}
    return DipEstimate(picks[("budget", "ema")].u, budget_iters, spi * dip.iters, "fitted",
                       spi, picks, cat["decided"], cat["es_iter"], dip_curve(*curves), seconds)


def _priors_manifest(cfg: Config) -> Optional[dict]:
    """protocol.priors_dir's manifest (None when the key is empty); a missing one is an error."""
    folder = cfg.protocol.priors_dir
    if not folder:
        return None
    path = Path(folder) / "manifest.json"
    manifest = read_json(path) if path.exists() else None
    if manifest is None:
        raise UserError(f"protocol.priors_dir = {folder!r}: no manifest.json there; run "
                        f"python -m jobs.precompute_priors first")
    return manifest


def priors_for(cfg: Config, task: str, sigma: Optional[float], keys,
               y) -> tuple[Optional[DipEstimate], Optional[str]]:
    """(the precomputed estimates in protocol.priors_dir, None) when they were made for this
    task, sigma, observation model, split and run seed with a budget stop; else (None, why not)
    and the caller fits instead."""
    manifest = _priors_manifest(cfg)
    if manifest is None:
        return None, None
    folder = cfg.protocol.priors_dir
    s = manifest["settings"]
    observation = s.get("observation", "clipped")  # priors made before the key: clipped
    if (s["dip"]["task"] != task or (task == "denoise" and float(s["dip"]["sigma"]) != sigma)
            or s["split"] != cfg.protocol.split or s["run_seed"] != cfg.run.seed):
        return None, "priors made for another task, sigma, split or seed"
    if observation != cfg.protocol.observation:
        return None, (f"priors made with the {observation} observation, protocol.observation "
                      f"is {cfg.protocol.observation}")
    if s["dip"].get("stop", "budget") != "budget":
        return None, "priors stopped by ES-WMV: their cost is not known here"
    p, rows, seconds = priors_for_keys(folder, keys, "protocol.priors_dir")
    if not np.allclose(p["obs"][rows], y, atol=1e-6):
        raise UserError(f"protocol.priors_dir = {folder!r}: its observations differ from this "
                        f"run's (data or degradation settings changed); recompute the priors")
    iters = p["iters"][rows].astype(float)
    spi = seconds / max(float(iters.mean()), 1.0)
    u = torch.from_numpy(p["x0_hat"][rows]).float()
    return DipEstimate(u, iters, seconds, f"priors:{folder}", spi,
                       {("budget", "ema"): Pick(u, iters, "ema")},
                       fit_seconds=seconds * len(keys)), None


# ----------------------------------------------------------------------------- rows

@dataclass
class Scored:
    """Per-image PSNRs (full image and hole) and mean SSIM of one set of restored images."""
    psnr: np.ndarray
    hole: Optional[np.ndarray]
    ssim: float


def score(u: torch.Tensor, clean: torch.Tensor, hole: Optional[torch.Tensor]) -> Scored:
    u = u.cpu()
    p = psnr(u, clean, max_db=MAX_DB).double().numpy()
    h = None if hole is None else psnr(u, clean, max_db=MAX_DB, mask=hole).double().numpy()
    return Scored(p, h, float(ssim(u, clean).mean()))


def make_row(arm: str, sc: Scored, *, gflop_unet: float, gflop_dip: float, estimate=None,
             output=None, sampler=None, steps=None, nfe=0, start=None, dip_iters=0.0,
             dip_s=0.0, rev_s=0.0, oracle=False, es_decided=None) -> dict:
    start = start or {}
    return {"arm": arm, "estimate": estimate, "output": output, "sampler": sampler,
            "steps": steps, "nfe": int(nfe), "start_rule": start.get("rule"),
            "c": start.get("c"), "e": start.get("e"),
            "sigma_t0_requested": start.get("requested"), "sigma_t0": start.get("sigma"),
            "t0": start.get("t0"), "dip_iters": float(dip_iters),
            "gflop_per_image": float(nfe * gflop_unet + dip_iters * gflop_dip),
            "seconds_per_image": float(dip_s + rev_s), "reverse_seconds_per_image": float(rev_s),
            "psnr": float(sc.psnr.mean()), "psnr_std": float(sc.psnr.std()),
            "psnr_ci95": bootstrap_ci(sc.psnr),
            "psnr_hole": None if sc.hole is None else float(sc.hole.mean()),
            "psnr_hole_ci95": None if sc.hole is None else bootstrap_ci(sc.hole),
            "ssim": sc.ssim, "delta_psnr": None, "delta_ci95": None, "delta_vs": None,
            "baseline": arm in BASELINE_ARMS and not oracle, "oracle": bool(oracle),
            "es_decided": es_decided,
            "psnr_images": [round(float(v), 4) for v in sc.psnr],
            "psnr_hole_images": None if sc.hole is None else
            [round(float(v), 4) for v in sc.hole]}


def row_label(r: dict) -> str:
    """A short name for a row: arm, estimate/output, start, sampler and K."""
    parts = [r["arm"]]
    if r.get("estimate"):
        parts.append(r["estimate"] + (f"/{r['output']}" if r["arm"] == "dip" else ""))
    rule = r.get("start_rule")
    if rule in ("c*e", "c*e_oracle"):
        parts.append(f"σ_t0={r['c']:g}×{'e_oracle' if rule == 'c*e_oracle' else 'ê'}"
                     f"={r['sigma_t0']:.3f}")
    elif rule == "sigma":
        parts.append(f"σ_t0={r['sigma_t0']:.3f}")
    if r.get("t0") is not None and r["arm"] != "observation":
        parts.append(f"t0={r['t0']}")
    if r.get("steps") is not None:
        parts.append(f"{r['sampler']} K={r['steps']}")
    return " ".join(parts)


def primary_values(r: dict, primary: str) -> list:
    return r["psnr_images"] if primary == "psnr" else r["psnr_hole_images"]


def add_deltas(rows: list[dict], primary: str) -> list[int]:
    """Fill delta_psnr/delta_ci95/delta_vs of every row against the best baseline at equal or
    lower GFLOP (another row than itself); return the baselines' Pareto front (row indices)."""
    base = [i for i, r in enumerate(rows) if r["baseline"]]
    costs = [rows[i]["gflop_per_image"] for i in base]
    values = [rows[i][primary] for i in base]
    for i, r in enumerate(rows):
        j = best_at_cost(costs, values, r["gflop_per_image"],
                         exclude=base.index(i) if i in base else None)
        if j is None:
            continue
        b = rows[base[j]]
        r["delta_psnr"], r["delta_ci95"] = paired_delta(primary_values(r, primary),
                                                        primary_values(b, primary))
        r["delta_vs"] = row_label(b)
    return [base[k] for k in pareto_front(costs, values)]


# ----------------------------------------------------------------------------- starts

@dataclass
class Source:
    """An estimate a chain starts from."""
    arm: str  # dip_start or cheap_start
    estimate: Optional[str]
    u: torch.Tensor
    iters: float  # mean DIP iterations per image
    oracle: bool
    e_hat: Optional[float]  # estimated error ([-1, 1]), None where it cannot be estimated
    e_oracle: float


def start_points(cfg: Config, diffusion: Diffusion, src: Source) -> tuple[list[dict], list[str]]:
    """The starts of one source: dicts (rule, c, e, requested, sigma, t0, oracle) in order,
    and what was skipped. Starts landing on the same t0 are kept (their chains run once)."""
    p = cfg.protocol
    s_max = float(noise_levels(diffusion)[-1])
    wanted = []
    if src.e_hat is not None:
        wanted += [("c*e", c, src.e_hat, c * src.e_hat, False) for c in p.start_c]
    if p.oracle_e:
        wanted += [("c*e_oracle", c, src.e_oracle, c * src.e_oracle, True) for c in p.start_c]
    wanted += [("sigma", None, None, float(s), False) for s in p.sigma_t0s]
    out, skipped = [], []
    for rule, c, e, requested, oracle in wanted:
        t0, sigma = start_at(diffusion, requested)
        if t0 >= diffusion.T:
            skipped.append(f"{src.arm} {src.estimate or ''} {rule} σ_t0={requested:.3f}: at or "
                           f"beyond the last step's level {s_max:.3g} (a pure-noise start)")
            continue
        out.append({"rule": rule, "c": c, "e": e, "requested": float(requested),
                    "sigma": sigma, "t0": t0, "oracle": oracle})
    for t0 in p.t0s:
        if t0 >= diffusion.T:
            skipped.append(f"{src.arm} {src.estimate or ''} t0={t0}: not below T={diffusion.T}")
            continue
        sigma = float(noise_levels(diffusion)[t0 - 1])
        out.append({"rule": "t0", "c": None, "e": None, "requested": None, "sigma": sigma,
                    "t0": t0, "oracle": False})
    return out, skipped


def effective_steps(steps: list[int], t0: int) -> list[int]:
    """The K values that give distinct chains at t0 (K >= t0 all run t0 steps)."""
    return sorted({min(k, t0) for k in steps})


def chain_steps(p, arm: str) -> list[int]:
    """The K values an arm's chains run: protocol.steps, for the DDPM alone (direct, noise_start)
    also protocol.ddpm_only_steps, for the direct start also K = 1 (Tweedie)."""
    return p.steps + (p.ddpm_only_steps if arm in DDPM_ONLY_ARMS else []) \
        + ([1] if arm == "direct" else [])


def chain_plan(samplers: list[str], steps: list[int], t0: int) -> list[tuple[str, int]]:
    """(sampler, K) pairs with distinct chains: K = 1 is the same step for every sampler, so it
    runs once (as ddim when that is among the samplers)."""
    out = []
    for k in effective_steps(steps, t0):
        if k == 1:
            out.append(("ddim" if "ddim" in samplers else samplers[0], 1))
        else:
            out += [(s, k) for s in samplers]
    return out


def chain_batched(model, diffusion, n, *, batch_size, seed, cache: Optional[Path] = None, **kw):
    """run_chain over batches of the arrays in kw (u_hat, x_start, y, mask); -> (u, nfe, s/img,
    seconds read back). A bar (shown only when it lasts) counts the reverse steps of every
    batch. With `cache` (a folder owned by this one chain), each finished batch is kept there
    with its NFE and seconds and a rerun reads it back: an interrupted task resumes chain by
    chain with the same outputs and the same time per image."""
    arrays = {k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in kw.items() if not isinstance(v, torch.Tensor)}
    outs, nfe, seconds, read_back = [], None, 0.0, 0.0
    lows = range(0, n, batch_size)
    per_chain = len(ddim_timesteps(rest["t0"], rest["steps"]))
    with bar(len(lows) * per_chain, f"{rest['sampler']} K={rest['steps']} t0={rest['t0']}",
             unit="step", leave=False) as steps_bar:
        for b, lo in enumerate(lows):
            def make():
                part = {k: v[lo:lo + batch_size] for k, v in arrays.items()}
                r = run_chain(model, diffusion, seed=seed * 1_000_003 + b, progress=steps_bar,
                              **part, **rest)
                return {"u": r.u.cpu(), "nfe": r.nfe, "seconds": r.seconds}

            batch, kept = kept_batch(cache / f"batch-{b:05d}.pt" if cache else None, make)
            if kept:
                steps_bar.update(per_chain)
                read_back += batch["seconds"]
            outs.append(batch["u"])
            nfe = batch["nfe"] if nfe is None else nfe
            seconds += batch["seconds"]
    return torch.cat(outs), nfe, seconds / n, read_back


def check_runnable(cfg: Config, diffusion: Diffusion) -> None:
    """Raise UserError when a requested arm cannot run at all with this model (before any
    file is written): every explicit start beyond the schedule, a direct start beyond it, or
    no start rule for a task."""
    p = cfg.protocol
    T = diffusion.T
    if p.t0s and all(t0 >= T for t0 in p.t0s):
        raise UserError(f"protocol.t0s = {p.t0s}: every start is at or above the model's "
                        f"T = {T}; no DIP or cheap start could run (use protocol.sigma_t0s or "
                        f"protocol.start_c: starts by noise level)")
    s_max = float(noise_levels(diffusion)[-1])
    if p.sigma_t0s and all(start_at(diffusion, s)[0] >= T for s in p.sigma_t0s):
        raise UserError(f"protocol.sigma_t0s = {p.sigma_t0s}: every level is at or beyond the "
                        f"model's last step ({s_max:.3g}): those starts would be pure noise")
    for task, sigma in task_list(cfg):
        if task == "denoise" and direct_start_t(diffusion, sigma) >= T:
            raise UserError(f"protocol.sigmas = {p.sigmas}: sigma {sigma:g} is beyond the "
                            f"model's noise levels (T = {T}); no direct start can run")
        has_rule = bool(p.sigma_t0s or p.t0s or (p.start_c and (task == "denoise" or p.oracle_e)))
        if not has_rule:
            raise UserError(f"protocol.start_c = {p.start_c}: {task} has no start rule (its "
                            f"error cannot be estimated from y: set protocol.sigma_t0s, "
                            f"protocol.t0s or protocol.oracle_e=true)")


def direct_start_t(diffusion: Diffusion, sigma255: float) -> int:
    return start_at(diffusion, sigma_on_diffusion_scale(sigma255))[0]


# ----------------------------------------------------------------------------- one task

def run_task(cfg: Config, model, diffusion: Diffusion, clean_np, keys, task, sigma, device,
             log=print, keep: Optional[Path] = None) -> dict:
    """One task's rows, front and answer. With `keep`, a folder owned by this task in this run
    dir, every reverse chain's batches are kept there and a rerun reads them back."""
    p = cfg.protocol
    y_np, mask_np = observe(cfg, clean_np, keys, task, sigma)
    clean = torch.from_numpy(clean_np)
    y, mask = torch.from_numpy(y_np), torch.from_numpy(mask_np)
    inpaint = task != "denoise"
    hole = (1 - mask) if inpaint else None
    primary = "psnr_hole" if inpaint else "psnr"
    dip, why = priors_for(cfg, task, sigma, keys, y_np)
    if dip is None:
        if why:
            log(f"{task_name(task, sigma)}: not using protocol.priors_dir ({why})")
        dip = dip_estimates(cfg, clean_np, keys, y_np, mask_np, device, es_decide=True)
    log(f"{task_name(task, sigma)}: DIP estimates {dip.source}, "
        f"{dip.seconds_per_iteration * 1e3:.2f} ms per image-iteration")
    t_rest = time.perf_counter()
    g_unet, g_dip = unet_forward_gflop(model), dip_iteration_gflop(SkipSpec.from_config(cfg.dip))
    start = time.perf_counter()
    cheap = cheap_estimate(y, mask, p.blur_sigma)
    cheap_s = (time.perf_counter() - start) / len(keys)
    spi = dip.seconds_per_iteration
    common_row = dict(gflop_unet=g_unet, gflop_dip=g_dip)
    rows = [make_row("observation", score(y.clamp(0, 1), clean, hole), **common_row),
            make_row("cheap", score(cheap, clean, hole), rev_s=cheap_s, **common_row)]
    es_info = None
    if dip.es_decided is not None:
        es_info = {"decided": int(dip.es_decided.sum()), "n": len(keys),
                   "pick_mean": float(dip.es_pick.mean()),
                   "cost_mean": float(dip.picks[("es_wmv", "raw")].iters.mean())}
    for (est, out), pk in dip.picks.items():
        iters = float(pk.iters.mean())
        rows.append(make_row("dip", score(pk.u, clean, hole), estimate=est, output=out,
                             dip_iters=iters, dip_s=iters * spi, oracle=pk.oracle,
                             es_decided=(float(dip.es_decided.mean()) if est == "es_wmv"
                                         else None), **common_row))
    dev = lambda t: t.to(device)  # noqa: E731
    common = dict(batch_size=p.batch_size, seed=cfg.run.seed)
    cons = dict(y=dev(y), mask=dev(mask)) if inpaint and p.inpaint_consistency else {}
    skipped, t_star, sigma_obs = [], None, None
    done, read_back = {}, 0.0  # chains run (or read back from `keep`) in this task

    def chains(arm, source_kw, t0, start, *, estimate=None, iters=0.0, oracle=False):
        nonlocal read_back
        for sampler, k in chain_plan(p.samplers, chain_steps(p, arm), t0):
            name = "-".join([arm, *([estimate] if estimate else []), sampler, f"K{k}", f"t{t0}"])
            if name not in done:  # two starts of one source can land on the same t0
                u, nfe, s, s_back = chain_batched(
                    model, diffusion, len(keys), sampler=sampler, steps=k, t0=t0,
                    cache=keep / name if keep else None, **source_kw, **common)
                done[name], read_back = (u, nfe, s), read_back + s_back
            u, nfe, s = done[name]
            rows.append(make_row(arm, score(u, clean, hole), estimate=estimate, sampler=sampler,
                                 steps=k, nfe=nfe, start=start, dip_iters=iters,
                                 dip_s=iters * spi, rev_s=s, oracle=oracle, **common_row))

    n_sources = 1 + sum(dip.picks.get(START_PICK[e]) is not None for e in p.start_estimates)
    arms_bar = bar((task == "denoise") + inpaint + n_sources, f"{task_name(task, sigma)} arms",
                   unit="arm")
    if task == "denoise":
        sigma_obs = sigma_on_diffusion_scale(sigma)
        x_start, t_star = direct_start(y, diffusion, sigma)
        start = {"rule": "t*", "requested": sigma_obs, "t0": t_star,
                 "sigma": float(noise_levels(diffusion)[t_star - 1])}
        chains("direct", dict(x_start=dev(x_start)), t_star, start)
        arms_bar.update(1)
    if inpaint:
        T = diffusion.T
        start = {"rule": "T", "t0": T, "sigma": float(noise_levels(diffusion)[-1])}
        chains("noise_start", dict(u_hat=dev(torch.zeros_like(y)), **cons), T, start)
        arms_bar.update(1)
    sources = []
    for est in p.start_estimates:
        pk = dip.picks.get(START_PICK[est])
        if pk is None:
            skipped.append(f"dip_start {est}: no {est} estimate from {dip.source}")
            continue
        sources.append(Source("dip_start", est, pk.u, float(pk.iters.mean()), pk.oracle,
                              None, 0.0))
    sources.append(Source("cheap_start", None, cheap, 0.0, False, None, 0.0))
    errors = {}
    for src in sources:
        src.e_oracle = oracle_error(src.u, clean, hole)
        if not inpaint:
            src.e_hat = residual_error(src.u, y, sigma)
        errors[f"{src.arm}/{src.estimate}" if src.estimate else src.arm] = {
            "estimated": src.e_hat, "oracle": src.e_oracle}
        starts, dropped = start_points(cfg, diffusion, src)
        skipped += dropped
        for st in starts:
            chains(src.arm, dict(u_hat=dev(src.u), **cons), st["t0"], st,
                   estimate=src.estimate, iters=src.iters, oracle=src.oracle or st["oracle"])
        arms_bar.update(1)
    arms_bar.close()
    front = add_deltas(rows, primary)
    for r in rows:
        log(f"  {row_label(r):<60} {r['gflop_per_image']:9.1f} GFLOP  {primary} "
            f"{r[primary]:.2f}" + (f"  Δ {r['delta_psnr']:+.2f}" if r["delta_psnr"] is not None
                                   else ""))
    result = {"task": task, "sigma": sigma, "sigma_obs": sigma_obs, "t_star": t_star,
              "primary": primary, "dip_source": dip.source,
              "dip_seconds_per_iteration": spi, "dip_seconds_per_image": dip.seconds_per_image,
              "errors": errors, "es_wmv": es_info, "dip_curve": dip.curve, "skipped": skipped,
              "front": front, "rows": rows,
              # the task's compute: its DIP fits and everything after them (whenever they ran)
              "seconds": {"dip_fits": dip.fit_seconds,
                          "rest": time.perf_counter() - t_rest + read_back}}
    result["answer"] = answer(result, g_unet, g_dip)
    return result


def restoration(cfg: Config, model, diffusion: Diffusion, device, info: dict | None = None,
                log=print, images=None, done_dir: Optional[Path] = None) -> dict:
    """Every task of the protocol on the same images; returns the results.json dict. With
    done_dir, each finished task is kept there as <task>.json and a rerun (same run dir, so the
    same config) reads it back instead of running the task again."""
    clean, keys = images if images is not None else load_images(cfg)
    tasks = {}
    todo = task_list(cfg)
    for task, sigma in bar(len(todo), "restoration tasks", iterable=todo, unit="task"):
        name = task_name(task, sigma)
        done = None if done_dir is None else done_dir / f"{name}.json"
        if done is not None and done.exists():
            tasks[name] = read_json(done)
            log(f"{name}: finished before, read from {done}")
            continue
        tasks[name] = run_task(cfg, model, diffusion, clean, keys, task, sigma, device, log,
                               keep=None if done_dir is None else done_dir / name)
        if done is not None:
            atomic_write_json(done, tasks[name])
    dip_keys = ("iters", "scales", "channels_down", "channels_up", "channels_skip", "lr",
                "reg_noise_std", "exp_weight", "backtrack_db", "es_window", "es_patience", "box",
                "keep_fraction", "batch_size")
    p = cfg.protocol
    results = {"protocol": "restoration", "split": p.split, "num_images": len(keys),
               "keys": keys, "device": str(device), "model": info or {}, "T": diffusion.T,
               "observation": p.observation,
               "dip": {k: getattr(cfg.dip, k) for k in dip_keys},
               "blur_sigma": p.blur_sigma, "inpaint_consistency": p.inpaint_consistency,
               "start_c": list(p.start_c), "sigma_t0s": list(p.sigma_t0s), "t0s": list(p.t0s),
               "steps": list(p.steps), "ddpm_only_steps": list(p.ddpm_only_steps),
               "oracle_e": p.oracle_e, "start_estimates": list(p.start_estimates),
               "gflop": {"unet_forward": unet_forward_gflop(model),
                         "dip_iteration": dip_iteration_gflop(SkipSpec.from_config(cfg.dip))},
               "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED},
               "tasks": tasks}
    results["answer"] = answer_sentences(results)
    return results


# ----------------------------------------------------------------------------- the answer

def _front_cost(rows: list[dict], primary: str, value: float) -> float:
    """The least GFLOP at which a baseline row reaches `value` (inf: none does)."""
    costs = [r["gflop_per_image"] for r in rows if r["baseline"] and r[primary] >= value]
    return min(costs) if costs else math.inf


def answer(task: dict, g_unet: float, g_dip: float) -> dict:
    """The task's answer: the best DIP-start point against the baselines at equal or lower
    GFLOP (its delta and interval), and the break-even DIP budget: the most DIP iterations
    at which some measured DIP start, with its PSNR and its NFE, would still cost no more than
    the cheapest baseline reaching that PSNR, (G_baseline - nfe x U-Net) / DIP iteration
    (None: no baseline reaches it; 0: not even a free DIP fit pays off). An upper bound: a
    shorter fit would give a worse estimate. The oracle rows give the same as bounds."""
    rows, primary = task["rows"], task["primary"]
    out: dict = {"primary": primary}
    for label, keep in (("best", lambda r: not r["oracle"]), ("oracle", lambda r: r["oracle"])):
        starts = [i for i, r in enumerate(rows) if r["arm"] == "dip_start" and keep(r)
                  and r["delta_psnr"] is not None]
        if not starts:
            out[label] = None
            continue
        i = max(starts, key=lambda k: (rows[k]["delta_psnr"], -rows[k]["gflop_per_image"]))
        r = rows[i]
        even = []
        for k in starts:
            need = _front_cost(rows, primary, rows[k][primary])
            even.append(math.inf if math.isinf(need) else
                        max(0.0, (need - rows[k]["nfe"] * g_unet) / g_dip))
        j = starts[int(np.argmax(even))]
        out[label] = {"row": i, "label": row_label(r), "psnr": r[primary],
                      "gflop_per_image": r["gflop_per_image"], "dip_iters": r["dip_iters"],
                      "delta_psnr": r["delta_psnr"], "delta_ci95": r["delta_ci95"],
                      "delta_vs": r["delta_vs"],
                      "break_even_iters": None if math.isinf(max(even)) else max(even),
                      "break_even_row": j,
                      "break_even_label": row_label(rows[j]),
                      "break_even_dip_iters_used": rows[j]["dip_iters"]}
    out["prior_check"] = prior_check(rows, primary)
    return out


def prior_check(rows: list[dict], primary: str) -> Optional[dict]:
    """Denoising: the DDPM's one-step posterior mean from the direct start (Tweedie, K = 1)
    against the DIP's best estimate with the oracle's pick (a bound on any stopping rule), paired
    over the images: a trained diffusion prior should out-denoise a single-image prior."""
    tweedie = [r for r in rows if r["arm"] == "direct" and r["steps"] == 1]
    oracle = [r for r in rows if r["arm"] == "dip" and r["estimate"] == "oracle"
              and r["output"] == "best"]
    if not tweedie or not oracle:
        return None
    a, b = tweedie[0], oracle[0]
    d, ci = paired_delta(primary_values(a, primary), primary_values(b, primary))
    return {"tweedie": a[primary], "dip_oracle": b[primary], "delta_psnr": d, "delta_ci95": ci,
            "tweedie_gflop": a["gflop_per_image"], "dip_oracle_gflop": b["gflop_per_image"]}


def _gflop(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def answer_sentence(name: str, task: dict, n: int, observation: str) -> str:
    """One sentence with numbers for one task: whichever way it comes out."""
    a = task.get("answer") or {}
    best = a.get("best")
    what = "hole PSNR" if task.get("primary") == "psnr_hole" else "PSNR"
    head = f"**{name}** (N = {n}, {observation} observation, {what})"
    if not best:
        return f"{head}: no DIP start ran, so there is no answer here."
    d, (lo, hi) = best["delta_psnr"], best["delta_ci95"]
    sign = ("above" if lo > 0 else "below" if hi < 0 else "indistinguishable from")
    text = (f"{head}: the best DIP start ({best['label']}, {_gflop(best['gflop_per_image'])} "
            f"GFLOP/image) is {d:+.2f} dB [{lo:+.2f}, {hi:+.2f}] against the best baseline at "
            f"equal or lower compute ({best['delta_vs']}): {sign} the baselines' front. ")
    be = best["break_even_iters"]
    if be is None:
        text += ("No baseline's mean reaches the mean PSNR of "
                 f"{'it' if best['break_even_row'] == best['row'] else best['break_even_label']}"
                 " at any measured compute, so the measured front sets no break-even DIP budget"
                 + (" (though the difference is within its interval)." if lo <= 0 <= hi
                    else "."))
    elif be <= 0:
        text += ("Even with a free DIP fit no DIP start would beat the baselines at its cost: "
                 "the break-even DIP budget is 0 iterations.")
    else:
        text += (f"Break-even: a DIP start could pay off only if its fit cost at most "
                 f"{be:,.0f} DIP iterations ({best['break_even_label']} used "
                 f"{best['break_even_dip_iters_used']:,.0f}).")
    o = a.get("oracle")
    if o:
        text += (f" Bound (oracle, needs the clean image): {o['delta_psnr']:+.2f} dB "
                 f"[{o['delta_ci95'][0]:+.2f}, {o['delta_ci95'][1]:+.2f}] ({o['label']}).")
    pc = a.get("prior_check")
    if pc:
        lo, hi = pc["delta_ci95"]
        text += (f" The DDPM's one-step posterior mean (Tweedie, {_gflop(pc['tweedie_gflop'])} "
                 f"GFLOP) scores {pc['tweedie']:.2f} dB, {pc['delta_psnr']:+.2f} dB "
                 f"[{lo:+.2f}, {hi:+.2f}] against the DIP's oracle-picked estimate "
                 f"({pc['dip_oracle']:.2f} dB, {_gflop(pc['dip_oracle_gflop'])} GFLOP).")
    return text


def answer_sentences(results: dict) -> list[str]:
    return [answer_sentence(name, t, results["num_images"], results.get("observation", "?"))
            for name, t in results["tasks"].items()]


# ----------------------------------------------------------------------------- outputs

TABLE_COLUMNS = ["arm", "estimate", "start (σ_t0 → t0)", "sampler K", "NFE", "DIP iters",
                 "GFLOP", "PSNR [95% CI]", "hole PSNR", "SSIM", "Δ vs baseline [95% CI]",
                 "s/image"]


def table_cells(r: dict) -> list[str]:
    """One row of the restoration table (the report shows the same)."""
    est = r["estimate"] or ""
    if r["arm"] == "dip" and r["output"]:
        est += f"/{r['output']}"
    rule = r["start_rule"]
    if rule is None:
        start = ""
    elif rule in ("c*e", "c*e_oracle"):
        start = (f"{r['c']:g}×{'e_oracle' if rule == 'c*e_oracle' else 'ê'} "
                 f"({r['e']:.3f}) = {r['sigma_t0']:.3f} → {r['t0']}")
    elif rule in ("sigma", "t0"):
        start = f"{r['sigma_t0']:.3f} → {r['t0']}"
    else:
        start = f"{rule}: {r['sigma_t0']:.3f} → {r['t0']}"
    ci = r["psnr_ci95"]
    delta = (fmt(None) if r["delta_psnr"] is None else
             f"{r['delta_psnr']:+.2f} [{r['delta_ci95'][0]:+.2f}, {r['delta_ci95'][1]:+.2f}]")
    decided = ""
    if r.get("es_decided") is not None and r["es_decided"] < 1:
        decided = f" ({r['es_decided']:.0%} decided)"
    return [r["arm"] + (" (oracle)" if r["oracle"] else ""), est + decided, start,
            "" if r["sampler"] is None else f"{r['sampler']} {r['steps']}", str(r["nfe"]),
            f"{r['dip_iters']:.0f}", f"{r['gflop_per_image']:,.1f}",
            f"{r['psnr']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]", fmt(r["psnr_hole"]),
            fmt(r["ssim"], 3), delta, f"{r['seconds_per_image']:.3f}"]


def task_intro(results: dict, t: dict) -> str:
    what = "hole PSNR" if t["primary"] == "psnr_hole" else "PSNR"
    es = t.get("es_wmv")
    es_text = (f" ES-WMV decided for {es['decided']} of {es['n']} images (window "
               f"{results['dip']['es_window']}, patience {results['dip']['es_patience']}; its "
               f"cost, pick + patience, is {es['cost_mean']:.0f} iterations on average)."
               if es else "")
    err = "; ".join(f"{k}: ê {fmt(v['estimated'], 3)}, e_oracle {v['oracle']:.3f}"
                    for k, v in t["errors"].items())
    return (f"DIP estimates {t['dip_source']}; direct start t* = {fmt(t['t_star'])}. Deltas "
            f"and the front use the {what}. Errors e ([-1, 1] units): {err}.{es_text}")


def table_markdown(results: dict) -> str:
    n = results["num_images"]
    g = results["gflop"]
    lines = [f"# Restoration protocol, FashionMNIST {results['split']} images (N = {n})", "",
             "## The answer", ""] + [f"- {s}" for s in results["answer"]] + [
             "",
             f"T = {results['T']}, {results['observation']} observation noise, DIP "
             f"{results['dip']['iters']} iterations ({results['dip']['channels_down']} "
             f"channels), cheap estimate = Gaussian blur σ={results['blur_sigma']:g} px "
             f"(inpainting: blur-filled hole), inpainting consistency "
             f"{'on' if results['inpaint_consistency'] else 'off'}, device {results['device']}. "
             f"Compute per image: NFE x {g['unet_forward']:.3f} GFLOP (U-Net forward) + DIP "
             f"iterations x {g['dip_iteration']:.3f} GFLOP (forward + backward). PSNR: mean "
             "over images with its bootstrap 95% interval; Δ: paired per-image difference to "
             "the best baseline (observation, cheap, direct, cheap_start, noise_start) at equal "
             "or lower GFLOP. Oracle rows need the clean image: bounds, not methods.", ""]
    for name, t in results["tasks"].items():
        lines += [f"## {name}", "", task_intro(results, t), "",
                  "| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
        lines += ["| " + " | ".join(table_cells(r)) + " |" for r in t["rows"]]
        if t["skipped"]:
            lines += ["", "Skipped: " + "; ".join(t["skipped"])]
        lines.append("")
    return "\n".join(lines)


STYLE = {"observation": ("grey", "o"), "cheap": ("grey", "s"), "direct": ("black", "D"),
         "cheap_start": ("tab:green", "^"), "noise_start": ("tab:purple", "v")}
ESTIMATE_COLOUR = {"budget": "tab:blue", "es_wmv": "tab:orange", "oracle": "tab:red"}


def front_plot(results: dict, name: str, run_dir: Path) -> Path:
    """front_<task>.png: the task's primary PSNR against GFLOP per image (left) and seconds per
    image (right), log x. Baselines as grey/black markers with their Pareto front as a step
    line; DIP starts on top, coloured by estimate (hollow: oracle); DIP estimates alone as
    stars. Zero-cost rows sit at the left edge. A DIP start helps only above the line."""
    t = results["tasks"][name]
    rows, primary = t["rows"], t["primary"]
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13.5, 4.6))
    for ax, xkey, xlabel in ((axes[0], "gflop_per_image", "GFLOP per image (log)"),
                             (axes[1], "seconds_per_image", "seconds per image, this machine "
                                                            "(log)")):
        pos = [r[xkey] for r in rows if r[xkey] > 0]
        floor = (min(pos) / 3) if pos else 1e-3
        x = lambda r: max(r[xkey], floor)  # noqa: E731 (zero-cost rows at the left edge)
        base = [i for i, r in enumerate(rows) if r["baseline"]]
        front = [base[k] for k in pareto_front([rows[i][xkey] for i in base],
                                               [rows[i][primary] for i in base])]
        xs = [x(rows[i]) for i in front] + [max(x(r) for r in rows) * 1.5]
        ys = [rows[i][primary] for i in front] + [rows[front[-1]][primary]]
        ax.step(xs, ys, where="post", color="black", linewidth=1.2,
                label="baselines' Pareto front")
        seen = set()
        for r in rows:
            if r["arm"] in STYLE:
                colour, marker = STYLE[r["arm"]]
                lab = None if r["arm"] in seen else r["arm"]
                seen.add(r["arm"])
                ax.plot([x(r)], [r[primary]], marker, color=colour, markersize=4, alpha=0.7,
                        label=lab, markerfacecolor="none" if r["oracle"] else colour)
        for r in rows:
            if r["arm"] not in ("dip_start", "dip"):
                continue
            colour = ESTIMATE_COLOUR.get(r["estimate"], "tab:blue")
            marker = "*" if r["arm"] == "dip" else "o"
            tag = f"{r['arm']} {r['estimate']}" + (" (oracle)" if r["oracle"] else "")
            lab = None if tag in seen else tag
            seen.add(tag)
            ax.plot([x(r)], [r[primary]], marker, color=colour,
                    markersize=8 if r["arm"] == "dip" else 5, label=lab,
                    markerfacecolor="none" if r["oracle"] else colour)
        ax.axvline(floor, color="grey", linestyle=":", linewidth=0.8)
        ax.annotate("cost 0", (floor, 0), xycoords=("data", "axes fraction"), fontsize=6,
                    color="grey", xytext=(2, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(("hole " if primary == "psnr_hole" else "") + "PSNR vs clean (dB)")
        ax.set_title(f"{name}, N = {results['num_images']}")
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return save_png(fig, run_dir / f"front_{name}.png")


def plots(results: dict, run_dir: Path) -> list[Path]:
    return [front_plot(results, name, run_dir) for name in results["tasks"]]


def run_restoration(cfg: Config, device=None) -> dict:
    """The job: load the trained model, run every arm, write results.json, table.md and the
    figures into run.dir, and log them to W&B. Every input is checked before run.dir is
    touched: a missing checkpoint, too few images or an arm that cannot run leave nothing."""
    model, diffusion, info = load_trained(cfg.protocol.checkpoint or cfg.run.dir, cfg, device)
    device = next(model.parameters()).device
    images = load_images(cfg)
    check_runnable(cfg, diffusion)
    _priors_manifest(cfg)
    run_dir = prepare_run_dir(cfg)
    with Tracker(run_dir, cfg, "restore") as tracker:
        results = restoration(cfg, model, diffusion, device, info, images=images,
                              done_dir=run_dir / "tasks")
        atomic_write_json(run_dir / RESULTS_FILE, results)
        atomic_write_text(run_dir / "table.md", table_markdown(results))
        for path in plots(results, run_dir):
            tracker.log_image(path.stem, path, step=0)
        rows = [[name] + [r.get(c) for c in COLUMNS[1:]]
                for name, t in results["tasks"].items() for r in t["rows"]]
        tracker.log_table("restoration", COLUMNS, rows)
        summary = {}
        for name, t in results["tasks"].items():
            for arm in ("observation", "cheap", "dip", "direct", "dip_start", "cheap_start",
                        "noise_start"):
                best = [r[t["primary"]] for r in t["rows"] if r["arm"] == arm and not r["oracle"]]
                if best:
                    summary[f"{name}/{arm}_best_{t['primary']}"] = max(best)
            best = (t["answer"] or {}).get("best")
            if best:
                summary[f"{name}/dip_start_delta_psnr"] = best["delta_psnr"]
                if best["break_even_iters"] is not None:
                    summary[f"{name}/break_even_dip_iters"] = best["break_even_iters"]
        tracker.log(summary, step=0)
        tracker.summary(summary)
    return results
