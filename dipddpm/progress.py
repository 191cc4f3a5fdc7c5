"""One progress bar for every long loop (training, sampling chains, protocols, DIP fits, SLURM
waves): tqdm on stderr, fit for a terminal and for a log file.

    with bar(total=len(arms), desc="arms", unit="arm") as b:
        for arm in arms: ...; b.update(1)

At a terminal it is tqdm's ordinary bar. In a log file (stderr is not a TTY) or under SLURM
(SLURM_JOB_ID set: its output always goes to a file) it prints a plain new line at most every
LOG_INTERVAL_S seconds (and once at the end) instead of redrawing its line ten times a second;
a bar that goes away when done (`leave=False`, e.g. the chains inside a protocol's arm) prints
only if it lasts LOG_INTERVAL_S. `disable=True` (e.g. a library call that runs inside another bar, or a non-main rank) prints
nothing.
"""
from __future__ import annotations

import os
import sys

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


def to_log_file(stream=None) -> bool:
    """True when progress goes to a log file: under SLURM, or stderr is not a TTY."""
    stream = stream if stream is not None else sys.stderr
    return bool(os.environ.get("SLURM_JOB_ID")) or not getattr(stream, "isatty", lambda: False)()


def bar(total=None, desc: str = "", *, disable: bool = False, **kw) -> tqdm:
    """A tqdm over `total` items; see the module docstring for how it prints where."""
    if to_log_file(kw.get("file")):
        # ncols: a fixed width, no terminal query; "\n"-ended lines: no carriage-return redraws
        kw = {"mininterval": LOG_INTERVAL_S, "maxinterval": LOG_INTERVAL_S * 2,
              "dynamic_ncols": False, "ncols": 100, "ascii": True,
              **({"delay": LOG_INTERVAL_S} if kw.get("leave") is False else {}), **kw}
        kw.setdefault("file", _NewLines(kw.pop("file", None) or sys.stderr))
        return _LogBar(total=total, desc=desc, disable=disable, **kw)
    kw.setdefault("dynamic_ncols", True)
    return tqdm(total=total, desc=desc, disable=disable, **kw)


class _LogBar(tqdm):
    """In a log, a new postfix or description waits for the next line (tqdm would print a line
    at once)."""

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_postfix_str(self, s="", refresh=True):
        super().set_postfix_str(s, refresh=False)

    def set_description(self, desc=None, refresh=True):
        super().set_description(desc, refresh=False)


class _NewLines:
    """A stream wrapper that turns tqdm's carriage-return redraws into one line each."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        text = text.replace("\r", "")
        if text.strip():
            self._stream.write(text.rstrip("\n") + "\n")
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return False
