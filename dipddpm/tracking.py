"""One logger for every job: metrics.jsonl (the source of truth) and W&B together.

metrics.jsonl is what reports read, so it is written whatever W&B does (also when
`wandb.mode: disabled`). W&B is offline by default and keeps every file under the run dir;
a resumed job reuses the run id stored in `wandb_id.txt` so it continues the same W&B run.
`read_wandb_offline` reads an offline run back without W&B's servers (tests, and a check
that W&B saw what metrics.jsonl says).

Resuming (one mechanism for every job that checkpoints: training, priors, selftest). A job
stores `tracker.rows` (the metrics.jsonl rows written so far) with each checkpoint and, when it
resumes from that checkpoint, passes it back as `Tracker(..., keep_rows=N)`. Rows after the
first N describe work the checkpoint does not hold; the job redoes that work and logs it again,
so they are cut first, and every step appears in metrics.jsonl exactly once, whatever killed
the job (kill -9, scancel, a requeue, a failing node). A line torn by a kill is dropped too.
Then the W&B run gets, in step order, every row of metrics.jsonl it never received: steps the
killed process had not flushed, or logged after W&B failed. W&B keeps one history row per
step and never takes a step twice: steps it already holds are not sent again (a redone step
that W&B had received before the kill keeps its first values there; metrics.jsonl has the
redone ones). Images and tables go to W&B only and are not replayed.

The x-axis. A job whose work is counted in something other than W&B's step passes it as
`x_axis` (training: "images_seen", so runs with different batch sizes or GPU counts line up):
every key the job logs is charted against it (`define_metric("*", step_metric=x_axis)`, sent
again at every resume, before the replay). `log_lines` logs a native W&B line chart (beside a
PNG the job drew from the same numbers).

W&B never takes a job down. Any error from W&B (its service killed by the SIGTERM that SLURM
sends on scancel or requeue, a network failure online, a full disk) is reported in one line on
stderr and turns W&B off for the rest of the process; metrics.jsonl goes on, and an exception
of the job itself propagates unchanged (finish() cannot replace it with W&B's). The next
resume replays what W&B missed.

wandb is imported only inside the Tracker: `import dipddpm.tracking` stays cheap.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import string
import struct
import sys
import time
import warnings
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from dipddpm.runs import METRICS_FILE, append_jsonl, atomic_write_text, read_jsonl

if TYPE_CHECKING:
    from dipddpm.config import Config

WANDB_DIR = "wandb"  # run_dir/wandb: everything W&B writes
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
    """Writes `run_dir/metrics.jsonl` and logs to W&B; `enabled=False` (non-main ranks) is a no-op.

    keep_rows: resuming from a checkpoint saved when metrics.jsonl had this many rows (the
    `rows` of the Tracker then): later rows are cut, and W&B gets the rows it missed (see the
    module docstring). None keeps every row (a fresh run, or a job that logs once per step
    and skips the steps in `logged_steps`).
    x_axis: a key the job logs in every metrics row (e.g. "images_seen"): W&B charts every
    other key against it instead of its own step.
    """

    def __init__(self, run_dir, cfg: "Config", job_type: str, enabled: bool = True,
                 keep_rows: Optional[int] = None, x_axis: Optional[str] = None):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._run = None
        self._wandb = None
        self._last_step = 0  # the latest step W&B holds (log_table without a step joins it)
        self._wandb_floor = -1  # W&B held every step up to here before this process started
        self._rows = 0
        self._steps: set[int] = set()
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        rows = rewind_metrics(self.metrics_path, keep_rows)
        self._rows = len(rows)
        self._steps = {r["step"] for r in rows if isinstance(r.get("step"), int)}
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
        held = _wandb_last_step(self.run_dir, rows)  # before init adds this session's file

        def init():
            import wandb  # late: slow import, and only the main rank with W&B on pays it

            self._wandb = wandb
            return wandb.init(
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

        self._run = self._guard("init", init)
        if self._run is None:
            return
        # online, the server knows the resumed run's next step; offline, the local files do
        next_step = self._guard("init", lambda: self._run.step)
        self._wandb_floor = max(held, (next_step or 0) - 1)
        self._last_step = max(self._wandb_floor, 0)
        if x_axis and self._run is not None:
            self._guard("define_metric", lambda: (self._run.define_metric(x_axis),
                                                  self._run.define_metric("*", step_metric=x_axis)))
        self._replay(rows)

    # -------------------------------------------------------------------------- logging

    @property
    def rows(self) -> int:
        """Rows in metrics.jsonl so far: store it with a checkpoint, pass it back as keep_rows."""
        return self._rows

    @property
    def logged_steps(self) -> frozenset:
        """The steps metrics.jsonl holds a row for."""
        return frozenset(self._steps)

    def log(self, metrics: dict, step: int) -> None:
        """One line in metrics.jsonl ({"step": step, **metrics}) and one W&B history step."""
        if not self.enabled:
            return
        metrics = {k: _plain(v) for k, v in metrics.items()}
        append_jsonl(self.metrics_path, {"step": int(step), **metrics})
        self._rows += 1
        self._steps.add(int(step))
        self._to_wandb(metrics, int(step))

    def log_image(self, key: str, png_path, step: int) -> None:
        """Log a PNG already written to the run dir (the file there is the artifact; W&B copies it)."""
        if self._run is not None:
            self._to_wandb(lambda: {key: self._wandb.Image(str(png_path))}, int(step))

    def log_table(self, key: str, columns: list, rows: list, step: Optional[int] = None) -> None:
        """A W&B table; without `step` it joins the latest step, so it never moves W&B's step on."""
        if self._run is None:
            return
        if step is None:  # the latest step, unless W&B committed it before this process
            step = self._last_step if self._last_step > self._wandb_floor else self._wandb_floor + 1
        self._to_wandb(lambda: {key: self._wandb.Table(columns=list(columns),
                                                       data=[list(r) for r in rows])}, step)

    def log_lines(self, key: str, series: dict, *, title: str = "", xname: str = "x",
                  step: Optional[int] = None) -> None:
        """A native W&B line chart: `series` maps a line's name to its [(x, y), ...] points
        (lines may have different xs; points with y None are left out). Like log_table, it
        joins the latest step unless `step` is given."""
        if self._run is None:
            return
        lines = {name: [(x, _plain(y)) for x, y in pts if y is not None]
                 for name, pts in series.items()}
        lines = {name: pts for name, pts in lines.items() if pts}
        if not lines:
            return
        if step is None:
            step = self._last_step if self._last_step > self._wandb_floor else self._wandb_floor + 1
        self._to_wandb(lambda: {key: self._wandb.plot.line_series(
            xs=[[p[0] for p in pts] for pts in lines.values()],
            ys=[[p[1] for p in pts] for pts in lines.values()],
            keys=list(lines), title=title or key, xname=xname)}, step)

    def summary(self, values: dict) -> None:
        if self._run is not None:
            values = {k: _plain(v) for k, v in values.items()}
            self._guard("summary", lambda: self._run.summary.update(values))

    def finish(self, exit_code: int = 0) -> None:
        if self._run is None:
            return
        run, self._run = self._run, None

        def close():
            wandb_file = Path(run.dir).parent / f"run-{run.id}.wandb"
            run.finish(exit_code=exit_code)
            # wandb-core writes the last history step and the exit record after finish()
            # returns; wait for them so whatever runs next (a reader, a sync) sees the whole run.
            _wait_for_exit_record(wandb_file)
            # W&B reads its config/cache/data dirs once per process, at its first init: a
            # teardown makes the next Tracker in this process (a test, a study running several
            # jobs) read them again and keep its files with its own run.
            self._wandb.teardown()

        self._guard("finish", close)

    @property
    def run_id(self) -> Optional[str]:
        return self._run.id if self._run is not None else None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)

    # -------------------------------------------------------------------------- W&B, guarded

    def _to_wandb(self, data: dict | Callable[[], dict], step: int) -> None:
        """Send one step's values, unless W&B holds a later step (it would refuse them) or
        held this one before this process started (it would keep a second row for it)."""
        if self._run is None or step <= self._wandb_floor or step < self._last_step:
            return
        self._guard(f"log at step {step}",
                    lambda: self._run.log(data() if callable(data) else data, step=step))
        self._last_step = step

    def _replay(self, rows: list[dict]) -> None:
        """Rows of metrics.jsonl that W&B never received, in order (the steps after its floor)."""
        floor = self._wandb_floor
        missed = [r for r in rows if isinstance(r.get("step"), int) and r["step"] > floor]
        for row in missed:
            self._to_wandb({k: v for k, v in row.items() if k != "step"}, row["step"])
        if missed and self._run is not None:
            print(f"dipddpm: W&B: replayed {len(missed)} row(s) of {METRICS_FILE} it had not "
                  f"received (steps {missed[0]['step']}-{missed[-1]['step']})", file=sys.stderr,
                  flush=True)

    def _guard(self, what: str, call: Callable[[], Any]) -> Any:
        """call(), or None after reporting a W&B error in one line and turning W&B off."""
        try:
            return call()
        except (Exception, SystemExit) as e:  # wandb's teardown may sys.exit(its exit code)
            self._run = None
            print(f"dipddpm: W&B failed ({what}): {type(e).__name__}: {e}; W&B is off for the "
                  f"rest of this process, {METRICS_FILE} goes on (a resumed run replays what "
                  "W&B missed)", file=sys.stderr, flush=True)
            if self._wandb is not None:
                try:  # unregisters W&B's exit hook, which would raise the same error again
                    self._wandb.teardown()
                except (Exception, SystemExit):
                    pass
            return None


