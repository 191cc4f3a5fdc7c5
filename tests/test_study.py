"""jobs.study: the plan of stages, a whole micro study inline, and one wave as a SLURM array."""
import json
import re
from pathlib import Path

import pytest

from dipddpm.config import ConfigError, load_config
from dipddpm.study.plan import describe, plan_study
from tests.conftest import REPO, make_shards, run_module

QUICKSTART = str(REPO / "configs/quickstart.yaml")
# Every stage at toy size: a study that runs end to end in about a minute.
MICRO = [
    "study.T_values=[10, 20]", "study.main_T=20", "study.epochs=[0.25]", "study.dip_iters=[1]",
    "study.sampling_num_images=2",
    "study.common=[model.name=unet-tiny, dip.channels_down=8, dip.channels_up=8, "
    "dip.channels_skip=2, wandb.mode=disabled]",
    "study.train=[train.epochs=0.5, train.batch_size=16, train.warmup_images=16, "
    "train.log_every_images=16, train.sample_num_images=4, train.sample_steps=2]",
    "study.fit_dip=[dip.num_images=2, 'dip.sigmas=[25]', dip.iters=4, dip.record_every=2, "
    "dip.batch_size=2, dip.es_window=2, dip.es_patience=2]",
    "study.classifier=[classifier.max_steps=2, classifier.batch_size=16, "
    "'classifier.floor_num_images=[4]', classifier.kid_subset_size=2, "
    "classifier.kid_num_subsets=2]",
    "study.restore=[protocol.num_images=2, 'protocol.tasks=[denoise]', 'protocol.sigmas=[25]', "
    "'protocol.start_c=[1]', 'protocol.sigma_t0s=[0.3]', protocol.oracle_e=false, "
    "'protocol.steps=[2]', 'protocol.samplers=[ddim]', dip.iters=3, dip.batch_size=2, "
    "dip.es_window=2, dip.es_patience=2]",
    "study.generation=[protocol.gen_num_images=4, 'protocol.gen_ddim_steps=[2]', "
    "protocol.gen_ddpm=false, 'protocol.gen_sigma_t0s=[0.5]', protocol.gen_steps=2, "
    "protocol.batch_size=4, dip.iters=3, classifier.kid_subset_size=2, "
    "classifier.kid_num_subsets=2]",
    "study.stages=[train, ablation_dip_iters, ablation_epochs, fit_dip, classifier, sampling, "
    "restore, generation]",
]


def test_quickstart_plan_has_every_table_and_skips_the_main_points(tmp_path):
    cfg = load_config(QUICKSTART, [f"run.dir={tmp_path}"])
    stages = plan_study(cfg, tmp_path)
    names = [s.name for s in stages]
    for T in cfg.study.T_values:
        assert f"train/ddpm-T{T}" in names and f"train/dip_in_training-T{T}" in names
        assert f"sampling/dip_in_training-T{T}" in names
    # the main variant run is the ablations' other point: not trained twice
    assert "ablation/dip_in_training-dip_iters1" in names
    assert not any("dip_iters3" in n or "epochs0.006" in n for n in names)
    assert [s.wave for s in stages] == sorted(s.wave for s in stages)
    by_name = {s.name: s for s in stages}
    variant = by_name["train/dip_in_training-T250"].cfg
    assert variant.train.noise == "dip" and variant.diffusion.T == 250
    assert variant.model.name == "unet-tiny" and variant.train.batch_size == 32
    assert by_name["train/ddpm-T250"].cfg.train.noise == "gaussian"
    gen = by_name["generation"].cfg
    assert gen.protocol.checkpoint == str(tmp_path / "train/ddpm-T500")
    assert gen.classifier.dir == by_name["classifier"].cfg.classifier.dir  # same feature net
    assert by_name["fit_dip"].cfg.dip.channels_down == 128  # the study's net for its table


def test_bad_stage_override_names_the_stage(tmp_path):
    cfg = load_config(QUICKSTART, [f"run.dir={tmp_path}", "study.fit_dip=[dip.iters=0]"])
    with pytest.raises(ConfigError, match=r"study stage fit_dip: .*dip.iters = 0"):
        plan_study(cfg, tmp_path)
    with pytest.raises(ConfigError, match=r"study.main_T = 7: must be one of study.T_values"):
        load_config(QUICKSTART, ["study.main_T=7"])
    r = run_module("jobs.study", f"run.dir={tmp_path / 'x'}", "study.stages=[train, plots]")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: command line: study.stages")


