"""One schema for the whole system, YAML loading with `base:`, and `key.sub=value` overrides.

A config is built in three layers, each deep-merged over the last:
  schema defaults  <-  YAML file (and the files it extends with `base:`)  <-  CLI overrides.
Every leaf remembers where it came from, so a bad value is reported as
`config error: FILE: key.sub = value: reason` and the job exits 2 without a traceback.

Sections are plain dataclasses; a field's annotation is its type (int, float, str, bool,
Optional[...], list[...], Literal[...]). Checks that involve more than a type live in each
section's `check()` and raise `ConfigError` through `fail()`.

What a key means for a rerun is declared once, on its field:
  plain          changes results: a run dir that holds a run of another value refuses the rerun
                 (`compare_configs`, called by `dipddpm.runs.prepare_run_dir`)
  `neutral()`    changes no result (logging and checkpoint cadence, W&B, performance switches,
                 where things go): a rerun may change it, the study does not rerun a stage for
                 it, the report does not tell runs apart by it, fingerprints leave it out
  `extendable()` a run length: a rerun may raise it (training goes on from its last
                 checkpoint), never lower it; it still tells runs apart everywhere else
A whole section can be neutral (`wandb`, `launch`, `study`). To mark a new performance-only switch
(say a channels_last flag), declare it with `neutral(...)`; nothing else needs to change.

How keys are named:
  counts         a count of images is `num_images`, prefixed by what it is for where a section
                 holds more than one (`protocol.gen_num_images`: samples per generation arm,
                 `train.sample_num_images`: images in each periodic sample grid,
                 `study.sampling_num_images`); a count of other things is `num_<things>`
                 (`classifier.kid_num_subsets`); steps and iterations are `steps` and `iters`
  group sizes    the images handled together are a `batch_size` (`dip.batch_size`: DIP nets
                 fitted at once, one per image, and the unit a killed fit resumes after), the
                 images of one stored group a `<group>_size` (`data.shard_size`,
                 `classifier.kid_subset_size`)
A renamed key is listed in `RENAMED_KEYS` (old name -> new name), and its old name keeps
working wherever a config is read (`migrate`): a YAML file or a command-line override with an
old name works and prints a one-line note on stderr; a run dir's config.yaml and a stage.json
(written by an earlier version) are read under the new names without one, so their runs resume
and finished stages are still recognised. Add a line there whenever a key is renamed.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from dipddpm.registry import TASKS, UNET_NAMES


class UserError(Exception):
    """An error caused by the user's input; jobs print it as one line and exit 2."""


class ConfigError(UserError):
    pass


NEUTRAL = "neutral"  # field metadata keys
EXTENDABLE = "extendable"


def neutral(default=dataclasses.MISSING, *, default_factory=dataclasses.MISSING):
    """A field whose value changes no result (see the module docstring)."""
    return field(default=default, default_factory=default_factory, metadata={NEUTRAL: True})


def extendable(default, *, unless: Optional[typing.Callable[[Any], Optional[str]]] = None):
    """A run length that a rerun into the same run dir may raise but not lower; None counts as
    no limit. `unless(section)` returns why even raising it would change results (or None)."""
    return field(default=default, metadata={EXTENDABLE: unless or (lambda section: None)})


# ----------------------------------------------------------------------------- sections


@dataclass
class RunConfig:
    dir: str = neutral("runs/default")  # every artifact of a job goes here (moved: resumes)
    seed: int = 0
    resume: bool = neutral(True)  # pick up the latest checkpoint in run.dir if there is one

    def check(self, fail):
        if not self.dir:
            fail("dir", self.dir, "must not be empty")


@dataclass
class DataConfig:
    source: str = neutral("")  # IDX folder or 'torchvision'; empty -> $DIPDDPM_DATA
    dir: str = "data/fashion-mnist"  # the webdataset shards + manifest.json
    shard_size: int = 2500  # 60k/2500 = 24 train shards, 4 test: divisible by 1,2,4 ranks x workers
    # dataloader workers per rank; not neutral: the training order depends on it (data/stream.py)
    num_workers: int = 2
    shuffle_buffer: int = 2000  # samples held for the in-shard shuffle

    def check(self, fail):
        if self.shard_size < 1:
            fail("shard_size", self.shard_size, "must be >= 1")
        if self.num_workers < 0:
            fail("num_workers", self.num_workers, "must be >= 0")
        if self.shuffle_buffer < 0:
            fail("shuffle_buffer", self.shuffle_buffer, "must be >= 0")


@dataclass
class WandbConfig:
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "dipddpm"
    entity: Optional[str] = None
    group: str = ""  # a launcher sets this to the submission's name
    job_type: str = ""  # empty -> the job's name
    name: str = ""  # empty -> the run dir's name
    tags: list[str] = field(default_factory=list)


@dataclass
class ModelConfig:
    name: str = "unet-small"  # one of dipddpm.registry.UNET_NAMES (dipddpm.models.unet)

    def check(self, fail):
        if self.name not in UNET_NAMES:
            fail("name", self.name, f"unknown model; choose from {sorted(UNET_NAMES)}")


@dataclass
class DiffusionConfig:
    T: int = 1000
    schedule: Literal["linear", "cosine"] = "linear"
    beta_start: float = 1e-4  # linear schedule, DDPM paper values
    beta_end: float = 0.02
    scale_betas: bool = True  # linear: multiply both ends by 1000/T so any T ends near pure noise
    prediction: Literal["eps", "v"] = "eps"
    loss: Literal["mse", "huber"] = "mse"

    def check(self, fail):
        if self.T < 1:
            fail("T", self.T, "must be >= 1")
        if not 0 < self.beta_start < self.beta_end < 1:
            fail("beta_end", self.beta_end, "need 0 < beta_start < beta_end < 1")


