"""Run the study's stages: here, one after another (inline), or as one SLURM array per wave.

Every stage runs through `StageTask`, in this process or in an array task, so both executors
leave the same files: the job's own run dir plus `stage.json` ({"job", "argv", "config",
"seconds"}), written last. A stage whose stage.json holds the same config, apart from neutral
keys (dipddpm.config), is done and skipped; any other is (re)run, and every job resumes from
what its run dir already holds. So rerunning the study after a crash or a timeout redoes only
what is missing, and a lengthened run (more train.epochs) goes on from its checkpoints; a
stage whose run dir holds a run of other result-changing settings stops the study with one line
naming the stage and the keys (start such a study in a new run.dir, or delete that stage's dir).
The study's own run dir holds only its config; each stage checks its own.
Two study processes on one machine (a `--only` run beside the main one) never run one stage
at once: a stage's run dir is held while its job runs (`runs.run_dir_lock`); the other process
waits for it, then skips the stage if it finished.

The data is prepared first, here, when data.dir has no dataset yet (seconds), and the report
is written last, here, from the run dirs alone.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Sequence

import submitit

from dipddpm.config import Config, UserError, load_config, result_keys
from dipddpm.data.prepare import prepare_data, summary
from dipddpm.launch.plan import Plan
from dipddpm.launch.submit import slurm_executor
from dipddpm.progress import bar
from dipddpm.launch.task import RESUME, JobTask
from dipddpm.report.study_report import build_report, report_overrides
from dipddpm.runs import STAGE_FILE, atomic_write_json, prepare_run_dir, run_dir_lock
from dipddpm.study.estimate import estimate
from dipddpm.study.export import export_study
from dipddpm.study.plan import Stage, describe, plan_study, project_root

WAVE_POLL_S = 10.0  # how often a waiting study asks SLURM (through submitit) about its tasks


def run_dir_of(argv: list[str]) -> Path:
    return Path(next(a for a in reversed(argv) if a.startswith("run.dir=")).split("=", 1)[1])


def stage_config(argv: list[str]) -> Config:
    """The resolved config of a stage's argv (`--config FILE key=value ...`)."""
    return load_config(argv[1], argv[2:])


def is_done(stage: Stage) -> bool:
    return recorded(stage.argv, stage.cfg)


def recorded(argv: list[str], cfg: Config) -> bool:
    """The stage of this argv and config is done: stage.json is there and records its config,
    neutral keys aside (a stage.json written before it recorded configs: the same argv)."""
    path = run_dir_of(argv) / STAGE_FILE
    try:
        done = json.loads(path.read_text())
        if "config" not in done:
            return done["argv"] == argv
        return result_keys(done["config"]) == result_keys(cfg.to_dict())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


class StageTask(submitit.helpers.Checkpointable):
    """`task(job, argv)`: run jobs.<job>.main(argv), then write stage.json. One object serves a
    whole wave's array; on preemption the task is requeued with run.resume=true."""

    def __call__(self, job: str, argv: list[str]):
        run_dir = run_dir_of(argv)
        plain = [a for a in argv if a != RESUME]
        cfg = stage_config(plain)
        with run_dir_lock(run_dir) as waited:
            # checked under the lock: another process may have finished it since it was planned
            if recorded(plain, cfg):
                print(f"{run_dir}: finished by "
                      f"{'the process waited for' if waited else 'another process'}", flush=True)
                return
            start = time.perf_counter()
            JobTask(job, project_root=str(Path(__file__).resolve().parents[2]))(argv)
            atomic_write_json(run_dir / STAGE_FILE,
                              {"job": job, "argv": plain, "config": cfg.to_dict(),
                               "seconds": time.perf_counter() - start})

    def checkpoint(self, job: str, argv: list[str]):
        argv = list(argv) if RESUME in argv else list(argv) + [RESUME]
        return submitit.helpers.DelayedSubmission(self, job, argv)


def _prepare_data(cfg: Config) -> None:
    """Shards from data.source (or $DIPDDPM_DATA) unless data.dir already holds a dataset."""
    if (Path(cfg.data.dir) / "manifest.json").exists():
        return
    print(summary(prepare_data(cfg)), flush=True)


def _run_inline(stages: list[Stage]) -> None:
    task = StageTask()
    for i, s in enumerate(stages, 1):
        if is_done(s):
            print(f"[{i}/{len(stages)}] {s.name}: done, skipped", flush=True)
            continue
        print(f"[{i}/{len(stages)}] {s.name}: jobs.{s.job}", flush=True)
        start = time.perf_counter()
        try:
            task(s.job, s.argv)
        except UserError as e:
            raise UserError(f"study stage {s.name}: {e}") from None
        print(f"[{i}/{len(stages)}] {s.name}: {time.perf_counter() - start:.0f} s", flush=True)


