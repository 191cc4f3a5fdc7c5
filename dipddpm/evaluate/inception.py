"""Optional Inception FID on the standard scale: the FID network through torch-fidelity, with its
weights from a local file (nothing is downloaded at run time).

Off unless `classifier.inception_weights` names the weights file. The standard FID weights are
TF's 2015-12-05 Inception as ported to PyTorch: `pt_inception-2015-12-05-6726825d.pth`
(pytorch-fid's release), published by torch-fidelity as
`weights-inception-2015-12-05-6726825d.pth` (the name's `6726825d` is the start of the file's
sha256). Fetch it once on a machine with internet access and name it here; a missing file is a
one-line error, and this project ships no copy. The network and its preprocessing are
torch-fidelity's `FeatureExtractorInceptionV3` (the `inception` extra: `pip install -c
constraints.txt -e ".[inception]"`): uint8 RGB in, TF-1.x-compatible bilinear resize to
299x299, the 2048-d pool features out, as pytorch-fid and torch-fidelity compute FID. The
math on the features is `fid.py`'s.

Only the file whose sha256 starts with 6726825d gives numbers on the published FID scale;
`Inception.standard` says whether the given file is that one, and the generation protocol
records it, so a table can say when a number is not on that scale. Even then: on 28x28 grey
clothes upsampled to 299x299 Inception sees photographs it was never trained on; the project's
classifier FID (`fid.py`) stays the reported measure, and this one is for readers who want a
number on the familiar scale.

Images: uint8 [N,28,28] as stored, or the samplers' [-1,1] floats [N,1,28,28], which are
quantised to uint8 first (round((x+1) * 127.5)), as image files would be; the grey channel is
repeated to RGB.

Cache, beside the classifier caches (classifier.dir) and keyed by the weights file's sha256 and
the number of reference images:
  inception-<sha16>-train-stats-n<N>.npz   (mu, sigma, n, sha256) of the first N train images
Its name does not start with `cache-`, so retraining the classifier (which drops the `cache-*`
files of the old checkpoint) keeps it: it does not depend on the classifier.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dipddpm.config import ConfigError
from dipddpm.data import load_split
from dipddpm.data.shards import sha256_file
from dipddpm.evaluate.classifier import to_input
from dipddpm.evaluate.fid import cached_stats, feature_stats, frechet_distance

KEY = "classifier.inception_weights"
FEATURE_DIM = 2048
STANDARD_SHA256_PREFIX = "6726825d"  # pt_inception-2015-12-05-6726825d.pth
STANDARD_FILE = "pt_inception-2015-12-05-6726825d.pth"


@dataclass
class Inception:
    """torch-fidelity's FID Inception (eval mode), its weights file and that file's sha256."""

    model: nn.Module
    path: Path
    sha256: str
    batch_size: int = 32

    @property
    def standard(self) -> bool:
        """True when the weights are the standard FID weights (published FID scale)."""
        return self.sha256.startswith(STANDARD_SHA256_PREFIX)

    @torch.no_grad()
    def features(self, images) -> np.ndarray:
        """Pool features, float32 [N, 2048], of uint8 [N,28,28] or [-1,1] floats [N,1,28,28]."""
        x = to_input(images)
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(x), self.batch_size):
            b = x[i:i + self.batch_size].add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
            out.append(self.model(b.expand(-1, 3, -1, -1).to(device))[0].float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, FEATURE_DIM), np.float32)


def load_inception(path, device: str | torch.device = "cpu", batch_size: int = 32) -> Inception:
    """torch-fidelity's FeatureExtractorInceptionV3 with the weights in `path`; a one-line
    ConfigError naming the key and path if torch-fidelity is missing, or the file is missing,
    unreadable, or not that network's state dict."""
    path = Path(path)
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ConfigError(f"{KEY} = {str(path)!r}: the Inception FID needs torch-fidelity "
                          "(pip install -c constraints.txt -e \".[inception]\")")
    if not path.is_file():
        raise ConfigError(f"{KEY} = {str(path)!r}: no such file (the standard FID weights "
                          f"{STANDARD_FILE} are never downloaded at run time: fetch them once "
                          "and name the file here)")
    try:  # tensors only: torch-fidelity itself would unpickle anything
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and tensor errors alike: the file is not a state dict
        raise ConfigError(f"{KEY} = {str(path)!r}: cannot load it with torch.load "
                          f"({type(e).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{KEY} = {str(path)!r}: not a state dict of tensors")
    # late: torch-fidelity is the optional `inception` extra
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:
        model = FeatureExtractorInceptionV3("inception-v3-compat", [str(FEATURE_DIM)],
                                            feature_extractor_weights_path=str(path))
    except RuntimeError as e:
        lines = str(e).splitlines()
        first = lines[1].strip() if len(lines) > 1 else str(e)
        raise ConfigError(f"{KEY} = {str(path)!r}: does not load into the FID Inception "
                          f"(torch-fidelity's FeatureExtractorInceptionV3: {first[:200]})") from None
    model.to(device).eval()
    return Inception(model, path, sha256_file(path), batch_size)


def describe(info: dict) -> str:
    """What produced an Inception FID, for tables: `info` is a generation run's
    results["inception"] ({"weights", "sha256", "ref_num", "standard"}; runs made before
    torch-fidelity lack "standard" and used torchvision's inception_v3)."""
    ref = f"against the first {info['ref_num']} train images"
    if "standard" not in info:
        return (f"Inception FID: torchvision inception_v3 pool features {ref} (close to, not "
                f"identical with, published Inception FIDs)")
    if info["standard"]:
        return (f"Inception FID on the standard FID weights ({STANDARD_FILE}, through "
                f"torch-fidelity) {ref}")
    return (f"Inception FID {ref}, on weights that are NOT the standard FID weights (sha256 "
            f"{info['sha256'][:16]}, not {STANDARD_SHA256_PREFIX}...): not on the published "
            f"FID scale")


def train_stats(inc: Inception, data_dir, cache_dir,
                num: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, n) of the Inception features of the first `num` train images, cached."""
    path = Path(cache_dir) / f"inception-{inc.sha256[:16]}-train-stats-n{num}.npz"

    def features():
        images, _, _ = load_split(data_dir, "train")
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
    test, _, _ = load_split(data_dir, "test")
    if not 2 <= n <= len(test):
        raise ConfigError(f"Inception floor: N = {n} must be in 2..{len(test)} "
                          f"(the test split holds {len(test)} images)")
    idx = np.random.default_rng(seed).choice(len(test), n, replace=False)
    return inception_fid(inc, data_dir, cache_dir, test[idx], ref_num)
