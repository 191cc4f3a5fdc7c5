"""The study as a list of stages: each stage is one run of an existing job, in its own run dir.

    study.run.dir/
      train/<variant>-T<T>/                  loss vs T, sampling time vs T, training time (both variants)
      train/ddpm-main/                       optional (stage train_main): one long DDPM run at main_T
                                             (study.main_train) that the protocols then use
      ablation/dip_in_training-dip_iters<k>/ the variant's DIP-iteration ablation at main_T
      ablation/<variant>-epochs<e>/          the epoch ablation at main_T
      fit_dip/                               the DIP PSNR-vs-iterations table
      classifier/                            the FID/KID feature net and its real-vs-real floors
      priors/                                DIP priors of training images (the generation DIP start)
      sampling/<variant>-T<T>/               T-step ancestral sampling
                                             (study.sampling_num_images images)
      fid_curve/                             FID of the protocols' DDPM at its kept snapshots
      restore/  generation/                  the two protocols, on the DDPM trained at main_T
      generation-ddim-n<N>/                  the generation protocol's baselines from noise alone
      generation-ddpm<T>-n<N>/               at a larger N (stage generation_front): DDIM at
                                             every K, and the full T-step DDPM
      restore-<weights>/                     restoration at earlier weights of that DDPM
                                             (study.restore_checkpoints)
      dip-cache/                             the protocols' DIP fits (resumable, shared)
      REPORT.md                              jobs.report over all of the above

A stage's argv is `--config <the job's own config> <derived> <study.common> <study.<kind>>
<the stage's own keys> run.dir=<its dir>`: the study file holds only what differs from the jobs'
defaults (its scale), and the stage's own keys (T, variant, checkpoint) always win. Stages come
in waves; a stage reads only run dirs of earlier waves. Every stage's config is loaded here,
before anything runs, so a bad override is one line naming the stage instead of a failure an
hour later.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dipddpm.config import Config, ConfigError, load_config
from dipddpm.dip.priors import prior_dir
from dipddpm.study.estimate import fmt_seconds

VARIANTS = {"ddpm": [], "dip_in_training": ["train.noise=dip"]}
# each stage kind: the job it runs, the config it starts from, its wave
KINDS = {
    "train": ("train", "configs/ddpm.yaml", 0),
    "train_main": ("train", "configs/ddpm.yaml", 0),
    "ablation_dip_iters": ("train", "configs/ddpm.yaml", 0),
    "ablation_epochs": ("train", "configs/ddpm.yaml", 0),
    "fit_dip": ("fit_dip", "configs/dip_denoise.yaml", 0),
    "classifier": ("train_classifier", "configs/classifier.yaml", 0),
    "priors": ("precompute_priors", "configs/priors.yaml", 0),
    "sampling": ("sample", "configs/ddpm.yaml", 1),
    "fid_curve": ("fid_curve", "configs/generation.yaml", 1),
    "restore": ("restore", "configs/restore.yaml", 1),
    "generation": ("generate_eval", "configs/generation.yaml", 1),
    "generation_front": ("generate_eval", "configs/generation.yaml", 1),
}
# study settings every stage inherits, so one data.dir / seed / W&B project serves the study
INHERITED = ("run.seed", "data.dir", "data.source", "data.num_workers", "wandb.mode",
             "wandb.project", "wandb.entity", "classifier.dir")


@dataclass
class Stage:
    name: str  # also its run dir, relative to the study's run.dir
    kind: str
    job: str  # jobs.<job>
    wave: int
    argv: list[str]
    cfg: Config


def project_root() -> Path:
    return Path(__file__).resolve().parents[2]


def _fmt(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _inherited(cfg: Config) -> list[str]:
    out = []
    for key in INHERITED:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None and value != "":
            out.append(f"{key}={_fmt(value)}")
    return out


def plan_study(cfg: Config, study_dir: Path) -> list[Stage]:
    """Every stage of the study in cfg.study.stages, in wave order, configs loaded and checked."""
    st = cfg.study
    root = project_root()
    base = _inherited(cfg) + [f"wandb.group={study_dir.name}"] + list(st.common)
    stages: list[Stage] = []

    def add(kind: str, name: str, own: list[str]):
        job, config, wave = KINDS[kind]
        run_dir = study_dir / name
        shared = {"ablation_dip_iters": st.train, "ablation_epochs": st.train,
                  "train_main": st.main_train}
        extra = shared[kind] if kind in shared else getattr(st, kind)
        argv = ["--config", str(root / config), *base, *extra, *own, f"run.dir={run_dir}"]
        try:
            stage_cfg = load_config(argv[1], argv[2:])
        except ConfigError as e:
            raise ConfigError(f"study stage {name}: {e}") from None
        stages.append(Stage(name, kind, job, wave, argv, stage_cfg))
        return stage_cfg

    def train_dir(variant: str, T: int) -> Path:
        return study_dir / f"train/{variant}-T{T}"

    wanted = set(st.stages)
    # the main runs' settings, to skip ablation points that are those very runs
    main = {v: load_config(str(root / KINDS["train"][1]),
                           base + list(st.train) + flags + [f"diffusion.T={st.main_T}"])
            for v, flags in VARIANTS.items()}
    main_dir = train_dir("ddpm", st.main_T)
    if "train_main" in wanted:  # first: every protocol stage waits for it
        main_dir = study_dir / "train/ddpm-main"
        add("train_main", "train/ddpm-main", [f"diffusion.T={st.main_T}"])
    if "train" in wanted:
        for T in st.T_values:
            for variant, flags in VARIANTS.items():
                add("train", f"train/{variant}-T{T}", [*flags, f"diffusion.T={T}"])
    if "ablation_dip_iters" in wanted:
        for k in st.dip_iters:
            if k != main["dip_in_training"].train.dip_iters:
                add("ablation_dip_iters", f"ablation/dip_in_training-dip_iters{k}",
                    [*VARIANTS["dip_in_training"], f"diffusion.T={st.main_T}",
                     f"train.dip_iters={k}"])
    if "ablation_epochs" in wanted:
        for e in st.epochs:
            for variant, flags in VARIANTS.items():
                if e != main[variant].train.epochs:
                    add("ablation_epochs", f"ablation/{variant}-epochs{e:g}",
                        [*flags, f"diffusion.T={st.main_T}", f"train.epochs={e}"])
    if "fit_dip" in wanted:
        add("fit_dip", "fit_dip", [])
    if "classifier" in wanted:
        add("classifier", "classifier", [])
    priors_dir = None
    if "priors" in wanted:
        # the generation protocol's DIP start needs priors of training images
        priors_dir = prior_dir(add("priors", "priors", ["priors.split=train"]))
    if "sampling" in wanted:
        for T in st.T_values:
            for variant in VARIANTS:
                add("sampling", f"sampling/{variant}-T{T}",
                    [f"sample.checkpoint={train_dir(variant, T)}", "sample.sampler=ddpm",
                     f"sample.num_images={st.sampling_num_images}",
                     f"sample.batch_size={st.sampling_num_images}"])
    checkpoint = f"protocol.checkpoint={main_dir}"
    if "fid_curve" in wanted:
        add("fid_curve", "fid_curve", [checkpoint])
    if "restore" in wanted:
        for weights in st.restore_checkpoints:
            name = f"restore-{Path(weights).stem}" if weights else "restore"
            add("restore", name, [f"protocol.dip_cache={study_dir / 'dip-cache'}",
                                  f"protocol.checkpoint={main_dir / weights}" if weights
                                  else checkpoint])
    if "generation" in wanted:
        own = [checkpoint, f"protocol.dip_cache={study_dir / 'dip-cache'}"] + (
            [f"protocol.gen_priors_dir={priors_dir}"] if priors_dir else [])
        add("generation", "generation", own)
    if "generation_front" in wanted:  # no DIP start: nothing but the baselines, each at its N
        own = [checkpoint, "protocol.gen_sources=[]"]
        for sampler, n, name, keys in (
                ("ddim", st.front_ddim_num_images, "ddim", ["protocol.gen_ddpm=false"]),
                ("ddpm", st.front_ddpm_num_images, f"ddpm{st.main_T}",
                 ["protocol.gen_ddim_steps=[]", "protocol.gen_ddpm=true"])):
            if n:
                add("generation_front", f"generation-{name}-n{n}",
                    [*own, f"protocol.gen_samplers=[{sampler}]",
                     f"protocol.gen_num_images={n}", *keys])
    return sorted(stages, key=lambda s: s.wave)  # stable: plan order within a wave


def describe(stages: list[Stage], argv: bool = False, costs: Optional[dict] = None) -> str:
    """One line per stage (its CPU-time estimate when `costs` is given, see estimate.py), with
    its command line when `argv`; then the total."""
    lines = []
    for s in stages:
        line = f"  wave {s.wave}  {s.name:<40} jobs.{s.job:<18}"
        if costs is not None:
            c = costs[s.name]
            line += "done" if c.note == "done" else \
                f"~{fmt_seconds(c.seconds)}" + (f" ({c.note})" if c.note else "")
        lines.append(line.rstrip())
        if argv:
            lines.append(f"      python -m jobs.{s.job} {shlex.join(s.argv)}")
    if costs is not None:
        total = sum(c.seconds for c in costs.values())
        lines.append(f"  estimated CPU time left: ~{fmt_seconds(total)} at the study's rates "
                     f"(study.gflops_*: one process each, stages one after another)")
    return "\n".join(lines)
