"""`testbed sweep status`: progress of every run in a sweep directory, failures, an ETA."""

from __future__ import annotations

import shutil
import time
from typing import Any

from testbed.errors import TestbedError
from testbed.rundir import RunDir
from testbed.sweep.outcome import tail
from testbed.sweep.plan import duration, format_table, human
from testbed.sweep.registry import STATES, Registry

LOG_LINES = 8


def last_metrics(registry: Registry, run_id: str) -> dict[str, Any]:
    """The newest step, train/validation losses and loss-spike count from the run's
    metrics.jsonl (the count is read from the newest train line; null for runs that kept none)."""
    out: dict[str, Any] = {}
    for row in reversed(RunDir(registry.run_dir(run_id)).metrics()):
        out.setdefault("step", row.get("step"))
        if "train_loss" in row:
            out.setdefault("train_loss", row["train_loss"])
            out.setdefault("spikes", row.get("spikes"))
        if "val_loss" in row:
            out.setdefault("val_loss", row["val_loss"])
        if {"step", "train_loss", "val_loss"} <= out.keys():
            break
    return out


def parse_time(text: str | None) -> float | None:
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S")) if text else None
    except ValueError:
        return None


def collect(registry: Registry) -> dict[str, Any]:
    if not registry.exists():
        raise TestbedError(f"{str(registry.root)!r} is not a sweep directory (no registry/ inside); "
                           f"pass the --sweep-dir given to `testbed sweep run`")
    live = None
    if any(r.get("executor") == "slurm" for r in registry.records([])) and shutil.which("squeue"):
        from testbed.sweep.slurm import live_jobs

        live = live_jobs
    damaged: list[dict[str, str]] = []
    records = registry.reconcile(live, damaged)
    runs, done_flops, total_flops = [], 0.0, 0.0
    starts: list[float] = []  # when each started run started (epoch seconds)
    for record in records:
        q = record.get("quantities") or {}
        planned = q.get("planned_steps")
        metrics = last_metrics(registry, record["run_id"])
        step = metrics.get("step") or 0
        fraction = 1.0 if record["state"] == "done" else min(1.0, step / planned) if planned else 0.0
        flops = q.get("planned_flops") or 0
        total_flops += flops
        done_flops += fraction * flops
        started = parse_time(record.get("started_at"))
        if started:
            starts.append(started)
        run = {"run_id": record["run_id"], "labels": record.get("labels", {}),
               "state": record["state"], "reason": record.get("reason"), "step": step,
               "planned_steps": planned, "train_loss": metrics.get("train_loss"),
               "val_loss": metrics.get("val_loss"), "spikes": metrics.get("spikes"),
               "failures": record.get("failures", 0),
               "preemptions": record.get("preemptions", 0), "job_id": record.get("job_id")}
        if record["state"] == "failed":
            run["log_tail"] = tail(registry.log_path(record["run_id"]), LOG_LINES)
        runs.append(run)
    for bad in damaged:  # shown, never dropped: its run is neither counted done nor lost
        runs.append({"run_id": bad["run_id"], "labels": {}, "state": "damaged",
                     "reason": bad["message"], "step": 0, "planned_steps": None,
                     "train_loss": None, "val_loss": None, "spikes": None, "failures": 0, "preemptions": 0,
                     "job_id": None, "record": bad["path"]})
    counts = {state: 0 for state in (*STATES, "damaged")}
    for run in runs:
        counts[run["state"]] = counts.get(run["state"], 0) + 1
    eta = None
    # An ETA only while something runs: a stopped sweep has no time left, only work.
    if counts["running"] and starts and 0 < done_flops < total_flops:
        elapsed = time.time() - min(starts)
        eta = (total_flops - done_flops) / (done_flops / elapsed) if elapsed > 0 else None
    return {"sweep_dir": str(registry.root), "counts": counts, "runs": runs,
            "progress": done_flops / total_flops if total_flops else 0.0, "eta_seconds": eta}


def render_status(report: dict[str, Any]) -> str:
    rows = []
    for r in report["runs"]:
        loss = r["val_loss"] if r["val_loss"] is not None else r["train_loss"]
        rows.append([r["run_id"], r["state"], f"{r['step']}/{r['planned_steps'] or '?'}",
                     f"{loss:.4f}" if isinstance(loss, (int, float)) else "-",
                     str(r["spikes"]) + (" !" if r["spikes"] else "") if r.get("spikes") is not None else "-",
                     str(r["failures"]), str(r["job_id"] or "-")])
    text = [format_table(["run", "state", "step", "loss", "spikes", "fails", "job"], rows)]
    counts = ", ".join(f"{n} {s}" for s, n in report["counts"].items() if n)
    eta = duration(report["eta_seconds"]) if report["eta_seconds"] is not None else "-"
    if not report["counts"].get("running"):
        eta = "- (nothing running)"
    text.append(f"\n{len(report['runs'])} runs: {counts or 'none'}; "
                f"{100 * report['progress']:.0f}% of the FLOPs done; ETA {eta}")
    for r in report["runs"]:
        if r["state"] == "failed":
            text.append(f"\nFAILED {r['run_id']} ({r['failures']} failures): {r['reason']}")
            text.extend(f"    {line}" for line in r.get("log_tail", []))
        elif r["state"] == "damaged":
            text.append(f"\nDAMAGED {r['run_id']}: {r['reason']}")
    unstable = [r for r in report["runs"] if r.get("spikes")]
    if unstable:
        text.append("\nUNSTABLE (training-loss spikes; see `spike` in their metrics.jsonl): "
                    + ", ".join(f"{r['run_id']} ({r['spikes']})" for r in unstable))
    return "\n".join(text)


__all__ = ["collect", "render_status", "human"]