@dataclass
class TrainConfig:
    # training length in passes over the train split (the study's 15); a cosine schedule spans
    # it, so there a rerun cannot lengthen the run
    epochs: float = extendable(15.0, unless=lambda t: "the cosine learning-rate schedule spans "
                               "train.epochs" if t.lr_schedule == "cosine" else None)
    # stop after this many optimizer steps (the LR schedule still spans epochs)
    max_steps: Optional[int] = extendable(None)
    batch_size: int = 128  # per process, per micro-step
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_images: int = 10_000  # linear warmup, counted in images seen (all ranks)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    clip_grad: float = 1.0  # 0 disables
    # null: the launcher's (accelerate launch --mixed_precision / accelerate config, seen as
    # ACCELERATE_MIXED_PRECISION), else "no"; a value here holds over the launcher's; auto:
    # bf16 where the hardware runs it natively, else no (fp32); see dipddpm.precision
    mixed_precision: Optional[Literal["no", "fp16", "bf16", "auto"]] = None
    # model weights and inputs in NHWC: faster oneDNN convolutions (the same numbers up to rounding)
    channels_last: bool = neutral(False)
    # AdamW implementation: default = torch's choice (a for-loop on CPU tensors, foreach on
    # CUDA); fused = one kernel over all parameters (CPU and CUDA); same update up to rounding
    optimizer_impl: Literal["default", "foreach", "fused"] = neutral("default")
    ema_decay: float = 0.999
    ema_start_images: int = 0  # EMA copies the weights until this many images were seen
    ema_warmup: bool = True  # decay min(ema_decay, (1+step)/(10+step)): early EMA follows the net
    log_every_images: int = neutral(2560)
    checkpoint_every_images: int = neutral(60_000)
    keep_checkpoints: int = neutral(2)
    # also keep the EMA weights at every multiple of this many images, never pruned
    # (run.dir/weights/ema-img-<images>.pt: earlier points of one run, e.g. every epoch); None off
    weights_every_images: Optional[int] = neutral(None)
    sample_every_images: int = neutral(60_000)
    sample_num_images: int = neutral(64)  # images in each periodic sample grid
    sample_steps: int = neutral(50)  # DDIM steps of the periodic sample grids (same EMA weights)
    compile: bool = neutral(False)  # torch.compile: ~1.1x per step after minutes of compiling
    rank_debug: bool = neutral(False)  # each rank's sample keys and weight hashes -> run.dir/debug/
    # "dip" = the study's variant: a DIP output replaces the Gaussian noise of the objective
    # (dipddpm/train/dip_noise.py); kept to reproduce its tables, not to train a sound DDPM
    noise: Literal["gaussian", "dip"] = "gaussian"
    dip_iters: int = 3  # DIP iterations per batch in the variant; the study chose 3

    def check(self, fail):
        for key in ("batch_size", "grad_accum", "log_every_images", "checkpoint_every_images",
                    "sample_every_images", "keep_checkpoints", "sample_steps", "dip_iters"):
            if getattr(self, key) < 1:
                fail(key, getattr(self, key), "must be >= 1")
        if self.epochs <= 0 and self.max_steps is None:
            fail("epochs", self.epochs, "must be > 0 (or set train.max_steps)")
        if self.weights_every_images is not None and self.weights_every_images < 1:
            fail("weights_every_images", self.weights_every_images, "must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            fail("max_steps", self.max_steps, "must be >= 1")
        if self.lr <= 0:
            fail("lr", self.lr, "must be > 0")
        if not 0 <= self.ema_decay < 1:
            fail("ema_decay", self.ema_decay, "must be in [0, 1)")
        if self.sample_num_images < 0:
            fail("sample_num_images", self.sample_num_images, "must be >= 0")


@dataclass
class SampleConfig:
    checkpoint: str = ""  # a run dir or a weights file; empty -> run.dir's final EMA weights
    sampler: Literal["ddpm", "ddim"] = "ddim"
    steps: int = 50  # DDIM steps (DDPM always runs t0..1)
    eta: float = 0.0
    num_images: int = 64  # samples drawn
    batch_size: int = 256
    t0: Optional[int] = None  # start step; None -> T (pure noise)
    # every job that samples from a trained model (jobs.sample, the protocols): the U-Net's
    # forward under autocast at this precision (auto: bf16 where native), NHWC when asked
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    channels_last: bool = False

    def check(self, fail):
        if self.steps < 1:
            fail("steps", self.steps, "must be >= 1")
        if self.num_images < 1:
            fail("num_images", self.num_images, "must be >= 1")
        if self.batch_size < 1:
            fail("batch_size", self.batch_size, "must be >= 1")
        if self.eta < 0:
            fail("eta", self.eta, "must be >= 0")


@dataclass
class DIPConfig:
    # network: the study's skip net by default (1,252,681 parameters)
    in_channels: int = 3
    out_channels: int = 1
    scales: int = 3
    channels_down: int = 128
    channels_up: int = 128
    channels_skip: int = 4
    # fitting, the DIP author's denoising defaults
    input_scale: float = 0.1  # z ~ U[0, input_scale)
    reg_noise_std: float = 1.0 / 30
    lr: float = 0.01
    iters: int = 3000
    exp_weight: float = 0.99  # EMA of outputs (not weights)
    backtrack_db: float = 5.0  # restore the last parameters when PSNR to y drops this much; 0 off
    snapshot_every: int = 10  # iterations between backtracking snapshots (params + Adam state)
    stop: Literal["budget", "es_wmv"] = "budget"
    es_window: int = 100  # ES-WMV: variance over this many outputs
    es_patience: int = 1000  # stop after this many iterations without a new variance minimum
    # (the paper's 1000); the decision is final (see dipddpm/dip/stopping.py)
    # degradation of the observation
    task: Literal["denoise", "inpaint_box", "inpaint_random"] = "denoise"
    sigma: float = 25.0  # Gaussian noise std on the 0-255 scale
    sigmas: list[float] = field(default_factory=lambda: [25.0, 50.0])  # fit_dip sweeps these
    box: int = 10  # centre box side (pixels) for inpaint_box
    keep_fraction: float = 0.5  # pixels kept for inpaint_random
    # which images and how many at once
    split: Literal["train", "test"] = "test"
    num_images: int = 256
    # nets fitted at once, by every job that fits (fit_dip, priors, the protocols), and the unit
    # a killed fit resumes after; a net's randomness is its image's key, so other batches give
    # the same fits up to float rounding
    batch_size: int = neutral(64)
    record_every: int = 50  # fit_dip: PSNR table resolution in iterations
    # how B nets at once evaluate (dipddpm.models.dip) and in which precision (auto: bf16
    # where native; parameters, Adam and the monitoring stay fp32)
    formulation: Literal["grouped", "bmm", "loop"] = neutral("grouped")
    precision: Literal["fp32", "bf16", "auto"] = "fp32"

    def fit_identity(self) -> dict:
        """The section as fingerprints of finished fits (fit_dip batches, priors) see it.

        formulation is left out (every formulation computes the same function, up to
        rounding), and precision is resolved for this machine and left out when fp32, so work
        finished before these keys existed still matches and is not redone."""
        from dipddpm.precision import default_device, resolve  # late: config imports no torch

        out = dataclasses.asdict(self)
        del out["formulation"]
        precision = resolve(out.pop("precision"), default_device())
        if precision != "fp32":
            out["precision"] = precision
        return out

    def check(self, fail):
        for key in ("in_channels", "out_channels", "scales", "channels_down", "channels_up",
                    "iters", "num_images", "batch_size", "record_every", "es_window",
                    "snapshot_every"):
            if getattr(self, key) < 1:
                fail(key, getattr(self, key), "must be >= 1")
        if self.channels_skip < 0:
            fail("channels_skip", self.channels_skip, "must be >= 0")
        side = 28  # each scale halves (rounding up); reflection padding needs maps >= 2x2
        for _ in range(self.scales):
            side = (side - 1) // 2 + 1
        if side < 2:
            fail("scales", self.scales, "at most 4 at 28x28 (the deepest map must stay >= 2x2)")
        if not 0 <= self.exp_weight < 1:
            fail("exp_weight", self.exp_weight, "must be in [0, 1)")
        for key in ("backtrack_db", "reg_noise_std", "input_scale", "es_patience"):
            if getattr(self, key) < 0:
                fail(key, getattr(self, key), "must be >= 0")
        if self.lr <= 0:
            fail("lr", self.lr, "must be > 0")
        if self.sigma < 0:
            fail("sigma", self.sigma, "must be >= 0")
        if any(s < 0 for s in self.sigmas):
            fail("sigmas", self.sigmas, "must all be >= 0")
        if not 0 < self.keep_fraction <= 1:
            fail("keep_fraction", self.keep_fraction, "must be in (0, 1]")
        if not 0 < self.box <= 28:
            fail("box", self.box, "must be in 1..28")


@dataclass
class PriorsConfig:
    name: str = "dip-sigma25"  # priors land in data.dir/priors/<name>/
    split: Literal["train", "test"] = "test"
    shard: Optional[int] = None  # one data shard; None -> all shards
    # (the nets fitted at once, and so the unit a killed task resumes after: dip.batch_size)

    def check(self, fail):
        if self.shard is not None and self.shard < 0:
            fail("shard", self.shard, "must be >= 0")


@dataclass
class LaunchConfig:
    partition: str = ""
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float = 4.0
    timeout_min: int = 60
    array_parallelism: int = 16
    max_num_timeout: int = 3  # requeues after a timeout before giving up
    folder: str = "runs/submissions"  # submitit logs and submission records
    signal_delay_s: int = 90  # SIGUSR2 this long before the time limit: checkpoint and requeue
    setup: list[str] = field(default_factory=list)  # shell lines run before each task (module load ...)
    selftest_steps: int = 20  # jobs.selftest: steps to count, one checkpoint each
    selftest_step_s: float = 0.5  # jobs.selftest: seconds per step

    def check(self, fail):
        for key in ("nodes", "tasks_per_node", "cpus_per_task", "timeout_min",
                    "array_parallelism", "selftest_steps"):
            if getattr(self, key) < 1:
                fail(key, getattr(self, key), "must be >= 1")
        for key in ("gpus_per_node", "max_num_timeout", "signal_delay_s", "selftest_step_s"):
            if getattr(self, key) < 0:
                fail(key, getattr(self, key), "must be >= 0")
        if self.mem_gb <= 0:
            fail("mem_gb", self.mem_gb, "must be > 0")
        if not self.folder:
            fail("folder", self.folder, "must not be empty")


@dataclass
class ClassifierConfig:
    # The FashionMNIST CNN whose penultimate layer gives the FID/KID/memorisation features.
    dir: str = ""  # checkpoint + feature caches; empty -> <data.dir>/classifier
    epochs: float = 2.0  # passes over the train split (~90% test accuracy, a few CPU minutes)
    max_steps: Optional[int] = None  # stop after this many optimizer steps (quick tests)
    batch_size: int = 128
    lr: float = 1e-3  # Adam
    feature_dim: int = 128  # width of the penultimate layer = the feature vector
    force: bool = neutral(False)  # retrain even when a verified checkpoint of these settings exists
    # (the N of a generation FID/KID is protocol.gen_num_images)
    kid_subset_size: int = 1000  # KID: images per subset (capped at the set size)
    kid_num_subsets: int = 100  # KID: number of random subsets averaged
    # jobs.train_classifier computes (and caches) the real-vs-real FID floor at each of these N
    floor_num_images: list[int] = field(default_factory=lambda: [1000, 5000])
    # Optional Inception FID beside the classifier's (dipddpm/evaluate/inception.py): the FID
    # Inception weights file (pt_inception-2015-12-05-6726825d.pth for the published scale; never
    # downloaded), through torch-fidelity; empty = off. The generation protocol then adds
    # "fid_inception" to every arm and to the floor.
    inception_weights: str = ""
    inception_ref_num_images: int = 10000  # train images behind the cached Inception stats
    inception_batch_size: int = neutral(32)  # images per Inception forward (~6 GFLOP each)

    def check(self, fail):
        for key in ("batch_size", "feature_dim", "kid_subset_size", "kid_num_subsets",
                    "inception_batch_size"):
            if getattr(self, key) < 1:
                fail(key, getattr(self, key), "must be >= 1")
        if self.epochs <= 0 and self.max_steps is None:
            fail("epochs", self.epochs, "must be > 0 (or set classifier.max_steps)")
        if self.max_steps is not None and self.max_steps < 1:
            fail("max_steps", self.max_steps, "must be >= 1")
        if self.lr <= 0:
            fail("lr", self.lr, "must be > 0")
        if any(n < 2 for n in self.floor_num_images):
            fail("floor_num_images", self.floor_num_images, "every N must be >= 2")
        for key in ("kid_subset_size", "inception_ref_num_images"):
            if getattr(self, key) < 2:
                fail(key, getattr(self, key), "FID and KID need at least 2 images")


START_ESTIMATES = ("budget", "es_wmv", "oracle")  # the DIP estimates a restoration chain can start from
# where the generation protocol's DIP starts come from (dipddpm/protocols/generation.py)
GEN_SOURCES = ("train", "heldout", "data_free")


@dataclass
class ProtocolConfig:
    # The restoration and generation protocols (dipddpm/protocols): what to sweep and on what.
    checkpoint: str = ""  # trained DDPM: a run dir or EMA weights file; empty -> run.dir
    num_images: int = 32  # restoration: the first N images of `split` (the same for every arm)
    split: Literal["train", "test"] = "test"
    tasks: list[str] = field(default_factory=lambda: ["denoise", "inpaint_box"])
    sigmas: list[float] = field(default_factory=lambda: [25.0, 50.0])  # denoising, 0-255 scale
    # the observation's noise: "gaussian" (x + n, what the direct start assumes) or "clipped"
    # (clip(x + n, 0, 1), the DIP author's); every arm sees the same y (dipddpm/dip/degrade.py)
    observation: Literal["gaussian", "clipped"] = "gaussian"
    # Starts by noise level sigma_t0 ([-1, 1] units; docs/protocols.md): CCDF's rule
    # sigma_t0 = c x e for each c (e: the estimate's RMS error, estimated from y without the
    # clean image for denoising; with oracle_e also the true e, rows flagged oracle) ...
    start_c: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0])
    oracle_e: bool = True
    # ... and explicit noise levels, the same for every estimate (inpainting's only non-oracle
    # rule: its e cannot be estimated from y)
    sigma_t0s: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.4, 0.8])
    t0s: list[int] = field(default_factory=list)  # also starts at these 1-indexed steps (old runs)
    # which DIP estimates start chains: budget (dip.iters), es_wmv (ES-WMV's pick), oracle
    # (each image's best iteration: needs the clean image, a bound)
    start_estimates: list[str] = field(default_factory=lambda: ["budget", "es_wmv", "oracle"])
    steps: list[int] = field(default_factory=lambda: [5, 10, 20, 50])  # K reverse steps (NFE <= t0)
    # more K for the chains that use the DDPM alone, no estimate (direct, noise_start; K > t0
    # runs t0), so that the baselines reach the DIP starts' cost: [1000] gives the noise start
    # its whole T-step chain, as much compute as a few hundred DIP iterations
    ddpm_only_steps: list[int] = field(default_factory=list)
    samplers: list[str] = field(default_factory=lambda: ["ddpm", "ddim"])  # ddpm = eta 1, ddim = eta 0
    blur_sigma: float = 0.5  # cheap denoiser: Gaussian blur of y (px); 0.5 beat 0.6-1.0 at sigma 25
    inpaint_consistency: bool = True  # RePaint-style: re-impose the noised known pixels each step
    priors_dir: str = ""  # restoration DIP estimates from jobs.precompute_priors; empty -> fit here
    # both protocols: a folder where each batch of DIP fits is kept (dipddpm.dip.fit.fit_by_key):
    # a rerun, or another run on the same images and DIP settings, reads them instead of fitting
    dip_cache: str = neutral("")
    # FID vs training (dipddpm/protocols/fid_curve.py): the run's kept weights snapshots
    curve_num_images: int = 1000  # samples per snapshot (the floor is taken at the same N)
    curve_steps: int = 50  # DDIM steps per sample
    curve_every: int = 1  # every k-th snapshot (and always the last)
    # the last snapshot again at a larger N (0: not): the trained model's headline FID, beside
    # the floor at that N (a FID at N = 1,000 sits well above its value at N = 10,000)
    curve_final_num_images: int = 0
    curve_final_steps: int = 100  # DDIM steps of that draw
    batch_size: int = 256  # images per reverse-chain batch
    # generation (dipddpm/protocols/generation.py)
    gen_num_images: int = 1000  # N samples per arm for FID/KID (every FID states N and its floors)
    # K of the DDIM and DDPM baselines from noise; every DIP start's NFE is added to them
    gen_ddim_steps: list[int] = field(default_factory=lambda: [10, 20, 50, 100])
    # also the full T-step ancestral DDPM from noise (T NFE per sample), when ddpm is a gen_sampler
    gen_ddpm: bool = True
    # the samplers of that front from noise (ddpm = eta 1, ddim = eta 0): a run of one of them
    # alone at a larger N (the study's generation_front stages) leaves the other out
    gen_samplers: list[str] = field(default_factory=lambda: ["ddpm", "ddim"])
    gen_t0s: list[int] = field(default_factory=list)  # retired (start indices): must stay empty
    # noise levels of the starts, [-1, 1] units; t0 = the step whose sqrt((1-abar)/abar) is nearest
    gen_sigma_t0s: list[float] = field(default_factory=lambda: [0.3, 1.0, 3.0])
    gen_steps: int = 50  # DDIM steps of the DIP-start chains (NFE = min(gen_steps, t0))
    # where DIP starts come from: train images, held-out test images, no image (data_free)
    gen_sources: list[str] = field(default_factory=lambda: ["train", "heldout", "data_free"])
    gen_data_free_iters: int = 0  # data_free: 0 = the untrained net's output; k = fitted to noise
    gen_priors_dir: str = ""  # priors of TRAINING images; empty -> fit gen_num_images of them here
    gen_heldout_priors_dir: str = ""  # priors of TEST images; empty -> fit gen_num_images here

    def check(self, fail):
        for key in ("num_images", "batch_size", "gen_num_images", "gen_steps", "curve_num_images",
                    "curve_steps", "curve_every", "curve_final_steps"):
            if getattr(self, key) < 1:
                fail(key, getattr(self, key), "must be >= 1")
        if not self.tasks or any(t not in TASKS for t in self.tasks):
            fail("tasks", self.tasks, f"each must be one of {', '.join(TASKS)}")
        if any(s <= 0 for s in self.sigmas):
            fail("sigmas", self.sigmas, "must all be > 0 (denoising noise std, 0-255 scale)")
        for key in ("t0s", "steps", "ddpm_only_steps", "gen_ddim_steps", "gen_t0s"):
            if any(v < 1 for v in getattr(self, key)):
                fail(key, getattr(self, key), "must all be >= 1")
        for key in ("start_c", "sigma_t0s"):
            if any(v <= 0 for v in getattr(self, key)):
                fail(key, getattr(self, key), "must all be > 0")
        if any(e not in START_ESTIMATES for e in self.start_estimates):
            fail("start_estimates", self.start_estimates,
                 f"each must be one of {', '.join(START_ESTIMATES)}")
        for key in ("samplers", "gen_samplers"):
            v = getattr(self, key)
            if not v or any(s not in ("ddpm", "ddim") for s in v) or len(set(v)) != len(v):
                fail(key, v, "each must be ddpm or ddim, at most once, and not none")
        if not 0 < self.blur_sigma <= 9:  # reflection padding of radius 3 sigma needs < 28 px
            fail("blur_sigma", self.blur_sigma, "must be in (0, 9] pixels")
        if self.curve_final_num_images == 1 or self.curve_final_num_images < 0:
            fail("curve_final_num_images", self.curve_final_num_images,
                 "must be 0 (no final draw) or >= 2 (FID needs at least 2 images)")
        if self.gen_num_images < 2:
            fail("gen_num_images", self.gen_num_images, "FID and KID need at least 2 images")
        if any(s <= 0 for s in self.gen_sigma_t0s):
            fail("gen_sigma_t0s", self.gen_sigma_t0s, "must all be > 0 (noise std, [-1, 1] units)")
        bad = [s for s in self.gen_sources if s not in GEN_SOURCES]
        if bad or len(set(self.gen_sources)) != len(self.gen_sources):
            fail("gen_sources", self.gen_sources,
                 f"each must be one of {', '.join(GEN_SOURCES)}, at most once")
        if self.gen_data_free_iters < 0:
            fail("gen_data_free_iters", self.gen_data_free_iters, "must be >= 0")
        if not (self.gen_sources or self.gen_ddim_steps
                or ("ddpm" in self.gen_samplers and self.gen_ddpm)):
            fail("gen_ddim_steps", self.gen_ddim_steps, "with no DIP source (gen_sources = []) "
                 "and no full DDPM the generation protocol would run no arm")


