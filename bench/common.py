"""What every benchmark shares: a timer that syncs the device, the machine's name, the table."""
from __future__ import annotations

import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def seconds(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


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
    model = platform.processor() or platform.machine()
    try:  # platform.processor() is often empty or just the arch on Linux
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model}, {torch.get_num_threads()} torch thread(s)"


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
    what: str
    unit: str
    ours: float
    baseline: float | None  # None: no baseline for this row
    device: str
    settings: str
    lower_is_better: bool = False  # ms per step: the ratio is then baseline / ours

    @property
    def ratio(self) -> float | None:
        """> 1 means ours is faster, whatever the unit."""
        if self.baseline is None:
            return None
        return self.baseline / self.ours if self.lower_is_better else self.ours / self.baseline

    def as_dict(self) -> dict:
        return asdict(self) | {"ratio": self.ratio}


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def markdown_table(rows: list[Row]) -> str:
    lines = ["| what | unit | ours | baseline | ratio (>1: ours faster) | device | settings |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        lines.append(f"| {r.what} | {r.unit} | {_num(r.ours)} | {_num(r.baseline)} | {ratio} | "
                     f"{r.device} | {r.settings} |")
    return "\n".join(lines) + "\n"
