"""Load trained EMA weights and draw samples (the library side of jobs/sample.py).

    model, diffusion, info = load_trained("runs/ddpm", cfg)   # also for restoration jobs
    (sample.precision / sample.channels_last wrap the U-Net in precision.FastForward)
    x, nfe = ddim_sample(model, diffusion, (n, 1, 28, 28), steps=50, generator=seed)

The model and diffusion settings come from the training run's config.yaml when the weights
sit in a run dir (run/ema.pt or run/checkpoints/img-*/ema.pt), so they always match the
weights; otherwise from the caller's config. A model.name or diffusion.* key set on the command
line that disagrees with the weights' run is refused (one line, exit 2). `draw_samples` writes
    run.dir/config.yaml         the resolved config, with the weights' model and diffusion
                                (checked like every run dir's: dipddpm.runs.prepare_run_dir);
                                not when run.dir is the weights' own training run, whose
                                config.yaml stays as training wrote it
    run.dir/samples/<tag>.npz   images uint8 [N,28,28] (and float32 "x" in [-1,1]), nfe
    run.dir/samples/<tag>.png   grid of the first 64
    run.dir/samples/<tag>.json  settings ("num": sample.num_images), nfe per batch, seconds,
                                weights used
    run.dir/samples/<tag>/      metrics.jsonl (a row per batch: images drawn, seconds) and
                                the W&B run (job_type "sample"; the grid, the settings as its
                                summary); its own folder, so the training run's stay as they are
A bar counts the reverse steps of all batches (dipddpm.progress).
With sample.t0 < T the chains start from the first sample.num_images test images diffused to t0
(SDEdit-style reconstructions); restoration jobs pass their own estimates to the samplers.
"""
from __future__ import annotations

import dataclasses
import io
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from dipddpm.artifacts import save_grid
from dipddpm.config import Config, ConfigError, config_from_dict
from dipddpm.data import load_split
from dipddpm.diffusion import Diffusion, ddim_timesteps, sample
from dipddpm.models.unet import build_unet
from dipddpm.precision import FastForward, default_device, resolve
from dipddpm.progress import bar
from dipddpm.runs import CONFIG_FILE, SAMPLES_DIR, atomic_write_bytes, atomic_write_json, \
    prepare_run_dir
from dipddpm.train.checkpoint import find_weights, load_ema_weights
from dipddpm.tracking import Tracker


def training_config_path(weights: Path):
    """The config.yaml of the run the weights belong to, or None."""
    for folder in list(weights.parents)[:3]:
        path = folder / CONFIG_FILE
        if path.is_file():
            return path
    return None


def training_config(weights: Path):
    """The resolved config of the run the weights belong to, or None."""
    path = training_config_path(weights)
    if path is None:
        return None
    return config_from_dict(yaml.safe_load(path.read_text()), str(path))


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
    device = device or default_device()
    model.to(device).eval().requires_grad_(False)
    s = cfg.sample
    if resolve(s.precision, device) != "fp32" or s.channels_last:
        model = FastForward(model, s.precision, s.channels_last)  # sample.precision et al.
    info = {"weights": str(weights), "model": trained.model.name,
            "diffusion": vars(trained.diffusion).copy(),
            "precision": resolve(s.precision, device), "channels_last": s.channels_last}
    return model, Diffusion.from_config(trained.diffusion), info


# the keys the weights fix: the sampling job takes them from the weights' run
WEIGHT_KEYS = ("model", "diffusion")


def sampling_config(cfg: Config, explicit=()) -> tuple[Config, Path, bool]:
    """(cfg with the weights' model and diffusion, the weights file, whether run.dir is the
    weights' own run). `explicit`: keys the user set on the command line; one of the weight
    keys that disagrees with the weights' run is a ConfigError."""
    weights = find_weights(cfg.sample.checkpoint or cfg.run.dir)
    path = training_config_path(weights)
    if path is None:
        return cfg, weights, False
    trained = training_config(weights)
    for key in explicit:
        section, _, name = key.partition(".")
        if section not in WEIGHT_KEYS or not hasattr(getattr(cfg, section), name):
            continue
        mine = getattr(getattr(cfg, section), name)
        theirs = getattr(getattr(trained, section), name)
        if mine != theirs:
            raise ConfigError(f"command line: {key} = {mine!r}: the weights {weights} were "
                              f"trained with {key} = {theirs!r} ({path}); drop the override, "
                              "sampling takes it from the weights' run")
    resolved = dataclasses.replace(cfg, model=trained.model, diffusion=trained.diffusion)
    own = path.parent.resolve() == Path(cfg.run.dir).resolve()
    return resolved, weights, own


