"""Reading FashionMNIST: the four standard IDX files (.gz or not), or torchvision's download.

IDX is tiny and strict: a big-endian magic (0x00000803 for uint8 images of rank 3,
0x00000801 for uint8 labels of rank 1), the dimensions, then the bytes. We check every part,
because a truncated download or swapped file otherwise surfaces much later as a bad model.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from dipddpm.config import UserError

SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
NUM_CLASSES = 10
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


class DataError(UserError):
    pass


def _find(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder}: missing {stem}.gz (or {stem})")


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
        raise DataError(f"{path}: unreadable or truncated ({type(e).__name__}: {e})") from None


def read_idx(path: Path, magic: int) -> np.ndarray:
    data = _read_bytes(path)
    rank = magic & 0xFF
    header = 4 + 4 * rank
    if len(data) < header:
        raise DataError(f"{path}: truncated header ({len(data)} bytes)")
    found = struct.unpack(">I", data[:4])[0]
    if found != magic:
        raise DataError(f"{path}: wrong IDX magic number 0x{found:08x}, expected 0x{magic:08x}")
    dims = struct.unpack(f">{rank}I", data[4:header])
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise DataError(f"{path}: {what}: {len(data)} bytes, header {dims} needs {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_split(folder: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 [N,28,28], labels int64 [N]) for 'train' or 'test'."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: data source folder does not exist")
    images_path, labels_path = (_find(folder, stem) for stem in SPLIT_FILES[split])
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC).astype(np.int64)
    if images.shape[1:] != (28, 28):
        raise DataError(f"{images_path}: images are {images.shape[1:]}, expected (28, 28)")
    if len(images) != len(labels):
        raise DataError(f"{labels_path}: {len(labels)} labels for {len(images)} images "
                        f"in {images_path.name}")
    if labels.size and labels.max() >= NUM_CLASSES:
        raise DataError(f"{labels_path}: label {labels.max()} outside 0..{NUM_CLASSES - 1}")
    return images, labels


def read_torchvision_split(root: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's FashionMNIST with download (for machines with internet access)."""
    # late: importing torchvision costs seconds, and only data.source=torchvision needs it
    from torchvision.datasets import FashionMNIST

    try:
        ds = FashionMNIST(str(root), train=(split == "train"), download=True)
    except Exception as e:  # network or checksum failure: one line, not a traceback
        raise DataError(f"torchvision FashionMNIST download into {root} failed: {e}") from None
    return ds.data.numpy().astype(np.uint8), ds.targets.numpy().astype(np.int64)


def resolve_source(source: str) -> str:
    """The source named in the config, else $DIPDDPM_DATA; 'torchvision' is kept as is."""
    source = source or os.environ.get("DIPDDPM_DATA", "")
    if not source:
        raise DataError("data.source: empty; pass --source DIR|torchvision or set DIPDDPM_DATA")
    return source


def read_source(source: str, split: str, download_root: Path) -> tuple[np.ndarray, np.ndarray]:
    if source == "torchvision":
        return read_torchvision_split(download_root, split)
    return read_idx_split(source, split)
