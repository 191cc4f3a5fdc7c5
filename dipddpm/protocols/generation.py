"""The generation protocol: does a DIP start let a DDPM generate as well with fewer steps?

A DIP fits one given image, so a "DIP start" needs an image, and what it starts from decides
what the FID measures. The protocol therefore runs three sources of DIP starts, each diffused
to a noise level sigma_t0 and then denoised by DDIM with protocol.gen_steps steps (CCDF /
SDEdit), beside the baselines from pure noise at equal NFE:

- train: DIP estimates of the first gen_num_images TRAINING images (fitted to their cfg.dip
  degradation, or read from protocol.gen_priors_dir). Their samples tend to come back as noisy
  copies of those images, which an FID against the training statistics rewards. The clean
  training image itself, diffused to the same sigma_t0 and run through the same chain
  (`clean_start`), is the zero-cost control: a DIP start that does not beat it adds nothing
  but its fitting time.
- heldout: the same for the first gen_num_images TEST images
  (`protocol.gen_heldout_priors_dir`, or fitted here). Their FID is also taken against
  held-out statistics that EXCLUDE them: the test split minus these images
  (`heldout_reference`), so a sample that copies its start image gains nothing there.
  `clean_start` is again the zero-cost control.
- data_free: no image at all. The DIP net of each of gen_num_images keys `noise-000000`, ...
  either untrained (protocol.gen_data_free_iters = 0: its output for its fixed input, one
  forward) or fitted for k iterations to a target of pure U[0, 1) noise
  (k = gen_data_free_iters), exactly as the DIP fits an image. It asks whether the net's
  output itself is a better start than Gaussian noise.

Noise levels, not indices. A start is given by sigma_t0 in [-1, 1] units
(protocol.gen_sigma_t0s): the chain starts at the 1-indexed t0 whose noise-to-signal ratio s_t =
sqrt((1 - abar_t) / abar_t) is closest (`dipddpm.protocols.arms.start_at`, the rule restoration
uses too), so the same config means the same noise level at any T and schedule. Each row records
the requested `sigma_t0`, the realised `sigma_t0_realised` (s at t0) and `t0`. A sigma that maps
to t0 = T starts from pure noise (the estimate's weight is gone): that start is skipped and
listed in "skipped", as is a sigma mapping to the same t0 as an earlier one.

Baseline front. DDIM (eta 0) and DDPM (eta 1, the respaced ancestral chain; with K = T exactly
ancestral DDPM) from pure noise with K steps, for every K in protocol.gen_ddim_steps and every
NFE a start row has (NFE = min(gen_steps, t0)), so every start has both baselines at its NFE;
plus the full T-step DDPM when protocol.gen_ddpm. protocol.gen_samplers names the samplers of
this front (both by default): with gen_sources = [] and one sampler, the protocol is the
baselines alone at a larger N (the study's generation_front stages). Every chain of the run draws
its start noise from the same per-batch seeds (common random numbers across arms), so a chain of
the same weights, sampler, K, seed and batch size gives the same samples in any run.

FID/KID against two references, each with its real-vs-real floor at N = gen_num_images:
- train: the whole train split's statistics (`fid`, `kid`, `kid_std`); floor `floor`: N random
  test images against them (`fid_vs_train`; `fid` there is two disjoint real sets of N).
- heldout: the test split minus the held-out start images, the whole test split when there is
  no held-out source (`fid_heldout`, `kid_heldout`, `kid_std_heldout`); floor `floor_heldout`:
  N random train images against it.
Features come from the project's FashionMNIST classifier (jobs.train_classifier), so the
numbers compare only with numbers from the same classifier. With classifier.inception_weights
set, every arm and `floor` also get "fid_inception": FID on the FID Inception's pool features
(torch-fidelity, weights from that local file) against the first
classifier.inception_ref_num_images train images (dipddpm/evaluate/inception.py; on the
published scale only with the standard weights file, which results["inception"]["standard"]
records); without it the results carry no such key.

Memorisation (`dipddpm.evaluate.memorisation_check`, summaries without per-sample lists) beside
every row that starts from data (dip_estimate, dip_start, clean_start of train and heldout),
the data-free rows and the largest-K DDIM baseline (without DDIM: the largest-K row): each
sample's nearest training image in pixels and classifier features against the same for real
test images, plus for rows with a source image `source_match`, the share of samples whose own
source image is at least as near as their nearest training image (for train sources: the
nearest training image is the source), and `source_distance_median`, the median pixel distance
of a sample to its own source image.

Compute. Each row has `nfe` (counted model calls per sample), `dip_iters` (DIP iterations per
image actually run: budget, or each net's stop) and `seconds_per_sample` (reverse chain plus
the DIP fit per image, on `device`); `reverse_seconds_per_sample` is the chain alone;
`gflop_per_sample` = nfe x one U-Net forward + dip_iters x one DIP iteration (forward and
backward), each counted once per model with torch's FLOP counter (dipddpm.evaluate.flops; the
untrained data-free net's single forward is not counted).

results.json:
  {"protocol": "generation", "n": N, "T": int, "device": str, "model": {...},
   "classifier": {"sha256", "test_accuracy"},
   "floor": {"n", "fid", "fid_vs_train", "kid", "kid_std", ..., ["fid_inception"]},
   "floor_heldout": {"n", "fid", "kid", "kid_std", "real": "N random train images"},
   "references": {"train": {"n"}, "heldout": {"n", "excluded": [first key, last key] or []}},
   ["inception": {"weights", "sha256", "ref_num", "standard"}],
   "gen_steps": K, "sigma_t0s": [requested...],
   "sources": {"train" | "heldout" | "data_free":
               {"n", "keys": [first, last], "dip_source": "fitted" | "priors:<dir>" |
                "untrained" | "fitted to noise", "dip_iters": float,
                "dip_seconds_per_image": float}},
   "skipped": [{"sigma_t0", "t0", "why"}],
   "arms": [{"arm": "ddpm" | "ddim" | "dip_estimate" | "dip_start" | "clean_start",
             "source": null | "train" | "heldout" | "data_free",
             "sigma_t0": float|null, "sigma_t0_realised": float|null, "t0": int|null,
             "steps": int|null, "nfe": int, "dip_iters": float, "gflop_per_sample": float,
             "seconds_per_sample": float, "reverse_seconds_per_sample": float,
             "fid": float, "kid": float, "kid_std": float,
             "fid_heldout": float, "kid_heldout": float, "kid_std_heldout": float,
             ["fid_inception": float,] "grid": "samples/<tag>.png",
             "memorisation": null | {"pixels": {...}, "features": {...},
                                     ["source_match": float, "source_distance_median": float],
                                     "distances": "memorisation/<tag>.npz"}}]}
"dip_estimate" is a source's DIP estimates themselves (no chain): the sigma -> 0 end of its
DIP start. Rows of the baselines have source, sigma_t0 and t0 null.
The per-sample distances behind the memorisation summaries are in run_dir/memorisation/<tag>.npz
(float32 arrays pixels_samples, pixels_test, features_samples, features_test: each sample's and
each reference test image's distance to its nearest training image), for the report's histograms.
Every arm's samples are kept batch by batch in run_dir/draws/<arm>/ (with their NFE and seconds),
so a run cut short resumes where it stopped, with the same samples and the same times.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dipddpm.artifacts import pyplot, save_grid, save_png
from dipddpm.config import Config, ConfigError, UserError
from dipddpm.data import load_split
from dipddpm.diffusion import Diffusion, ddim_sample, ddim_timesteps
from dipddpm.dip.degrade import degrade
from dipddpm.dip.fit import FitSettings, NET_SEED, fit_by_key, make_net, net_input
from dipddpm.dip.priors import priors_for_keys
from dipddpm.dip.seeds import sample_seed
from dipddpm.evaluate import (classifier_dir, feature_stats, frechet_distance, kid, load_classifier,
                              memorisation_check, real_vs_real_floor,
                              split_features, to_uint8, train_stats)
from dipddpm.evaluate.flops import dip_iteration_gflop, unet_forward_gflop
from dipddpm.evaluate.inception import describe, floor_fid, inception_fid, load_inception
from dipddpm.models.dip import SkipSpec
from dipddpm.precision import default_device
from dipddpm.progress import bar
from dipddpm.protocols.arms import CountingModel, ETA, kept_batch, start_at, to_diffusion
from dipddpm.runs import (RESULTS_FILE, SAMPLES_DIR, atomic_path, atomic_write_json,
                          atomic_write_text, prepare_run_dir, read_json, run_dir_lock)
from dipddpm.tracking import Tracker
from dipddpm.train.sampling import load_trained

SOURCE_SPLIT = {"train": "train", "heldout": "test"}
COLUMNS = ["arm", "source", "sigma_t0", "sigma_t0_realised", "t0", "steps", "nfe", "dip_iters",
           "fid", "kid", "fid_heldout", "kid_heldout", "seconds_per_sample", "source_match"]
DATA_FREE_TARGET = "data-free-target"  # the purpose the noise targets are seeded with


# ----------------------------------------------------------------------------- starts


@dataclass
class Source:
    """The images one kind of DIP start begins from."""
    name: str  # "train" | "heldout" | "data_free"
    keys: list[str]
    clean: Optional[torch.Tensor]  # [N, 1, 28, 28] in [0, 1]; None without data
    estimate: torch.Tensor  # the DIP outputs [N, 1, 28, 28] in [0, 1]
    dip_iters: float  # mean DIP iterations per image actually run
    dip_seconds: float  # per image
    dip_source: str

    def summary(self) -> dict:
        return {"n": len(self.keys), "keys": [self.keys[0], self.keys[-1]],
                "dip_source": self.dip_source, "dip_iters": self.dip_iters,
                "dip_seconds_per_image": self.dip_seconds}


def first_images(data_dir, split: str, n: int, key: str) -> tuple[np.ndarray, list[str]]:
    """The first n images of a split in index order, float32 [n, 1, 28, 28] in [0, 1], keys."""

    images, _, keys = load_split(data_dir, split)
    if n > len(images):
        raise ConfigError(f"{key} = {n}: the {split} split has {len(images)} images")
    return images[:n].astype(np.float32)[:, None] / 255.0, list(keys[:n])


def fit_estimates(cfg: Config, target: np.ndarray, keys: list[str], device, *,
                  mask: Optional[np.ndarray] = None,
                  iters: Optional[int] = None) -> tuple[torch.Tensor, float, float]:
    """(estimates [N,1,28,28] in [0, 1], mean iterations run, s/image): one DIP per image fitted
    to `target` (where `mask` is 1) with cfg.dip's settings (iters overridden when given), via
    fit_by_key."""

    dip = cfg.dip
    spec = SkipSpec.from_config(dip)
    settings = FitSettings.from_config(dip, **({} if iters is None else {"iters": iters}))
    y = torch.from_numpy(target)
    m = None if mask is None else torch.from_numpy(mask)
    est, ran, seconds = [], [], 0.0
    # the target stands in for the clean image: fit_by_key records PSNRs against it, unused here
    with bar(len(keys) * settings.max_iters, "DIP fits", unit="img-it", unit_scale=True) as fits:
        for _, r in fit_by_key(y, m, y, keys, spec, settings, run_seed=cfg.run.seed,
                               batch_size=dip.batch_size, device=device,
                               on_iter=lambda t, n: fits.update(n),
                               cache=cfg.protocol.dip_cache or None):
            est.append(r.estimate.float())
            ran.append((~torch.isnan(r.psnr_obs)).sum(0).double())  # iterations each net ran
            seconds += r.seconds
    seconds /= len(keys)
    return torch.cat(est).clamp(0, 1), float(torch.cat(ran).mean()), seconds


def prior_estimates(folder: str, key: str, split: str, keys: list[str]):
    """(estimates, mean iterations, s/image, source) for `keys` from a priors dir made by
    jobs.precompute_priors for `split`; a dir that lacks them is a one-line error."""

    path = Path(folder) / "manifest.json"
    if not path.exists():
        raise UserError(f"{key} = {folder!r}: no manifest.json there; run python -m "
                        f"jobs.precompute_priors priors.split={split} first")
    manifest = read_json(path)
    if manifest["settings"]["split"] != split:
        raise UserError(f"{key} = {folder!r}: priors of the {manifest['settings']['split']} "
                        f"split; this source needs priors of {split} images")
    p, rows, seconds = priors_for_keys(folder, keys, key)
    return (torch.from_numpy(p["x0_hat"][rows]).float(), float(p["iters"][rows].mean()),
            seconds, f"priors:{folder}")


def data_source(cfg: Config, name: str, device) -> Source:
    """The train or heldout source: the first gen_num_images images of its split and their DIP
    estimates (fitted to cfg.dip's degradation of each image, or from the priors dir)."""

    p = cfg.protocol
    split = SOURCE_SPLIT[name]
    clean, keys = first_images(cfg.data.dir, split, p.gen_num_images, "protocol.gen_num_images")
    folder, key = (p.gen_priors_dir, "protocol.gen_priors_dir") if name == "train" else \
        (p.gen_heldout_priors_dir, "protocol.gen_heldout_priors_dir")
    if folder:
        u, iters, seconds, how = prior_estimates(folder, key, split, keys)
    else:
        y, mask = degrade(clean, keys, cfg.dip.task, run_seed=cfg.run.seed,
                          sigma=cfg.dip.sigma, box=cfg.dip.box,
                          keep_fraction=cfg.dip.keep_fraction)
        u, iters, seconds = fit_estimates(cfg, y, keys, device, mask=mask)
        how = "fitted"
    return Source(name, keys, torch.from_numpy(clean), u, iters, seconds, how)


def data_free_source(cfg: Config, device) -> Source:
    """gen_num_images DIP outputs made without any image: each key's net untrained (k = 0: its
    output for its fixed input z, no jitter) or fitted k iterations to a U[0, 1) noise
    target."""

    n, k = cfg.protocol.gen_num_images, cfg.protocol.gen_data_free_iters
    keys = [f"noise-{i:06d}" for i in range(n)]
    if k > 0:
        target = np.stack([np.random.default_rng(sample_seed(cfg.run.seed, key, DATA_FREE_TARGET))
                           .random((1, 28, 28), dtype=np.float32) for key in keys])
        u, iters, seconds = fit_estimates(cfg, target, keys, device, iters=k)
        return Source("data_free", keys, None, u, iters, seconds, "fitted to noise")
    spec = SkipSpec.from_config(cfg.dip)
    settings = FitSettings.from_config(cfg.dip)
    out = []
    start = time.perf_counter()
    with torch.no_grad():
        for key in keys:  # the same net (seed) fit_by_key would start from for this key
            seed = sample_seed(cfg.run.seed, key, NET_SEED)
            net = make_net(spec, seed).to(device)
            z = net_input([seed], (spec.in_channels, 28, 28), settings, torch.float32, device)
            out.append(net(z).float().cpu())
    seconds = (time.perf_counter() - start) / n
    return Source("data_free", keys, None, torch.cat(out).clamp(0, 1), 0.0, seconds,
                  "untrained")


# ----------------------------------------------------------------------------- references


def heldout_reference(clf, data_dir, n: int) -> tuple[np.ndarray, list[str], list[str]]:
    """(features, keys) of the held-out reference, the test split without its first n images
    (the held-out source's start images; n = 0 without that source), and the n excluded keys."""

    _, _, keys = load_split(data_dir, "test")
    feats = split_features(clf, data_dir, "test")  # index order, as load_split's keys
    if len(keys) - n < 2:
        raise ConfigError(f"protocol.gen_num_images = {n}: the held-out reference is the test "
                          f"split without the first {n} images, and the test split has {len(keys)}")
    return feats[n:], list(keys[n:]), list(keys[:n])


@dataclass
class Reference:
    name: str
    features: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray


def fid_kid(feats: np.ndarray, ref: Reference, kid_subset_size: int, kid_num_subsets: int,
            seed: int) -> tuple[float, float, float]:
    """(FID, KID, KID std) of features against a reference."""

    k_mean, k_std = kid(feats, ref.features, kid_subset_size, kid_num_subsets, seed)
    return frechet_distance(*feature_stats(feats), ref.mu, ref.sigma), k_mean, k_std


def heldout_floor(clf, data_dir, ref: Reference, n: int, kid_subset_size: int, kid_num_subsets: int,
                  seed: int) -> dict:
    """The real-vs-real floor of the held-out reference at N: n random train images (real,
    and outside the reference) against it."""

    train = split_features(clf, data_dir, "train")
    a = train[np.random.default_rng(seed).choice(len(train), n, replace=False)]
    fid, k_mean, k_std = fid_kid(a, ref, kid_subset_size, kid_num_subsets, seed)
    return {"n": n, "fid": fid, "kid": k_mean, "kid_std": k_std,
            "real": f"{n} random train images", "seed": seed}


# ----------------------------------------------------------------------------- chains


def draw(model, diffusion: Diffusion, n: int, batch_size: int, seed: int, device, *,
         sampler: str, steps: int, t0: Optional[int] = None,
         u_hat: Optional[torch.Tensor] = None, cache: Optional[Path] = None):
    """n samples in [-1, 1] (CPU), NFE per sample (counted), seconds per sample. From noise
    (u_hat None) or from u_hat in [0, 1] diffused to t0; batch b draws its noise from seed
    `seed * 1_000_003 + b` in every arm. With `cache` (a folder owned by this one draw), each
    finished batch is kept there with its NFE and seconds, and a rerun reads it back: an
    interrupted draw resumes with the same samples and the same time per sample."""
    counter = CountingModel(model)
    out, nfe, seconds = [], None, 0.0
    lows = range(0, n, batch_size)
    first = t0 or diffusion.T
    per_chain = len(ddim_timesteps(first, steps or first))
    steps_bar = bar(len(lows) * per_chain, f"{sampler} K={steps or first} t0={first}",
                    unit="step", leave=False)
    for b, lo in enumerate(lows):
        m = min(batch_size, n - lo)

        def make():
            start = time.perf_counter()
            gen = torch.Generator(device).manual_seed(seed * 1_000_003 + b)
            counter.calls = 0
            x0_hat = None if u_hat is None else to_diffusion(u_hat[lo:lo + m]).to(device)
            x, _ = ddim_sample(counter, diffusion, (m, 1, 28, 28), steps=steps,
                               eta=ETA[sampler], x0_hat=x0_hat, t0=t0, generator=gen,
                               device=device, progress=steps_bar)
            return {"x": x.float().cpu(), "nfe": counter.calls,  # .cpu() waits for the GPU
                    "seconds": time.perf_counter() - start}

        batch, read_back = kept_batch(cache / f"batch-{b:05d}.pt" if cache else None, make)
        if read_back:
            steps_bar.update(per_chain)
        nfe = batch["nfe"] if nfe is None else nfe
        seconds += batch["seconds"]
        out.append(batch["x"])
    steps_bar.close()
    return torch.cat(out), nfe, seconds / n


MEMORISATION_DIR = "memorisation"
DRAWS_DIR = "draws"  # run_dir/draws/<arm>/batch-*.pt: the samples of every finished batch


def save_distances(path: Path, arrays: dict) -> str:
    """Write an arm's nearest-training-image distances (float32 per sample and per test image,
    in pixels and features) to path atomically; return it relative to the run dir."""
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)
    return f"{MEMORISATION_DIR}/{path.name}"


