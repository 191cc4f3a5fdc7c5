"""Tracker writes metrics.jsonl and an offline W&B run that reads back value for value.

One logged (and resumed) run is shared by most asserts: wandb's startup costs ~1-2 s a run.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dipddpm.config import Config, RunConfig, WandbConfig
from dipddpm.runs import read_jsonl
from dipddpm.tracking import (WANDB_ID_FILE, Tracker, WandbFileError, read_wandb_offline,
                               rewind_metrics, rows_through_step, wandb_vs_metrics)

BIG_NOTE = "x" * 70_000  # a record over two 32 KiB blocks: FIRST/MIDDLE/LAST pieces
FIRST_STEPS = range(0, 300, 3)
SECOND_STEPS = range(300, 330, 3)


def _metrics(step: int) -> dict:
    # Values with many digits: a float that went through float32 or rounding would not match.
    return {"loss": 1.0 / (step + 3), "lr": 1e-4 * (1 + step / 7), "images_seen": 64 * step}


def _cfg(run_dir: Path, mode: str = "offline"):
    # Built directly, not validated: the checks of other sections import modules not needed here.
    return Config(run=RunConfig(dir=str(run_dir), seed=3),
                  wandb=WandbConfig(mode=mode, group="g1", tags=["test"]))


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A run logged in two sessions (the second a resume), with an image, a table and a summary."""
    tmp = tmp_path_factory.mktemp("tracking")
    run_dir = tmp / "run-a"
    home = tmp / "home"
    home.mkdir()
    png = tmp / "grid.png"
    pixels = (np.arange(28 * 28) % 256).astype(np.uint8).reshape(28, 28)
    Image.fromarray(pixels).save(png)
    with pytest.MonkeyPatch.context() as mp:
        # setenv then delenv: the context then also removes what the Tracker sets by default
        for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR",
                    "WANDB_SILENT", "WANDB_MODE", "WANDB_RUN_ID", "WANDB_RESUME"):
            mp.setenv(var, "")
            mp.delenv(var)
        mp.setenv("HOME", str(home))
        cfg = _cfg(run_dir)
        with Tracker(run_dir, cfg, job_type="train", x_axis="images_seen") as tr:
            for step in FIRST_STEPS:
                tr.log(_metrics(step), step=step)
            tr.log({"note": BIG_NOTE}, step=FIRST_STEPS[-1])
            tr.log_image("samples", png, step=FIRST_STEPS[-1])
            tr.log_table("psnr", ["t0", "psnr"], [[100, 21.5], [200, 23.25]])
            tr.log_lines("lines/psnr", {"a": [(1, 2.5), (2, 3.0)], "b": [(1, 1.5), (4, None)]},
                         xname="T")
            tr.summary({"best_loss": 0.125})
            first_id = tr.run_id
        with Tracker(run_dir, cfg, job_type="train", x_axis="images_seen") as tr:  # resumed
            second_id = tr.run_id
            for step in SECOND_STEPS:
                tr.log(_metrics(step), step=step)
    return {"run_dir": run_dir, "cfg": cfg, "home": home, "pixels": pixels,
            "ids": (first_id, second_id), "read": read_wandb_offline(run_dir)}


def test_history_matches_logged_values_exactly(logged):
    rows = [r for r in logged["read"]["history"] if "loss" in r]
    steps = list(FIRST_STEPS) + list(SECOND_STEPS)
    assert [r["_step"] for r in rows] == steps
    for row, step in zip(rows, steps):
        assert {k: row[k] for k in _metrics(step)} == _metrics(step)


def test_large_record_across_blocks_reads_back(logged):
    notes = [r["note"] for r in logged["read"]["history"] if "note" in r]
    assert notes == [BIG_NOTE]


def test_config_and_run_fields(logged):
    read = logged["read"]
    assert read["config"] == logged["cfg"].to_dict()
    assert read["summary"]["best_loss"] == 0.125
    assert (read["job_type"], read["group"]) == ("train", "g1")
    assert len(read["files"]) == 2  # one .wandb file per session


