"""`testbed sweep plan`: every run's size, length and cost, without training anything."""

from __future__ import annotations

import time
from typing import Any

from testbed.errors import TestbedError
from testbed.sweep.spec import Sweep

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets (no sparsity).
DEVICE_PEAK_FLOPS = {
    "h100": 989e12,
    "h200": 989e12,
    "a100": 312e12,
    "l40s": 362e12,
    "a10g": 125e12,
}


def measure_cpu_peak(seconds: float = 0.5) -> float:
    """FLOP/s of a float32 matrix multiply on this CPU, a rough stand-in for its peak."""
    import numpy as np

    n = 512
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    a @ a  # warm up the BLAS threads
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ a
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


def peak_flops(device: str, given: float | None) -> float:
    if given:
        return float(given)
    if device == "cpu":
        return measure_cpu_peak()
    if device not in DEVICE_PEAK_FLOPS:
        raise TestbedError(f"--device={device!r} has no known peak; choose one of "
                           f"{', '.join([*DEVICE_PEAK_FLOPS, 'cpu'])} or give --peak-flops")
    return DEVICE_PEAK_FLOPS[device]


def plan_rows(sweep: Sweep, peak: float, mfu: float) -> list[dict[str, Any]]:
    rows = []
    for run in sweep.runs:
        q = run.quantities
        rows.append({"run_id": run.run_id, "labels": run.labels, "n_params": q["n_params"],
                     "n_params_non_embedding": q["n_params_non_embedding"],
                     "tokens": q["planned_tokens"], "steps": q["planned_steps"],
                     "flops": q["planned_flops"], "epochs": q["epochs"],
                     "seconds": q["planned_flops"] / (peak * mfu)})
    return rows


def plan_report(sweep: Sweep, device: str, mfu: float, given_peak: float | None) -> dict[str, Any]:
    if not 0 < mfu <= 1:
        raise TestbedError(f"--mfu={mfu} must be in (0, 1], e.g. --mfu 0.4")
    peak = peak_flops(device, given_peak)
    rows = plan_rows(sweep, peak, mfu)
    return {"sweep": sweep.name, "device": device, "peak_flops": peak, "mfu": mfu, "runs": rows,
            "totals": {"runs": len(rows), "tokens": sum(r["tokens"] for r in rows),
                       "flops": sum(r["flops"] for r in rows),
                       "seconds": sum(r["seconds"] for r in rows)}}


def human(n: float) -> str:
    for unit, size in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def render_plan(report: dict[str, Any]) -> str:
    rows = [[r["run_id"], " ".join(f"{k}={v}" for k, v in r["labels"].items()),
             human(r["n_params"]), human(r["tokens"]), str(r["steps"]), human(r["flops"]),
             f"{r['epochs']:.2f}", duration(r["seconds"])] for r in report["runs"]]
    t = report["totals"]
    rows.append(["TOTAL", f"{t['runs']} runs", "", human(t["tokens"]), "", human(t["flops"]), "",
                 duration(t["seconds"])])
    head = (f"sweep {report['sweep']}: time on one {report['device']} at "
            f"{human(report['peak_flops'])}FLOP/s peak x MFU {report['mfu']}")
    return head + "\n" + format_table(["run", "labels", "N", "D", "steps", "FLOPs", "epochs", "time"], rows)
