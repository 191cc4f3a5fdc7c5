"""Does DIP fitting in bf16 keep the PSNR of fp32? The same real test images fitted both ways.

  python -m bench.dip_precision --data data/fashion-mnist [--images 16] [--sigma 25] [--out X.json]

The first N test images of the shards, denoising at sigma (configs/dip_denoise.yaml's fit: its
iterations, record_every, batch of all N nets), fitted twice with the same seeds: fp32, and bf16
(dip.precision=bf16: bf16 compute, fp32 master weights and Adam). At every recorded iteration:
the mean PSNR of the estimate (the output EMA, the study's curve) over the N images in each
arm, and the paired difference bf16 - fp32 with a bootstrap 95% interval (10,000 resamples of
the images). The criterion of issue 12: |mean difference| <= 0.2 dB at every recorded
iteration; otherwise DIP stays fp32.

On a CPU without native bf16 (dipddpm.precision.native_bf16 False) bf16 runs ~20x slower, so
the bf16 arm is emulated at fp32 speed: every parameter, input, layer output and the gradient
flowing back through each of them is rounded to bf16 (round to nearest even) while every op
accumulates in fp32, which is what oneDNN's bf16 kernels do (bf16 storage, fp32 accumulation).
tests/test_fast_paths.py checks the emulation against real bf16 on a small net.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
from pathlib import Path

import numpy as np
import torch

from dipddpm.config import load_config
from dipddpm.precision import native_bf16

REPO = Path(__file__).resolve().parents[1]
DIP_CONFIG = REPO / "configs" / "dip_denoise.yaml"


class _RoundBF16(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.to(torch.bfloat16).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return g.to(torch.bfloat16).to(g.dtype)


def round_bf16(x: torch.Tensor) -> torch.Tensor:
    """x rounded to bf16 and back (values and gradients): bf16 storage at fp32 speed."""
    return _RoundBF16.apply(x)


@contextlib.contextmanager
def emulated_bf16():
    """fit_batch's network evaluation with every tensor rounded to bf16 (round_fn)."""
    import dipddpm.dip.fit as fit

    orig = fit.grouped_forward
    fit.grouped_forward = functools.partial(orig, round_fn=round_bf16)
    try:
        yield
    finally:
        fit.grouped_forward = orig


def bootstrap_ci(d: np.ndarray, n: int = 10_000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (n, len(d)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def compare(data_dir: Path, images: int = 16, sigma: float = 25.0, overrides=(),
            device="cpu") -> dict:
    from dipddpm.dip.table import fit_sigma, load_clean, record_iters

    base = [f"data.dir={data_dir}", f"dip.num_images={images}", f"dip.batch_size={images}",
            "dip.split=test", *overrides]
    cfg32 = load_config(DIP_CONFIG, [*base, "dip.precision=fp32"])
    clean, keys = load_clean(cfg32)
    native = native_bf16(torch.device(device).type)
    a = fit_sigma(cfg32, clean, keys, sigma, device=device)
    if native:
        b = fit_sigma(load_config(DIP_CONFIG, [*base, "dip.precision=bf16"]), clean, keys,
                      sigma, device=device)
    else:
        with emulated_bf16():
            b = fit_sigma(cfg32, clean, keys, sigma, device=device)
    marks = record_iters(cfg32.dip.iters, cfg32.dip.record_every)
    rows = []
    for it in marks:
        x, y = a.psnr_est[it - 1], b.psnr_est[it - 1]
        d = y - x
        lo, hi = bootstrap_ci(d)
        rows.append({"iter": it, "fp32": float(x.mean()), "bf16": float(y.mean()),
                     "diff": float(d.mean()), "ci95": [lo, hi]})
    worst = max(abs(r["diff"]) for r in rows)
    return {"images": images, "sigma": sigma, "iters": cfg32.dip.iters,
            "bf16": "native" if native else "emulated (bf16 rounding at fp32 speed)",
            "seconds": {"fp32": a.seconds, "bf16": b.seconds}, "rows": rows,
            "max_abs_diff": worst, "keeps_psnr": worst <= 0.2}


def table(result: dict) -> str:
    lines = [f"DIP bf16 vs fp32, {result['images']} real test images, sigma {result['sigma']:g}, "
             f"bf16 {result['bf16']}: mean PSNR of the estimate (dB)", "",
             "| iteration | fp32 | bf16 | bf16 - fp32 (95% CI) |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['iter']} | {r['fp32']:.2f} | {r['bf16']:.2f} | {r['diff']:+.3f} "
                     f"({r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}) |")
    verdict = "keeps" if result["keeps_psnr"] else "does NOT keep"
    lines += ["", f"max |mean difference| {result['max_abs_diff']:.3f} dB: bf16 {verdict} the "
              "fp32 PSNR within 0.2 dB"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("data/fashion-mnist"))
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--sigma", type=float, default=25.0)
    p.add_argument("--out", type=Path)
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. dip.iters=400")
    args = p.parse_args(argv)
    result = compare(args.data, args.images, args.sigma, args.overrides)
    print(table(result), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
