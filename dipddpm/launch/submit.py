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
"""
from __future__ import annotations

import dataclasses
import shutil
import sys
import time
import traceback
from pathlib import Path

from dipddpm.config import UserError
from dipddpm.launch.plan import Plan
from dipddpm.launch.task import JobTask, project_root
from dipddpm.runs import atomic_write_json

RECORD = "submission.json"
LOGS = "logs"
EXECUTORS = ("slurm", "local")


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
    import submitit

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
    task = _task(plan)
    if executor == "slurm":
        import submitit

        ex = slurm_executor(plan)
        try:
            jobs = ex.map_array(task, [t.argv for t in plan.tasks])
        except submitit.core.utils.FailedJobError as e:
            if created:  # nothing was queued: leave no folder that looks like a submission
                shutil.rmtree(plan.folder, ignore_errors=True)
            lines = [line for line in str(e).splitlines() if line.strip()]
            raise UserError(f"sbatch refused the array: {lines[-1] if lines else e}") from None
        record["job_ids"] = [j.job_id for j in jobs]
        _write(plan, record)
        return record, jobs

    record["job_ids"] = [f"local-{t.index}" for t in plan.tasks]
    record["states"] = ["PENDING"] * len(plan.tasks)
    record["errors"] = [None] * len(plan.tasks)
    _write(plan, record)
    for i, t in enumerate(plan.tasks):
        record["states"][i] = "RUNNING"
        _write(plan, record)
        try:
            task(t.argv)
            record["states"][i] = "COMPLETED"
        except KeyboardInterrupt:
            record["states"][i] = "CANCELLED"
            _write(plan, record)
            raise
        except (Exception, SystemExit) as e:  # a task's failure must not stop the others
            record["states"][i] = "FAILED"
            record["errors"][i] = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            log = Path(plan.folder) / LOGS / f"local-{t.index}.err"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(traceback.format_exc())
            print(f"task {t.index} ({t.name}) failed: {record['errors'][i]} (see {log})",
                  file=sys.stderr)
        _write(plan, record)
    return record, []
