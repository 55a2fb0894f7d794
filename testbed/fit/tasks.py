"""Task laws (OLMo model ladder, Bhagia et al. 2024): a task's accuracy predicted in two steps.

Step 1: the task loss L (bits per byte of the correct answer, column `task/<name>/bpb`) against
(N, D) with the Chinchilla form L = E + A / N^alpha + B / D^beta, or against compute C with
L = E + A / C^alpha; the fitter's own laws and estimator (laws/classic.py, estimation/).
Step 2: the accuracy against the task loss, Acc(L) = a / (1 + exp(-k (L - L0))) + b, by least
squares (laws/task.py), on each point's measured task loss.
The chained prediction at a target is Acc = step2(step1(N, D)).

Intervals come from a parametric bootstrap of both steps at once (docs/statistics.md: the design
stays as it was run, new responses are drawn around the fit): each replicate draws new task
losses around step 1's fit, then new accuracies around step 2's sigmoid *at those replicate
losses*, each with normal noise of its step's residual SD (that SD itself drawn from its
chi-square on n - p degrees of freedom); both steps are refitted and chained, so the spread of
the chained value holds both steps' uncertainty. A replicate that fails counts beyond either end
of an interval, never dropped. The points are taken as independent: with `--points all` the
checkpoints of one run share its noise and the intervals come out too narrow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from testbed.errors import TestbedError
from testbed.fit.estimation import guards
from testbed.fit.estimation.bootstrap import fit_space_residuals, scatter
from testbed.fit.estimation.estimate import FitResult, fit, fit_replicates, one_blas_thread
from testbed.fit.laws import CHINCHILLA, POWER, Law, law_inputs
from testbed.fit.laws import task as sigmoid_law
from testbed.fit.points.table import Points, load_points, parse_columns, read_source
from testbed.stats.curves import percentile

LEVEL = 0.95
METRICS = ("acc", "acc_norm")
INPUTS = ("ND", "C")


def task_columns(task: str, metric: str = "acc") -> tuple[str, str]:
    """(task loss column, accuracy column) of a task, as runs log them (testbed/train/tasks.py)."""
    return f"task/{task}/bpb", f"task/{task}/{metric}"


def step1_law(inputs: str) -> Law:
    if inputs not in INPUTS:
        raise TestbedError(f"--task-input {inputs!r} is unknown; use ND (L against N and D) or C (against compute).")
    return CHINCHILLA if inputs == "ND" else POWER


def load_task_points(source: str | Path | pd.DataFrame, task: str, *, metric: str = "acc", inputs: str = "ND",
                     columns: str | None = None, points: str = "final", skip_fraction: float = 0.1) -> Points:
    """The points of one task: N, D, C (one of them derived from C = 6 N D), `loss` (the task's
    bpb), `acc` (its accuracy) and `run_id`, from a sweep directory or a table."""
    if metric not in METRICS:
        raise TestbedError(f"--task-metric {metric!r} is unknown; use acc or acc_norm.")
    frame = source if isinstance(source, pd.DataFrame) else read_source(source)
    loss_col, acc_col = task_columns(task, metric)
    missing = [c for c in (loss_col, acc_col) if c not in frame.columns]
    if missing:
        tasks = sorted({str(c).split("/")[1] for c in frame.columns if str(c).startswith("task/") and str(c).count("/") == 2})
        raise TestbedError(f"--task {task}: the table has no column {' or '.join(map(repr, missing))}; "
                           + (f"tasks in it: {', '.join(tasks)}." if tasks else
                              "it holds no task metrics (runs score task files when train.tasks names them)."))
    mapping = {**parse_columns(columns), "loss": loss_col, "acc": acc_col}
    law = step1_law(inputs)
    needed = (("N", "D") if law is CHINCHILLA else ("C",)) + ("loss", "acc")
    chosen = load_points(frame, needed, needed[:-1], mapping, points, skip_fraction)
    acc = chosen.frame["acc"].to_numpy(float)
    if ((acc < 0) | (acc > 1)).any():
        raise TestbedError(f"column {acc_col!r} holds values outside [0, 1] ({int(((acc < 0) | (acc > 1)).sum())} rows); "
                           f"it must be a share of examples answered right.")
    if law is POWER:
        chosen.frame["X"] = chosen.frame["C"]
    return chosen


@dataclass
class TaskFit:
    task: str
    metric: str
    inputs: str  # "ND" or "C"
    frame: pd.DataFrame  # the fitted points (loss: the task's bpb; acc: its accuracy)
    step1: FitResult
    step2: sigmoid_law.SigmoidFit
    delta: float
    thetas1: np.ndarray | None = None  # (K, P) bootstrap refits of step 1 (internal), failed rows nan
    thetas2: np.ndarray | None = None  # (K, 4) bootstrap refits of step 2 (public a, k, L0, b)
    seed: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def resamples(self) -> int:
        return 0 if self.thetas1 is None else len(self.thetas1)

    @property
    def failed(self) -> int:
        if self.thetas1 is None or self.thetas2 is None:
            return 0
        return int((~(np.isfinite(self.thetas1).all(axis=1) & np.isfinite(self.thetas2).all(axis=1))).sum())


def min_points(inputs: str, chance: float | None) -> int:
    """The fewest points both steps can be fitted to (each needs one more than its free parameters)."""
    return max(len(step1_law(inputs).params) + 1, sigmoid_law.min_points(chance))


def check_points(frame: pd.DataFrame, inputs: str, chance: float | None) -> None:
    law = step1_law(inputs)
    need, n = min_points(inputs, chance), len(frame)
    if n < need:
        raise TestbedError(
            f"the task law needs at least {need} points with the task's bpb and accuracy but {n} remain "
            f"(step 1, {law.formula}: {len(law.params)} parameters; step 2, {sigmoid_law.FORMULA}: "
            f"{sigmoid_law.free_count(chance)}{' with b fixed by --chance' if chance is not None else ''}; "
            f"each step needs one more point than it has parameters); add runs, or use --points all to "
            f"fit intermediate checkpoints too.")
    for name, term in law.terms.items():
        column = "C" if name == "X" else name
        if frame[name].nunique() < 2:
            raise TestbedError(f"the fitted points hold a single {column} ({frame[name].iloc[0]:.4g}), so the term "
                               f"{term} of step 1 cannot be identified; add runs with other {column} values.")


@one_blas_thread
def fit_task(frame: pd.DataFrame, task: str = "task", *, metric: str = "acc", inputs: str = "ND",
             chance: float | None = None, delta: float = 1e-3, bootstrap: int = 0, seed: int = 0,
             starts: np.ndarray | None = None) -> TaskFit:
    """Fit both steps to `frame` (from `load_task_points`, or any frame with N, D (or C and X),
    loss, acc and run_id) and, with `bootstrap` > 0, that many wild bootstrap replicates of both.
    `starts` (internal step-1 vectors) skips step 1's grid of starts."""
    law = step1_law(inputs)
    frame = frame.reset_index(drop=True)
    if law is POWER and "X" not in frame.columns:
        frame = frame.assign(X=frame["C"])
    check_points(frame, inputs, chance)
    x = law_inputs(law, frame)
    step1 = fit(law, x, frame["loss"].to_numpy(float), delta=delta, starts=starts)
    step2 = sigmoid_law.fit_sigmoid(frame["loss"].to_numpy(float), frame["acc"].to_numpy(float), chance=chance)
    out = TaskFit(task, metric, inputs, frame, step1, step2, delta, seed=seed)
    for step, names in (("step 1", step1.at_bound), ("step 2", step2.at_bound)):
        if names:
            out.warnings.append(f"{step}: {', '.join(names)} at a bound of the fit; the points do not pin "
                                f"{'it' if len(names) == 1 else 'them'} down, and an interval that reaches the bound is "
                                f"cut there.")
    if bootstrap > 0:
        out.thetas1, out.thetas2 = _replicates(out, bootstrap, seed)
    return out


