"""This machine's sustained GEMM and 3x3-conv FLOP/s at the nets' shapes, and FLOPs per image.

Peaks are measured in the calling process at its torch thread count, so a row's "% of peak"
compares like with like. Each peak is the best over the nets' own shapes (and, for the
convolution, both memory layouts), forward only:
  GEMM  the im2col GEMMs of the nets' dominant convolutions: the study's DIP net at 28x28
        (784 x 1188 x 128), unet-small's 7x7 level (batch*49 x 1008 x 112) and its attention
        projection (batch*49 x 112 x 336)
  conv  the DIP net's 132->128 at 28x28 (the layer that holds half its FLOPs), unet-small's
        28->28 at 28x28, 56->56 at 14x14 and 112->112 at 7x7 (batch images)
Training, DIP and sampling rows divide their achieved GFLOP/s by the convolution peak of the
precision they ran in (their backward passes are convolutions too).

FLOPs come from torch.utils.flop_counter.FlopCounterMode (convolutions and matmuls; the
elementwise ops are not counted), once per model and kind, at batch 1.
"""
from __future__ import annotations

import functools
import statistics

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bench.common import Row, seconds

GEMM_SHAPES = {"DIP 28x28 im2col": (784, 1188, 128),
               "unet-small 7x7 im2col": (49, 1008, 112),  # M scales with the batch
               "unet-small attention qkv": (49, 112, 336)}
CONV_SHAPES = {"DIP 132->128 at 28x28": (132, 128, 28),
               "unet-small 28->28 at 28x28": (28, 28, 28),
               "unet-small 56->56 at 14x14": (56, 56, 14),
               "unet-small 112->112 at 7x7": (112, 112, 7)}


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@functools.lru_cache(maxsize=None)
def unet_flops(name: str, kind: str, backward: bool) -> float:
    """FLOPs per image of one forward (+ backward) of our U-Net (kind 'ours') or its diffusers
    pair (kind 'diffusers')."""
    if kind == "ours":
        from dipddpm.models.unet import build_unet
        model = build_unet(name)
    else:
        from bench.diffusers_ref import EpsOnly, build_diffusers_unet
        model = EpsOnly(build_diffusers_unet(name))
    x, t = torch.zeros(1, 1, 28, 28), torch.zeros(1, dtype=torch.long)

    def step():
        out = model(x, t)
        if backward:
            out.sum().backward()
    if not backward:
        with torch.no_grad():
            return float(count_flops(step))
    return float(count_flops(step))


@functools.lru_cache(maxsize=None)
def dip_flops_per_image_iteration() -> float:
    """One forward + backward of the study's DIP net on one 28x28 image."""
    from dipddpm.models.dip import SkipNet

    net = SkipNet()
    z = torch.rand(1, 3, 28, 28)
    return float(count_flops(lambda: net(z).sum().backward()))


def _median_rate(fn, flops: float, device, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):  # first calls: oneDNN primitive creation, allocator pools
        fn()
    return flops / statistics.median(seconds(fn, device) for _ in range(reps)) / 1e9


def gemm_rates(dtype, device, batch: int, reps: int, warmup: int = 1) -> dict:
    out = {}
    for name, (m, k, n) in GEMM_SHAPES.items():
        m = m * batch if name.startswith("unet") else m
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        out[name] = _median_rate(lambda: a @ b, 2.0 * m * k * n, device, reps, warmup)
    return out


def conv_rates(dtype, device, batch: int, reps: int, warmup: int = 1,
               dip_images: int = 16) -> dict:
    out = {}
    for name, (cin, cout, side) in CONV_SHAPES.items():
        n = dip_images if name.startswith("DIP") else batch  # DIP: 16 images of one shape
        flops = 2.0 * n * cout * cin * 9 * side * side
        x = torch.randn(n, cin, side, side, device=device).to(dtype)
        w = torch.randn(cout, cin, 3, 3, device=device).to(dtype)
        for layout, fmt in (("NCHW", torch.contiguous_format), ("NHWC", torch.channels_last)):
            xl, wl = x.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt)
            with torch.no_grad():
                out[f"{name} {layout}"] = _median_rate(
                    lambda: F.conv2d(xl, wl, padding=1), flops, device, reps, warmup)
    return out


def roofline(device, where: str, *, batch: int, reps: int, dip_images: int = 16,
             dtypes=("fp32", "bf16")) -> tuple[list[Row], dict]:
    """Rows 'roofline <dtype> GEMM' and 'roofline <dtype> 3x3 conv' (ours = the best shape's
    GFLOP/s) and {('conv'|'gemm', dtype): peak GFLOP/s}."""
    from dipddpm.precision import native_bf16

    rows, peaks = [], {}
    torch_dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    for name in dtypes:
        dtype = torch_dtypes[name]
        emulated = name == "bf16" and not native_bf16(torch.device(device).type)
        # emulated bf16 runs ~50x slower (and has no kernels to warm): one call per shape
        n, warm = (1, 0) if emulated else (reps, 1)
        note = "; no native bf16 on this device (emulated by oneDNN/ATen)" if emulated else ""
        for kind in ("GEMM", "3x3 conv"):
            if kind == "GEMM":
                r = gemm_rates(dtype, device, batch, n, warm)
            else:
                r = conv_rates(dtype, device, batch, n, warm, dip_images)
            best = max(r, key=r.get)
            detail = ", ".join(f"{k} {v:,.0f}" for k, v in r.items())
            peaks[("conv" if kind == "3x3 conv" else "gemm", name)] = r[best]
            rows.append(Row(f"roofline {name} {kind}", "GFLOP/s", r[best], None, where,
                            f"best of the nets' shapes: {best}; all: {detail} GFLOP/s; "
                            f"forward, median of {n}, batch {batch}{note}",
                            gflops=r[best], peak_gflops=r[best]))
    return rows, peaks
