"""What each stage of a study will cost, before it runs (printed by `jobs.study`, `--dry-run` too).

A stage's work is counted in GFLOP from its config, with the FLOP counters of
`dipddpm.evaluate.flops` (one U-Net forward, one DIP iteration; counted once per model), and
split by kind, each divided by the sustained rate one process reaches on the machine
(study.gflops_train, study.gflops_forward, study.gflops_dip: GFLOP/s; the defaults are those of
one core of the 2-core CPU this project's CPU study runs on, from BENCHMARKS.md):

  train    images trained x 3 U-Net forwards (forward + backward ~ 3 forwards), plus the
           study's variant's DIP iterations on every batch
  forward  U-Net forwards of samplers: sample grids, T-step sampling, the protocols' chains
  dip      DIP iterations (forward + backward) of fits

Bounds where the count depends on data: a restoration chain runs min(K, t0) steps, with t0 from
the config's schedule (a c x e start's e taken as the observation's noise level, an oracle e's
start at the last step below T), a fit with ES-WMV deciding is charged iters + patience. A stage
that is done costs nothing; a training stage under way is charged what its metrics.jsonl says
is left; restoration stages sharing a DIP cache are charged the fits once, to the one under
way if one is (the whole-stage estimates, progress=False, charge each its fits: its recorded
time counts the original fits').
The classifier, FID features and data preparation are small next to these and not counted.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dipddpm.config import Config
from dipddpm.data.idx import DataError
from dipddpm.data.shards import load_manifest
from dipddpm.diffusion import Diffusion
from dipddpm.dip.fit import FitSettings
from dipddpm.evaluate.flops import dip_iteration_gflop, unet_forward_gflop
from dipddpm.models.dip import SkipSpec
from dipddpm.models.unet import build_unet
from dipddpm.protocols.arms import direct_t0, sigma_on_diffusion_scale, start_at
from dipddpm.protocols.generation import baseline_front
from dipddpm.protocols.restoration import chain_plan, chain_steps, task_list
from dipddpm.runs import CONFIG_FILE, METRICS_FILE, read_jsonl

SPLITS = {"train": 60_000, "test": 10_000}  # FashionMNIST's, when data.dir has no manifest yet


@dataclass
class Cost:
    gflop: dict  # kind -> GFLOP
    seconds: float  # at the study's rates
    note: str = ""  # e.g. "40% left"


def _forward(name: str, cache: dict) -> float:
    if name not in cache:
        cache[name] = unet_forward_gflop(build_unet(name))
    return cache[name]


def _split_size(cfg: Config, split: str) -> int:
    try:
        return int(load_manifest(cfg.data.dir)["splits"][split]["count"])
    except (DataError, KeyError, TypeError):  # not prepared yet (the study's first step does)
        return SPLITS[split]


def _train_images(cfg: Config) -> float:
    t = cfg.train
    by_epochs = t.epochs * _split_size(cfg, "train")
    if t.max_steps is None:
        return by_epochs
    return min(by_epochs, t.max_steps * t.batch_size * t.grad_accum)


def _images_seen(run_dir: Path) -> float:
    rows = read_jsonl(run_dir / METRICS_FILE)
    return float(rows[-1].get("images_seen", 0)) if rows else 0.0


def _train(cfg: Config, run_dir: Optional[Path], unet: float) -> tuple[dict, str]:
    t = cfg.train
    total = _train_images(cfg)
    seen = min(_images_seen(run_dir), total) if run_dir is not None else 0.0
    left = total - seen
    work = {"train": 3 * unet * left}
    if t.noise == "dip":  # one DIP iteration on the whole batch is one per image
        work["dip"] = t.dip_iters * dip_iteration_gflop(SkipSpec.from_config(cfg.dip)) * left
    if t.sample_num_images and t.sample_every_images:
        grids = left / t.sample_every_images
        work["forward"] = grids * t.sample_num_images * t.sample_steps * unet
    note = f"{left / total:.0%} left" if seen else ""
    return work, note


def _restore(cfg: Config, unet: float, fitted_caches: set) -> dict:
    p, dip = cfg.protocol, cfg.dip
    n = p.num_images
    tasks = task_list(cfg)
    diffusion = Diffusion.from_config(cfg.diffusion)
    T = diffusion.T

    def chains(arm: str, t0s: list[int]) -> int:  # U-Net forwards of an arm's chains per image
        return sum(k for t0 in t0s for _, k in chain_plan(p.samplers, chain_steps(p, arm), t0))

    forwards = 0
    for task, sigma in tasks:
        denoise = task == "denoise"
        starts = [start_at(diffusion, s)[0] for s in p.sigma_t0s] + list(p.t0s)
        if denoise:  # c x e: an estimate's error is taken as the observation's noise, its bound
            starts += [start_at(diffusion, c * sigma_on_diffusion_scale(sigma))[0]
                       for c in p.start_c]
        starts += [T - 1] * (len(p.start_c) * p.oracle_e)  # c x the true e: below T at most
        starts = [t0 for t0 in starts if t0 < T]
        forwards += len(p.start_estimates) * chains("dip_start", starts) \
            + chains("cheap_start", starts) \
            + (chains("direct", [direct_t0(diffusion, sigma)]) if denoise
               else chains("noise_start", [T]))
    work = {"forward": n * forwards * unet}
    cache = p.dip_cache or None
    if not p.priors_dir and (cache is None or cache not in fitted_caches):
        settings = FitSettings.from_config(dip, stop="budget", es_decide=True)
        work["dip"] = (n * len(tasks) * settings.max_iters
                       * dip_iteration_gflop(SkipSpec.from_config(dip)))
        if cache is not None:
            fitted_caches.add(cache)
    return work


def _generation(cfg: Config, unet: float, T: int) -> dict:
    p, dip = cfg.protocol, cfg.dip
    n = p.gen_num_images
    # the protocol's own front; each start's NFE taken as gen_steps (min(gen_steps, t0) there)
    baselines = sum(k for _, k in baseline_front(p, T, {p.gen_steps} if p.gen_sources else set()))
    with_data = [s for s in p.gen_sources if s in ("train", "heldout")]
    chains = (len(p.gen_sources) + len(with_data)) * len(p.gen_sigma_t0s) * p.gen_steps
    work = {"forward": n * (baselines + chains) * unet}
    fits = 0.0
    if "train" in with_data and not p.gen_priors_dir:
        fits += n * dip.iters
    if "heldout" in with_data and not p.gen_heldout_priors_dir:
        fits += n * dip.iters
    if "data_free" in p.gen_sources:
        fits += n * p.gen_data_free_iters
    if fits:
        work["dip"] = fits * dip_iteration_gflop(SkipSpec.from_config(dip))
    return work


def _weights_owner(checkpoint: str, by_dir: dict) -> Optional[Config]:
    """The config of the planned training stage whose run dir holds `checkpoint`."""
    path = Path(checkpoint)
    for p in (path, *path.parents):
        if str(p) in by_dir:
            return by_dir[str(p)]
    return None


def estimate(stages, cfg: Config, done, progress: bool = True) -> dict[str, Cost]:
    """{stage name: Cost} for the planned stages; `done(stage)` says which are finished.
    progress=False: the whole of every stage, as before anything ran, each restoration stage
    with its DIP fits (stage_seconds of the export counts them in each, whichever ran them)."""
    st = cfg.study
    rates = {"train": st.gflops_train, "forward": st.gflops_forward, "dip": st.gflops_dip}
    unets: dict = {}
    by_dir = {s.cfg.run.dir: s.cfg for s in stages if s.job == "train"}
    fitted_caches: set = set()
    out = {}
    # a stage under way (its run dir written) is the one fitting a shared cache: it goes first
    under_way = [s for s in stages if progress and (Path(s.cfg.run.dir) / CONFIG_FILE).exists()]
    for s in under_way + [s for s in stages if s not in under_way]:
        c = s.cfg
        note = ""
        if done(s):
            out[s.name] = Cost({}, 0.0, "done")
            if c.protocol.dip_cache:  # its fits are in the cache for the others
                fitted_caches.add(c.protocol.dip_cache)
            continue
        trained = _weights_owner(c.protocol.checkpoint or c.sample.checkpoint, by_dir) or c
        unet = _forward(trained.model.name, unets)
        if s.job == "train":
            work, note = _train(c, Path(c.run.dir) if progress else None, unet)
        elif s.job == "sample":
            work = {"forward": c.sample.num_images * trained.diffusion.T * unet}
        elif s.job == "fit_dip":  # runs on until ES-WMV decides, as restoration's fits
            settings = FitSettings.from_config(c.dip, stop="budget", es_decide=True)
            work = {"dip": c.dip.num_images * len(c.dip.sigmas) * settings.max_iters
                    * dip_iteration_gflop(SkipSpec.from_config(c.dip))}
        elif s.job == "precompute_priors":
            work = {"dip": _split_size(c, c.priors.split) * c.dip.iters
                    * dip_iteration_gflop(SkipSpec.from_config(c.dip))}
        elif s.job == "restore":
            work = _restore(c, unet, fitted_caches if progress else set())
        elif s.job == "fid_curve":
            owner = _weights_owner(c.protocol.checkpoint, by_dir)
            t = (owner or c).train
            kept = _train_images(owner) // t.weights_every_images if owner and \
                t.weights_every_images else 1
            n_snap = -(-kept // c.protocol.curve_every)
            p = c.protocol
            work = {"forward": (n_snap * p.curve_num_images * p.curve_steps
                                + p.curve_final_num_images * p.curve_final_steps) * unet}
        elif s.job == "generate_eval":
            work = _generation(c, unet, trained.diffusion.T)
        else:  # the classifier (~2 min of one core here): no FLOP model
            work, note = {}, "not counted"
        seconds = sum(g / rates[k] for k, g in work.items())
        out[s.name] = Cost(work, seconds, note)
    return {s.name: out[s.name] for s in stages}  # plan order


def fmt_seconds(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"