def _run_slurm(cfg: Config, stages: list[Stage], study_dir: Path) -> None:
    for wave in sorted({s.wave for s in stages}):
        todo = [s for s in stages if s.wave == wave and not is_done(s)]
        if not todo:
            continue
        plan = Plan(name=f"{study_dir.name}-wave{wave}", job="study",
                    folder=str(study_dir / "submissions" / f"wave{wave}"), config="",
                    overrides=[], grid=None, array=None, cwd=str(Path.cwd()), cfg=cfg)
        ex = slurm_executor(plan)
        jobs = ex.map_array(StageTask(), [s.job for s in todo], [s.argv for s in todo])
        print(f"wave {wave}: {len(todo)} stage(s) in array {jobs[0].job_id.split('_')[0]}",
              flush=True)
        failed = wait_for_tasks(f"wave {wave}", [(s.name, j) for s, j in zip(todo, jobs)])
        if failed:
            raise UserError(f"wave {wave}: {len(failed)} stage(s) failed: " + "; ".join(failed))


def wait_for_tasks(desc: str, named_jobs: list, poll_s: float = WAVE_POLL_S) -> list[str]:
    """Wait for submitit jobs [(name, job)], reporting each as it finishes (a line, and a bar
    over the tasks finished); return one line per failed task."""
    failed, pending = [], list(named_jobs)
    with bar(len(pending), desc, unit="task") as finished:
        while pending:
            still = []
            for name, j in pending:
                if not j.done():
                    still.append((name, j))
                    continue
                try:
                    j.result()
                    outcome = "done"
                except Exception as e:  # noqa: BLE001 - any task failure is reported the same way
                    last = [ln for ln in str(e).strip().splitlines() if ln.strip()]
                    failed.append(f"{name} (job {j.job_id}): {last[-1] if last else e}")
                    outcome = "FAILED"
                finished.update(1)
                finished.write(f"{desc}: {name} {outcome} ({finished.n}/{finished.total})",
                               file=sys.stdout)
                sys.stdout.flush()
            pending = still
            if pending:
                time.sleep(poll_s)
    return failed


def run_study(cfg: Config, config_path: str, overrides: list[str], *,
              dry_run: bool = False, only: Sequence[str] = ()) -> Path:
    """Prepare the data, run every stage not yet done, write REPORT.md; return its path.
    `only`: run just the stages of these names (no report)."""
    study_dir = Path(cfg.run.dir)
    stages = plan_study(cfg, study_dir)
    if only:
        names = [s.name for s in stages]
        unknown = [n for n in only if n not in names]
        if unknown:
            raise UserError(f"--only {unknown[0]}: no such stage in this study "
                            f"({', '.join(names)})")
        stages = [s for s in stages if s.name in only]
    costs = estimate(stages, cfg, is_done)
    print(f"study {study_dir}: {len(stages)} stage(s), executor {cfg.study.executor}\n"
          f"{describe(stages, argv=dry_run, costs=costs)}", flush=True)
    if dry_run:
        return study_dir / "REPORT.md"
    prepare_run_dir(cfg, reads=())  # each stage checks its own run dir
    start = time.perf_counter()
    _prepare_data(cfg)
    if cfg.study.executor == "slurm":
        _run_slurm(cfg, stages, study_dir)
    else:
        _run_inline(stages)
    if only:
        return study_dir / "REPORT.md"
    build_report(load_config(config_path, [*overrides, f"run.dir={study_dir / 'report'}"]),
                 study_dir)
    print(f"study done in {time.perf_counter() - start:.0f} s: {study_dir / 'REPORT.md'}")
    return study_dir / "REPORT.md"


def export_results(cfg: Config, out_dir) -> Path:
    """Copy the study's finished stages into out_dir (dipddpm/study/export.py) and build the
    report there (RESULTS.md); return its path."""
    study_dir = Path(cfg.run.dir)
    stages = plan_study(cfg, study_dir)
    record = export_study(cfg, stages, study_dir, Path(out_dir), project_root(), is_done)
    done = sum(s["done"] for s in record["stages"].values())
    print(f"{out_dir}: {done} of {len(stages)} stage(s) finished and copied", flush=True)
    # the report as `python -m jobs.report out_dir` builds it (no setting of this machine's)
    report_cfg = load_config(str(project_root() / "configs/base.yaml"),
                             report_overrides(out_dir))
    return build_report(report_cfg, out_dir)["report"]
