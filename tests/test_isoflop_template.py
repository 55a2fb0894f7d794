"""configs/sweeps/isoflop.yaml trained as shipped: at every compute budget the final losses have
their minimum inside the sampled model sizes, so each IsoFLOP parabola has a vertex to report
and the fitted law's N_opt lies among the runs. Without this the template taught the opposite
of what it is for: its smallest model won every budget and the law ran to its bounds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from testbed.cli import main
from testbed.fit.points.collect import collect_runs
from testbed.sweep.spec import load_sweep

TEMPLATE = Path(__file__).resolve().parents[1] / "configs" / "sweeps" / "isoflop.yaml"
# The vertex must sit this far (as a fraction of the sampled log-N range) from either end: a
# vertex at the edge is a minimum the sizes do not bracket. Measured: 0.33, 0.45, 0.52.
MARGIN = 0.15


def parabola_vertex(n: np.ndarray, loss: np.ndarray) -> tuple[float, float]:
    """(curvature, vertex) of the least-squares parabola of loss in ln N."""
    a, b, _ = np.polyfit(np.log(n), loss, 2)
    return float(a), float(-b / (2 * a))


@pytest.mark.slow
def test_every_budget_of_the_isoflop_template_has_its_minimum_inside_the_sizes(tmp_path, capsys):
    # The file itself, no overrides: the runs trained here are the ones a user gets (CPU training
    # is deterministic, so these are the shipped grid's losses).
    runs = tmp_path / "isoflop"
    assert main(["sweep", "run", str(TEMPLATE), "--sweep-dir", str(runs), "--workers", "2"]) == 0
    finals = collect_runs(runs)
    finals = finals.loc[finals["point_kind"] == "final"]
    assert len(finals) == len(load_sweep(TEMPLATE).runs)

    budgets = sorted(finals["label_flops"].unique())
    assert len(budgets) >= 3
    vertices = []
    for budget in budgets:
        curve = finals.loc[finals["label_flops"] == budget].sort_values("N")
        n, loss = curve["N"].to_numpy(float), curve["loss"].to_numpy(float)
        assert len(n) >= 4, budget
        where = f"budget {budget:.3g}: N {n.tolist()}, loss {loss.round(4).tolist()}"
        assert 0 < int(np.argmin(loss)) < len(n) - 1, f"lowest loss at an end of the sizes; {where}"
        curvature, vertex = parabola_vertex(n, loss)
        assert curvature > 0, where
        position = (vertex - np.log(n[0])) / (np.log(n[-1]) - np.log(n[0]))
        assert MARGIN < position < 1 - MARGIN, f"vertex at {position:.2f} of the log-N range; {where}"
        vertices.append(vertex)
    # More compute, a larger optimal model (about 18k, 27k, 37k parameters).
    assert np.all(np.diff(vertices) > 0), np.exp(vertices)

    # The law fitted the documented way: no parameter at a bound, and an allocation reported
    # (not moved out as "outside the sampled sizes"), its N_opt among the runs' N.
    out = tmp_path / "fit"
    assert main(["fit", str(runs), "--law", "chinchilla", "--no-plots", "--out", str(out)]) == 0
    capsys.readouterr()
    fit = json.loads((out / "fit.json").read_text())
    assert fit["at_bound"] == []
    n_opt = [v for k, v in fit["derived"].items() if k.startswith("N_opt@")]
    assert n_opt, fit.get("derived_outside")
    assert all(finals["N"].min() < v < finals["N"].max() for v in n_opt), n_opt