def _memorisation(clf, data_dir, x: torch.Tensor,
                  source: Optional[torch.Tensor] = None) -> dict:
    """Summaries of memorisation_check; with `source` ([N,1,28,28] in [0, 1], each sample's own
    start image) also source_match and source_distance_median (pixels, on [0, 1])."""

    rep = memorisation_check(clf, data_dir, x)
    out = {}
    for space in ("pixels", "features"):
        r = rep[space]
        out[space] = {k: r[k] for k in ("samples", "test", "ratio_median",
                                        "closer_than_test_p01", "exact_copies")}
    # the distances behind the summaries, for the report's histograms (saved by `add`)
    out["_distances"] = {f"{space}_{who}": np.asarray(rep[space][key], np.float32)
                         for space in ("pixels", "features")
                         for who, key in (("samples", "distances"), ("test", "test_distances"))}
    if source is not None:
        a = to_uint8(x).reshape(len(x), -1).astype(np.float64) / 255.0
        b = to_uint8(to_diffusion(source)).reshape(len(x), -1).astype(np.float64) / 255.0
        d_source = np.sqrt(((a - b) ** 2).sum(1))
        d_train = np.asarray(rep["pixels"]["distances"])
        out["source_match"] = float(np.mean(d_source <= d_train))
        out["source_distance_median"] = float(np.median(d_source))
    return out


