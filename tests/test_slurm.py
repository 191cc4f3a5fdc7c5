"""Launchers on a real single-node SLURM cluster with accounting (slurm/local/up.sh).

Every test submits real work through submitit: jobs.selftest, a tiny resumable job.
"""
from __future__ import annotations

import functools
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import submitit
import yaml

from dipddpm.launch.plan import make_plan
from dipddpm.launch.status import collect, load_record, task_states, wait
from dipddpm.launch.submit import submit
from dipddpm.runs import read_json, read_jsonl
from dipddpm.tracking import wandb_vs_metrics

REPO = Path(__file__).resolve().parents[1]
BASE = str(REPO / "configs" / "base.yaml")


SUBMITTED: set[str] = set()  # job ids this module submitted; only these are ever released


def _plan(folder, *overrides, grid=None, name="t"):
    return make_plan("selftest", BASE, grid=grid, name=name, overrides=[
        f"launch.folder={folder}", "launch.mem_gb=0.25", "wandb.mode=disabled", *overrides])


def _submit(plan):
    record, jobs = submit(plan, "slurm")
    SUBMITTED.update(record["job_ids"])
    return record, jobs


@pytest.fixture
def plan_for(slurm_cluster, tmp_path):
    return functools.partial(_plan, tmp_path / "subs")


def release_held() -> None:
    """A requeued job waits ~2 min (Reason=BeginTime) before it may start again; skip that."""
    out = subprocess.run(["squeue", "-h", "-o", "%i %r"], capture_output=True, text=True).stdout
    held = {line.split()[0] for line in out.splitlines() if line.endswith("BeginTime")}
    for job_id in held & SUBMITTED:
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                       capture_output=True, check=False)


@pytest.fixture(scope="module", autouse=True)
def releaser(slurm_cluster):
    """Releases this module's requeued jobs within a second, from a thread, for every test."""
    stop = threading.Event()

    def loop():
        while not stop.wait(1.0):
            release_held()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(timeout=10)


TIMEOUT_STEPS = 75


@pytest.fixture(scope="module", autouse=True)
def timeout_run(slurm_cluster, releaser, tmp_path_factory):
    """Submitted as this module starts, so its minutes of timeouts overlap the other tests.

    2 min limit, USR2 60 s before it. SLURM checks limits every 30 s and sends the signal at
    the first check within 60 + 30 s of the limit, so it lands 30-60 s into each start: never
    before submitit's handler is installed, even on a loaded machine (a signal then would kill
    the task: FAILED), and always before 75 steps of 1 s are done, so the task is requeued at
    least once and at most ~3 times (max_num_timeout 8).
    """
    plan = _plan(tmp_path_factory.mktemp("timeout"), f"launch.selftest_steps={TIMEOUT_STEPS}",
                 "launch.selftest_step_s=1", "launch.timeout_min=2", "launch.signal_delay_s=60",
                 "launch.max_num_timeout=8", name="timeout")
    record, jobs = _submit(plan)
    yield plan, record, jobs
    if not jobs[0].done():  # deselected (-k) or failed: do not leave it behind on the cluster
        jobs[0].cancel(check=False)


def test_up_sh_is_idempotent(slurm_cluster):
    local = slurm_cluster.get("SLURM_LOCAL_DIR")
    if not local or not slurm_cluster["SLURM_CONF"].startswith(local):
        pytest.skip("the cluster in SLURM_CONF is not one that slurm/local/up.sh started")
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(REPO / "slurm/local/up.sh")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"export SLURM_CONF={slurm_cluster['SLURM_CONF']}" in proc.stdout
    assert time.monotonic() - t0 < 20  # nothing to install or start: it only checks
    node = subprocess.run(["sinfo", "-h", "-o", "%T %c"], capture_output=True, text=True).stdout
    assert node.split()[0] in ("idle", "mixed", "allocated") and int(node.split()[1]) >= 4