def test_image_and_table_files_exist(logged):
    read = logged["read"]
    files_dir = Path(read["files"][0]).parent / "files"
    last = [r for r in read["history"] if "samples" in r]
    assert len(last) == 1 and last[0]["_step"] == FIRST_STEPS[-1]
    image = last[0]["samples"]
    assert image["_type"] == "image-file" and (image["width"], image["height"]) == (28, 28)
    assert np.array_equal(np.asarray(Image.open(files_dir / image["path"])), logged["pixels"])
    table = last[0]["psnr"]
    assert json.loads((files_dir / table["path"]).read_text())["data"] == [[100, 21.5], [200, 23.25]]


def test_x_axis_is_defined_in_each_session_and_line_charts_hold_their_points(logged):
    read = logged["read"]
    x_axis = [{"name": "images_seen"}, {"glob_name": "*", "step_metric": "images_seen"}]
    assert read["metrics"] == x_axis * 2  # the resumed session defines it again
    files_dir = Path(read["files"][0]).parent / "files"
    chart = [r for r in read["history"] if "lines/psnr_table" in r]
    assert len(chart) == 1 and chart[0]["_step"] == FIRST_STEPS[-1]
    table = json.loads((files_dir / chart[0]["lines/psnr_table"]["path"]).read_text())
    assert sorted(map(tuple, table["data"])) == [(1, "a", 2.5), (1, "b", 1.5), (2, "a", 3.0)]


def test_metrics_jsonl_has_the_same_values(logged):
    lines = read_jsonl(logged["run_dir"] / "metrics.jsonl")
    numeric = [r for r in lines if "loss" in r]
    steps = list(FIRST_STEPS) + list(SECOND_STEPS)
    assert numeric == [{"step": s, **_metrics(s)} for s in steps]
    assert [r for r in lines if "note" in r] == [{"step": FIRST_STEPS[-1], "note": BIG_NOTE}]


def test_resume_keeps_the_run_id(logged):
    first, second = logged["ids"]
    assert first == second == logged["read"]["run_id"]
    assert (logged["run_dir"] / WANDB_ID_FILE).read_text().strip() == first


def test_nothing_written_to_home(logged):
    assert list(logged["home"].iterdir()) == []
    assert (logged["run_dir"] / "wandb" / "cache").is_dir()


def test_corrupt_file_raises(logged, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(logged["run_dir"], copy)
    wandb_file = Path(read_wandb_offline(copy)["files"][0])
    data = bytearray(wandb_file.read_bytes())
    data[7 + 7 + 2] ^= 0xFF  # a byte inside the first record's payload
    wandb_file.write_bytes(bytes(data))
    with pytest.raises(WandbFileError, match="checksum"):
        read_wandb_offline(copy)


def test_not_a_wandb_file_raises(tmp_path):
    bad = tmp_path / "wandb" / "offline-run-20260101_000000-abc" / "run-abc.wandb"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"PK\x03\x04 something else")
    with pytest.raises(WandbFileError, match="not a .wandb file"):
        read_wandb_offline(tmp_path)


def test_disabled_mode_writes_only_metrics(tmp_path):
    run_dir = tmp_path / "run-d"
    with Tracker(run_dir, _cfg(run_dir, "disabled"), job_type="sample") as tr:
        tr.log({"psnr": 22.5}, step=4)
        tr.log_image("x", tmp_path / "missing.png", step=4)  # nothing to do, so no error
        tr.log_table("t", ["a"], [[1]])
        tr.summary({"a": 1})
    assert read_jsonl(run_dir / "metrics.jsonl") == [{"step": 4, "psnr": 22.5}]
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"]


def test_not_enabled_writes_nothing(tmp_path):
    run_dir = tmp_path / "run-rank1"
    with Tracker(run_dir, _cfg(run_dir), job_type="train", enabled=False) as tr:
        tr.log({"loss": 1.0}, step=0)
        tr.summary({"a": 1})
    assert not run_dir.exists()


def test_import_does_not_import_wandb():
    code = "import sys, dipddpm.tracking; print('wandb' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- resume, failures
