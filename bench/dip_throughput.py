"""DIP fitting throughput: image-iterations/s one net at a time vs B nets at once.

  python -m bench.dip_throughput [--device cpu|cuda] [--batch 8 16] [--iters 20] [--threads 2]
  python -m bench.dip_throughput --device cuda --batch 256 1024 2048 --iters 20 --tf32

An image-iteration is one forward + backward + Adam step of one net on one 28x28 image (the
study's net, 1.33 GFLOP). Both paths run the same algorithm (dipddpm.dip.fit: jitter, EMA,
PSNR, ES-WMV bookkeeping, backtracking snapshots); each is warmed up first, since the first
calls at a new shape build the conv kernels. On a CPU shared with other busy processes use
--threads 1 (or OMP_NUM_THREADS=1 for jobs): OpenMP threads waiting on each other while the
cores are taken ran small ops 20x slower here.

Reference, one H100 80GB: one net at a time 115 image-iterations/s; vmap over 256-2048 stacked
nets 3,200-3,500/s (~1% of the chip, bound by memory traffic and launches); goal >= 30,000/s.
Roofline for that goal: 30,000 x 1.33 GFLOP = 40 TFLOP/s, and Adam alone moves ~28 bytes per
parameter per step (1.25M params: ~35 MB per image-iteration, ~1 TB/s at 30,000/s).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from bench.common import now
from dipddpm.dip.fit import FitSettings, fit_batch, fit_single
from dipddpm.models.dip import SkipSpec
from dipddpm.precision import default_device

GFLOP_PER_IMAGE_ITER = 1.33  # the study's net at 28x28, forward + backward


def _data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    clean = rng.random((n, 1, 28, 28), dtype=np.float32)
    noisy = np.clip(clean + rng.normal(0, 25 / 255, clean.shape), 0, 1).astype(np.float32)
    return noisy, clean


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_single(n: int, iters: int, device, dtype) -> float:
    """image-iterations/s of fitting n images one after another."""
    y, clean = _data(n)
    s = FitSettings(iters=iters)
    spec = SkipSpec()
    fit_single(y[:1], None, clean[:1], 0, spec, FitSettings(iters=3), device=device, dtype=dtype)
    _sync(device)
    start = now()
    for i in range(n):
        fit_single(y[i:i + 1], None, clean[i:i + 1], i, spec, s, device=device, dtype=dtype)
    _sync(device)
    return n * iters / (now() - start)


def time_batch(b: int, iters: int, device, dtype, formulation: str = "grouped",
               precision: str = "fp32") -> float:
    """image-iterations/s of fitting b nets at once (dip.formulation, dip.precision)."""
    y, clean = _data(b)
    spec = SkipSpec()
    seeds = list(range(b))
    kw = dict(formulation=formulation, precision=precision)
    fit_batch(y, None, clean, seeds, spec, FitSettings(iters=3, **kw), device=device,
              dtype=dtype)
    _sync(device)
    start = now()
    fit_batch(y, None, clean, seeds, spec, FitSettings(iters=iters, **kw), device=device,
              dtype=dtype)
    _sync(device)
    return b * iters / (now() - start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=default_device())
    p.add_argument("--batch", type=int, nargs="+", default=[8, 16])
    p.add_argument("--iters", type=int, default=20, help="timed iterations per fit")
    p.add_argument("--single-images", type=int, default=2, help="images for the one-at-a-time loop")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmul/conv on CUDA")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = torch.float32
    where = (torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda"
             else f"cpu, {torch.get_num_threads()} threads")
    print(f"# DIP throughput on {where}, torch {torch.__version__}, {args.iters} iterations")
    single = time_single(args.single_images, args.iters, args.device, dtype)
    rows = [("one at a time", 1, single)]
    for b in args.batch:
        rows.append(("batched (grouped conv)", b, time_batch(b, args.iters, args.device, dtype)))
    print("| path | nets at once | image-iterations/s | vs one at a time | GFLOP/s |")
    print("|---|---|---|---|---|")
    for name, b, rate in rows:
        print(f"| {name} | {b} | {rate:.1f} | {rate / single:.2f}x | "
              f"{rate * GFLOP_PER_IMAGE_ITER:.0f} |")
    return rows


if __name__ == "__main__":
    main()
