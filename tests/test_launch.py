"""Launchers without a cluster: grid expansion, validation, --dry-run, the local executor."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dipddpm.cli import run_job
from dipddpm.config import ConfigError, UserError, load_config
from dipddpm.launch.grid import as_overrides, expand, load_grid, run_name
from dipddpm.launch.plan import make_plan
from dipddpm.launch.status import collect, load_record, task_result
from dipddpm.runs import read_json, read_jsonl

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "configs" / "base.yaml"
QUICK = ["launch.selftest_steps=2", "launch.selftest_step_s=0", "wandb.mode=disabled"]


def cli(module: str, *args: str, cwd=REPO, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def write_grid(path: Path, tree) -> Path:
    path.write_text(tree if isinstance(tree, str) else yaml.safe_dump(tree, sort_keys=False))
    return path


def test_expand_is_the_cartesian_product_last_axis_fastest():
    points = expand({"diffusion.T": [200, 400, 600], "train.epochs": [5, 10]})
    assert len(points) == 6
    assert points[0] == {"diffusion.T": 200, "train.epochs": 5}
    assert points[1] == {"diffusion.T": 200, "train.epochs": 10}
    assert points[-1] == {"diffusion.T": 600, "train.epochs": 10}
    assert len({json.dumps(p, sort_keys=True) for p in points}) == 6


def test_run_names_are_readable_unique_and_safe():
    assert run_name({"diffusion.T": 200, "train.epochs": 5}) == "T=200,epochs=5"
    assert run_name({"train.lr": 0.0002, "dip.task": "denoise"}) == "lr=0.0002,task=denoise"
    # the same field name in two sections keeps its section to stay unambiguous
    assert run_name({"dip.lr": 0.01, "train.lr": 0.001}) == "dip.lr=0.01,train.lr=0.001"
    assert "/" not in run_name({"run.seed": 1, "data.dir": "a/b"})


def test_override_text_reads_back_as_the_same_value():
    point = {"diffusion.T": 400, "train.epochs": 10.5, "diffusion.schedule": "cosine",
             "train.max_steps": None, "dip.sigmas": [15.0, 25.0], "run.resume": False}
    cfg = load_config(BASE, as_overrides(point))
    assert cfg.diffusion.T == 400 and cfg.train.epochs == 10.5
    assert cfg.diffusion.schedule == "cosine" and cfg.train.max_steps is None
    assert cfg.dip.sigmas == [15.0, 25.0] and cfg.run.resume is False


def test_plan_gives_each_point_its_overrides_run_dir_and_group(tmp_path):
    grid = write_grid(tmp_path / "g.yaml", {"base": str(BASE),
                                             "axes": {"diffusion.T": [200, 400],
                                                      "train.epochs": [5, 10]}})
    plan = make_plan("selftest", grid=str(grid), name="sweep",
                     overrides=[f"launch.folder={tmp_path / 'subs'}", "run.seed=3"])
    assert [t.name for t in plan.tasks] == ["T=200,epochs=5", "T=200,epochs=10",
                                            "T=400,epochs=5", "T=400,epochs=10"]
    assert len({t.run_dir for t in plan.tasks}) == 4
    t = plan.tasks[2]
    assert t.run_dir == str(tmp_path / "subs" / "sweep" / "runs" / "T=400,epochs=5")
    cfg = load_config(t.argv[1], t.argv[2:])  # exactly what the task's main will load
    assert (cfg.diffusion.T, cfg.train.epochs, cfg.run.seed) == (400, 5.0, 3)
    assert cfg.run.dir == t.run_dir
    assert (cfg.wandb.group, cfg.wandb.job_type) == ("sweep", "selftest")
    assert not Path(plan.folder).exists()  # planning submits nothing and writes nothing


def test_a_second_submission_of_the_same_name_gets_its_own_folder(tmp_path):
    first = make_plan("selftest", str(BASE), name="x", overrides=[f"launch.folder={tmp_path}"])
    Path(first.folder).mkdir(parents=True)
    second = make_plan("selftest", str(BASE), name="x", overrides=[f"launch.folder={tmp_path}"])
    assert Path(second.folder).name == "x-2" and second.name == "x-2"


@pytest.mark.parametrize("text, needle", [
    ("axes: [1, 2]\n", "axes: must map"),
    ("base: x.yaml\naxes:\n  diffusion.T: 200\n", "axes.diffusion.T = 200: must be a non-empty list"),
    ("axes:\n  diffusion.T: [200, 200]\n", "values repeat"),
    ("axes:\n  T: [1]\n", "keys look like section.field"),
    ("axes:\n  diffusion.T: [1\n", "invalid YAML"),
    ("axis:\n  diffusion.T: [1]\n", "axis: unknown key"),
    ("axes:\n  run.dir: [a, b]\n", "set by the launcher"),
    ("axes:\n  launch.mem_gb: [1, 2]\n", "share the launch resources"),
    ("axes:\n  diffusion.T: [200, -1]\n", "diffusion.T = -1: must be >= 1"),
    ("axes:\n  diffusion.nope: [1]\n", "unknown key"),
])
def test_bad_grid_is_one_config_error_naming_the_file(tmp_path, text, needle):
    grid = write_grid(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as err:
        make_plan("selftest", str(BASE), grid=str(grid), overrides=[f"launch.folder={tmp_path}"])
    message = str(err.value)
    assert needle in message and "\n" not in message
    assert "bad.yaml" in message or "command line" in message


def test_bad_grid_exits_2_with_one_line(tmp_path):
    grid = write_grid(tmp_path / "bad.yaml", "axes:\n  diffusion.T: seven\n")
    proc = cli("launch.submit", "selftest", "--config", str(BASE), "--grid", str(grid),
               "--dry-run", f"launch.folder={tmp_path}")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bad.yaml" in lines[0]


def test_unknown_job_and_missing_config_are_user_errors(tmp_path, capsys):
    from launch.submit import main

    assert run_job(main, ["no_such_job", "--config", str(BASE), "--dry-run"]) == 2
    assert "jobs/no_such_job.py" in capsys.readouterr().err
    grid = write_grid(tmp_path / "g.yaml", {"axes": {"diffusion.T": [1]}})
    assert run_job(main, ["selftest", "--grid", str(grid), "--dry-run"]) == 2
    assert "no config" in capsys.readouterr().err


def test_dry_run_prints_every_task_and_submits_nothing(tmp_path):
    grid = write_grid(tmp_path / "g.yaml", {"base": str(BASE),
                                             "axes": {"diffusion.T": [200, 400, 600]}})
    proc = cli("launch.submit", "selftest", "--grid", str(grid), "--dry-run", "--name", "dry",
               f"launch.folder={tmp_path / 'subs'}", "launch.timeout_min=7")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "submission dry: 3 task(s) of jobs.selftest" in out
    assert "timeout_min=7" in out
    for i, t in enumerate([200, 400, 600]):
        assert f"[{i}] T={t}  ->  {tmp_path / 'subs' / 'dry' / 'runs' / f'T={t}'}" in out
        assert f"diffusion.T={t}" in out
    assert out.count("python -m jobs.selftest --config") == 3
    assert not (tmp_path / "subs").exists()


def test_array_shards_makes_one_task_per_shard(tmp_path):
    from dipddpm.data.prepare import prepare_data
    from tests.conftest import make_idx_folder

    data = tmp_path / "data"
    cfg = load_config(None, [f"data.source={make_idx_folder(tmp_path / 'idx')}",
                             f"data.dir={data}", "data.shard_size=5"])
    prepare_data(cfg, progress=False)
    n_test = len(read_json(data / "manifest.json")["splits"]["test"]["shards"])
    assert n_test == 4  # 20 test images / 5
    plan = make_plan("selftest", str(BASE), array="shards",
                     overrides=[f"data.dir={data}", "priors.split=test",
                                f"launch.folder={tmp_path / 'subs'}"])
    assert [t.values for t in plan.tasks] == [{"priors.shard": k} for k in range(n_test)]
    assert [t.name for t in plan.tasks] == [f"shard={k}" for k in range(n_test)]
    assert all(f"priors.shard={k}" in t.argv for k, t in enumerate(plan.tasks))
    with pytest.raises(UserError, match="manifest.json"):
        make_plan("selftest", str(BASE), array="shards", overrides=[f"data.dir={tmp_path}/none"])


def test_local_executor_runs_the_grid_in_process_and_status_collects_it(tmp_path):
    from launch.submit import main as submit_main

    grid = write_grid(tmp_path / "g.yaml", {"base": str(BASE),
                                             "axes": {"run.seed": [1, 2],
                                                      "launch.selftest_steps": [2, 3]}})
    folder = tmp_path / "subs"
    submit_main(["selftest", "--grid", str(grid), "--executor", "local", "--name", "loc",
                 f"launch.folder={folder}", "launch.selftest_step_s=0", "wandb.mode=disabled"])
    record = load_record(str(folder / "loc"))
    assert record["executor"] == "local" and record["states"] == ["COMPLETED"] * 4
    rows = collect(record)
    assert [(r["run.seed"], r["launch.selftest_steps"], r["steps"]) for r in rows] == \
        [(1, 2, 2), (1, 3, 3), (2, 2, 2), (2, 3, 3)]
    assert all(r["result"] == "results" and r["wandb_group"] == "loc" for r in rows)
    resolved = yaml.safe_load((Path(rows[1]["run_dir"]) / "config.yaml").read_text())
    assert resolved["run"]["seed"] == 1 and resolved["launch"]["selftest_steps"] == 3
    assert resolved["wandb"]["group"] == "loc" and resolved["wandb"]["job_type"] == "selftest"

    proc = cli("launch.status", str(folder / "loc"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert [r["steps"] for r in json.loads(proc.stdout)] == [2, 3, 2, 3]
    proc = cli("launch.status", "loc", "--folder", str(folder))
    assert "4 COMPLETED" in proc.stdout and "| seed=1,selftest_steps=3 |" in proc.stdout


def test_local_failure_is_recorded_and_the_rest_still_run(tmp_path):
    from dipddpm.launch.submit import submit

    grid = write_grid(tmp_path / "g.yaml", {"axes": {"launch.selftest_steps": [1, 2]}})
    plan = make_plan("selftest", str(BASE), grid=str(grid), name="f",
                     overrides=[f"launch.folder={tmp_path}", *QUICK[1:]])
    # the first task's run dir is a file: its job fails, the second still runs
    Path(plan.tasks[0].run_dir).parent.mkdir(parents=True)
    Path(plan.tasks[0].run_dir).write_text("in the way")
    record, _ = submit(plan, "local")
    assert record["states"] == ["FAILED", "COMPLETED"]
    assert record["errors"][0] and record["errors"][1] is None
    assert (Path(plan.folder) / "logs" / "local-0.err").read_text().count("Traceback") == 1
    assert task_result(plan.tasks[0].run_dir) == ("", {})


def test_local_executor_logs_the_grid_to_one_wandb_group(tmp_path):
    """W&B (offline) sees the submission's group and the grid value in the run config."""
    from dipddpm.launch.submit import submit
    from dipddpm.tracking import read_wandb_offline

    grid = write_grid(tmp_path / "g.yaml", {"axes": {"diffusion.T": [123]}})
    plan = make_plan("selftest", str(BASE), grid=str(grid), name="wb",
                     overrides=[f"launch.folder={tmp_path}", "launch.selftest_steps=2",
                                "launch.selftest_step_s=0", "wandb.mode=offline"])
    old = {k: os.environ.get(k) for k in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR")}
    try:
        record, _ = submit(plan, "local")
    finally:  # the Tracker points these at the first run dir; do not leak them to other tests
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    assert record["states"] == ["COMPLETED"]
    run = read_wandb_offline(plan.tasks[0].run_dir)
    assert run["config"]["wandb"]["group"] == "wb"
    assert run["config"]["wandb"]["job_type"] == "selftest"
    assert run["config"]["diffusion"]["T"] == 123
    assert [h["count"] for h in run["history"]] == [1, 2]
    assert [r["count"] for r in read_jsonl(Path(plan.tasks[0].run_dir) / "metrics.jsonl")] == [1, 2]


@pytest.mark.parametrize("grid", sorted((REPO / "configs" / "grids").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_grid_files_plan(grid, tmp_path):
    g = load_grid(grid)
    assert g.base is not None and g.points()
    if not g.base.exists():
        pytest.skip(f"{g.base.name} is not written yet")
    job = {"train_T_epochs.yaml": "train", "dip_iters.yaml": "fit_dip"}.get(grid.name, "selftest")
    try:
        plan = make_plan(job, grid=str(grid), overrides=[f"launch.folder={tmp_path}"])
    except UserError as e:
        if f"jobs/{job}.py" in str(e):
            pytest.skip(f"jobs/{job}.py is not written yet")
        raise
    assert len(plan.tasks) == len(g.points())


LATE_SIGNAL = """
import os, signal, sys, time
from dipddpm.launch.task import JobTask

def requeue(signum, frame):  # what submitit's handler does: requeue, then exit 255
    print("requeued", flush=True)
    sys.exit(-1)

signal.signal(signal.SIGUSR2, requeue)
result = JobTask("selftest", project_root=sys.argv[1])(sys.argv[2:])
os.kill(os.getpid(), signal.SIGUSR2)  # SLURM's timeout warning, after the job returned
time.sleep(0.2)
print("finished", result["steps"], flush=True)
"""


def test_a_timeout_signal_after_the_job_returned_is_ignored(tmp_path):
    """A task that ends as the warning arrives must end COMPLETED, not requeued or killed."""
    env = {**os.environ, "SUBMITIT_EXECUTOR": "slurm"}
    proc = subprocess.run([sys.executable, "-c", LATE_SIGNAL, str(REPO), "--config", str(BASE),
                           *QUICK, f"run.dir={tmp_path / 'run'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "requeued" not in proc.stdout and "finished 2" in proc.stdout


def test_resume_of_a_local_submission_runs_only_the_unfinished_task(tmp_path):
    from dipddpm.launch.submit import submit
    from launch.submit import main as submit_main

    grid = write_grid(tmp_path / "g.yaml", {"axes": {"launch.selftest_steps": [1, 2]}})
    plan = make_plan("selftest", str(BASE), grid=str(grid), name="r",
                     overrides=[f"launch.folder={tmp_path}", *QUICK[1:]])
    blocker = Path(plan.tasks[0].run_dir)  # the first task's run dir is a file: it fails
    blocker.parent.mkdir(parents=True)
    blocker.write_text("in the way")
    assert submit(plan, "local")[0]["states"] == ["FAILED", "COMPLETED"]
    folder = Path(plan.folder)
    second = read_json(Path(plan.tasks[1].run_dir) / "results.json")
    blocker.unlink()
    submit_main(["--resume", str(folder)])
    record = load_record(str(folder))
    assert record["states"] == ["COMPLETED", "COMPLETED"]
    assert record["job_ids"] == ["local-0-2", "local-1"]
    assert record["resumed"][0]["tasks"] == [0] and record["resumed"][0]["states"] == ["FAILED"]
    assert read_json(Path(plan.tasks[1].run_dir) / "results.json") == second  # not rerun
    rows = collect(record)
    assert [(r["state"], r["attempt"], r["steps"]) for r in rows] == \
        [("COMPLETED", 2, 1), ("COMPLETED", 1, 2)]
    proc = cli("launch.submit", "--resume", str(folder))  # nothing left to do
    assert proc.returncode == 0 and "nothing to resume (2 of 2 task(s) COMPLETED)" in proc.stdout
    proc = cli("launch.submit", "--resume", str(folder), "run.seed=4")
    assert proc.returncode == 2 and "only launch.* (resources) may change" in proc.stderr


@pytest.mark.parametrize("content", ['{"name": "x"}', "[1, 2]",
                                     '{"name": "x", "job": "selftest", "folder": "f", '
                                     '"executor": "slurm", "tasks": [{}], "job_ids": ["1_0"]}'])
def test_status_of_a_json_that_is_no_submission_is_one_line(tmp_path, content):
    (tmp_path / "submission.json").write_text(content)
    for proc in (cli("launch.status", str(tmp_path)),
                 cli("launch.submit", "--resume", str(tmp_path))):
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "not a submission record" in lines[0], proc.stderr


def test_an_unknown_section_is_blamed_on_the_command_line(tmp_path):
    proc = cli("launch.submit", "selftest", "--config", str(BASE), f"launch.folder={tmp_path}",
               "nosuchsection.x=1")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: command line: nosuchsection.x = '1': unknown key; "
                                   "top level has " + ", ".join(sorted(vars(load_config(None)))))
    assert list(tmp_path.iterdir()) == []  # nothing submitted, no folder
    with pytest.raises(ConfigError, match=r"command line: trian.lr = '1': .*mean train.lr\?"):
        load_config(BASE, ["trian.lr=1"])


def test_sbatch_templates_name_configs_that_exist():
    import re

    for template in sorted((REPO / "slurm").glob("*.sbatch")):
        named = re.findall(r"configs/[\w/.-]+\.yaml", template.read_text())
        assert named, template
        for config in named:
            assert (REPO / config).is_file(), f"{template.name} names {config}"
