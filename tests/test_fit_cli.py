"""End to end: fake run directories -> testbed fit collect -> testbed fit."""

import json

import numpy as np
import pandas as pd

from testbed.cli import main

LAW = {"A": 400.0, "B": 1500.0, "E": 1.8, "alpha": 0.34, "beta": 0.36}


def law_loss(n, d):
    return LAW["E"] + LAW["A"] / n**LAW["alpha"] + LAW["B"] / d**LAW["beta"]


def write_run(root, run_id, n, tokens, rng, schedule="cosine"):
    run = root / "runs" / run_id
    (run / "checkpoints").mkdir(parents=True)
    steps, batch = 100, tokens // 100
    (run / "run.json").write_text(json.dumps({
        "run_id": run_id, "labels": {"size": f"{n:.0e}"}, "n_params": n, "n_params_non_embedding": 0.9 * n,
        "n_params_embedding": 0.1 * n, "vocab_size": 512, "d_model": 64, "n_layers": 4, "global_batch_tokens": batch,
        "planned_steps": steps, "planned_tokens": tokens, "planned_flops": 6 * n * tokens, "flops_per_token": 6 * n,
        "unique_tokens": None, "epochs": 1.0, "schedule": schedule, "peak_lr": 1e-3, "data_entropy": None, "parent": None,
    }))
    index, metrics = [], []
    for step in (5, 50, 100):
        d = step * batch
        loss = law_loss(n, d) * np.exp(0.002 * rng.standard_normal())
        kind = "final" if step == steps else "science"
        index.append({"step": step, "tokens": d, "flops": 6 * n * d, "val_loss": loss, "val_bpb": loss / np.log(2),
                      "kind": kind, "path": f"checkpoints/step_{step:08d}", "lr": 1e-3, "phase": "decay"})
        metrics.append({"step": step, "tokens": d, "flops": 6 * n * d, "lr": 1e-3, "train_loss": loss, "val_loss": loss})
    (run / "checkpoints" / "index.jsonl").write_text("\n".join(json.dumps(r) for r in index) + "\n")
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in metrics) + "\n")


def test_collect_and_fit_with_holdout(tmp_path, capsys):
    rng = np.random.default_rng(0)
    sweep = tmp_path / "sweep"
    for i, budget in enumerate(np.logspace(15, 18, 5)):
        for j, n in enumerate(np.exp(np.linspace(np.log(budget / 6) * 0.35, np.log(budget / 6) * 0.5, 4))):
            write_run(sweep, f"run{i}{j}", float(n), int(budget / (6 * n)), rng)
    table = tmp_path / "points.csv"
    assert main(["fit", "collect", str(sweep), "--out", str(table)]) == 0
    points = pd.read_csv(table)
    assert len(points) == 60 and set(points["point_kind"]) == {"final", "intermediate"}
    assert "label_size" in points.columns and points["run_id"].nunique() == 20

    out = tmp_path / "fit"
    assert main(["fit", str(sweep), "--law", "chinchilla", "--holdout", "largest", "--bootstrap", "20", "--out", str(out)]) == 0
    result = json.loads((out / "fit.json").read_text())
    assert set(result["params"]) == set(LAW)
    assert result["objective"] > 0
    assert len(result["holdout"]) == 2  # 10% of 20 runs, final points only
    assert all(abs(p["rel_error"]) < 0.02 for p in result["holdout"])
    assert result["mean_abs_rel_error"] < 0.01
    assert result["dropped"]["intermediate checkpoints (use --points all to include)"] == 40
    for plot in ("observed_vs_fitted.png", "residuals.png", "loss_vs_compute.png", "isoflop.png"):
        assert (out / plot).stat().st_size > 1000
    assert "Held-out points" in (out / "report.md").read_text()
    printed = capsys.readouterr().out
    assert "mean absolute relative error" in printed and "report:" in printed

    # Intermediate checkpoints of cosine runs: included past the 10% cut, with a warning.
    out_all = tmp_path / "fit_all"
    assert main(["fit", str(table), "--points", "all", "--no-plots", "--out", str(out_all)]) == 0
    result_all = json.loads((out_all / "fit.json").read_text())
    assert result_all["n_points"] == 40
    assert any("intermediate" in w for w in result_all["warnings"])


def test_cli_reports_user_errors_without_traceback(tmp_path, capsys):
    assert main(["fit", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
