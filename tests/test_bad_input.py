"""Bad input anywhere (config values, CLI flags, tables, derived expressions, run directories)
is one clear error naming what is wrong, never a traceback, a hang or a silently changed value,
and nothing is written."""

from __future__ import annotations

import json
import math
import shutil
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testbed.cli import main
from testbed.config import load_config
from testbed.errors import ConfigError, TestbedError

# ----------------------------------------------------------------------------- config values

NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf, "nan", "inf", "1e400", "-1e400"])
FRACTIONAL = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False).filter(lambda v: not v.is_integer())
TOO_LARGE = st.integers(min_value=2**63, max_value=10**40)


def whole_below(low: int):
    """Bad values for a whole-number field whose least valid value is `low`."""
    return st.integers(max_value=low - 1, min_value=-10**12) | FRACTIONAL | NON_FINITE | TOO_LARGE


def number_at_most(high: float, inclusive: bool = True):
    """Bad values for a number field that must be above `high` (or at least it, inclusive=False)."""
    if inclusive:
        return st.floats(max_value=high, min_value=-1e12, allow_nan=False) | NON_FINITE
    return st.floats(max_value=high, min_value=-1e12, allow_nan=False, exclude_max=True) | NON_FINITE


OUTSIDE_UNIT = (st.floats(max_value=0, exclude_max=True, min_value=-1e12, allow_nan=False)
                | st.floats(min_value=1, exclude_min=True, max_value=1e12, allow_nan=False) | NON_FINITE)

# key -> (bad values, overrides that make the key exist)
FIELDS = {
    "model.d_model": (whole_below(1), {}),
    "model.n_layers": (whole_below(1), {}),
    "model.n_heads": (whole_below(1), {}),
    "model.n_kv_heads": (whole_below(1), {}),
    "model.ffn_ratio": (number_at_most(0), {}),
    "model.ffn_multiple_of": (whole_below(1), {}),
    "model.vocab_size": (whole_below(1), {}),
    "model.max_seq_len": (whole_below(1), {}),
    "model.norm_eps": (number_at_most(0), {}),
    "model.rope_theta": (number_at_most(0), {}),
    "model.init_std": (number_at_most(0), {}),
    "model.depth": (whole_below(1), {}),
    "model.depth_aspect": (whole_below(1), {}),
    "model.depth_head_dim": (whole_below(1), {}),
    "model.dropout": (st.floats(max_value=0, exclude_max=True, min_value=-1e6, allow_nan=False)
                      | st.floats(min_value=1, max_value=1e6) | NON_FINITE, {}),
    "data.seq_len": (whole_below(1), {}),
    "data.unique_tokens": (whole_below(1), {}),
    "data.seed": (whole_below(0) | st.integers(min_value=2**32, max_value=2**62), {}),
    "data.val_sequences": (whole_below(1), {}),
    "optim.lr": (number_at_most(0), {}),
    "optim.eps": (number_at_most(0), {}),
    "optim.weight_decay": (number_at_most(0, inclusive=False), {}),
    "optim.grad_clip": (number_at_most(0, inclusive=False), {}),
    "train.tokens": (whole_below(1), {}),
    "train.steps": (whole_below(1), {}),
    "train.tokens_per_param": (number_at_most(0), {}),
    "train.flops": (number_at_most(0), {}),
    "train.global_batch_tokens": (whole_below(1), {}),
    "train.micro_batch_size": (whole_below(1), {}),
    "train.seed": (whole_below(0) | st.integers(min_value=2**32, max_value=2**62), {}),
    "train.eval_every": (whole_below(1), {}),
    "train.log_every": (whole_below(1), {}),
    "train.divergence_nats": (number_at_most(0), {}),
    "train.ema_decay": (st.floats(max_value=0, exclude_max=True, min_value=-1e6, allow_nan=False)
                        | st.floats(min_value=1, max_value=1e6) | NON_FINITE, {}),
    "checkpoint.every": (whole_below(1), {}),
    "checkpoint.log_spaced": (whole_below(0), {}),
    "checkpoint.rolling_every": (whole_below(1), {}),
    "checkpoint.keep_rolling": (whole_below(1), {}),
    "schedule.warmup_steps": (whole_below(0), {}),
    "schedule.warmup_fraction": (OUTSIDE_UNIT, {}),
    "schedule.min_lr_ratio": (OUTSIDE_UNIT, {}),
    "schedule.decay_fraction": (OUTSIDE_UNIT, {"schedule.name": "wsd"}),
    "schedule.decay_start_step": (whole_below(0), {"schedule.name": "wsd"}),
    "schedule.inv_sqrt_timescale": (whole_below(1), {"schedule.name": "inverse_sqrt"}),
    "schedule.power_a": (number_at_most(0), {"schedule.name": "power"}),
    "schedule.power_b": (st.floats(min_value=0, exclude_min=True, max_value=1e6) | NON_FINITE,
                         {"schedule.name": "power"}),
    "schedule.power_decay_fraction": (OUTSIDE_UNIT, {"schedule.name": "power"}),
    "schedule.power_batch_size": (whole_below(1), {"schedule.name": "power"}),
}


