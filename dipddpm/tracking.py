"""One logger for every job: metrics.jsonl (the source of truth) and W&B together.

metrics.jsonl is what reports read, so it is written whatever W&B does (also when
`wandb.mode: disabled`). W&B is offline by default and keeps every file under the run dir;
a resumed job reuses the run id stored in `wandb_id.txt` so it continues the same W&B run.
`read_wandb_offline` reads an offline run back without W&B's servers (tests, and a check
that W&B saw what metrics.jsonl says).

wandb is imported only inside the Tracker: `import dipddpm.tracking` stays cheap.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import string
import struct
import time
import warnings
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from dipddpm.runs import METRICS_FILE, append_jsonl, atomic_write_text

if TYPE_CHECKING:
    from dipddpm.config import Config

WANDB_DIR = "wandb"  # run_dir/wandb: everything W&B writes, see DESIGN.md "Run dir"
WANDB_ID_FILE = "wandb_id.txt"
_RUN_DIRS = (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"))
# Read once, before any Tracker sets them: only these are the user's own choices.
_USER_SET = {var for var, _ in _RUN_DIRS if var in os.environ}


def _run_id(run_dir: Path) -> str:
    """The run dir's W&B id, created once, so every resume of the job logs to the same run."""
    path = run_dir / WANDB_ID_FILE
    if path.exists():
        run_id = path.read_text().strip()
        if run_id:
            return run_id
    alphabet = string.ascii_lowercase + string.digits  # the alphabet of W&B's own ids
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    atomic_write_text(path, run_id + "\n")
    return run_id


def _plain(value: Any) -> Any:
    """Tensors and numpy scalars -> Python numbers, so json.dumps and W&B see the same value."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value


class Tracker:
    """Writes `run_dir/metrics.jsonl` and logs to W&B; `enabled=False` (non-main ranks) is a no-op."""

    def __init__(self, run_dir, cfg: "Config", job_type: str, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._run = None
        self._wandb = None
        self._last_step = 0
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        w = cfg.wandb
        if w.mode == "disabled":
            return  # metrics.jsonl only; wandb is not even imported

        wandb_dir = self.run_dir / WANDB_DIR
        wandb_dir.mkdir(parents=True, exist_ok=True)
        # W&B's config/cache/data dirs default to the home folder; a user who set them keeps
        # theirs (e.g. a shared artifact cache), otherwise they live with this run, also when
        # an earlier Tracker in the same process pointed them at its own run.
        for var, sub in _RUN_DIRS:
            if var not in _USER_SET:
                os.environ[var] = str(wandb_dir / sub)
        os.environ.setdefault("WANDB_SILENT", "true")

        import wandb  # late: slow import, and only the main rank with W&B on pays it

        self._wandb = wandb
        self._run = wandb.init(
            dir=str(self.run_dir),  # wandb appends "wandb/" itself
            project=w.project,
            entity=w.entity or None,
            group=w.group or None,
            job_type=w.job_type or job_type,
            name=w.name or self.run_dir.resolve().name,
            tags=list(w.tags) or None,
            config=cfg.to_dict(),
            id=_run_id(self.run_dir),
            resume="allow",
            mode=w.mode,
            # console="off": W&B would otherwise wrap stdout/stderr, which garbles job logs
            settings=wandb.Settings(silent=True, console="off", disable_git=True),
        )
        self._last_step = self._run.step

    # -------------------------------------------------------------------------- logging

    def log(self, metrics: dict, step: int) -> None:
        """One line in metrics.jsonl ({"step": step, **metrics}) and one W&B history step."""
        if not self.enabled:
            return
        metrics = {k: _plain(v) for k, v in metrics.items()}
        append_jsonl(self.metrics_path, {"step": int(step), **metrics})
        self._last_step = max(self._last_step, int(step))
        if self._run is not None:
            self._run.log(metrics, step=int(step))

    def log_image(self, key: str, png_path, step: int) -> None:
        """Log a PNG already written to the run dir (the file there is the artifact; W&B copies it)."""
        if not self.enabled or self._run is None:
            return
        self._last_step = max(self._last_step, int(step))
        self._run.log({key: self._wandb.Image(str(png_path))}, step=int(step))

    def log_table(self, key: str, columns: list, rows: list, step: Optional[int] = None) -> None:
        """A W&B table; without `step` it joins the latest step, so it never moves W&B's step on."""
        if not self.enabled or self._run is None:
            return
        table = self._wandb.Table(columns=list(columns), data=[list(r) for r in rows])
        step = self._last_step if step is None else int(step)
        self._last_step = max(self._last_step, step)
        self._run.log({key: table}, step=step)

    def summary(self, values: dict) -> None:
        if not self.enabled or self._run is None:
            return
        self._run.summary.update({k: _plain(v) for k, v in values.items()})

    def finish(self, exit_code: int = 0) -> None:
        if self._run is not None:
            run, self._run = self._run, None
            wandb_file = Path(run.dir).parent / f"run-{run.id}.wandb"
            run.finish(exit_code=exit_code)
            # wandb-core writes the last history step and the exit record after finish()
            # returns; wait for them so whatever runs next (a reader, a sync) sees the whole run.
            _wait_for_exit_record(wandb_file)
            # W&B reads its config/cache/data dirs once per process, at its first init: a
            # teardown makes the next Tracker in this process (a test, a study running several
            # jobs) read them again and keep its files with its own run.
            self._wandb.teardown()

    @property
    def run_id(self) -> Optional[str]:
        return self._run.id if self._run is not None else None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)