STUDY_STAGES = ("train", "train_main", "ablation_dip_iters", "ablation_epochs", "fit_dip", "classifier",
                "priors", "sampling", "fid_curve", "restore", "generation", "generation_front")


@dataclass
class StudyConfig:
    # jobs.study: the whole study as stages, each one run of another job (dipddpm/study/)
    executor: Literal["inline", "slurm"] = "inline"  # inline: every stage in this process
    stages: list[str] = field(default_factory=lambda: list(STUDY_STAGES))  # which kinds run
    main_T: int = 1000  # T of the DDPM the protocols use and of the training-time table
    T_values: list[int] = field(default_factory=lambda: [200, 400, 600, 800, 1000])  # both variants
    epochs: list[float] = field(default_factory=lambda: [5, 10, 15, 20])  # ablation, both variants
    dip_iters: list[int] = field(default_factory=lambda: [100, 50, 10, 3])  # the variant's ablation
    sampling_num_images: int = 16  # images per sampling-time run (ancestral, T steps)
    # overrides (key=value strings) for every stage, then per stage kind; checked before any runs
    common: list[str] = field(default_factory=list)
    train: list[str] = field(default_factory=list)  # every training run, ablations included
    # the train_main stage: one long DDPM run at main_T (train/ddpm-main) that the protocols use
    # instead of train/ddpm-T<main_T>; its own overrides (study.train does not apply to it)
    main_train: list[str] = field(default_factory=list)
    fit_dip: list[str] = field(default_factory=list)
    fid_curve: list[str] = field(default_factory=list)
    classifier: list[str] = field(default_factory=list)
    priors: list[str] = field(default_factory=list)
    sampling: list[str] = field(default_factory=list)
    restore: list[str] = field(default_factory=list)
    # the restoration protocol at each of these weights of the main DDPM: "" is its last EMA
    # weights, others a .pt path inside its run dir (e.g. weights/ema-img-000000060032.pt, the
    # first epoch): does a DIP start help more when the diffusion prior is weaker? The stages
    # share one DIP fit cache, so the DIP estimates are fitted once
    restore_checkpoints: list[str] = field(default_factory=lambda: [""])
    # sustained GFLOP/s of one stage process, by kind of work, for the CPU-time estimate each
    # stage gets before it runs (dipddpm/study/estimate.py); defaults: one core of the 2-core
    # AVX2 CPU of BENCHMARKS.md at fp32
    gflops_train: float = neutral(62.0)
    gflops_forward: float = neutral(58.0)
    gflops_dip: float = neutral(42.0)
    generation: list[str] = field(default_factory=list)
    # the generation_front stages: the baselines from noise alone (no DIP start) at the N a FID
    # is usually quoted at, each sampler in its own stage (0: no such stage), from
    # configs/generation.yaml with these overrides (not study.generation's); both read the
    # weights the generation stage reads
    generation_front: list[str] = field(default_factory=list)
    front_ddim_num_images: int = 10000  # DDIM at every K of protocol.gen_ddim_steps
    front_ddpm_num_images: int = 2000  # the full T-step ancestral DDPM

    def check(self, fail):
        if not self.restore_checkpoints or len(set(self.restore_checkpoints)) < len(
                self.restore_checkpoints):
            fail("restore_checkpoints", self.restore_checkpoints,
                 "must be a non-empty list without repeats")
        bad = [s for s in self.stages if s not in STUDY_STAGES]
        if bad:
            fail("stages", self.stages, f"{bad[0]!r} is not one of {', '.join(STUDY_STAGES)}")
        if not self.T_values or any(t < 1 for t in self.T_values):
            fail("T_values", self.T_values, "must be a non-empty list of T >= 1")
        if self.main_T not in self.T_values:
            fail("main_T", self.main_T, f"must be one of study.T_values {self.T_values}")
        if any(e <= 0 for e in self.epochs):
            fail("epochs", self.epochs, "must all be > 0")
        if any(k < 1 for k in self.dip_iters):
            fail("dip_iters", self.dip_iters, "must all be >= 1")
        if self.sampling_num_images < 1:
            fail("sampling_num_images", self.sampling_num_images, "must be >= 1")
        for key in ("front_ddim_num_images", "front_ddpm_num_images"):
            if getattr(self, key) == 1 or getattr(self, key) < 0:
                fail(key, getattr(self, key), "must be 0 (no such stage) or >= 2 (FID needs 2)")
        for key in ("gflops_train", "gflops_forward", "gflops_dip"):
            if getattr(self, key) <= 0:
                fail(key, getattr(self, key), "must be > 0 (GFLOP/s)")


