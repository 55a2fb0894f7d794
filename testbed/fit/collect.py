"""Turn a sweep's run directories into one tidy table of (run, checkpoint) points.

Reads only what docs/run-directory.md promises: run.json, checkpoints/index.jsonl and, for runs
without an index, the evaluation lines of metrics.jsonl. A sweep directory holds its runs at
SWEEP_DIR/runs/<run_id>/; any other folder is searched recursively for run.json files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from testbed.errors import TestbedError

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


def find_run_dirs(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise TestbedError(f"sweep directory {str(root)!r} does not exist; pass a folder of run directories.")
    runs = root / "runs"
    found = sorted(runs.glob("*/run.json")) if runs.is_dir() else []
    if not found:
        found = sorted(root.rglob("run.json"))
    if not found:
        raise TestbedError(
            f"no run.json found under {str(root)!r}; pass a sweep directory or a folder of run directories."
        )
    return [p.parent for p in found]


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    if not path.is_file():
        return rows
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            # A run killed mid-write leaves a partial last line; anything else is corruption.
            if number != len(path.read_text().splitlines()):
                raise TestbedError(f"{path} line {number} is not valid JSON; repair or remove that line.")
    return rows


def _checkpoint_rows(run_dir: Path) -> list[dict]:
    index = _read_jsonl(run_dir / "checkpoints" / "index.jsonl")
    rows = [r for r in index if r.get("val_loss") is not None]
    if rows:
        return rows
    # No usable index: fall back to the evaluation lines of the metrics log.
    return [
        {**r, "kind": "eval"} for r in _read_jsonl(run_dir / "metrics.jsonl") if r.get("val_loss") is not None
    ]


def _point_kind(row: dict, run: dict, is_branch: bool) -> str:
    planned = run.get("planned_steps")
    final = row.get("kind") == "final" or (planned is not None and row.get("step") == planned)
    if final:
        return "cooldown" if is_branch else "final"
    return "intermediate"


def collect_runs(root: str | Path) -> pd.DataFrame:
    """One row per evaluated checkpoint of every run under `root`."""
    records = []
    for run_dir in find_run_dirs(root):
        try:
            run = json.loads((run_dir / "run.json").read_text())
        except json.JSONDecodeError as err:
            raise TestbedError(f"{run_dir / 'run.json'} is not valid JSON ({err}); rewrite or remove it.")
        base = {"run_id": str(run.get("run_id") or run_dir.name), "run_dir": str(run_dir)}
        for key, value in (run.get("labels") or {}).items():
            base[f"label_{key}"] = value
        for key, column in RUN_COLUMNS.items():
            base[column] = run.get(key)
        parent = run.get("parent")
        base["parent_run"] = parent.get("run_dir") if isinstance(parent, dict) else None
        by_step: dict[int, dict] = {}
        for row in _checkpoint_rows(run_dir):
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
                "phase": row.get("phase"),
                "checkpoint_kind": row.get("kind"),
                "deleted": bool(row.get("deleted", False)),
                "point_kind": kind,
            }
        records.extend(by_step[s] for s in sorted(by_step))
    if not records:
        raise TestbedError(
            f"no run under {str(root)!r} has an evaluated checkpoint (val_loss); train longer or "
            "enable evaluation."
        )
    table = pd.DataFrame.from_records(records)
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
        run = json.loads((run_dir / "run.json").read_text())
        run_id = str(run.get("run_id") or run_dir.name)
        for row in _read_jsonl(run_dir / "metrics.jsonl"):
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
