"""Checkpoints of a training run, and the EMA weights file that sampling jobs read.

    run.dir/checkpoints/img-000000012800/   one accelerator.save_state folder per checkpoint
        model.safetensors, optimizer.bin, random_states_<rank>.pkl   (Accelerate's)
        ema.pt                               EMA weights (identical on every rank)
        train_state.json                     step, images seen, data epoch and position,
                                             metrics.jsonl rows written
    run.dir/ema.pt                           final EMA weights, written at the end
    run.dir/weights/ema-img-000000060000.pt  EMA weights kept at every train.weights_every_images

Checkpoints are named by images seen (zero-padded, so names sort in training order), are
written under a temporary name and renamed when complete, and the last K are kept: a job killed
mid-save resumes from the previous complete one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from dipddpm.config import UserError
from dipddpm.runs import CHECKPOINTS_DIR, atomic_path, atomic_write_json

WEIGHTS_FILE = "ema.pt"
SNAPSHOTS_DIR = "weights"
STATE_FILE = "train_state.json"
PREFIX = "img-"


@dataclass
class TrainState:
    """Everything besides weights, optimizer and RNG that exact resume needs."""
    step: int = 0  # optimizer steps done
    images_seen: int = 0  # over all ranks
    epoch: int = 0  # the data epoch being read
    batch_in_epoch: int = 0  # batches of that epoch this rank has consumed (same on all ranks)
    loss_sum: float = 0.0  # loss accumulated since the last log line (all-reduced, so equal)
    loss_count: int = 0
    # wall time of the training loop over all segments of a resumed run; the default lets
    # checkpoints written before this field existed load
    train_seconds: float = 0.0
    # rows of metrics.jsonl when the checkpoint was saved (Tracker.rows); None in checkpoints
    # from before this field existed
    metrics_rows: Optional[int] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def checkpoint_dirs(run_dir) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE_FILE).exists())


def latest_checkpoint(run_dir) -> Optional[Path]:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(accelerator, run_dir, state: TrainState, ema, keep: int) -> Path:
    """accelerator.save_state plus EMA and TrainState, atomically; prune to the last `keep`.
    Call on every rank (save_state writes each rank's RNG state)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = root / f"{PREFIX}{state.images_seen:012d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    tmp.mkdir(parents=True, exist_ok=True)
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        save_weights(tmp / WEIGHTS_FILE, ema, state)
        atomic_write_json(tmp / STATE_FILE, state.to_dict())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # the same point saved again (a rerun of a finished run)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, ema) -> TrainState:
    """Restore model, optimizer, RNG (accelerate), EMA and TrainState on every rank."""
    accelerator.load_state(str(path))
    ema.load_state_dict(torch.load(path / WEIGHTS_FILE, map_location="cpu",
                                   weights_only=True)["ema"])
    with open(path / STATE_FILE) as f:
        return TrainState(**json.load(f))


def save_weights(path, ema, state: TrainState, model_name: str | None = None) -> None:
    payload = {"ema": ema.state_dict(), "step": state.step, "images_seen": state.images_seen}
    if model_name is not None:
        payload["model_name"] = model_name
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(payload, tmp)


def snapshot_path(run_dir, images_seen: int) -> Path:
    """Where train.weights_every_images keeps the EMA weights at `images_seen` (a weights file
    that sample.checkpoint / protocol.checkpoint accept)."""
    return Path(run_dir) / SNAPSHOTS_DIR / f"ema-{PREFIX}{images_seen:012d}.pt"


def kept_snapshots(run_dir) -> list[tuple[int, Path]]:
    """(images seen, weights file) of every snapshot `snapshot_path` wrote, oldest first."""
    head, tail = f"ema-{PREFIX}", ".pt"
    return sorted((int(p.name[len(head):-len(tail)]), p)
                  for p in (Path(run_dir) / SNAPSHOTS_DIR).glob(f"{head}*{tail}")
                  if p.name[len(head):-len(tail)].isdigit())


def find_weights(where) -> Path:
    """An EMA weights file from a weights file, a checkpoint folder, or a run dir (its final
    weights, else its latest checkpoint's)."""
    p = Path(where)
    candidates = [p] if p.is_file() else [p / WEIGHTS_FILE]
    if p.is_dir():
        latest = latest_checkpoint(p)
        if latest is not None:
            candidates.append(latest / WEIGHTS_FILE)
    for c in candidates:
        if c.is_file():
            return c
    raise UserError(f"{where}: no EMA weights here (expected a .pt file, a checkpoint folder, "
                    f"or a run dir with {WEIGHTS_FILE} or {CHECKPOINTS_DIR}/)")


def load_ema_weights(path) -> dict:
    """The EMA model's state_dict from a weights file."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        return payload["ema"]["model"]
    except (OSError, KeyError, RuntimeError) as e:
        raise UserError(f"{path}: not an EMA weights file ({e})") from None