def _tag(row: dict) -> str:
    parts = [row["arm"]] + ([row["source"]] if row.get("source") else []) + \
        ([f"s{row['sigma_t0']:g}"] if row.get("sigma_t0") is not None else []) + \
        ([f"k{row['steps']}"] if row.get("steps") else [])
    return "-".join(parts)


# ----------------------------------------------------------------------------- the protocol


def baseline_front(p, T: int, start_nfe: set) -> list[tuple[str, int]]:
    """(sampler, K) of every baseline chain from noise: each of p.gen_samplers at every K of
    p.gen_ddim_steps and every start's NFE, DDPM also at T when p.gen_ddpm; no K above T."""
    ks = set(p.gen_ddim_steps) | start_nfe
    return [(sampler, k) for sampler in p.gen_samplers
            for k in sorted(ks | ({T} if sampler == "ddpm" and p.gen_ddpm else set())) if k <= T]


def check_retired(cfg: Config) -> None:
    """protocol.gen_t0s (start indices) stays in the schema only so that config.yaml files
    written before it was retired still load; a job given one refuses to run."""
    if cfg.protocol.gen_t0s:
        raise UserError(f"protocol.gen_t0s = {cfg.protocol.gen_t0s}: retired; DIP starts are "
                        f"given by noise level, protocol.gen_sigma_t0s (sigma in [-1, 1] units)")


