"""A small FashionMNIST CNN; its penultimate layer gives the features for FID, KID and memorisation.

Inception features are made for 299x299 RGB photographs; on 28x28 grey clothes a classifier
trained on the data itself separates what matters here (the fast.ai course reports FID this
way: real vs train 1.91 on 2048 images). Numbers from different classifiers do not compare, so
every cache derived from the classifier is keyed by the checkpoint's sha256.

Files, in the classifier dir (default <data.dir>/classifier/):
  classifier.pt   {"arch", "feature_dim", "state_dict"}
  metrics.json    written last: sha256 of classifier.pt, the training settings, test accuracy.
A checkpoint counts as cached when metrics.json exists, names classifier.pt's sha256, and was
trained with the requested settings; anything else is retrained (classifier.force=true always).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dipddpm.config import Config, UserError
from dipddpm.data import load_split
from dipddpm.data.shards import sha256_file
from dipddpm.evaluate.fid import cache_tag
from dipddpm.progress import bar
from dipddpm.runs import atomic_path, atomic_write_json, read_json

ARCH = "fashion-cnn-v1"
CHECKPOINT = "classifier.pt"
METRICS = "metrics.json"


class FashionCNN(nn.Module):
    """conv16-pool-conv32-pool-fc(feature_dim)-fc10: ~0.2M params, 1.2M MACs per image.

    Kept this small so that training it is a few CPU minutes; ~90% test accuracy in 2 epochs.
    """

    def __init__(self, feature_dim: int = 128, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 7 * 7, feature_dim), nn.ReLU(),
        )
        self.drop = nn.Dropout(0.25)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.body(x)))


def to_input(images) -> torch.Tensor:
    """uint8 [N,28,28] (array or tensor) -> float32 [N,1,28,28] in [-1,1]; floats pass, clamped.

    Float input is taken to be in [-1, 1] (the diffusion convention), shape [N,1,28,28].
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if images.dtype == torch.uint8:
        if images.dim() == 3:
            images = images.unsqueeze(1)
        return images.float().div(127.5).sub(1.0)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    return images.float().clamp(-1.0, 1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1,1] float [N,1,28,28] -> uint8 [N,28,28], the rounding a PNG of the sample would get."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.reshape(x.shape[0], *x.shape[-2:]).cpu().numpy()


def classifier_dir(cfg: Config) -> Path:
    return Path(cfg.classifier.dir or Path(cfg.data.dir) / "classifier")


def training_settings(cfg: Config) -> dict:
    c = cfg.classifier
    return {"arch": ARCH, "epochs": c.epochs, "max_steps": c.max_steps,
            "batch_size": c.batch_size, "lr": c.lr, "feature_dim": c.feature_dim,
            "seed": cfg.run.seed}


@dataclass
class Classifier:
    """A loaded, verified classifier: the model (eval mode), its checkpoint's sha256, its dir."""

    model: FashionCNN
    sha256: str
    dir: Path
    metrics: dict

    @torch.no_grad()
    def features(self, images, batch_size: int = 1000) -> np.ndarray:
        """Penultimate-layer features, float32 [N, feature_dim]."""
        x = to_input(images)
        device = next(self.model.parameters()).device
        out = [self.model.features(x[i:i + batch_size].to(device)).cpu()
               for i in range(0, len(x), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.model.head.in_features),
                                                           np.float32)

    @torch.no_grad()
    def predict(self, images, batch_size: int = 1000) -> np.ndarray:
        x = to_input(images)
        device = next(self.model.parameters()).device
        return torch.cat([self.model(x[i:i + batch_size].to(device)).argmax(1).cpu()
                          for i in range(0, len(x), batch_size)]).numpy()


def cached_metrics(folder: Path, settings: dict | None = None) -> dict | None:
    """metrics.json if it verifies against classifier.pt (and matches `settings` when given)."""
    ckpt, metrics_path = folder / CHECKPOINT, folder / METRICS
    if not ckpt.is_file() or not metrics_path.is_file():
        return None
    try:
        metrics = read_json(metrics_path)
    except (OSError, ValueError):
        return None
    if metrics.get("sha256") != sha256_file(ckpt):
        return None
    if settings is not None and metrics.get("settings") != settings:
        return None
    return metrics


