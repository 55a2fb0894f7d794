"""The run directory (testbed/rundir.py): its files, the one tolerant reader, and every reader
of a run (trainer, checkpoints, sweep status, fitter) agreeing on it; cooldown branches of a
sweep reach the fit."""

from __future__ import annotations

import errno
import json
import math
import os

import pandas as pd
import pytest
import yaml

from testbed import exits
from testbed.cli import main
from testbed.config import config_hash, run_id
from testbed.errors import TestbedError
from testbed.rundir import (
    STORAGE_ERRORS,
    RunDir,
    StorageError,
    append_jsonl,
    find_runs,
    read_jsonl,
    storage_error,
)


def test_only_a_cut_last_line_is_forgiven(tmp_path):
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"step": 1})
    append_jsonl(path, {"step": 2, "loss": float("nan")})
    assert read_jsonl(path) == [{"step": 1}, {"step": 2, "loss": None}]  # NaN written as null
    with open(path, "a") as handle:
        handle.write('{"step": 3, "lo')  # a kill in the middle of an append
    assert read_jsonl(path) == [{"step": 1}, {"step": 2, "loss": None}]
    append_jsonl(path, {"step": 4})  # the next append drops the cut tail first
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 4]
    assert path.read_text().count("\n") == 3

    damaged = tmp_path / "d.jsonl"
    damaged.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(TestbedError, match=r"d.jsonl line 2 is not valid JSON"):
        read_jsonl(damaged)
    # A complete but unparsable last line (it has its newline) is damage too, not a cut write.
    damaged.write_text('{"step": 1}\n{"step": 2, "lo\n')
    with pytest.raises(TestbedError, match="line 2"):
        read_jsonl(damaged)


@pytest.mark.parametrize("line", ["[1, 2]", "[]", "3", '"x"', "null", '{"kind": "rolling"}',
                                  '{"step": "4", "kind": "rolling", "path": "p"}',
                                  '{"step": 4, "kind": "weekly", "path": "p"}'])
def test_lines_that_parse_but_are_not_records_are_damage(tmp_path, line):
    run = RunDir(tmp_path)
    run.append_index({"step": 2, "kind": "rolling", "path": "checkpoints/step_00000002"})
    with open(run.index_path, "a") as handle:
        handle.write(line + "\n")
    run.append_index({"step": 4, "kind": "science", "path": "checkpoints/step_00000004"})
    with pytest.raises(TestbedError, match=r"index.jsonl line 2 is (a JSON|an object whose).*damaged.*delete"):
        run.index()
    if line.startswith("{"):
        assert len(read_jsonl(run.index_path)) == 3  # to the reader that requires no key, a line
    else:  # cut (no newline) and last: a write a kill interrupted, as an unparseable cut line is
        run.index_path.write_text('{"step": 2, "kind": "rolling", "path": "p"}\n' + line)
        assert [r["step"] for r in run.index()] == [2]


def test_run_files_are_never_written_through_a_link(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"keep me\n")
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    writes = {run.metrics_path: lambda: run.append_metrics({"step": 1}),
              run.log_path: lambda: run.log("hello"),
              run.status_json: lambda: run.write_status("running", step=0),
              run.run_json: lambda: run.write_run({"run_id": "x"}),
              run.lock_path: run.acquire}
    for path, write in writes.items():
        path.symlink_to(outside)
        with pytest.raises(TestbedError, match=rf"{path.name}' is a symbolic link.*remove the link"):
            write()
        assert outside.read_bytes() == b"keep me\n" and path.is_symlink()
        path.unlink()
    with pytest.raises(TestbedError, match="symbolic link"):
        run.metrics_path.symlink_to(outside)
        run.metrics()
    assert run.lock_holder() is None  # a link is no lock anybody holds
    # The hidden temporary file of an atomic write is created anew, never opened through a link.
    run.metrics_path.unlink()
    tmp = run.path / f".status.json.{os.getpid()}.tmp"
    tmp.symlink_to(outside)
    run.write_status("running", step=0)
    assert outside.read_bytes() == b"keep me\n" and run.read_status()["state"] == "running"
    assert not tmp.exists() and not tmp.is_symlink()
    run.log_path.mkdir()
    with pytest.raises(TestbedError, match="train.log' is a directory"):
        run.log("hello")


