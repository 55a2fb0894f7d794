"""`data.source: mixture` (testbed/data/mixture.py, docs/data.md "Mixtures"): prepared folders
drawn with weights. The order is a pure function of the window position (exact proportions per
block of P, the same windows read at once or after a resume, for any number of processes); a
resumed run equals the uninterrupted one bit for bit; validation is reported per source and as
the weighted mean; folders with different tokenizers and weights that do not match the sources
are refused; `fit collect` shows the weight/ and source/ columns; a sweep over weights expands.

Three tiny folders share one tokenizer (trained for the first, `--tokenizer` for the others); a
fourth, with a tokenizer of its own, is the mismatch."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import numpy as np
import pytest
from text_corpus import corpus_text, fox_text

import testbed.data.loader as data_loader  # registers `mixture` before any config is checked
from testbed.config import load_config
from testbed.data.mixture import MixtureSource, P
from testbed.data.shards import prepare
from testbed.errors import ConfigError

WEIGHTS = {"a": 0.5, "b": 0.3, "c": 0.2}
TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32", "data.seq_len=32",
        "train.global_batch_tokens=256", "train.log_every=1", "train.eval_every=3", "logging.wandb=false",
        "logging.progress=false", "data.val_sequences=4", "checkpoint.final=false", "train.steps=6",
        "train.device=cpu"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    cache = root / "cache"
    texts = {"a": corpus_text(300, seed=0), "b": fox_text(300), "c": corpus_text(300, seed=1)}
    out = {}
    for name, text in texts.items():
        (root / f"{name}.txt").write_text(text)
        shared = {"tokenizer": str(out["a"])} if out else {"vocab_size": 300}
        prepare(root / f"{name}.txt", root / name, cache_dir=cache, **shared)
        out[name] = root / name
    prepare(root / "c.txt", root / "other", vocab_size=280, cache_dir=cache)
    out["other"] = root / "other"
    return out


def options(folders, weights=WEIGHTS, names=("a", "b", "c")) -> list[str]:
    sources = ", ".join(f"{n}: {folders[n]}" for n in names)
    given = ", ".join(f"{n}: {w}" for n, w in weights.items())
    return ["data.source=mixture", f"data.source_options.sources={{{sources}}}",
            f"data.source_options.weights={{{given}}}"]


def config(folders, *extra, weights=WEIGHTS):
    return load_config(None, TINY + options(folders, weights) + list(extra))


def lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_proportions_are_the_weights_exactly_per_block(folders):
    source = data_loader.make_source(config(folders))
    assert isinstance(source, MixtureSource)
    assert source.num_windows("train") is None  # the loader maps position j to window j
    comp, k = source.locate(np.arange(7 * P + 123))
    for block in range(7):
        counts = np.bincount(comp[block * P:(block + 1) * P], minlength=3)
        assert counts.tolist() == [500, 300, 200]
    # Spread evenly: every stretch of 100 windows is within one window of the weights.
    for start in range(0, 3 * P, 100):
        assert np.all(np.abs(np.bincount(comp[start:start + 100], minlength=3) - [50, 30, 20]) <= 1)
    # The k of each component counts 0, 1, 2, ... in order: no window skipped or used twice.
    for c in range(3):
        assert np.array_equal(k[comp == c], np.arange((comp == c).sum()))
    assert "a=0.5:" in source.fingerprint() and "c=0.2:" in source.fingerprint()
    # Weights off the 1/P grid are rounded by largest remainders and recorded.
    odd = data_loader.make_source(config(folders, weights={"a": 0.3333, "b": 0.3333, "c": 0.3334}))
    assert odd.counts.tolist() == [333, 333, 334] and "c=0.334:" in odd.fingerprint()


def test_windows_are_a_pure_function_of_the_position(folders):
    source = data_loader.make_source(config(folders))
    # Far enough for every component to be used up and reshuffled (a few hundred windows each).
    positions = np.arange(0, 4000, dtype=np.int64)
    whole = source.windows(positions)
    again = data_loader.make_source(config(folders))  # a "resumed" process, nothing cached
    for start in (0, 999, 1000, 2345, 3999):
        assert np.array_equal(again.windows(positions[start:start + 7]), whole[start:start + 7])
    assert np.array_equal(again.windows(positions[::-1]), whole[::-1])
    # The windows come from the components: a's windows are a's.
    comp, _ = source.locate(positions)
    a = data_loader.make_source(load_config(None, TINY + [f"data.path={folders['a']}"]))
    a_windows = {w.tobytes() for w in a.windows(np.arange(a.num_windows("train")))}
    assert all(w.tobytes() in a_windows for w in whole[comp == 0][:200])
    # Every component repeats on its own: each epoch is a permutation of its windows.
    n_a = source.n_train[0]
    first_epoch = source._component_windows(0, np.arange(n_a))
    second_epoch = source._component_windows(0, np.arange(n_a, 2 * n_a))
    assert sorted(first_epoch) == sorted(second_epoch) == list(range(n_a))
    assert not np.array_equal(first_epoch, second_epoch)
    epochs = source.component_epochs(4000)
    assert epochs["a"] == pytest.approx(2000 / n_a) and epochs["c"] == pytest.approx(800 / source.n_train[2])
    # The global batch is the same whatever the number of processes.
    plan = data_loader.BatchPlan(source, 8, 0, None, 100)
    for step in (0, 37, 99):
        halves = [plan.window_ids(step, rank, 2) for rank in range(2)]
        assert np.array_equal(np.concatenate(halves), plan.window_ids(step))


def test_a_resumed_run_equals_the_uninterrupted_one_and_validation_is_per_source(folders, tmp_path, monkeypatch):
    from testbed.fit.points.collect import collect_runs
    from testbed.train.trainer import train

    cfg = config(folders, "checkpoint.every=3")
    train(cfg, tmp_path / "ref")
    reference = lines(tmp_path / "ref")

    original = data_loader.BatchPlan.batch_tokens

    def preempting(self, step, rank=0, world=1):
        if step == 3:
            signal.raise_signal(signal.SIGUSR1)
        return original(self, step, rank, world)

    monkeypatch.setattr(data_loader.BatchPlan, "batch_tokens", preempting)
    assert train(cfg, tmp_path / "cut")["exit_code"] == 75
    monkeypatch.setattr(data_loader.BatchPlan, "batch_tokens", original)
    assert train(cfg, tmp_path / "cut", resume=True)["exit_code"] == 0
    volatile = ("tokens_per_s", "mfu", "peak_mem_gb", "time_s", "elapsed_s", "step_s")

    def stable(rows):
        return [{k: v for k, v in r.items() if k not in volatile and not k.endswith("_s")} for r in rows]

    train_rows = [(r["step"], r["train_loss"]) for r in reference if "train_loss" in r]
    assert [(r["step"], r["train_loss"]) for r in lines(tmp_path / "cut") if "train_loss" in r] == train_rows
    evals = [r for r in reference if "val_loss" in r]
    assert stable([r for r in lines(tmp_path / "cut") if "val_loss" in r]) == stable(evals)

    # Validation: each source's loss and bits per byte; the mixture's as their weighted means.
    assert [r["step"] for r in evals] == [3, 6]
    for row in evals:
        losses = {n: row[f"source/{n}/val_loss"] for n in WEIGHTS}
        assert all(math.isfinite(v) and v > 0 for v in losses.values())
        assert abs(row["val_loss"] - sum(WEIGHTS[n] * losses[n] for n in WEIGHTS)) < 1e-9
        assert row["val_bits_per_token"] == pytest.approx(row["val_loss"] / math.log(2), rel=1e-12)
        for n in WEIGHTS:
            assert row[f"source/{n}/val_bpb"] > 0
    # val_bpb is the weighted nats per token over the weighted bytes per token.
    source = data_loader.make_source(cfg)
    bytes_per_token = {n: source.window_bytes(ids, "validation").sum() / (len(ids) * 32)
                       for n, (_, ids) in source.validation_groups().items()}
    last = evals[-1]
    expected = last["val_loss"] / (math.log(2) * sum(WEIGHTS[n] * bytes_per_token[n] for n in WEIGHTS))
    assert last["val_bpb"] == pytest.approx(expected, rel=1e-12)
    for n in WEIGHTS:
        assert last[f"source/{n}/val_bpb"] == pytest.approx(
            last[f"source/{n}/val_loss"] / (math.log(2) * bytes_per_token[n]), rel=1e-12)

    # fit collect: the weights and the per-source losses as columns.
    table = collect_runs(tmp_path / "ref")
    for n, w in WEIGHTS.items():
        assert (table[f"weight/{n}"] == w).all()
        assert table[f"source/{n}/val_loss"].notna().all()
        assert f"source/{n}/val_bpb" in table
    final = table[table["step"] == 6].iloc[0]
    assert final["source/b/val_loss"] == last["source/b/val_loss"] and final["loss"] == last["val_loss"]


def test_the_ema_and_an_ordinary_source_evaluate_as_before(folders, tmp_path):
    from testbed.train.trainer import train

    train(config(folders, "train.ema_decay=0.9", "train.steps=3"), tmp_path / "ema")
    row = [r for r in lines(tmp_path / "ema") if "val_loss" in r][-1]
    assert math.isfinite(row["val_loss_ema"]) and math.isfinite(row["source/a/val_loss_ema"])
    # A source without validation_groups: the first data.val_sequences windows, as always.
    plain = data_loader.make_source(load_config(None, TINY + [f"data.path={folders['a']}"]))
    assert data_loader.validation_windows(plain, 4).tolist() == [0, 1, 2, 3]


def test_mismatched_folders_and_weights_are_one_error_each(folders, tmp_path):
    from testbed.plan import describe

    mixed = load_config(None, TINY + options(folders, {"a": 0.5, "other": 0.5}, names=("a", "other")))
    with pytest.raises(ConfigError) as err:
        describe(mixed)
    text = str(err.value)
    assert text.startswith("data.source_options.sources is ")
    assert str(folders["a"]) in text and str(folders["other"]) in text
    assert "tokenizer fingerprint" in text and "vocab_size 300 vs 280" in text and "--tokenizer" in text
    with pytest.raises(ConfigError, match=r"holds no manifest\.json"):
        describe(load_config(None, TINY + ["data.source=mixture",
                                           f"data.source_options.sources={{a: {folders['a']}, z: {tmp_path}}}",
                                           "data.source_options.weights={a: 0.5, z: 0.5}"]))

    def refused(weights, names=("a", "b", "c")):
        with pytest.raises(ConfigError) as caught:
            load_config(None, TINY + options(folders, weights, names))
        return str(caught.value)

    assert refused({"a": 0.5, "b": 0.5}).startswith(
        "data.source_options.weights is {'a': 0.5, 'b': 0.5}; give one weight for each of "
        "data.source_options.sources (a, b, c)")
    assert refused({"a": 0.5, "b": 0.3, "d": 0.2}).startswith("data.source_options.weights is ")
    assert "sum to 1 (they sum to 1.1)" in refused({"a": 0.5, "b": 0.3, "c": 0.3})
    assert "at least 0" in refused({"a": 1.2, "b": -0.4, "c": 0.2})
    assert "at least two" in refused({"a": 1.0}, names=("a",))
    # Weight 0 is allowed: the component is never trained on, and is still validated.
    source = data_loader.make_source(config(folders, weights={"a": 0.0, "b": 0.5, "c": 0.5}))
    comp, _ = source.locate(np.arange(2 * P))
    assert 0 not in comp and set(source.validation_groups()) == {"a", "b", "c"}


def test_a_sweep_over_weights_expands_to_runs_with_their_own_ids(folders):
    from testbed.sweep.spec import load_sweep

    base = {"model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32},
            "data": {"seq_len": 32, "source": "mixture",
                     "source_options": {"sources": {n: str(folders[n]) for n in ("a", "b")}}},
            "train": {"global_batch_tokens": 256, "steps": 4}, "logging": {"wandb": False, "progress": False}}
    sweep = load_sweep({"name": "mix", "base": base,
                        "grid": {"data.source_options.weights": [{"a": 0.75, "b": 0.25}, {"a": 0.25, "b": 0.75}]}})
    assert len(sweep.runs) == 2 and sweep.runs[0].run_id != sweep.runs[1].run_id
    assert [r.config.data.source_options["weights"] for r in sweep.runs] == [{"a": 0.75, "b": 0.25},
                                                                             {"a": 0.25, "b": 0.75}]
    # simplex(...): every weight dict on the grid, as one axis.
    grid = load_sweep({"name": "mix", "base": base,
                       "grid": {"data.source_options.weights": "simplex(names=[a, b], step=0.25)"}})
    assert [r.config.data.source_options["weights"]["a"] for r in grid.runs] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert len({r.run_id for r in grid.runs}) == 5


def test_the_simplex_helper():
    from testbed.sweep.expr import axis_values, simplex

    three = simplex(["a", "b", "c"], 0.5)
    assert three == [{"a": 1.0, "b": 0.0, "c": 0.0}, {"a": 0.5, "b": 0.5, "c": 0.0}, {"a": 0.5, "b": 0.0, "c": 0.5},
                     {"a": 0.0, "b": 1.0, "c": 0.0}, {"a": 0.0, "b": 0.5, "c": 0.5}, {"a": 0.0, "b": 0.0, "c": 1.0}]
    assert len(simplex(["a", "b", "c"], 0.1)) == 66 and all(abs(sum(w.values()) - 1) < 1e-9
                                                            for w in simplex(["a", "b", "c"], 0.1))
    assert axis_values("simplex(names=['x', y], step=1)", "k") == [{"x": 1.0, "y": 0.0}, {"x": 0.0, "y": 1.0}]
    with pytest.raises(ConfigError, match=r"step=0\.3 must divide 1"):
        simplex(["a", "b"], 0.3)
    with pytest.raises(ConfigError, match=r"two or more different names"):
        axis_values("simplex(names=[a], step=0.5)", "k")
    with pytest.raises(ConfigError, match=r"neither a list nor a known helper"):
        axis_values("grid(1, 2)", "k")


def test_a_mixture_with_a_data_path_is_refused():
    from testbed.config import load_config
    from testbed.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^data.path='x' with data.source='mixture': a mixture reads its folders "
                                          r"from data.source_options.sources; remove data.path$"):
        load_config(None, ["data.source=mixture", "data.path=x", "data.source_options.sources={a: f, b: g}",
                           "data.source_options.weights={a: 0.5, b: 0.5}"])


def test_the_mup_lr_point_weighs_a_mixture_as_the_trainer_does(folders, tmp_path):
    """testbed.train.mup.lr_point's validation loss on a mixture is the trainer's weighted
    val_loss (it was the unweighted mean over every source's windows)."""
    from testbed.train.mup import lr_point
    from testbed.train.trainer import train

    cfg = config(folders, "checkpoint.rolling_every=null")
    train(cfg, tmp_path / "run")
    last = [r for r in lines(tmp_path / "run") if "val_loss" in r][-1]
    assert last["step"] == 6
    point = lr_point(cfg, 32, cfg.optim.lr, 6, "sp", 32)
    assert point["loss"] == pytest.approx(last["val_loss"], rel=1e-5)
    # Before: every source's windows in one mean, each source weighed by its window count.
    counts = {n: len(ids) for n, (_, ids) in data_loader.make_source(cfg).validation_groups().items()}
    by_windows = sum(counts[n] * last[f"source/{n}/val_loss"] for n in WEIGHTS) / sum(counts.values())
    assert by_windows != pytest.approx(last["val_loss"], rel=1e-5)
