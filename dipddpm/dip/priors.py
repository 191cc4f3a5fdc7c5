"""DIP priors for whole data shards: the input of the DIP-start diffusion experiments.

For one data shard `<split>-NNNNNN.tar` the job builds each sample's observation (noise or mask,
seeded by the sample key; the noise model is protocol.observation, as the restoration protocol
that reads the priors has it), fits one DIP per image with the batched path, and writes
`data.dir/priors/<priors.name>/<split>-NNNNNN.tar` with the same keys:
  x0_hat.npy  float32 [C, 28, 28] in [0, 1]   the DIP estimate (output EMA at the stop)
  obs.npy     float32 [C, 28, 28]             the observation the DIP saw
  mask.npy    float32 [C, 28, 28]             1 where observed (all ones for denoising)
  json        {"iters": n, "psnr_obs": dB, "psnr_clean": dB, "noisy_psnr": dB}
PSNRs are of x0_hat against the observation (masked) and the clean image.

Done means: the tar is renamed into place and `entries/<shard>.json` (count, sha256, means,
settings fingerprint) is written; `manifest.json` is rebuilt from all entries under a file
lock, so array tasks finishing together do not lose each other's entries. A rerun skips shards
whose entry matches the settings and whose tar verifies. Inside a shard, every finished batch
of `dip.batch_size` images (nets fitted at once) is saved to `.partial/<shard>/`, named by the
rows it holds, and a killed task resumes after the last one; the result is identical because
each net's randomness depends only on its sample key. (A rerun with another dip.batch_size
fits its own batches; its priors agree up to float rounding, as any batching's do.)
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from dipddpm.config import Config, ConfigError, DIPConfig, is_neutral
from dipddpm.data.idx import DataError
from dipddpm.data.shards import checked_shards, load_manifest, sha256_file, shard_samples, \
    split_shards
from dipddpm.data.stream import read_shards
from dipddpm.dip.degrade import degrade
from dipddpm.dip.fit import FitSettings, fit_by_key
from dipddpm.dip.metrics import psnr
from dipddpm.dip.table import SWEEP_KEYS
from dipddpm.models.dip import SkipSpec
from dipddpm.precision import default_device
from dipddpm.progress import bar as progress_bar
from dipddpm.runs import atomic_path, atomic_write_json, read_json

MANIFEST = "manifest.json"


def prior_dir(cfg: Config) -> Path:
    return Path(cfg.data.dir) / "priors" / cfg.priors.name


def prior_dip_keys() -> list[str]:
    """The dip keys a prior depends on: all but fit_dip's sweep, dip.split (priors take
    priors.split) and the neutral ones (dipddpm.config)."""
    return [f.name for f in fields(DIPConfig)
            if f.name not in (*SWEEP_KEYS, "split") and not is_neutral(f"dip.{f.name}")]


# the keys the priors job's results depend on (its run dir's rerun check)
READS = ("run", "data.dir", "priors.name", "priors.split",
         *(f"dip.{k}" for k in prior_dip_keys()))


def settings_of(cfg: Config, data_fingerprint: str) -> dict:
    """Everything that changes a prior's bytes; its hash names a compatible result."""
    identity = cfg.dip.fit_identity()  # precision resolved; absent when fp32 (older priors match)
    return {"dip": {k: identity[k] for k in prior_dip_keys() if k in identity},
            "observation": cfg.protocol.observation,
            "split": cfg.priors.split, "run_seed": cfg.run.seed, "data": data_fingerprint}


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def rebuild_manifest(out: Path, settings: dict) -> dict:
    """manifest.json from every shard entry on disk, written atomically under a lock."""
    with _locked(out / ".manifest.lock"):
        entries = sorted((read_json(p) for p in (out / "entries").glob("*.json")),
                         key=lambda e: e["name"])
        fp = fingerprint(settings)
        entries = [e for e in entries if e.get("settings") == fp]
        manifest = {"format": 1, "settings": settings, "fingerprint": fp,
                    "count": sum(e["count"] for e in entries), "shards": entries}
        atomic_write_json(out / MANIFEST, manifest)
    return manifest


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _write_prior_tar(path: Path, keys: list[str], part: dict) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            with wds.TarWriter(f, mtime=0, user="", group="") as sink:
                for i, key in enumerate(keys):
                    sink.write({
                        "__key__": key,
                        "x0_hat.npy": _npy(part["x0_hat"][i]),
                        "obs.npy": _npy(part["obs"][i]),
                        "mask.npy": _npy(part["mask"][i]),
                        "json": json.dumps({k: float(part[k][i]) if k != "iters" else
                                            int(part[k][i]) for k in
                                            ("iters", "psnr_obs", "psnr_clean", "noisy_psnr")}),
                    })
            f.flush()
            os.fsync(f.fileno())


