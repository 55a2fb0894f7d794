"""Turn a sweep's run directories into one tidy table of (run, checkpoint) points.

Reads only what docs/run-directory.md promises, through testbed/rundir.py: run.json,
checkpoints/index.jsonl and the evaluation lines of metrics.jsonl (the points of runs without an
index, and every point's task metrics, `task/<name>/<metric>`, and a mixture's per-source
validation, `source/<name>/val_loss` and `source/<name>/val_bpb`, as columns of the same names; a
mixture's configured weights are the columns `weight/<name>`).
Every run is found, cooldown branches (RUN_DIR/branches/*) included: a branch's final point is a
`cooldown` point. The alternatives to a cooldown have kinds of their own, at the compute of the
step they were taken at: `ema` (every evaluation of the moving average of the weights,
train.ema_decay) and `average` (averaged checkpoints, RUN_DIR/averages.jsonl).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from testbed.errors import TestbedError
from testbed.rundir import RunDir, find_runs
from testbed.schedules import checkpoint_phase

# run.json key -> table column
RUN_COLUMNS = {
    "n_params": "N",
    "n_params_non_embedding": "N_non_embedding",
    "n_params_embedding": "N_embedding",
    "vocab_size": "vocab",
    "d_model": "width",
    "n_layers": "depth",
    "unique_tokens": "U",
    "schedule": "schedule",
    "peak_lr": "peak_lr",
    "planned_steps": "planned_steps",
    "planned_tokens": "planned_tokens",
    "global_batch_tokens": "batch_tokens",
    "flops_per_token": "flops_per_token",
    "data_entropy": "data_entropy",
}


def find_run_dirs(root: str | Path) -> list[RunDir]:
    """Every run under `root`, cooldown branches included (testbed/rundir.py)."""
    runs = find_runs(root)
    if not runs:
        raise TestbedError(
            f"no run.json found under {str(root)!r}; pass a sweep directory or a folder of run directories."
        )
    return runs


TASK_PREFIX = "task/"
SOURCE_PREFIX = "source/"  # a mixture's per-source validation (testbed/data/mixture.py)
EVAL_PREFIXES = (TASK_PREFIX, SOURCE_PREFIX)


def _mixture_weights(run: dict) -> dict[str, Any]:
    """`weight/<name>` columns: the weights a mixture run's config gives its sources."""
    data = (run.get("config") or {}).get("data") or {}
    if data.get("source") != "mixture":
        return {}
    weights = (data.get("source_options") or {}).get("weights") or {}
    return {f"weight/{name}": value for name, value in weights.items()} if isinstance(weights, dict) else {}


def _checkpoint_rows(run: RunDir, has_tasks: bool) -> list[dict]:
    rows = [r for r in run.index() if r.get("val_loss") is not None]
    if rows and not has_tasks:
        return rows
    evals = [r for r in run.metrics() if r.get("val_loss") is not None]
    if not rows:
        # No usable index: fall back to the evaluation lines of the metrics log.
        return [{**r, "kind": "eval"} for r in evals]
    # The index holds the validation; the task scores of the same step are in the metrics log.
    tasks = {r.get("step"): {k: v for k, v in r.items() if k.startswith(EVAL_PREFIXES)} for r in evals}
    return [{**tasks.get(r.get("step"), {}), **r} for r in rows]


def _point_kind(row: dict, run: dict, is_branch: bool) -> str:
    planned = run.get("planned_steps")
    final = row.get("kind") == "final" or (planned is not None and row.get("step") == planned)
    if final:
        return "cooldown" if is_branch else "final"
    return "intermediate"


def _phase(row: dict, run: dict) -> str | None:
    """A checkpoint's schedule phase: as its index line recorded it, else asked of the run's
    schedule (its saved config's section, through the registry); None when neither can say."""
    if row.get("phase"):
        return row["phase"]
    section = (run.get("config") or {}).get("schedule")
    planned = run.get("planned_steps")
    if not isinstance(section, dict) or not planned:
        return None
    return checkpoint_phase(section, int(row.get("step", 0)), int(planned))


def _averaged_rows(run_dir: RunDir, run: dict, base: dict) -> list[dict]:
    """The `ema` points (evaluation lines with val_loss_ema; a branch's own steps only, the
    shared prefix being its parent's) and the `average` points (the newest record per step and
    number of checkpoints averaged)."""
    parent = run.get("parent")
    after = int(parent.get("step") or 0) if isinstance(parent, dict) else 0
    decay = ((run.get("config") or {}).get("train") or {}).get("ema_decay")
    rows = []
    for line in run_dir.metrics():
        if line.get("val_loss_ema") is not None and int(line.get("step", 0)) > after:
            rows.append({**base, "step": int(line["step"]), "D": line.get("tokens"), "C": line.get("flops"),
                         "loss": line["val_loss_ema"], "bpb": line.get("val_bpb_ema"), "lr": line.get("lr"),
                         "point_kind": "ema", "ema_decay": decay})
    newest: dict[tuple[int, int], dict] = {}
    for record in run_dir.averages():
        if record.get("val_loss") is not None:
            newest[(int(record["step"]), int(record["last"]))] = record
    for (step, last), record in sorted(newest.items()):
        rows.append({**base, "step": step, "D": record.get("tokens"), "C": record.get("flops"),
                     "loss": record["val_loss"], "bpb": record.get("val_bpb"), "point_kind": "average",
                     "average_last": last})
    return rows


