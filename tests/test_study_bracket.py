"""LR brackets: a study sweep's grid extended where a cell's optimum lands at its edge, diverged runs
read as outcomes, the same runs planned again on resume."""

from __future__ import annotations

import math

import pytest

from testbed.errors import ConfigError
from testbed.study.base import Bracket, Context
from testbed.study.bracket import beyond, check, extensions, most_added, points, run_bracketed
from testbed.study.recipes import base

LR = Bracket({"optim.lr": "log"}, rounds=1)


def grid_points(**axes):
    return points({"name": "s", "grid": axes})


def test_an_optimum_at_the_top_adds_the_next_lr_for_every_seed_of_that_cell_only():
    runs = grid_points(**{"model.d_model": [16, 32], "optim.lr": [1e-3, 2e-3, 4e-3], "train.seed": [0, 1]})
    # d_model 16: best at the top (4e-3); d_model 32: best inside (2e-3)
    loss = {(16, 1e-3): 3.0, (16, 2e-3): 2.9, (16, 4e-3): 2.8, (32, 1e-3): 3.0, (32, 2e-3): 2.7, (32, 4e-3): 2.9}
    losses = [loss[r["model.d_model"], r["optim.lr"]] + 0.01 * r["train.seed"] for r in runs]
    added = extensions(runs, losses, LR)
    assert added == [{"model.d_model": 16, "optim.lr": 8e-3, "train.seed": 0},
                     {"model.d_model": 16, "optim.lr": 8e-3, "train.seed": 1}]


def test_the_seed_mean_decides_and_a_diverged_run_closes_its_side():
    runs = grid_points(**{"optim.lr": [1e-3, 3e-3, 9e-3], "train.seed": [0, 1]})
    # seed 1 alone would choose 9e-3, the mean chooses 3e-3: bracketed, nothing added
    by = {(1e-3, 0): 3.0, (3e-3, 0): 2.5, (9e-3, 0): 2.9, (1e-3, 1): 3.0, (3e-3, 1): 2.6, (9e-3, 1): 2.55}
    assert extensions(runs, [by[r["optim.lr"], r["train.seed"]] for r in runs], LR) == []
    # the best at the top, but one seed of the point above it diverged: +inf, so it stays inside
    runs = grid_points(**{"optim.lr": [1e-3, 3e-3, 9e-3, 2.7e-2], "train.seed": [0, 1]})
    by = {**by, (9e-3, 1): 2.4, (2.7e-2, 0): 2.0, (2.7e-2, 1): math.inf}
    assert extensions(runs, [by[r["optim.lr"], r["train.seed"]] for r in runs], LR) == []
    # every run of a cell diverged: nothing to bracket by
    assert extensions(runs, [math.inf] * len(runs), LR) == []


def test_the_lowest_edge_extends_down_and_a_linear_axis_by_its_step():
    runs = grid_points(**{"labels.lr_step": [-1, 0, 1]})
    added = extensions(runs, [2.0, 2.5, 3.0], Bracket({"labels.lr_step": "linear"}))
    assert added == [{"labels.lr_step": -2}]
    assert beyond([1e-3, 2.5e-3], "log", "low") == 4e-4
    assert beyond([0.004, 0.008, 0.016], "log", "high") == 0.032  # printed as the grid prints
    assert beyond([-1, 0, 1], "linear", "high") == 2


def test_two_bracketed_axes_add_a_slab_per_edge():
    """(a, cap) tuned jointly: the best at a corner adds the next a for every cap and the next cap
    for every a; the corner beyond both waits for the next round."""
    runs = grid_points(**{"schedule.power_a": [0.2, 0.4], "optim.lr": [0.008, 0.016], "train.seed": [0]})
    losses = [3.0 - r["schedule.power_a"] + 10 * r["optim.lr"] for r in runs]  # best: a 0.4, cap 0.008
    added = extensions(runs, losses, Bracket({"schedule.power_a": "log", "optim.lr": "log"}))
    assert {(a["schedule.power_a"], a["optim.lr"]) for a in added} == {(0.8, 0.008), (0.8, 0.016), (0.4, 0.004), (0.2, 0.004)}
    spec = {"name": "s", "grid": {"schedule.power_a": [0.2, 0.4], "optim.lr": [0.008, 0.016], "train.seed": [0, 1]}}
    assert most_added(spec, Bracket({"schedule.power_a": "log", "optim.lr": "log"}, rounds=2)) == 2 * 2 * (2 + 2)


