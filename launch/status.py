"""List a submission's tasks, their states and run dirs, and collect their results.

  python -m launch.status runs/submissions/train-20260101-120000
  python -m launch.status train-20260101-120000 --json
"""
import argparse

from dipddpm.cli import exit_with
from dipddpm.launch.status import collect, load_record, summary, to_json, wait


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("submission", help="submission folder, its submission.json, or its name")
    p.add_argument("--folder", default="runs/submissions",
                   help="where submission names are looked up (launch.folder)")
    p.add_argument("--json", action="store_true", help="rows as JSON instead of a table")
    p.add_argument("--wait", type=float, metavar="SECONDS",
                   help="first wait up to SECONDS for every task to finish")
    args = p.parse_args(argv)
    record = load_record(args.submission, args.folder)
    states = wait(record, args.wait) if args.wait else None
    rows = collect(record, states)
    print(to_json(rows) if args.json else summary(record, rows))
    return rows


if __name__ == "__main__":
    exit_with(main)