def run_columns(run_dir: RunDir, run: dict[str, Any]) -> dict[str, Any]:
    """The columns every point of one run shares: its id, folder, labels (`label_<name>`), the
    run.json quantities (RUN_COLUMNS) and its parent run's folder (a cooldown branch's)."""
    base: dict[str, Any] = {"run_id": str(run.get("run_id") or run_dir.path.name), "run_dir": str(run_dir.path)}
    for key, value in (run.get("labels") or {}).items():
        base[f"label_{key}"] = value
    for key, column in RUN_COLUMNS.items():
        base[column] = run.get(key)
    parent = run.get("parent")
    base["parent_run"] = parent.get("run_dir") if isinstance(parent, dict) else None
    return base


def collect_runs(root: str | Path) -> pd.DataFrame:
    """One row per evaluated checkpoint of every run under `root`."""
    records: list[dict[str, Any]] = []
    for run_dir in find_run_dirs(root):
        run = run_dir.read_run() or {}
        base = run_columns(run_dir, run)
        parent = run.get("parent")
        by_step: dict[int, dict] = {}
        weights = _mixture_weights(run)
        base.update(weights)
        # Task scores and a mixture's per-source losses are in the metrics log, not the index.
        has_tasks = bool(((run.get("config") or {}).get("train") or {}).get("tasks")) or bool(weights)
        for row in _checkpoint_rows(run_dir, has_tasks):
            kind = _point_kind(row, run, parent is not None)
            step = int(row.get("step", 0))
            # A final checkpoint may repeat a science one at the same step: keep one point.
            if step in by_step and by_step[step]["point_kind"] != "intermediate":
                continue
            tokens = row.get("tokens")
            if tokens is None and step and run.get("global_batch_tokens"):
                tokens = step * run["global_batch_tokens"]
            flops = row.get("flops")
            if flops is None and tokens is not None and run.get("flops_per_token"):
                flops = tokens * run["flops_per_token"]
            by_step[step] = {
                **base,
                "step": step,
                "D": tokens,
                "C": flops,
                "loss": row.get("val_loss"),
                "bpb": row.get("val_bpb"),
                "lr": row.get("lr"),
                "phase": _phase(row, run),
                "checkpoint_kind": row.get("kind"),
                "deleted": bool(row.get("deleted", False)),
                "point_kind": kind,
                **{k: v for k, v in row.items() if k.startswith(EVAL_PREFIXES)},
            }
        records.extend(by_step[s] for s in sorted(by_step))
        records.extend(_averaged_rows(run_dir, run, base))
    if not records:
        raise TestbedError(
            f"no run under {str(root)!r} has an evaluated checkpoint (val_loss); train longer or "
            "enable evaluation."
        )
    table = pd.DataFrame.from_records(records)
    for column in ("ema_decay", "average_last"):  # present in every table, empty without such points
        if column not in table:
            table[column] = None
    unique = pd.to_numeric(table["U"], errors="coerce")
    table["epochs"] = table["D"].astype(float) / unique
    table.loc[unique.isna(), "epochs"] = (table["D"].astype(float) / table["planned_tokens"].astype(float)).clip(upper=1.0)
    return table


def collect_curves(root: str | Path) -> pd.DataFrame:
    """Per-run learning-rate and loss series from metrics.jsonl, for the annealing law.

    Train lines give lr and train_loss; evaluation lines give val_loss. Columns: run_id, step,
    lr, loss (val_loss where evaluated, else train_loss), loss_kind, schedule.
    """
    records = []
    for run_dir in find_run_dirs(root):
        run = run_dir.read_run() or {}
        run_id = str(run.get("run_id") or run_dir.path.name)
        for row in run_dir.metrics():
            is_eval = row.get("val_loss") is not None
            loss = row.get("val_loss") if is_eval else row.get("train_loss")
            records.append({
                "run_id": run_id, "step": row.get("step"), "lr": row.get("lr"), "loss": loss,
                "loss_kind": "val" if is_eval else "train", "schedule": run.get("schedule"),
            })
    return pd.DataFrame.from_records(records, columns=["run_id", "step", "lr", "loss", "loss_kind", "schedule"])


def write_table(table: pd.DataFrame, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        table.to_parquet(out, index=False)
    elif out.suffix == ".csv":
        table.to_csv(out, index=False)
    else:
        raise TestbedError(f"--out {str(out)!r} has an unknown extension; use .csv or .parquet.")
    return out
