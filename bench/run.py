"""Speed: ours against a baseline and against this machine's roofline, side by side in one process.

  python -m bench.run --quick                          # CPU, a few minutes
  python -m bench.run --levers --out levers.json       # + every lever of BENCHMARKS.md
  python -m bench.run --device cuda --append BENCHMARKS.md   # full sizes (bench/gpu.sh)

Every row: name, unit, ours, baseline, ratio (> 1 when ours is faster), the GFLOP/s ours
achieved and the percentage of the matching peak, device, settings. `--out PATH` writes the
rows as a JSON list (objects with name, unit, ours, baseline, ratio, gflops, peak_gflops,
pct_of_peak, settings, device, lower_is_better).

Rows:
  roofline fp32|bf16 GEMM|3x3 conv   this process's sustained rates at the nets' shapes
                                     (bench/roofline.py): the peaks of the % column
  training vs diffusers fp32|bf16    our U-Net trained as dipddpm.train.loop trains it, with the
                                     speed keys of configs/quickstart.yaml (the CPU fast path:
                                     train.mixed_precision, channels_last, optimizer_impl) vs
                                     diffusers' UNet2DModel of about the same size trained as
                                     its train_unconditional.py does (bench/diffusers_ref.py),
                                     at fp32 and with its --mixed_precision bf16
  DIP vs plain one-net loop          B nets at once (fit_batch: EMA, PSNR, ES-WMV, snapshots,
                                     with dip.formulation/dip.precision of
                                     configs/dip_denoise.yaml) vs one net in a plain fp32 Adam
                                     loop as the DIP paper's notebook runs it
                                     (bench/dip_reference.py)
  DDPM step | DDIM vs diffusers fp32 our samplers driving our U-Net with the sampling speed
                                     keys of configs/quickstart.yaml (sample.precision,
                                     channels_last) vs the same samplers driving UNet2DModel
                                     at fp32; DDPM timed over a few steps of a chain started at
                                     t0 (exactly that many calls), DDIM whole
  prior precompute job               jobs.precompute_priors end to end on N real test images vs
                                     the plain loop's rate divided by the iterations per image
With --levers, bench/levers.py adds one row per lever (the plain path as the baseline).
Timing: interleaved calls after untimed warm-up, medians. `--clock cpu` times with this
process's CPU time instead of the wall clock: on a CPU shared with other jobs it counts only
the time this process ran (one torch thread only; every row's settings say which clock).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench import dip_throughput
from bench.common import Row, clock_name, device_name, git_commit, markdown_table, set_clock, \
    short_device, side_by_side, utc_now
from bench.dip_reference import time_reference
from bench.levers import LEVER_GROUPS, LEVER_PRESETS, run_levers
from bench.roofline import dip_flops_per_image_iteration, roofline, unet_flops
from dipddpm.cli import exit_with
from dipddpm.config import UserError, load_config, parse_override
from dipddpm.diffusion import Diffusion, ddim_sample, ddpm_sample
from dipddpm.models.unet import build_unet, count_parameters
from dipddpm.precision import FastForward, autocast, default_device, resolve
from dipddpm.runs import atomic_write_json, atomic_write_text
from dipddpm.train.ema import EMA
from dipddpm.train.loop import make_optimizer


REPO = Path(__file__).resolve().parents[1]
DDPM_CONFIG = REPO / "configs" / "ddpm.yaml"  # the training and sampling settings users run
QUICKSTART_CONFIG = REPO / "configs" / "quickstart.yaml"  # its speed keys are the CPU fast path
DIP_CONFIG = REPO / "configs" / "dip_denoise.yaml"
PRIORS_CONFIG = REPO / "configs" / "priors.yaml"
SPEED_KEYS = ("train.mixed_precision", "train.channels_last", "train.optimizer_impl",
              "train.compile", "sample.precision", "sample.channels_last")


@dataclass(frozen=True)
class Sizes:
    train_models: tuple[str, ...]
    train_batches: tuple[int, ...]
    train_warmup: int
    train_steps: int
    dip_single_images: int
    dip_single_iters: int
    dip_batches: tuple[int, ...]
    dip_iters: int
    dip_reps: int
    sample_models: tuple[str, ...]
    sample_batch: int
    ddpm_steps: int  # timed; images/s is extrapolated to T
    sample_reps: int  # timed runs of each sampler, interleaved ours/theirs
    ddim_steps: int
    prior_images: int
    prior_iters: int
    prior_batch: int
    roofline_reps: int = 5
    roofline_dip_images: int = 16  # images of the DIP net's convolution in the roofline
    extrapolate_to: int = 70_000  # all of FashionMNIST
    notes: tuple[str, ...] = field(default_factory=tuple)


PRESETS = {
    # The GPU check (bench/gpu.sh): the batches of the H100 reference numbers that
    # BENCHMARKS.md quotes (128 and 512), the medium pair beside them, 2,048 priors at 100
    # iterations extrapolated to all 70,000.
    "full": Sizes(train_models=("unet-small", "unet-medium"), train_batches=(128, 512),
                  train_warmup=10, train_steps=40,
                  dip_single_images=4, dip_single_iters=50, dip_batches=(256, 1024, 2048),
                  dip_iters=20, dip_reps=3,
                  sample_models=("unet-small", "unet-medium"), sample_batch=1000,
                  ddpm_steps=20, sample_reps=3, ddim_steps=50,
                  prior_images=2048, prior_iters=100, prior_batch=2048),
    # A few minutes on 2 CPU cores shared with other jobs.
    "quick": Sizes(train_models=("unet-small",), train_batches=(32,), train_warmup=2,
                   train_steps=9,
                   dip_single_images=2, dip_single_iters=10, dip_batches=(16,), dip_iters=10,
                   dip_reps=3,
                   sample_models=("unet-small",), sample_batch=256,
                   ddpm_steps=2, sample_reps=3, ddim_steps=3,
                   prior_images=32, prior_iters=10, prior_batch=32,
                   notes=("CPU sizes: training batch 32, DIP 16 nets, sampling batch 256 "
                          "(DDIM 3 steps), 32 priors at 10 iterations",)),
    # Seconds: the test's size; the numbers mean nothing.
    "tiny": Sizes(train_models=("unet-tiny",), train_batches=(4,), train_warmup=1, train_steps=2,
                  dip_single_images=1, dip_single_iters=2, dip_batches=(2,), dip_iters=2,
                  dip_reps=1,
                  sample_models=("unet-tiny",), sample_batch=4,
                  ddpm_steps=2, sample_reps=1, ddim_steps=2,
                  prior_images=4, prior_iters=2, prior_batch=4, roofline_reps=1,
                  roofline_dip_images=1),
}


def _diffusers():
    from bench.diffusers_ref import EpsOnly, build_diffusers_unet, diffusers_train_step
    return EpsOnly, build_diffusers_unet, diffusers_train_step


def speed_overrides(prefix: str) -> list[str]:
    """The speed keys (SPEED_KEYS) starting with prefix that configs/quickstart.yaml sets for
    its stages (study.common, then study.train / study.sampling)."""
    q = load_config(QUICKSTART_CONFIG, []).study
    kind = {"train.": q.train, "sample.": q.sampling}[prefix]
    return [o for o in [*q.common, *kind]
            if parse_override(o)[0] in SPEED_KEYS and o.startswith(prefix)]


def fast_config(prefix: str, extra=()):
    """configs/ddpm.yaml with the quickstart's speed keys for `prefix` (and `extra`) on top."""
    return load_config(DDPM_CONFIG, [*speed_overrides(prefix), *extra])


