"""What a fit reports stays within what its data support: the irreducible loss above the data's
entropy and the law's bound, predictions far beyond the fitted sizes named, prediction intervals
checked against the held-out points, no optimum outside the sampled sizes, and the rows a
--points choice keeps said beside the fit."""

import json

import numpy as np
import pandas as pd
import pytest

from testbed.cli import main
from testbed.errors import TestbedError
from testbed.fit.analysis import FitOptions, analyse
from testbed.fit.estimation import guards
from testbed.fit.estimation.bootstrap import scatter
from testbed.fit.estimation.estimate import fit
from testbed.fit.laws import CHINCHILLA, law_inputs

TRUTH = {"E": 1.8, "A": 400.0, "alpha": 0.34, "B": 1500.0, "beta": 0.36}


def grid(sizes=(1e7, 2e7, 5e7, 1e8, 2e8, 5e8, 1e9), ratios=(10, 20, 40), noise=0.003, seed=0):
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame([{"N": n, "D": r * n} for n in sizes for r in ratios])
    loss = TRUTH["E"] + TRUTH["A"] / frame["N"] ** TRUTH["alpha"] + TRUTH["B"] / frame["D"] ** TRUTH["beta"]
    frame["loss"] = loss * np.exp(noise * rng.standard_normal(len(frame)))
    return frame