def test_storage_errors_have_one_owner(tmp_path):
    from testbed.train import checkpoint as ckpt

    err = storage_error(OSError(errno.EDQUOT, "quota"), tmp_path / "metrics.jsonl")
    assert isinstance(err, StorageError) and isinstance(err, TestbedError) and isinstance(err, OSError)
    assert err.errno == errno.EDQUOT and "\n" not in str(err) and str(err).startswith(f"'{tmp_path}/metrics.jsonl'")
    assert "quota" in str(err) and "MB free there" in str(err)
    assert storage_error(OSError(errno.EACCES, "no"), tmp_path).errno == errno.EACCES  # not a storage error
    assert not hasattr(ckpt, "STORAGE_ERRORS") and set(STORAGE_ERRORS) == {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def test_damaged_json_file_is_an_error_naming_it(tmp_path):
    run = RunDir(tmp_path)
    assert run.read_run() is None and run.read_status() == {}
    run.write_status("running", step=3)
    assert run.read_status() == {"state": "running", "step": 3}
    run.status_json.write_text('{"state": "run')
    with pytest.raises(TestbedError, match="status.json is not valid JSON"):
        run.read_status()
    with pytest.raises(ValueError, match="not one of"):
        run.write_status("finished")


def test_run_ids_ignore_what_changes_no_number():
    tree = {"name": None, "labels": {}, "logging": {"wandb": True}, "model": {"preset": "1m", "d_model": 8},
            "train": {"steps": 3}}
    other = dict(tree, logging={"wandb": False}, labels={"x": 1}, model={"preset": None, "d_model": 8})
    assert config_hash(tree) == config_hash(other) == run_id(tree)
    assert config_hash(dict(tree, train={"steps": 4})) != config_hash(tree)
    assert run_id(dict(tree, name="sweep/a")) == "sweep/a"


def test_a_field_added_later_is_left_out_of_the_id_at_its_default(monkeypatch):
    """Fields declare it in their section's dataclass (a schedule's in its class): no table."""
    from dataclasses import dataclass, field, fields

    from testbed.config import ADDED_LATER, Config, load_config, section_classes
    from testbed.rundir import HASH_AT_DEFAULT, hash_tree
    from testbed.schedules import SCHEDULES, Constant

    later = {(section, f.name): getattr(cls(), f.name) for section, cls in section_classes(Config().to_dict()).items()
             for f in fields(cls) if f.metadata.get(HASH_AT_DEFAULT, True) is False}
    # the fields added after the first runs were registered; the rest are hashed at any value
    assert later == {("train", "flops"): None, ("optim", "z_loss"): 0.0, ("train", "ema_decay"): None,
                     ("model", "mup_base_head_dim"): None, ("model", "parametrization"): "sp",
                     ("model", "mup_base_width"): None, ("model", "qk_norm_type"): "rmsnorm",
                     **{("model", f"{part}_options"): {} for part in ("norm", "qk_norm", "attention", "mlp",
                                                                       "position")},
                     ("optim", "options"): {}, ("data", "source_options"): {}, ("train", "cuda_graphs"): None}
    tree = load_config(None).to_dict()
    without = {**tree, "optim": {k: v for k, v in tree["optim"].items() if k != "z_loss"}}
    assert config_hash(tree) == config_hash(without)
    assert config_hash({**tree, "optim": {**tree["optim"], "z_loss": 1e-4}}) != config_hash(tree)
    assert config_hash({k: v for k, v in tree.items() if k != "optim"}) != config_hash(tree)  # eps is hashed

    monkeypatch.setattr(SCHEDULES, "_items", dict(SCHEDULES._items))  # registered for this test only

    @SCHEDULES.register("test_later_field")
    @dataclass(frozen=True)
    class WithLater(Constant):
        bump: float = field(default=1.0, metadata=ADDED_LATER)

    section = {"name": "test_later_field", "warmup_steps": 0, "warmup_fraction": None}
    at_default = {**tree, "schedule": {**section, "bump": 1.0}}
    assert config_hash(at_default) == config_hash({**tree, "schedule": section})
    assert config_hash({**tree, "schedule": {**section, "bump": 2.0}}) != config_hash(at_default)
    assert hash_tree(at_default, {}) != config_hash(at_default)  # the classes passed decide


def test_exit_codes_are_the_ones_the_batch_script_is_rendered_with():
    from testbed.sweep.slurm import TEMPLATES_DIR

    for template in sorted(TEMPLATES_DIR.glob("*.sbatch")):
        text = template.read_text()
        # No exit code is written into a template by hand: all come from testbed/exits.py.
        assert "{{exit_preempted}}" in text and "== 75" not in text and "== 3 " not in text
    assert exits.from_state("done") == exits.DONE and exits.from_state("preempted") == exits.PREEMPTED
    assert exits.from_state("failed") == exits.from_state(None) == exits.FAILURE


# ----------------------------------------------------------------------------- real runs

TINY = ["model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.max_seq_len=16", "data.seq_len=16",
        "data.val_sequences=8", "train.global_batch_tokens=128", "logging.wandb=false",
        "logging.progress=false", "data.source=synthetic"]


@pytest.mark.slow
def test_every_reader_agrees_on_a_run_killed_mid_write(tmp_path):
    """A kill can cut the last line of metrics.jsonl and of the checkpoint index: the trainer's
    resume, the checkpoint index, sweep status and the fitter all read the same complete lines."""
    from testbed.config import load_config
    from testbed.fit.points.collect import collect_curves, collect_runs
    from testbed.sweep.registry import Registry
    from testbed.sweep.status import last_metrics
    from testbed.train import checkpoint as ckpt
    from testbed.train.metrics import MetricsLog
    from testbed.train.trainer import train

    sweep = tmp_path / "sweep"
    run = RunDir(sweep / "runs" / "r1")
    config = load_config(None, TINY + ["train.steps=8", "train.log_every=2", "train.eval_every=4",
                                       "checkpoint.every=4", "checkpoint.final=false"])
    train(config, run.path)
    metrics, index = run.metrics(), run.index()
    assert [m["step"] for m in metrics if "train_loss" in m] == [2, 4, 6, 8] and len(index) == 2
    with open(run.metrics_path, "a") as handle:
        handle.write('{"step": 10, "train_loss": 1.')
    with open(run.index_path, "a") as handle:
        handle.write('{"step": 12, "val_loss"')

    assert run.metrics() == metrics and run.index() == index
    assert ckpt.read_index(run.path) == index
    status = last_metrics(Registry(sweep), "r1")
    last_train = [m for m in metrics if "train_loss" in m][-1]
    assert {k: status.get(k) for k in ("step", "train_loss", "val_loss", "spikes")} == {
        "step": 8, "train_loss": last_train["train_loss"], "spikes": last_train["spikes"],
        "val_loss": [m for m in metrics if "val_loss" in m][-1]["val_loss"]}
    points = collect_runs(sweep)
    assert sorted(points["step"]) == [4, 8]
    assert list(points["loss"]) == pytest.approx([i["val_loss"] for i in index])
    curves = collect_curves(sweep)
    assert len(curves) == len(metrics) and curves["step"].max() == 8
    # What a resume from step 8 keeps of the log: the same lines, the cut one dropped.
    MetricsLog(run.path).truncate_after(8)
    assert run.metrics() == metrics and run.metrics_path.read_text().endswith("\n")


@pytest.mark.slow
def test_cooldown_branches_of_a_sweep_reach_the_fit(tmp_path, capsys):
    """A local sweep of WSD runs, `testbed branch` cooldowns from each, then `fit collect` lists
    every branch's final point as `cooldown` and `testbed fit` uses them."""
    spec = {
        "name": "wsdbranches",
        "base": {
            "model": {"n_layers": 1, "n_heads": 2, "max_seq_len": 16},
            "data": {"source": "synthetic", "seq_len": 16, "val_sequences": 16},
            "optim": {"lr": 1.0e-2},
            "schedule": {"name": "wsd", "decay_fraction": 0.25, "warmup_steps": 1},
            "train": {"steps": 16, "global_batch_tokens": 128, "eval_every": 8, "log_every": 4},
            "checkpoint": {"every": 4, "log_spaced": 0},
            "logging": {"wandb": False, "progress": False},
        },
        "grid": {"model.d_model": [8, 16, 24]},
        "labels": ["model.d_model"],
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    assert main(["sweep", "run", str(path), "--sweep-dir", str(out), "--workers", "1", "--no-progress"]) == 0
    parents = sorted(p for p in (out / "runs").iterdir() if p.is_dir())
    assert len(parents) == 3
    for parent in parents:
        for step in (4, 8):
            assert main(["branch", str(parent), "--step", str(step), "--decay", "0.5"]) == 0
    capsys.readouterr()

    runs = find_runs(out)
    assert len(runs) == 9 and sum(1 for r in runs if "branches" in r.path.parts) == 6
    table_path = tmp_path / "points.csv"
    assert main(["fit", "collect", str(out), "--out", str(table_path)]) == 0
    table = pd.read_csv(table_path)
    cooldown = table[table["point_kind"] == "cooldown"]
    assert len(cooldown) == 6 and cooldown["parent_run"].notna().all()
    assert sorted(cooldown["step"].tolist()) == [8, 8, 8, 16, 16, 16]  # S / (1 - 0.5)
    assert (table["point_kind"] == "final").sum() == 3

    fit_out = tmp_path / "fit"
    assert main(["fit", str(out), "--law", "chinchilla", "--no-plots", "--bootstrap", "0",
                 "--out", str(fit_out)]) == 0
    result = json.loads((fit_out / "fit.json").read_text())
    assert result["n_points"] == 9  # 3 final + 6 cooldown points
    assert math.isfinite(result["objective"])