# Real processes: a job logging through a Tracker, killed (-9) or with W&B's service killed
# (the SIGTERM that SLURM sends on scancel or requeue reaches it too), then resumed.

JOB = """
import os, signal, sys, time
import psutil
from dipddpm.config import Config, RunConfig, WandbConfig
from dipddpm.tracking import Tracker

run_dir, keep, then = sys.argv[1], sys.argv[2], sys.argv[5]
first, last = int(sys.argv[3]), int(sys.argv[4])
cfg = Config(run=RunConfig(dir=run_dir, seed=3), wandb=WandbConfig(mode="offline"))
with Tracker(run_dir, cfg, job_type="t", keep_rows=None if keep == "all" else int(keep)) as tr:
    for step in range(first, last):
        if step == (first + last) // 2 and then == "term-wandb":
            for p in psutil.Process().children(recursive=True):
                if p.name() == "wandb-core":
                    p.send_signal(signal.SIGTERM)
                    p.wait(10)
        tr.log({"loss": 1.0 / (step + 3), "step_sq": step * step}, step=step)
    print("logged", tr.rows, flush=True)
    if then == "hang":
        time.sleep(600)
    if then == "term-wandb":
        raise RuntimeError("the job's own error")
"""


def _job(run_dir, keep, first, last, then="finish", **kw):
    return subprocess.Popen([sys.executable, "-c", JOB, str(run_dir), str(keep), str(first),
                             str(last), then], cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _steps(rows, key="step"):
    return [r[key] for r in rows]


def test_kill_9_then_resume_cuts_redone_rows_and_replays_what_wandb_missed(tmp_path):
    import os
    import signal

    run = tmp_path / "run"
    proc = _job(run, "all", 0, 12, "hang", start_new_session=True)
    assert proc.stdout.readline().split() == ["logged", "12"], proc.stderr.read()
    os.killpg(proc.pid, signal.SIGKILL)  # the job and W&B's service, as a node failure would
    proc.wait()
    held = [h["_step"] for h in read_wandb_offline(run)["history"]]
    assert len(held) < 12  # W&B had not flushed them all: without a replay they stay lost
    # the job's checkpoint had seen 9 rows: steps 9-11 are redone and logged again
    out, err = _job(run, 9, 9, 15).communicate(timeout=120)
    assert out.split() == ["logged", "15"], err
    assert _steps(read_jsonl(run / "metrics.jsonl")) == list(range(15))  # each step once
    assert _steps(read_wandb_offline(run)["history"], "_step") == list(range(15))
    assert wandb_vs_metrics(run) == []  # value for value
    assert "replayed" in err


def test_a_wandb_failure_neither_stops_the_job_nor_hides_its_error(tmp_path):
    run = tmp_path / "run"
    out, err = _job(run, "all", 0, 10, "term-wandb").communicate(timeout=120)
    assert out.split() == ["logged", "10"], err  # every step logged after W&B died
    assert _steps(read_jsonl(run / "metrics.jsonl")) == list(range(10))
    assert err.count("W&B failed") == 1 and err.count("\n") < 30, err  # one line, no W&B trace
    assert err.rstrip().endswith("RuntimeError: the job's own error")  # its own, unhidden
    assert "ConnectionResetError" not in err.split("W&B failed")[1].split("\n", 1)[1]
    out, err = _job(run, 10, 10, 13).communicate(timeout=120)  # the resumed job
    assert out.split() == ["logged", "13"], err
    assert _steps(read_wandb_offline(run)["history"], "_step") == list(range(13))
    assert wandb_vs_metrics(run) == []


def test_rewind_metrics_cuts_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    assert rewind_metrics(path) == [{"step": 1}, {"step": 2}, {"step": 3}]
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'  # appends stay readable
    assert rewind_metrics(path, 2) == [{"step": 1}, {"step": 2}]
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert rows_through_step(path, 1) == 1 and rows_through_step(path, 5) == 2
    assert rows_through_step(path, 2, after=lambda row: row["step"] == 2) == 1