def rewind_metrics(path, keep_rows: Optional[int] = None) -> list[dict]:
    """The rows of a metrics.jsonl, cut to the first keep_rows (None: all) and without a torn
    last line; the file is rewritten (atomically) only when that changes it."""
    path = Path(path)
    rows = read_jsonl(path)
    if keep_rows is not None:
        rows = rows[:max(int(keep_rows), 0)]
    if path.exists():
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if path.read_text() != text:
            atomic_write_text(path, text)
    return rows


def rows_through_step(path, step: int, after: Callable[[dict], bool] = lambda row: False) -> int:
    """How many leading rows of a metrics.jsonl have step <= `step`, skipping the rows of that
    step that `after(row)` says were logged after its checkpoint: keep_rows for a checkpoint
    that did not record `rows` (written by an older version of a job)."""
    n = 0
    for row in read_jsonl(path):
        s = row.get("step", 0)
        if s > step or (s == step and after(row)):
            break
        n += 1
    return n


def _wandb_last_step(run_dir: Path, rows: list[dict]) -> int:
    """The last history step in the W&B files already under run_dir (-1 if none). A file W&B
    cannot read back counts as holding every row of metrics.jsonl: nothing is replayed."""
    if not any(Path(run_dir).glob(f"{WANDB_DIR}/*run-*/run-*.wandb")):
        return -1
    try:
        steps = [h["_step"] for h in read_wandb_offline(run_dir)["history"] if "_step" in h]
    except Exception as e:  # W&B never takes a job down (a bad file, a changed format, ...)
        print(f"dipddpm: W&B: cannot read the earlier W&B files ({e}); not replaying "
              f"{METRICS_FILE} into W&B", file=sys.stderr, flush=True)
        steps = [r["step"] for r in rows if isinstance(r.get("step"), int)]
    return max(steps, default=-1)


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

    Returns {"run_id", "job_type", "group", "history": [{"_step": n, key: value, ...} per step],
    "config": the run config without W&B's own "_wandb" entry, "summary": {...},
    "metrics": [{"name" or "glob_name": ..., "step_metric": ...} per define_metric call],
    "files": the .wandb paths read}. A logged image or table reads back as W&B's dict for
    it; its "path" is relative to the `files/` folder beside the .wandb file.
    """
    from wandb.proto import wandb_internal_pb2  # late: only readers pay for protobuf

    def started(path):  # folders are named (offline-)run-YYYYMMDD_HHMMSS-<id>
        m = re.search(r"run-(\d{8}_\d{6})-", path.parent.name)
        return (m.group(1) if m else "", path.stat().st_mtime)

    files = sorted(Path(run_dir).glob(f"{WANDB_DIR}/*run-*/run-*.wandb"), key=started)
    out = {"run_id": None, "job_type": None, "group": None, "history": [], "config": {}, "summary": {}, "metrics": [],
           "files": [str(f) for f in files]}
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
                out["job_type"], out["group"] = record.run.job_type, record.run.run_group
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
            elif kind == "metric":
                m = record.metric
                out["metrics"].append({k: v for k, v in (("name", m.name), ("glob_name", m.glob_name),
                                                         ("step_metric", m.step_metric)) if v})
    out["config"].pop("_wandb", None)
    return out


def wandb_vs_metrics(run_dir) -> list[str]:
    """Where the W&B files under run_dir disagree with its metrics.jsonl, one line each (none:
    they agree). W&B holds one history row per step with the values of every metrics line of
    that step; it may hold more (images, tables, its own `_` keys), never a step twice."""
    lines: dict[int, dict] = {}
    for row in read_jsonl(Path(run_dir) / METRICS_FILE):
        lines.setdefault(row["step"], {}).update({k: v for k, v in row.items() if k != "step"})
    history: dict[int, dict] = {}
    out = []
    for h in read_wandb_offline(run_dir)["history"]:
        if h["_step"] in history:
            out.append(f"step {h['_step']}: two W&B history rows")
        history[h["_step"]] = h
    for step in sorted(set(lines) | set(history)):
        if step not in history:
            out.append(f"step {step}: in {METRICS_FILE}, not in W&B")
        elif step not in lines:
            scalars = [k for k, v in history[step].items()
                       if not k.startswith("_") and not isinstance(v, dict)]
            if scalars:
                out.append(f"step {step}: in W&B, not in {METRICS_FILE}")
        else:
            differ = {k: (v, history[step].get(k)) for k, v in lines[step].items()
                      if history[step].get(k) != v}
            if differ:
                out.append(f"step {step}: {METRICS_FILE} vs W&B: {differ}")
    return out

