"""A tiny resumable job for checking a cluster setup (`python -m jobs.selftest`).

It does what every real job does, at no cost: writes the resolved config first, counts to
`launch.selftest_steps` with a checkpoint after each step (sleeping `launch.selftest_step_s`
per step), logs one metrics line per step through the Tracker (the checkpoint records the
Tracker's rows, so a resume logs every step exactly once), and writes results.json last,
atomically, so a killed or cancelled run never looks complete. Rerun with the same run.dir, it
continues from its checkpoint; `starts` in the results counts how often it was (re)started.

Under several processes (torch env:// variables set, e.g. by a submitit task with
tasks_per_node > 1) it joins an Accelerate world and all-reduces the ranks, proving that every
process saw the same world; only the main process writes.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from dipddpm.config import Config
from dipddpm.runs import (CHECKPOINTS_DIR, RESULTS_FILE, atomic_write_json, prepare_run_dir,
                          read_json)
from dipddpm.tracking import Tracker

STATE_FILE = "selftest.json"


def _world() -> tuple[int, int, int]:
    """(rank, world size, sum of all ranks as every process sees it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    # late: the selftest checks the launcher on a node; only a multi-process task needs torch
    import torch
    from accelerate import Accelerator

    acc = Accelerator(cpu=not torch.cuda.is_available())
    if acc.num_processes != world:  # a silent world of 1 would make every rank write alone
        raise RuntimeError(f"Accelerate sees {acc.num_processes} processes, WORLD_SIZE={world}")
    total = acc.reduce(torch.tensor([acc.process_index], device=acc.device), "sum")
    return acc.process_index, acc.num_processes, int(total.item())


def run_selftest(cfg: Config) -> dict:
    rank, world, rank_sum = _world()
    main = rank == 0
    run_dir = prepare_run_dir(cfg, main_process=main)
    state_path = Path(run_dir) / CHECKPOINTS_DIR / STATE_FILE
    state = {"step": 0, "starts": 0, "metrics_rows": 0}
    if cfg.run.resume and state_path.exists():
        state = read_json(state_path)
    state["starts"] += 1
    steps = cfg.launch.selftest_steps
    # rows after the checkpoint's are cut (a kill between a log and its checkpoint)
    keep_rows = state.get("metrics_rows", state["step"]) if cfg.run.resume else None
    tracker = Tracker(run_dir, cfg, job_type="selftest", enabled=main, keep_rows=keep_rows)
    try:
        if main:
            atomic_write_json(state_path, state)
        while state["step"] < steps:
            time.sleep(cfg.launch.selftest_step_s)
            state["step"] += 1
            if main:
                tracker.log({"count": state["step"], "starts": state["starts"]}, step=state["step"])
                state["metrics_rows"] = tracker.rows
                atomic_write_json(state_path, state)
        results = {
            "steps": state["step"],
            "starts": state["starts"],
            "world_size": world,
            "rank_sum": rank_sum,
            "host": socket.gethostname(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "wandb_group": cfg.wandb.group,
            "seed": cfg.run.seed,
        }
        if main:
            atomic_write_json(Path(run_dir) / RESULTS_FILE, results)
        return results
    finally:
        tracker.finish()
