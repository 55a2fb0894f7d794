"""Schedules and laws defined in a user's module, outside the package: registered on import,
then named like the built-in ones (a config's `imports:`, `testbed fit --import`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from testbed.config import load_config
from testbed.errors import ConfigError

HERE = Path(__file__).resolve().parent
TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32", "data.seq_len=32",
        "train.global_batch_tokens=256", "train.log_every=1", "train.eval_every=100", "logging.wandb=false",
        "logging.progress=false", "data.val_sequences=8", "checkpoint.final=false"]


@pytest.fixture()
def on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


def test_a_user_schedule_trains_and_its_lrs_are_logged(tmp_path, on_path):
    from testbed.train.trainer import train

    peak = 1e-2
    config = load_config(None, TINY + ["imports=[user_schedule]", "schedule.name=test_halving",
                                       "schedule.halve_every=2", "train.steps=6", f"optim.lr={peak}"])
    assert type(config.schedule).__name__ == "Halving" and config.to_dict()["schedule"]["name"] == "test_halving"
    train(config, tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {m["step"]: m["lr"] for m in lines if "train_loss" in m}
    # A line at step s (steps done) carries the learning rate of the step just taken, s - 1.
    assert logged == {s: pytest.approx(peak * 0.5 ** ((s - 1) // 2), rel=1e-12) for s in range(1, 7)}
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["schedule"] == {"name": "test_halving", "warmup_steps": 0, "warmup_fraction": None,
                                         "halve_every": 2}


def test_a_user_schedule_is_validated_once_the_run_is_built(on_path):
    from testbed.plan import describe

    config = load_config(None, TINY + ["imports=[user_schedule]", "schedule.name=test_halving",
                                       "schedule.halve_every=0", "train.steps=6"])
    with pytest.raises(ConfigError, match=r"schedule\.halve_every is 0"):
        describe(config)


def test_a_field_another_schedule_owns_is_an_error_naming_both():
    with pytest.raises(ConfigError, match=r"schedule\.power_a is 2.*schedule 'cosine' has no power_a "
                                          r"\(it takes warmup_steps, warmup_fraction, min_lr_ratio\).*power"):
        load_config(None, ["schedule.power_a=2"])
    with pytest.raises(ConfigError, match=r"schedule\.name is 'wsdd'.*did you mean 'wsd'"):
        load_config(None, ["schedule.name=wsdd"])


def test_a_taken_name_is_an_error():
    from dataclasses import dataclass, replace

    from testbed.fit.laws import CHINCHILLA, POWER
    from testbed.fit.laws.base import register
    from testbed.schedules import SCHEDULES, Schedule

    @dataclass(frozen=True)
    class Other(Schedule):
        pass

    with pytest.raises(ConfigError, match="schedule 'wsd' is already registered"):
        SCHEDULES.register("wsd")(Other)
    with pytest.raises(ConfigError, match="law 'chinchilla' is already registered"):
        register(replace(POWER, name="chinchilla"))
    assert register(CHINCHILLA) is CHINCHILLA  # the same law again is no conflict


def test_fit_imports_a_user_law(tmp_path, on_path, capsys):
    from testbed.cli import main

    rng = np.random.default_rng(0)
    x = np.logspace(3, 6, 12)
    loss = (2.0 + 3000.0 / x) * np.exp(0.001 * rng.standard_normal(x.size))
    table = tmp_path / "points.csv"
    pd.DataFrame({"run_id": [f"r{i}" for i in range(x.size)], "X": x, "loss": loss}).to_csv(table, index=False)
    out = tmp_path / "fit"
    assert main(["fit", str(table), "--law", "test_inverse", "--import", "user_law", "--no-plots",
                 "--out", str(out)]) == 0
    params = json.loads((out / "fit.json").read_text())["params"]
    assert params["E"] == pytest.approx(2.0, rel=0.02) and params["A"] == pytest.approx(3000.0, rel=0.05)
    capsys.readouterr()
    assert main(["fit", str(table), "--law", "test_inverse", "--import", "no_such_module", "--no-plots",
                 "--out", str(out)]) == 2
    assert "--import 'no_such_module' cannot be imported" in capsys.readouterr().err
