"""Weight averaging as an alternative to a cooldown: the EMA of the weights kept during training
(train.ema_decay) and the mean of a run's last checkpoints (`testbed average`), checked against
calculations made here, and both reaching `testbed fit collect`."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from testbed import cli as testbed_cli
from testbed.config import load_config
from testbed.errors import ConfigError, TestbedError
from testbed.fit.points.collect import collect_runs
from testbed.fit.points.table import Points, select_points
from testbed.model.transformer import Transformer
from testbed.plan import resolved_model
from testbed.rundir import RunDir
from testbed.train import checkpoint as ckpt
from testbed.train.average import average_checkpoints, average_weights
from testbed.train.trainer import train

DECAY = 0.5
STEPS = 4
TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32", "data.seq_len=32",
        "data.source=synthetic", "data.val_sequences=8", "train.global_batch_tokens=256", "train.device=cpu",
        "optim.lr=3e-3", "schedule.name=constant", "schedule.warmup_steps=1", f"train.steps={STEPS}",
        "train.log_every=1", "train.eval_every=2", "checkpoint.every=1", "logging.wandb=false",
        "logging.progress=false"]


def folder(run_dir, step):
    return run_dir / "checkpoints" / f"step_{step:08d}"


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    config = load_config(None, TINY + [f"train.ema_decay={DECAY}"])
    run_dir = tmp_path_factory.mktemp("ema") / "run"
    assert train(config, run_dir)["exit_code"] == 0
    return config, run_dir


def test_ema_is_the_moving_average_of_the_saved_weights(ema_run):
    config, run_dir = ema_run
    # The weights training started from: the trainer seeds torch with train.seed, then builds the model.
    torch.manual_seed(config.train.seed)
    expected = {k: v.clone() for k, v in Transformer(resolved_model(config)).state_dict().items()}
    for step in range(1, STEPS + 1):
        weights = load_file(str(folder(run_dir, step) / "model.safetensors"))
        ema = load_file(str(folder(run_dir, step) / "ema.safetensors"))
        assert set(ema) == set(weights)
        for key, value in weights.items():
            expected[key] = DECAY * expected[key] + (1 - DECAY) * value
            torch.testing.assert_close(ema[key], expected[key], rtol=0, atol=1e-6)
        assert not torch.equal(ema["embed.weight"], weights["embed.weight"])  # an average, not a copy
        assert ckpt.verify(folder(run_dir, step)) is None  # ema.safetensors is checksummed too


def test_ema_validation_sits_beside_the_validation(ema_run):
    config, run_dir = ema_run
    evals = [m for m in RunDir(run_dir).metrics() if "val_loss" in m]
    assert [m["step"] for m in evals] == [1, 2, 3, 4]  # every checkpoint is validated
    for line in evals:
        assert {"val_loss_ema", "val_bpb_ema", "val_bits_per_token_ema", "val_excess_loss_ema"} <= set(line)
        assert line["val_loss_ema"] != line["val_loss"]
        assert line["val_excess_loss_ema"] == pytest.approx(line["val_loss_ema"] - line["val_opt_loss"])
    # The last one through the trainer's evaluation of the averaged weights, done here again.
    from testbed.data import loader as data_loader
    from testbed.train.distributed import Dist
    from testbed.train.trainer import evaluate

    model = Transformer(resolved_model(config))
    model.load_state_dict(load_file(str(folder(run_dir, STEPS) / "ema.safetensors")), strict=False)
    source = data_loader.make_source(config)
    val_ids = data_loader.validation_windows(source, config.data.val_sequences)
    again = evaluate(model, source, val_ids, len(val_ids), torch.device("cpu"), torch.float32, Dist(), None)
    assert again["val_loss"] == evals[-1]["val_loss_ema"]
    index = {line["step"]: line for line in RunDir(run_dir).index()}
    assert index[STEPS]["val_loss_ema"] == evals[-1]["val_loss_ema"]
    log = RunDir(run_dir).log_path.read_text()
    assert f"step {STEPS}/{STEPS}: val_loss {evals[-1]['val_loss']:.4f}" in log
    assert f"EMA val_loss {evals[-1]['val_loss_ema']:.4f}" in log


def test_ema_decay_outside_its_range_is_one_error():
    with pytest.raises(ConfigError, match=r"train\.ema_decay=1\.0"):
        load_config(None, ["train.ema_decay=1.0"])


def test_checkpoint_average_is_the_mean_of_the_saved_weights(ema_run, tmp_path):
    _, run_dir = ema_run
    saved = [load_file(str(folder(run_dir, s) / "model.safetensors")) for s in (2, 3, 4)]
    mean = average_weights([folder(run_dir, s) for s in (2, 3, 4)])
    for key in saved[0]:  # the mean of the three float32 values, rounded once to float32
        exact = (saved[0][key].double() + saved[1][key].double() + saved[2][key].double()) / 3
        assert torch.equal(mean[key], exact.float()), key
    record = average_checkpoints(run_dir, 3, out=tmp_path / "hf")
    assert record["steps"] == [2, 3, 4] and record["last"] == 3 and record["step"] == STEPS
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    # The mean of one checkpoint is that checkpoint: its evaluation is the trainer's, exactly.
    one = average_checkpoints(run_dir, 1)
    newest = [line for line in RunDir(run_dir).index() if line["step"] == STEPS][-1]
    assert (one["val_loss"], one["val_bpb"]) == (newest["val_loss"], newest["val_bpb"])
    assert RunDir(run_dir).averages()[-2:] == [record, one]
    assert record["val_loss"] != one["val_loss"]


def test_averaging_more_checkpoints_than_saved_is_one_error(ema_run, capsys):
    _, run_dir = ema_run
    before = RunDir(run_dir).averages()
    assert testbed_cli.main(["average", str(run_dir), "--last", "9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--last 9" in err and "4 saved checkpoint(s)" in err and "between 1 and 4" in err
    with pytest.raises(TestbedError, match="--last 0"):
        average_checkpoints(run_dir, 0)
    assert RunDir(run_dir).averages() == before  # nothing recorded


def test_averaging_a_file_instead_of_a_run_directory_is_one_error(ema_run, tmp_path, capsys):
    _, run_dir = ema_run
    before = (RunDir(run_dir).averages(), (run_dir / "run.json").read_bytes())
    stray = tmp_path / "notes.txt"
    stray.write_text("x")
    for path in (run_dir / "run.json", stray, run_dir / "checkpoints" / "index.jsonl"):
        assert testbed_cli.main(["average", str(path), "--last", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err and str(path) in err and "is a file" in err, err
        assert "run directory" in err, err
    assert (RunDir(run_dir).averages(), (run_dir / "run.json").read_bytes()) == before
    assert stray.read_text() == "x"


def test_a_checkpoint_removed_while_averaging_is_named_as_removed_not_damaged(ema_run, tmp_path, monkeypatch):
    """A trainer still running deletes rolling checkpoints as it saves: one that vanishes between
    the index and the read gives one error that says so, and nothing is recorded."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(ema_run[1], run_dir)
    before = RunDir(run_dir).averages()
    verify = ckpt.verify

    def removed_first(folder):
        shutil.rmtree(folder)  # the trainer's retention, between listing and reading
        return verify(folder)

    monkeypatch.setattr(ckpt, "verify", removed_first)
    with pytest.raises(TestbedError, match="was removed while it was being read") as err:
        average_checkpoints(run_dir, 2)
    assert "damaged" not in str(err.value)
    assert RunDir(run_dir).averages() == before
    # A folder that is there but broken is still called damaged.
    monkeypatch.setattr(ckpt, "verify", verify)
    newest = max((run_dir / "checkpoints").glob("step_*"))
    (newest / "model.safetensors").write_bytes(b"not tensors")
    with pytest.raises(TestbedError, match="is damaged"):
        average_checkpoints(run_dir, 1)