def test_grid_runs_as_one_array_and_status_collects_it(plan_for, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"axes": {"diffusion.T": [200, 400],
                                             "train.epochs": [5, 10]}}, sort_keys=False))
    plan = plan_for("launch.selftest_steps=3", "launch.selftest_step_s=0.2", grid=str(grid),
                    name="grid")
    record, jobs = _submit(plan)
    assert len(jobs) == 4
    assert len({j.job_id.split("_")[0] for j in jobs}) == 1  # one array for the submission
    assert wait(record, timeout_s=150) == ["COMPLETED"] * 4
    saved = read_json(Path(plan.folder) / "submission.json")
    assert saved["job_ids"] == record["job_ids"] and len(saved["tasks"]) == 4

    rows = collect(record)
    assert [(r["diffusion.T"], r["train.epochs"]) for r in rows] == \
        [(200, 5), (200, 10), (400, 5), (400, 10)]
    assert all(r["result"] == "results" and r["steps"] == 3 for r in rows)
    assert all(r["wandb_group"] == "grid" and r["slurm_job_id"] for r in rows)
    for r in rows:
        resolved = yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text())
        assert resolved["diffusion"]["T"] == r["diffusion.T"]
        assert resolved["train"]["epochs"] == r["train.epochs"]
        assert resolved["wandb"]["job_type"] == "selftest"

    proc = subprocess.run([sys.executable, "-m", "launch.status", plan.folder, "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)
    assert [r["state"] for r in listed] == ["COMPLETED"] * 4
    assert [r["run_dir"] for r in listed] == [t.run_dir for t in plan.tasks]


def test_preempted_task_requeues_and_resumes(plan_for):
    plan = plan_for("launch.selftest_steps=12", "launch.selftest_step_s=0.5", name="preempt")
    record, jobs = _submit(plan)
    state = Path(plan.tasks[0].run_dir) / "checkpoints" / "selftest.json"
    deadline = time.monotonic() + 90
    while not (state.exists() and read_json(state)["step"] >= 2):
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.5)
    jobs[0]._interrupt()  # what SLURM sends on preemption: SIGTERM, then USR2
    assert wait(record, timeout_s=120) == ["COMPLETED"]
    results = read_json(Path(plan.tasks[0].run_dir) / "results.json")
    assert results["steps"] == 12 and results["starts"] == 2
    counts = [m["count"] for m in read_jsonl(Path(plan.tasks[0].run_dir) / "metrics.jsonl")]
    assert counts == list(range(1, 13))  # every step exactly once


def test_cancelled_task_leaves_no_result_and_does_not_hang(plan_for):
    plan = plan_for("launch.selftest_steps=200", "launch.selftest_step_s=0.5", name="cancel")
    record, jobs = _submit(plan)
    run_dir = Path(plan.tasks[0].run_dir)
    deadline = time.monotonic() + 90
    while not (run_dir / "metrics.jsonl").exists():
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.5)
    jobs[0].cancel()
    outcome = {}

    def result():
        try:
            outcome["value"] = jobs[0].result()
        except Exception as e:
            outcome["error"] = e

    # with accounting, submitit learns the state from sacct and raises; without, it hangs
    waiter = threading.Thread(target=result, daemon=True)  # daemon: a hang cannot block exit
    waiter.start()
    waiter.join(timeout=90)
    assert not waiter.is_alive(), "job.result() still waiting 90 s after the cancel"
    assert isinstance(outcome.get("error"), submitit.core.utils.UncompletedJobError), outcome
    assert task_states(record) == ["CANCELLED"]
    assert not (run_dir / "results.json").exists()
    row = collect(record)[0]
    assert row["state"] == "CANCELLED" and row["result"] in ("", "metrics")
    assert "steps" not in row  # the results.json columns never appear for a cancelled task


def test_two_process_task_runs_in_one_world(plan_for):
    plan = plan_for("launch.selftest_steps=2", "launch.selftest_step_s=0",
                    "launch.tasks_per_node=2", name="world")
    record, jobs = _submit(plan)
    assert wait(record, timeout_s=150) == ["COMPLETED"], jobs[0].stderr()
    results = read_json(Path(plan.tasks[0].run_dir) / "results.json")
    assert results["world_size"] == 2 and results["rank_sum"] == 0 + 1


