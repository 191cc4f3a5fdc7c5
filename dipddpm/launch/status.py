"""A submission's tasks: states, run dirs, and results collected into one table.

States come from SLURM accounting (one `sacct` call through submitit's watcher) for slurm
submissions, and from the record for local ones. A task's result is its run dir's
results.json (the flat numbers in it) when the job wrote one, else the last metrics.jsonl
line, else nothing; the `result` column says which, so the last metrics line of a cancelled
task is never mistaken for a finished result.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from dipddpm.config import UserError
from dipddpm.launch.submit import RECORD
from dipddpm.runs import METRICS_FILE, RESULTS_FILE, read_json, read_jsonl

# SLURM states after which a task will not run again by itself (submitit requeues before its
# time runs out, so a requeued task shows REQUEUED/PENDING, not TIMEOUT)
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
         "BOOT_FAIL", "DEADLINE"}


def find_record(submission: str, folder: str = "runs/submissions") -> Path:
    """A submission folder, its submission.json, or a name under launch.folder."""
    for path in (Path(submission), Path(folder) / submission):
        if path.is_file() and path.name == RECORD:
            return path
        if (path / RECORD).is_file():
            return path / RECORD
    raise UserError(f"{submission}: no {RECORD} there (nor under {folder}/)")


def load_record(submission: str, folder: str = "runs/submissions") -> dict:
    path = find_record(submission, folder)
    try:
        return read_json(path)
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def task_states(record: dict) -> list[str]:
    if record["executor"] == "local":
        return list(record["states"])
    from submitit.slurm.slurm import SlurmInfoWatcher

    watcher = SlurmInfoWatcher()
    for job_id in record["job_ids"]:
        watcher.register_job(job_id)
    watcher.update()
    # "CANCELLED by 0" -> "CANCELLED"; UNKNOWN when sacct has no line (yet, or no accounting)
    return [watcher.get_state(j, mode="cache").split()[0] for j in record["job_ids"]]


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[f"{prefix}{key}"] = value
    return out


def task_result(run_dir) -> tuple[str, dict[str, Any]]:
    """(source, values): source is "results", "metrics" (the last metrics line) or ""."""
    run_dir = Path(run_dir)
    path = run_dir / RESULTS_FILE
    if path.exists():
        try:
            return "results", _flat(read_json(path))
        except ValueError:
            return "", {}
    lines = read_jsonl(run_dir / METRICS_FILE)
    if lines:
        return "metrics", _flat(lines[-1])
    return "", {}


def collect(record: dict, states: Optional[list[str]] = None) -> list[dict[str, Any]]:
    """One row per task: index, name, state, job id, run dir, grid values, then results."""
    states = task_states(record) if states is None else states
    rows = []
    for task, job_id, state in zip(record["tasks"], record["job_ids"], states):
        source, values = task_result(task["run_dir"])
        rows.append({"task": task["index"], "name": task["name"], "state": state,
                     "job_id": job_id, "run_dir": task["run_dir"], **task["values"],
                     "result": source, **values})
    return rows


def wait(record: dict, timeout_s: float, poll_s: float = 2.0) -> list[str]:
    """Poll until every task reached a final state; TimeoutError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = task_states(record)
        if all(s in FINAL for s in states):
            return states
        if time.monotonic() > deadline:
            raise TimeoutError(f"{record['name']}: not finished after {timeout_s:.0f}s: {states}")
        time.sleep(poll_s)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def format_table(rows: list[dict[str, Any]], columns: Optional[list[str]] = None,
                 skip: tuple[str, ...] = ("run_dir",)) -> str:
    """A Markdown table; columns default to every key seen, in first-seen order."""
    if columns is None:
        columns = []
        for row in rows:
            columns += [k for k in row if k not in columns and k not in skip]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def summary(record: dict, rows: list[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    head = (f"{record['name']}: {len(rows)} task(s) of jobs.{record['job']} "
            f"({record['executor']}): " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    if rows and all(r["state"] == "UNKNOWN" for r in rows):
        head += "\n(sacct knows none of these jobs: is SLURM_CONF set, is accounting on?)"
    dirs = "\n".join(f"  [{r['task']}] {r['name']}: {r['run_dir']}" for r in rows)
    return f"{head}\n{format_table(rows)}\n\nrun dirs:\n{dirs}"


def to_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=2)