def test_fit_collect_lists_ema_and_average_points(ema_run, tmp_path, capsys):
    _, run_dir = ema_run
    for last in (1, 3, 2):  # its own records, whatever the file's other tests ran before it
        average_checkpoints(run_dir, last)
    out = tmp_path / "points.csv"
    assert testbed_cli.main(["fit", "collect", str(run_dir), "--out", str(out)]) == 0
    assert "'ema': 4" in capsys.readouterr().out
    table = pd.read_csv(out)
    ema = table[table["point_kind"] == "ema"]
    evals = [m for m in RunDir(run_dir).metrics() if "val_loss_ema" in m]
    assert ema["step"].tolist() == [1, 2, 3, 4] and ema["loss"].tolist() == [m["val_loss_ema"] for m in evals]
    assert ema["C"].tolist() == [m["flops"] for m in evals] and (ema["ema_decay"] == DECAY).all()
    averages = table[table["point_kind"] == "average"]
    # One point per (step, K), the newest record: K = 1, 2 and 3 at the last step.
    assert sorted(averages["average_last"].tolist()) == [1, 2, 3] and (averages["step"] == STEPS).all()
    newest = {r["last"]: r["val_loss"] for r in RunDir(run_dir).averages()}
    assert dict(zip(averages["average_last"], averages["loss"])) == pytest.approx(newest)

    points = Points(collect_runs(run_dir), {})
    final = select_points(points, "final")
    assert final.frame["point_kind"].tolist() == ["final"]
    assert any("--points ema" in reason for reason in final.dropped)
    assert select_points(points, "ema", skip_fraction=0.0).frame["point_kind"].tolist() == ["ema"] * 4
    assert select_points(points, "ema", skip_fraction=0.6).frame["step"].tolist() == [3, 4]
    assert len(select_points(points, "average").frame) == 3
    assert "ema" not in set(select_points(points, "all").frame["point_kind"])


