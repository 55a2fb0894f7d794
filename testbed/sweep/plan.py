"""`testbed sweep plan`: every run's size, length and cost, without training anything."""

from __future__ import annotations

from typing import Any

from testbed.errors import TestbedError
from testbed.sweep.spec import Sweep


def run_precisions(sweep: Sweep, device: str) -> list[str]:
    """The precisions the sweep's runs train in on this kind of device (train.precision, with
    auto resolved as the trainer resolves it: bf16 on a GPU, fp32 on a CPU)."""
    found = set()
    for run in sweep.runs:
        precision = run.config.train.precision
        if precision == "auto":
            precision = "fp32" if device == "cpu" else "bf16"
        found.add(precision)
    return sorted(found)


def peak_flops(device: str, given: float | None, precision: str) -> tuple[float, list[str]]:
    """(peak FLOP/s the estimate uses, notes for the reader). The device table and the CPU
    measurement are the trainer's own (testbed/train/device.py)."""
    from testbed.train import device as dev

    notes: list[str] = []
    if given:
        return float(given), notes
    if device == "cpu":
        import torch

        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        if precision == "bf16" and not dev.cpu_has_bf16_units():
            notes.append("this CPU has no bf16 matrix units (AVX512-BF16/AMX): bf16 is emulated and "
                         "far slower; set train.precision=fp32")
        peak = dev.measure_matmul_peak(dtype)
        if precision == "fp32" and dev.cpu_has_bf16_units():
            bf16 = dev.measure_matmul_peak(torch.bfloat16)
            notes.append(f"this CPU has bf16 matrix units: bf16 matmuls measured {bf16 / peak:.1f}x "
                         f"fp32 here; train.precision=bf16 trades bit-exact fp32 for that speed")
        return peak, notes
    named = dev.named_peak(device)
    if named is None:
        raise TestbedError(f"--device={device!r} has no known peak; choose one of "
                           f"{', '.join([*dev.device_names(), 'cpu'])} or give --peak-flops")
    if precision != "bf16":
        notes.append(f"runs train in {precision}, but GPU peaks are tabulated for bf16; the estimate "
                     f"is optimistic (give --peak-flops for {precision})")
    return named, notes


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
    precisions = run_precisions(sweep, device)
    # A sweep mixing precisions is estimated at the slower one's peak.
    precision = "fp32" if "fp32" in precisions else precisions[0]
    peak, notes = peak_flops(device, given_peak, precision)
    if len(precisions) > 1:
        notes.append(f"runs mix precisions ({', '.join(precisions)}); every run is estimated at the "
                     f"{precision} peak")
    rows = plan_rows(sweep, peak, mfu)
    return {"sweep": sweep.name, "device": device, "precision": precision, "peak_flops": peak,
            "mfu": mfu, "notes": notes, "runs": rows,
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
    rows = [[r["run_id"], " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in r["labels"].items()),
             human(r["n_params"]), human(r["tokens"]), str(r["steps"]), human(r["flops"]),
             f"{r['epochs']:.2f}", duration(r["seconds"])] for r in report["runs"]]
    t = report["totals"]
    rows.append(["TOTAL", f"{t['runs']} runs", "", human(t["tokens"]), "", human(t["flops"]), "",
                 duration(t["seconds"])])
    head = (f"sweep {report['sweep']}: time on one {report['device']} in {report['precision']} at "
            f"{human(report['peak_flops'])}FLOP/s peak x MFU {report['mfu']}")
    notes = "".join(f"\nnote: {n}" for n in report["notes"])
    return head + "\n" + format_table(["run", "labels", "N", "D", "steps", "FLOPs", "epochs", "time"], rows) + notes
