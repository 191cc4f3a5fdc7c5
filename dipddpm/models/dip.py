"""The Deep Image Prior skip network, as printed in the study, and a grouped form of it.

The structure follows the DIP author's `skip()` builder: at every scale a skip branch (1x1 conv,
BN, LeakyReLU) and a deeper branch (3x3 stride-2 conv, BN, act, 3x3 conv, BN, act, the next
scale, bilinear x2 upsample), joined by a Concat that centre-crops to the smaller map, then
BN, 3x3 conv, BN, act, 1x1 conv, BN, act. Reflection padding before every conv; a 1x1 conv and a
sigmoid make the head. At 28x28 three scales fit (28 -> 14 -> 7 -> 4; the 8x8 upsample is
cropped back to 7). The default (3 input channels, 3 scales, 128/128/4 channels) has
1,252,681 parameters, the study's count.

`grouped_forward` runs B such nets at once from their parameters stacked along dim 0
(conv weight [B*Cout, Cin, k, k] with groups=B, BN affine [B*C]) on images [1, B*C, H, W]:
BatchNorm in train mode on a batch of one image normalises each channel over H, W only, so
per-channel statistics of the stacked tensor are exactly each net's own statistics.

Formulations of the 3x3 convolutions of B nets at once (`dip.formulation`; 1x1 convolutions are
a batched matmul in all three, normalisation and activations run on the whole stack):
  grouped  one grouped convolution (groups=B): oneDNN's grouped kernel
  bmm      im2col (F.unfold) and one batched matmul [B, Cout, Cin*9] x [B, Cin*9, H*W]: MKL's
           batched GEMM, the col2im (F.fold) in the backward
  loop     B plain convolutions, one per net (batch of one each), outputs concatenated
All three compute the same function (tested in float64). On one AMD EPYC (Zen 3, AVX2) core,
fp32, 16 nets, whole fits (CPU time on a busy machine): grouped 31.6 image-iterations/s, loop
31.5, bmm 27.8; grouped stays the default (BENCHMARKS.md has the lever table).

`dtype` runs the stack in another compute precision: parameters and input are cast to it
(differentiably, so the gradients reach the fp32 master parameters in fp32) and the output comes
back in fp32. `round_fn`, for benchmarks only, is applied to the parameters, the input and every
layer's output: with a bf16 round trip it emulates bf16 storage at fp32 speed on a CPU without
native bf16 (bench/dip_precision.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

LEAK = 0.2


def _per_scale(value: int | Sequence[int], scales: int, name: str) -> list[int]:
    values = [value] * scales if isinstance(value, int) else list(value)
    if len(values) != scales:
        raise ValueError(f"{name}: expected {scales} values, got {len(values)}")
    return values


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    # k // 2 reflection padding is what the author's conv(pad='reflection') adds; 0 for 1x1
    return nn.Conv2d(cin, cout, k, stride, padding=k // 2, padding_mode="reflect")


def _bn(channels: int) -> nn.BatchNorm2d:
    # DIP never leaves train mode: each forward normalises with the image's own statistics,
    # so running averages would be dead state (and would block torch.func transforms)
    return nn.BatchNorm2d(channels, track_running_stats=False)


def _act() -> nn.LeakyReLU:
    return nn.LeakyReLU(LEAK)


class _Scale(nn.Module):
    def __init__(self, cin: int, down: int, up: int, skip: int, inner: "_Scale | None"):
        super().__init__()
        self.skip = (nn.Sequential(_conv(cin, skip, 1), _bn(skip), _act())
                     if skip else None)
        self.down = nn.Sequential(_conv(cin, down, 3, 2), _bn(down), _act(),
                                  _conv(down, down, 3), _bn(down), _act())
        self.inner = inner
        deep = inner.out_channels if inner is not None else down
        self.up = nn.Sequential(_bn(skip + deep), _conv(skip + deep, up, 3),
                                _bn(up), _act(),
                                _conv(up, up, 1), _bn(up), _act())
        self.out_channels = up

    def forward(self, x):
        deep = self.down(x)
        if self.inner is not None:
            deep = self.inner(deep)
        deep = F.interpolate(deep, scale_factor=2, mode="bilinear", align_corners=False)
        if self.skip is None:
            return self.up(deep)
        return self.up(concat_cropped([self.skip(x), deep]))


def concat_cropped(parts: list[torch.Tensor], groups: int = 1) -> torch.Tensor:
    """Concat along channels after centre-cropping to the smallest map (the author's Concat).

    With groups=B the channels of each part are B blocks (one per net); the result keeps that
    layout, each net's block being the concat of its own blocks.
    """
    h = min(p.shape[2] for p in parts)
    w = min(p.shape[3] for p in parts)
    cropped = []
    for p in parts:
        dh, dw = (p.shape[2] - h) // 2, (p.shape[3] - w) // 2
        cropped.append(p[:, :, dh:dh + h, dw:dw + w])
    if groups == 1:
        return torch.cat(cropped, 1)
    n = cropped[0].shape[0]
    cat = torch.cat([p.reshape(n, groups, -1, h, w) for p in cropped], 2)
    return cat.reshape(n, -1, h, w)


@dataclass(frozen=True)
class SkipSpec:
    in_channels: int = 3
    out_channels: int = 1
    scales: int = 3
    channels_down: int | tuple[int, ...] = 128
    channels_up: int | tuple[int, ...] = 128
    channels_skip: int | tuple[int, ...] = 4

    @classmethod
    def from_config(cls, dip) -> "SkipSpec":
        return cls(dip.in_channels, dip.out_channels, dip.scales, dip.channels_down,
                   dip.channels_up, dip.channels_skip)


class SkipNet(nn.Module):
    """The study's DIP net; `SkipNet()` is the 1,252,681-parameter default."""

    def __init__(self, spec: SkipSpec = SkipSpec()):
        super().__init__()
        self.spec = spec
        down = _per_scale(spec.channels_down, spec.scales, "channels_down")
        up = _per_scale(spec.channels_up, spec.scales, "channels_up")
        skip = _per_scale(spec.channels_skip, spec.scales, "channels_skip")
        inputs = [spec.in_channels] + down[:-1]
        inner = None
        for i in reversed(range(spec.scales)):
            inner = _Scale(inputs[i], down[i], up[i], skip[i], inner)
        self.body = inner
        self.head = _conv(up[0], spec.out_channels, 1)

    def forward(self, x):
        return torch.sigmoid(self.head(self.body(x)))


def num_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# ----------------------------------------------------------------------------- grouped form


def stack_params(nets: Sequence[SkipNet]) -> dict[str, torch.Tensor]:
    """Each parameter of B nets concatenated along dim 0: net b owns the b-th block of rows."""
    names = [n for n, _ in nets[0].named_parameters()]
    per_net = [dict(net.named_parameters()) for net in nets]
    return {n: torch.cat([p[n].detach() for p in per_net], 0) for n in names}


def unstack_params(stacked: dict[str, torch.Tensor], groups: int,
                   b: int) -> dict[str, torch.Tensor]:
    """Net b's parameters (views) out of stacked ones."""
    out = {}
    for name, t in stacked.items():
        rows = t.shape[0] // groups
        out[name] = t[b * rows:(b + 1) * rows]
    return out


FORMULATIONS = ("grouped", "bmm", "loop")


def _conv_kxk(x, weight, bias, stride: int, groups: int, formulation: str):
    """k x k convolution of `groups` nets, x [1, B*Cin, H, W] already padded."""
    if formulation == "grouped" or groups == 1:
        return F.conv2d(x, weight, bias, stride, groups=groups)
    _, _, h, w = x.shape
    k = weight.shape[-1]
    cin = weight.shape[1]
    xb = x.reshape(groups, cin, h, w)
    if formulation == "bmm":
        ho, wo = (h - k) // stride + 1, (w - k) // stride + 1
        cols = F.unfold(xb, k, stride=stride)  # [B, Cin*k*k, Ho*Wo]
        out = torch.baddbmm(bias.view(groups, -1, 1), weight.reshape(groups, -1, cin * k * k),
                            cols)
        return out.view(1, -1, ho, wo)
    if formulation == "loop":
        ws = weight.view(groups, -1, cin, k, k).unbind(0)
        bs = bias.view(groups, -1).unbind(0)
        # split/unbind, not x[b:b+1]: one backward node instead of B zero-filled full grads
        out = torch.cat([F.conv2d(xg, wg, bg, stride)
                         for xg, wg, bg in zip(xb.split(1, 0), ws, bs)], 0)
        return out.view(1, -1, *out.shape[2:])
    raise ValueError(f"unknown formulation {formulation!r}; choose from {', '.join(FORMULATIONS)}")


def _gconv(conv: nn.Conv2d, params, name, x, groups, formulation="grouped"):
    weight, bias = params[f"{name}.weight"], params[f"{name}.bias"]
    if groups > 1 and conv.kernel_size == (1, 1) and conv.stride == (1, 1):
        # a grouped 1x1 conv is a batched matmul; CPU conv kernels run it group by group
        n, _, h, w = x.shape
        out = torch.baddbmm(bias.view(groups, -1, 1),
                            weight.view(groups, -1, conv.in_channels),
                            x.reshape(groups, conv.in_channels, h * w))
        return out.view(n, -1, h, w)
    pad = conv.padding[0]
    if pad:
        x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    return _conv_kxk(x, weight, bias, conv.stride[0], groups, formulation)


def _gseq(seq: nn.Sequential, params, prefix, x, groups, formulation, rnd):
    for i, layer in enumerate(seq):
        name = f"{prefix}.{i}"
        if isinstance(layer, nn.Conv2d):
            x = _gconv(layer, params, name, x, groups, formulation)
        elif isinstance(layer, nn.BatchNorm2d):
            # one group per channel = BN statistics of a single image; on CPU group_norm is
            # ~100x faster than batch_norm for a batch of one
            x = F.group_norm(x, x.shape[1], params[f"{name}.weight"], params[f"{name}.bias"],
                             eps=layer.eps)
        elif isinstance(layer, nn.LeakyReLU):
            x = F.leaky_relu(x, LEAK)
        else:
            raise TypeError(f"grouped form has no rule for {type(layer).__name__}")
        x = rnd(x)
    return x


def _gscale(scale: _Scale, params, prefix, x, groups, formulation, rnd):
    deep = _gseq(scale.down, params, f"{prefix}.down", x, groups, formulation, rnd)
    if scale.inner is not None:
        deep = _gscale(scale.inner, params, f"{prefix}.inner", deep, groups, formulation, rnd)
    deep = rnd(F.interpolate(deep, scale_factor=2, mode="bilinear", align_corners=False))
    if scale.skip is None:
        return _gseq(scale.up, params, f"{prefix}.up", deep, groups, formulation, rnd)
    skip = _gseq(scale.skip, params, f"{prefix}.skip", x, groups, formulation, rnd)
    return _gseq(scale.up, params, f"{prefix}.up", concat_cropped([skip, deep], groups), groups,
                 formulation, rnd)


def _identity(x):
    return x


def grouped_forward(net: SkipNet, params: dict[str, torch.Tensor], x: torch.Tensor,
                    groups: int, formulation: str = "grouped", dtype: torch.dtype | None = None,
                    round_fn=None) -> torch.Tensor:
    """Forward of `groups` nets shaped like `net`, with stacked `params`, on x [1, B*Cin, H, W].

    `net` supplies only the structure; its own parameters are not used. Returns [1, B*Cout, H, W]
    in x's dtype. `formulation`, `dtype` and `round_fn`: see the module docstring."""
    if formulation not in FORMULATIONS:
        raise ValueError(f"unknown formulation {formulation!r}; choose from "
                         f"{', '.join(FORMULATIONS)}")
    out_dtype = x.dtype
    rnd = round_fn or _identity
    if dtype is not None and dtype != x.dtype:
        params = {n: t.to(dtype) for n, t in params.items()}
        x = x.to(dtype)
    if round_fn is not None:
        params = {n: rnd(t) for n, t in params.items()}
        x = rnd(x)
    body = _gscale(net.body, params, "body", x, groups, formulation, rnd)
    return torch.sigmoid(rnd(_gconv(net.head, params, "head", body, groups,
                                    formulation))).to(out_dtype)