def describe(cfg, device) -> str:
    t = cfg.train
    return (f"{resolve(t.mixed_precision, device)} (train.mixed_precision={t.mixed_precision}), "
            f"channels_last={t.channels_last}, optimizer_impl={t.optimizer_impl}"
            + (", compiled" if t.compile else ""))


def our_train_step(model, batch_size: int, device, cfg):
    """One optimizer step as dipddpm.train.loop takes it, one process, no grad_accum: the
    Diffusion loss under the run's autocast, AdamW (train.optimizer_impl), clip, EMA update
    (its LR schedule, a scalar, is left out); train.channels_last puts weights and inputs in
    NHWC, train.compile compiles the model as Accelerate does (inductor)."""
    diffusion = Diffusion.from_config(cfg.diffusion)
    t = cfg.train
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, t)
    ema = EMA(model, t.ema_decay)
    forward = torch.compile(model) if t.compile else model
    precision = resolve(t.mixed_precision, device)
    gen = torch.Generator(device=device).manual_seed(0)
    x0 = torch.rand(batch_size, 1, 28, 28, device=device) * 2 - 1
    if t.channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)

    def step():
        tt = torch.randint(0, diffusion.T, (batch_size,), device=device, generator=gen)
        noise = torch.randn(x0.shape, device=device, generator=gen)
        with autocast(device, precision):
            loss = diffusion.loss(forward, x0, tt, noise)
        loss.backward()
        if t.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model)
        return loss

    return step


