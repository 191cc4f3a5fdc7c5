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
