"""Config errors name the key, the value and the fix; the CLI prints them without a traceback."""

from pathlib import Path

import pytest

from testbed.cli import main
from testbed.config import from_dict, load_config
from testbed.errors import ConfigError


@pytest.mark.parametrize("override, words", [
    (["model.dmodel=128"], ["model.dmodel", "128", "model.d_model"]),
    (["optim.lrr=1e-3"], ["optim.lrr", "optim.lr"]),
    (["modle.d_model=3"], ["modle", "model"]),
    (["model.d_model=100", "model.n_heads=3"], ["model.d_model=100", "n_heads=3", "divisible"]),
    (["data.seq_len=4096"], ["data.seq_len=4096", "model.max_seq_len"]),
    (["optim.lr=fast"], ["optim.lr", "fast", "number"]),
    (["model.n_layers=2.5"], ["model.n_layers", "2.5", "whole number"]),
    (["model.tie_embeddings=maybe"], ["model.tie_embeddings", "true or false"]),
    (["train.precision=bf61"], ["train.precision", "bf61", "bf16"]),
    (["train.global_batch_tokens=1000"], ["train.global_batch_tokens=1000", "data.seq_len"]),
    (["train.tokens=100", "train.steps=3"], ["train.tokens", "train.steps", "only one"]),
    (["optim.betas=[0.9]"], ["optim.betas"]),
    (["data.unique_tokens=100"], ["data.unique_tokens=100", "smaller than one batch"]),
    (["model.preset=1M"], ["model.preset", "1m"]),
])
def test_bad_values_name_key_value_and_fix(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_overrides_parse_yaml_scalars_and_presets_yield_to_explicit_keys():
    c = load_config({"model": {"preset": "1m", "n_layers": 3}}, ["optim.lr=3e-3", "optim.betas=[0.9,0.99]"])
    assert c.model.d_model == 128 and c.model.n_layers == 3
    assert c.optim.lr == 3e-3 and c.optim.betas == [0.9, 0.99]


def test_presets_ship_in_the_package_and_testbed_configs_replaces_them(tmp_path, monkeypatch):
    import testbed
    from testbed.config import presets_dir

    assert presets_dir().is_relative_to(Path(testbed.__file__).parent)
    monkeypatch.setenv("TESTBED_CONFIGS", str(tmp_path))
    with pytest.raises(ConfigError, match="no presets found .*TESTBED_CONFIGS"):
        load_config(None, ["model.preset=1m"])
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mine.yaml").write_text("model:\n  d_model: 96\n  n_heads: 3\n")
    assert load_config(None, ["model.preset=mine"]).model.d_model == 96
    with pytest.raises(ConfigError, match="choose one of mine"):
        load_config(None, ["model.preset=1m"])


def test_a_run_length_override_replaces_the_files(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  tokens: 1000000\n")
    assert load_config(cfg, ["train.steps=5"]).train.steps == 5
    assert load_config(cfg, ["train.steps=5"]).train.tokens is None
    with pytest.raises(ConfigError, match="only one"):
        load_config({"train": {"tokens": 10, "steps": 3}})


def test_registry_names_are_checked(tmp_path):
    from testbed.config import ModelConfig
    from testbed.model.transformer import Transformer

    with pytest.raises(ConfigError, match="model.norm='rmsnrom'.*rmsnorm"):
        Transformer(ModelConfig(norm="rmsnrom", vocab_size=8))


def test_unknown_registered_parts_are_named_before_training():
    from testbed.plan import describe

    with pytest.raises(ConfigError) as err:
        describe(load_config(None, ["model.norm_placement=post"]))
    assert "model.norm_placement='post'" in str(err.value) and "peri" in str(err.value)
    with pytest.raises(ConfigError, match="imports: module 'no_such_module'"):
        describe(load_config(None, ["imports=[no_such_module]"]))


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert "missing.yaml" in err and "does not exist" in err and "Traceback" not in err

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: [1, 2\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not valid YAML" in err and "line" in err and "Traceback" not in err

    ok = tmp_path / "ok.yaml"
    ok.write_text("model:\n  d_model: 64\n")
    assert main(["train", str(ok), "--run-dir", str(tmp_path / "r"), "model.n_heads=5"]) == 2
    assert "model.d_model=64 is not divisible by model.n_heads=5" in capsys.readouterr().err
    assert not (tmp_path / "r" / "run.json").exists()


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for word in ("train", "branch", "schedule", "export"):
        assert word in out


def test_a_config_saved_with_every_schedule_field_still_loads():
    """Run directories written when one schedule section held every schedule's fields resume
    and branch: the fields the named schedule does not take are dropped, its own are kept."""
    from testbed.config import saved_config

    tree = from_dict({}).to_dict()
    tree["schedule"] = {"name": "wsd", "warmup_steps": 3, "min_lr_ratio": 0.1, "decay_fraction": 0.3,
                        "decay_shape": "1-sqrt", "inv_sqrt_timescale": None, "power_a": 4.0, "power_b": -0.51,
                        "power_decay_fraction": 0.0, "decay_start_step": None, "power_batch_size": None}
    config = saved_config(tree)
    assert config.schedule.name == "wsd" and config.schedule.decay_fraction == 0.3
    assert config.schedule.warmup_steps == 3 and "power_a" not in config.to_dict()["schedule"]
    with pytest.raises(ConfigError, match="schedule .wsd. has no"):
        from_dict(tree)  # a config a person writes is still held to the schedule's own fields