def _pair(name: str, device):
    _, build_diffusers_unet, _ = _diffusers()
    torch.manual_seed(0)
    ours, theirs = build_unet(name).to(device), build_diffusers_unet(name).to(device)
    counts = f"{count_parameters(ours) / 1e6:.2f}M vs {count_parameters(theirs) / 1e6:.2f}M params"
    return ours, theirs, counts


def _timing(sz: Sizes, reps: int) -> str:
    return f"median of {reps} interleaved, {clock_name()} clock"


def bench_training(sz: Sizes, device, where: str, peaks: dict) -> list[Row]:
    _, _, diffusers_train_step = _diffusers()
    cfg = fast_config("train.")
    mine = resolve(cfg.train.mixed_precision, device)
    rows = []
    for name in sz.train_models:
        flops = unet_flops(name, "ours", True)
        for b in sz.train_batches:
            for theirs_mp in ("no", "bf16"):
                ours, theirs, counts = _pair(name, device)
                warmup, reps = sz.train_warmup, sz.train_steps
                note = ""
                if theirs_mp == "bf16" and not _native(device):
                    warmup, reps = min(warmup, 1), min(reps, 3)  # emulated bf16: ~20x slower
                    note = ("; this device has no native bf16: diffusers' bf16 runs emulated, "
                            f"{reps} timed steps")
                s = side_by_side({"ours": our_train_step(ours, b, device, cfg),
                                  "theirs": diffusers_train_step(theirs, b, device, theirs_mp)},
                                 warmup=warmup, reps=reps, device=device)
                label = "fp32" if theirs_mp == "no" else "bf16"
                suffix = "" if (name, b) == (sz.train_models[0], sz.train_batches[0]) \
                    else f", {name} batch {b}"
                rate = b / s["ours"]
                rows.append(Row(
                    f"training vs diffusers {label}{suffix}", "images/s", rate, b / s["theirs"],
                    where,
                    f"{name} vs UNet2DModel ({counts}), batch {b}, 28x28 unpadded, EMA; ours: "
                    f"{describe(cfg, device)}; diffusers: {label}; {_timing(sz, reps)} steps "
                    f"after {warmup} warm-up; {flops / 1e9:.2f} GFLOP/image fwd+bwd{note}",
                    gflops=rate * flops / 1e9, peak_gflops=peaks.get(("conv", mine))))
    return rows


def _native(device) -> bool:
    from dipddpm.precision import native_bf16
    return native_bf16(torch.device(device).type)


def dip_settings():
    dip = load_config(DIP_CONFIG, []).dip
    return dip.formulation, dip.precision


