"""Write REPORT.md from run dirs: the study's five tables with ours beside, protocols, plots.

  python -m jobs.report RUNS_DIR [--config configs/base.yaml] [key.sub=value ...]

Walks RUNS_DIR for run dirs (folders with config.yaml), sorts them by their results.json, and
writes RUNS_DIR/REPORT.md; plots go to run.dir (default RUNS_DIR/report), which also holds the
report's W&B run with the same tables. For a study exported by `jobs.study --export` it writes
RESULTS.md, and no W&B run. Never reads W&B. See dipddpm/report/study_report.py.
"""
import argparse

from dipddpm.cli import exit_with
from dipddpm.config import load_config
from dipddpm.report.study_report import build_report, report_overrides


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs_dir", metavar="RUNS_DIR", help="folder to search for run dirs")
    p.add_argument("--config", default="configs/base.yaml",
                   help="YAML config (default: configs/base.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="override any config key, typed by the schema")
    args = p.parse_args(argv)
    # first, so the user's own keys still win
    cfg = load_config(args.config, [*report_overrides(args.runs_dir), *args.overrides])
    return build_report(cfg, args.runs_dir)


if __name__ == "__main__":
    exit_with(main)