def test_cpu_study_restores_at_each_checkpoint_with_one_dip_cache(tmp_path):
    cfg = load_config(str(REPO / "configs/cpu_study.yaml"), [f"run.dir={tmp_path}"])
    by_name = {s.name: s.cfg for s in plan_study(cfg, tmp_path)}
    main = tmp_path / "train/ddpm-main"
    last, early = by_name["restore"], by_name["restore-ema-img-000000060032"]
    assert last.protocol.checkpoint == str(main)
    assert early.protocol.checkpoint == str(main / "weights/ema-img-000000060032.pt")
    assert last.protocol.dip_cache == early.protocol.dip_cache == str(tmp_path / "dip-cache")
    assert last.protocol.num_images == 256 and last.dip.es_patience == 200
    with pytest.raises(ConfigError, match="study.restore_checkpoints"):
        load_config(str(REPO / "configs/cpu_study.yaml"), ["study.restore_checkpoints=[a, a]"])


def test_stage_estimates_count_the_work_of_each_stage(tmp_path):
    from dipddpm.evaluate.flops import dip_iteration_gflop, unet_forward_gflop
    from dipddpm.models.dip import SkipSpec
    from dipddpm.models.unet import build_unet
    from dipddpm.study.estimate import estimate

    cfg = load_config(str(REPO / "configs/cpu_study.yaml"),
                      [f"run.dir={tmp_path}", "study.gflops_train=10", "study.gflops_forward=20",
                       "study.gflops_dip=5"])
    stages = plan_study(cfg, tmp_path)
    by_name = {s.name: s for s in stages}
    unet = unet_forward_gflop(build_unet("unet-small"))
    dip = dip_iteration_gflop(SkipSpec.from_config(by_name["restore"].cfg.dip))
    costs = estimate(stages, cfg, done=lambda s: False)
    train = costs["train/ddpm-main"]
    assert train.gflop["train"] == pytest.approx(3 * unet * 20 * 60_000)
    assert train.seconds == pytest.approx(train.gflop["train"] / 10
                                          + train.gflop["forward"] / 20)
    # restoration: 256 images x 3 tasks x (400 + patience 200) DIP iterations, charged once
    # for the two stages that share the cache; chains: 2 samplers x K = 5 + 20 per start (every
    # start at t0 >= 20), the DDPM alone also its whole chain: t* steps direct, T from noise
    from dipddpm.diffusion import Diffusion, linear_betas
    from dipddpm.protocols.arms import direct_t0

    last, early = costs["restore"], costs["restore-ema-img-000000060032"]
    assert last.gflop["dip"] == pytest.approx(256 * 3 * 600 * dip) and "dip" not in early.gflop
    d = Diffusion(linear_betas(1000))
    starts = {"denoise": 2 + 2, "inpaint_box": 2}  # c = 1, 2 (e from y) + two sigma_t0s
    ddpm_only = {25: 2 * (25 + direct_t0(d, 25)) + 1, 50: 2 * (25 + direct_t0(d, 50)) + 1,
                 None: 2 * (25 + 1000)}  # + Tweedie, K = 1, once
    nfe = sum(4 * starts[t] * 50 + ddpm_only[s]
              for t, s in (("denoise", 25), ("denoise", 50), ("inpaint_box", None)))
    assert early.gflop["forward"] == pytest.approx(256 * nfe * unet)
    # FID vs training: every 2nd of 20 epoch snapshots at N = 1,000 x 50 steps, then the last
    # weights at N = 10,000 x 100 steps
    assert costs["fid_curve"].gflop["forward"] == pytest.approx((10 * 1000 * 50 + 10_000 * 100)
                                                                * unet)
    # the generation protocol at N = 1,000: both samplers at K = 10/20/50/100 (50: the starts'
    # NFE too), one DIP-start chain of 50 steps per source (2) and level (3), one clean control
    # per level; the baselines alone at their own N, each stage one sampler, no start
    assert costs["generation"].gflop["forward"] == pytest.approx(
        1000 * (2 * 180 + (2 + 1) * 3 * 50) * unet)
    front = {s.name: s.cfg.protocol for s in stages if s.kind == "generation_front"}
    assert [(k, p.gen_samplers, p.gen_num_images, p.gen_ddim_steps, p.gen_ddpm, p.gen_sources)
            for k, p in front.items()] == [
        ("generation-ddim-n10000", ["ddim"], 10_000, [10, 20, 50, 100], False, []),
        ("generation-ddpm1000-n2000", ["ddpm"], 2000, [], True, [])]
    assert costs["generation-ddim-n10000"].gflop["forward"] == pytest.approx(10_000 * 180 * unet)
    assert costs["generation-ddpm1000-n2000"].gflop["forward"] == pytest.approx(2000 * 1000 * unet)
    assert all(by_name[k].cfg.protocol.checkpoint == by_name["generation"].cfg.protocol.checkpoint
               for k in front)
    one = load_config(str(REPO / "configs/cpu_study.yaml"),
                      [f"run.dir={tmp_path}", "study.front_ddpm_num_images=0"])
    assert [s.name for s in plan_study(one, tmp_path) if s.kind == "generation_front"] == \
        ["generation-ddim-n10000"]  # a 0 drops the stage
    # its wall time in the export: every arm's chains, as the generation stage's
    from dipddpm.study.export import stage_seconds
    assert stage_seconds("generation_front", {"n": 10, "sources": {},
                                              "arms": [{"reverse_seconds_per_sample": 2.0}]},
                         {"seconds": 99.0})[0] == 20.0
    # the classifier has no FLOP model (~2 min here): the dry run and the report say so
    assert costs["classifier"].seconds == 0 and costs["classifier"].note == "not counted"
    assert "~0 s (not counted)" in describe(stages, costs=costs).splitlines()[
        [s.name for s in stages].index("classifier")]
    # whole stages (the export's estimate vs wall time): each with the fits its time counts
    whole = estimate(stages, cfg, done=lambda s: False, progress=False)
    assert whole["restore-ema-img-000000060032"].gflop["dip"] == last.gflop["dip"]
    # a training stage under way is charged what is left; a finished stage nothing
    main = tmp_path / "train/ddpm-main"
    main.mkdir(parents=True)
    (main / "metrics.jsonl").write_text('{"step": 1, "images_seen": 300000}\n')
    costs = estimate(stages, cfg, done=lambda s: s.name == "restore")
    assert costs["train/ddpm-main"].gflop["train"] == pytest.approx(train.gflop["train"] * 0.75)
    assert costs["train/ddpm-main"].note == "75% left"
    assert costs["restore"].seconds == 0 and costs["restore"].note == "done"
    assert "dip" not in costs["restore-ema-img-000000060032"].gflop  # the cache is full
    # the stage under way (its run dir written) is the one fitting the shared cache
    (tmp_path / "restore-ema-img-000000060032").mkdir()
    (tmp_path / "restore-ema-img-000000060032/config.yaml").write_text("{}\n")
    costs = estimate(stages, cfg, done=lambda s: False)
    assert costs["restore-ema-img-000000060032"].gflop["dip"] == last.gflop["dip"]
    assert "dip" not in costs["restore"].gflop and list(costs) == [s.name for s in stages]


