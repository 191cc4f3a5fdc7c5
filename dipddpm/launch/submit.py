"""Run a Plan: one submitit `map_array` on SLURM, or every task here, in this process.

Executors:
  slurm  one SLURM job array per submission (`--array=0-N%P`, P = launch.array_parallelism),
         resources from the `launch` section; returns as soon as the array is queued.
  local  no SLURM: the same tasks, called one after another in this process, in task order.
         Sequential on purpose: jobs here are CPU-heavy and a laptop or 2-core box gains
         nothing from running them side by side; a debugger works; a failing task is recorded
         and the rest still run. Multi-process tasks (tasks_per_node > 1 or nodes > 1) need
         SLURM; locally use `accelerate launch -m jobs.X` instead.

The record `submission.json` (written atomically, rewritten as local tasks finish) holds the
plan (job, config, overrides, tasks with argv, values and run dirs), the executor, the launch
section, and per task its job id; `launch.status` reads it back.

`resubmit` (`python -m launch.submit --resume SUBMISSION`) finishes a submission: the tasks that
ended without completing (cancelled, failed, out of time or memory) go again, as one array
with the same executor, into the same run dirs with `run.resume=true`, so each resumes from
its checkpoints; tasks still queued or running are left alone. The record's job ids become the
new ones and `resumed` keeps, per resubmission, the tasks and the job ids they replaced.
"""
from __future__ import annotations

import dataclasses
import shutil
import sys
import time
import traceback
from pathlib import Path

import submitit

from dipddpm.config import UserError, load_config
from dipddpm.launch.grid import as_overrides
from dipddpm.launch.plan import Plan, TaskSpec
from dipddpm.launch.task import RESUME, JobTask, project_root
from dipddpm.runs import atomic_write_json

RECORD = "submission.json"
LOGS = "logs"
EXECUTORS = ("slurm", "local")
# SLURM states after which a task will not run again by itself (submitit requeues before its
# time runs out, so a requeued task shows REQUEUED/PENDING, not TIMEOUT)
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
         "BOOT_FAIL", "DEADLINE"}


def logs_folder(folder) -> Path:
    """submitit's folder; %j becomes the array task's id (e.g. 12_3), one folder per task."""
    return Path(folder) / LOGS / "%j"


def _record(plan: Plan, executor: str) -> dict:
    return {
        **plan.to_dict(),
        "executor": executor,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "launch": dataclasses.asdict(plan.cfg.launch),
        "logs": str(logs_folder(plan.folder)),
    }


def _write(plan: Plan, record: dict) -> Path:
    path = Path(plan.folder) / RECORD
    atomic_write_json(path, record)
    return path


def slurm_executor(plan: Plan):
    lc = plan.cfg.launch
    ex = submitit.SlurmExecutor(folder=logs_folder(plan.folder), max_num_timeout=lc.max_num_timeout)
    params = dict(
        job_name=plan.name,
        time=lc.timeout_min,
        nodes=lc.nodes,
        ntasks_per_node=lc.tasks_per_node,
        cpus_per_task=lc.cpus_per_task,
        mem=f"{int(lc.mem_gb * 1024)}M",
        array_parallelism=lc.array_parallelism,
        signal_delay_s=lc.signal_delay_s,
        # tasks start in the submitting folder (sbatch's default), and find `jobs/` through
        # PYTHONPATH even when that folder is not the checkout
        setup=[f'export PYTHONPATH="{project_root()}${{PYTHONPATH:+:$PYTHONPATH}}"',
               # torch would start a thread per core of the node (or take the submitting
               # shell's setting); use the CPUs SLURM granted. launch.setup may override.
               'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"',
               *lc.setup],
        additional_parameters={"chdir": plan.cwd},
    )
    if lc.partition:
        params["partition"] = lc.partition
    if lc.gpus_per_node:
        params["gpus_per_node"] = lc.gpus_per_node
    ex.update_parameters(**params)
    return ex


def _task(plan: Plan) -> JobTask:
    lc = plan.cfg.launch
    return JobTask(plan.job, distributed=lc.nodes * lc.tasks_per_node > 1,
                   project_root=project_root())


def _submit_array(plan: Plan, argvs: list[list[str]], created: bool) -> list:
    """One submitit array of `argvs`; sbatch's refusal is a UserError (and, for a folder this
    call made, no folder is left behind)."""
    ex = slurm_executor(plan)
    try:
        return ex.map_array(_task(plan), argvs)
    except submitit.core.utils.FailedJobError as e:
        if created:  # nothing was queued: leave no folder that looks like a submission
            shutil.rmtree(plan.folder, ignore_errors=True)
        lines = [line for line in str(e).splitlines() if line.strip()]
        raise UserError(f"sbatch refused the array: {lines[-1] if lines else e}") from None


