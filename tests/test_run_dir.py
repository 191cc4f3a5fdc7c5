"""A run dir belongs to one setting: the rerun check, the neutral declarations behind it (the
study's skip logic, the priors fingerprint, the report's grouping), run.dir / --out naming a
file, and jobs.sample against its weights' run."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from dipddpm.cli import run_job
from dipddpm.config import ConfigError, compare_configs, is_neutral, load_config, result_keys
from dipddpm.runs import CONFIG_CHANGES_FILE, CONFIG_FILE, check_run_dir, prepare_run_dir
from tests.conftest import make_shards, make_tiny_world, run_module

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
TINY = ["--config", "configs/ddpm_tiny.yaml"]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("data"), 32, 8, 8)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """configs/ddpm_tiny.yaml trained 3 steps (one checkpoint at the end), as a user runs it."""
    run = tmp_path_factory.mktemp("trained") / "run"
    r = run_module("jobs.train", *TINY, f"run.dir={run}", f"data.dir={data}",
                   "wandb.mode=disabled", "train.max_steps=3", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    return run


def args(run, data, *extra):
    return [*TINY, f"run.dir={run}", f"data.dir={data}", "wandb.mode=disabled",
            "train.max_steps=3", *extra]


@pytest.mark.parametrize("change, needle", [
    (["train.lr=0.05"], "train.lr = 0.0002 there, 0.05 now"),
    (["diffusion.T=1000", "train.max_steps=6"], "diffusion.T = 50 there, 1000 now"),
    (["model.name=unet-small"], "model.name = 'unet-tiny' there, 'unet-small' now"),
    (["train.max_steps=2"], "train.max_steps = 3 there, 2 now (a run may be lengthened, not "
                            "shortened)"),
])
def test_result_changing_rerun_is_refused_and_leaves_the_run_dir(trained, data, tmp_path,
                                                                  change, needle, capsys):
    from jobs.train import main

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = snapshot(run)
    assert any(k.startswith("checkpoints/") for k in before)
    assert run_job(main, args(run, data, *change)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    assert f"run.dir = '{run}' holds a run of other settings" in err
    assert f"use a new run.dir, or delete {run} to start over" in err
    if "diffusion.T" in needle:
        assert "max_steps" not in err  # raised: allowed; only T is refused
    assert snapshot(run) == before  # config.yaml, checkpoints, metrics: byte for byte


def test_lengthened_run_with_neutral_changes_resumes_and_records_them(trained, data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    r = run_module("jobs.train", *args(run, data, "train.max_steps=5", "wandb.mode=offline",
                                       "train.log_every_images=16"), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from img-000000000024" in r.stdout
    stored = yaml.safe_load((run / CONFIG_FILE).read_text())
    assert stored["train"]["max_steps"] == 5 and stored["wandb"]["mode"] == "offline"
    [line] = [json.loads(x) for x in (run / CONFIG_CHANGES_FILE).read_text().splitlines()]
    assert line["changes"] == {"run.dir": [str(trained), str(run)],  # a moved run dir resumes
                               "wandb.mode": ["disabled", "offline"],
                               "train.max_steps": [3, 5], "train.log_every_images": [8, 16]}
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 5


def test_config_yaml_without_newer_keys_takes_the_defaults(tmp_path):
    """A config.yaml written before a key existed: the key takes its schema default, so a key
    added with a default that keeps the old behaviour does not stop old runs."""
    cfg = load_config("configs/ddpm_tiny.yaml", [f"run.dir={tmp_path}"])
    prepare_run_dir(cfg)
    old = yaml.safe_load((tmp_path / CONFIG_FILE).read_text())
    del old["train"]["ema_warmup"], old["diffusion"]["scale_betas"], old["protocol"]
    old["wandb"]["retired_key"] = 1  # neutral section: whatever it held does not matter
    (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump(old))
    assert check_run_dir(cfg) == {}
    # but a stored key the schema lost, outside a neutral section, cannot be judged: refused
    old["train"]["retired_key"] = 1
    (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match="train.retired_key = 1 there, not in the schema now"):
        check_run_dir(cfg)
    assert check_run_dir(cfg, reads=("model", "diffusion")) == {}  # not a key this job reads


def test_run_lengths_may_grow_except_under_a_cosine_schedule():
    base = load_config(None, ["train.epochs=2", "train.max_steps=10"]).to_dict()
    grow = load_config(None, ["train.epochs=3", "train.max_steps=20"])
    assert compare_configs(base, grow).refused == []
    assert compare_configs(base, grow).allowed == {"train.epochs": [2.0, 3.0],
                                                   "train.max_steps": [10, 20]}
    no_limit = load_config(None, ["train.epochs=2"])
    assert compare_configs(base, no_limit).refused == []  # max_steps 10 -> None (no limit)
    assert compare_configs(no_limit.to_dict(), load_config(None, ["train.epochs=2",
                                                                  "train.max_steps=10"])).refused
    cosine = load_config(None, ["train.epochs=2", "train.lr_schedule=cosine"]).to_dict()
    longer = load_config(None, ["train.epochs=4", "train.lr_schedule=cosine"])
    [why] = compare_configs(cosine, longer).refused
    assert why == ("train.epochs = 2.0 there, 4.0 now (the cosine learning-rate schedule spans "
                   "train.epochs)")


def test_scope_limits_the_check_to_what_a_job_reads(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    prepare_run_dir(cfg)
    other = load_config(None, [f"run.dir={tmp_path}", "protocol.t0s=[7]", "dip.lr=0.5"])
    with pytest.raises(ConfigError, match=r"dip.lr = 0.01 there, 0.5 now; protocol.t0s"):
        check_run_dir(other)
    from dipddpm.train.loop import reads

    assert check_run_dir(other, reads(other)) == {"protocol.t0s": [[], [7]],
                                                  "dip.lr": [0.01, 0.5]}
    variant = load_config(None, [f"run.dir={tmp_path}", "dip.lr=0.5", "train.noise=dip"])
    with pytest.raises(ConfigError, match="dip.lr"):  # the study's variant trains with the DIP
        check_run_dir(variant, reads(variant))


def test_neutral_declarations_drive_the_study_the_priors_and_the_report(tmp_path):
    from dipddpm.dip.priors import fingerprint, settings_of
    from dipddpm.report.discover import Run
    from dipddpm.report.tables import setting
    from dipddpm.study.plan import Stage
    from dipddpm.runs import STAGE_FILE
    from dipddpm.study.run import is_done

    for key in ("run.resume", "wandb.mode", "launch.mem_gb", "train.log_every_images",
                "train.compile", "dip.batch_size", "data.source"):
        assert is_neutral(key), key
    for key in ("train.lr", "train.epochs", "data.num_workers", "dip.lr", "run.seed"):
        assert not is_neutral(key), key

    def cfg(*extra):
        return load_config("configs/ddpm_tiny.yaml", [f"run.dir={tmp_path}", *extra])

    # the study: a stage is done when its stage.json records the same config, neutral aside
    argv = ["--config", "configs/ddpm_tiny.yaml", f"run.dir={tmp_path}"]
    (tmp_path / STAGE_FILE).write_text(json.dumps({"job": "train", "argv": argv,
                                                   "config": cfg().to_dict()}))
    stage = lambda c: Stage("s", "train", "train", 0, argv + ["x"], c)  # noqa: E731
    assert is_done(stage(cfg("wandb.mode=disabled", "train.log_every_images=64")))
    assert not is_done(stage(cfg("train.lr=0.1")))
    assert not is_done(stage(cfg("train.epochs=2")))  # a longer run is work to do
    # the study that planned a stage changes none of its results: a new stage kind (a longer
    # default study.stages) leaves every finished stage done
    assert is_neutral("study.stages") and is_neutral("study.front_ddim_num_images")
    assert is_done(stage(cfg("study.stages=[train]", "study.front_ddpm_num_images=0")))
    # the priors: a neutral key leaves the fingerprint, a fitting key changes it
    fp = lambda c: fingerprint(settings_of(c, "data"))  # noqa: E731
    assert fp(cfg("dip.batch_size=3", "dip.num_images=5")) == fp(cfg())
    assert fp(cfg("dip.lr=0.02")) != fp(cfg())
    # the report: runs that differ in neutral keys are one setting
    run = lambda c: Run(tmp_path, "train", c.to_dict(), {})  # noqa: E731
    assert setting(run(cfg("train.sample_steps=3", "data.num_workers=3")), ("train.epochs",)) \
        == setting(run(cfg()), ("train.epochs",))
    assert setting(run(cfg("train.lr=0.1")), ()) != setting(run(cfg()), ())
    assert "train.log_every_images" not in result_keys(cfg().to_dict())


# What the code before the key renames wrote, by the names the keys have now (what old run dirs
# and stage.json files hold; dipddpm.config.RENAMED_KEYS is what the code reads)
OLD_NAMES = {"sample.num_images": "sample.num", "train.sample_num_images": "train.num_samples",
             "protocol.gen_num_images": "protocol.gen_num",
             "study.sampling_num_images": "study.sampling_num",
             "classifier.kid_subset_size": "classifier.kid_subset",
             "classifier.kid_num_subsets": "classifier.kid_subsets",
             "classifier.floor_num_images": "classifier.floor_ns",
             "classifier.inception_ref_num_images": "classifier.inception_ref_num"}


def written_before_the_renames(cfg) -> dict:
    tree = cfg.to_dict()
    for new, old in OLD_NAMES.items():
        (section, key), (old_section, old_key) = new.split("."), old.split(".")
        tree[old_section][old_key] = tree[section].pop(key)
    tree["priors"]["sub_batch"] = 256  # the priors' nets at once, now dip.batch_size (beside it)
    tree["classifier"]["fid_num"] = 1000  # never read, retired
    return tree


def test_a_run_dir_written_with_the_old_key_names_resumes(trained, data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    stored = written_before_the_renames(load_config(run / CONFIG_FILE))
    assert stored["train"]["num_samples"] == 4 and "sample_num_images" not in stored["train"]
    (run / CONFIG_FILE).write_text(yaml.safe_dump(stored, sort_keys=False))
    r = run_module("jobs.train", *args(run, data, "train.max_steps=5"), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from img-000000000024" in r.stdout
    assert "note:" not in r.stderr  # a stored config is read without notes
    # every old-named key matched its new name: no change but the two made here
    [line] = [json.loads(x) for x in (run / CONFIG_CHANGES_FILE).read_text().splitlines()]
    assert line["changes"] == {"run.dir": [str(trained), str(run)], "train.max_steps": [3, 5]}
    now = yaml.safe_load((run / CONFIG_FILE).read_text())
    assert now["train"]["sample_num_images"] == 4 and "num_samples" not in now["train"]
    assert "sub_batch" not in now["priors"] and "fid_num" not in now["classifier"]


@pytest.mark.parametrize("old_key, value, needle", [
    ("kid_subsets", 7, "classifier.kid_num_subsets = 7 there (as classifier.kid_subsets), "
                       "100 now"),
    ("floor_ns", [20], "classifier.floor_num_images = [20] there (as classifier.floor_ns), "
                       "[1000, 5000] now"),
])
def test_an_old_named_key_of_another_value_is_refused_by_its_new_name(tmp_path, capsys, old_key,
                                                                      value, needle):
    from jobs.train_classifier import main

    argv = ["--config", "configs/classifier.yaml", f"run.dir={tmp_path}"]
    stored = written_before_the_renames(load_config(argv[1], argv[2:]))
    stored["classifier"][old_key] = value
    (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump(stored, sort_keys=False))
    before = snapshot(tmp_path)
    assert run_job(main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    assert snapshot(tmp_path) == before


def test_a_stage_recorded_with_the_old_key_names_is_still_done(tmp_path):
    from dipddpm.report.discover import discover
    from dipddpm.study.plan import Stage
    from dipddpm.study.run import STAGE_FILE, is_done

    argv = ["--config", "configs/restore.yaml", f"run.dir={tmp_path}"]
    cfg = load_config(argv[1], argv[2:])
    old = written_before_the_renames(cfg)
    del old["study"]["restore_checkpoints"]  # a key added after the stage ran: its default
    assert compare_configs(old, cfg).refused == [] and compare_configs(old, cfg).allowed == {}
    assert result_keys(old) == result_keys(cfg.to_dict())
    (tmp_path / STAGE_FILE).write_text(json.dumps({"job": "restore", "argv": argv,
                                                   "config": old}))
    stage = lambda c: Stage("restore", "restore", "restore", 1, argv, c)  # noqa: E731
    assert is_done(stage(cfg))
    assert not is_done(stage(load_config(argv[1], [*argv[2:], "sample.num_images=3"])))
    # the report reads an old run dir's config.yaml under the new names too
    (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump(old))
    (tmp_path / "results.json").write_text(json.dumps({"sigma": {}, "num_images": 1}))
    [run] = discover(tmp_path).by_kind["fit_dip"]
    assert run.cfg("sample.num_images") == cfg.sample.num_images
    assert run.cfg("sample.num") is None and run.cfg("classifier.fid_num") is None


@pytest.mark.parametrize("job", ["jobs.train", "jobs.fit_dip"])
def test_run_dir_that_is_a_file_is_one_line(job, tmp_path, capsys):
    import importlib

    afile = tmp_path / "afile"
    afile.write_text("x")
    main = importlib.import_module(job).main
    for where, needle in ((afile, "exists and is not a directory"),
                          (afile / "sub", f"'{afile}' is not a directory")):
        assert run_job(main, [f"run.dir={where}", "wandb.mode=disabled"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"run.dir = '{where}': {needle}" in err, err
    assert afile.read_text() == "x"


def test_prepare_data_out_that_is_a_file_is_one_line(idx_folder, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    r = run_module("jobs.prepare_data", "--source", str(idx_folder), "--out", str(afile))
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: data.dir (--out) = '{afile}': exists and is not a directory"


def test_sample_refuses_settings_its_weights_were_not_trained_with(tmp_path, capsys):
    from jobs.sample import main

    world = make_tiny_world(tmp_path, n_test=4, T=12)
    ddpm = world["ddpm"]
    common = ["run.dir=" + str(tmp_path / "samples"), f"sample.checkpoint={ddpm}",
              f"data.dir={world['data']}", "sample.num_images=2", "sample.steps=2",
              "wandb.mode=disabled"]
    for override, needle in (("diffusion.T=1000", "diffusion.T = 1000: the weights"),
                             ("model.name=unet-small", "model.name = 'unet-small': the weights")):
        assert run_job(main, [*common, override]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err and "trained with" in err, err
        assert not (tmp_path / "samples").exists()
    # from the config file (configs/ddpm.yaml: T=1000, unet-small) it is no override: the
    # weights' run decides, and the sampling run dir records that
    assert run_job(main, common) == 0
    stored = yaml.safe_load((tmp_path / "samples" / CONFIG_FILE).read_text())
    assert stored["diffusion"]["T"] == 12 and stored["model"]["name"] == "unet-tiny"
    assert run_job(main, [*common, "sample.steps=3", "diffusion.T=12"]) == 0
    # into the weights' own run dir: its config.yaml stays as training wrote it
    before = (ddpm / CONFIG_FILE).read_bytes()
    assert run_job(main, [f"run.dir={ddpm}", f"data.dir={world['data']}", "sample.num_images=2",
                          "sample.steps=2"]) == 0
    assert (ddpm / CONFIG_FILE).read_bytes() == before