def _sacct_states(job_id: str) -> list[str]:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"],
                         capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def test_sbatch_templates_run_on_the_cluster(slurm_cluster, tmp_path):
    """Both templates, with jobs.selftest standing in for train and precompute_priors."""
    import os

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHON": sys.executable, "JOB": "selftest", "RUN_ROOT": str(tmp_path / "priors")}
    quick = ["launch.selftest_steps=2", "launch.selftest_step_s=0", "wandb.mode=disabled"]

    def sbatch(*args):
        proc = subprocess.run(["sbatch", "--parsable", "--mem=256M", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().split(";")[0]

    priors = sbatch("--array=0-1", "-c", "1", "-o", str(tmp_path / "p-%A_%a.out"),
                    "slurm/priors_array.sbatch", BASE, *quick)
    train = sbatch("--nodes=1", "-c", "2", "-o", str(tmp_path / "t-%j.out"),
                   "slurm/train_multinode.sbatch", BASE, *quick, f"run.dir={tmp_path / 'train'}")
    deadline = time.monotonic() + 150
    while True:
        states = _sacct_states(priors) + _sacct_states(train)
        if len(states) == 3 and all(s in ("COMPLETED", "FAILED", "CANCELLED") for s in states):
            break
        assert time.monotonic() < deadline, states
        time.sleep(1)
    assert states == ["COMPLETED"] * 3, [p.read_text() for p in tmp_path.glob("*.out")]
    for k in (0, 1):
        resolved = yaml.safe_load((tmp_path / "priors" / f"shard-{k}" / "config.yaml").read_text())
        assert resolved["priors"]["shard"] == k and resolved["run"]["resume"] is True
        assert read_json(tmp_path / "priors" / f"shard-{k}" / "results.json")["steps"] == 2
    # accelerate launch from the multi-node template built a world of 2 processes on the node
    results = read_json(tmp_path / "train" / "results.json")
    assert results["world_size"] == 2 and results["rank_sum"] == 1
    assert r"--machine_rank \$SLURM_NODEID" in (REPO / "slurm/train_multinode.sbatch").read_text()


@pytest.mark.slow
def test_timed_out_task_requeues_and_resumes_from_its_checkpoint(timeout_run):
    plan, record, jobs = timeout_run
    logs = Path(plan.folder, "logs")
    states = wait(record, timeout_s=360)
    assert states == ["COMPLETED"], "\n".join(  # on failure, what submitit saw, start by start
        p.read_text()[-1500:] for p in sorted(logs.rglob("*_log.*")))
    run_dir = Path(plan.tasks[0].run_dir)
    results = read_json(run_dir / "results.json")
    assert results["steps"] == TIMEOUT_STEPS
    assert results["starts"] >= 2  # requeued at least once ...
    counts = [m["count"] for m in read_jsonl(run_dir / "metrics.jsonl")]
    assert counts == list(range(1, TIMEOUT_STEPS + 1))  # ... carried on, each step once
    log = "".join(p.read_text() for p in logs.rglob("*_log.err"))
    assert "this job is timed-out" in log  # submitit saw a timeout, not a preemption
    assert jobs[0].result()["steps"] == TIMEOUT_STEPS


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_cancel_and_requeue_then_resume_finish_every_task_once(slurm_cluster, tmp_path):
    """Three tasks with W&B on (offline), as a user runs them: submit exits 0 once queued; one
    task is scancelled, one requeued by scontrol (both send SIGTERM, which also reaches W&B's
    service), one left alone. The requeued one finishes by itself; `--resume` finishes the
    cancelled one in its run dir. Every metrics.jsonl has each step once, W&B the same rows."""
    steps = 24
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"axes": {"run.seed": [1, 2, 3]}}))
    proc = _cli("launch.submit", "selftest", "--config", BASE, "--grid", str(grid), "--name",
                "survive", f"launch.folder={tmp_path}", "launch.mem_gb=0.5",
                f"launch.selftest_steps={steps}", "launch.selftest_step_s=0.5",
                "wandb.mode=offline")
    assert proc.returncode == 0, proc.stdout + proc.stderr  # queued is not failed
    assert "3 task(s) queued as array job" in proc.stdout
    folder = tmp_path / "survive"
    record = load_record(str(folder))
    SUBMITTED.update(record["job_ids"])
    run_dirs = [Path(t["run_dir"]) for t in record["tasks"]]
    deadline = time.monotonic() + 120
    while not all(len(read_jsonl(d / "metrics.jsonl")) >= 3 for d in run_dirs[:2]):
        assert time.monotonic() < deadline, "the tasks never started"
        time.sleep(0.3)
    subprocess.run(["scancel", record["job_ids"][0]], check=True)
    subprocess.run(["scontrol", "requeue", record["job_ids"][1]], check=True)
    states = wait(record, timeout_s=240)
    assert states == ["CANCELLED", "COMPLETED", "COMPLETED"]
    assert not (run_dirs[0] / "results.json").exists()

    proc = _cli("launch.submit", "--resume", str(folder), "--wait")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resubmitted 1 task(s) of survive" in proc.stdout
    assert "[0] seed=1 (CANCELLED)" in proc.stdout
    proc = _cli("launch.status", str(folder), "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [(r["state"], r["attempt"], r["steps"]) for r in rows] == \
        [("COMPLETED", 2, steps), ("COMPLETED", 1, steps), ("COMPLETED", 1, steps)]
    assert rows[0]["job_id"] != record["job_ids"][0]  # the latest attempt's job
    for run_dir, starts in zip(run_dirs, ([2], [2], [1])):
        counts = [m["count"] for m in read_jsonl(run_dir / "metrics.jsonl")]
        assert counts == list(range(1, steps + 1)), run_dir
        assert wandb_vs_metrics(run_dir) == [], run_dir
        assert read_json(run_dir / "results.json")["starts"] in starts
