"""A time-conditioned U-Net for 1x28x28 images, with a size registry.

    model = build_unet("unet-small")        # ~2M parameters
    eps = model(x_t, t)                     # x_t [B,1,28,28], t int64 [B] in [0, T-1]

Shape: levels at 28 -> 14 -> 7. 28 = 7 * 4, so two stride-2 convolutions land exactly on 7x7
and nearest x2 upsampling lands exactly back on 14 and 28: no padding to 32 and no cropping.
We stop at 7x7 on purpose: one more halving gives 4x4 (odd 7 -> ceil), and the upsample would
have to crop 8 -> 7, which costs more than the tiny extra receptive field is worth (at 7x7 a
3x3 conv plus full self-attention already sees the whole image).

Blocks follow the DDPM/diffusers recipe: ResBlock = GroupNorm, SiLU, 3x3 conv, + time embedding
(scale-and-shift), GroupNorm, SiLU, dropout, 3x3 conv, residual. Self-attention uses
F.scaled_dot_product_attention (fused kernels on GPU) at the levels named in `attn_levels` and
in the middle. No data-dependent Python control flow, so torch.compile traces it whole.

Registry (parameter counts are tested):
  unet-tiny    tests only: 190k parameters
  unet-small   like the HF "Annotated Diffusion" FashionMNIST model: dim 28, mults (1,2,4),
               GroupNorm(4); attention at 7x7 and in the middle: 2.19M parameters
  unet-medium  like diffusers UNet2DModel(64,128,256) with 2 ResBlocks per level and attention
               at 14x14 (and in the 7x7 middle): 15.4M parameters (diffusers: 14.7M)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dipddpm.registry import UNET_NAMES


@dataclass(frozen=True)
class UNetConfig:
    dim: int  # channels at 28x28; level i has dim * mults[i]
    mults: tuple[int, ...]
    num_res_blocks: int  # per level on the way down; the way up has one more (diffusers)
    attn_levels: tuple[int, ...]  # levels (0 = 28x28) with self-attention after each ResBlock
    groups: int  # GroupNorm groups; must divide every width
    head_dim: int  # attention heads = width // head_dim
    dropout: float = 0.0
    in_channels: int = 1


UNET_CONFIGS: dict[str, UNetConfig] = {
    "unet-tiny": UNetConfig(dim=16, mults=(1, 2), num_res_blocks=1, attn_levels=(1,),
                            groups=4, head_dim=16),
    "unet-small": UNetConfig(dim=28, mults=(1, 2, 4), num_res_blocks=1, attn_levels=(2,),
                             groups=4, head_dim=28),
    "unet-medium": UNetConfig(dim=64, mults=(1, 2, 4), num_res_blocks=2, attn_levels=(1,),
                              groups=32, head_dim=64),
}
if tuple(UNET_CONFIGS) != UNET_NAMES:  # the schema validates model.name against UNET_NAMES
    raise ImportError(f"dipddpm.registry.UNET_NAMES {UNET_NAMES} != the sizes here "
                      f"{tuple(UNET_CONFIGS)}: keep the two in step")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of (integer) timesteps, as in the Transformer and DDPM papers."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb, 2 * cout)  # scale and shift for norm2 (improved DDPM)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.temb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return h + self.skip(x)


class Attention(nn.Module):
    def __init__(self, ch: int, groups: int, head_dim: int):
        super().__init__()
        if ch % head_dim:
            raise ValueError(f"attention width {ch} not divisible by head_dim {head_dim}")
        self.heads = ch // head_dim
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.out = nn.Conv2d(ch, ch, 1)

    def forward(self, x, emb=None):
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each [b, heads, hw, head_dim]
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(y.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)  # 28 -> 14 -> 7 exactly

    def forward(self, x, emb=None):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, emb=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        widths = [cfg.dim * m for m in cfg.mults]
        temb = 4 * cfg.dim
        g, hd, p = cfg.groups, cfg.head_dim, cfg.dropout
        self.time_mlp = nn.Sequential(nn.Linear(cfg.dim, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.stem = nn.Conv2d(cfg.in_channels, cfg.dim, 3, padding=1)

        # The way down records the width of every tensor it hands to the way up as a skip.
        self.down = nn.ModuleList()
        skips = [cfg.dim]
        ch = cfg.dim
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                blocks = [ResBlock(ch, width, temb, g, p)]
                if level in cfg.attn_levels:
                    blocks.append(Attention(width, g, hd))
                self.down.append(nn.ModuleList(blocks))
                ch = width
                skips.append(ch)
            if level < len(widths) - 1:
                self.down.append(nn.ModuleList([Downsample(ch)]))
                skips.append(ch)

        self.mid = nn.ModuleList([ResBlock(ch, ch, temb, g, p), Attention(ch, g, hd),
                                  ResBlock(ch, ch, temb, g, p)])

        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            width = widths[level]
            for i in range(cfg.num_res_blocks + 1):
                blocks = [ResBlock(ch + skips.pop(), width, temb, g, p)]
                if level in cfg.attn_levels:
                    blocks.append(Attention(width, g, hd))
                ch = width
                if level > 0 and i == cfg.num_res_blocks:
                    blocks.append(Upsample(ch))
                self.up.append(nn.ModuleList(blocks))
        assert not skips

        self.head = nn.Sequential(nn.GroupNorm(g, ch), nn.SiLU(),
                                  nn.Conv2d(ch, cfg.in_channels, 3, padding=1))
        # Zero the last conv so the untrained net predicts 0 (a common, stabilising DDPM init).
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.cfg.dim).to(x.dtype))
        h = self.stem(x)
        hs = [h]
        for blocks in self.down:
            for block in blocks:
                h = block(h, emb)
            hs.append(h)
        for block in self.mid:
            h = block(h, emb)
        for blocks in self.up:
            h = torch.cat([h, hs.pop()], dim=1)
            for block in blocks:
                h = block(h, emb)
        return self.head(h)


def build_unet(name: str) -> UNet:
    if name not in UNET_CONFIGS:
        raise KeyError(f"unknown U-Net {name!r}; choose from {sorted(UNET_CONFIGS)}")
    return UNet(UNET_CONFIGS[name])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
