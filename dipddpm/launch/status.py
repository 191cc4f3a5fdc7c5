"""A submission's tasks: states, run dirs, and results collected into one table.

States come from SLURM accounting (one `sacct` call through submitit's watcher) for slurm
submissions, and from the record for local ones; a task resubmitted by `launch.submit --resume`
shows its latest attempt (the record's job_ids are the latest ones; `resumed` lists the
earlier). A task's result is its run dir's results.json (the flat numbers in it) when the job
wrote one, else the last metrics.jsonl line, else nothing; the `result` column says which, so
the last metrics line of a cancelled task is never mistaken for a finished result.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from submitit.slurm.slurm import SlurmInfoWatcher

from dipddpm.config import UserError
from dipddpm.launch.submit import FINAL, RECORD
from dipddpm.runs import METRICS_FILE, RESULTS_FILE, read_json, read_jsonl


def find_record(submission: str, folder: str = "runs/submissions") -> Path:
    """A submission folder, its submission.json, or a name under launch.folder."""
    for path in (Path(submission), Path(folder) / submission):
        if path.is_file() and path.name == RECORD:
            return path
        if (path / RECORD).is_file():
            return path / RECORD
    raise UserError(f"{submission}: no {RECORD} there (nor under {folder}/)")


RECORD_KEYS = ("name", "job", "folder", "executor", "tasks", "job_ids")
TASK_KEYS = ("index", "name", "run_dir", "values", "argv")


def load_record(submission: str, folder: str = "runs/submissions") -> dict:
    """The submission record, checked: anything else is a UserError (one line, exit 2)."""
    path = find_record(submission, folder)
    try:
        record = read_json(path)
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    what = "a submission record (as launch.submit writes it)"
    if not isinstance(record, dict):
        raise UserError(f"{path}: not {what}: a {type(record).__name__}, not a mapping")
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        raise UserError(f"{path}: not {what}: no {', '.join(repr(k) for k in missing)}")
    tasks, ids = record["tasks"], record["job_ids"]
    if not (isinstance(tasks, list) and isinstance(ids, list) and len(tasks) == len(ids)
            and all(isinstance(t, dict) and all(k in t for k in TASK_KEYS) for t in tasks)):
        raise UserError(f"{path}: not {what}: 'tasks' and 'job_ids' do not match")
    if record["executor"] == "local" and len(record.get("states") or []) != len(tasks):
        raise UserError(f"{path}: not {what}: a local submission without a state per task")
    return record


def task_states(record: dict) -> list[str]:
    if record["executor"] == "local":
        return list(record["states"])
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


def attempts(record: dict) -> list[int]:
    """How often each task was submitted: 1, plus one per `launch.submit --resume` of it."""
    counts = [1] * len(record["tasks"])
    for resumed in record.get("resumed", []):
        for i in resumed["tasks"]:
            counts[i] += 1
    return counts


def collect(record: dict, states: Optional[list[str]] = None) -> list[dict[str, Any]]:
    """One row per task: index, name, state and job id of its latest attempt, the attempt's
    number, run dir, grid values, then results."""
    states = task_states(record) if states is None else states
    rows = []
    for task, job_id, state, attempt in zip(record["tasks"], record["job_ids"], states,
                                            attempts(record)):
        source, values = task_result(task["run_dir"])
        rows.append({"task": task["index"], "name": task["name"], "state": state,
                     "job_id": job_id, "attempt": attempt, "run_dir": task["run_dir"],
                     **task["values"], "result": source, **values})
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
