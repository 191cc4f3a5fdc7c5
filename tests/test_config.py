import pytest
import yaml

from dipddpm.config import ConfigError, config_from_dict, dump_config, load_config
from tests.conftest import run_module


def write(path, tree):
    path.write_text(yaml.safe_dump(tree))
    return path


def test_defaults_and_overrides_are_typed():
    cfg = load_config(None, ["train.batch_size=64", "train.lr=1e-3", "run.dir=007",
                             "dip.sigmas=[15, 25]", "train.max_steps=null", "wandb.mode=disabled"])
    assert cfg.train.batch_size == 64 and isinstance(cfg.train.lr, float) and cfg.train.lr == 1e-3
    assert cfg.run.dir == "007"  # strings are taken as typed, not parsed as YAML numbers
    assert cfg.dip.sigmas == [15.0, 25.0]
    assert cfg.train.max_steps is None and cfg.wandb.mode == "disabled"


def test_mixed_precision_no_typed_on_the_command_line_is_the_string():
    # YAML reads a bare `no` as false; the schema's choice as typed is what the user meant
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=null"]).train.mixed_precision is None


def test_a_config_written_with_an_explicit_precision_keeps_it(tmp_path):
    assert load_config(None).train.mixed_precision is None  # unset: the launcher's
    for value in ("no", "bf16"):  # what run dirs' config.yaml files said before it was unset
        cfg = load_config(None, [f"train.mixed_precision={value}"])
        (tmp_path / "config.yaml").write_text(dump_config(cfg))
        assert "mixed_precision: " in dump_config(cfg)
        assert load_config(tmp_path / "config.yaml") == cfg
        assert cfg.train.mixed_precision == value


def test_base_chain_deep_merges(tmp_path):
    write(tmp_path / "a.yaml", {"train": {"batch_size": 32, "lr": 0.5}, "run": {"seed": 3}})
    write(tmp_path / "b.yaml", {"base": "a.yaml", "train": {"lr": 0.25}})
    cfg = load_config(tmp_path / "b.yaml", ["run.seed=4"])
    assert (cfg.train.batch_size, cfg.train.lr, cfg.run.seed) == (32, 0.25, 4)


def test_resolved_config_round_trips():
    cfg = load_config(None, ["diffusion.T=200", "dip.iters=7"])
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize("tree, needle", [
    ({"train": {"batch_szie": 3}}, "b.yaml: train.batch_szie = 3: unknown key"),
    ({"train": {"batch_size": "big"}}, "b.yaml: train.batch_size = 'big': expected an integer"),
    ({"train": {"batch_size": 0}}, "b.yaml: train.batch_size = 0: must be >= 1"),
    ({"diffusion": {"schedule": "quadratic"}}, "diffusion.schedule = 'quadratic': must be one of"),
    ({"train": 5}, "b.yaml: train = 5: expected a section"),
])
def test_errors_name_file_key_value(tmp_path, tree, needle):
    write(tmp_path / "a.yaml", {"run": {"seed": 1}})
    write(tmp_path / "b.yaml", {"base": "a.yaml", **tree})
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "b.yaml")
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_error_in_base_names_the_base_file(tmp_path):
    write(tmp_path / "a.yaml", {"dip": {"lr": "fast"}})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match=r"a\.yaml: dip\.lr = 'fast': expected a number"):
        load_config(tmp_path / "b.yaml")


def test_override_error_names_the_command_line():
    with pytest.raises(ConfigError, match=r"command line: train\.epochs = 'abc': expected a number"):
        load_config(None, ["train.epochs=abc"])
    with pytest.raises(ConfigError, match="overrides look like key.sub=value"):
        load_config(None, ["train.epochs"])