def generation(cfg: Config, model, diffusion: Diffusion, device, clf, run_dir: Path,
               info: dict | None = None, log=print) -> dict:
    """Every arm of the generation protocol; writes a sample grid per arm under run_dir/samples
    and returns the results.json dict."""

    p, data_dir, seed = cfg.protocol, cfg.data.dir, cfg.run.seed
    check_retired(cfg)
    n, T, bs = p.gen_num_images, diffusion.T, p.batch_size
    c = cfg.classifier
    kid_subset_size = min(c.kid_subset_size, n)
    inc = None
    if c.inception_weights:  # loaded first: a bad weights file fails before any real work
        inc = load_inception(c.inception_weights, device, c.inception_batch_size)
        inc_dir = classifier_dir(cfg)
    ho_feats, ho_keys, excluded = heldout_reference(clf, data_dir,
                                                    n if "heldout" in p.gen_sources else 0)
    mu, sigma, n_train = train_stats(clf, data_dir)
    refs = [Reference("train", split_features(clf, data_dir, "train"), mu, sigma),
            Reference("heldout", ho_feats, *feature_stats(ho_feats))]
    floor = real_vs_real_floor(clf, data_dir, n, seed=seed, kid_subset_size=kid_subset_size,
                               kid_num_subsets=c.kid_num_subsets)
    if inc is not None:
        floor = {**floor, "fid_inception": floor_fid(inc, data_dir, inc_dir, n,
                                                     c.inception_ref_num_images, seed)}
    floor_ho = heldout_floor(clf, data_dir, refs[1], n, kid_subset_size, c.kid_num_subsets, seed)
    log(f"floors at N = {n}: FID {floor['fid_vs_train']:.2f} vs train, "
        f"{floor_ho['fid']:.2f} vs held-out ({len(ho_keys)} test images)")
    arms, skipped = [], []
    kept = run_dir / DRAWS_DIR  # every arm's batches: an interrupted run resumes batch by batch
    unet_gflop = unet_forward_gflop(model)
    dip_gflop = dip_iteration_gflop(SkipSpec.from_config(cfg.dip))

    def add(arm, x, *, source=None, sigma_t0=None, realised=None, t0=None, steps=None, nfe=0,
            dip_iters=0.0, reverse_s=0.0, dip_s=0.0, mem=None):
        row = {"arm": arm, "source": source, "sigma_t0": sigma_t0,
               "sigma_t0_realised": realised, "t0": t0, "steps": steps, "nfe": int(nfe),
               "dip_iters": float(dip_iters),
               "gflop_per_sample": float(nfe * unet_gflop + dip_iters * dip_gflop),
               "seconds_per_sample": float(reverse_s + dip_s),
               "reverse_seconds_per_sample": float(reverse_s)}
        feats = clf.features(x)
        for ref in refs:  # fid, kid, kid_std vs train; fid_heldout, ... vs the held-out reference
            suffix = "" if ref.name == "train" else f"_{ref.name}"
            row[f"fid{suffix}"], row[f"kid{suffix}"], row[f"kid_std{suffix}"] = \
                fid_kid(feats, ref, kid_subset_size, c.kid_num_subsets, seed)
        tag = _tag(row)
        save_grid(x[:64], run_dir / SAMPLES_DIR / f"{tag}.png")
        row["grid"] = f"{SAMPLES_DIR}/{tag}.png"
        row["memorisation"] = mem
        if mem is not None and "_distances" in mem:
            row["memorisation"]["distances"] = save_distances(
                run_dir / MEMORISATION_DIR / f"{tag}.npz", mem.pop("_distances"))
        extra = ""
        if inc is not None:
            row["fid_inception"] = inception_fid(inc, data_dir, inc_dir, x,
                                                 c.inception_ref_num_images)
            extra = f"  Inception FID {row['fid_inception']:.2f}"
        arms.append(row)
        log(f"  {tag:<28} nfe={nfe:<5} FID {row['fid']:.2f} train / "
            f"{row['fid_heldout']:.2f} held-out  KID {row['kid']:.4f}{extra}")

    # the starts' noise levels, and the NFE each start chain will take
    starts = []
    for s in p.gen_sigma_t0s:
        t0, realised = start_at(diffusion, s)
        why = "t0 = T: a start from pure noise" if t0 >= T else \
            next((f"same t0 as sigma_t0 = {o[0]:g}" for o in starts if o[1] == t0), None)
        if why:
            log(f"  skipping sigma_t0={s:g} (t0={t0}): {why}")
            skipped.append({"sigma_t0": s, "t0": t0, "why": why})
            continue
        starts.append((s, t0, realised))
    start_nfe = {len(ddim_timesteps(t0, p.gen_steps)) for _, t0, _ in starts} \
        if p.gen_sources else set()

    # the sources first: a missing priors dir or image fails before any chain runs
    sources = []
    for name in p.gen_sources:
        src = data_free_source(cfg, device) if name == "data_free" else \
            data_source(cfg, name, device)
        log(f"{name} source: {len(src.keys)} DIP estimates ({src.dip_source}, "
            f"{src.dip_iters:.0f} iterations, {src.dip_seconds:.3f} s/image)")
        sources.append(src)

    # the baseline front, and the memorisation check beside its largest-K DDIM row (without
    # DDIM: its largest-K row)
    front = baseline_front(p, T, start_nfe)
    checked = max(front, key=lambda a: (a[0] == "ddim", a[1]), default=None)
    for sampler, k in front:
        x, nfe, s = draw(model, diffusion, n, bs, seed, device, sampler=sampler, steps=k,
                         cache=kept / f"{sampler}-k{k}")
        mem = _memorisation(clf, data_dir, x) if (sampler, k) == checked else None
        add(sampler, x, steps=k, nfe=nfe, reverse_s=s, mem=mem)

    for src in sources:
        x_est = to_diffusion(src.estimate)
        add("dip_estimate", x_est, source=src.name, dip_iters=src.dip_iters,
            dip_s=src.dip_seconds, mem=_memorisation(clf, data_dir, x_est, src.clean))
        for s, t0, realised in starts:
            common = dict(source=src.name, sigma_t0=s, realised=realised, t0=t0,
                          steps=p.gen_steps)
            x, nfe, sec = draw(model, diffusion, n, bs, seed, device, sampler="ddim",
                               steps=p.gen_steps, t0=t0, u_hat=src.estimate,
                               cache=kept / f"dip_start-{src.name}-t{t0}")
            add("dip_start", x, nfe=nfe, dip_iters=src.dip_iters, reverse_s=sec,
                dip_s=src.dip_seconds, mem=_memorisation(clf, data_dir, x, src.clean), **common)
            if src.clean is not None:  # the zero-cost control: the image itself at sigma_t0
                x, nfe, sec = draw(model, diffusion, n, bs, seed, device, sampler="ddim",
                                   steps=p.gen_steps, t0=t0, u_hat=src.clean,
                                   cache=kept / f"clean_start-{src.name}-t{t0}")
                add("clean_start", x, nfe=nfe, reverse_s=sec,
                    mem=_memorisation(clf, data_dir, x, src.clean), **common)
    results = {"protocol": "generation", "n": n, "T": T, "device": str(device),
               "model": info or {},
               "classifier": {"sha256": clf.sha256,
                              "test_accuracy": clf.metrics.get("test_accuracy")},
               "floor": floor, "floor_heldout": floor_ho,
               "references": {"train": {"n": int(n_train)},
                              "heldout": {"n": len(ho_keys),
                                          "excluded": [excluded[0], excluded[-1]]
                                          if excluded else []}},
               "gen_steps": p.gen_steps, "sigma_t0s": list(p.gen_sigma_t0s),
               "sources": {src.name: src.summary() for src in sources},
               "skipped": skipped, "arms": arms}
    if inc is not None:
        results["inception"] = {"weights": str(inc.path), "sha256": inc.sha256,
                                "ref_num": c.inception_ref_num_images, "standard": inc.standard}
    return results