def draw_samples(cfg: Config, explicit=()) -> dict:
    """Draw cfg.sample.num_images samples; `explicit`: the keys set on the command line (see
    `sampling_config`)."""
    cfg, _, own_run = sampling_config(cfg, explicit)
    if not own_run:
        prepare_run_dir(cfg, reads=WEIGHT_KEYS)
    s = cfg.sample
    run_dir = Path(cfg.run.dir)
    model, diffusion, info = load_trained(s.checkpoint or run_dir, cfg)
    device = next(model.parameters()).device
    t0 = s.t0 if s.t0 is not None else diffusion.T
    if not 1 <= t0 <= diffusion.T:
        raise ConfigError(f"sample.t0 = {t0}: must be in [1, {diffusion.T}] (T of the trained model)")
    starts = None
    if t0 < diffusion.T:
        images, _, _ = load_split(cfg.data.dir, "test")
        if len(images) < s.num_images:
            raise ConfigError(f"sample.num_images = {s.num_images}: the test split has only "
                              f"{len(images)} images")
        starts = torch.from_numpy(images[: s.num_images]).float().div(127.5).sub(1).unsqueeze(1)

    chain_len = s.steps if s.sampler == "ddim" else t0
    tag = f"{s.sampler}-{chain_len}steps-eta{s.eta:g}-t0{t0}-n{s.num_images}"
    folder = run_dir / SAMPLES_DIR
    tracker = Tracker(folder / tag, cfg, "sample", keep_rows=0)  # a rerun replaces its rows
    starts_at = range(0, s.num_images, s.batch_size)
    chain = len(ddim_timesteps(t0, s.steps)) if s.sampler == "ddim" else t0
    out, nfes = [], []
    start = time.perf_counter()
    with tracker, bar(len(starts_at) * chain, f"sample {tag}", unit="step") as steps_bar:
        for b, i in enumerate(starts_at):
            n = min(s.batch_size, s.num_images - i)
            gen = torch.Generator(device).manual_seed(cfg.run.seed * 1_000_003 + b)
            x0_hat = starts[i:i + n].to(device) if starts is not None else None
            x, nfe = sample(model, diffusion, (n, 1, 28, 28), sampler=s.sampler, steps=s.steps,
                            eta=s.eta, x0_hat=x0_hat, t0=t0, generator=gen, device=device,
                            progress=steps_bar)
            out.append(x.float().cpu())
            nfes.append(nfe)
            tracker.log({"images": i + n, "seconds": time.perf_counter() - start, "nfe": nfe}, b)
        seconds = time.perf_counter() - start
        x = torch.cat(out)
        result = _write_samples(x, nfes, seconds, folder, tag, cfg, t0, info)
        tracker.log_image("samples", result["png"], len(nfes) - 1)
        tracker.summary({k: v for k, v in result.items() if k not in ("diffusion", "npz", "png")})
    print(f"{s.num_images} samples, {nfes[0]} NFE each, {seconds:.1f} s -> "
          f"{folder / tag}.{{npz,png}}")
    return result


def _write_samples(x, nfes, seconds, folder: Path, tag: str, cfg: Config, t0: int, info) -> dict:
    s = cfg.sample
    u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).squeeze(1).numpy()
    buf = io.BytesIO()
    np.savez(buf, images=u8, x=x.squeeze(1).numpy(), nfe=np.asarray(nfes))
    atomic_write_bytes(folder / f"{tag}.npz", buf.getvalue())
    save_grid(x[:64], folder / f"{tag}.png")
    result = {"sampler": s.sampler, "steps": s.steps, "eta": s.eta, "t0": t0,
              "num": s.num_images,
              "nfe_per_sample": nfes[0], "seconds": seconds, "seed": cfg.run.seed,
              "npz": str(folder / f"{tag}.npz"), "png": str(folder / f"{tag}.png"), **info}
    atomic_write_json(folder / f"{tag}.json", result)
    return result