@pytest.mark.parametrize("args, needle", [
    (["train.bogus=1"], "error: command line: train.bogus = '1': unknown key"),
    (["train.batch_szie=1"], "error: command line: train.batch_szie = '1': unknown key; "
                             "did you mean train.batch_size?"),
    (["train.batch_size=abc"], "error: command line: train.batch_size = 'abc': expected an integer"),
    (["data.shard_size=-5"], "error: command line: data.shard_size = -5: must be >= 1"),
])
def test_job_prints_one_line_and_exits_2(tmp_path, args, needle):
    r = run_module("jobs.prepare_data", "--source", str(tmp_path), "--out", str(tmp_path / "o"),
                   *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(needle), r.stderr
    assert not (tmp_path / "o").exists()


def test_missing_config_file_is_one_line(tmp_path):
    r = run_module("jobs.prepare_data", "--config", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "nope.yaml: no such config file" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_the_renamed_keys_table_points_into_the_schema():
    import typing

    from dipddpm.config import RENAMED_KEYS, SCHEMA, STUDY_OVERRIDE_LISTS, StudyConfig

    for old, new in RENAMED_KEYS.items():
        assert old not in SCHEMA, old  # an old name is free: nothing reads it any more
        assert new is None or new in SCHEMA, new
        assert new not in RENAMED_KEYS, new  # one step from any old name to the current one
    # every list of overrides the study has is migrated (the other lists hold no keys)
    lists = {k for k, tp in typing.get_type_hints(StudyConfig).items() if tp == list[str]}
    assert lists - set(STUDY_OVERRIDE_LISTS) == {"stages", "restore_checkpoints"}


def test_old_key_names_in_a_file_and_on_the_command_line_still_work(tmp_path, capsys,
                                                                     monkeypatch):
    from dipddpm import config

    monkeypatch.setattr(config, "_noted", set())  # notes print once per process
    path = write(tmp_path / "old.yaml", {
        "sample": {"num": 5}, "priors": {"sub_batch": 8},
        "classifier": {"kid_subsets": 7, "fid_num": 9},
        "study": {"main_train": ["train.num_samples=4", "train.lr=0.1"],
                  "generation": ["classifier.fid_num=3", "protocol.gen_num=6"]}})
    cfg = load_config(path, ["train.num_samples=3", "study.sampling_num=2",
                             "study.fit_dip=[priors.sub_batch=16]"])
    assert (cfg.sample.num_images, cfg.dip.batch_size, cfg.classifier.kid_num_subsets) == (5, 8, 7)
    assert (cfg.train.sample_num_images, cfg.study.sampling_num_images) == (3, 2)
    # the study's per-stage overrides are renamed too; a retired key is dropped
    assert cfg.study.main_train == ["train.sample_num_images=4", "train.lr=0.1"]
    assert cfg.study.generation == ["protocol.gen_num_images=6"]
    assert cfg.study.fit_dip == ["dip.batch_size=16"]
    assert cfg == load_config(None, [
        "sample.num_images=5", "dip.batch_size=8", "classifier.kid_num_subsets=7",
        "train.sample_num_images=3", "study.sampling_num_images=2",
        "study.main_train=[train.sample_num_images=4, train.lr=0.1]",
        "study.generation=[protocol.gen_num_images=6]", "study.fit_dip=[dip.batch_size=16]"])
    err = capsys.readouterr().err.splitlines()
    works = "(the old name still works)"
    assert f"note: {path}: sample.num is now sample.num_images {works}" in err
    assert f"note: {path}: priors.sub_batch is now dip.batch_size {works}" in err
    assert f"note: {path}: classifier.fid_num is retired (it had no effect); ignored" in err
    assert f"note: {path}: study.main_train: train.num_samples is now " \
           f"train.sample_num_images {works}" in err
    assert f"note: command line: train.num_samples is now train.sample_num_images {works}" in err
    assert f"note: command line: study.fit_dip: priors.sub_batch is now dip.batch_size " \
           f"{works}" in err
    assert len(err) == 10 and all(line.startswith("note: ") for line in err), err


def test_an_old_key_beside_its_new_name_with_another_value_is_one_line(tmp_path):
    both = write(tmp_path / "both.yaml", {"priors": {"sub_batch": 8}, "dip": {"batch_size": 4}})
    with pytest.raises(ConfigError, match=r"both.yaml: priors.sub_batch = 8: renamed "
                                          r"dip.batch_size, which is also set here \(= 4\); "
                                          r"keep one of them$"):
        load_config(both)
    same = write(tmp_path / "same.yaml", {"priors": {"sub_batch": 8}, "dip": {"batch_size": 8}})
    assert load_config(same).dip.batch_size == 8
    # across files the later one wins, whichever name each uses
    write(tmp_path / "base.yaml", {"dip": {"batch_size": 4}})
    child = write(tmp_path / "child.yaml", {"base": "base.yaml", "priors": {"sub_batch": 8}})
    assert load_config(child).dip.batch_size == 8


def test_an_old_key_on_a_jobs_command_line_is_a_note_not_an_error(tmp_path):
    r = run_module("jobs.prepare_data", "--source", str(tmp_path), "--out", str(tmp_path / "o"),
                   "sample.num=5")
    lines = r.stderr.strip().splitlines()
    assert lines[0] == ("note: command line: sample.num is now sample.num_images (the old name "
                        "still works)")
    # the job went on to its own check of the (empty) source folder
    assert r.returncode == 2 and len(lines) == 2 and "unknown key" not in r.stderr