# ----------------------------------------------------------------------------- reading back
# The .wandb file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of records;
# a record larger than what is left of a block is split into FIRST/MIDDLE/LAST pieces, and a
# block tail too short for a record header is zero padding.

_FILE_HEADER = struct.Struct("<4sHB")  # ":W&B", magic 0xBEE1, version 0
_RECORD_HEADER = struct.Struct("<IHB")  # crc32(type byte + data), data length, type
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


class WandbFileError(ValueError):
    """A .wandb file that is not one, or whose bytes do not match their checksum."""


def iter_wandb_records(path):
    """Yield each record payload (bytes) of a .wandb file; a torn tail (a killed writer) ends it."""
    data = Path(path).read_bytes()
    if len(data) < _FILE_HEADER.size:
        raise WandbFileError(f"{path}: too short for a .wandb header ({len(data)} bytes)")
    ident, magic, version = _FILE_HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1 or version != 0:
        raise WandbFileError(f"{path}: not a .wandb file (header {data[:7]!r})")
    pos, pieces = _FILE_HEADER.size, None
    while pos < len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _RECORD_HEADER.size:
            pos += left_in_block  # padding
            continue
        if pos + _RECORD_HEADER.size > len(data):
            return
        crc, length, kind = _RECORD_HEADER.unpack_from(data, pos)
        start = pos + _RECORD_HEADER.size
        if crc == 0 and length == 0 and kind == 0:
            pos += left_in_block  # zero-filled rest of a block
            continue
        if start + length > len(data):
            return
        payload = data[start:start + length]
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise WandbFileError(f"{path}: checksum mismatch in the record at byte {pos}")
        pos = start + length
        if kind == _FULL:
            yield payload
        elif kind == _FIRST:
            pieces = [payload]
        elif kind in (_MIDDLE, _LAST):
            if pieces is None:
                raise WandbFileError(f"{path}: record piece without a start at byte {pos}")
            pieces.append(payload)
            if kind == _LAST:
                yield b"".join(pieces)
                pieces = None
        else:
            raise WandbFileError(f"{path}: unknown record type {kind} at byte {pos}")


def _wait_for_exit_record(path: Path, timeout_s: float = 30.0) -> bool:
    from wandb.proto import wandb_internal_pb2

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        last = None
        try:
            for last in iter_wandb_records(path):
                pass
        except (OSError, WandbFileError):
            last = None  # not there yet, or caught mid-write
        if last is not None:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(last)
            if record.WhichOneof("record_type") == "exit":
                return True
        time.sleep(0.05)
    warnings.warn(f"{path}: no exit record {timeout_s:.0f} s after wandb finish(); W&B may lag")
    return False


def _set(tree: dict, item) -> None:
    """W&B stores a logged nested dict (an image's metadata too) as one item per leaf with a
    nested_key path; put it back as the nested dict that was logged."""
    value = json.loads(item.value_json)
    if item.key:
        tree[item.key] = value
        return
    *parents, leaf = item.nested_key
    for name in parents:
        tree = tree.setdefault(name, {})
    tree[leaf] = value


def _drop(tree: dict, item) -> None:
    path = [item.key] if item.key else list(item.nested_key)
    for name in path[:-1]:
        tree = tree.get(name, {})
    tree.pop(path[-1], None)


def _apply(tree: dict, record) -> None:
    for item in record.update:
        _set(tree, item)
    for item in record.remove:
        _drop(tree, item)


def read_wandb_offline(run_dir) -> dict:
    """Read every offline `run-*.wandb` under run_dir (oldest first, so a resumed run follows on).

    Returns {"run_id", "history": [{"_step": n, key: value, ...} per step],
    "config": the run config without W&B's own "_wandb" entry, "summary": {...},
    "files": the .wandb paths read}. A logged image or table reads back as W&B's dict for
    it; its "path" is relative to the `files/` folder beside the .wandb file.
    """
    from wandb.proto import wandb_internal_pb2  # late: only readers pay for protobuf

    def started(path):  # folders are named (offline-)run-YYYYMMDD_HHMMSS-<id>
        m = re.search(r"run-(\d{8}_\d{6})-", path.parent.name)
        return (m.group(1) if m else "", path.stat().st_mtime)

    files = sorted(Path(run_dir).glob(f"{WANDB_DIR}/*run-*/run-*.wandb"), key=started)
    out = {"run_id": None, "history": [], "config": {}, "summary": {}, "files": [str(f) for f in files]}
    for path in files:
        for payload in iter_wandb_records(path):
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(payload)
            except Exception as e:  # protobuf's DecodeError, kept generic across versions
                raise WandbFileError(f"{path}: a record does not parse ({e})") from e
            kind = record.WhichOneof("record_type")
            if kind == "run":
                out["run_id"] = record.run.run_id
                _apply(out["config"], record.run.config)
            elif kind == "config":
                _apply(out["config"], record.config)
            elif kind == "history":
                row: dict = {}
                for item in record.history.item:
                    _set(row, item)
                out["history"].append(row)
            elif kind == "summary":
                _apply(out["summary"], record.summary)
    out["config"].pop("_wandb", None)
    return out
