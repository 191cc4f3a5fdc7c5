"""Optional Inception FID: torchvision's inception_v3 with weights from a file the user gives.

Off unless `classifier.inception_weights` names a state dict file, e.g. torchvision's ImageNet
checkpoint `inception_v3_google-0cc3c7bd.pth` (downloaded once; nothing here fetches it). No
torchmetrics or torch-fidelity: the network is torchvision's, the math is `fid.py`'s.

Not the published FID: the standard FID (pytorch-fid, torch-fidelity, TF's original) uses the
TF-ported `pt_inception-2015-12-05` weights, whose graph differs slightly from torchvision's
port, so numbers from torchvision's weights are close to but not identical with published
Inception FIDs. And on 28x28 grey clothes upsampled to 299x299 Inception sees photographs it
was never trained on: the project's classifier FID (`fid.py`) stays the reported measure; this
one is for readers who want a number on the familiar scale.

Features: the 2048-d pool output (fc replaced by Identity) of the images resized bilinearly to
299x299, the grey channel repeated to RGB and ImageNet-normalised. The network is built with
transform_input=True, as torchvision builds it for this checkpoint, so that ImageNet-normalised
input reaches the first conv as the [-1, 1] the Google weights were trained on. A checkpoint's
AuxLogits and fc tensors are dropped (neither touches the pool features); every other tensor
must load, strictly.

Cache, beside the classifier caches (classifier.dir) and keyed by the weights file's sha256 and
the number of reference images:
  inception-<sha16>-train-stats-n<N>.npz   (mu, sigma, n, sha256) of the first N train images
Its name does not start with `cache-`, so retraining the classifier (which drops the `cache-*`
files of the old checkpoint) keeps it: it does not depend on the classifier.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dipddpm.config import ConfigError
from dipddpm.evaluate.classifier import _load_split, sha256_file, to_input
from dipddpm.evaluate.fid import cached_stats, feature_stats, frechet_distance

KEY = "classifier.inception_weights"
SIZE = 299
FEATURE_DIM = 2048
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
_DROPPED = ("AuxLogits.", "fc.")


@dataclass
class Inception:
    """A loaded inception_v3 (eval mode, fc = Identity), its weights file and that file's sha256."""

    model: nn.Module
    path: Path
    sha256: str
    batch_size: int = 32

    @torch.no_grad()
    def features(self, images) -> np.ndarray:
        """Pool features, float32 [N, 2048], of uint8 [N,28,28] or [-1,1] floats [N,1,28,28]."""
        x = to_input(images)
        device = next(self.model.parameters()).device
        mean = torch.tensor(_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(_STD, device=device).view(1, 3, 1, 1)
        out = []
        for i in range(0, len(x), self.batch_size):
            b = x[i:i + self.batch_size].to(device).add(1).div(2)  # [0, 1], as torchvision expects
            b = F.interpolate(b, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
            out.append(self.model((b.expand(-1, 3, -1, -1) - mean) / std).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, FEATURE_DIM), np.float32)


def load_inception(path, device: str | torch.device = "cpu", batch_size: int = 32) -> Inception:
    """inception_v3 with the state dict in `path`; ConfigError naming the key and path if the
    file is missing, unreadable, or not an inception_v3 state dict."""
    from torchvision.models import inception_v3

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{KEY} = {str(path)!r}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and tensor errors alike: the file is not a state dict
        raise ConfigError(f"{KEY} = {str(path)!r}: cannot load it with torch.load "
                          f"({type(e).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{KEY} = {str(path)!r}: not a state dict of tensors")
    state = {k: v for k, v in state.items() if not k.startswith(_DROPPED)}
    model = inception_v3(weights=None, aux_logits=False, init_weights=False,
                         transform_input=True)
    model.fc = nn.Identity()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise ConfigError(f"{KEY} = {str(path)!r}: does not load into torchvision's "
                          f"inception_v3 ({first[:200]})") from None
    model.to(device).eval()
    return Inception(model, path, sha256_file(path), batch_size)


def train_stats(inc: Inception, data_dir, cache_dir,
                num: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, n) of the Inception features of the first `num` train images, cached."""
    path = Path(cache_dir) / f"inception-{inc.sha256[:16]}-train-stats-n{num}.npz"

    def features():
        images, _, _ = _load_split(data_dir, "train")
        # FashionMNIST's train order is already shuffled across classes: the first N are a
        # fair sample, and the same N for every run
        return inc.features(images[:num])

    return cached_stats(path, inc.sha256, features)


def inception_fid(inc: Inception, data_dir, cache_dir, images, ref_num: int) -> float:
    """FID of `images` against the cached train reference, on Inception pool features."""
    mu, sigma, _ = train_stats(inc, data_dir, cache_dir, ref_num)
    return frechet_distance(*feature_stats(inc.features(images)), mu, sigma)


def floor_fid(inc: Inception, data_dir, cache_dir, n: int, ref_num: int, seed: int = 0) -> float:
    """The Inception FID of N real test images against the train reference: the floor to quote
    beside a sample's. The same N test images as `fid.real_vs_real_floor` picks for its
    fid_vs_train (same seed, same draw), so both floors describe one set."""
    test, _, _ = _load_split(data_dir, "test")
    if not 2 <= n <= len(test):
        raise ConfigError(f"Inception floor: N = {n} must be in 2..{len(test)} "
                          f"(the test split holds {len(test)} images)")
    idx = np.random.default_rng(seed).choice(len(test), n, replace=False)
    return inception_fid(inc, data_dir, cache_dir, test[idx], ref_num)