def test_an_export_that_would_leak_a_path_writes_nothing(tmp_path):
    from dipddpm.config import UserError
    from dipddpm.study.export import export_study

    study = tmp_path / "study"
    cfg = load_config(QUICKSTART, [f"run.dir={study}", f"data.dir={tmp_path / 'data'}"])
    stages = plan_study(cfg, study)
    for name, text in (("fit_dip", "dip:\n  iters: 4\n"),  # copied first, then
                       ("classifier", "classifier:\n  dir: /elsewhere/clf\n")):  # refused
        (study / name).mkdir(parents=True)
        (study / name / "config.yaml").write_text(text)
        (study / name / "stage.json").write_text('{"seconds": 1.0}')
    out = tmp_path / "results"
    with pytest.raises(UserError, match="an absolute path would be exported .'/elsewhere/clf'"):
        export_study(cfg, stages, study, out, REPO, lambda s: s.name in ("fit_dip", "classifier"))
    assert not out.exists() and list(tmp_path.iterdir()) == [study]
    export_study(cfg, stages, study, out, REPO, lambda s: s.name == "fit_dip")
    assert (out / "fit_dip/config.yaml").read_text() == "dip:\n  iters: 4\n"
    assert json.loads((out / "export.json").read_text())["stages"]["fit_dip"]["seconds"] == 1.0