# ----------------------------------------------------------------------------- phases of a WSD run
# 10 steps: warmup 1-2, stable 3-7, decay 8-10 (a checkpoint at step S has the phase of step S - 1).
# Saved: 1 (science, at_tokens), 4 and 8 (science), 6, 7 and 9 (rolling, the newest 3 kept), 10 (final).
WSD = [o for o in TINY if not o.startswith(("schedule.", "train.steps", "checkpoint.every"))] + [
    "schedule.name=wsd", "schedule.warmup_steps=2", "schedule.decay_fraction=0.3", "train.steps=10",
    "checkpoint.every=4", "checkpoint.at_tokens=[256]", "checkpoint.rolling_every=1", "checkpoint.keep_rolling=3"]


@pytest.fixture(scope="module")
def wsd_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("wsd") / "run"
    assert train(load_config(None, WSD), run_dir)["exit_code"] == 0
    saved = {line["step"]: (line["phase"], line["kind"]) for line in RunDir(run_dir).index()
             if (run_dir / line["path"]).is_dir() and not line.get("deleted")}
    assert saved == {1: ("warmup", "science"), 4: ("stable", "science"), 6: ("stable", "rolling"),
                     7: ("stable", "rolling"), 8: ("decay", "science"), 9: ("decay", "rolling"),
                     10: ("decay", "final")}
    return run_dir


