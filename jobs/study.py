"""The whole study in one command: data, training (both variants, T sweep, ablations), the DIP
table, priors, both protocols, sampling times, then REPORT.md.

  python -m jobs.study --config configs/quickstart.yaml            # CPU, ~10 minutes
  python -m jobs.study --config configs/study.yaml study.executor=slurm   # a GPU cluster

A rerun skips finished stages and resumes unfinished ones (see dipddpm/study/run.py). Every
stage is listed with an estimate of its CPU time first (dipddpm/study/estimate.py).

  python -m jobs.study --config C --only restore      # one stage, beside a long one
  python -m jobs.study --config C --export results/X  # finished stages -> results/X/RESULTS.md
"""
from dipddpm.cli import exit_with, job_parser, parse_config
from dipddpm.study.run import export_results, run_study


def main(argv=None):
    parser = job_parser(__doc__.splitlines()[0], "configs/quickstart.yaml")
    parser.add_argument("--dry-run", action="store_true",
                        help="print every stage and its command line; run nothing")
    parser.add_argument("--only", action="append", default=[], metavar="STAGE",
                        help="run just this stage (repeatable; names as --dry-run prints them), "
                             "e.g. in a second process beside a long one; no REPORT.md")
    parser.add_argument("--export", metavar="DIR",
                        help="copy the finished stages' results and figures (no weights) into "
                             "DIR, write DIR/RESULTS.md; run nothing")
    cfg, args = parse_config(parser, argv)
    if args.export:
        return export_results(cfg, args.export)
    return run_study(cfg, args.config, list(args.overrides), dry_run=args.dry_run,
                     only=args.only)


if __name__ == "__main__":
    exit_with(main)