def _replicates(tf: TaskFit, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(K, P) step-1 and (K, 4) step-2 refits on parametric bootstrap replicates (module docstring)."""
    law, frame, n = tf.step1.law, tf.frame, len(tf.frame)
    rng = np.random.default_rng(seed)
    fitted1, residuals1 = fit_space_residuals(tf.step1, frame)
    targets1 = fitted1[None, :] + _noise(rng, residuals1, tf.step1.n_free, k)  # (K, n) log bpb
    thetas1 = fit_replicates(tf.step1, law_inputs(law, frame), frame["loss"].to_numpy(float), np.ones((k, n)),
                             delta=tf.delta, targets=targets1)
    losses = np.exp(targets1) if law.space == "log" else targets1
    accs = sigmoid_law.sigmoid(tf.step2.theta, losses) + _noise(rng, tf.step2.residuals, tf.step2.n_free, k)
    thetas2 = np.full((k, 4), np.nan)
    for i in range(k):
        try:
            thetas2[i] = sigmoid_law.fit_sigmoid(losses[i], accs[i], chance=tf.step2.chance,
                                                 start=tf.step2.theta).theta
        except TestbedError:
            continue  # counted: a nan replicate lies beyond either end of every interval
    return thetas1, thetas2


def _noise(rng: np.random.Generator, residuals: np.ndarray, n_free: int, k: int) -> np.ndarray:
    """(K, n) normal noise whose SD is the fit's residual SD (on n - p degrees of freedom), drawn
    afresh per replicate from its chi-square, so few degrees of freedom widen the intervals as a
    t interval would (testbed.stats.curves.parametric_bootstrap)."""
    residuals = residuals[np.isfinite(residuals)]
    df = max(1, len(residuals) - n_free)
    sd = math.sqrt(float(np.sum(residuals**2)) / df)
    scale = sd * np.sqrt(df / rng.chisquare(df, size=k))
    return scale[:, None] * rng.standard_normal((k, len(residuals)))


def _interval(estimate: float, values: np.ndarray, level: float) -> dict:
    low, high = percentile(values, level)
    return {"estimate": float(estimate), "low": low, "high": high}


def parameters(tf: TaskFit, level: float = LEVEL) -> dict[str, dict[str, dict]]:
    """{"step 1": {name: {estimate, low?, high?}}, "step 2": {...}}: each parameter with its
    percentile interval when the fit was bootstrapped."""
    out: dict[str, dict[str, dict]] = {"step 1": {}, "step 2": {}}
    law = tf.step1.law
    for name, value in tf.step1.params.items():
        out["step 1"][name] = {"estimate": value}
    for name, value in tf.step2.params.items():
        out["step 2"][name] = {"estimate": value}
    if tf.thetas1 is not None and tf.thetas2 is not None:
        ok1 = np.isfinite(tf.thetas1).all(axis=1)
        public1 = np.array([[p.to_public(v) for p, v in zip(law.params, row)] if good else [np.nan] * len(row)
                            for row, good in zip(tf.thetas1, ok1)])
        for j, name in enumerate(tf.step1.params):
            if name not in tf.step1.fixed:
                out["step 1"][name] = _interval(tf.step1.params[name], public1[:, j], level)
        for j, name in enumerate(sigmoid_law.PARAMS):
            if not (name == "b" and tf.step2.chance is not None):
                out["step 2"][name] = _interval(tf.step2.theta[j], tf.thetas2[:, j], level)
    return out


def predict(tf: TaskFit, targets: list[dict[str, float]], level: float = LEVEL) -> list[dict]:
    """The chained prediction at each target ({"N", "D"} or {"C"}): the task loss, the accuracy
    (the law's value: its interval covers what the law would give with both steps known exactly)
    and, bootstrapped, a new run's accuracy (its interval adds one run's scatter about both steps).
    Each row's `extrapolation` names how far the target lies beyond the fitted points."""
    law = tf.step1.law
    rows = []
    for target in targets:
        point = _target_columns(target, tf.inputs)
        x = law_inputs(law, pd.DataFrame({k: [v] for k, v in point.items()}))
        loss = float(law.predict_loss(tf.step1.theta, x)[0])
        acc = float(tf.step2.predict(np.array([loss]))[0])
        row: dict = {**point, "task_loss": loss, "accuracy": acc}
        if tf.thetas1 is not None and tf.thetas2 is not None:
            with np.errstate(over="ignore", invalid="ignore"):
                raw = law.predict(np.where(np.isfinite(tf.thetas1), tf.thetas1, 0.0), x)[:, 0]
            losses = np.exp(raw) if law.space == "log" else raw
            losses[~np.isfinite(tf.thetas1).all(axis=1)] = np.nan
            accs = sigmoid_law.sigmoid(tf.thetas2, losses[:, None])[:, 0]
            accs[~np.isfinite(tf.thetas2).all(axis=1)] = np.nan
            new_run = _new_run(tf, losses, seed=tf.seed + 2)
            for name, est, values in (("task_loss", loss, losses), ("accuracy", acc, accs), ("new_run", acc, new_run)):
                iv = _interval(est, values, level)
                row[f"{name}_low"], row[f"{name}_high"] = iv["low"], iv["high"]
        row["extrapolation"] = extrapolation(tf, point, loss)
        rows.append(row)
    return rows


def _new_run(tf: TaskFit, losses: np.ndarray, seed: int) -> np.ndarray:
    """One new run's accuracy per replicate: the replicate's task loss moved by a training run's
    scatter about step 1 (estimation.bootstrap.scatter), through the replicate's sigmoid, plus a
    point's residual about step 2 (widened by sqrt(n / (n - p)) as the fit leans towards its points)."""
    rng = np.random.default_rng(seed)
    law = tf.step1.law
    offsets, within = scatter(tf.step1, tf.frame)
    shift = rng.choice(offsets, size=len(losses)) + rng.choice(within, size=len(losses))
    moved = losses * np.exp(shift) if law.space == "log" else losses + shift
    assert tf.thetas2 is not None
    accs = sigmoid_law.sigmoid(tf.thetas2, moved[:, None])[:, 0]
    n, p = tf.step2.n_points, tf.step2.n_free
    widen = math.sqrt(n / (n - p)) if n > p else 1.0
    accs = accs + widen * rng.choice(tf.step2.residuals, size=len(losses))
    accs[~np.isfinite(tf.thetas2).all(axis=1)] = np.nan
    return accs


def _target_columns(target: dict[str, float], inputs: str) -> dict[str, float]:
    if "N" in target and "D" in target:
        out = {"N": float(target["N"]), "D": float(target["D"])}
        out["C"] = 6.0 * out["N"] * out["D"]
    elif "C" in target:
        if inputs == "ND":
            raise TestbedError("--at C=...: step 1 is fitted against N and D (--task-input ND); give N=...,D=..., "
                               "or fit against compute with --task-input C.")
        out = {"C": float(target["C"])}
    else:
        raise TestbedError(f"--at {target}: give N=VALUE,D=VALUE (or C=VALUE with --task-input C).")
    if inputs == "C":
        out["X"] = out["C"]
    if not all(math.isfinite(v) and v > 0 for v in out.values()):
        raise TestbedError(f"--at {target}: the values must be positive numbers.")
    return out


def extrapolation(tf: TaskFit, point: dict[str, float], loss: float) -> list[str]:
    """How far a target lies beyond the fitted points: along N, D or C (estimation/guards.py, past
    its limit), and its predicted task loss beyond the losses step 2 was fitted on."""
    axes = {k: np.array([v]) for k, v in point.items() if k in guards.AXES}
    out = guards.extrapolation(tf.frame, axes, "the target", "the chained accuracy rests on step 1's form holding there")
    fitted = tf.frame["loss"].to_numpy(float)
    low, high = float(fitted.min()), float(fitted.max())
    span = max(high - low, 1e-12)
    if loss < low:
        out.append(f"its predicted task loss {loss:.4g} is {low - loss:.3g} bpb ({(low - loss) / span:.2f} of the fitted "
                   f"range) below the lowest fitted ({low:.4g}): step 2's sigmoid is extrapolated.")
    elif loss > high:
        out.append(f"its predicted task loss {loss:.4g} is {loss - high:.3g} bpb ({(loss - high) / span:.2f} of the "
                   f"fitted range) above the highest fitted ({high:.4g}): step 2's sigmoid is extrapolated.")
    return out


# ---------------------------------------------------------------- report
def _fmt(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def _cell(entry: dict) -> str:
    return f"[{_fmt(entry['low'])}, {_fmt(entry['high'])}]" if "low" in entry else "-"


def _band(row: dict, name: str) -> str:
    return f" [{_fmt(row[name + '_low'])}, {_fmt(row[name + '_high'])}]" if name + "_low" in row else ""


def report_lines(tf: TaskFit, predictions: list[dict], level: float = LEVEL) -> list[str]:
    """The fit as markdown lines: both formulas, a table of the constants with their intervals,
    the predictions and the warnings (the console prints the same)."""
    loss_col, acc_col = task_columns(tf.task, tf.metric)
    law = tf.step1.law
    formula1 = law.formula.replace("L(X)", "L(C)").replace("X^", "C^").split("   ")[0]
    chance = f"; b fixed to the chance level {tf.step2.chance:g}" if tf.step2.chance is not None else ""
    lines = [f"# Task law: {tf.task} ({tf.metric})", "",
             f"{len(tf.frame)} points from {tf.frame['run_id'].nunique()} runs.", "",
             f"- step 1, task loss `{loss_col}`: `{formula1}`",
             f"- step 2, accuracy `{acc_col}`: `{sigmoid_law.FORMULA}`{chance}", "",
             f"| step | parameter | estimate | {level:.0%} interval |", "|---|---|---|---|"]
    for step, params in parameters(tf, level).items():
        for name, entry in params.items():
            note = " (fixed)" if (step == "step 2" and name == "b" and tf.step2.chance is not None) else ""
            lines.append(f"| {step} | {name}{note} | {_fmt(entry['estimate'])} | {_cell(entry)} |")
    if tf.resamples:
        lines += ["", f"Intervals: percentile, over {tf.resamples} wild bootstrap replicates by run refitting both "
                      f"steps ({tf.failed} failed, counted beyond the ends)."]
    else:
        lines += ["", "No intervals: give --bootstrap K (e.g. 200)."]
    if predictions:
        names = ["N", "D"] if tf.inputs == "ND" else ["C"]
        lines += ["", "| " + " | ".join(names) + " | task loss (bpb) | accuracy | new run's accuracy |",
                  "|---" * (len(names) + 3) + "|"]
        for row in predictions:
            lines.append("| " + " | ".join(f"{row[n]:.4g}" for n in names)
                         + f" | {_fmt(row['task_loss'])}{_band(row, 'task_loss')}"
                         f" | {_fmt(row['accuracy'])}{_band(row, 'accuracy')} | {_band(row, 'new_run').strip() or '-'} |")
        if tf.resamples:
            lines += ["", "The accuracy's interval covers the law's value at the target (both steps' uncertainty); "
                          "the new run's adds one run's scatter about each step."]
        for row in predictions:
            where = ", ".join(f"{n}={row[n]:.4g}" for n in names)
            lines += [f"\n> Extrapolation ({where}): {line}" for line in row["extrapolation"]]
    lines += [f"\n> Warning: {w}" for w in tf.warnings]
    return lines


def summary(tf: TaskFit, predictions: list[dict], level: float = LEVEL) -> dict:
    """fit.json's dictionary for a task law."""
    loss_col, acc_col = task_columns(tf.task, tf.metric)
    return {"law": "task", "task": tf.task, "metric": tf.metric, "inputs": tf.inputs,
            "columns": {"task_loss": loss_col, "accuracy": acc_col},
            "formulas": {"step 1": tf.step1.law.formula, "step 2": sigmoid_law.FORMULA},
            "n_points": len(tf.frame), "n_runs": int(tf.frame["run_id"].nunique()),
            "chance": tf.step2.chance, "parameters": parameters(tf, level), "level": level,
            "bootstrap": {"resamples": tf.resamples, "failed": tf.failed,
                          "method": "wild bootstrap by run over both steps"} if tf.resamples else None,
            "predictions": predictions, "warnings": tf.warnings,
            "converged": {"step 1": tf.step1.converged, "step 2": tf.step2.converged}}
