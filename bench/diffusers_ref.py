"""The baseline: diffusers' UNet2DModel, trained the way diffusers' train_unconditional.py does.

Only the benchmarks import this (diffusers is the `bench` extra, never a library dependency).

Sizes pair each of our registry entries with a UNet2DModel of about the same parameter count.
No padding: every pair has at most two downsamplers (diffusers' last down block has none), and
28 = 7 * 4, so UNet2DModel runs on 1x28x28 as it is (the fast.ai course pads to 32 because its
net halves three times).
  unet-tiny   190,369   <->  (16, 32), 1 layer per block, attention at 14x14: 176,849
  unet-small  2,187,025 <->  (28, 56, 112), 1 layer per block, GroupNorm(4), attention at 7x7:
                             2,095,269
  unet-medium 15,443,009 <-> (64, 128, 256), 2 layers per block, attention at 14x14: 14,735,745
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# our registry name -> UNet2DModel keyword arguments
PAIRS = {
    "unet-tiny": dict(layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=4,
                      down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=16),
    "unet-small": dict(layers_per_block=1, block_out_channels=(28, 56, 112), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                       attention_head_dim=28),
    "unet-medium": dict(layers_per_block=2, block_out_channels=(64, 128, 256),
                        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
}


def build_diffusers_unet(ours: str):
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=28, in_channels=1, out_channels=1, **PAIRS[ours])


class EpsOnly(torch.nn.Module):
    """model(x, t) -> eps, so our samplers can drive UNet2DModel (it returns an output object)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t):
        return self.unet(x, t).sample


def diffusers_train_step(model, batch_size: int, device, mixed_precision: str = "no"):
    """One optimizer step as train_unconditional.py takes it with --use_ema (as its train.sh
    runs it): DDPMScheduler(1000, linear).add_noise, MSE on epsilon, AdamW(1e-4, betas
    (0.95, 0.999), weight decay 1e-6, eps 1e-8), clip_grad_norm 1.0, EMAModel(decay 0.9999,
    warmup, inv_gamma 1, power 3/4).step. Its LR scheduler (a scalar update per step) is left
    out, as is our loop's LR schedule. Images are random tensors already on the device, as for
    ours. mixed_precision "bf16" is its `--mixed_precision bf16`: Accelerate's autocast around
    the forward (the loss in fp32, as the script casts it), fp32 weights and optimizer."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0,
                   power=3 / 4, model_cls=type(model), model_config=model.config)
    ema.to(device)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999),
                            weight_decay=1e-6, eps=1e-8)
    clean = torch.rand(batch_size, 1, 28, 28, device=device) * 2 - 1

    def step():
        noise = torch.randn(clean.shape, device=device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,),
                                  device=device).long()
        noisy = scheduler.add_noise(clean, noise, timesteps)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                            enabled=mixed_precision == "bf16"):
            out = model(noisy, timesteps).sample
        loss = F.mse_loss(out.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.step(model.parameters())
        opt.zero_grad()
        return loss

    return step