def test_a_bracket_names_what_is_wrong_with_it():
    spec = {"name": "s", "grid": {"optim.lr": [1e-3, 2e-3], "labels.lr_step": [-1, 0, 1], "train.seed": [0]}}
    check(LR, spec)
    with pytest.raises(ConfigError, match="'optim.beta2' is not a grid axis"):
        check(Bracket({"optim.beta2": "log"}), spec)
    with pytest.raises(ConfigError, match="scale='geometric' must be one of log, linear"):
        check(Bracket({"optim.lr": "geometric"}), spec)
    with pytest.raises(ConfigError, match="a log axis must be positive"):
        check(Bracket({"labels.lr_step": "log"}), spec)
    with pytest.raises(ConfigError, match="rounds=-1"):
        check(Bracket({"optim.lr": "log"}, rounds=-1), spec)


def tiny_sweep(lrs, **train):
    tree = base("tiny")
    tree["train"].update(tokens=512 * 12, **train)
    return {"name": "lrs", "base": tree, "grid": {"optim.lr": lrs, "train.seed": [0]},
            "labels": ["optim.lr", "train.seed"]}


def test_a_real_sweep_grows_past_its_edge_and_resumes_without_training_again(tmp_path):
    """LRs far too low: the best is the highest, so one round trains the next LR up; run again, the
    extension is planned from the finished runs and nothing is trained twice."""
    from testbed.sweep.registry import Registry

    spec = tiny_sweep([1e-5, 3e-5])
    folder = run_bracketed(tmp_path, spec, LR, log=lambda *_: None)
    finals = Context(tmp_path, "tiny", {"lrs": folder}).finals("lrs")
    assert sorted(finals["peak_lr"]) == [1e-5, 3e-5, 9e-5]
    assert finals.sort_values("peak_lr")["loss"].is_monotonic_decreasing  # still descending: the cap of rounds
    launches = {r["run_id"]: r["launches"] for r in Registry(folder).records()}
    run_bracketed(tmp_path, spec, LR, log=lambda *_: None)
    assert {r["run_id"]: r["launches"] for r in Registry(folder).records()} == launches


def test_a_diverged_run_is_an_outcome_in_a_bracket_and_a_failure_elsewhere(tmp_path):
    from testbed.errors import TestbedError
    from testbed.study.base import choose
    from testbed.study.sweeps import run_sweep

    spec = tiny_sweep([3e-3, 1e30], **{"divergence_nats": 3.0})
    spec["base"]["optim"]["grad_clip"] = 0  # nothing holds the step back: the loss turns NaN
    folder = run_bracketed(tmp_path, spec, Bracket({"optim.lr": "log"}, rounds=0), log=lambda *_: None)
    finals = Context(tmp_path, "tiny", {"lrs": folder}).finals("lrs")
    lost = finals[finals["peak_lr"] == 1e30]
    assert len(lost) == 1 and bool(lost["diverged"].iloc[0]) and math.isinf(lost["loss"].iloc[0])
    cell = choose(finals.assign(cell=1), ["cell"]).cells.iloc[0]
    assert cell["lr"] == 3e-3 and cell["edge"] == "lowest"  # the diverged LR is in the grid, never chosen
    from testbed.sweep.registry import Registry

    launches = {r["run_id"]: r["launches"] for r in Registry(folder).records()}
    run_bracketed(tmp_path, spec, Bracket({"optim.lr": "log"}, rounds=0), log=lambda *_: None)
    assert {r["run_id"]: r["launches"] for r in Registry(folder).records()} == launches  # not tried again
    with pytest.raises(TestbedError, match="1 failed"):
        run_sweep(tmp_path / "plain", {**spec, "name": "plain"}, log=lambda *_: None)


def test_every_built_in_bracket_names_numeric_grid_axes_of_its_sweep_at_every_size():
    from testbed.study.base import STUDIES
    from testbed.study.runner import load

    load()
    bracketed = set()
    for name in STUDIES.names():
        study = STUDIES.get(name)
        if not study.module.startswith("testbed.study.builtin"):
            continue  # a study another test registered
        for size in study.sizes:
            specs = {spec["name"]: spec for spec in study.sweeps(size)}
            for sweep, bracket in study.brackets_at(size).items():
                assert sweep in specs, (name, size, sweep)
                check(bracket, specs[sweep])
                bracketed.add((name, sweep))
    assert {("chinchilla", "chinchilla"), ("discrepancy", "discrepancy-tuned"), ("power", "power-tune")} <= bracketed