def curves(sizes=(1e7, 2e7, 5e7, 1e8, 2e8, 5e8, 1e9), points=20, noise=0.001, seed=0):
    """One run per model (a `model` column), checkpoints at 5%, 10%, ... 100% of 20 tokens per
    parameter, on a law with alpha = beta."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        for d in 20 * n * np.linspace(1 / points, 1, points):
            loss = (1.8 + 400 / n**0.3 + 1500 / d**0.3) * np.exp(noise * rng.standard_normal())
            rows.append({"model": f"m{n:.0e}", "params": n, "tokens": d, "loss": loss})
    return pd.DataFrame(rows)


# Three IsoFLOP budgets where the loss rises with N at every budget: the smallest model is the
# best one sampled, so the optimum lies below the sampled sizes.
ISO_N = (3.291e4, 5.244e4, 8.63e4, 1.602e5, 2.791e5)
ISO_LOSS = {2.5e11: (3.41, 3.53, 3.72, 3.95, 4.54), 5e11: (3.19, 3.27, 3.42, 3.66, 3.86),
            1e12: (2.97, 3.04, 3.15, 3.30, 3.52)}


def isoflop(entropy=2.2):
    rows = [{"run_id": f"c{c:.0e}n{n:.0e}", "N": n, "D": c / (6 * n), "C": c, "loss": loss, "data_entropy": entropy}
            for c, losses in ISO_LOSS.items() for n, loss in zip(ISO_N, losses)]
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- variant selection (--variant auto)
def test_auto_scores_inside_the_training_runs_as_the_outer_protocol_does():
    options = FitOptions(columns="N=params,D=tokens", points="all", skip_fraction=0.0, holdout="largest-N",
                         train_until=0.3, score_after=0.7, variant="auto", allocation="no")
    analysis = analyse(curves(), options)
    selection = analysis.summary.variant_selection
    inner = selection["inner"]
    # The largest training size is held out inside the training runs; the others are fitted up to
    # 30% of their run, and the held-out one is scored past 70% of its run, as the target is: on
    # checkpoints the outer fit never saw, not on the early ones it fitted.
    assert selection["inner_held_out_runs"] == ["m5e+08"]
    assert inner["fitted_run_fraction_max"] <= 0.3 + 1e-9
    assert inner["scored_run_fraction_min"] >= 0.7 - 1e-9
    assert inner["scored_points"] == 7  # 70%, 75%, ... 100%
    assert inner["fitted_points"] == 5 * 6  # five runs at 5%, ..., 30%
    assert "fitted up to 30% of each run; scored past 70% of each run" in selection["rule"]
    fitted = analysis.frame[~analysis.frame["held_out"]]
    assert fitted["run_fraction"].max() <= 0.3 + 1e-9  # the outer fit still stops at 30%


def test_auto_prints_the_inner_protocol_and_each_variants_error(tmp_path, capsys):
    table = tmp_path / "curves.csv"
    curves().to_csv(table, index=False)
    assert main(["fit", str(table), "--columns", "N=params,D=tokens", "--points", "all", "--skip-fraction", "0",
                 "--holdout", "largest-N", "--train-until", "0.3", "--score-after", "0.7", "--variant", "auto",
                 "--no-plots", "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "scored past 70% of each run" in printed
    for variant in ("free", "tied", "fixed_E"):
        line = next(line for line in printed.splitlines() if line.strip().startswith(f"{variant}:"))
        assert "%" in line


# ---------------------------------------------------------------- the irreducible loss E
def test_the_data_entropy_bounds_e_from_below_and_the_console_says_so(tmp_path, capsys):
    frame = grid().assign(data_entropy=2.0)  # above the true E = 1.8: the fit wants E below it
    analysis = analyse(frame, FitOptions(allocation="no"))
    assert analysis.summary.params["E"] >= 2.0 * (1 - 1e-9)
    assert analysis.summary.entropy == {"value": 2.0, "source": "the data's entropy (data_entropy column)",
                                           "bounds": "E"}
    assert any(w.startswith("E ended at the data's entropy (2)") for w in analysis.summary.warnings)
    assert analyse(grid(), FitOptions(allocation="no")).summary.params["E"] < 2.0  # without the column
    frame.to_csv(tmp_path / "t.csv", index=False)
    assert main(["fit", str(tmp_path / "t.csv"), "--no-plots", "--out", str(tmp_path / "o")]) == 0
    assert "E bounded below by 2: the data's entropy (data_entropy column)" in capsys.readouterr().out
    # fixed_E fixes E there, and says so
    assert main(["fit", str(tmp_path / "t.csv"), "--variant", "fixed_E", "--no-plots", "--out", str(tmp_path / "f")]) == 0
    assert "E fixed to 2: the data's entropy (data_entropy column)" in capsys.readouterr().out
    # A loss mapped from another column need not share the entropy's units: no bound then.
    renamed = frame.rename(columns={"loss": "val"})
    free = analyse(renamed, FitOptions(columns="loss=val", allocation="no"))
    assert free.summary.entropy is None and free.summary.params["E"] < 2.0


def test_a_fixed_e_below_the_entropy_or_the_laws_bound_is_refused():
    with pytest.raises(TestbedError, match=r"E=1.5 is below the data's entropy \(1.8\).*give E >= 1.8"):
        analyse(grid().assign(data_entropy=1.8), FitOptions(variant="fixed_E", fix={"E": 1.5}, allocation="no"))
    with pytest.raises(TestbedError, match=r"E=0.001 is below the law's bound for E \(0.006738\).*--bounds E=LOW:HIGH"):
        analyse(grid(), FitOptions(variant="fixed_E", fix={"E": 0.001}, allocation="no"))


def test_auto_leaves_out_fixed_e_when_the_fitted_floor_is_below_the_laws_bound():
    frame = grid(noise=0.0)
    frame["loss"] = 30 * (6 * frame["N"] * frame["D"]) ** -0.05  # a pure power law in C: no floor
    analysis = analyse(frame, FitOptions(variant="auto", holdout="largest-N", allocation="no"))
    skipped = analysis.summary.variant_selection["validation"]["fixed_E"]["skipped"]
    assert "is below the law's bound for E (0.006738)" in skipped and "fitted floor" in skipped
    assert analysis.summary.variant != "fixed_E"


# ---------------------------------------------------------------- extrapolation
def test_predictions_far_beyond_the_fitted_sizes_are_named(tmp_path, capsys):
    frame = grid(sizes=(1e7, 2e7, 5e7, 1e8, 1e9))
    analysis = analyse(frame, FitOptions(holdout="largest-N", allocation="yes"))
    warnings = analysis.summary.warnings
    assert ("held-out N is 10.0x the largest fitted N (1e+09 vs 1e+08), more than 3x beyond the data: an "
            "extrapolation; add runs in between to check the law there.") in warnings
    # the default budgets, 1x, 10x and 100x the largest compute of the table, held-out runs included
    assert any(w.startswith("the budget C is 10000.0x the largest fitted C (2.4e+22 vs 2.4e+18)") for w in warnings)
    # within the limit: the next size up, 2x, is not named
    near = analyse(grid(), FitOptions(holdout="largest-N", allocation="no")).summary.warnings
    assert not any(w.startswith("held-out N") for w in near)
    assert guards.EXTRAPOLATION_LIMIT == 3.0
    frame.to_csv(tmp_path / "t.csv", index=False)
    assert main(["fit", str(tmp_path / "t.csv"), "--holdout", "largest-N", "--no-plots", "--out", str(tmp_path / "o")]) == 0
    assert "warning: held-out N is 10.0x the largest fitted N" in capsys.readouterr().out
    assert any("held-out N is 10.0x" in w for w in json.loads((tmp_path / "o" / "fit.json").read_text())["warnings"])


# ---------------------------------------------------------------- prediction intervals
def test_run_offsets_carry_the_between_run_scatter():
    frame = curves(sizes=(1e7, 2e7, 5e7, 1e8, 2e8, 5e8, 1e9, 2e9), points=10)
    frame["run_id"] = frame["model"]
    frame = frame.rename(columns={"params": "N", "tokens": "D"})
    shift = {run: 0.01 * k for k, run in enumerate(frame["run_id"].unique())}
    frame["loss"] *= np.exp(frame["run_id"].map(shift) - 0.035)
    result = fit(CHINCHILLA, law_inputs(CHINCHILLA, frame), frame["loss"].to_numpy())
    offsets, within = scatter(result, frame)
    residuals = np.log(frame["loss"].to_numpy()) - CHINCHILLA.predict(result.theta[None], law_inputs(CHINCHILLA, frame))[0]
    means = pd.Series(residuals).groupby(frame["run_id"].to_numpy()).mean()
    # one offset per run, widened by sqrt(R / (R - p)) for the 5 fitted parameters of 8 runs
    assert len(offsets) == 8 and np.allclose(np.sort(offsets), np.sort(means.to_numpy()) * np.sqrt(8 / 3))
    assert np.allclose(pd.Series(within).groupby(frame["run_id"].to_numpy()).mean(), 0.0, atol=1e-12)
    # one point per run: the offsets are the residuals, nothing is left within runs
    final = frame.groupby("run_id").tail(1)
    result = fit(CHINCHILLA, law_inputs(CHINCHILLA, final), final["loss"].to_numpy(), variant="tied")
    offsets, within = scatter(result, final)
    assert np.allclose(within, 0.0) and len(offsets) == 8


def test_intervals_missing_a_biased_extrapolation_are_flagged(tmp_path, capsys):
    frame = grid()
    frame.loc[frame["N"] == 1e9, "loss"] *= 1.05  # the largest model does 5% worse than the law
    frame.to_csv(tmp_path / "t.csv", index=False)
    assert main(["fit", str(tmp_path / "t.csv"), "--holdout", "largest-N", "--no-plots", "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "95% prediction intervals hold 0 of 3 held-out points (0%; at least 70% expected: 95% less 2 binomial " \
           "standard errors over 3 run(s))" in printed
    saved = json.loads((tmp_path / "o" / "fit.json").read_text())
    pi = saved["prediction_interval"]
    assert pi["coverage"] == 0.0 and pi["runs"] == 3  # each row its own run: no run column
    assert pi["coverage_floor"] == pytest.approx(0.95 - 2 * np.sqrt(0.95 * 0.05 / 3))
    assert pi["width_over_error"] < 1  # the error dwarfs the intervals
    assert any(w.startswith("the 95% prediction intervals hold 0 of 3 held-out points (0%), below 95% minus 2 "
                            "binomial standard errors over 3 held-out run(s) (70%)") for w in saved["warnings"])
    assert "at least 70% expected" in (tmp_path / "o" / "report.md").read_text()


def test_intervals_far_wider_than_the_error_are_flagged():
    # Final points of a curve table: seven runs, five parameters; the refits on resampled runs
    # spread far more than the held-out run misses by.
    analysis = analyse(curves(), FitOptions(columns="N=params,D=tokens", holdout="largest-N", allocation="no"))
    pi = analysis.summary.prediction_interval
    assert pi["coverage"] == 1.0 and pi["width_over_error"] > guards.WIDTH_LIMIT
    assert any(w.startswith(f"the 95% prediction intervals are {pi['width_over_error']:.0f}x wider than the held-out error")
               for w in analysis.summary.warnings)
    good = analyse(grid(seed=1), FitOptions(holdout="largest-N", allocation="no")).summary
    assert good.prediction_interval["width_over_error"] < guards.WIDTH_LIMIT
    assert not any("wider than the held-out error" in w or "prediction intervals hold" in w for w in good.warnings)


# ---------------------------------------------------------------- optima outside the sampled sizes
def test_an_optimum_below_the_sampled_sizes_is_not_reported(tmp_path, capsys):
    table = tmp_path / "iso.csv"
    isoflop().to_csv(table, index=False)
    out = tmp_path / "o"
    assert main(["fit", str(table), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "fit.json").read_text())
    assert saved["params"]["E"] >= 2.2 * (1 - 1e-9)  # the law's floor is held at the entropy
    aside = saved["derived_outside"]["N_opt@C=1e+12"]
    assert aside["why"].startswith("outside the sampled sizes (N_opt ") and aside["why"].endswith(" < smallest run 32.9k)")
    assert aside["value"] < 3.291e4
    assert not any(key.startswith(("N_opt@", "D_opt@", "loss@", "tokens_per_param@")) for key in saved["derived"])
    assert "a" in saved["derived"]  # the exponents stay
    assert "warning: the compute-optimal allocation at C=1e+12 is outside the sampled sizes (N_opt" in printed
    assert ("at 3 of 3 compute budgets the lowest loss is the smallest model (32.9k): the sampled sizes do not "
            "bracket the optimum; add smaller models at those budgets.") in saved["warnings"]
    report = (out / "report.md").read_text()
    assert "| allocation at C=1e+12 | not reported: outside the sampled sizes (N_opt" in report
    assert "| N_opt@C=1e+12 |" not in report
    assert (out / "isoflop.png").exists() and (out / "loss_vs_compute.png").exists()


def test_a_frontier_below_the_entropy_is_not_a_result():
    train = isoflop()
    alloc = {"C": np.array([5e11, 1e12]), "N_opt": np.array([6e4, 9e4]), "D_opt": np.array([1.4e6, 1.8e6]),
             "loss": np.array([2.5, 2.1])}
    outside = guards.allocation_outside(train, alloc, 2.2, "the data's entropy (data_entropy column)")
    assert outside == {1e12: "its loss 2.1 is below the data's entropy (data_entropy column), 2.2, which no model reaches"}
    alloc["N_opt"] = np.array([6e4, 3e5])
    assert guards.allocation_outside(train, alloc, None, "")[1e12] == \
        "outside the sampled sizes (N_opt 300k > largest run 279k)"


# ---------------------------------------------------------------- rows kept by --points
def test_the_rows_a_points_choice_keeps_are_printed_beside_the_fit(tmp_path, capsys):
    table = tmp_path / "curves.csv"
    curves(points=10).to_csv(table, index=False)
    assert main(["fit", str(table), "--columns", "N=params,D=tokens", "--allocation", "no", "--no-plots",
                 "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert ("fitted 7 of 70 rows: --points final keeps the last row of each run (7 rows); --points all keeps 70"
            in printed)
    saved = json.loads((tmp_path / "o" / "fit.json").read_text())
    assert saved["rows"]["table"] == 70 and saved["rows"]["kept"] == {"final": 7, "all": 70}
    assert main(["fit", str(table), "--columns", "N=params,D=tokens", "--points", "all", "--holdout", "largest-N",
                 "--allocation", "no", "--no-plots", "--out", str(tmp_path / "a")]) == 0
    assert ("fitted 60 of 70 rows (10 more held out): --points all keeps checkpoints past the first 10% of each run "
            "(70 rows); --points final keeps 7") in capsys.readouterr().out
