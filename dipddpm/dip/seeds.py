"""Per-sample randomness that does not depend on how samples are grouped.

A sample's seed comes from (run seed, sample key, purpose) through CRC32, which is stable across
processes and Python versions (Python's hash() of a str is salted per process). The DIP input
and its per-iteration jitter come from a counter-based hash of (sample seed, counter, element),
so a net draws the same numbers whether it is fitted alone or inside a batch of any size, on
any device.
"""
from __future__ import annotations

import math
import zlib
from typing import Sequence

import torch

_M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # < 2**31, so x * _MUL stays below 2**63 for any 32-bit x: no int64 overflow


def sample_seed(run_seed: int, key: str, purpose: str) -> int:
    """A 32-bit seed for one sample and one use of randomness (e.g. 'noise', 'net')."""
    return zlib.crc32(f"{run_seed}/{key}/{purpose}".encode())


def _mix(x: torch.Tensor) -> torch.Tensor:
    # a well-known 32-bit integer finaliser, done in int64 so that it runs on any device
    x = x ^ (x >> 16)
    x = (x * _MUL) & _M32
    x = x ^ (x >> 16)
    x = (x * _MUL) & _M32
    return x ^ (x >> 16)


def _uniform_bits(seeds: torch.Tensor, counter: int, n: int, stream: int) -> torch.Tensor:
    """[B, n] floats in (0, 1), a pure function of (seed, counter, stream, element index)."""
    device = seeds.device
    h = _mix(seeds.to(torch.int64)[:, None] & _M32)
    h = _mix(h ^ (counter & _M32))
    h = _mix(h ^ stream)
    idx = torch.arange(n, device=device, dtype=torch.int64)[None, :]
    h = _mix(h ^ idx)
    return ((h >> 8).to(torch.float64) + 0.5) / float(1 << 24)


def hash_uniform(seeds: Sequence[int] | torch.Tensor, counter: int, shape: Sequence[int],
                 dtype=torch.float32, device=None) -> torch.Tensor:
    """U(0, 1) of shape [B, *shape], row b from seeds[b]."""
    seeds = torch.as_tensor(seeds, dtype=torch.int64, device=device)
    n = math.prod(shape)
    u = _uniform_bits(seeds, counter, n, 0)
    return u.to(dtype).reshape(len(seeds), *shape)


def hash_normal(seeds: Sequence[int] | torch.Tensor, counter: int, shape: Sequence[int],
                dtype=torch.float32, device=None) -> torch.Tensor:
    """N(0, 1) of shape [B, *shape] by Box-Muller on two hashed uniforms."""
    seeds = torch.as_tensor(seeds, dtype=torch.int64, device=device)
    n = math.prod(shape)
    u1 = _uniform_bits(seeds, counter, n, 1)
    u2 = _uniform_bits(seeds, counter, n, 2)
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return z.to(dtype).reshape(len(seeds), *shape)
