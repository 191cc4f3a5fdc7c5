"""Speed, ours against a baseline, side by side in one process: a markdown table with ratios.

  python -m bench.run --quick                          # CPU, a few minutes: ratios only
  python -m bench.run --device cuda --append BENCHMARKS.md   # full sizes (bench/gpu.sh)

Rows (each: what, ours, baseline, ratio, device, settings):
  (a) DDPM training images/s: our U-Net trained as dipddpm.train.loop trains it (AdamW, the
      Diffusion loss of configs/ddpm.yaml, clip 1.0, EMA) vs diffusers' UNet2DModel of about the
      same parameter count trained as diffusers' train_unconditional.py does with --use_ema
      (bench/diffusers_ref.py).
      Both fp32, same batch, images already on the device (data loading is not timed).
  (b) DIP image-iterations/s: B nets at once (fit_batch) vs one at a time (fit_single), through
      bench/dip_throughput.py.
  (c) Sampling: ms per reverse step and images/s for one batch, our ddpm_sample/ddim_sample
      driving our model vs the diffusers model. DDPM is timed over a few steps (the chain
      started at t0 from an estimate, so it makes exactly that many network calls) and its
      images/s is for the full T=1000 chain at that rate; DDIM is timed whole.
  (d) The prior precompute job (jobs.precompute_priors) end to end on the first N real test
      images, written as one shard into a temp dir: read, degrade, fit, write tars + manifest.
      Baseline: the one-at-a-time DIP rate of (b) divided by the iterations per image.
Ratios are > 1 when ours is faster. On a CPU shared with other jobs only the ratios mean much.
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
from bench.common import Row, device_name, git_commit, markdown_table, short_device, side_by_side, \
    utc_now
from dipddpm.cli import exit_with
from dipddpm.config import UserError, load_config
from dipddpm.diffusion import Diffusion, ddim_sample, ddpm_sample
from dipddpm.models.unet import build_unet, count_parameters
from dipddpm.train.ema import EMA
from dipddpm.runs import atomic_write_json, atomic_write_text


REPO = Path(__file__).resolve().parents[1]
DDPM_CONFIG = REPO / "configs" / "ddpm.yaml"  # the training and sampling settings users run
PRIORS_CONFIG = REPO / "configs" / "priors.yaml"


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
    prior_sub_batch: int
    extrapolate_to: int = 70_000  # all of FashionMNIST
    notes: tuple[str, ...] = field(default_factory=tuple)


PRESETS = {
    # The GPU check of issue 7 (bench/gpu.sh): the anchors' batches, the medium pair beside the
    # H100 anchors, 2,048 priors at 100 iterations extrapolated to all 70,000.
    "full": Sizes(train_models=("unet-small", "unet-medium"), train_batches=(128, 512),
                  train_warmup=10, train_steps=40,
                  dip_single_images=4, dip_single_iters=50, dip_batches=(256, 1024, 2048),
                  dip_iters=20, dip_reps=3,
                  sample_models=("unet-small", "unet-medium"), sample_batch=1000,
                  ddpm_steps=20, sample_reps=3, ddim_steps=50,
                  prior_images=2048, prior_iters=100, prior_sub_batch=2048),
    # A few minutes on 2 CPU cores shared with other jobs.
    "quick": Sizes(train_models=("unet-small",), train_batches=(32,), train_warmup=2,
                   train_steps=9,
                   dip_single_images=2, dip_single_iters=10, dip_batches=(16,), dip_iters=10,
                   dip_reps=3,
                   sample_models=("unet-small",), sample_batch=64,
                   ddpm_steps=2, sample_reps=3, ddim_steps=5,
                   prior_images=32, prior_iters=10, prior_sub_batch=32,
                   notes=("CPU sizes: training batch 32, DIP 16 nets, sampling batch 64 (not "
                          "1,000), 32 priors at 10 iterations",)),
    # Seconds: the test's size; the numbers mean nothing.
    "tiny": Sizes(train_models=("unet-tiny",), train_batches=(4,), train_warmup=1, train_steps=2,
                  dip_single_images=1, dip_single_iters=2, dip_batches=(2,), dip_iters=2,
                  dip_reps=1,
                  sample_models=("unet-tiny",), sample_batch=4,
                  ddpm_steps=2, sample_reps=1, ddim_steps=2,
                  prior_images=4, prior_iters=2, prior_sub_batch=4),
}


def _diffusers():
    from bench.diffusers_ref import EpsOnly, build_diffusers_unet, diffusers_train_step
    return EpsOnly, build_diffusers_unet, diffusers_train_step


def our_train_step(model, batch_size: int, device, cfg):
    """One optimizer step as dipddpm.train.loop takes it at fp32, one process, no grad_accum:
    the Diffusion loss, AdamW, clip, EMA update (its LR schedule, a scalar, is left out)."""
    diffusion = Diffusion.from_config(cfg.diffusion)
    t = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    ema = EMA(model, t.ema_decay)
    gen = torch.Generator(device=device).manual_seed(0)
    x0 = torch.rand(batch_size, 1, 28, 28, device=device) * 2 - 1

    def step():
        tt = torch.randint(0, diffusion.T, (batch_size,), device=device, generator=gen)
        noise = torch.randn(x0.shape, device=device, generator=gen)
        loss = diffusion.loss(model, x0, tt, noise)
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


def bench_training(sz: Sizes, device, where: str) -> list[Row]:
    _, _, diffusers_train_step = _diffusers()
    cfg = load_config(DDPM_CONFIG, [])
    rows = []
    for name in sz.train_models:
        ours, theirs, counts = _pair(name, device)
        for b in sz.train_batches:
            s = side_by_side({"ours": our_train_step(ours, b, device, cfg),
                              "theirs": diffusers_train_step(theirs, b, device)},
                             warmup=sz.train_warmup, reps=sz.train_steps, device=device)
            rows.append(Row(f"(a) DDPM training, {name} vs UNet2DModel", "images/s",
                            b / s["ours"], b / s["theirs"], where,
                            f"batch {b}, fp32, EMA, {counts}, 28x28 unpadded, median of "
                            f"{sz.train_steps} interleaved steps after {sz.train_warmup} warm-up"))
    return rows


def bench_dip(sz: Sizes, device, where: str) -> tuple[list[Row], float]:
    """Medians over sz.dip_reps rounds, each round timing one at a time and every batch size
    once, so a busy spell of a shared machine hits both sides (one round scattered 0.6x-2x
    here)."""
    dtype = torch.float32
    single, batched = [], {b: [] for b in sz.dip_batches}
    for _ in range(sz.dip_reps):
        single.append(dip_throughput.time_single(sz.dip_single_images, sz.dip_single_iters,
                                                 device, dtype))
        for b in sz.dip_batches:
            batched[b].append(dip_throughput.time_batch(b, sz.dip_iters, device, dtype))
    one = statistics.median(single)
    rows = [Row(f"(b) DIP fitting, {b} nets at once vs one at a time", "image-iterations/s",
                statistics.median(rates), one, where,
                f"study's net (1.33 GFLOP/image-iteration), fp32, median of {sz.dip_reps} "
                f"interleaved rounds: batched {sz.dip_iters} its; one at a time "
                f"{sz.dip_single_images} image(s) x {sz.dip_single_iters} its")
            for b, rates in batched.items()]
    return rows, one


def bench_sampling(sz: Sizes, device, where: str) -> list[Row]:
    EpsOnly, _, _ = _diffusers()
    cfg = load_config(DDPM_CONFIG, [])
    diffusion = Diffusion.from_config(cfg.diffusion)
    T, n = diffusion.T, sz.sample_batch
    rows = []
    for name in sz.sample_models:
        ours, theirs, counts = _pair(name, device)
        ours.eval()
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
        base = f"batch {n}, fp32, {counts}, median of {sz.sample_reps}"
        rows += [
            Row(f"(c) DDPM sampling step, {name} vs UNet2DModel", "ms/step", ms["ours"],
                ms["theirs"], where, f"{base} runs of {sz.ddpm_steps} steps",
                lower_is_better=True),
            Row(f"(c) DDPM sampling T={T}, {name} vs UNet2DModel", "images/s",
                n / (ms["ours"] * T / 1e3), n / (ms["theirs"] * T / 1e3), where,
                f"{base}, {T} steps at the rate of the row above"),
            Row(f"(c) DDIM sampling {sz.ddim_steps} steps, {name} vs UNet2DModel", "images/s",
                ddim_rate["ours"], ddim_rate["theirs"], where, f"{base} whole runs"),
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


def bench_priors(sz: Sizes, data_dir: Path, single_rate: float) -> Row:
    from jobs import precompute_priors

    # the job picks its device itself: the GPU whenever there is one
    where = short_device("cuda" if torch.cuda.is_available() else "cpu")

    with tempfile.TemporaryDirectory(prefix="bench-priors-") as tmp:
        data = slice_dataset(data_dir, Path(tmp) / "data", sz.prior_images)
        argv = ["--config", str(PRIORS_CONFIG), f"data.dir={data}", f"run.dir={tmp}/run",
                f"dip.iters={sz.prior_iters}", f"priors.sub_batch={sz.prior_sub_batch}",
                "wandb.mode=disabled", "priors.name=bench"]
        start = time.perf_counter()
        result = precompute_priors.main(argv)
        wall = time.perf_counter() - start
    count = sum(e["count"] for e in result["shards"])
    rate = count / wall
    settings = (f"{count} real test images, {sz.prior_iters} its, sub_batch "
                f"{sz.prior_sub_batch}, W&B off; at this rate {sz.extrapolate_to:,} images take "
                f"{sz.extrapolate_to / rate / 60:,.1f} min")
    return Row("(d) prior precompute job end to end vs one net at a time", "images/s", rate,
               single_rate / sz.prior_iters, where, settings)


def run(sz: Sizes, device, data_dir: Path, sections: str = "abcd") -> list[Row]:
    where = short_device(device)
    rows: list[Row] = []
    single = None
    if "a" in sections:
        rows += bench_training(sz, device, where)
    if "b" in sections or "d" in sections:
        dip_rows, single = bench_dip(sz, device, where)
        rows += dip_rows if "b" in sections else []
    if "c" in sections:
        rows += bench_sampling(sz, device, where)
    if "d" in sections:
        rows.append(bench_priors(sz, data_dir, single))
    return rows


def section(rows: list[Row], device, preset: str, notes: tuple[str, ...]) -> str:
    """The block --append adds to BENCHMARKS.md: who, when, which commit, then the table."""
    head = (f"### {device_name(device)}: `python -m bench.run --preset {preset}`\n\n"
            f"device: {device_name(device)}; date: {utc_now()}; commit: {git_commit()}; "
            f"torch {torch.__version__}\n")
    extra = "".join(f"- {n}\n" for n in notes)
    return f"{head}\n{extra}{chr(10) if extra else ''}{markdown_table(rows)}"


def main(argv=None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CPU sizes: a few minutes")
    p.add_argument("--preset", choices=sorted(PRESETS), help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cpu", "cuda"])
    p.add_argument("--data", type=Path, default=Path("data/fashion-mnist"),
                   help="prepared shards (jobs.prepare_data) for the priors row")
    p.add_argument("--only", default="abcd", help="sections to run, e.g. 'ab'")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--out", type=Path, help="also write the rows as JSON here")
    p.add_argument("--append", type=Path, metavar="BENCHMARKS.md",
                   help="append the table with device, date and commit to this file")
    args = p.parse_args(argv)
    preset = args.preset or ("quick" if args.quick else "full")
    sz = PRESETS[preset]
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA device")
    if not args.only or set(args.only) - set("abcd"):
        raise UserError(f"--only {args.only!r}: use letters of 'abcd'")
    if "d" in args.only and not (args.data / "manifest.json").exists():
        raise UserError(f"--data {args.data}: no manifest.json; run python -m "
                        "jobs.prepare_data first, or leave out the priors row with --only abc")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# bench.run --preset {preset} on {device_name(args.device)}", flush=True)
    rows = run(sz, args.device, args.data, args.only)
    table = markdown_table(rows)
    print(table, flush=True)
    if args.out:
        atomic_write_json(args.out, {"preset": preset, "device": device_name(args.device),
                                     "date": utc_now(), "commit": git_commit(),
                                     "rows": [r.as_dict() for r in rows]})
    if args.append:
        old = args.append.read_text() if args.append.exists() else ""
        sep = "" if not old or old.endswith("\n\n") else ("\n" if old.endswith("\n") else "\n\n")
        atomic_write_text(args.append, old + sep + section(rows, args.device, preset, sz.notes))
    return rows


if __name__ == "__main__":
    exit_with(main)
