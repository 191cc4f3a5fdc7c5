"""The one argument convention every job shares: `--config FILE [key.sub=value ...]`.

`run_job` turns a UserError (bad config, bad input file) into one line on stderr and exit
code 2, so a user never reads a traceback for their own mistake.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from dipddpm.config import Config, UserError, current_key, load_config, parse_override


def job_parser(description: str, default_config: Optional[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=default_config,
                   help=f"YAML config (default: {default_config or 'schema defaults'})")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="override any config key, typed by the schema")
    return p


def parse_config(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]],
                 extra: Callable[[argparse.Namespace], list[str]] = lambda a: []):
    """Parse argv; `extra` maps job-specific flags to overrides applied after the user's."""
    args = parser.parse_args(argv)
    cfg = load_config(args.config, list(args.overrides) + extra(args))
    return cfg, args


def override_keys(overrides: Sequence[str]) -> list[str]:
    """The dotted keys a list of `key.sub=value` overrides sets, by their current names."""
    keys = (current_key(parse_override(o)[0]) for o in overrides)
    return [k for k in keys if k is not None]


def run_job(main: Callable[[Optional[Sequence[str]]], object], argv=None) -> int:
    """Call main(argv); report a UserError as one line and return 2."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def exit_with(main: Callable, argv=None) -> None:
    sys.exit(run_job(main, argv))


__all__ = ["Config", "job_parser", "parse_config", "override_keys", "run_job", "exit_with"]
