"""Data sources are a registry like the model's parts (docs/data.md, "Your own data source"): one
file registering a source with an `Options` dataclass, `imports:` and a config line train on it;
its setting is validated where declared and counted in the run id only when set; an unknown name
is one error with the registered names; the built-in sources behave as before."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import testbed.registry
from testbed.config import config_hash, load_config, source_name
from testbed.errors import ConfigError, TestbedError

HERE = Path(__file__).resolve().parent
TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32", "data.seq_len=32",
        "train.global_batch_tokens=256", "train.log_every=1", "train.eval_every=100", "logging.wandb=false",
        "logging.progress=false", "data.val_sequences=8", "checkpoint.final=false", "train.steps=2"]
COUNTING = TINY + ["imports=[user_source]", "data.source=test_counting"]


@pytest.fixture()
def on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


def test_a_user_source_with_a_setting_trains_from_one_file_and_a_config_line(tmp_path, on_path):
    from testbed.data.loader import make_source
    from testbed.plan import describe
    from testbed.train.trainer import train

    config = load_config(None, COUNTING + ["data.source_options.period=5"])
    assert config.data.source_options == {"period": 5}
    assert describe(config)["vocab_size"] == 5  # the planner asks the source
    source = make_source(config)
    windows = source.windows(np.arange(4))
    assert windows.shape == (4, 33) and windows.max() == 4
    assert np.array_equal(source.windows(np.arange(2, 4)), windows[2:])  # a pure function of the index
    train(config, tmp_path / "run")
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["data_fingerprint"] == "counting-p5-s0"


def test_a_bad_setting_is_one_error_naming_the_field(on_path):
    with pytest.raises(ConfigError, match=r"^data\.source_options\.period is 1; set it to an integer of at least 2"):
        load_config(None, COUNTING + ["data.source_options.period=1"])
    with pytest.raises(ConfigError, match=r"^data\.source_options\.period='many' must be a whole number"):
        load_config(None, COUNTING + ["data.source_options.period=many"])
    with pytest.raises(ConfigError, match=r"^data\.source_options\.perod is 3 but data source 'test_counting' "
                                          r"has no perod; did you mean 'period'"):
        load_config(None, COUNTING + ["data.source_options.perod=3"])
    with pytest.raises(ConfigError, match=r"^data\.source_options\.period is 3 but data source 'synthetic' "
                                          r"has no settings"):
        load_config(None, TINY + ["imports=[user_source]", "data.source_options.period=3"])


def test_the_setting_is_listed_and_counted_in_the_run_id_only_when_set(on_path):
    def run_id(*overrides):
        return config_hash(load_config(None, COUNTING + list(overrides)).to_dict())

    plain = run_id()
    assert run_id("data.source_options.period=8") == plain  # the default, given explicitly
    assert run_id("data.source_options.period=5") != plain
    from testbed.data.loader import DATA_SOURCES

    assert "test_counting (period=8)" in DATA_SOURCES.listing() and "synthetic" in DATA_SOURCES.listing()


def test_existing_configs_keep_their_run_ids():
    # The same ids as before sources were registered (tests/test_isoflop.py pins more).
    assert config_hash(load_config(None).to_dict()) == "a605dfbb57"
    assert config_hash(load_config(None, ["data.source=synthetic"]).to_dict()) == "a605dfbb57"


def test_an_unknown_source_is_one_error_with_the_registered_names(on_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"^data\.source='test_countng' is not a registered data source; "
                                          r"did you mean 'test_counting'\? choose one of mixture, random, shards, "
                                          r"synthetic, test_counting$"):
        load_config(None, TINY + ["imports=[user_source]", "data.source=test_countng"])
    # Before anything imported the loader, validation knows the built-in names, in the same words.
    monkeypatch.delitem(testbed.registry._BY_KEY, "data.source")
    with pytest.raises(ConfigError, match=r"^data\.source='shard' is not a registered data source; did you "
                                          r"mean 'shards'\? choose one of mixture, random, shards, synthetic$"):
        load_config(None, ["data.source=shard"])
    assert load_config(None, ["data.source=shards", "data.path=somewhere"]).data.source == "shards"


def test_a_registered_source_must_answer_the_interface():
    from testbed.data.loader import DATA_SOURCES

    with pytest.raises(ConfigError, match=r"data source 'test_nothing'.*subclass of testbed\.data\.loader\.DataSource"):
        DATA_SOURCES.register("test_nothing")(object())
    assert "test_nothing" not in DATA_SOURCES


def test_the_built_in_sources_behave_as_before(tmp_path):
    from testbed.data.loader import DATA_SOURCES, RandomSource, SyntheticSource, make_source
    from testbed.plan import data_vocab_size

    assert {"synthetic", "shards", "random"} <= set(DATA_SOURCES.names())
    config = load_config(None, ["data.synthetic.vocab_size=40"])
    assert data_vocab_size(config) == 40 and isinstance(make_source(config), SyntheticSource)
    assert data_vocab_size(load_config(None)) == 128  # the synthetic spec's default
    random = load_config(None, ["data.source=random", "model.vocab_size=300", "data.seq_len=16"])
    source = make_source(random)
    assert isinstance(source, RandomSource) and data_vocab_size(random) == 300
    assert source.windows(np.arange(3)).shape == (3, 17) and source.fingerprint() == "random-v300-s0"
    with pytest.raises(ConfigError, match=r"data\.source='random' needs model\.vocab_size"):
        load_config(None, ["data.source=random"])
    # data.path implies shards; a run is planned before its folder exists when it states the vocabulary.
    missing = str(tmp_path / "nothing")
    assert source_name(load_config(None, [f"data.path={missing}"]).data) == "shards"
    assert data_vocab_size(load_config(None, [f"data.path={missing}", "model.vocab_size=512"])) == 512
    with pytest.raises(ConfigError, match=r"holds no manifest\.json; run `testbed data prepare` first"):
        data_vocab_size(load_config(None, [f"data.path={missing}"]))
    with pytest.raises(TestbedError, match=r"does not exist; run `testbed data prepare`"):
        make_source(load_config(None, [f"data.path={missing}"]))
    with pytest.raises(ConfigError, match=r"data\.source='shards' needs data\.path=FOLDER"):
        load_config(None, ["data.source=shards"])


def test_data_path_with_a_user_source_keeps_the_user_source(on_path):
    config = load_config(None, COUNTING + ["data.path=somewhere"])
    assert source_name(config.data) == "test_counting"