# ----------------------------------------------------------------------------- outputs


def _source_match(r: dict):
    mem = r.get("memorisation") or {}
    return mem.get("source_match")


def _f(v, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def table_markdown(results: dict) -> str:
    f, fh = results["floor"], results["floor_heldout"]
    ref = results["references"]
    excluded = ref["heldout"]["excluded"]
    lines = [f"# Generation protocol (N = {results['n']} samples per arm)", "",
             f"FID/KID on the project classifier's features (test accuracy "
             f"{results['classifier']['test_accuracy']}) against two references, each with its "
             f"real-vs-real floor at N = {f['n']}: the train split ({ref['train']['n']} images; "
             f"floor FID {f['fid_vs_train']:.2f}, N test images) and the held-out reference, "
             + (f"the test split without the held-out start images ({ref['heldout']['n']} "
                f"images, {excluded[0]} .. {excluded[1]} excluded" if excluded else
                f"the test split ({ref['heldout']['n']} images: no held-out start images to "
                f"exclude")
             + f"; floor FID {fh['fid']:.2f}, N train images). T = {results['T']}, device "
             f"{results['device']}. Starts: DDIM with K = {results['gen_steps']} steps from the "
             f"t0 whose noise level matches the requested sigma_t0 ([-1, 1] units).", ""]
    for name, s in results["sources"].items():
        lines.append(f"- source {name}: {s['n']} images {s['keys'][0]} .. {s['keys'][1]}, DIP "
                     f"{s['dip_source']}, {s['dip_iters']:.0f} iterations, "
                     f"{s['dip_seconds_per_image']:.3f} s/image")
    for s in results["skipped"]:
        lines.append(f"- skipped sigma_t0 = {s['sigma_t0']:g} (t0 = {s['t0']}): {s['why']}")
    lines.append("")
    inc = results.get("inception")
    if inc:
        lines += [f"{describe(inc)} (`{inc['weights']}`); floor {f['fid_inception']:.2f} at "
                  f"N = {f['n']}.", ""]
    lines += ["| arm | source | sigma_t0 (realised) | t0 | K | NFE | DIP iters | FID train "
              "| FID held-out | KID train | KID held-out | s/sample | NN dist. ratio (px) "
              "| nearer than 99% of test | nearest = source |"
              + (" Inception FID |" if inc else ""),
              "|" + "---|" * (15 + bool(inc))]
    for r in results["arms"]:
        mem = r["memorisation"]
        ratio = f"{mem['pixels']['ratio_median']:.2f}" if mem else "—"
        close = f"{mem['pixels']['closer_than_test_p01']:.2f}" if mem else "—"
        sig = "—" if r["sigma_t0"] is None else \
            f"{r['sigma_t0']:g} ({r['sigma_t0_realised']:.3f})"
        lines.append(f"| {r['arm']} | {r['source'] or '—'} | {sig} | {r['t0'] or '—'} "
                     f"| {r['steps'] or '—'} | {r['nfe']} | {r['dip_iters']:.0f} "
                     f"| {r['fid']:.2f} | {r['fid_heldout']:.2f} | {r['kid']:.4f} "
                     f"| {r['kid_heldout']:.4f} | {r['seconds_per_sample']:.4f} | {ratio} "
                     f"| {close} | {_f(_source_match(r))} |"
                     + (f" {r['fid_inception']:.2f} |" if inc else ""))
    lines += ["", "NN dist. ratio: median distance of a sample to its nearest training image over "
              "the same for real test images (well below 1: copies). 'nearest = source': the "
              "share of samples whose own start image is at least as near as their nearest "
              "training image. clean_start: the source image itself diffused to sigma_t0, the "
              "zero-cost control of each DIP start. A train-source start that copies its images "
              "scores well against the train reference and gains nothing against the held-out "
              "one.", ""]
    return "\n".join(lines)


def fid_plot(results: dict, path: Path) -> Path:
    """FID vs NFE against both references: the baselines from noise as lines, the starts as
    markers (one per source and arm, annotated with sigma_t0), the floors dotted."""

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    arms = results["arms"]
    floors = (results["floor"]["fid_vs_train"], results["floor_heldout"]["fid"])
    markers = {"train": "^", "heldout": "v", "data_free": "s"}
    for ax, key, title, floor in zip(axes, ("fid", "fid_heldout"),
                                     ("vs train statistics", "vs held-out statistics"), floors):
        for sampler, style in (("ddim", "o-"), ("ddpm", "s-")):
            rows = sorted((r for r in arms if r["arm"] == sampler), key=lambda r: r["nfe"])
            if rows:
                ax.plot([r["nfe"] for r in rows], [r[key] for r in rows], style, markersize=4,
                        label=f"{sampler.upper()} from noise")
        for arm, fill in (("dip_start", None), ("clean_start", "none")):
            for name, mk in markers.items():
                rows = [r for r in arms if r["arm"] == arm and r["source"] == name]
                if not rows:
                    continue
                colour = "C3" if arm == "dip_start" else "C2"
                ax.scatter([r["nfe"] for r in rows], [r[key] for r in rows], marker=mk,
                           facecolors=colour if fill is None else fill, edgecolors=colour,
                           label=f"{arm} ({name})", zorder=3)
                for r in rows:
                    ax.annotate(f"σ{r['sigma_t0']:g}", (r["nfe"], r[key]), fontsize=6)
        ax.axhline(floor, color="grey", linestyle=":",
                   label=f"real-vs-real floor (N={results['n']})")
        ax.set_xscale("log")
        if min([r[key] for r in arms] + [floor]) > 0:  # FIDs span orders of magnitude
            ax.set_yscale("log")
        ax.set_xlabel("reverse steps (NFE per sample)")
        ax.set_title(f"FID {title}, N = {results['n']}")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("FID (classifier features)")
    axes[0].legend(fontsize=6)
    return save_png(fig, path)


def fit_sources(cfg: Config, device=None) -> dict:
    """The job with --fit-sources-only: fit the DIP estimates of the data sources (and of
    data_free when gen_data_free_iters > 0) into protocol.dip_cache and stop. They need neither
    the DDPM nor the classifier, so they can run beside the DDPM's training; the generation job
    then finds them there (the fit of a batch is the same whatever job asks for it). Returns
    each source's summary; writes nothing but the cache (and the lock beside run.dir)."""

    check_retired(cfg)
    if not cfg.protocol.dip_cache:
        raise ConfigError("protocol.dip_cache = '': --fit-sources-only fills that cache; name a "
                          "folder (the generation job must then name the same one)")
    p = cfg.protocol
    device = device or default_device()
    served = {"data_free": p.gen_data_free_iters == 0,  # the untrained nets: nothing to fit
              "train": bool(p.gen_priors_dir), "heldout": bool(p.gen_heldout_priors_dir)}
    out = {}
    # the generation job's run dir is held meanwhile: a generation stage started now waits
    # for these fits instead of fitting the same batches beside them
    with run_dir_lock(cfg.run.dir):
        for name in [n for n in p.gen_sources if not served[n]]:
            src = data_free_source(cfg, device) if name == "data_free" else \
                data_source(cfg, name, device)
            print(f"{name} source: {len(src.keys)} DIP estimates in {p.dip_cache} "
                  f"({src.dip_source}, {src.dip_iters:.0f} iterations, "
                  f"{src.dip_seconds:.3f} s/image)", flush=True)
            out[name] = src.summary()
    return out


def run_generation(cfg: Config, device=None) -> dict:
    """The job: trained model + classifier -> results.json, table.md, fid_vs_steps.png and
    sample grids in run.dir, logged to W&B."""

    check_retired(cfg)  # before the run dir is written
    model, diffusion, info = load_trained(cfg.protocol.checkpoint or cfg.run.dir, cfg, device)
    device = next(model.parameters()).device
    clf = load_classifier(classifier_dir(cfg), device)
    run_dir = prepare_run_dir(cfg)
    with Tracker(run_dir, cfg, "generate_eval") as tracker:
        results = generation(cfg, model, diffusion, device, clf, run_dir, info)
        atomic_write_json(run_dir / RESULTS_FILE, results)
        atomic_write_text(run_dir / "table.md", table_markdown(results))
        plot = fid_plot(results, run_dir / "fid_vs_steps.png")
        tracker.log_image("fid_vs_steps", plot, step=0)
        tracker.log_table("generation", COLUMNS,
                          [[r.get(c) for c in COLUMNS[:-1]] + [_source_match(r)]
                           for r in results["arms"]])
        summary = {"floor/fid_vs_train": results["floor"]["fid_vs_train"],
                   "floor/fid_heldout": results["floor_heldout"]["fid"], "n": results["n"]}
        for r in results["arms"]:
            tag = _tag(r)
            summary[f"fid/{tag}"] = r["fid"]
            summary[f"fid_heldout/{tag}"] = r["fid_heldout"]
            if "fid_inception" in r:
                summary[f"fid_inception/{tag}"] = r["fid_inception"]
        tracker.log(summary, step=0)
        tracker.summary(summary)
    return results