def test_only_runs_the_named_stage_and_refuses_an_unknown_one(micro_data, tmp_path):
    study = tmp_path / "study"
    args = [f"run.dir={study}", f"data.dir={micro_data}", "wandb.mode=disabled", *MICRO,
            "study.stages=[fit_dip, classifier]"]
    r = run_module("jobs.study", *args, "--only", "fit-dip")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == \
        "error: --only fit-dip: no such stage in this study (fit_dip, classifier)"
    r = run_module("jobs.study", *args, "--only", "fit_dip", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert set(_stage_files(study)) == {"fit_dip"} and not (study / "REPORT.md").exists()


@pytest.fixture(scope="module")
def micro_data(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("study"), 64, 16, 16)


def _stage_files(study: Path):
    return {str(p.parent.relative_to(study)): json.loads(p.read_text())
            for p in study.rglob("stage.json")}


@pytest.mark.slow
def test_micro_study_inline_writes_the_report_and_a_rerun_skips_everything(micro_data, tmp_path):
    study = tmp_path / "study"
    args = [f"run.dir={study}", f"data.dir={micro_data}", "wandb.mode=disabled",
            f"classifier.dir={study / 'classifier-cache'}", *MICRO]  # inside: exported
    r = run_module("jobs.study", *args, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    stages = _stage_files(study)
    assert len(stages) == 4 + 1 + 2 + 1 + 1 + 4 + 1 + 1
    assert stages["train/dip_in_training-T20"]["job"] == "train"
    train = json.loads((study / "train/dip_in_training-T20/results.json").read_text())
    assert train["variant"] == "dip_in_training" and train["T"] == 20
    report = (study / "REPORT.md").read_text()
    assert "34 min 18.67 s" in report  # the study's training time, beside ours
    assert "0.065" in report and "6.71" in report
    for table in report.split("\n### ")[1:]:  # each study table with numbers shows its plot
        heading = table.splitlines()[0]
        if heading[:2] in ("1.", "2.", "3.", "4.", "5a", "5b") and "\nnot run: " not in table:
            assert re.search(r"\n!\[[^\]]*\]\(report/[^)]+\.png\)", table), heading
            assert (study / re.search(r"\]\((report/[^)]+)\)", table).group(1)).is_file()
    assert re.search(r"\]\(report/kid-[^)]+\.png\)", report)
    assert re.search(r"\]\(report/memorisation-[^)]+\.png\)", report)
    # the finished stages exported for a repository: no weights, no paths of this machine, and
    # RESULTS.md rebuilt byte for byte by jobs.report
    out = tmp_path / "results" / "micro"
    r = run_module("jobs.study", *args, "--export", str(out), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    export = json.loads((out / "export.json").read_text())
    assert set(export["stages"]) == set(stages) and all(
        st["done"] and st["seconds"] > 0 and (st["estimate_seconds"] > 0 or name == "classifier")
        for name, st in export["stages"].items())  # the classifier's few seconds are not counted
    assert export["stages"]["train/ddpm-T20"]["seconds_are"] == "training loop, all resumes"
    assert export["stages"]["generation"]["seconds_are"] == \
        "chains, all resumes + the sources' DIP fits"
    files = [f for f in out.rglob("*") if f.is_file()]
    assert not [f for f in files if f.suffix in (".pt", ".npz") or "wandb" in f.parts]
    for f in files:
        if f.suffix in (".json", ".jsonl", ".yaml", ".md"):
            text = f.read_text()
            assert str(study) not in text and str(micro_data) not in text \
                and str(REPO) not in text, f
    assert (out / "restore/results.json").is_file() and list(out.glob("train/*/samples/*.png"))
    results = (out / "RESULTS.md").read_text()
    assert "## Stages" in results and "| restore | restore |" in results
    assert "| classifier | train_classifier | not counted |" in results
    exported = sorted(out.rglob("*"))
    (out / "RESULTS.md").unlink()
    r = run_module("jobs.report", str(out), timeout=300)  # the plain command, W&B as configured
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "RESULTS.md").read_text() == results
    assert sorted(out.rglob("*")) == exported  # and nothing beside it (no W&B run, no changes)
    # everything is done: a rerun only writes the report again
    r = run_module("jobs.study", *args, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("done, skipped") == len(stages)
    assert _stage_files(study) == stages
    # a changed setting reruns exactly the stages it reaches
    r = run_module("jobs.study", *args, "study.sampling_num_images=3", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("done, skipped") == len(stages) - 4
    assert _stage_files(study)["sampling/ddpm-T10"]["argv"] != stages["sampling/ddpm-T10"]["argv"]


@pytest.mark.slow
def test_micro_study_runs_each_wave_as_a_slurm_array(slurm_cluster, micro_data, tmp_path):
    study = tmp_path / "study"
    r = run_module("jobs.study", f"run.dir={study}", f"data.dir={micro_data}", *MICRO,
                   "study.stages=[train, fit_dip, sampling]", "study.T_values=[20]",
                   "study.executor=slurm", "launch.mem_gb=1", timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "wave 0: 3 stage(s) in array" in r.stdout and "wave 1: 2 stage(s) in array" in r.stdout
    stages = _stage_files(study)
    assert sorted(stages) == ["fit_dip", "sampling/ddpm-T20", "sampling/dip_in_training-T20",
                              "train/ddpm-T20", "train/dip_in_training-T20"]
    # each stage ran in its own array task, with submitit's logs beside the study
    logs = list((study / "submissions").rglob("*_log.out"))
    assert len(logs) == 5
    samples = list((study / "sampling/ddpm-T20/samples").glob("*.json"))
    assert json.loads(samples[0].read_text())["nfe_per_sample"] == 20
    assert (study / "REPORT.md").exists()


# ----------------------------------------------------------------------------- waiting on a wave

def _task_quick():
    return "quick"


def _task_fails():
    raise RuntimeError("stage exploded\nfor a reason")


def _task_waits_for(flag: str):
    import time

    while not Path(flag).exists():
        time.sleep(0.05)
    return "slow"


def test_a_stage_held_by_another_process_is_waited_for_then_skipped(tmp_path, capsys):
    """Two study processes on one machine: the second waits on the first's stage, then finds
    it finished (stage.json with its config) and does not run it again."""
    import threading
    import time

    from dipddpm.runs import atomic_write_json, run_dir_lock
    from dipddpm.study.run import StageTask, is_done, run_dir_of

    cfg = load_config(REPO / "configs" / "quickstart.yaml", [f"run.dir={tmp_path / 'study'}"])
    stage = next(s for s in plan_study(cfg, tmp_path / "study") if s.name == "classifier")
    run_dir = run_dir_of(stage.argv)
    held, release, seen = threading.Event(), threading.Event(), []

    def other_process():
        with run_dir_lock(run_dir) as waited:
            seen.append(waited)
            held.set()
            release.wait(10)
            atomic_write_json(run_dir / "stage.json", {"job": stage.job, "argv": stage.argv,
                                                       "config": stage.cfg.to_dict()})

    other = threading.Thread(target=other_process)
    other.start()
    assert held.wait(10)
    threading.Timer(0.5, release.set).start()
    start = time.perf_counter()
    StageTask()(stage.job, stage.argv)  # would train the classifier if it did not wait
    other.join()
    out = capsys.readouterr().out
    assert seen == [False] and time.perf_counter() - start >= 0.4
    assert "in use by another process; waiting" in out and "finished by the process" in out
    assert is_done(stage) and not (run_dir / "config.yaml").exists()
    StageTask()(stage.job, stage.argv)  # planned before the other finished: checked again
    assert "finished by another process" in capsys.readouterr().out
    assert not (run_dir / "config.yaml").exists()


def test_a_wave_reports_each_task_as_it_finishes(tmp_path, capsys):
    """Real local processes (submitit's LocalExecutor): the finished tasks are reported while
    another still runs, which only ends once their lines are out."""
    import threading
    import time

    import submitit

    from dipddpm.study.run import wait_for_tasks

    ex = submitit.LocalExecutor(folder=tmp_path / "logs")
    ex.update_parameters(timeout_min=5)
    flag = tmp_path / "go"
    named = [("slow", ex.submit(_task_waits_for, str(flag))), ("quick", ex.submit(_task_quick)),
             ("broken", ex.submit(_task_fails))]
    out: dict = {}
    waiter = threading.Thread(target=lambda: out.update(
        failed=wait_for_tasks("wave 1", named, poll_s=0.2)))
    waiter.start()
    seen, deadline = "", time.monotonic() + 120  # a guard against a hang, not a timing check
    while not ("quick done" in seen and "broken FAILED" in seen) and time.monotonic() < deadline:
        seen += capsys.readouterr().out
        time.sleep(0.1)
    assert "slow" not in seen and waiter.is_alive()  # reported before the wave ended
    flag.touch()
    waiter.join(120)
    captured = capsys.readouterr()
    seen += captured.out
    assert not waiter.is_alive()
    assert "wave 1: slow done (3/3)" in seen
    assert len(out["failed"]) == 1 and out["failed"][0].startswith("broken (job ")
    assert "3/3" in captured.err.splitlines()[-1]  # the bar's last line
