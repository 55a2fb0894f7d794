"""`testbed fit hparams`: optimal LR and batch rules from an LR x batch sweep (Step Law form)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from testbed.cli import main
from testbed.errors import TestbedError
from testbed.fit.laws import steplaw

ROOT = Path(__file__).resolve().parents[1]

# Known rules, unlike the published ones: lr = 3 N^-0.6 D^0.25, batch = 0.2 D^0.6 tokens
LR_RULE = (3.0, -0.6, 0.25)
BS_RULE = (0.2, 0.6)


def sweep(grid_step=np.log(2.0) / 2, seed=0):
    """An LR x batch grid (factor-1.41 steps, not aligned with the optimum) per (N, D) cell;
    the loss is a bowl in log LR and log batch around the known optimum."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in (1e8, 3e8, 1e9):
        for d in (1e10, 3e10, 1e11):
            lr_best = LR_RULE[0] * n ** LR_RULE[1] * d ** LR_RULE[2]
            bs_best = BS_RULE[0] * d ** BS_RULE[1]
            shift_lr, shift_bs = rng.uniform(-0.5, 0.5, size=2) * grid_step  # the grid misses the optimum
            for i in range(-4, 5):
                for j in range(-3, 4):
                    lr = lr_best * np.exp(i * grid_step + shift_lr)
                    batch = bs_best * np.exp(j * grid_step + shift_bs)
                    loss = 2.5 + 0.02 * np.log(lr / lr_best) ** 2 + 0.01 * np.log(batch / bs_best) ** 2
                    rows.append({"N": n, "D": d, "lr": lr, "bs": batch / 2048, "loss": loss})
    return pd.DataFrame(rows)


def test_band_recovers_the_rules_better_than_the_best_run_alone():
    table = sweep().assign(batch=lambda t: t["bs"] * 2048)
    banded = steplaw.fit_rules(table, band=0.005)
    assert banded["runs_in_band"] > 3 * banded["cells"]
    assert banded["lr_N_exp"] == pytest.approx(-0.6, abs=0.03)
    assert banded["lr_D_exp"] == pytest.approx(0.25, abs=0.03)
    assert banded["bs_D_exp"] == pytest.approx(0.6, abs=0.03)
    # The best run is off the optimum by up to half a grid step; the band averages that out
    # (over a few sweeps, whose grids miss the optimum differently).
    n, d = 1e9, 1e11
    truth = LR_RULE[0] * n ** LR_RULE[1] * d ** LR_RULE[2]
    error = {0.005: [], 0.0: []}
    for seed in range(4):
        other = sweep(seed=seed).assign(batch=lambda t: t["bs"] * 2048)
        for band in error:
            error[band].append(abs(np.log(steplaw.predict(steplaw.fit_rules(other, band), n, d)[0] / truth)))
    assert np.mean(error[0.005]) < np.mean(error[0.0])
    # Within each cell, the band is every run no worse than (1 + band) x its best.
    kept = steplaw.near_optimal(table, 0.005)
    cell = table[(table.N == 1e8) & (table.D == 1e10)]
    assert len(kept[(kept.N == 1e8) & (kept.D == 1e10)]) == int((cell.loss <= cell.loss.min() * 1.005).sum())


def test_published_rules_are_the_default_prediction(tmp_path, capsys):
    out = tmp_path / "hp"
    assert main(["fit", "hparams", "--at", "N=1e9,D=1e11", "--out", str(out)]) == 0
    saved = json.loads((out / "hparams.json").read_text())
    prediction = saved["predictions"][0]
    assert prediction["lr"] == pytest.approx(1.79 * 1e9**-0.713 * 1e11**0.307)
    assert prediction["batch_tokens"] == pytest.approx(0.58 * 1e11**0.571)
    assert "published" in capsys.readouterr().out


def test_cli_fits_a_sweep_table_with_batches_in_sequences(tmp_path, capsys):
    table = tmp_path / "sweep.csv"
    sweep().to_csv(table, index=False)
    out = tmp_path / "hp"
    assert main(["fit", "hparams", str(table), "--columns", "batch=bs", "--seq-len", "2048",
                 "--at", "N=1e9,D=1e11", "--out", str(out)]) == 0
    rules = json.loads((out / "hparams.json").read_text())["rules"]
    assert rules["bs_D_exp"] == pytest.approx(0.6, abs=0.03)
    assert rules["bs_coef"] == pytest.approx(0.2, rel=0.5)
    assert main(["fit", "hparams", "--at", "N=1e9"]) == 2
    assert "--at 'N=1e9' is not N=VALUE,D=VALUE" in capsys.readouterr().err
    with pytest.raises(TestbedError, match="no column 'batch'"):
        steplaw.fit_rules(pd.read_csv(table))  # the batch column must be mapped