def bench_dip(sz: Sizes, device, where: str, peaks: dict) -> tuple[list[Row], float]:
    """Medians over sz.dip_reps rounds, each round timing the reference loop and every batch
    size once, so a busy spell of a shared machine hits both sides (one round scattered
    0.6x-2x here)."""
    formulation, precision = dip_settings()
    resolved = resolve(precision, device)
    flops = dip_flops_per_image_iteration()
    dtype = torch.float32
    single, batched = [], {b: [] for b in sz.dip_batches}
    for _ in range(sz.dip_reps):
        single.append(time_reference(sz.dip_single_images, sz.dip_single_iters, device))
        for b in sz.dip_batches:
            batched[b].append(dip_throughput.time_batch(b, sz.dip_iters, device, dtype,
                                                        formulation, precision))
    one = statistics.median(single)
    rows = []
    for i, (b, rates) in enumerate(batched.items()):
        rate = statistics.median(rates)
        rows.append(Row(
            "DIP vs plain one-net loop" + ("" if i == 0 else f", {b} nets"),
            "image-iterations/s", rate, one, where,
            f"ours: {b} nets at once (fit_batch, dip.formulation={formulation}, "
            f"dip.precision={precision} -> {resolved}), {sz.dip_iters} its; baseline: "
            f"bench/dip_reference.py, {sz.dip_single_images} image(s) x "
            f"{sz.dip_single_iters} its, fp32; the study's net, {flops / 1e9:.2f} "
            f"GFLOP/image-iteration; {_timing(sz, sz.dip_reps)} rounds",
            gflops=rate * flops / 1e9, peak_gflops=peaks.get(("conv", resolved))))
    return rows, one


def bench_sampling(sz: Sizes, device, where: str, peaks: dict) -> list[Row]:
    EpsOnly, _, _ = _diffusers()
    cfg = fast_config("sample.")
    s_cfg = cfg.sample
    precision = resolve(s_cfg.precision, device)
    diffusion = Diffusion.from_config(cfg.diffusion)
    T, n = diffusion.T, sz.sample_batch
    rows = []
    for name in sz.sample_models:
        flops = unet_flops(name, "ours", False)
        ours, theirs, counts = _pair(name, device)
        ours = FastForward(ours.eval(), s_cfg.precision, s_cfg.channels_last)
        theirs = EpsOnly(theirs).eval()
        zeros = torch.zeros(n, 1, 28, 28, device=device)

        def ddpm(model):
            return lambda: ddpm_sample(model, diffusion, x0_hat=zeros, t0=sz.ddpm_steps,
                                       generator=0, device=device)

        def ddim(model):
            return lambda: ddim_sample(model, diffusion, (n, 1, 28, 28), steps=sz.ddim_steps,
                                       generator=0, device=device)
        kw = dict(warmup=1, reps=sz.sample_reps, device=device)
        s = side_by_side({"ours": ddpm(ours), "theirs": ddpm(theirs)}, **kw)
        ms = {k: v / sz.ddpm_steps * 1e3 for k, v in s.items()}
        s = side_by_side({"ours": ddim(ours), "theirs": ddim(theirs)}, **kw)
        ddim_rate = {k: n / v for k, v in s.items()}
        suffix = "" if name == sz.sample_models[0] else f", {name}"
        base = (f"{name} vs UNet2DModel ({counts}), batch {n}; ours: {precision} "
                f"(sample.precision={s_cfg.precision}), channels_last={s_cfg.channels_last}; "
                f"diffusers fp32; {flops / 1e9:.2f} GFLOP/image forward; "
                f"{_timing(sz, sz.sample_reps)}")
        step_gflops = n * flops / (ms["ours"] / 1e3) / 1e9
        peak = peaks.get(("conv", precision))
        rows += [
            Row(f"DDPM step vs diffusers fp32{suffix}", "ms/step", ms["ours"], ms["theirs"],
                where, f"{base} runs of {sz.ddpm_steps} steps", lower_is_better=True,
                gflops=step_gflops, peak_gflops=peak),
            Row(f"DDPM T={T} vs diffusers fp32{suffix}", "images/s",
                n / (ms["ours"] * T / 1e3), n / (ms["theirs"] * T / 1e3), where,
                f"{base}; {T} steps at the rate of the DDPM step row", gflops=step_gflops,
                peak_gflops=peak),
            Row(f"DDIM vs diffusers fp32{suffix}", "images/s", ddim_rate["ours"],
                ddim_rate["theirs"], where, f"{base} whole runs of {sz.ddim_steps} steps",
                gflops=ddim_rate["ours"] * sz.ddim_steps * flops / 1e9, peak_gflops=peak),
        ]
    return rows


