"""The device a job runs on by default, the precision a fast path computes in, and whether this
machine runs bf16 natively.

Three config keys name a precision: `train.mixed_precision` (Accelerate's words: no, fp16, bf16,
plus auto), `dip.precision` and `sample.precision` (fp32, bf16, auto). "auto" is bf16 where the
hardware executes bf16 natively and fp32 everywhere else:
  - a CUDA GPU that supports bf16 (Ampere and later);
  - a CPU whose flags include AVX512_BF16 or AMX-BF16 (Zen 4, Sapphire Rapids and later) and
    whose PyTorch has oneDNN's bf16 kernels.
On a CPU without those instructions (AVX2 only, e.g. AMD EPYC Zen 3) oneDNN has no bf16
convolution: bf16 autocast there ran the U-Net 15-25x and a 3x3 convolution 10-50x slower than
fp32 (bench.run's roofline rows show it), so "auto" must not pick it.

bf16 here always means bf16 compute with fp32 master weights: parameters, optimizer state,
EMA weights and losses stay fp32 (see each path's docstring).
"""
from __future__ import annotations

import functools
import platform
from contextlib import nullcontext
from pathlib import Path

import torch

_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def default_device() -> str:
    """'cuda' where torch sees a GPU, else 'cpu': the device every job uses unless told otherwise."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=None)
def native_bf16(device_type: str = "cpu") -> bool:
    """True when bf16 convolutions and matmuls run on native instructions on this device type."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    flags = _cpu_flags()
    if platform.machine() in ("aarch64", "arm64"):
        has = "bf16" in flags
    else:
        has = any(f in flags for f in _CPU_BF16_FLAGS)
    try:
        return has and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve(precision: str, device) -> str:
    """'fp32', 'bf16' or 'fp16' for a configured precision ('no' is Accelerate's fp32)."""
    if precision in (None, "no", "fp32"):  # None: no launcher said otherwise (train.*)
        return "fp32"
    if precision == "auto":
        return "bf16" if native_bf16(torch.device(device).type) else "fp32"
    if precision in ("bf16", "fp16"):
        return precision
    raise ValueError(f"unknown precision {precision!r}")


def accelerate_precision(precision: str, device) -> str:
    """train.mixed_precision resolved into Accelerate's words: no, fp16 or bf16."""
    p = resolve(precision, device)
    return "no" if p == "fp32" else p


def compute_dtype(precision: str, device) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16,
            "fp16": torch.float16}[resolve(precision, device)]


def autocast(device, precision: str):
    """torch.autocast at the resolved precision, or a no-op context for fp32."""
    dtype = compute_dtype(precision, device)
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


class FastForward(torch.nn.Module):
    """model(x, t) under autocast at `precision`, with x in channels_last when asked; returns
    fp32. The samplers take any eps-model, so wrapping the trained U-Net is all a sampling
    job needs (the wrapped module's weights stay fp32)."""

    def __init__(self, model: torch.nn.Module, precision: str = "fp32",
                 channels_last: bool = False):
        super().__init__()
        device = next(model.parameters()).device
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.channels_last = channels_last
        self.precision = resolve(precision, device)
        self.device = device

    def forward(self, x, t):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            return self.model(x, t).float()
