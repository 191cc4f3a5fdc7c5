"""Submit a job as one SLURM array (or run it here): one task per grid point or data shard.

  python -m launch.submit train --config configs/ddpm.yaml --executor slurm
  python -m launch.submit train --grid configs/grids/train_T_epochs.yaml --dry-run
  python -m launch.submit precompute_priors --config configs/priors.yaml --array shards
  python -m launch.submit selftest --grid configs/grids/selftest.yaml --executor local
  python -m launch.submit --resume runs/submissions/train-20260101-120000 [launch.timeout_min=240]

JOB names a module under jobs/; each task calls its main(["--config", FILE, overrides...]).
Trailing key=value overrides apply to every task. Resources come from the config's `launch`
section. Prints the submission folder; `python -m launch.status FOLDER` follows it. Exit code:
0 once the array is queued (slurm; with --wait, once every task COMPLETED) or every task
completed (local), 1 if a task did not complete, 2 for bad input (nothing is submitted then).

--resume SUBMISSION submits again, as one array into the same run dirs, the tasks whose latest
attempt ended without completing (cancelled, failed, out of time or memory); each resumes from
its checkpoints. Tasks still queued or running are left alone. Only launch.* overrides apply.
"""
import argparse
import shutil
import sys

from dipddpm.cli import exit_with
from dipddpm.config import UserError
from dipddpm.launch.plan import describe, make_plan
from dipddpm.launch.status import collect, load_record, summary, task_states, wait
from dipddpm.launch.submit import EXECUTORS, resubmit, submit


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("job", nargs="?",
                   help="module under jobs/, e.g. train, fit_dip, precompute_priors")
    p.add_argument("--config", help="base config (default: the grid file's 'base:')")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--grid", help="grid YAML: base config + axes -> one task per point")
    how.add_argument("--array", choices=["shards"],
                     help="shards: one task per data shard of priors.split (sets priors.shard)")
    p.add_argument("--executor", choices=EXECUTORS, help="default: slurm (--resume: the "
                   "submission's own)")
    p.add_argument("--name", help="submission name (default JOB-YYYYmmdd-HHMMSS); the W&B group")
    p.add_argument("--dry-run", action="store_true", help="print the tasks and exit")
    p.add_argument("--wait", action="store_true", help="slurm: wait for the array, then print status")
    p.add_argument("--resume", metavar="SUBMISSION",
                   help="submit again the tasks of SUBMISSION (its folder, submission.json or "
                        "name) that ended without completing, into their run dirs")
    p.add_argument("--folder", default="runs/submissions",
                   help="where --resume looks up a submission name (launch.folder)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return p


def _need_sbatch() -> None:
    if not shutil.which("sbatch"):
        raise UserError("--executor slurm: no sbatch on PATH (a local test cluster: "
                        "slurm/local/up.sh), or use --executor local")


def _finish(record: dict, executor: str, wait_for_it: bool) -> list:
    """Print the outcome; exit 1 unless every task COMPLETED (a queued array counts as fine)."""
    if executor == "slurm" and not wait_for_it:
        print(f"status: python -m launch.status {record['folder']}")
        return []
    states = wait(record, timeout_s=float("inf"), poll_s=5) if executor == "slurm" else None
    rows = collect(record, states)
    print(summary(record, rows))
    print(f"status: python -m launch.status {record['folder']}")
    if any(r["state"] != "COMPLETED" for r in rows):
        sys.exit(1)
    return rows


def resume(args, overrides: list[str]) -> dict:
    for flag, value in (("JOB", args.job), ("--config", args.config), ("--grid", args.grid),
                        ("--array", args.array), ("--name", args.name),
                        ("--dry-run", args.dry_run)):
        if value:
            raise UserError(f"--resume: {flag} does not apply: a resumed submission keeps its "
                            "job, configs and tasks (launch.* overrides may change resources)")
    record = load_record(args.resume, args.folder)
    if args.executor and args.executor != record["executor"]:
        raise UserError(f"--executor {args.executor}: {record['name']} ran with "
                        f"--executor {record['executor']}; a resume uses the same")
    if record["executor"] == "slurm":
        _need_sbatch()
    states = task_states(record)
    if record["executor"] == "slurm" and all(s == "UNKNOWN" for s in states):
        raise UserError(f"{record['name']}: sacct knows none of its jobs (is SLURM_CONF set, is "
                        "accounting on?): cannot tell which tasks finished")
    record, jobs, todo = resubmit(record, states, overrides)
    tasks = record["tasks"]
    left = [i for i, s in enumerate(states) if s != "COMPLETED" and i not in todo]
    if not todo:
        done = sum(s == "COMPLETED" for s in states)
        print(f"{record['name']}: nothing to resume ({done} of {len(tasks)} task(s) COMPLETED)")
    elif jobs:
        print(f"resubmitted {len(todo)} task(s) of {record['name']} as array job "
              f"{jobs[0].job_id.split('_')[0]}: " +
              ", ".join(f"[{i}] {tasks[i]['name']} ({states[i]})" for i in todo))
    for i in left:
        print(f"left alone: [{i}] {tasks[i]['name']} is {states[i]} (job {record['job_ids'][i]})")
    _finish(record, record["executor"], args.wait)
    return record


def main(argv=None):
    args = parser().parse_intermixed_args(argv)
    overrides = list(args.overrides)
    if args.resume:
        if args.job and "=" in args.job:  # argparse took the first override for JOB
            args.job, overrides = None, [args.job, *overrides]
        return resume(args, overrides)
    if args.job is None or "=" in args.job:
        raise UserError("give a JOB (a module under jobs/, e.g. train), or --resume SUBMISSION")
    plan = make_plan(args.job, args.config, args.grid, args.array, overrides, args.name)
    if args.dry_run:
        print(describe(plan))
        return plan
    executor = args.executor or "slurm"
    if executor == "slurm":
        _need_sbatch()
    record, jobs = submit(plan, executor)
    if executor == "slurm":
        print(f"submitted {plan.name}: {len(jobs)} task(s) queued as array job "
              f"{jobs[0].job_id.split('_')[0]}")
    _finish(record, executor, args.wait)
    return record


if __name__ == "__main__":
    exit_with(main)