def shown(value) -> list[str]:
    """The ways a message may quote the value."""
    forms = [repr(value), str(value)]
    if isinstance(value, float):
        forms.append(repr(float(value)))
    return forms


@st.composite
def bad_setting(draw):
    key = draw(st.sampled_from(sorted(FIELDS)))
    values, context = FIELDS[key]
    return key, draw(values), context


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad_setting())
def test_every_bad_field_value_is_one_error_naming_the_field_and_value(setting):
    key, value, context = setting
    with pytest.raises(ConfigError) as err:
        load_config(None, {**context, key: value})
    message = str(err.value)
    assert "\n" not in message
    assert key in message, message
    assert any(form in message for form in shown(value)), message


@pytest.mark.parametrize("override", [
    "train.tokens=nan", "train.tokens=inf", "train.tokens=1e400", "model.ffn_multiple_of=0",
    "model.ffn_multiple_of=-32", "model.n_kv_heads=-1", "model.n_kv_heads=0", "optim.eps=-1",
    "model.norm_eps=-1", "model.rope_theta=0", "model.init_std=.inf", "train.tokens_per_param=.inf",
])
def test_issue_values_are_config_errors(override):
    key, raw = override.split("=")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


@pytest.fixture(scope="module")
def empty_yaml(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "empty.yaml"
    path.write_text("{}\n")
    return path


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(setting=bad_setting())
def test_train_with_a_bad_value_writes_nothing(setting, empty_yaml, tmp_path, capsys):
    key, value, context = setting
    run_dir = tmp_path / f"run{abs(hash((key, str(value))))}"
    overrides = [f"{k}={v}" for k, v in {**context, key: value}.items()]
    assert main(["train", str(empty_yaml), *overrides, "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and key in err, err
    assert not run_dir.exists()


# ----------------------------------------------------------------------------- derived expressions


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=2, max_value=10**6), st.integers(min_value=2, max_value=1000),
       st.integers(min_value=2, max_value=1000), st.integers(min_value=1, max_value=3))
def test_huge_derived_values_are_refused_at_once(base, e1, e2, depth):
    from testbed.sweep.expr import MAX_MAGNITUDE, evaluate

    text = str(base)
    for exponent in (e1, e2, e1)[:depth]:
        text = f"({text})**{exponent}"
    t0 = time.perf_counter()
    try:
        value = evaluate(text, {}, "train.tokens")
    except ConfigError as err:
        assert "train.tokens" in str(err)
    else:
        assert abs(value) <= MAX_MAGNITUDE
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("text", ["((10**1000)**1000)**1000", "(10**1000)**5", "10**29 * 1000",
                                  "0.5 ** -1000", "(-8) ** 0.5", "1e300 * 1e300"])
def test_issue_expressions_are_config_errors(text):
    from testbed.sweep.expr import evaluate

    with pytest.raises(ConfigError, match="train.tokens"):
        evaluate(text, {}, "train.tokens")


# ----------------------------------------------------------------------------- data and fit flags


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(f"document {i} with a few words" for i in range(20)) + "\n")
    return path


