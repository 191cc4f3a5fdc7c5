"""The callable a SLURM array task (or the local executor) runs: one job's main(argv).

submitit pickles this object once per array and each task's argv beside it, so it holds only
plain data: the job's module name and how to start it. The job is imported by name at run time
(`jobs.<name>`), which keeps the library free of imports of `jobs` and lets any job run under the
launcher without knowing about it.

On timeout or preemption submitit calls `checkpoint()`, which resubmits the same argv with
`run.resume=true`: every job keeps its own checkpoints in run.dir, so the requeued task picks
up from the last one. Nothing of the running job is pickled at that point.

A job that returns just as SLURM sends the warning signal must still end COMPLETED: once the job
is done the signal is ignored (`_ignore_late_requeue_signal`). Otherwise submitit would requeue
finished work, or, during interpreter shutdown (which restores the default action, "terminate"),
the signal would kill the process after the result was saved and SLURM would record FAILED.
"""
from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
from typing import Optional

import submitit

# appended on requeue, so the job picks up its checkpoints even if the config said otherwise
RESUME = "run.resume=true"


class JobTask(submitit.helpers.Checkpointable):
    """`task(argv)` runs `jobs.<job>.main(argv)`; one object serves a whole array (map_array)."""

    def __init__(self, job: str, distributed: bool = False, project_root: Optional[str] = None):
        self.job = job
        self.distributed = distributed  # several processes per task: export torch's env:// vars
        self.project_root = project_root  # where `jobs/` lives, for nodes started elsewhere

    def __call__(self, argv: list[str]):
        if self.project_root and self.project_root not in sys.path:
            sys.path.insert(0, self.project_root)
        if self.distributed:
            # MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK from SLURM's task layout; leave
            # CUDA_VISIBLE_DEVICES alone so Accelerate picks the device by local rank itself
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        module = importlib.import_module(f"jobs.{self.job}")
        result = module.main(list(argv))
        _ignore_late_requeue_signal()
        return result

    def checkpoint(self, argv: list[str]) -> submitit.helpers.DelayedSubmission:
        argv = list(argv) if RESUME in argv else list(argv) + [RESUME]
        return submitit.helpers.DelayedSubmission(self, argv)

    def __repr__(self) -> str:
        return f"JobTask(jobs.{self.job})"


def _ignore_late_requeue_signal() -> None:
    """Under a submitit SLURM task, ignore the timeout/preemption signal from here on."""
    under_slurm = os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
    if not under_slurm or threading.current_thread() is not threading.main_thread():
        return  # the local executor, a test, or a thread: no submitit handler to replace
    # submitit's signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise). SIG_IGN, unlike a
    # Python handler, survives interpreter shutdown.
    signal.signal(submitit.JobEnvironment()._usr_sig(), signal.SIG_IGN)


def project_root() -> str:
    """The folder holding both `dipddpm/` and `jobs/` (the repo root in a checkout)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
