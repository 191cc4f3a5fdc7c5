"""The data-preparation job's logic: read and validate the source, then write the shards."""
from __future__ import annotations

import time

from dipddpm.config import Config
from dipddpm.data.idx import CLASS_NAMES, read_source, resolve_source
from dipddpm.data.shards import SPLITS, write_dataset
from dipddpm.runs import ensure_dir


def prepare_data(cfg: Config, progress: bool = True) -> dict:
    """Build cfg.data.dir from cfg.data.source; returns the manifest plus the wall time.

    Everything is read and validated before the first byte is written, so bad input leaves
    the data dir untouched.
    """
    source = resolve_source(cfg.data.source)
    out = ensure_dir(cfg.data.dir, "data.dir (--out)", create=False)
    start = time.perf_counter()
    arrays = {split: read_source(source, split, out / ".download") for split in SPLITS}
    manifest, kept = write_dataset(out, arrays, cfg.data.shard_size, progress=progress)
    # Not persisted: facts about this run, not about the data.
    return dict(manifest, kept_shards=kept, wall_s=round(time.perf_counter() - start, 2))


def summary(manifest: dict) -> str:
    lines = []
    for split, info in manifest["splits"].items():
        per_class = ", ".join(f"{CLASS_NAMES[int(c)]} {n}" for c, n in info["per_class"].items())
        lines.append(f"{split}: {info['count']} images in {len(info['shards'])} shards ({per_class})")
    total = sum(len(info["shards"]) for info in manifest["splits"].values())
    lines.append(f"{manifest['kept_shards']} of {total} shards verified and kept, "
                 f"wall time {manifest['wall_s']:.1f} s")
    return "\n".join(lines)
