"""The run-dir layout in one place, atomic writes, and seeding.

Every artifact is written to a temporary name in the same folder and renamed, so a reader
(or a rerun after a kill) never sees a half-written file under its final name.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from dipddpm.config import Config, dump_config

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
SAMPLES_DIR = "samples"
CHECKPOINTS_DIR = "checkpoints"
_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: os.umask can only be read by setting it


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; others on a cluster must read it
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path):
    with open(path) as f:
        return json.load(f)


def append_jsonl(path, record: dict) -> None:
    """One line per record; a line is written whole with one write() call."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path) -> list[dict]:
    """Read a JSONL file, ignoring a torn last line left by a kill."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


def prepare_run_dir(cfg: Config, main_process: bool = True) -> Path:
    """Create run.dir and write the resolved config first, before any work starts."""
    run_dir = Path(cfg.run.dir)
    if main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / CONFIG_FILE, dump_config(cfg))
    return run_dir


def seed_everything(seed: int) -> None:
    import torch  # here, not at the top: keeps `import dipddpm.runs` cheap for light jobs

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