# the study's lists of `key=value` overrides (study.common, study.main_train and one per stage
# kind that has its own): their keys are renamed too (`migrate`)
STUDY_OVERRIDE_LISTS = ("common", "main_train") + tuple(
    kind for kind in STUDY_STAGES if kind in {f.name for f in dataclasses.fields(StudyConfig)})


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    wandb: WandbConfig = neutral(default_factory=WandbConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    dip: DIPConfig = field(default_factory=DIPConfig)
    priors: PriorsConfig = field(default_factory=PriorsConfig)
    launch: LaunchConfig = neutral(default_factory=LaunchConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    # neutral: a stage's results depend on its own keys (its argv sets them), never on the study
    # that planned it, and the study's own run dir holds nothing but its config
    study: StudyConfig = neutral(default_factory=StudyConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- renamed keys

# Every key renamed since run dirs were first written: old name -> new name (None: retired, a
# key that had no effect; it is dropped). Read by `migrate` (see the module docstring).
RENAMED_KEYS: dict[str, Optional[str]] = {
    "sample.num": "sample.num_images",
    "train.num_samples": "train.sample_num_images",
    "protocol.gen_num": "protocol.gen_num_images",
    "study.sampling_num": "study.sampling_num_images",
    "classifier.kid_subset": "classifier.kid_subset_size",
    "classifier.kid_subsets": "classifier.kid_num_subsets",
    "classifier.floor_ns": "classifier.floor_num_images",
    "classifier.inception_ref_num": "classifier.inception_ref_num_images",
    # the priors job's nets fitted at once: the same notion as every other job's
    "priors.sub_batch": "dip.batch_size",
    # never read: the N of a generation FID/KID is protocol.gen_num_images
    "classifier.fid_num": None,
}

_noted: set = set()  # (source, text) of the notes printed by this process


def _note(source: str, text: str) -> None:
    if (source, text) not in _noted:
        _noted.add((source, text))
        print(f"note: {source}: {text}", file=sys.stderr)


def _renamed_text(old: str, new: Optional[str]) -> str:
    return (f"{old} is now {new} (the old name still works)" if new else
            f"{old} is retired (it had no effect); ignored")


def current_key(dotted: str) -> Optional[str]:
    """The name a key goes by now (None: retired)."""
    return RENAMED_KEYS.get(dotted, dotted)


def _migrate_override(text, source: str, stored: bool):
    """One `key=value` string under the key's current name (None: a retired key)."""
    if not isinstance(text, str) or "=" not in text:
        return text
    key, value = text.split("=", 1)
    new = current_key(key.strip())
    if new == key.strip():
        return text
    if not stored:
        _note(source, _renamed_text(key.strip(), new))
    return None if new is None else f"{new}={value}"


def migrate(tree, source: str = "config", *, stored: bool = False):
    """A nested config dict with every key of RENAMED_KEYS under its new name, and the study's
    override lists likewise (a new dict; `tree` is left alone).

    `stored`: a config an earlier version wrote (a run dir's config.yaml, a stage.json):
    read without notes, and where it holds an old key beside its new name (two old keys that
    became one, each written out), the new name's value stands. Otherwise (a YAML file) each
    old name prints a one-line note on stderr, and an old key beside its new name with another
    value is a ConfigError naming both."""
    if not isinstance(tree, dict):
        return tree
    out = copy.deepcopy(tree)
    for old, new in RENAMED_KEYS.items():
        old_section, old_name = old.split(".")
        node = out.get(old_section)
        if not isinstance(node, dict) or old_name not in node:
            continue
        section, name = new.split(".") if new else (None, None)
        if new is not None and not isinstance(out.setdefault(section, {}), dict):
            continue  # not a section (e.g. left empty): the schema reports it
        value = node.pop(old_name)
        if not stored:
            _note(source, _renamed_text(old, new))
        if new is None:
            continue
        target = out[section]
        if name not in target:
            target[name] = value
        elif target[name] != value and not stored:
            raise _error(source, old, value, f"renamed {new}, which is also set here "
                                             f"(= {_fmt(target[name])}); keep one of them")
    study = out.get("study")
    if isinstance(study, dict):
        for name in STUDY_OVERRIDE_LISTS:
            if isinstance(study.get(name), list):
                texts = (_migrate_override(t, f"{source}: study.{name}", stored)
                         for t in study[name])
                study[name] = [t for t in texts if t is not None]
    return out


# ----------------------------------------------------------------------------- loading

CLI = "command line"


def _fmt(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _error(source: str, key: str, value, reason: str) -> ConfigError:
    return ConfigError(f"{source}: {key} = {_fmt(value)}: {reason}")


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict, dict]:
    """Load a YAML file and the files it extends; return (tree, source of each leaf)."""
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"{path}: base: circular 'base:' chain through this file")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        raise ConfigError(f"{path}:{line} invalid YAML: {getattr(e, 'problem', e)}") from None
    tree = {} if tree is None else tree
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(tree).__name__}")
    base = tree.pop("base", None)
    tree = migrate(tree, str(path))
    merged, sources = {}, {}
    if base is not None:
        if not isinstance(base, str):
            raise _error(str(path), "base", base, "must be a file name")
        merged, sources = _read_yaml((path.parent / base), chain + (path,))
    _merge(merged, sources, tree, str(path))
    return merged, sources


def _merge(dst: dict, sources: dict, src: dict, source: str, prefix: str = "") -> None:
    for key, value in src.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], sources, value, source, dotted + ".")
        else:
            dst[key] = copy.deepcopy(value)
            _mark(sources, dotted, value, source)