def test_the_lr_batch_template_trains_and_fits_from_its_sweep_directory(tmp_path, capsys):
    """configs/sweeps/lr_batch.yaml, shortened: every rung's batch sizes share one planned D, and
    `fit hparams SWEEP_DIR` fits the rules on the runs' final points (non-embedding N, planned D,
    peak LR, batch in tokens), keeping per cell exactly the runs within the band of its best."""
    import yaml

    from testbed.fit.points.collect import collect_runs

    spec = yaml.safe_load((ROOT / "configs" / "sweeps" / "lr_batch.yaml").read_text())
    spec["grid"]["optim.lr"] = [1.0e-2, 3.0e-2]
    spec["derived"]["train.tokens"] = "max(1, round(n_params / 8 / 512)) * 512"  # a few steps per run
    sweep_file = tmp_path / "lr_batch.yaml"
    sweep_file.write_text(yaml.safe_dump(spec))
    runs = tmp_path / "runs"
    assert main(["sweep", "run", str(sweep_file), "--sweep-dir", str(runs), "--workers", "2"]) == 0
    finals = collect_runs(runs)
    finals = finals.loc[finals["point_kind"] == "final"]
    assert len(finals) == 12
    # within a rung, both batch sizes plan the same D: three (N, D) cells of four runs
    assert finals.groupby("N_non_embedding")["planned_tokens"].nunique().eq(1).all()
    assert main(["fit", "hparams", str(runs), "--band", "0", "--out", str(tmp_path / "h")]) == 0
    rules = json.loads((tmp_path / "h" / "hparams.json").read_text())["rules"]
    assert rules["cells"] == 3 and rules["runs_in_band"] == 3  # band 0: the best run of each cell
    capsys.readouterr()
    # the fitted LR rule passes through the cells' best runs (three cells, three coefficients)
    best = finals.loc[finals.groupby("N_non_embedding")["loss"].idxmin()]
    for _, run in best.iterrows():
        lr, _ = steplaw.predict(rules, run["N_non_embedding"], run["planned_tokens"])
        assert float(lr) == pytest.approx(run["peak_lr"], rel=1e-6)


def one_axis_swept(fixed: str) -> pd.DataFrame:
    """The sweep with `fixed` ('lr' or 'batch') held at one value in every row: only the other
    axis is searched."""
    table = sweep().assign(batch=lambda t: t["bs"] * 2048).drop(columns="bs")
    middle = table.groupby(["N", "D"])[fixed].transform(lambda s: np.sort(s.unique())[s.nunique() // 2])
    table = table[np.isclose(table[fixed], middle)].copy()  # one value of `fixed` per cell
    table[fixed] = 3e-3 if fixed == "lr" else 2.0**19
    return table.reset_index(drop=True)


@pytest.mark.parametrize("fixed,fitted", [("batch", "lr"), ("lr", "batch")])
def test_a_rule_for_an_axis_that_never_varies_is_skipped_with_a_warning(fixed, fitted, tmp_path, capsys):
    # A constant axis used to get a rule with exponent 0 (the fit of a constant), reported as fitted.
    table = tmp_path / "sweep.csv"
    one_axis_swept(fixed).to_csv(table, index=False)
    out = tmp_path / "hp"
    assert main(["fit", "hparams", str(table), "--at", "N=1e9,D=1e11", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    warnings = [line for line in printed.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"{fixed} never varies" in warnings[0] and "not fitted" in warnings[0], printed
    saved = json.loads((out / "hparams.json").read_text())
    rules, prediction = saved["rules"], saved["predictions"][0]
    skipped = ("lr_coef", "lr_N_exp", "lr_D_exp") if fixed == "lr" else ("bs_coef", "bs_D_exp")
    assert all(rules[key] is None for key in skipped) and fixed in rules["skipped"]
    assert prediction["lr" if fixed == "lr" else "batch_tokens"] is None
    if fitted == "lr":
        assert rules["lr_N_exp"] == pytest.approx(-0.6, abs=0.05) and prediction["lr"] > 0
    else:
        assert rules["bs_D_exp"] == pytest.approx(0.6, abs=0.05) and prediction["batch_tokens"] > 0
    assert saved["warnings"] == [w.removeprefix("warning: ") for w in warnings]


def test_a_table_where_neither_lr_nor_batch_varies_is_refused(tmp_path, capsys):
    table = tmp_path / "sweep.csv"
    frame = one_axis_swept("lr").assign(batch=2.0**19).drop_duplicates(subset=["N", "D"])
    frame.to_csv(table, index=False)
    out = tmp_path / "hp"
    assert main(["fit", "hparams", str(table), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "lr" in err and "batch" in err and "never vary" in err, err
    assert not out.exists()
    with pytest.raises(TestbedError, match="never vary"):
        steplaw.fit_rules(frame)
