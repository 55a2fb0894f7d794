"""--variant auto validates along the outer holdout's axis and records every variant's error."""

import json

import numpy as np
import pandas as pd
import pytest

from testbed.cli import main
from testbed.fit.analysis import FitOptions, analyse
from testbed.fit.protocols.holdout import holdout_mask, rule_axis

SIZES = [2e7, 5e7, 1e8, 2e8, 5e8, 1e9]


def ladder(alpha: float, beta: float, seed: int = 0, noise: float = 0.001) -> pd.DataFrame:
    """An over-training ladder: every size trained for 5 to 160 tokens per parameter, so the
    runs with the most compute are not the largest models."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in SIZES:
        for ratio in (5, 10, 20, 40, 80, 160):
            d = ratio * n
            loss = (1.8 + 400 / n**alpha + 1500 / d**beta) * np.exp(noise * rng.standard_normal())
            rows.append({"run_id": f"n{n:.0e}r{ratio}", "N": n, "D": d, "loss": loss})
    return pd.DataFrame(rows)


def test_holdout_axis_follows_the_rule():
    frame = ladder(0.34, 0.34)
    assert rule_axis(frame, "largest") == "C"
    assert rule_axis(frame, "largest-N") == "N"
    assert rule_axis(frame, "N>=1e9") == "N"
    assert rule_axis(frame, "D>1e11") == "D"
    held = holdout_mask(frame, "largest-N")
    assert set(frame.loc[held, "N"]) == {1e9} and held.sum() == 6


def test_auto_picks_tied_when_the_true_exponents_are_tied():
    analysis = analyse(ladder(0.34, 0.34), FitOptions(variant="auto", holdout="largest-N", allocation="no"))
    selection = analysis.summary.variant_selection
    assert selection["axis"] == "N"
    # The inner check holds out the largest model size left in training, not the longest runs.
    assert all(run.startswith("n5e+08") for run in selection["inner_held_out_runs"])
    assert selection["chosen"] == "tied" and analysis.summary.variant == "tied"
    assert {"free", "tied"} <= {k for k, v in selection["validation"].items() if "mean_abs_rel_error" in v}
    # No E known: fixed_E is tried with a floor fitted on the inner training runs, and scored.
    fixed_e = selection["validation"]["fixed_E"]
    assert "mean_abs_rel_error" in fixed_e and fixed_e["E_source"].startswith("fitted floor")
    assert "lowest error" in selection["why"] or "fewest free parameters" in selection["why"]


def test_auto_does_not_tie_untied_exponents_and_tries_fixed_e_with_the_entropy():
    frame = ladder(0.34, 0.28).assign(data_entropy=1.8)
    analysis = analyse(frame, FitOptions(variant="auto", holdout="N>=1e9", allocation="no"))
    selection = analysis.summary.variant_selection
    assert selection["chosen"] != "tied"
    validation = selection["validation"]
    assert validation["tied"]["mean_abs_rel_error"] > validation["free"]["mean_abs_rel_error"]
    assert validation["fixed_E"]["fixed"] == {"E": pytest.approx(1.8)}


def test_cli_prints_and_records_each_variant(tmp_path, capsys):
    table = tmp_path / "ladder.csv"
    ladder(0.34, 0.34).to_csv(table, index=False)
    out = tmp_path / "fit"
    assert main(["fit", str(table), "--variant", "auto", "--holdout", "largest-N", "--no-plots", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "variant selection" in printed and "kept tied" in printed and "free:" in printed
    # every variant's error is printed, fixed_E's with the floor it was given
    line = next(line for line in printed.splitlines() if line.strip().startswith("fixed_E:"))
    assert "%" in line and "E=" in line and "fitted floor" in line
    saved = json.loads((out / "fit.json").read_text())
    assert saved["variant_selection"]["chosen"] == "tied"
    report = (out / "report.md").read_text()
    assert "Variant selection" in report and "Kept `tied`" in report


def test_fitted_floor_is_a_power_law_in_compute_on_the_inner_training_runs():
    from testbed.fit.estimation.estimate import fit
    from testbed.fit.laws import get_law
    from testbed.fit.protocols.selection import fitted_floor

    frame = ladder(0.34, 0.34)
    floor, how = fitted_floor(get_law("chinchilla"), frame, FitOptions())
    compute = 6.0 * frame["N"].to_numpy() * frame["D"].to_numpy()
    power = fit(get_law("power"), {"X": compute, "logX": np.log(compute)}, frame["loss"].to_numpy())
    assert floor == pytest.approx(power.params["E"], rel=1e-9)
    assert 1.0 < floor < frame["loss"].min() and "fitted floor" in how
    assert fitted_floor(get_law("power"), frame, FitOptions())[0] is None  # that would be the law itself



def curves(seed: int = 0) -> pd.DataFrame:
    """Checkpoints at 10%, 20%, ... 100% of each run of a small ladder."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in (2e7, 5e7, 1e8, 2e8):
        for ratio in (20, 80):
            for fraction in np.linspace(0.1, 1.0, 10):
                d = fraction * ratio * n
                loss = (1.8 + 400 / n**0.34 + 1500 / d**0.34) * np.exp(0.001 * rng.standard_normal())
                rows.append({"run_id": f"n{n:.0e}r{ratio}", "N": n, "D": d, "loss": loss})
    return pd.DataFrame(rows)


def test_inner_validation_holds_out_late_checkpoints_of_the_same_runs():
    from testbed.fit.protocols.holdout import inner_mask

    options = FitOptions(variant="auto", holdout="run_fraction>0.8", points="all", skip_fraction=0.0, allocation="no")
    analysis = analyse(curves(), options)
    selection = analysis.summary.variant_selection
    assert selection["axis"] == "late" and "latest checkpoints" in selection["rule"]
    # The outer split holds out the last 20% of every run, checkpoints and not whole runs...
    frame = analysis.frame
    assert set(frame.loc[frame["held_out"], "run_fraction"].round(6)) == {0.9, 1.0}
    train = frame[~frame["held_out"]]
    # ...and the inner split does the same along the same axis inside the training checkpoints:
    # the latest of them, in every run, with each run's earlier checkpoints left to fit.
    inner = inner_mask(train, "late")
    held, kept = train[inner], train[~inner]
    assert set(held["run_fraction"].round(6)) == {0.7, 0.8}
    assert set(held["run_id"]) == set(train["run_id"]) == set(kept["run_id"])
    for run, part in held.groupby("run_id"):
        assert part["run_fraction"].min() > kept.loc[kept["run_id"] == run, "run_fraction"].max()
    assert len(selection["inner_held_out_runs"]) == train["run_id"].nunique()
    assert "mean_abs_rel_error" in selection["validation"]["free"]