def _mark(sources: dict, dotted: str, value, source: str) -> None:
    sources[dotted] = source
    if isinstance(value, dict):
        for k, v in value.items():
            _mark(sources, f"{dotted}.{k}", v, source)


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text or text.startswith("="):
        raise ConfigError(f"{CLI}: {text!r}: overrides look like key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: keep the text, the schema decides whether a string is fine
    return key.strip(), (raw, value)


def _set_dotted(tree: dict, sources: dict, key: str, value, source: str) -> None:
    parts = key.split(".")
    node = tree
    for n, part in enumerate(parts[:-1], 1):
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
            sources[".".join(parts[:n])] = source  # a section this override made up
        node = child
    node[parts[-1]] = value
    _mark(sources, key, value, source)


def _coerce(tp, value, raw: Optional[str]):
    """Return value as type tp, or raise ValueError with the reason."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, raw)
    if origin is Literal:
        if raw is not None and raw in args:  # as typed: YAML would read e.g. `no` as false
            return raw
        if value not in args:
            raise ValueError(f"must be one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ValueError("expected a list")
        return [_coerce(args[0], v, None) for v in value]
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise ValueError("expected a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("expected a number")
        return float(value)
    if tp is str:
        if raw is not None:  # from the command line: take the text as typed (e.g. run.dir=007)
            return raw
        if isinstance(value, (dict, list)) or value is None:
            raise ValueError("expected a string")
        return str(value)
    raise TypeError(f"unsupported schema type {tp}")


def _build(cls, tree: dict, sources: dict, prefix: str, default_source: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in tree.items():
        if key not in names:
            dotted = f"{prefix}{key}"
            source = sources.get(dotted, default_source)
            while source == CLI and isinstance(value, dict) and value:
                sub, value = next(iter(value.items()))  # name an override as typed
                dotted = f"{dotted}.{sub}"
            rest = dotted[len(f"{prefix}{key}"):]
            close = difflib.get_close_matches(str(key), sorted(names), n=1)
            hint = f"did you mean {prefix}{close[0]}{rest}?" if close else \
                f"{prefix.rstrip('.') or 'top level'} has {', '.join(sorted(names))}"
            shown = value[0] if isinstance(value, tuple) else value
            raise _error(source, dotted, shown, f"unknown key; {hint}")
    obj = cls()
    for f in dataclasses.fields(cls):
        if f.name not in tree:
            continue
        dotted = f"{prefix}{f.name}"
        tp = hints[f.name]
        value = tree[f.name]
        source = sources.get(dotted, default_source)
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise _error(source, dotted, value, "expected a section (mapping)")
            setattr(obj, f.name, _build(tp, value, sources, dotted + ".", default_source))
            continue
        raw = None
        if isinstance(value, tuple):  # (raw text, parsed) from the command line
            raw, value = value
        try:
            setattr(obj, f.name, _coerce(tp, value, raw))
        except ValueError as e:
            raise _error(source, dotted, raw if raw is not None else value, str(e)) from None
    return obj


def _check(obj, sources: dict, prefix: str = "") -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check(value, sources, f"{prefix}{f.name}.")
    check = getattr(obj, "check", None)
    if check is not None:
        def fail(key, value, reason):
            dotted = f"{prefix}{key}"
            raise _error(sources.get(dotted, "defaults"), dotted, value, reason)
        check(fail)


def _migrate_cli(key: str, parsed: tuple):
    """An override under its key's current name, with a note when it had an old one (key None:
    a retired key, dropped); a study override list's entries likewise."""
    new = current_key(key)
    if new != key:
        _note(CLI, _renamed_text(key, new))
        key = new
    section, _, name = (key or "").partition(".")
    if section == "study" and name in STUDY_OVERRIDE_LISTS and isinstance(parsed[1], list):
        texts = (_migrate_override(t, f"{CLI}: {key}", False) for t in parsed[1])
        parsed = (parsed[0], [t for t in texts if t is not None])
    return key, parsed


