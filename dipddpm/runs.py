"""The run-dir layout in one place, atomic writes, and seeding.

Every artifact is written to a temporary name in the same folder and renamed, so a reader
(or a rerun after a kill) never sees a half-written file under its final name.

A run dir belongs to one setting. `prepare_run_dir` compares the config.yaml a run dir already
holds with the new resolved config before anything is written: keys that change results (the
schema's plain keys; see `dipddpm.config`) must match, or the job stops with one line naming
each key and both values; neutral keys and lengthened runs are allowed, appended to
`config_changes.jsonl`, and config.yaml is then rewritten.
"""
from __future__ import annotations

import fcntl
import json
import os
import platform
import random
import sys
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import yaml

from dipddpm.config import Config, ConfigError, UserError, compare_configs, dump_config

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
SAMPLES_DIR = "samples"
CHECKPOINTS_DIR = "checkpoints"
CONFIG_CHANGES_FILE = "config_changes.jsonl"  # one line per rerun that changed allowed keys
STAGE_FILE = "stage.json"  # a study stage's record, written when its job finished
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


@contextmanager
def run_dir_lock(run_dir) -> Iterator[bool]:
    """Hold the run dir for this process: an exclusive flock on `<run_dir>.lock`, beside it.
    A second process (a `--only` run beside a study, a duplicated array task) waits here with
    one line instead of writing into the same run dir. The kernel drops the lock when its
    holder ends, however it ends, so a killed job never leaves a stale lock. Yields whether it
    had to wait: the caller then checks whether the other process finished the work.
    Not reentrant: a second hold of the same run dir in one process waits for ever. On a file
    system without flock (some NFS mounts) it says so in one line and holds nothing."""
    run_dir = Path(run_dir).absolute()
    path = run_dir.with_name(run_dir.name + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        locked = True
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            waited = False
        except BlockingIOError:
            print(f"{run_dir}: in use by another process; waiting for it", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
            waited = True
        except OSError as e:  # no flock here: run unguarded rather than not at all
            print(f"warning: {path}: cannot lock ({e.strerror}); two processes could write "
                  f"this run dir at once", file=sys.stderr, flush=True)
            locked, waited = False, False
        try:
            yield waited
        finally:
            if locked:
                fcntl.flock(f, fcntl.LOCK_UN)


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


def ensure_dir(path, key: str, create: bool = True) -> Path:
    """`path` as a directory (made when `create`), or one line naming `key` when it is (or lies
    under) something that is not a directory."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{key} = {str(path)!r}: exists and is not a directory")
    above = next((p for p in path.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise UserError(f"{key} = {str(path)!r}: {str(above)!r} is not a directory")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{key} = {str(path)!r}: cannot create the directory "
                            f"({e.strerror}{': ' + e.filename if e.filename else ''})") from None
    return path


def stored_config(run_dir) -> Optional[dict]:
    """The config.yaml a run dir holds (a dict), or None when it has none."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        tree = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: unreadable ({type(e).__name__}); use a new run.dir, or "
                          f"delete {path.parent} to start over") from None
    return tree if isinstance(tree, dict) else {}


def check_run_dir(cfg: Config, reads: Optional[Iterable[str]] = None):
    """Refuse (ConfigError, one line) when run.dir holds a run whose config differs from cfg in
    a key that changes results; `reads`: the keys (sections or dotted keys) the job's results
    depend on, None = all. Returns the allowed changes {key: [old, new]} (empty for a new dir)."""
    run_dir = Path(cfg.run.dir)
    stored = stored_config(run_dir)
    if stored is None:
        return {}
    changes = compare_configs(stored, cfg, reads)
    if changes.refused:
        raise ConfigError(f"run.dir = {str(run_dir)!r} holds a run of other settings: "
                          f"{'; '.join(changes.refused)}; use a new run.dir, or delete "
                          f"{run_dir} to start over")
    return changes.allowed


def prepare_run_dir(cfg: Config, main_process: bool = True, *,
                    reads: Optional[Iterable[str]] = None) -> Path:
    """Create run.dir, check it against the config it holds (`check_run_dir`), then write the
    resolved config, before any work starts. Every process checks; only the main one writes."""
    run_dir = ensure_dir(cfg.run.dir, "run.dir", create=main_process)
    allowed = check_run_dir(cfg, reads)
    if main_process:
        if allowed:
            append_jsonl(run_dir / CONFIG_CHANGES_FILE,
                         {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                          "changes": allowed})
        atomic_write_text(run_dir / CONFIG_FILE, dump_config(cfg))
    return run_dir


def seed_everything(seed: int) -> None:
    import torch  # here, not at the top: keeps `import dipddpm.runs` cheap for light jobs

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> str:
    """One line for a record of where a run ran: CPU model, cores, OS, torch and any GPU."""
    import torch  # here, not at the top, as in seed_everything

    gpu = (f", GPU {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}"
           if torch.cuda.is_available() else ", no GPU")
    return (f"CPU {cpu_model()}, {os.cpu_count()} cores{gpu}; {platform.system()} "
            f"{platform.release()}; Python {platform.python_version()}, torch {torch.__version__}")
