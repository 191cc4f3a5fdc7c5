"""A submission's tasks, built and validated before anything is submitted.

Each task is one job run: `jobs.<job>.main(["--config", CONFIG, *overrides])` where the
overrides are, in order: the user's, the task's grid values (or `priors.shard=K`), and the
launcher's own (`run.dir`, `wandb.group`, `wandb.job_type`), which therefore always win. Every
task's config is loaded once here, so a bad grid value fails the submission with a one-line
error instead of failing N array tasks later.

Layout of a submission folder (launch.folder/<name>/):
  submission.json   the record: tasks, argv, run dirs, job ids (see submit.py)
  logs/             submitit's pickles and each task's stdout/stderr
  runs/<run name>/  one run dir per task
"""
from __future__ import annotations

import importlib.util
import os
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from dipddpm.config import Config, ConfigError, UserError, load_config
from dipddpm.launch.grid import as_overrides, load_grid, run_name

# keys the launcher sets per task; a user or grid setting them would be silently overridden
RESERVED = ("run.dir", "wandb.group", "wandb.job_type")
ARRAY_KINDS = ("shards",)


@dataclass
class TaskSpec:
    index: int
    name: str  # the run name, e.g. "T=200,epochs=5"
    run_dir: str  # absolute
    values: dict[str, Any]  # the grid point (or {"priors.shard": K})
    argv: list[str]  # what jobs.<job>.main receives


@dataclass
class Plan:
    name: str
    job: str
    folder: str  # absolute
    config: str  # absolute path of the base config
    overrides: list[str]
    grid: Optional[str]
    array: Optional[str]
    cwd: str  # where relative paths in the config (data.dir, ...) are read from
    tasks: list[TaskSpec] = field(default_factory=list)
    cfg: Optional[Config] = field(default=None, repr=False)  # base config + user overrides

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("cfg")
        return d


def check_job(job: str) -> None:
    if not job.isidentifier():
        raise UserError(f"job {job!r}: a job is a module name under jobs/ (e.g. train)")
    try:
        found = importlib.util.find_spec(f"jobs.{job}") is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise UserError(f"job {job!r}: no module jobs/{job}.py (run from the repo root)")


def _check_keys(keys, where: str) -> None:
    for key in keys:
        if key in RESERVED:
            raise ConfigError(f"{where}: {key}: set by the launcher for each task; remove it")


def shard_points(cfg: Config) -> list[dict[str, Any]]:
    """One point per data shard of priors.split, from data.dir/manifest.json."""
    # late: dipddpm.data pulls in torch, and the launcher's command lines start without it
    from dipddpm.data.shards import load_manifest, split_shards

    shards = split_shards(load_manifest(cfg.data.dir), cfg.priors.split, cfg.data.dir)
    return [{"priors.shard": k} for k in range(len(shards))]


def _unique_folder(root: Path, name: str) -> Path:
    folder, n = root / name, 1
    while folder.exists():
        n += 1
        folder = root / f"{name}-{n}"
    return folder


def make_plan(job: str, config: Optional[str] = None, grid: Optional[str] = None,
              array: Optional[str] = None, overrides: list[str] = (),
              name: Optional[str] = None) -> Plan:
    check_job(job)
    if grid and array:
        raise UserError("--grid and --array: give one of them")
    if array is not None and array not in ARRAY_KINDS:
        raise UserError(f"--array {array!r}: choose from {', '.join(ARRAY_KINDS)}")
    g = load_grid(grid) if grid else None
    base = config or (str(g.base) if g and g.base else None)
    if base is None:
        raise UserError("no config: give --config FILE (or 'base:' in the grid file)")
    base = os.path.abspath(base)
    overrides = list(overrides)
    _check_keys([o.split("=", 1)[0].strip() for o in overrides], "command line")
    cfg = load_config(base, overrides)

    if g is not None:
        _check_keys(g.axes, str(g.path))
        for key in g.axes:
            if key.startswith("launch.") and not key.startswith("launch.selftest_"):
                raise ConfigError(f"{g.path}: axes.{key}: all tasks of one array share the "
                                  f"launch resources; submit one grid per setting")
        points = g.points()
    elif array == "shards":
        points = shard_points(cfg)
    else:
        points = [{}]
    name = name or f"{job}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise UserError(f"--name {name!r}: letters, digits, '-', '_', '.' only")
    folder = _unique_folder(Path(cfg.launch.folder).absolute(), name)
    name = folder.name  # the W&B group: one per submission, never shared with an older one

    plan = Plan(name=name, job=job, folder=str(folder), config=base, overrides=overrides,
                grid=os.path.abspath(grid) if grid else None, array=array, cwd=os.getcwd(),
                cfg=cfg)
    seen = set()
    for index, point in enumerate(points):
        rname = run_name(point) if point else job
        if rname in seen:  # two values that print alike (e.g. 1 and "1"): keep both
            rname = f"{rname},i={index}"
        seen.add(rname)
        run_dir = folder / "runs" / rname
        argv = ["--config", base, *overrides, *as_overrides(point),
                f"run.dir={run_dir}", f"wandb.group={name}", f"wandb.job_type={job}"]
        where = f"{g.path} point {index} ({rname})" if g else "task"
        try:
            load_config(base, argv[2:])
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        plan.tasks.append(TaskSpec(index=index, name=rname, run_dir=str(run_dir),
                                   values=point, argv=argv))
    return plan


def describe(plan: Plan) -> str:
    """What --dry-run prints: the submission, its resources, and one line per task."""
    lc = plan.cfg.launch
    lines = [
        f"submission {plan.name}: {len(plan.tasks)} task(s) of jobs.{plan.job}",
        f"  folder    {plan.folder}",
        f"  config    {plan.config}" + (f" + {' '.join(plan.overrides)}" if plan.overrides else ""),
        f"  resources nodes={lc.nodes} tasks_per_node={lc.tasks_per_node} "
        f"gpus_per_node={lc.gpus_per_node} cpus_per_task={lc.cpus_per_task} mem_gb={lc.mem_gb} "
        f"timeout_min={lc.timeout_min} partition={lc.partition or '(default)'} "
        f"array_parallelism={lc.array_parallelism}",
    ]
    for t in plan.tasks:
        lines.append(f"  [{t.index}] {t.name}  ->  {t.run_dir}")
        lines.append(f"      python -m jobs.{plan.job} {shlex.join(t.argv)}")
    return "\n".join(lines)
