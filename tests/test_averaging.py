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
from testbed.fit.collect import collect_runs
from testbed.fit.table import Points, select_points
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
    average_checkpoints(run_dir, 2)
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
