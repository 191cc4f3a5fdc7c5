"""What every benchmark shares: a timer that syncs the device, the machine's name, the table."""
from __future__ import annotations

import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import torch

from dipddpm.runs import cpu_model


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def set_clock(name: str) -> None:
    """'wall' (default) or 'cpu': this process's CPU time, which on a CPU shared with other
    jobs counts only the time this process ran. Meaningful for one torch thread only (CPU time
    sums threads) and never for a GPU; the harness notes it in every row's settings."""
    global _clock
    _clock = CLOCKS[name]


def clock_name() -> str:
    return next(k for k, v in CLOCKS.items() if v is _clock)


def now() -> float:
    return _clock()


def seconds(fn, device) -> float:
    sync(device)
    start = _clock()
    fn()
    sync(device)
    return _clock() - start


def side_by_side(fns: dict, *, warmup: int, reps: int, device) -> dict:
    """The median seconds per call of each fn, the calls interleaved (a, b, a, b, ...).

    Interleaving and the median keep a slow spell of a shared machine from landing on one side
    only. Warm-up calls come first and are not timed: the first calls at a new shape pick
    kernels (cuDNN autotune, oneDNN primitives) and grow the allocator's pools."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(seconds(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


def device_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU {cpu_model()}, {torch.get_num_threads()} torch thread(s)"


def short_device(device) -> str:
    """The table's device column: the card's name, or the CPU's thread count."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu, {torch.get_num_threads()} thread(s)"


def git_commit() -> str:
    """Short commit of the working tree, '+dirty' when it has uncommitted changes."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        sha = git("rev-parse", "--short", "HEAD")
        return sha + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


@dataclass
class Row:
    name: str
    unit: str
    ours: float
    baseline: float | None  # None: no baseline for this row
    device: str
    settings: str
    lower_is_better: bool = False  # ms per step: the ratio is then baseline / ours
    gflops: float | None = None  # achieved by ours (FLOPs from torch's FlopCounterMode)
    peak_gflops: float | None = None  # the matching roofline row's sustained rate

    @property
    def ratio(self) -> float | None:
        """> 1 means ours is faster, whatever the unit."""
        if self.baseline is None:
            return None
        return self.baseline / self.ours if self.lower_is_better else self.ours / self.baseline

    @property
    def pct_of_peak(self) -> float | None:
        if self.gflops is None or not self.peak_gflops:
            return None
        return 100.0 * self.gflops / self.peak_gflops

    def as_dict(self) -> dict:
        return asdict(self) | {"ratio": self.ratio, "pct_of_peak": self.pct_of_peak}


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def markdown_table(rows: list[Row]) -> str:
    lines = ["| name | unit | ours | baseline | ratio (>1: ours faster) | GFLOP/s | % of peak "
             "(peak GFLOP/s) | device | settings |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        pct = "-" if r.pct_of_peak is None else f"{r.pct_of_peak:.0f}% ({_num(r.peak_gflops)})"
        lines.append(f"| {r.name} | {r.unit} | {_num(r.ours)} | {_num(r.baseline)} | {ratio} | "
                     f"{_num(r.gflops)} | {pct} | {r.device} | {r.settings} |")
    return "\n".join(lines) + "\n"
