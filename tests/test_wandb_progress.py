"""wandb as clusters use it, read back from real offline run files: the run named after its
directory, grouped by sweep, tagged by study and arm, metrics under train/, val/ and eval/, and
wandb's environment variables honoured where the config leaves them unset. Progress of `data
prepare` and `fit` on stderr when it is a log, and none with --quiet."""

from __future__ import annotations

import json
import shlex
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from text_corpus import fox_text

from testbed import progress
from testbed.cli import main
from testbed.config import load_config
from testbed.rundir import write_json_atomic
from testbed.train.metrics import MetricsLog, run_name, wandb_key, wandb_settings
from testbed.train.trainer import train

TASKS = Path(__file__).resolve().parent / "data" / "tasks"
TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=64",
        "data.seq_len=32", "train.global_batch_tokens=512", "train.log_every=1", "train.eval_every=2",
        "train.steps=2", "logging.wandb=true", "logging.progress=false", "data.val_sequences=4",
        "name=smoke"]
WANDB_ENV = ("WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR", "WANDB_ENTITY", "WANDB_NAME", "WANDB_RUN_GROUP",
             "WANDB_TAGS", progress.INTERVAL_ENV)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in WANDB_ENV:
        monkeypatch.delenv(key, raising=False)


# ----------------------------------------------------------------------------- reading runs


def wandb_records(path: Path) -> list:
    """Every record of a .wandb file: wandb's LevelDB-style log (a 7-byte ':W&B' header, then
    32 KiB blocks of chunks, each checksum u32, length u16, type u8: full, first, middle, last)
    holding wandb_internal_pb2.Record protobufs. wandb 0.2x ships no Python reader for it."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb log"
    block, pos, pending, raw = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        if pos + 7 + length > len(data):  # still being written
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            raw.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        else:
            raw.append(pending + chunk)
    records = []
    for item in raw:
        record = pb.Record()
        record.ParseFromString(item)
        records.append(record)
    return records


def offline_run(wandb_root: Path) -> dict:
    """The one offline run under WANDB_ROOT/wandb: its folder, run record and history keys.
    wandb's service writes the file behind the process that logs: wait for its exit record."""
    folders = list((wandb_root / "wandb").glob("offline-run-*"))
    assert len(folders) == 1, folders
    deadline = time.monotonic() + 60
    while True:
        records = wandb_records(next(folders[0].glob("*.wandb")))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    keys = {item.key or "/".join(item.nested_key) for r in records if r.WhichOneof("record_type") == "history"
            for item in r.history.item}
    return {"folder": folders[0], "run": runs[0], "keys": keys}


# ----------------------------------------------------------------------------- wandb


def test_keys_names_and_settings():
    assert wandb_key("train_loss") == "train/loss" and wandb_key("lr") == "train/lr"
    assert wandb_key("val_loss_ema") == "val/loss_ema" and wandb_key("val_bpb") == "val/bpb"
    assert wandb_key("task/hellaswag/acc_norm") == "eval/hellaswag/acc_norm"
    assert run_name(Path("/x/sweep/runs/r-003")) == "r-003"
    assert run_name(Path("/x/runs/wsd/branches/step400_decay0.2")) == "wsd/step400_decay0.2"
    default = wandb_settings(None, None, Path("/r/one"), env={})
    assert default | {"name": "one"} == {"project": "testbed", "mode": "offline", "dir": "/r/one", "entity": None,
                                         "name": "one", "group": None, "tags": None}
    env = {"WANDB_MODE": "online", "WANDB_PROJECT": "p", "WANDB_DIR": "/scratch", "WANDB_ENTITY": "lab",
           "WANDB_RUN_GROUP": "g", "WANDB_TAGS": "a, b,,a"}
    from_env = wandb_settings(None, None, Path("/r/one"), env=env)
    assert from_env == {"project": "p", "mode": "online", "dir": "/scratch", "entity": "lab", "name": "one",
                        "group": "g", "tags": ["a", "b"]}
    explicit = wandb_settings("mine", "disabled", Path("/r/one"), env=env)
    assert (explicit["project"], explicit["mode"]) == ("mine", "disabled")
    # The defaults are unset in the config, so the environment can decide.
    logging = load_config(None, []).logging
    assert (logging.wandb_mode, logging.wandb_project) == (None, None)


