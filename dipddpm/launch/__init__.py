"""Submitting jobs as SLURM arrays (or locally) and collecting what they wrote.

  grid.py      grid files -> points -> overrides and run names
  plan.py      a submission's tasks: config, argv, run dir per task; validated before submitting
  task.py      the pickled callable each array task runs (Checkpointable: requeue -> resume)
  submit.py    executors (slurm through submitit, local in-process) and the submission record
  status.py    task states (sacct through submitit), run dirs, results in one table
  selftest.py  a tiny resumable job for checking a cluster setup

`launch/*.py` at the repo root are the command lines over these modules.
"""