def branch_error(run_dir, step, capsys) -> str:
    assert testbed_cli.main(["branch", str(run_dir), "--step", str(step), "--decay", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert not (run_dir / "branches").exists()
    return err


def test_branching_past_the_run_names_its_length_and_stable_checkpoints(wsd_run, capsys):
    err = branch_error(wsd_run, 400, capsys)
    assert "--step 400 is beyond the end of the parent run" in err and "decay phase" not in err, err
    assert "its 10 steps: warmup 1-2, stable 3-7, decay 8-10" in err, err
    assert "stable-phase checkpoints: --step 4, 6, 7" in err, err


def test_branching_in_the_decay_or_warmup_names_the_stable_checkpoints(wsd_run, capsys):
    for step, phase in ((9, "decay"), (2, "warmup")):
        err = branch_error(wsd_run, step, capsys)
        assert f"--step {step} is in the parent's {phase} phase" in err, err
        assert "stable 3-7" in err and "--step 4, 6, 7" in err, err


def test_branching_at_a_stable_step_without_checkpoint_names_the_ones_saved(wsd_run, capsys):
    err = branch_error(wsd_run, 5, capsys)  # stable, but its rolling checkpoint was retired
    assert "saved no checkpoint at that step" in err and "--step 4, 6, 7" in err, err


def test_average_says_which_phases_it_mixes(wsd_run, capsys):
    assert testbed_cli.main(["average", str(wsd_run), "--last", "7"]) == 0
    first, second = capsys.readouterr().out.strip().splitlines()
    assert first.startswith("averaging 7 checkpoints, steps 1-10, mixing the warmup, stable and decay phases"), first
    assert "(warmup 1, stable 3, decay 3; kinds: science 3, rolling 3, final 1)" in first, first
    assert "--phase stable" in first and "val_loss" in second
    assert RunDir(wsd_run).averages()[-1]["steps"] == [1, 4, 6, 7, 8, 9, 10]


def test_average_of_one_phase_takes_its_newest_checkpoints(wsd_run, capsys):
    assert testbed_cli.main(["average", str(wsd_run), "--last", "3", "--phase", "stable"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == "averaging 3 checkpoint(s), steps 4-7, all in the stable phase (kinds: science 1, rolling 2)"
    assert RunDir(wsd_run).averages()[-1]["steps"] == [4, 6, 7]
    record = average_checkpoints(wsd_run, 2, phase="decay")
    assert record["steps"] == [9, 10] and record["step"] == 10


def test_average_of_a_phase_with_too_few_checkpoints_is_one_error(wsd_run, capsys):
    before = RunDir(wsd_run).averages()
    assert testbed_cli.main(["average", str(wsd_run), "--last", "2", "--phase", "warmup"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "1 saved checkpoint(s) in its warmup phase" in err and "between 1 and 1" in err, err
    with pytest.raises(SystemExit):  # argparse's own error, naming the three phases
        testbed_cli.main(["average", str(wsd_run), "--last", "1", "--phase", "cooldown"])
    assert "invalid choice: 'cooldown'" in capsys.readouterr().err
    with pytest.raises(TestbedError, match="--phase 'cooldown' is not a phase"):
        average_checkpoints(wsd_run, 1, phase="cooldown")
    assert RunDir(wsd_run).averages() == before


def test_an_index_without_phases_gets_them_from_the_schedule(wsd_run):
    from testbed.train.average import describe_choice, with_phases

    lines = [{k: v for k, v in line.items() if k != "phase"} for line in RunDir(wsd_run).index()]
    filled = with_phases(lines, load_config(None, WSD))
    assert {line["step"]: line["phase"] for line in filled}[3] == "stable"
    assert [line["phase"] for line in filled if line["step"] in (2, 8)] == ["warmup", "decay"]
    assert describe_choice(lines[-2:]).startswith("averaging 2 checkpoint")  # unknown phases still read


def test_average_until_a_step_takes_the_newest_checkpoints_up_to_it(wsd_run, capsys):
    """At a point inside the run (where a cooldown branch from earlier would end): the last K saved at
    or before it; a step without a checkpoint, or too few before it, is one error naming what is saved."""
    before = RunDir(wsd_run).averages()
    record = average_checkpoints(wsd_run, 2, until=7)
    assert record["steps"] == [6, 7] and record["step"] == 7
    assert testbed_cli.main(["average", str(wsd_run), "--last", "3", "--until-step", "7"]) == 0
    assert RunDir(wsd_run).averages()[-1]["steps"] == [4, 6, 7]
    capsys.readouterr()
    assert testbed_cli.main(["average", str(wsd_run), "--last", "2", "--until-step", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "saved no checkpoint at that step (saved: [1, 4, 6, 7, 8, 9, 10])" in err, err
    with pytest.raises(TestbedError, match="4 saved checkpoint\\(s\\) up to step 7"):
        average_checkpoints(wsd_run, 5, until=7)
    assert len(RunDir(wsd_run).averages()) == len(before) + 2