def _run_local(plan: Plan, record: dict, indices, argvs: list[list[str]]) -> None:
    """Run the tasks at `indices` here, one after another, recording each state as it goes."""
    task = _task(plan)
    for i, argv in zip(indices, argvs):
        t = plan.tasks[i]
        record["states"][i] = "RUNNING"
        record["errors"][i] = None
        _write(plan, record)
        try:
            task(argv)
            record["states"][i] = "COMPLETED"
        except KeyboardInterrupt:
            record["states"][i] = "CANCELLED"
            _write(plan, record)
            raise
        except (Exception, SystemExit) as e:  # a task's failure must not stop the others
            record["states"][i] = "FAILED"
            record["errors"][i] = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            log = Path(plan.folder) / LOGS / f"{record['job_ids'][i]}.err"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(traceback.format_exc())
            print(f"task {t.index} ({t.name}) failed: {record['errors'][i]} (see {log})",
                  file=sys.stderr)
        _write(plan, record)


def submit(plan: Plan, executor: str):
    """Submit (slurm) or run (local) the plan; return (record, submitit jobs or [])."""
    if executor not in EXECUTORS:
        raise UserError(f"--executor {executor!r}: choose from {', '.join(EXECUTORS)}")
    lc = plan.cfg.launch
    if executor == "local" and lc.nodes * lc.tasks_per_node > 1:
        raise UserError(f"launch.tasks_per_node={lc.tasks_per_node}, launch.nodes={lc.nodes}: "
                        "the local executor runs one process per task; use --executor slurm")
    if (Path(plan.folder) / RECORD).exists():
        raise UserError(f"{plan.folder}: already holds a submission; plan a new one")
    created = not Path(plan.folder).exists()
    Path(plan.folder).mkdir(parents=True, exist_ok=True)
    record = _record(plan, executor)
    if executor == "slurm":
        jobs = _submit_array(plan, [t.argv for t in plan.tasks], created)
        record["job_ids"] = [j.job_id for j in jobs]
        _write(plan, record)
        return record, jobs

    record["job_ids"] = [f"local-{t.index}" for t in plan.tasks]
    record["states"] = ["PENDING"] * len(plan.tasks)
    record["errors"] = [None] * len(plan.tasks)
    _write(plan, record)
    _run_local(plan, record, range(len(plan.tasks)), [t.argv for t in plan.tasks])
    return record, []


def plan_of(record: dict, launch_overrides: list[str] = ()) -> Plan:
    """The Plan a record was made from, with its launch section (plus `launch.*` overrides)."""
    for text in launch_overrides:
        if not text.split("=", 1)[0].strip().startswith("launch."):
            raise UserError(f"{text!r}: a resumed submission keeps its tasks' configs; only "
                            "launch.* (resources) may change")
    launch = {f"launch.{k}": v for k, v in record.get("launch", {}).items()}
    cfg = load_config(None, as_overrides(launch) + list(launch_overrides))
    return Plan(name=record["name"], job=record["job"], folder=record["folder"],
                config=record.get("config", ""), overrides=list(record.get("overrides", [])),
                grid=record.get("grid"), array=record.get("array"),
                cwd=record.get("cwd") or str(Path(record["folder"]).parent),
                tasks=[TaskSpec(**{k: t[k] for k in ("index", "name", "run_dir", "values", "argv")})
                       for t in record["tasks"]], cfg=cfg)


def resubmit(record: dict, states: list[str], launch_overrides: list[str] = ()):
    """Submit again the tasks whose latest attempt ended without completing (states: one per
    task, as launch.status reads them); return (record, submitit jobs or [], their indices)."""
    plan = plan_of(record, launch_overrides)
    local = record["executor"] == "local"
    # a local task runs inside the submitting process: one not COMPLETED is not running now
    todo = [i for i, s in enumerate(states) if s != "COMPLETED" and (local or s in FINAL)]
    if not todo:
        return record, [], []
    argvs = [t.argv if RESUME in t.argv else [*t.argv, RESUME]
             for t in (plan.tasks[i] for i in todo)]
    entry = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "tasks": todo,
             "states": [states[i] for i in todo], "job_ids": [record["job_ids"][i] for i in todo],
             "launch_overrides": list(launch_overrides)}
    record = {**record, "job_ids": list(record["job_ids"]),
              "launch": dataclasses.asdict(plan.cfg.launch),
              "resumed": [*record.get("resumed", []), entry]}
    if not local:
        jobs = _submit_array(plan, argvs, created=False)
        for i, job in zip(todo, jobs):
            record["job_ids"][i] = job.job_id
        _write(plan, record)
        return record, jobs, todo
    record["states"] = list(record["states"])
    record["errors"] = list(record.get("errors") or [None] * len(record["tasks"]))
    for i in todo:  # local-<task>-<attempt>
        attempt = 1 + sum(i in r["tasks"] for r in record["resumed"])
        record["job_ids"][i] = f"local-{i}-{attempt}"
    _run_local(plan, record, todo, argvs)
    return record, [], todo