def _fit_batch(cfg: Config, clean: np.ndarray, keys: list[str], device,
                   bar: Optional[tqdm]) -> dict:
    dip = cfg.dip
    # the restoration protocol's observation model, so that it can use these priors
    y, mask = degrade(clean, keys, dip.task, run_seed=cfg.run.seed, sigma=dip.sigma,
                      box=dip.box, keep_fraction=dip.keep_fraction,
                      observation=cfg.protocol.observation)
    on_iter = None if bar is None else (lambda t, n: bar.update(n))
    [(_, r)] = fit_by_key(y, mask, clean, keys, SkipSpec.from_config(dip),
                          FitSettings.from_config(dip), run_seed=cfg.run.seed,
                          batch_size=len(keys), device=device, on_iter=on_iter)
    x0 = r.estimate.float().cpu()
    y_t, m_t, c_t = (torch.from_numpy(a) for a in (y, mask, clean))
    return {"x0_hat": x0.numpy(), "obs": y, "mask": mask,
            "iters": r.stop_iter.cpu().numpy().astype(np.int64),
            "psnr_obs": psnr(x0, y_t, m_t).numpy(),
            "psnr_clean": psnr(x0, c_t).numpy(),
            "noisy_psnr": psnr(y_t, c_t, m_t).numpy()}


def precompute_shard(cfg: Config, entry: dict, settings: dict, *, device="cpu",
                     progress: bool = True) -> dict:
    """Priors of one data shard; returns its entry (skipped when a verified one exists)."""
    out = prior_dir(cfg)
    name, fp = entry["name"], fingerprint(settings)
    stem = name[:-len(".tar")]
    entry_path = out / "entries" / f"{stem}.json"
    tar_path = out / name
    if entry_path.exists() and tar_path.exists():
        done = read_json(entry_path)
        if done.get("settings") == fp and sha256_file(tar_path) == done["sha256"]:
            return dict(done, skipped=True)

    images, _, keys = read_shards(cfg.data.dir, [entry])
    clean = images.astype(np.float32)[:, None] / 255.0
    partial = out / ".partial" / stem
    if partial.exists() and not (partial / f"settings-{fp}").exists():
        shutil.rmtree(partial)  # batches of other settings: not ours to reuse
    partial.mkdir(parents=True, exist_ok=True)
    (partial / f"settings-{fp}").touch()

    start = time.perf_counter()
    bs = cfg.dip.batch_size
    bounds = [(lo, min(lo + bs, len(keys))) for lo in range(0, len(keys), bs)]
    total = len(keys) * cfg.dip.iters
    bar = progress_bar(total, f"priors {name}", unit="img-it", disable=not progress,
                       unit_scale=True)
    parts = []
    fitted = 0
    for lo, hi in bounds:
        path = partial / f"{lo:06d}-{hi:06d}.npz"  # by rows: a rerun may batch differently
        if path.exists():
            with np.load(path) as z:
                parts.append({k: z[k] for k in z.files})
            bar.update((hi - lo) * cfg.dip.iters)
            continue
        part = _fit_batch(cfg, clean[lo:hi], keys[lo:hi], device, bar)
        fitted += hi - lo
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, **part)
        parts.append(part)
    bar.close()
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    _write_prior_tar(tar_path, keys, merged)
    wall = time.perf_counter() - start
    done = {"name": name, "count": len(keys), "sha256": sha256_file(tar_path), "settings": fp,
            "iters_mean": float(merged["iters"].mean()),
            "psnr_clean_mean": float(merged["psnr_clean"].mean()),
            "psnr_obs_mean": float(merged["psnr_obs"].mean()),
            "noisy_psnr_mean": float(merged["noisy_psnr"].mean()),
            "fitted_images": fitted, "wall_s": round(wall, 2)}
    atomic_write_json(entry_path, done)
    shutil.rmtree(partial)
    return dict(done, skipped=False)


