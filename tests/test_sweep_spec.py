"""Sweep files: expansion, derived fields, run ids, bad input, the plan command."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from testbed.cli import main
from testbed.errors import ConfigError
from testbed.sweep.expr import evaluate
from testbed.sweep.registry import Registry
from testbed.sweep.spec import load_sweep

BASE = {
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32},
    "data": {"seq_len": 32},
    "train": {"global_batch_tokens": 256},
    "logging": {"wandb": False, "progress": False},
}


def sweep(**fields):
    return {"name": "t", "base": BASE, **fields}


def test_grid_times_zip_with_derived_fields():
    s = load_sweep(sweep(grid={"model.d_model": [32, 64], "model.n_layers": [1, 2]},
                         zip={"optim.lr": ["3e-3", 1e-3], "train.seed": [0, 1]},
                         derived={"train.tokens": "20 * n_params", "checkpoint.log_spaced": 8,
                                  "optim.weight_decay": "0.1 * model.d_model / 32"}))
    assert len(s.runs) == 2 * 2 * 2
    seen = {(r.config.model.d_model, r.config.model.n_layers, r.config.optim.lr,
             r.config.train.seed) for r in s.runs}
    assert len(seen) == 8
    for run in s.runs:
        assert run.config.train.tokens == 20 * run.quantities["n_params"]
        assert run.config.checkpoint.log_spaced == 8
        assert run.config.optim.weight_decay == pytest.approx(0.1 * run.config.model.d_model / 32)
        assert (run.config.optim.lr, run.config.train.seed) in ((3e-3, 0), (1e-3, 1))
        # labels are the resolved (typed) axis values, the id starts with their slug
        assert run.labels["lr"] == run.config.optim.lr
        assert run.run_id.startswith(f"d_model-{run.config.model.d_model}_n_layers-")
        assert run.config.labels == run.labels


def test_run_ids_stable_and_adding_an_axis_value_adds_only_new_runs(tmp_path):
    first = load_sweep(sweep(grid={"model.d_model": [32, 64]}, derived={"train.steps": 5}))
    again = load_sweep(sweep(grid={"model.d_model": [32, 64]}, derived={"train.steps": 5}))
    assert [r.run_id for r in first.runs] == [r.run_id for r in again.runs]
    registry = Registry(tmp_path)
    ids = registry.add_runs(first)
    grown = load_sweep(sweep(grid={"model.d_model": [32, 64, 96]}, derived={"train.steps": 5}))
    # an added axis changes the label slug but not the config: old runs keep their ids
    relabelled = load_sweep(sweep(grid={"model.d_model": [32, 64, 96], "train.seed": [0]},
                                  derived={"train.steps": 5}))
    ids_grown = registry.add_runs(grown)
    ids_relabelled = registry.add_runs(relabelled)
    assert ids_grown[:2] == ids and ids_relabelled == ids_grown
    assert len(registry.records()) == 3
    # cosmetic keys do not change the id
    cosmetic = load_sweep(sweep(grid={"model.d_model": [32, 64]}, derived={"train.steps": 5},
                                labels=[]))
    assert {r.config_hash for r in cosmetic.runs} == {r.config_hash for r in first.runs}


def test_base_from_a_file_relative_to_the_sweep(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "base.yaml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "sweeps").mkdir()
    path = tmp_path / "sweeps" / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "f", "base": "../configs/base.yaml",
                                    "grid": {"train.tokens_per_param": [10, 20]}}))
    s = load_sweep(path)
    assert [r.config.train.tokens_per_param for r in s.runs] == [10, 20]
    assert s.runs[1].quantities["planned_tokens"] >= 20 * s.runs[1].quantities["n_params"]


@pytest.mark.parametrize("fields, message", [
    ({"grid": {"model.d_modle": [32]}}, "did you mean 'model.d_model'"),
    ({"grid": {"model.d_model": []}}, "empty"),
    ({"zip": {"optim.lr": [1e-3, 2e-3], "train.seed": [0]}}, "different lengths"),
    ({"grid": {"train.seed": [0, 0]}}, "same config"),
    ({"grid": {"logging.progress": [True, False]}}, "same config"),
    ({"grdi": {"train.seed": [0]}}, "did you mean 'grid'"),
    ({"derived": {"optim.lr": "__import__('os').getcwd()"}}, "not allowed"),
    ({"derived": {"optim.lr": "n_parms * 2"}}, "unknown name 'n_parms'"),
    ({"grid": {"model.n_heads": [3]}}, "divisible"),
])
def test_bad_sweeps_name_the_problem(fields, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(sweep(**{"derived": {"train.steps": 5}, **fields}))


@pytest.mark.parametrize("key, bad, good", [
    ("optim.name", "lion", "adamw"),
    ("model.norm", "batchnorm", "rmsnorm"),
    ("model.init", "xavier", "normal"),
])
def test_unknown_registered_names_fail_the_sweep_not_the_runs(key, bad, good, tmp_path, capsys):
    # Every run would fail at start; the sweep must be rejected before any is queued.
    with pytest.raises(ConfigError, match=rf"{key}={bad!r} is not a registered .*{good}"):
        load_sweep(sweep(grid={key: [good, bad]}, derived={"train.steps": 5}))
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(sweep(grid={key: [bad]}, derived={"train.steps": 5})))
    assert main(["sweep", "plan", str(path)]) == 2
    assert f"{key}={bad!r}" in capsys.readouterr().err


def test_checking_the_optimiser_name_imports_no_torch():
    code = ("import sys; from testbed.config import load_config; from testbed.plan import describe; "
            "describe(load_config(None, ['train.steps=3', 'optim.name=adamw'])); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_expressions_are_restricted():
    names = {"n_params": 1e6, "model": {"d_model": 64}}
    assert evaluate("0.003 * (n_params / 1e6) ** -0.2", names) == pytest.approx(0.003)
    assert evaluate("max(2, min(8, sqrt(model.d_model)))", names) == 8
    assert evaluate("round(log(n_params) * 10)", names) == round(13.8155 * 10)
    for bad in ("().__class__", "open('x')", "lambda: 1", "[1, 2]", "n_params.real",
                "10 ** 10 ** 10", "'a' * 3", "x if 1 else 2"):
        with pytest.raises(ConfigError):
            evaluate(bad, names)


def test_plan_prints_every_run_and_totals(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(sweep(grid={"model.d_model": [32, 64]},
                                         derived={"train.tokens": "20 * n_params"})))
    assert main(["sweep", "plan", str(path), "--device", "a100", "--mfu", "0.5", "--json"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert len(report["runs"]) == 2
    run = report["runs"][1]
    assert run["seconds"] == pytest.approx(run["flops"] / (312e12 * 0.5))
    assert report["totals"]["flops"] == sum(r["flops"] for r in report["runs"])
    assert main(["sweep", "plan", str(path), "--peak-flops", "1e12"]) == 0
    table = capsys.readouterr().out
    assert "TOTAL" in table and report["runs"][0]["run_id"] in table
    assert main(["sweep", "plan", str(path), "--device", "tpu"]) == 2
    assert "--device='tpu'" in capsys.readouterr().err


def test_smoke_sweep_is_valid_and_small():
    s = load_sweep("configs/sweeps/smoke.yaml")
    assert len(s.runs) >= 4
    assert all(r.config.checkpoint.log_spaced >= 4 for r in s.runs)
    assert all(r.config.data.source == "synthetic" for r in s.runs)
    sizes = sorted(r.quantities["n_params"] for r in s.runs)
    assert sizes[-1] >= 4 * sizes[0]  # a span worth fitting
    assert len({r.quantities["planned_tokens"] for r in s.runs}) >= 2  # and several durations
    # A few minutes on 2 CPU cores: these tiny models run at well over 100 steps/s per core.
    assert sum(r.quantities["planned_steps"] for r in s.runs) <= 30_000


def test_sweep_cli_imports_no_torch():
    code = "import sys, argparse, testbed.sweep.cli as c; " \
           "c.register(argparse.ArgumentParser().add_subparsers()); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_plan_states_its_precision_and_uses_the_trainer_peak_table(tmp_path, capsys):
    import json

    from testbed.train import device as dev

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(sweep(grid={"model.d_model": [32, 64]}, derived={"train.tokens": 1e5})))
    assert main(["sweep", "plan", str(path), "--device", "a10g", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["precision"] == "bf16" and report["peak_flops"] == dict(dev.PEAK_BF16_FLOPS)["A10G"]

    assert main(["sweep", "plan", str(path), "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["precision"] == "fp32" and report["peak_flops"] > 1e9
    assert any("bf16 matrix units" in n for n in report["notes"]) == dev.cpu_has_bf16_units()

    path.write_text(yaml.safe_dump(sweep(grid={"model.d_model": [32, 64], "train.precision": ["bf16"]},
                                         derived={"train.tokens": 1e5})))
    assert main(["sweep", "plan", str(path), "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "in bf16 at" in table
    assert ("emulated" in table) == (not dev.cpu_has_bf16_units())
