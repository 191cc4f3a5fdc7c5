"""Submit a job as one SLURM array (or run it here): one task per grid point or data shard.

  python -m launch.submit train --config configs/ddpm.yaml --executor slurm
  python -m launch.submit train --grid configs/grids/train_T_epochs.yaml --dry-run
  python -m launch.submit precompute_priors --config configs/priors.yaml --array shards
  python -m launch.submit selftest --grid configs/grids/selftest.yaml --executor local

JOB names a module under jobs/; each task calls its main(["--config", FILE, overrides...]).
Trailing key=value overrides apply to every task. Resources come from the config's `launch`
section. Prints the submission folder; `python -m launch.status FOLDER` follows it.
"""
import argparse
import shutil
import sys

from dipddpm.cli import exit_with
from dipddpm.config import UserError
from dipddpm.launch.plan import describe, make_plan
from dipddpm.launch.status import collect, summary, wait
from dipddpm.launch.submit import EXECUTORS, submit


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("job", help="module under jobs/, e.g. train, fit_dip, precompute_priors")
    p.add_argument("--config", help="base config (default: the grid file's 'base:')")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--grid", help="grid YAML: base config + axes -> one task per point")
    how.add_argument("--array", choices=["shards"],
                     help="shards: one task per data shard of priors.split (sets priors.shard)")
    p.add_argument("--executor", choices=EXECUTORS, default="slurm")
    p.add_argument("--name", help="submission name (default JOB-YYYYmmdd-HHMMSS); the W&B group")
    p.add_argument("--dry-run", action="store_true", help="print the tasks and exit")
    p.add_argument("--wait", action="store_true", help="slurm: wait for the array, then print status")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return p


def main(argv=None):
    args = parser().parse_intermixed_args(argv)
    plan = make_plan(args.job, args.config, args.grid, args.array, args.overrides, args.name)
    if args.dry_run:
        print(describe(plan))
        return plan
    if args.executor == "slurm" and not shutil.which("sbatch"):
        raise UserError("--executor slurm: no sbatch on PATH (a local test cluster: "
                        "slurm/local/up.sh), or use --executor local")
    record, jobs = submit(plan, args.executor)
    if args.executor == "slurm":
        print(f"submitted {plan.name}: {len(jobs)} task(s), array job "
              f"{jobs[0].job_id.split('_')[0]}")
        if args.wait:
            wait(record, timeout_s=float("inf"), poll_s=5)
    rows = collect(record)
    if args.executor == "local" or args.wait:
        print(summary(record, rows))
    print(f"status: python -m launch.status {plan.folder}")
    if any(r["state"] not in ("COMPLETED", "PENDING", "RUNNING") for r in rows):
        sys.exit(1)
    return record


if __name__ == "__main__":
    exit_with(main)