def load_config(path: Optional[str | os.PathLike] = None, overrides: list[str] = ()) -> Config:
    """Schema defaults <- YAML file (with its bases) <- `key=value` overrides, validated."""
    tree, sources = ({}, {}) if path is None else _read_yaml(Path(path))
    default_source = str(path) if path is not None else "defaults"
    for text in overrides:
        key, parsed = parse_override(text)
        key, parsed = _migrate_cli(key, parsed)
        if key is not None:
            _set_dotted(tree, sources, key, parsed, CLI)
    cfg = _build(Config, tree, sources, "", default_source)
    _check(cfg, sources)
    return cfg


def config_from_dict(tree: dict, source: str = "config") -> Config:
    """Build a Config from a config dict an earlier run wrote (a resolved config.yaml), its
    renamed keys read under their new names (`migrate`)."""
    tree = migrate(tree, source, stored=True)
    sources: dict = {}
    _merge({}, sources, tree, source)
    cfg = _build(Config, copy.deepcopy(tree), sources, "", source)
    _check(cfg, sources)
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------- rerun rules


def flat(tree: dict, prefix: str = "") -> dict:
    """{'a.b': leaf} of a nested config dict (lists are leaves)."""
    out = {}
    for key, value in (tree or {}).items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _schema_fields(cls=None, prefix: str = "", neutral_above: bool = False) -> dict:
    """{dotted key: (field, type, neutral)} for every leaf of the schema."""
    cls = cls or Config
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        is_neutral = neutral_above or bool(f.metadata.get(NEUTRAL))
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_schema_fields(tp, f"{prefix}{f.name}.", is_neutral))
        else:
            out[f"{prefix}{f.name}"] = (f, tp, is_neutral)
    return out