def precompute(cfg: Config, *, progress: bool = True) -> dict:
    """Priors for priors.shard (an index into the split's shards) or for every shard."""
    manifest = load_manifest(cfg.data.dir)
    shards = split_shards(manifest, cfg.priors.split, cfg.data.dir)
    if cfg.priors.shard is not None:
        if cfg.priors.shard >= len(shards):
            raise ConfigError(f"priors.shard = {cfg.priors.shard}: the {cfg.priors.split} split "
                              f"of {cfg.data.dir} has {len(shards)} shards")
        shards = [shards[cfg.priors.shard]]
    settings = settings_of(cfg, manifest["splits"][cfg.priors.split]["fingerprint"])
    device = default_device()
    entries = [precompute_shard(cfg, e, settings, device=device, progress=progress)
               for e in shards]
    manifest = rebuild_manifest(prior_dir(cfg), settings)
    return {"shards": entries, "manifest": manifest}


def priors_for_keys(folder, keys, what: str) -> tuple[dict, np.ndarray, float]:
    """(load_priors(folder), the row of each key, the fitting seconds per image its manifest
    records); a key without a prior is one line naming `what` (the config key of the folder)."""
    p = load_priors(folder)
    index = {k: i for i, k in enumerate(p["key"])}
    missing = [k for k in keys if k not in index]
    if missing:
        raise ConfigError(f"{what} = {str(folder)!r}: no prior for {len(missing)} of the "
                          f"{len(keys)} images asked for (first: {missing[0]}); precompute "
                          f"the shards that hold them")
    shards = read_json(Path(folder) / MANIFEST)["shards"]
    fitted = sum(e.get("fitted_images") or e["count"] for e in shards)
    wall = sum(e.get("wall_s", 0.0) for e in shards)
    return p, np.array([index[k] for k in keys]), wall / max(fitted, 1)


def load_priors(path) -> dict:
    """A prior dir's samples by manifest order: keys, x0_hat, obs, mask and the json fields."""
    path = Path(path)
    if not (path / MANIFEST).exists():
        raise ConfigError(f"{path / MANIFEST}: missing; run python -m jobs.precompute_priors")
    hint = ("recompute: rerun python -m jobs.precompute_priors with the settings that made "
            "them (it redoes the shards that do not verify)")
    try:
        manifest = read_json(path / MANIFEST)
        entries = manifest["shards"]
        if not all(isinstance(e, dict) and {"name", "count", "sha256"} <= set(e) for e in entries):
            raise ValueError("a shard entry lacks name, count or sha256")
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path / MANIFEST}: not a priors manifest ({type(e).__name__}); "
                        f"{hint}") from None
    out: dict = {"key": [], "x0_hat": [], "obs": [], "mask": [], "iters": [],
                 "psnr_obs": [], "psnr_clean": [], "noisy_psnr": []}
    for s in shard_samples(path, checked_shards(path, entries, hint), hint):
        out["key"].append(s["__key__"])
        for k in ("x0_hat", "obs", "mask"):
            out[k].append(np.load(io.BytesIO(s[f"{k}.npy"])))
        for k, v in json.loads(s["json"]).items():
            out[k].append(v)
    return {k: (v if k == "key" else np.asarray(v)) for k, v in out.items()}