def test_missing_wandb_is_one_clear_line(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    log = MetricsLog(tmp_path)
    log.start_wandb(None, None, {}, tmp_path)
    err = capsys.readouterr().err
    assert log.wandb_thread is None
    assert err.count("\n") == 1 and "wandb is not installed" in err and "logging.wandb=false" in err


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    """A small prepared text folder, for task evaluations (they need a text tokenizer)."""
    from testbed.data.shards import prepare

    root = tmp_path_factory.mktemp("wandb_data")
    corpus = root / "c.txt"
    corpus.write_text(fox_text(200))
    prepare(corpus, root / "data", vocab_size=300, cache_dir=root / "cache", val_fraction=0.2)
    return root / "data"


def test_offline_run_named_grouped_tagged_and_prefixed(tmp_path, monkeypatch, text_data):
    """Config name 'smoke', run directory 'smoke-lr3': the wandb run is 'smoke-lr3'. The
    environment decides mode, project, folder, group and tags; metrics.jsonl stays flat."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "scratch"))
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    monkeypatch.setenv("WANDB_RUN_GROUP", "lr-sweep")
    monkeypatch.setenv("WANDB_TAGS", "study:wsd,arm:wsd-cosine")
    tasks = f"train.tasks=[{{name: fox, path: {TASKS / 'fox_mc.jsonl'}}}]"
    run_dir = tmp_path / "runs" / "smoke-lr3"
    train(load_config(None, TINY + [f"data.path={text_data}", tasks]), run_dir)
    assert not (run_dir / "wandb").exists()  # WANDB_DIR holds it
    found = offline_run(tmp_path / "scratch")
    run = found["run"]
    assert run.display_name == "smoke-lr3" and run.project == "from-env"
    assert run.run_group == "lr-sweep" and list(run.tags) == ["study:wsd", "arm:wsd-cosine"]
    keys = found["keys"]
    assert {"train/loss", "train/lr", "train/tokens", "val/loss", "val/bpb", "eval/fox/acc"} <= keys
    assert not {"train_loss", "val_loss", "lr", "task/fox/acc"} & keys
    flat = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("train_loss" in m for m in flat) and any("task/fox/acc" in m and "val_loss" in m for m in flat)
    assert not any(k.startswith(("train/", "val/", "eval/")) for m in flat for k in m)


def test_config_beats_environment_and_environment_beats_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    # Unset in the config: WANDB_MODE=disabled turns wandb off (no run folder at all).
    train(load_config(None, TINY), tmp_path / "quiet")
    assert not (tmp_path / "quiet" / "wandb").exists()
    # Set in the config: offline mode and the config's project, whatever the environment says.
    train(load_config(None, TINY + ["logging.wandb_mode=offline", "logging.wandb_project=from-config"]),
          tmp_path / "loud")
    found = offline_run(tmp_path / "loud")
    assert found["run"].project == "from-config" and found["run"].display_name == "loud"
    assert "train/loss" in found["keys"]


def test_sweep_runs_share_a_group_and_a_study_tags_them(tmp_path):
    """A real run through the local executor (forked from its fork server) inside a study's
    tags: the wandb run's group is the sweep's name and its tags name the study and arm."""
    from testbed.study.runner import wandb_tags
    from testbed.sweep.local import LocalExecutor
    from testbed.sweep.registry import Registry
    from testbed.sweep.spec import load_sweep

    base = {"model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32},
            "data": {"seq_len": 32, "val_sequences": 4},
            "train": {"steps": 2, "global_batch_tokens": 256, "eval_every": 2, "log_every": 1},
            "logging": {"wandb": True, "progress": False}}
    sweep = load_sweep({"name": "lr-grid", "base": base, "grid": {"optim.lr": [1e-3]}})
    folder = tmp_path / "sweep"
    folder.mkdir()
    write_json_atomic(folder / "sweep.json", {"name": sweep.name})
    registry = Registry(folder)
    ids = registry.add_runs(sweep)
    with wandb_tags("study:demo", "arm:lr-grid"):
        assert LocalExecutor(registry, ids, progress=False).run() == {"done": 1}
    found = offline_run(registry.run_dir(ids[0]))
    assert found["run"].display_name == ids[0]
    assert found["run"].run_group == "lr-grid"
    assert list(found["run"].tags) == ["study:demo", "arm:lr-grid"]


def test_slurm_script_exports_the_sweep_as_group(tmp_path):
    from testbed.sweep.slurm import DEFAULTS, render_script

    profile = {**DEFAULTS, "partition": "p", "time": "1:00:00", "cpus_per_task": 1, "mem": "1G"}
    for nodes in (1, 2):
        script = render_script("my sweep", tmp_path, [["r1"]], {**profile, "nodes": nodes})
        lines = [line for line in script.splitlines() if line.startswith(("SWEEP_NAME=", "export WANDB_RUN_GROUP"))]
        assert len(lines) == 2, script
        snippet = "\n".join(lines) + '\necho "$WANDB_RUN_GROUP"'
        env = {"PATH": "/usr/bin:/bin"}
        out = subprocess.run(["bash", "-c", snippet], env=env, capture_output=True, text=True, check=True)
        assert out.stdout == "my sweep\n"
        out = subprocess.run(["bash", "-c", snippet], env={**env, "WANDB_RUN_GROUP": "mine"},
                             capture_output=True, text=True, check=True)
        assert out.stdout == "mine\n"  # the submitting shell's choice stands
    assert shlex.quote("my sweep") in script


def test_study_tags_add_to_the_environment_and_are_restored(monkeypatch):
    import os

    from testbed.study.runner import wandb_tags

    monkeypatch.setenv("WANDB_TAGS", "mine")
    with wandb_tags("study:x", "arm:y"):
        assert os.environ["WANDB_TAGS"] == "mine,study:x,arm:y"
    assert os.environ["WANDB_TAGS"] == "mine"
    monkeypatch.delenv("WANDB_TAGS")
    with wandb_tags("study:x"):
        assert os.environ["WANDB_TAGS"] == "study:x"
    assert "WANDB_TAGS" not in os.environ


# ----------------------------------------------------------------------------- progress


def corpus(path: Path) -> Path:
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat and then ran far away from home into the big wide world".split()
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 40))}) + "\n" for _ in range(200)))
    return path


def prepare_args(tmp_path: Path, out: str) -> list[str]:
    return ["data", "prepare", "--source", str(corpus(tmp_path / "c.jsonl")), "--vocab-size", "300",
            "--out", str(tmp_path / out), "--cache-dir", str(tmp_path / f"cache-{out}")]


def test_data_prepare_progress_in_a_log(tmp_path, monkeypatch, capsys):
    """stderr is no terminal under capsys: plain lines. Interval 0: a line at every update and
    a closing line for each step, the tokenizer's training included."""
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")
    assert main(prepare_args(tmp_path, "a")) == 0
    err = capsys.readouterr().err
    assert "\r" not in err  # lines, not a redrawn bar
    for line in ("tokenizer sample: reading the source: ", "training a 300-token BPE on the tokenizer sample",
                 "BPE 300: reading the sample: ", "trained the 300-token BPE in",
                 "tokenising: 200/200 docs (100%)"):
        assert line in err, (line, err)
    assert err.count("(done)") == 3


def test_data_prepare_quiet_and_short_steps_write_no_progress(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")
    assert main([*prepare_args(tmp_path, "q"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "200 documents" in captured.out
    monkeypatch.delenv(progress.INTERVAL_ENV)  # the default interval: steps this short write no line
    assert main(prepare_args(tmp_path, "d")) == 0
    err = capsys.readouterr().err
    assert "tokenising:" not in err and "reading the source:" not in err
    assert "training a 300-token BPE" in err and "wrote train-00000.bin" in err


def fit_sweep(root: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_fit_cli import write_run

    rng = np.random.default_rng(0)
    for i, budget in enumerate(np.logspace(15, 18, 4)):
        for j, n in enumerate(np.exp(np.linspace(np.log(budget / 6) * 0.35, np.log(budget / 6) * 0.5, 4))):
            write_run(root, f"run{i}{j}", float(n), int(budget / (6 * n)), rng)
    return root


def test_fit_and_bootstrap_progress_and_quiet(tmp_path, monkeypatch, capsys):
    sweep = fit_sweep(tmp_path / "sweep")
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")
    args = ["fit", str(sweep), "--law", "chinchilla", "--bootstrap", "20", "--no-plots"]
    assert main([*args, "--out", str(tmp_path / "f1")]) == 0
    err = capsys.readouterr().err
    assert "fit chinchilla (free): " in err and "starts (100%)" in err
    assert "bootstrap chinchilla: 20 replicates: 200/200 iterations (100%)" in err
    assert "bootstrap: parameters and derived quantities: 20/20 replicates (100%)" in err
    assert main([*args, "--out", str(tmp_path / "f2"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_progress_lines_follow_the_interval(monkeypatch, capsys):
    monkeypatch.setenv(progress.INTERVAL_ENV, "3600")
    with progress.enabled(), progress.Progress("slow", total=10, unit="step") as bar:
        for _ in range(10):
            bar.update()
    assert capsys.readouterr().err == ""  # under an interval: nothing, not even a last line
    monkeypatch.setenv(progress.INTERVAL_ENV, "500")
    clock = iter(range(0, 100_000, 1000))  # each reading of the clock 1000 s later
    monkeypatch.setattr(progress.time, "monotonic", lambda: float(next(clock)))
    with progress.enabled(), progress.Progress("slow", total=10, unit="step") as bar:
        for _ in range(10):
            bar.update()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("slow: 1/10 steps (10%)") and "left" in lines[0]
    assert lines[-1].startswith("slow: 10/10 steps (100%)") and lines[-1].endswith("(done)")
    with progress.Progress("off", total=3) as bar:  # not enabled: library calls stay quiet
        bar.update(3)
    assert capsys.readouterr().err == ""
