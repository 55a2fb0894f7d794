"""The researcher's daily loop: README.md's session block, line by line, and what `testbed
train` promises around it (docs/train.md): the start banner, --dry-run, a preset on the command
line, the run's own config.yaml and resuming from it, one error line under torchrun.

The session tests read the block from README.md and run each line as written, in a scratch
folder holding a copy of configs/, with the few changes a test needs to stay short (SCALE and
the constants below, each checked to still match the README): training lines get FAST appended
(a handful of tiny steps), the step numbers that follow from the run length are scaled with it,
the SLURM sweep runs on the local executor, and the smoke sweep's grid is shrunk.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from testbed.cli import main
from testbed.config import load_config

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SMOKE = REPO / "configs" / "smoke.yaml"

STEPS = 40
# Appended to every `testbed train CONFIG` line of the session: 40 steps of 4 sequences.
FAST = [f"train.steps={STEPS}", "schedule.warmup_steps=2", "train.global_batch_tokens=512",
        "data.val_sequences=4", "train.eval_every=20", "logging.wandb=false", "logging.progress=false"]
# Numbers in the session that follow from the smoke run's 245 steps, scaled to STEPS.
SCALE = {"checkpoint.every=50": "checkpoint.every=10", "--step 150": "--step 20",
         "step_00000245": f"step_{STEPS:08d}"}
# No SLURM cluster in a unit test: the same sweep on this machine.
SLURM = "--executor slurm --profile slurm/profiles/local.yaml --wait"
LOCAL = "--executor local --workers 2 --no-progress"
SKIPPED = {"testbed eval harness": "needs lm-eval and the network (the task is downloaded)",
           ". .venv/bin/activate": "the tests run in the environment already"}
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
           PYTHONPATH=str(REPO), WANDB_MODE="disabled")

# One tiny model for the in-process tests.
TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32", "data.seq_len=32",
        "data.val_sequences=4", "train.steps=8", "train.global_batch_tokens=128", "schedule.warmup_steps=1",
        "train.eval_every=4", "train.device=cpu", "logging.wandb=false", "logging.progress=false"]


# ----------------------------------------------------------------------------- the README's session


def session() -> list[list[str]]:
    """The session block's commands (comments dropped), in its blank-line separated paragraphs."""
    text = README.read_text()
    block = re.search(r"## What a session looks like\s+```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no session block"
    paragraphs: list[list[str]] = [[]]
    for raw in block.group(1).splitlines():
        line = re.sub(r"\s+#.*$", "", raw).strip()
        if not line:
            paragraphs.append([])
        else:
            paragraphs[-1].append(line)
    return [p for p in paragraphs if p]


def argv(line: str) -> list[str]:
    """A session line as this test runs it: scaled, FAST appended to training lines, `testbed`
    and `torchrun` through this interpreter."""
    for old, new in (*SCALE.items(), (SLURM, LOCAL)):
        line = line.replace(old, new)
    words = shlex.split(line)
    if words[:2] == ["testbed", "train"] or (words[0] == "torchrun" and "train" in words):
        if any(w.endswith(".yaml") for w in words):
            words += FAST
    if words[0] == "testbed":
        return [sys.executable, "-m", "testbed", *words[1:]]
    if words[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *words[1:]]
    raise AssertionError(f"a README session line this test does not know how to run: {line!r}")


def run(line: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(argv(line), cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{line!r} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def skipped(line: str) -> bool:
    return any(line.startswith(prefix) for prefix in SKIPPED)


@pytest.fixture
def scratch(tmp_path) -> Path:
    """A folder to run the session in: a copy of configs/ (the smoke sweep's grid shrunk) and
    slurm/."""
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    shutil.copytree(REPO / "slurm", tmp_path / "slurm")
    sweep = tmp_path / "configs" / "sweeps" / "smoke.yaml"
    spec = yaml.safe_load(sweep.read_text())
    spec["grid"]["train.tokens"] = [20_480, 40_960, 61_440]  # 20, 40 and 60 steps of 1024
    spec["base"]["logging"] = {"wandb": False, "progress": False}
    sweep.write_text(yaml.safe_dump(spec, sort_keys=False))
    return tmp_path


def test_the_scaled_numbers_are_the_readmes():
    """Each change the session tests make still finds its text in the README."""
    text = README.read_text()
    for old in (*SCALE, SLURM):
        assert old in text, f"README.md no longer holds {old!r}: update SCALE in this test"
    lines = [line for paragraph in session() for line in paragraph]
    assert len(lines) >= 18
    for line in lines:
        if not skipped(line):
            argv(line)  # every line is one this test knows how to run


@pytest.mark.slow
def test_session_train_resume_plan_branch_export_average(scratch):
    """The first paragraph: one run killed and resumed with its own config, a dry run, a
    schedule plot, a WSD run, a cooldown branch of it, an export and a checkpoint average."""
    lines = session()[0]
    assert lines[1].startswith("testbed train configs/smoke.yaml --run-dir runs/one")
    one = scratch / "runs" / "one"
    # The first line, killed (SIGTERM) once it saved its first checkpoint: a preemption.
    proc = subprocess.Popen(argv(lines[1]), cwd=scratch, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (one / "checkpoints" / "index.jsonl").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "the first run saved no checkpoint in 300 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    print(f"the first run exited {proc.returncode} (75: stopped by the SIGTERM; 0: finished before it)")
    assert proc.returncode in (0, 75), err
    assert "testbed train: N 1.0" in out and "non-embedding" in out and "run dir runs/one (new)" in out
    assert "note: model.preset=1m on the command line replaces the file's model.d_model=64 -> 128" in err
    run_json = json.loads((one / "run.json").read_text())
    assert (run_json["d_model"], run_json["n_layers"]) == (128, 5)  # the 1m rung, not the file's shape
    assert load_config(one / "config.yaml").to_dict() == run_json["config"]

    for line in lines[2:]:
        if skipped(line):
            continue
        result = run(line, scratch)
        if line.startswith("testbed train --run-dir runs/one --resume"):
            status = json.loads((one / "status.json").read_text())
            assert status["state"] == "done" and status["step"] == STEPS
            if proc.returncode == 75:
                assert "resumed at step" in result.stdout
        if "--dry-run" in line:
            config = yaml.safe_load(result.stdout)
            assert config["model"]["preset"] == "3m" and config["model"]["d_model"] == 192
            assert re.search(r"^# N \S+ \(\S+ non-embedding\), D \S+ tokens = \d+ steps", result.stdout, re.M)
    assert (scratch / "wsd.png").stat().st_size > 0
    branches = list((scratch / "runs" / "wsd" / "branches").iterdir())
    assert len(branches) == 1 and json.loads((branches[0] / "status.json").read_text())["state"] == "done"
    assert (scratch / "hf" / "config.json").is_file()
    assert (scratch / "runs" / "wsd" / "averages.jsonl").read_text().strip()


def corpus(path: Path, words: int) -> None:
    """Documents of made-up words with Zipf frequencies: enough text and variety for the
    session's 8192-token BPE and its 250k unique training tokens."""
    import random
    import string

    rng = random.Random(0)
    vocabulary = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(30_000)]
    weights = [1 / (rank + 1) for rank in range(len(vocabulary))]
    with path.open("w") as f:
        done = 0
        while done < words:
            n = rng.randint(200, 600)
            f.write(json.dumps({"text": " ".join(rng.choices(vocabulary, weights, k=n)) + "."}) + "\n")
            done += n


@pytest.mark.slow
def test_session_prepare_and_train_on_text(scratch):
    """The second paragraph: a corpus prepared into shards, a run on it repeating its first 250k
    tokens. (lm-eval's line is not run: it needs lm-eval and the network.)"""
    lines = session()[1]
    corpus(scratch / "corpus.jsonl", 400_000)
    for line in lines:
        if not skipped(line):
            run(line, scratch)
    run_json = json.loads((scratch / "runs" / "c8k" / "run.json").read_text())
    assert run_json["vocab_size"] == 8192 and run_json["unique_tokens"] == 250_000
    assert any(line.startswith("testbed eval harness runs/c8k") for line in lines)  # a run with a tokenizer


@pytest.mark.slow
def test_session_sweep_fit_and_ddp(scratch):
    """The third paragraph: plan, run (locally), status, collect and fit a sweep; fit a published
    table; a DDP run under torchrun."""
    lines = session()[2]
    src = REPO / "tests" / "data" / "epoch_chinchilla" / "svg_extracted_data.csv"
    import pandas as pd

    table = pd.read_csv(src)
    table.rename(columns={"Model Size": "params", "Training FLOP": "flops"})[["params", "flops", "loss"]] \
        .to_csv(scratch / "published.csv", index=False)
    for line in lines:
        run(line, scratch)
    assert (scratch / "table.csv").stat().st_size > 0
    assert json.loads((scratch / "runs" / "ddp" / "run.json").read_text())["world_size"] == 2


# ----------------------------------------------------------------------------- 1. the banner


def test_train_prints_a_two_line_banner_on_start(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", str(SMOKE), "--run-dir", str(run_dir), *TINY]) == 0
    out = capsys.readouterr().out
    banner = [line for line in out.splitlines() if line.startswith("testbed train:")]
    assert len(banner) == 1
    info = json.loads((run_dir / "run.json").read_text())
    first = banner[0]
    assert f"({info['n_params_non_embedding'] / 1e3:.3g}k non-embedding)" in first
    assert f"= {info['planned_steps']} steps x 128" in first and "FLOPs; fp32 on cpu" in first
    second = out.splitlines()[out.splitlines().index(first) + 1]
    assert f"run dir {run_dir} (new)" in second and "wandb off" in second
    assert f"config {run_dir / 'config.yaml'}" in second


# ----------------------------------------------------------------------------- 2. --dry-run


def test_dry_run_prints_the_resolved_config_and_the_plan_and_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", str(SMOKE), "--run-dir", str(run_dir), "model.preset=1m", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert not run_dir.exists()
    config = load_config(SMOKE, ["model.preset=1m"])
    assert yaml.safe_load(out) == config.to_dict()  # the output is a config file
    plan = [line[2:] for line in out.splitlines() if line.startswith("# ")]
    assert plan[0].startswith("N 1.04M (1M non-embedding), D 1M tokens = 245 steps x 4,096, C 7.13e12 FLOPs")
    assert any(line.startswith("batch 4,096 tokens = 32 sequences of 128") for line in plan)
    assert any(line.startswith("schedule cosine, peak lr 0.003 (warmup_steps 20") for line in plan)
    assert plan[-1] == f"run dir {run_dir} (new)"
    assert main(["train", str(SMOKE), "--run-dir", str(run_dir), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["d_model"] == 64


def test_dry_run_imports_no_torch(tmp_path):
    code = ("import sys; from testbed.cli import main; "
            f"assert main(['train', {str(SMOKE)!r}, '--run-dir', {str(tmp_path / 'r')!r}, '--dry-run']) == 0; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_dry_run_refuses_a_bad_config_with_one_line(capsys):
    assert main(["train", str(SMOKE), "model.n_heads=5", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.n_heads=5" in err


# ----------------------------------------------------------------------------- 3. presets


def test_a_preset_on_the_command_line_replaces_the_files_shape_with_a_note(tmp_path, capsys):
    notes: list[str] = []
    config = load_config(SMOKE, ["optim.lr=3e-3", "model.preset=1m"], notes=notes)
    assert (config.model.d_model, config.model.n_layers, config.model.n_heads) == (128, 5, 4)
    assert config.model.max_seq_len == 128  # not a shape key: the file's stays
    assert notes == ["model.preset=1m on the command line replaces the file's model.d_model=64 -> 128, "
                     "model.n_layers=2 -> 5"]
    # Shape keys on the command line still win over the preset, before or after it.
    for overrides in (["model.preset=1m", "model.n_layers=3"], ["model.n_layers=3", "model.preset=1m"]):
        model = load_config(SMOKE, overrides).model
        assert (model.d_model, model.n_layers) == (128, 3)
    # A preset in the file still yields to the file's keys (a saved config holds both).
    assert load_config({"model": {"preset": "1m", "d_model": 64, "n_heads": 4}}).model.d_model == 64
    # The depth dial in the file gives way too (the two together are an error).
    notes = []
    depth = load_config({"model": {"depth": 2}}, ["model.preset=1m"], notes=notes)
    assert depth.model.d_model == 128 and notes == ["model.preset=1m on the command line replaces the file's model.depth=2"]
    # The same rung again changes nothing and says nothing.
    saved = load_config(SMOKE, ["model.preset=1m"]).to_dict()
    notes = []
    assert load_config(saved, ["model.preset=1m"], notes=notes).to_dict() == saved and notes == []
    assert main(["train", str(SMOKE), "model.preset=1m", "--dry-run"]) == 0
    assert capsys.readouterr().err.startswith("note: model.preset=1m on the command line replaces")


# ----------------------------------------------------------------------------- 4. the run's own config


def interrupted(run_dir: Path, at_step: int, overrides: list[str], monkeypatch) -> None:
    """`testbed train` stopped by a real SIGUSR1 during step `at_step` (as a preemption)."""
    from testbed.data import loader as data_loader

    original = data_loader.BatchPlan.batch_tokens

    def batch_tokens(self, step, rank=0, world=1):
        if step == at_step - 1:
            signal.raise_signal(signal.SIGUSR1)
        return original(self, step, rank, world)

    with monkeypatch.context() as patch:
        patch.setattr(data_loader.BatchPlan, "batch_tokens", batch_tokens)
        assert main(["train", str(SMOKE), "--run-dir", str(run_dir), *overrides]) == 75


def test_resume_with_the_runs_own_config_and_no_config_argument(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "one"
    overrides = [*TINY, "optim.lr=1e-3"]
    interrupted(run_dir, 3, overrides, monkeypatch)
    saved = load_config(run_dir / "config.yaml")
    assert saved.to_dict() == json.loads((run_dir / "run.json").read_text())["config"]
    capsys.readouterr()
    # The README's old line: the file without the first command's overrides is refused, naming the fix.
    assert main(["train", str(SMOKE), "--run-dir", str(run_dir), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"`testbed train --run-dir {run_dir} --resume` (no CONFIG)" in err
    # Without CONFIG: the run's own config, resumed from its checkpoint at step 3.
    assert main(["train", "--run-dir", str(run_dir), "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"run dir {run_dir} (resumed at step 3)" in out
    assert json.loads((run_dir / "status.json").read_text())["step"] == 8
    # Finished: the same command accepts it, and overrides that change no number may come along.
    assert main(["train", "--run-dir", str(run_dir), "--resume", "logging.progress=true"]) == 0
    assert "already finished" in capsys.readouterr().out
    # run.json and config.yaml both start a new run with the same config.
    for source in ("run.json", "config.yaml"):
        assert main(["train", str(run_dir / source), "--run-dir", str(tmp_path / "new"), "--dry-run"]) == 0
        assert yaml.safe_load(capsys.readouterr().out) == saved.to_dict()


def test_a_run_directory_as_config_or_a_missing_one_is_one_clear_error(tmp_path, capsys):
    assert main(["train", str(tmp_path), "--dry-run"]) == 2
    assert f"`testbed train --run-dir {tmp_path} --resume`" in capsys.readouterr().err
    assert main(["train", "--run-dir", str(tmp_path / "none"), "--resume"]) == 2
    assert "does not exist, and no CONFIG was given" in capsys.readouterr().err
    assert main(["train", "--resume"]) == 2
    assert "give a CONFIG file, or --run-dir" in capsys.readouterr().err


def test_a_sweeps_config_yaml_is_kept_as_written_and_the_banner_names_wandbs_folder(tmp_path, capsys,
                                                                                      monkeypatch):
    """The trainer writes config.yaml only when its text differs: a sweep's stays untouched."""
    import torch

    from testbed.plan import describe
    from testbed.rundir import RunDir
    from testbed.train.resume import announce

    for name in ("WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    config = load_config(SMOKE, [*TINY, "logging.wandb=true"])
    rd = RunDir(tmp_path)
    rd.config_yaml.write_text(config.to_yaml())
    before = rd.config_yaml.stat().st_mtime_ns
    announce(rd, config, describe(config), 4, True, torch.device("cpu"), torch.float32, 2)
    assert rd.config_yaml.stat().st_mtime_ns == before
    out = capsys.readouterr().out
    assert out.startswith("testbed train: N ") and "; fp32 on cpu x 2 processes\n" in out
    assert out.endswith(f"run dir {tmp_path} (resumed at step 4), config {rd.config_yaml}, "
                        f"wandb {tmp_path / 'wandb'} (offline)\n")


# ----------------------------------------------------------------------------- 5. errors under torchrun


def test_an_error_is_printed_by_the_first_rank_to_fail_and_written_to_the_launchers_error_file(
        tmp_path, monkeypatch, capsys):
    """torchrun stops the other ranks as soon as one exits, so the first rank to fail prints the
    error (whichever it is: before, only rank 0 did, and a rank 1 failing first left the error
    unprinted, once in 12 runs on a loaded machine); every rank writes its error file."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dmodel: 5\n")
    attempt = tmp_path / "torchelastic" / "attempt_0"  # the launcher's layout: attempt_K/<local rank>/
    for rank in ("1", "0"):  # rank 1 fails first
        (attempt / rank).mkdir(parents=True)
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(attempt / rank / "error.json"))
        monkeypatch.setenv("RANK", rank)
        assert main(["train", str(bad)]) == 2
        err = capsys.readouterr().err
        if rank == "1":
            assert err.startswith("error: unknown config key 'model.dmodel'"), err
        else:
            assert err == ""
        record = json.loads((attempt / rank / "error.json").read_text())["message"]
        assert record["message"].startswith("ConfigError: unknown config key 'model.dmodel'")
        assert record["extraInfo"]["py_callstack"].startswith("error: unknown config key 'model.dmodel'")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))  # not the launcher's layout
    for rank in ("1", "0", "0"):  # rank 0 prints, every time: no claim is left behind
        monkeypatch.setenv("RANK", rank)
        assert main(["train", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err == "" if rank == "1" else err.startswith("error: unknown config key"), (rank, err)
        assert json.loads((tmp_path / "error.json").read_text())["message"]["message"].startswith("ConfigError")
    assert not (tmp_path / "testbed-error-reported").exists() and not (tmp_path.parent / "testbed-error-reported").exists()
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE")
    assert main(["train", str(bad)]) == 2  # no launcher collects it: rank 0 says it
    assert capsys.readouterr().err.startswith("error: unknown config key 'model.dmodel'")
    monkeypatch.setenv("RANK", "1")  # and any other rank says it with its rank
    assert main(["train", str(bad)]) == 2
    assert capsys.readouterr().err.startswith("error (rank 1): unknown config key")


@pytest.mark.slow
def test_torchrun_shows_a_config_error_once_and_as_the_root_cause(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dmodel: 5\n")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                             "testbed", "train", str(bad), "--run-dir", str(tmp_path / "run")],
                            cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert len(re.findall(r"^error: unknown config key 'model.dmodel'", output, re.M)) == 1
    root = output.split("Root Cause")[1]
    assert "traceback : error: unknown config key 'model.dmodel'" in root
    assert "To enable traceback" not in output
    assert not (tmp_path / "run").exists()