def slice_dataset(src: Path, out: Path, n: int) -> Path:
    """The first n test images of the shards in src, as a one-shard data dir at out."""
    from dipddpm.data.shards import load_manifest, split_shards, write_dataset
    from dipddpm.data.stream import read_shards

    images, labels = [], []
    for e in split_shards(load_manifest(src), "test", src):
        im, lab, _ = read_shards(src, [e])
        images.append(im)
        labels.append(lab)
        if sum(len(x) for x in images) >= n:
            break
    images, labels = np.concatenate(images)[:n], np.concatenate(labels)[:n]
    if len(images) < n:
        raise UserError(f"{src}: the test split has {len(images)} images, fewer than {n}")
    write_dataset(out, {"test": (images, labels)}, shard_size=n, progress=False)
    return out


def bench_priors(sz: Sizes, data_dir: Path, single_rate: float, peaks: dict) -> Row:
    from jobs import precompute_priors

    # the job picks its device itself: the GPU whenever there is one
    device = default_device()
    where = short_device(device)
    formulation, precision = dip_settings()

    with tempfile.TemporaryDirectory(prefix="bench-priors-") as tmp:
        data = slice_dataset(data_dir, Path(tmp) / "data", sz.prior_images)
        argv = ["--config", str(PRIORS_CONFIG), f"data.dir={data}", f"run.dir={tmp}/run",
                f"dip.iters={sz.prior_iters}", f"dip.batch_size={sz.prior_batch}",
                "wandb.mode=disabled", "priors.name=bench"]
        start = time.perf_counter()
        result = precompute_priors.main(argv)
        wall = time.perf_counter() - start
    count = sum(e["count"] for e in result["shards"])
    rate = count / wall
    settings = (f"{count} real test images, {sz.prior_iters} its, dip.batch_size "
                f"{sz.prior_batch}, configs/priors.yaml's dip.formulation/precision, W&B "
                f"off, wall clock; at this rate {sz.extrapolate_to:,} images take "
                f"{sz.extrapolate_to / rate / 60:,.1f} min; baseline: the plain loop's "
                f"image-iterations/s / {sz.prior_iters}")
    resolved = resolve(load_config(PRIORS_CONFIG, []).dip.precision, device)
    return Row("prior precompute job vs plain one-net loop", "images/s", rate,
               single_rate / sz.prior_iters, where, settings,
               gflops=rate * sz.prior_iters * dip_flops_per_image_iteration() / 1e9,
               peak_gflops=peaks.get(("conv", resolved)))


def run(sz: Sizes, device, data_dir: Path, sections: str = "abcd",
        levers: tuple[str, ...] = (), preset: str = "quick") -> list[Row]:
    where = short_device(device)
    batch = sz.train_batches[0]
    rows, peaks = roofline(device, where, batch=batch, reps=sz.roofline_reps,
                           dip_images=sz.roofline_dip_images)
    single = None
    if "a" in sections:
        rows += bench_training(sz, device, where, peaks)
    if "b" in sections or "d" in sections:
        dip_rows, single = bench_dip(sz, device, where, peaks)
        rows += dip_rows if "b" in sections else []
    if "c" in sections:
        rows += bench_sampling(sz, device, where, peaks)
    if "d" in sections:
        rows.append(bench_priors(sz, data_dir, single, peaks))
    if levers:
        rows += run_levers(LEVER_PRESETS[preset], device, where, peaks, data_dir, levers)
    return rows


