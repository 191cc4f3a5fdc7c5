"""The generation protocol: FID/KID vs steps for DDPM and DDIM from noise, and the study's DIP
start (DIP estimates of TRAINING images diffused to t0, then DDIM), with a memorisation check.

A DIP fits one given image, so for generation it can only start from given images: the
estimates of training images diffused to t0 come back as (noisy) copies of those images unless
t0 is close to T. The memorisation check beside each DIP-start arm shows it: each sample's
nearest training image, in pixels and classifier features, against the same for real test
images, and how often that nearest image is the very image the chain started from
(`source_match`).

Every FID states N (protocol.gen_num) and the real-vs-real floor at that N
(`dipddpm.evaluate.real_vs_real_floor`: N test images against the train statistics, the
reference every sample FID here uses). Features come from the project's FashionMNIST classifier
(jobs.train_classifier), so the numbers compare only with numbers from the same classifier.
With classifier.inception_weights set, every arm and the floor also get "fid_inception": FID on
the FID Inception's pool features (torch-fidelity, weights from that local file) against the
first classifier.inception_ref_num train images (dipddpm/evaluate/inception.py; on the published
scale only with the standard weights file, which results["inception"]["standard"] records).
Without it the results carry no such key.

results.json:
  {"protocol": "generation", "n": N, "T": int, "device": str, "model": {...},
   "classifier": {"sha256", "test_accuracy"},
   "floor": {"n", "fid", "fid_vs_train", "kid", "kid_std", ..., ["fid_inception"]},
   ["inception": {"weights", "sha256", "ref_num", "standard"}],
   "dip_source": "fitted" | "priors:<dir>", "dip_seconds_per_image": float,
   "arms": [{"arm": "ddpm" | "ddim" | "dip_start" | "dip_estimate", "steps": int|null,
             "t0": int|null, "nfe": int, "dip_iters": float, "passes": float,
             "fid": float, "kid": float, "kid_std": float, ["fid_inception": float,]
             "seconds_per_sample": float,
             "grid": "samples/<tag>.png",
             "memorisation": null | {"pixels": {...}, "features": {...},
                                     "source_match": float, "source_distance_median": float,
                                     "distances": "memorisation/<tag>.npz"}}]}
"dip_estimate" is the DIP estimates themselves (no chain): the t0 -> 0 end of the DIP start.
The memorisation summaries are those of `dipddpm.evaluate.memorisation_report` without the
per-sample lists; those are in run_dir/memorisation/<tag>.npz (float32 arrays pixels_samples,
pixels_test, features_samples, features_test: each sample's and each reference test image's
distance to its nearest training image), for the report's histograms.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dipddpm.config import Config, ConfigError, UserError
from dipddpm.diffusion import Diffusion, ddim_sample, ddim_timesteps, ddpm_sample
from dipddpm.progress import bar
from dipddpm.protocols.arms import CountingModel, to_diffusion
from dipddpm.runs import atomic_path

COLUMNS = ["arm", "steps", "t0", "nfe", "dip_iters", "passes", "fid", "kid", "kid_std",
           "seconds_per_sample", "source_match"]


def train_priors(cfg: Config, device) -> tuple[torch.Tensor, list[str], float, float, str]:
    """(estimates [N,1,28,28] in [0,1], keys, DIP iterations, s/image, source) for the first
    gen_num training images: from protocol.gen_priors_dir, or fitted here with cfg.dip."""
    from dipddpm.data import load_split

    n = cfg.protocol.gen_num
    folder = cfg.protocol.gen_priors_dir
    if folder:
        from dipddpm.dip.priors import load_priors
        from dipddpm.runs import read_json

        manifest = read_json(Path(folder) / "manifest.json") \
            if (Path(folder) / "manifest.json").exists() else None
        if manifest is None:
            raise UserError(f"protocol.gen_priors_dir = {folder!r}: no manifest.json there")
        if manifest["settings"]["split"] != "train":
            raise UserError(f"protocol.gen_priors_dir = {folder!r}: priors of the "
                            f"{manifest['settings']['split']} split; the DIP start of the "
                            f"generation protocol needs priors of training images")
        p = load_priors(folder)
        if len(p["key"]) < n:
            raise UserError(f"protocol.gen_num = {n}: {folder} holds {len(p['key'])} priors")
        fitted = sum(e.get("fitted_images") or e["count"] for e in manifest["shards"])
        wall = sum(e.get("wall_s", 0.0) for e in manifest["shards"])
        return (torch.from_numpy(p["x0_hat"][:n]).float(), list(p["key"][:n]),
                float(p["iters"][:n].mean()), wall / max(fitted, 1), f"priors:{folder}")
    from dipddpm.protocols.restoration import fit_dip

    images, _, keys = load_split(cfg.data.dir, "train")
    if n > len(images):
        raise ConfigError(f"protocol.gen_num = {n}: the train split has {len(images)} images")
    clean = images[:n].astype(np.float32)[:, None] / 255.0
    keys = list(keys[:n])
    from dipddpm.dip.degrade import degrade

    y, mask = degrade(clean, keys, cfg.dip.task, run_seed=cfg.run.seed, sigma=cfg.dip.sigma,
                      box=cfg.dip.box, keep_fraction=cfg.dip.keep_fraction)
    est = fit_dip(cfg, clean, keys, y, mask, device)
    return est.u, keys, float(est.iters.mean()), est.seconds_per_image, "fitted"


def _draw(model, diffusion, n, batch_size, seed, device, *, sampler, steps=None, t0=None,
          u_hat: Optional[torch.Tensor] = None):
    """n samples in [-1, 1] (CPU), NFE per sample (counted), seconds per sample. A bar (shown
    only when it lasts) counts the reverse steps of every batch."""
    counter = CountingModel(model)
    out, nfe = [], None
    lows = range(0, n, batch_size)
    first = t0 or diffusion.T
    per_chain = first if sampler == "ddpm" else len(ddim_timesteps(first, steps))
    steps_bar = bar(len(lows) * per_chain, f"{sampler} K={steps or first} t0={first}",
                    unit="step", leave=False)
    start = time.perf_counter()
    for b, lo in enumerate(lows):
        m = min(batch_size, n - lo)
        gen = torch.Generator(device).manual_seed(seed * 1_000_003 + b)
        counter.calls = 0
        x0_hat = None if u_hat is None else to_diffusion(u_hat[lo:lo + m]).to(device)
        if sampler == "ddpm":
            x, _ = ddpm_sample(counter, diffusion, (m, 1, 28, 28), x0_hat=x0_hat, t0=t0,
                               generator=gen, device=device, progress=steps_bar)
        else:
            x, _ = ddim_sample(counter, diffusion, (m, 1, 28, 28), steps=steps, x0_hat=x0_hat,
                               t0=t0, generator=gen, device=device, progress=steps_bar)
        nfe = counter.calls if nfe is None else nfe
        out.append(x.float().cpu())
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    steps_bar.close()
    return torch.cat(out), nfe, seconds / n


MEMORISATION_DIR = "memorisation"


def save_distances(path: Path, arrays: dict) -> str:
    """Write an arm's nearest-training-image distances (float32 per sample and per test image,
    in pixels and features) to path atomically; return it relative to the run dir."""
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)
    return f"{MEMORISATION_DIR}/{path.name}"


def _memorisation(clf, data_dir, x: torch.Tensor, source_keys: Optional[list[str]]) -> dict:
    from dipddpm.evaluate import memorisation_check

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
    if source_keys is not None:
        nearest = rep["pixels"]["nearest"]
        out["source_match"] = float(np.mean([a == b for a, b in zip(nearest, source_keys)]))
        out["source_distance_median"] = float(np.median(rep["pixels"]["distances"]))
    return out


def generation(cfg: Config, model, diffusion: Diffusion, device, clf, run_dir: Path,
               info: dict | None = None, log=print) -> dict:
    """Every arm of the generation protocol; writes a sample grid per arm under run_dir/samples
    and returns the results.json dict."""
    from dipddpm.evaluate import real_vs_real_floor, sample_metrics
    from dipddpm.runs import SAMPLES_DIR
    from dipddpm.train.grid import save_grid

    p, data_dir, seed = cfg.protocol, cfg.data.dir, cfg.run.seed
    n = p.gen_num
    c = cfg.classifier
    kid_subset = min(c.kid_subset, n)
    inc = None
    if c.inception_weights:  # loaded first: a bad weights file fails before any real work
        from dipddpm.evaluate.classifier import classifier_dir
        from dipddpm.evaluate.inception import floor_fid, inception_fid, load_inception

        inc = load_inception(c.inception_weights, device, c.inception_batch_size)
        inc_dir = classifier_dir(cfg)
    floor = real_vs_real_floor(clf, data_dir, n, seed=seed, kid_subset=kid_subset,
                               kid_subsets=c.kid_subsets)
    if inc is not None:
        floor = {**floor, "fid_inception": floor_fid(inc, data_dir, inc_dir, n,
                                                     c.inception_ref_num, seed)}
    arms = []
    t0s = [t0 for t0 in sorted(set(p.gen_t0s)) if t0 <= diffusion.T]
    arms_bar = bar(int(p.gen_ddpm) + len(set(p.gen_ddim_steps)) + 1 + len(t0s), "generation arms",
                   unit="arm")

    def add(arm, x, *, steps=None, t0=None, nfe=0, dip_iters=0.0, seconds=0.0, mem=None):
        m = sample_metrics(clf, data_dir, x, kid_subset, c.kid_subsets, seed)
        tag = f"{arm}" + (f"-t0{t0}" if t0 else "") + (f"-k{steps}" if steps else "")
        save_grid(x[:64], run_dir / SAMPLES_DIR / f"{tag}.png")
        row = {"arm": arm, "steps": steps, "t0": t0, "nfe": int(nfe),
               "dip_iters": float(dip_iters), "passes": float(nfe + dip_iters), "fid": m["fid"],
               "kid": m["kid"], "kid_std": m["kid_std"], "seconds_per_sample": float(seconds),
               "grid": f"{SAMPLES_DIR}/{tag}.png", "memorisation": mem}
        if mem is not None and "_distances" in mem:
            row["memorisation"]["distances"] = save_distances(
                run_dir / MEMORISATION_DIR / f"{tag}.npz", mem.pop("_distances"))
        extra = ""
        if inc is not None:
            row["fid_inception"] = inception_fid(inc, data_dir, inc_dir, x, c.inception_ref_num)
            extra = f"  Inception FID {row['fid_inception']:.2f} " \
                    f"(floor {floor['fid_inception']:.2f})"
        arms.append(row)
        arms_bar.update(1)
        log(f"  {arm:<12} t0={t0 or '':<5} K={steps or '':<5} nfe={nfe:<5} FID {m['fid']:.2f} "
            f"(floor {floor['fid_vs_train']:.2f} at N={n})  KID {m['kid']:.4f}{extra}")

    bs = p.batch_size
    if p.gen_ddpm:
        x, nfe, s = _draw(model, diffusion, n, bs, seed, device, sampler="ddpm")
        add("ddpm", x, steps=diffusion.T, nfe=nfe, seconds=s)
    for k in sorted(set(p.gen_ddim_steps)):
        x, nfe, s = _draw(model, diffusion, n, bs, seed, device, sampler="ddim", steps=k)
        add("ddim", x, steps=k, nfe=nfe, seconds=s,
            mem=_memorisation(clf, data_dir, x, None) if k == max(p.gen_ddim_steps) else None)

    u_hat, keys, iters, dip_s, source = train_priors(cfg, device)
    log(f"DIP estimates of {len(keys)} training images: {source}, {dip_s:.2f} s/image")
    x_est = to_diffusion(u_hat)
    add("dip_estimate", x_est, dip_iters=iters, seconds=dip_s,
        mem=_memorisation(clf, data_dir, x_est, keys))
    for t0 in sorted(set(p.gen_t0s)):
        if t0 > diffusion.T:
            log(f"  skipping t0={t0} > T={diffusion.T}")
            continue
        x, nfe, s = _draw(model, diffusion, n, bs, seed, device, sampler="ddim",
                          steps=p.gen_steps, t0=t0, u_hat=u_hat)
        add("dip_start", x, steps=p.gen_steps, t0=t0, nfe=nfe, dip_iters=iters,
            seconds=s + dip_s, mem=_memorisation(clf, data_dir, x, keys))
    arms_bar.close()
    results = {"protocol": "generation", "n": n, "T": diffusion.T, "device": str(device),
               "model": info or {},
               "classifier": {"sha256": clf.sha256,
                              "test_accuracy": clf.metrics.get("test_accuracy")},
               "floor": floor, "dip_source": source, "dip_seconds_per_image": dip_s,
               "arms": arms}
    if inc is not None:
        results["inception"] = {"weights": str(inc.path), "sha256": inc.sha256,
                                "ref_num": c.inception_ref_num, "standard": inc.standard}
    return results


def _source_match(r: dict):
    mem = r.get("memorisation") or {}
    return mem.get("source_match")


def table_markdown(results: dict) -> str:
    f = results["floor"]
    lines = [f"# Generation protocol (N = {results['n']} samples per arm)", "",
             f"FID/KID on the project classifier's features (test accuracy "
             f"{results['classifier']['test_accuracy']}), against the train split's statistics. "
             f"Real-vs-real floor at N = {f['n']}: FID {f['fid_vs_train']:.2f} (N test images vs "
             f"train stats), {f['fid']:.2f} (two disjoint real sets of N), KID {f['kid']:.4f}. "
             f"T = {results['T']}; DIP estimates of training images: {results['dip_source']} "
             f"({results['dip_seconds_per_image']:.2f} s/image), device {results['device']}.", ""]
    inc = results.get("inception")
    if inc:
        from dipddpm.evaluate.inception import describe

        lines += [f"{describe(inc)} (`{inc['weights']}`); floor {f['fid_inception']:.2f} at "
                  f"N = {f['n']}.", ""]
    lines += ["| arm | t0 | K | NFE | DIP iters | FID | KID | s/sample | NN dist. ratio (px) "
              "| nearer than 99% of test | nearest = source |"
              + (" Inception FID |" if inc else ""),
              "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if inc else "")]
    for r in results["arms"]:
        mem = r["memorisation"]
        ratio = f"{mem['pixels']['ratio_median']:.2f}" if mem else "—"
        close = f"{mem['pixels']['closer_than_test_p01']:.2f}" if mem else "—"
        src = _source_match(r)
        lines.append(f"| {r['arm']} | {r['t0'] or '—'} | {r['steps'] or '—'} | {r['nfe']} "
                     f"| {r['dip_iters']:.0f} | {r['fid']:.2f} | {r['kid']:.4f} "
                     f"| {r['seconds_per_sample']:.4f} | {ratio} | {close} "
                     f"| {'—' if src is None else f'{src:.2f}'} |"
                     + (f" {r['fid_inception']:.2f} |" if inc else ""))
    lines += ["", "NN dist. ratio: median distance of a sample to its nearest training image over "
              "the same for real test images (well below 1: copies). 'nearest = source': the "
              "fraction of DIP-start samples whose nearest training image is the image the "
              "chain started from.", ""]
    return "\n".join(lines)


def fid_plot(results: dict, path: Path) -> Path:
    from dipddpm.report.plots import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    arms = results["arms"]
    ddim = sorted((r for r in arms if r["arm"] == "ddim"), key=lambda r: r["nfe"])
    if ddim:
        ax.plot([r["nfe"] for r in ddim], [r["fid"] for r in ddim], "o-", label="DDIM from noise")
    for r in arms:
        if r["arm"] == "ddpm":
            ax.plot([r["nfe"]], [r["fid"]], "ks", label=f"DDPM from noise ({r['nfe']} steps)")
    dip = sorted((r for r in arms if r["arm"] == "dip_start"), key=lambda r: r["t0"])
    if dip:
        ax.plot([r["nfe"] for r in dip], [r["fid"] for r in dip], "^--",
                label="DIP start (train priors)")
        for r in dip:
            ax.annotate(f"t0={r['t0']}", (r["nfe"], r["fid"]), fontsize=7)
    f = results["floor"]
    ax.axhline(f["fid_vs_train"], color="grey", linestyle=":",
               label=f"real-vs-real floor (N={f['n']})")
    ax.set_xscale("log")
    ax.set_xlabel("reverse steps (NFE)")
    ax.set_ylabel("FID (classifier features)")
    ax.set_title(f"Generation, N = {results['n']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_png(fig, path)


def run_generation(cfg: Config, device=None) -> dict:
    """The job: trained model + classifier -> results.json, table.md, fid_vs_steps.png and
    sample grids in run.dir, logged to W&B."""
    from dipddpm.evaluate import classifier_dir, load_classifier
    from dipddpm.runs import RESULTS_FILE, atomic_write_json, atomic_write_text, prepare_run_dir
    from dipddpm.tracking import Tracker
    from dipddpm.train.generate import load_trained

    run_dir = prepare_run_dir(cfg)
    model, diffusion, info = load_trained(cfg.protocol.checkpoint or cfg.run.dir, cfg, device)
    device = next(model.parameters()).device
    clf = load_classifier(classifier_dir(cfg), device)
    with Tracker(run_dir, cfg, "generate_eval") as tracker:
        results = generation(cfg, model, diffusion, device, clf, run_dir, info)
        atomic_write_json(run_dir / RESULTS_FILE, results)
        atomic_write_text(run_dir / "table.md", table_markdown(results))
        plot = fid_plot(results, run_dir / "fid_vs_steps.png")
        tracker.log_image("fid_vs_steps", plot, step=0)
        tracker.log_table("generation", COLUMNS,
                          [[r.get(c) for c in COLUMNS[:-1]] + [_source_match(r)]
                           for r in results["arms"]])
        summary = {"floor/fid_vs_train": results["floor"]["fid_vs_train"], "n": results["n"]}
        for r in results["arms"]:
            tag = r["arm"] + (f"_t0{r['t0']}" if r["t0"] else "") + \
                (f"_k{r['steps']}" if r["steps"] else "")
            summary[f"fid/{tag}"] = r["fid"]
            if "fid_inception" in r:
                summary[f"fid_inception/{tag}"] = r["fid_inception"]
        tracker.log(summary, step=0)
        tracker.summary(summary)
    return results