def load_classifier(folder, device: str | torch.device = "cpu") -> Classifier:
    """Load and verify the classifier in `folder`; UserError when missing or damaged."""
    folder = Path(folder)
    metrics = cached_metrics(folder)
    if metrics is None:
        raise UserError(f"{folder}: no verified classifier here; run "
                        f"`python -m jobs.train_classifier data.dir=...` first")
    state = torch.load(folder / CHECKPOINT, map_location="cpu", weights_only=True)
    if state.get("arch") != ARCH:
        raise UserError(f"{folder / CHECKPOINT}: arch {state.get('arch')!r}, expected {ARCH!r}; "
                        f"retrain with classifier.force=true")
    model = FashionCNN(int(state["feature_dim"]))
    model.load_state_dict(state["state_dict"])
    model.to(device).eval()
    return Classifier(model, metrics["sha256"], folder, metrics)


@torch.no_grad()
def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray,
             batch_size: int = 1000) -> float:
    model.eval()
    x = to_input(images)
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i:i + batch_size]).argmax(1).numpy()
                        == labels[i:i + batch_size]).sum())
    return correct / max(len(x), 1)


def train_classifier(cfg: Config, log=print, tracker=None) -> dict:
    """Train (or reuse) the classifier for cfg.data.dir; return its metrics.json contents.

    A bar counts the epochs (dipddpm.progress); every 100 steps (and at the last) the mean
    loss goes to `tracker` (a dipddpm.tracking.Tracker) with images_seen and epoch."""
    folder = classifier_dir(cfg)
    settings = training_settings(cfg)
    if not cfg.classifier.force:
        cached = cached_metrics(folder, settings)
        if cached is not None:
            log(f"classifier: reusing {folder / CHECKPOINT} "
                f"(test accuracy {cached['test_accuracy']:.4f}; classifier.force=true retrains)")
            return {**cached, "reused": True}

    c = cfg.classifier
    train_x, train_y, _ = load_split(cfg.data.dir, "train")
    test_x, test_y, _ = load_split(cfg.data.dir, "test")
    torch.manual_seed(cfg.run.seed)
    gen = torch.Generator().manual_seed(cfg.run.seed)
    model = FashionCNN(c.feature_dim)
    opt = torch.optim.Adam(model.parameters(), lr=c.lr)
    x_all, y_all = to_input(train_x), torch.from_numpy(train_y)
    n = len(x_all)
    steps_per_epoch = max(n // c.batch_size, 1)  # drop the ragged last batch: BatchNorm
    total = int(round(c.epochs * steps_per_epoch)) if c.epochs > 0 else c.max_steps
    if c.max_steps is not None:
        total = min(total, c.max_steps)
    total = max(total, 1)
    log(f"classifier: training {total} steps of {c.batch_size} on {n} images")
    start, step, loss_sum = time.time(), 0, 0.0
    model.train()
    epochs_bar = bar(math.ceil(total / steps_per_epoch), "classifier", unit="epoch")
    while step < total:
        if step:
            epochs_bar.update(1)
        order = torch.randperm(n, generator=gen)
        for i in range(steps_per_epoch):
            if step >= total:
                break
            idx = order[i * c.batch_size:(i + 1) * c.batch_size]
            loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item()
            step += 1
            if step % 100 == 0 or step == total:
                mean = loss_sum / (step % 100 or 100)
                epochs_bar.set_postfix(step=f"{step}/{total}", loss=f"{mean:.4f}")
                if tracker is not None:
                    tracker.log({"images_seen": step * c.batch_size, "loss": mean,
                                 "epoch": step / steps_per_epoch,
                                 "img_per_s": step * c.batch_size / (time.time() - start)}, step)
                loss_sum = 0.0
    epochs_bar.update(1)
    epochs_bar.close()
    seconds = time.time() - start
    acc = accuracy(model, test_x, test_y)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / CHECKPOINT) as tmp:
        torch.save({"arch": ARCH, "feature_dim": c.feature_dim,
                    "state_dict": model.state_dict()}, tmp)
    metrics = {"sha256": sha256_file(folder / CHECKPOINT), "settings": settings,
               "test_accuracy": acc, "test_images": int(len(test_x)),
               "train_images_seen": step * c.batch_size, "steps": step,
               "train_seconds": round(seconds, 2)}
    atomic_write_json(folder / METRICS, metrics)  # last: marks the checkpoint complete
    _drop_stale_caches(folder, metrics["sha256"])
    log(f"classifier: test accuracy {acc:.4f} on {len(test_x)} images, "
        f"{seconds:.1f} s; wrote {folder / CHECKPOINT}")
    return {**metrics, "reused": False}


def _drop_stale_caches(folder: Path, sha: str) -> None:
    """Feature caches of an older checkpoint can never be used again: remove them."""
    for path in folder.glob("cache-*"):
        if cache_tag(sha) not in path.name:
            path.unlink(missing_ok=True)
