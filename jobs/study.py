"""The whole study in one command: data, training (both variants, T sweep, ablations), the DIP
table, priors, both protocols, sampling times, then REPORT.md.

  python -m jobs.study --config configs/quickstart.yaml            # CPU, ~10 minutes
  python -m jobs.study --config configs/study.yaml study.executor=slurm   # a GPU cluster

A rerun skips finished stages and resumes unfinished ones (see dipddpm/study/run.py).
"""
from dipddpm.cli import exit_with, job_parser, parse_config
from dipddpm.study.run import run_study


def main(argv=None):
    parser = job_parser(__doc__.splitlines()[0], "configs/quickstart.yaml")
    parser.add_argument("--dry-run", action="store_true",
                        help="print every stage and its command line; run nothing")
    parser.add_argument("--only", action="append", default=[], metavar="STAGE",
                        help="run just this stage (repeatable; names as --dry-run prints them), "
                             "e.g. in a second process beside a long one; no REPORT.md")
    cfg, args = parse_config(parser, argv)
    return run_study(cfg, args.config, list(args.overrides), dry_run=args.dry_run,
                     only=args.only)


if __name__ == "__main__":
    exit_with(main)