def section(rows: list[Row], device, preset: str, notes: tuple[str, ...]) -> str:
    """The block --append adds to BENCHMARKS.md: who, when, which commit, then the table."""
    head = (f"### {device_name(device)}: `python -m bench.run --preset {preset}`\n\n"
            f"device: {device_name(device)}; date: {utc_now()}; commit: {git_commit()}; "
            f"torch {torch.__version__}; {clock_name()} clock\n")
    extra = "".join(f"- {n}\n" for n in notes)
    return f"{head}\n{extra}{chr(10) if extra else ''}{markdown_table(rows)}"


def main(argv=None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CPU sizes: a few minutes")
    p.add_argument("--preset", choices=sorted(PRESETS), help=argparse.SUPPRESS)
    p.add_argument("--device", default=default_device(),
                   choices=["cpu", "cuda"])
    p.add_argument("--data", type=Path, default=Path("data/fashion-mnist"),
                   help="prepared shards (jobs.prepare_data) for the priors row and the levers' "
                        "end-to-end training runs")
    p.add_argument("--only", default="abcd", help="sections to run, e.g. 'ab'")
    p.add_argument("--levers", nargs="?", const=",".join(LEVER_GROUPS), default="",
                   metavar="GROUPS",
                   help="also every lever of BENCHMARKS.md, one at a time (bench/levers.py); "
                        f"optionally only some groups, comma-separated: {','.join(LEVER_GROUPS)}")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: this process's CPU time (one thread, shared machines)")
    p.add_argument("--out", type=Path, help="also write the rows as a JSON list here")
    p.add_argument("--append", type=Path, metavar="BENCHMARKS.md",
                   help="append the table with device, date and commit to this file")
    args = p.parse_args(argv)
    preset = args.preset or ("quick" if args.quick else "full")
    sz = PRESETS[preset]
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA device")
    levers = tuple(g for g in args.levers.split(",") if g)
    if set(levers) - set(LEVER_GROUPS):
        raise UserError(f"--levers {args.levers}: groups are {','.join(LEVER_GROUPS)}")
    if (not args.only and not levers) or set(args.only) - set("abcd"):
        raise UserError(f"--only {args.only!r}: use letters of 'abcd' (empty only with --levers)")
    if levers == ("compile",) and not LEVER_PRESETS[preset].compile:
        raise UserError(f"--levers compile: the {preset} preset times no torch.compile")
    reads_data = "d" in args.only or set(levers) & {"two-cores", "psnr"}
    if reads_data and not (args.data / "manifest.json").exists():
        raise UserError(f"--data {args.data}: no manifest.json; run python -m "
                        "jobs.prepare_data first, or leave out the priors row with --only abc "
                        "(and the two-cores and psnr lever groups)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and (args.device == "cuda" or torch.get_num_threads() != 1):
        raise UserError("--clock cpu: needs --device cpu and one torch thread (--threads 1); "
                        "CPU time sums threads and does not see the GPU")
    set_clock(args.clock)
    print(f"# bench.run --preset {preset} on {device_name(args.device)}, {args.clock} clock",
          flush=True)
    rows = run(sz, args.device, args.data, args.only, levers, preset)
    print(markdown_table(rows), flush=True)
    if args.out:
        meta = {"preset": preset, "date": utc_now(), "commit": git_commit(),
                "torch": torch.__version__, "threads": torch.get_num_threads(),
                "clock": args.clock, "device_name": device_name(args.device)}
        atomic_write_json(args.out, [r.as_dict() | meta for r in rows])
    if args.append:
        old = args.append.read_text() if args.append.exists() else ""
        sep = "" if not old or old.endswith("\n\n") else ("\n" if old.endswith("\n") else "\n\n")
        atomic_write_text(args.append, old + sep + section(rows, args.device, preset, sz.notes))
    return rows


if __name__ == "__main__":
    exit_with(main)
