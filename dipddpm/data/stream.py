"""Streaming the shards: split by rank and by dataloader worker, shuffled per epoch.

Who reads what, for a given (seed, epoch):
  1. the split's shard list is shuffled with Random(seed, epoch), identically on every rank;
  2. rank r takes shards[r::world_size]; worker w of that rank takes those[w::num_workers];
  3. each worker shuffles its samples through a buffer seeded by (seed, epoch, rank, worker).
So the order is a pure function of (seed, epoch, world_size, num_workers): a resumed run can
replay it and skip the batches it already consumed.

Exactly once: when the shards all hold the same number of samples and their count is
divisible by world_size x num_workers, every sample is seen once per epoch across ranks.
Otherwise ranks would hold different sample counts, and DDP hangs when one rank runs out of
batches first; so every rank computes all ranks' batch counts from the manifest and stops
at the smallest. The samples past that point on the larger ranks are skipped for this epoch
(a different set each epoch, since the shard order is reshuffled).

The loader is deliberately not an `accelerator.prepare()` object: a prepared loader hands each
process only its share of the batches, so a stream already split by rank would be split a
second time and every rank would train on a fraction of its own shards.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import math
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dipddpm.data.idx import DataError
from dipddpm.data.shards import checked_shards, rebuild_hint, shard_samples, split_entries


def epoch_seed(*parts: int) -> int:
    """One 63-bit seed from several integers (stable across processes and Python runs)."""
    return int.from_bytes(
        hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def assign_shards(shards: list, *, seed: int, epoch: int, rank: int, world_size: int,
                  worker: int, num_workers: int) -> list:
    order = list(shards)
    random.Random(epoch_seed(seed, epoch)).shuffle(order)
    return order[rank::world_size][worker::max(num_workers, 1)]


def _batches_for(counts: list[int], batch_size: int) -> int:
    return math.ceil(sum(counts) / batch_size) if counts else 0


def rank_batches(shards: list[dict], batch_size: int, *, seed: int, epoch: int, rank: int,
                 world_size: int, num_workers: int) -> int:
    """Batches rank `rank` would produce: each worker batches its own samples."""
    return sum(
        _batches_for([e["count"] for e in assign_shards(
            shards, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
            worker=w, num_workers=num_workers)], batch_size)
        for w in range(max(num_workers, 1)))


def _shuffled(samples, bufsize: int, rng: random.Random):
    """Reservoir-style buffer shuffle: deterministic for a given rng."""
    if bufsize <= 1:
        yield from samples
        return
    buf = []
    for s in samples:
        if len(buf) < bufsize:
            buf.append(s)
            continue
        i = rng.randrange(len(buf))
        buf[i], s = s, buf[i]
        yield s
    rng.shuffle(buf)
    yield from buf


class ShardStream(IterableDataset):
    """Yields uint8 batches {"image": [B,28,28], "label": [B], "key": [...]} of one rank."""

    def __init__(self, data_dir, shards: list[dict], batch_size: int, *, seed: int, epoch: int,
                 rank: int, world_size: int, num_workers: int, shuffle_buffer: int):
        self.data_dir = Path(data_dir)
        self.shards = shards
        self.batch_size = batch_size
        self.seed, self.epoch = seed, epoch
        self.rank, self.world_size = rank, world_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        mine = assign_shards(self.shards, seed=self.seed, epoch=self.epoch, rank=self.rank,
                             world_size=self.world_size, worker=worker,
                             num_workers=self.num_workers)
        samples = shard_samples(self.data_dir, mine, rebuild_hint(self.data_dir))
        rng = random.Random(epoch_seed(self.seed, self.epoch, self.rank, worker))
        samples = _shuffled(samples, self.shuffle_buffer, rng)
        while True:
            chunk = list(itertools.islice(samples, self.batch_size))
            if not chunk:
                return
            yield {
                "image": torch.from_numpy(np.stack([np.load(io.BytesIO(s["npy"])) for s in chunk])),
                "label": torch.tensor([int(s["cls"]) for s in chunk], dtype=torch.int64),
                "key": [s["__key__"] for s in chunk],
            }


class EpochLoader:
    """One epoch of one rank: `len()` batches, images float32 [B,1,28,28] in [-1, 1]."""

    def __init__(self, data_dir, split: str, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, seed: int = 0, epoch: int = 0,
                 shuffle_buffer: int = 0, skip_batches: int = 0):
        shards = split_entries(data_dir, split)  # checked against the manifest
        self.data_dir, self.split = data_dir, split
        common = dict(seed=seed, epoch=epoch, world_size=world_size, num_workers=num_workers)
        self.num_batches = min(rank_batches(shards, batch_size, rank=r, **common)
                               for r in range(world_size))
        self.skip_batches = skip_batches
        self.dataset = ShardStream(data_dir, shards, batch_size, rank=rank,
                                   shuffle_buffer=shuffle_buffer, **common)
        self.num_workers = num_workers

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                            prefetch_factor=4 if self.num_workers else None)
        batches = itertools.islice(loader, self.skip_batches, self.num_batches)
        n = self.skip_batches
        try:
            for batch in batches:
                n += 1
                image = batch["image"].unsqueeze(1).float().div_(127.5).sub_(1.0)
                yield {"image": image, "label": batch["label"], "key": batch["key"]}
        except DataError as e:  # from a worker, torch wraps it in its traceback: keep our line
            raise DataError(str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1]) \
                from None
        if n < self.num_batches:
            raise DataError(f"{self.data_dir}: the {self.split} split ended after {n} of "
                            f"{self.num_batches} batches; {rebuild_hint(self.data_dir)}")


def make_loader(data_dir, split: str, batch_size: int, *, rank: int = 0, world_size: int = 1,
                num_workers: int = 0, seed: int = 0, epoch: int = 0, shuffle_buffer: int = 0,
                skip_batches: int = 0) -> EpochLoader:
    return EpochLoader(data_dir, split, batch_size, rank=rank, world_size=world_size,
                       num_workers=num_workers, seed=seed, epoch=epoch,
                       shuffle_buffer=shuffle_buffer, skip_batches=skip_batches)


def batches_per_epoch(data_dir, split: str, batch_size: int, *, rank: int = 0,
                      world_size: int = 1, num_workers: int = 0, seed: int = 0, epoch: int = 0,
                      shuffle_buffer: int = 0) -> int:
    return len(make_loader(data_dir, split, batch_size, rank=rank, world_size=world_size,
                           num_workers=num_workers, seed=seed, epoch=epoch,
                           shuffle_buffer=shuffle_buffer))


def read_shards(data_dir, entries: list[dict]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every sample of the given shards (manifest entries of data_dir), in file order, checked
    against the manifest: (images uint8, labels, keys)."""
    hint = rebuild_hint(data_dir)
    images, labels, keys = [], [], []
    for s in shard_samples(data_dir, checked_shards(data_dir, entries, hint), hint):
        images.append(np.load(io.BytesIO(s["npy"])))
        labels.append(int(s["cls"]))
        keys.append(s["__key__"])
    return np.stack(images), np.asarray(labels, dtype=np.int64), keys


def load_split(data_dir, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every sample of a split in index order: (images uint8 [N,28,28], labels int64, keys).
    A bad manifest or shard is a one-line DataError (see read_shards), and so is any other
    failure to read the files (permissions, a disk error)."""
    try:
        return read_shards(data_dir, split_entries(data_dir, split))
    except OSError as e:
        raise DataError(f"{data_dir}: cannot read the {split} split: {e}") from None
