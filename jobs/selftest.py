"""A resumable smoke-test job: count to launch.selftest_steps with a checkpoint per step.

  python -m jobs.selftest run.dir=runs/selftest launch.selftest_steps=5
  python -m launch.submit selftest --grid configs/grids/selftest.yaml --executor slurm

Use it to check a cluster setup (arrays, requeue, multi-process tasks, W&B groups) before
spending real compute; see dipddpm/launch/selftest.py.
"""
from dipddpm.cli import exit_with, job_parser, parse_config
from dipddpm.launch.selftest import run_selftest


def main(argv=None):
    cfg, _ = parse_config(job_parser(__doc__.splitlines()[0], "configs/base.yaml"), argv)
    return run_selftest(cfg)


if __name__ == "__main__":
    exit_with(main)
