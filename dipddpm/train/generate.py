"""Load trained EMA weights and draw samples (the library side of jobs/sample.py).

    model, diffusion, info = load_trained("runs/ddpm", cfg)   # also for restoration jobs
    (sample.precision / sample.channels_last wrap the U-Net in precision.FastForward)
    x, nfe = ddim_sample(model, diffusion, (n, 1, 28, 28), steps=50, generator=seed)

The model and diffusion settings come from the training run's config.yaml when the weights
sit in a run dir (run/ema.pt or run/checkpoints/img-*/ema.pt), so they always match the
weights; otherwise from the caller's config. `generate` writes
    run.dir/samples/<tag>.npz   images uint8 [N,28,28] (and float32 "x" in [-1,1]), nfe
    run.dir/samples/<tag>.png   grid of the first 64
    run.dir/samples/<tag>.json  settings, nfe per batch, seconds, weights used
With sample.t0 < T the chains start from the first sample.num test images diffused to t0
(SDEdit-style reconstructions); restoration jobs pass their own estimates to the samplers.
"""
from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from dipddpm.config import Config, ConfigError, config_from_dict
from dipddpm.diffusion import Diffusion, sample
from dipddpm.models.unet import build_unet
from dipddpm.precision import FastForward, resolve
from dipddpm.runs import CONFIG_FILE, SAMPLES_DIR, atomic_write_bytes, atomic_write_json
from dipddpm.train.checkpoint import find_weights, load_ema_weights
from dipddpm.train.grid import save_grid


def training_config(weights: Path):
    """The resolved config of the run the weights belong to, or None."""
    for folder in list(weights.parents)[:3]:
        path = folder / CONFIG_FILE
        if path.is_file():
            return config_from_dict(yaml.safe_load(path.read_text()), str(path))
    return None


def load_trained(where, cfg: Config, device=None):
    """(EMA model in eval mode, Diffusion, info) from a run dir, checkpoint folder or .pt file."""
    weights = find_weights(where)
    trained = training_config(weights) or cfg
    model = build_unet(trained.model.name)
    try:
        model.load_state_dict(load_ema_weights(weights))
    except RuntimeError as e:
        raise ConfigError(f"{weights}: weights do not fit model.name = "
                          f"{trained.model.name!r} ({str(e).splitlines()[0]})") from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval().requires_grad_(False)
    s = cfg.sample
    if resolve(s.precision, device) != "fp32" or s.channels_last:
        model = FastForward(model, s.precision, s.channels_last)  # sample.precision et al.
    info = {"weights": str(weights), "model": trained.model.name,
            "diffusion": vars(trained.diffusion).copy(),
            "precision": resolve(s.precision, device), "channels_last": s.channels_last}
    return model, Diffusion.from_config(trained.diffusion), info


def generate(cfg: Config) -> dict:
    s = cfg.sample
    run_dir = Path(cfg.run.dir)
    model, diffusion, info = load_trained(s.checkpoint or run_dir, cfg)
    device = next(model.parameters()).device
    t0 = s.t0 if s.t0 is not None else diffusion.T
    if not 1 <= t0 <= diffusion.T:
        raise ConfigError(f"sample.t0 = {t0}: must be in [1, {diffusion.T}] (T of the trained model)")
    starts = None
    if t0 < diffusion.T:
        from dipddpm.data import load_split

        images, _, _ = load_split(cfg.data.dir, "test")
        if len(images) < s.num:
            raise ConfigError(f"sample.num = {s.num}: the test split has only {len(images)} images")
        starts = torch.from_numpy(images[: s.num]).float().div(127.5).sub(1).unsqueeze(1)

    out, nfes = [], []
    start = time.perf_counter()
    for b, i in enumerate(range(0, s.num, s.batch_size)):
        n = min(s.batch_size, s.num - i)
        gen = torch.Generator(device).manual_seed(cfg.run.seed * 1_000_003 + b)
        x0_hat = starts[i:i + n].to(device) if starts is not None else None
        x, nfe = sample(model, diffusion, (n, 1, 28, 28), sampler=s.sampler, steps=s.steps,
                        eta=s.eta, x0_hat=x0_hat, t0=t0, generator=gen, device=device)
        out.append(x.float().cpu())
        nfes.append(nfe)
    seconds = time.perf_counter() - start
    x = torch.cat(out)

    tag = f"{s.sampler}-{s.steps if s.sampler == 'ddim' else t0}steps-eta{s.eta:g}-t0{t0}-n{s.num}"
    folder = run_dir / SAMPLES_DIR
    u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).squeeze(1).numpy()
    buf = io.BytesIO()
    np.savez(buf, images=u8, x=x.squeeze(1).numpy(), nfe=np.asarray(nfes))
    atomic_write_bytes(folder / f"{tag}.npz", buf.getvalue())
    save_grid(x[:64], folder / f"{tag}.png")
    result = {"sampler": s.sampler, "steps": s.steps, "eta": s.eta, "t0": t0, "num": s.num,
              "nfe_per_sample": nfes[0], "seconds": seconds, "seed": cfg.run.seed,
              "npz": str(folder / f"{tag}.npz"), "png": str(folder / f"{tag}.png"), **info}
    atomic_write_json(folder / f"{tag}.json", result)
    print(f"{s.num} samples, {nfes[0]} NFE each, {seconds:.1f} s -> {folder / tag}.{{npz,png}}")
    return result