SCHEMA = _schema_fields()
# the sections declared neutral as a whole: a key under one of them is neutral even when the
# schema no longer has it (an old config.yaml)
_NEUTRAL_SECTIONS = tuple(f"{f.name}." for f in dataclasses.fields(Config)
                          if f.metadata.get(NEUTRAL))


def is_neutral(dotted: str) -> bool:
    """True when the key changes no result (declared with `neutral()`, itself or its section)."""
    if dotted in SCHEMA:
        return SCHEMA[dotted][2]
    return dotted.startswith(_NEUTRAL_SECTIONS)


def neutral_keys() -> frozenset:
    return frozenset(k for k, (_, _, n) in SCHEMA.items() if n)


def within(dotted: str, scope: Optional[typing.Iterable[str]]) -> bool:
    """Is the key inside scope (section names or dotted keys; None = everything)?"""
    return scope is None or any(dotted == s or dotted.startswith(s + ".") for s in scope)


def result_keys(tree: dict, scope: Optional[typing.Iterable[str]] = None) -> dict:
    """The flat non-neutral keys of a config dict inside scope: what tells two runs apart. As
    in `compare_configs`, a stored dict's renamed keys count under their new names and a key
    it lacks (written before the key existed) as the schema default."""
    keys = {**flat(Config().to_dict()), **flat(migrate(tree, stored=True))}
    return {k: v for k, v in keys.items() if within(k, scope) and not is_neutral(k)}