@pytest.mark.parametrize("flags", [["--shard-tokens", "0"], ["--sample-bytes", "0"], ["--min-val-docs", "-1"],
                                   ["--workers", "0"], ["--val-fraction", "1.5"]])
def test_data_prepare_flags_out_of_range(flags, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    cache = tmp_path / "cache"
    assert main(["data", "prepare", "--source", str(corpus), "--vocab-size", "300", "--out", str(out),
                 "--cache-dir", str(cache), *flags]) == 2
    assert flags[0] in capsys.readouterr().err
    assert not out.exists() and not cache.exists()


def test_train_tokenizer_sample_bytes_zero(corpus, tmp_path, capsys):
    assert main(["data", "train-tokenizer", "--source", str(corpus), "--vocab-size", "300",
                 "--cache-dir", str(tmp_path / "cache"), "--sample-bytes", "0"]) == 2
    assert "--sample-bytes 0 must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("N,D,loss\n" + "".join(f"{n},{20 * n},{2 + 1e3 / n}\n" for n in (1e6, 2e6, 4e6, 8e6, 1.6e7)))
    return path


@pytest.mark.parametrize("flags,named", [(["--delta", "0"], "--delta"), (["--delta", "-1"], "--delta"),
                                         (["--delta", "nan"], "--delta"), (["--bootstrap", "-5"], "--bootstrap")])
def test_fit_flags_out_of_range(flags, named, table, tmp_path, capsys):
    out = tmp_path / "fit"
    assert main(["fit", str(table), "--out", str(out), "--no-plots", *flags]) == 2
    assert named in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("content,words", [
    (b"", "empty"), (b"N,D,loss\n", "no rows"), (b"\x00\x01\x02PK\x03\x04\xff\xfe" * 20, "binary"),
    (b"N,D,loss\n1e6,2e7,3.1\n2e6,4e7\n", "line 3"), (b"N,D,loss\n1e6,2e7,3.1,9\n", "line 2"),
    (b"N,D,loss\n1e6,2e7,\xff\xfe\n", "UTF-8"),
])
def test_fit_refuses_unreadable_tables(content, words, tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    assert main(["fit", str(path), "--out", str(tmp_path / "fit"), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.csv" in err and words in err, err
    assert not (tmp_path / "fit").exists()


# ----------------------------------------------------------------------------- YAML files not UTF-8

NOT_UTF8 = {
    "binary": b"\x00\x01\x02PK\x03\x04\xff\xfe\x89PNG" * 20,
    "utf-16": "name: s\ngrid:\n  optim.lr: [0.001]\n".encode("utf-16"),  # with its byte-order mark
    "utf-16-le": "name: s\n".encode("utf-16-le"),  # no byte-order mark: NUL bytes between letters
    "latin-1": "name: s\ndescription: caf\xe9\n".encode("latin-1"),
}


def assert_not_utf8_error(code, err, path):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert str(path) in err and "not UTF-8 text" in err and "save it as UTF-8" in err, err


@pytest.mark.parametrize("kind", sorted(NOT_UTF8))
def test_config_sweep_and_profile_files_that_are_not_utf8_are_one_error(kind, tmp_path, capsys):
    bad = tmp_path / f"bad-{kind}.yaml"
    bad.write_bytes(NOT_UTF8[kind])
    good_sweep = tmp_path / "sweep.yaml"
    good_sweep.write_text("name: s\nbase:\n  train: {steps: 2}\ngrid:\n  optim.lr: [0.001]\n")
    based = tmp_path / "based.yaml"  # a good sweep whose base config is the bad file
    based.write_text(f"name: s\nbase: {bad.name}\ngrid:\n  optim.lr: [0.001]\n")
    commands = [
        ["train", str(bad), "--run-dir", str(tmp_path / "run")],
        ["sweep", "plan", str(bad)],
        ["sweep", "run", str(bad), "--sweep-dir", str(tmp_path / "sweep")],
        ["sweep", "plan", str(based)],
        ["sweep", "run", str(good_sweep), "--sweep-dir", str(tmp_path / "sweep"), "--executor", "slurm",
         "--profile", str(bad)],
    ]
    for argv in commands:
        assert_not_utf8_error(main(argv), capsys.readouterr().err, bad)
    assert bad.read_bytes() == NOT_UTF8[kind]  # the file is left as it was
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


def test_utf16_file_is_named_as_utf16(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_bytes(NOT_UTF8["utf-16"])
    assert main(["train", str(bad)]) == 2
    assert "UTF-16" in capsys.readouterr().err


# ----------------------------------------------------------------------------- training runs

TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=64",
        "data.seq_len=32", "train.global_batch_tokens=512", "train.log_every=1", "train.eval_every=10",
        "logging.wandb=false", "logging.progress=false", "data.val_sequences=8"]


def cfg(*extra):
    return load_config(None, TINY + list(extra))


def test_run_dir_that_is_a_file_or_under_one(tmp_path, capsys):
    from testbed.train.trainer import train

    blocker = tmp_path / "file"
    blocker.write_text("x")
    for run_dir in (blocker, blocker / "run"):
        with pytest.raises(TestbedError, match="is a file"):
            train(cfg("train.steps=2"), run_dir)
    assert blocker.read_text() == "x"


def test_read_only_run_dir_and_export_target(tmp_path, monkeypatch):
    import errno
    import os
    from pathlib import Path

    from testbed.train.export import export_checkpoint
    from testbed.train.trainer import train

    train(cfg("train.steps=2"), tmp_path / "r")
    checkpoint = tmp_path / "r" / "checkpoints" / "step_00000002"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p).name == "ro" else real_access(p, mode))
    (tmp_path / "ro").mkdir()
    with pytest.raises(TestbedError, match="not writable"):
        train(cfg("train.steps=2"), tmp_path / "ro" / "run")
    with pytest.raises(TestbedError, match="not writable"):
        export_checkpoint(checkpoint, tmp_path / "ro" / "hf")
    assert not any((tmp_path / "ro").iterdir())
    (tmp_path / "file").write_text("x")
    with pytest.raises(TestbedError, match="is a file"):
        export_checkpoint(checkpoint, tmp_path / "file")
    monkeypatch.undo()

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(TestbedError, match="Read-only file system"):
        export_checkpoint(checkpoint, tmp_path / "hf")
    with pytest.raises(TestbedError, match="Read-only file system"):
        train(cfg("train.steps=2"), tmp_path / "run2")


@pytest.mark.parametrize("bad", [["data.path=/nonexistent/prepared"], ["train.micro_batch_size=3"],
                                 ["train.steps=2", "schedule.warmup_steps=5"]])
def test_a_start_that_fails_writes_nothing_and_the_fixed_rerun_works(bad, tmp_path):
    from testbed.train.trainer import train

    run_dir = tmp_path / "run"
    with pytest.raises(TestbedError):
        train(cfg("train.steps=2", *bad), run_dir)
    assert not run_dir.exists()
    assert train(cfg("train.steps=2"), run_dir)["state"] == "done"


def test_overwrite_keeps_the_old_run_when_the_new_start_fails(tmp_path):
    from testbed.train.trainer import train

    run_dir = tmp_path / "run"
    train(cfg("train.steps=2"), run_dir)
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    with pytest.raises(TestbedError):
        train(cfg("train.steps=2", "data.path=/nonexistent/prepared"), run_dir, overwrite=True)
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before


def test_a_different_config_is_refused_naming_overwrite(tmp_path):
    from testbed.rundir import RunDir
    from testbed.train.trainer import train

    run_dir = tmp_path / "run"
    train(cfg("train.steps=2"), run_dir)
    RunDir(run_dir).write_status("failed", step=0, message="boom")  # stopped before finishing
    with pytest.raises(TestbedError, match="--overwrite"):
        train(cfg("train.steps=2", "optim.lr=1e-3"), run_dir)


def test_resume_of_a_finished_run_with_another_config_is_refused(tmp_path, capsys):
    from testbed.train.trainer import train

    run_dir = tmp_path / "run"
    train(cfg("train.steps=2"), run_dir)
    with pytest.raises(TestbedError, match=r"optim\.lr: 0\.003 -> 0\.01"):
        train(cfg("train.steps=2", "optim.lr=1e-2"), run_dir, resume=True)
    # Its own config (a changed name or logging is no difference) is still accepted.
    assert train(cfg("train.steps=2", "logging.progress=true"), run_dir, resume=True)["state"] == "done"


def test_export_needs_only_the_checkpoint(tmp_path):
    from testbed.data.shards import prepare
    from testbed.train.export import export_checkpoint
    from testbed.train.trainer import train

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"Document {i}: the {'quick brown fox ' * (i % 7 + 3)}jumps over "
                                  f"{i * 7} lazy dogs." for i in range(300)) + "\n")
    prepare(corpus, tmp_path / "data", vocab_size=300, cache_dir=tmp_path / "cache", val_fraction=0.2)
    train(cfg("train.steps=2", f"data.path={tmp_path / 'data'}", "data.val_sequences=2"), tmp_path / "r")
    shutil.move(tmp_path / "data", tmp_path / "moved")
    out = export_checkpoint(tmp_path / "r" / "checkpoints" / "step_00000002", tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["vocab_size"] >= 300


def test_divergence_stops_the_run_as_failed(tmp_path, capsys):
    from testbed.rundir import RunDir

    run_dir = tmp_path / "run"
    # A margin no training loss stays under once it rises: the first rise after warmup stops it.
    overrides = [*TINY, "train.steps=30", "schedule.warmup_steps=2", "train.divergence_nats=1e-9",
                 "checkpoint.rolling_every=1"]
    (tmp_path / "c.yaml").write_text("{}\n")
    assert main(["train", str(tmp_path / "c.yaml"), *overrides, "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    status = RunDir(run_dir).read_status()
    assert status["state"] == "failed"
    step = status["step"]
    assert 2 < step < 30
    assert f"at step {step}" in err and "train.divergence_nats" in err and "optim.lr" in err
    assert any(RunDir(run_dir).index())  # the checkpoints before it are kept
    logged = [m["train_loss"] for m in RunDir(run_dir).metrics() if "train_loss" in m]
    assert logged[step - 1] > min(logged[2:step - 1])


def test_timing_parts_are_positive_and_sum_to_wall(tmp_path):
    from testbed.train.trainer import train

    # Every checkpoint runs its own evaluation (none falls due otherwise): counted once, in eval_s.
    summary = train(cfg("train.steps=4", "checkpoint.every=1", "train.eval_every=1000", "data.val_sequences=96"),
                    tmp_path / "run")
    timing = summary["timing"]
    assert all(v >= 0 for v in timing.values()), timing
    parts = ("startup_s", "train_s", "compile_s", "eval_s", "checkpoint_s", "other_s")
    assert sum(timing[k] for k in parts) == pytest.approx(timing["wall_s"], rel=1e-6)
    assert timing["restore_s"] <= timing["startup_s"]
    assert timing["other_s"] < 0.5 * timing["wall_s"]