def _shown(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


@dataclass
class ConfigChanges:
    """A stored config against a new one: `refused` texts ('key = old there, new now') and the
    `allowed` changes {key: [old, new]} (neutral keys, extendable keys raised, keys outside the
    scope)."""
    refused: list = field(default_factory=list)
    allowed: dict = field(default_factory=dict)


def compare_configs(stored: dict, new: Config,
                    scope: Optional[typing.Iterable[str]] = None) -> ConfigChanges:
    """What changed from `stored` (a config.yaml's dict) to `new`, judged by the schema's
    declarations, for the keys inside `scope` (neutral keys are allowed anywhere). A key the
    stored config lacks takes the schema default (so adding a key with a default that keeps
    today's behaviour does not break old runs); a stored key the schema no longer has is
    refused unless it is neutral; a renamed key counts under its new name (`migrate`)."""
    scope = None if scope is None else tuple(scope)
    stored = stored if isinstance(stored, dict) else {}
    old = flat(migrate(stored, stored=True))
    # the keys stored under an old name, for the refusal to name them as the file does
    written = flat(stored)
    as_written = {new: o for o, new in RENAMED_KEYS.items()
                  if new and o in written and new not in written}
    now = flat(new.to_dict())
    defaults = flat(Config().to_dict())
    out = ConfigChanges()
    for key in sorted(set(old) - set(SCHEMA)):
        if within(key, scope) and not is_neutral(key):
            out.refused.append(f"{key} = {_shown(old[key])} there, not in the schema now")
    for key, (f, tp, is_neutral_key) in SCHEMA.items():
        if key in old:
            try:
                before = _coerce(tp, old[key], None)
            except (ValueError, TypeError):
                before = old[key]
        else:
            before = defaults[key]
        after = now[key]
        if before == after:
            continue
        if is_neutral_key or not within(key, scope):
            out.allowed[key] = [before, after]
            continue
        unless = f.metadata.get(EXTENDABLE)
        there = f" (as {as_written[key]})" if key in as_written else ""
        text = f"{key} = {_shown(before)} there{there}, {_shown(after)} now"
        if unless is None:
            out.refused.append(text)
            continue
        longer = after is None or (before is not None and after > before)
        section = getattr(new, key.split(".")[0])
        reason = "a run may be lengthened, not shortened" if not longer else unless(section)
        if reason:
            out.refused.append(f"{text} ({reason})")
        else:
            out.allowed[key] = [before, after]
    return out
