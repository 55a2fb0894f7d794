"""Write fit.json and report.md for an analysis."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from testbed.fit.options import FitSummary


def _plain(value):
    """JSON-safe copy: numpy scalars to Python, non-finite floats to strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _fmt(value) -> str:
    if isinstance(value, (int, np.integer)):
        return str(value)
    if isinstance(value, (float, np.floating)):
        return f"{value:.6g}"
    return str(value)


def write_json(summary: FitSummary, out_dir: Path) -> Path:
    path = out_dir / "fit.json"
    path.write_text(json.dumps(_plain(summary.to_dict()), indent=2) + "\n")
    return path


def markdown(summary: FitSummary, plots: list[str]) -> str:
    s = summary
    lines = [f"# Fit of the {s.law} law", "", f"`{s.formula}`", ""]
    lines.append(f"{s.n_points} points from {s.n_runs} runs.")
    if s.rows and "line" in s.rows:
        lines.append(s.rows["line"][0].upper() + s.rows["line"][1:] + ".")
    if s.dropped:
        lines.append("Rows dropped: " + "; ".join(f"{k}: {v}" for k, v in s.dropped.items()) + ".")
    for warning in s.warnings:
        lines.append(f"\n> Warning: {warning}")
    lines.append("")
    if s.groups is not None:
        lines += _variants_section(s)
    else:
        lines += _fit_section(s)
    if s.holdout is not None:
        lines += _holdout_section(s, s.holdout)
    if plots:
        from testbed.fit.reporting.plots import CAPTIONS

        lines += ["", "## Plots", ""]
        for plot in plots:
            lines += [f"![{Path(plot).stem}]({Path(plot).name})", ""]
            if Path(plot).stem in CAPTIONS:
                lines += [f"*{CAPTIONS[Path(plot).stem]}*", ""]
    return "\n".join(lines) + "\n"


def write_report(summary: FitSummary, plots: list[str], out_dir: Path) -> Path:
    path = out_dir / "report.md"
    path.write_text(markdown(summary, plots))
    return path


def _variants_section(s: FitSummary) -> list[str]:
    groups, comparisons = s.groups or {}, s.comparisons or {}
    names = next(iter(groups.values()))["params"]
    lines = [f"## Variants of `{s.by}` (baseline `{s.baseline}`)", "",
             "| variant | " + " | ".join(names) + " | objective |", "|---" * (len(names) + 2) + "|"]
    for value, entry in groups.items():
        lines.append(f"| {value} | " + " | ".join(_fmt(v) for v in entry["params"].values()) + f" | {_fmt(entry['objective'])} |")
    lines += ["", "## Compute multipliers (compute the baseline needs to match the variant, ÷ C)", "",
              "| variant | C | multiplier | 95% interval |", "|---|---|---|---|"]
    for value, comp in comparisons.items():
        for row in comp["multiplier"]:
            interval = f"[{_fmt(row['low'])}, {_fmt(row['high'])}]" if "low" in row else "-"
            lines.append(f"| {value} | {_fmt(row['C'])} | {_fmt(row['multiplier'])} | {interval} |")
        where = ", ".join(_fmt(c) for c in comp["crossings_C"]) or "none in range"
        lines.append(f"\nCurves of `{value}` and the baseline cross at C = {where}.\n")
    return lines


def _fit_section(s: FitSummary) -> list[str]:
    lines = [f"## Parameters (variant `{s.variant}`)", ""]
    intervals = s.intervals or {}
    lines += ["| parameter | estimate | 95% interval | robust SE (p84 − p16)/2 |", "|---|---|---|---|"]
    for name, value in s.params.items():
        iv = intervals.get(name)
        cell = f"[{_fmt(iv['low'])}, {_fmt(iv['high'])}] | {_fmt(iv['se'])}" if iv else "- | -"
        note = " (fixed)" if name in (s.fixed or {}) else (" (tied)" if name in (s.tied or {}) else "")
        lines.append(f"| {name}{note} | {_fmt(value)} | {cell} |")
    kind = s.objective_kind or "huber"
    shape = "" if kind == "huber" else f", {kind}: over-predictions weighted {kind.partition(':')[2] or 'x10'}"
    shape += "" if (s.weight or "none") == "none" else f", points weighted by {s.weight}"
    lines += ["", f"Objective (sum of Huber, delta={s.huber_delta}{shape}): {s.objective:.9e}; "
              f"converged: {s.converged}; starts: {s.n_starts}; "
              f"fit time {s.fit_seconds} s.",
              f"Parameters at a bound: {', '.join(s.at_bound or []) or 'none'}; "
              f"parameters the objective is flat in: {', '.join(s.flat or []) or 'none'}."]
    if s.E_source is not None:
        lines.append(f"E fixed to {_fmt((s.fixed or {}).get('E'))}: {s.E_source}.")
    elif s.entropy is not None:
        lines.append(f"{s.entropy['bounds']} bounded below by {_fmt(s.entropy['value'])}: {s.entropy['source']}.")
    if s.bootstrap is not None:
        b = s.bootstrap
        lines.append(f"Intervals: percentile, over {b['resamples']} wild bootstrap replicates by run ({b['failed']} failed, counted beyond the ends).")
    if s.variant_selection is not None:
        sel = s.variant_selection
        lines += ["", f"## Variant selection ({sel['rule']})", "",
                  "| variant | mean absolute relative error | free parameters | fixed |", "|---|---|---|---|"]
        for name, entry in sel["validation"].items():
            if "mean_abs_rel_error" in entry:
                fixed = ", ".join(f"{k}={_fmt(v)}" for k, v in entry.get("fixed", {}).items())
                fixed += f" ({entry['E_source']})" if "E_source" in entry else ""
                lines.append(f"| {name} | {entry['mean_abs_rel_error']:.4%} | {entry['n_free']} |"
                             + (f" {fixed} |" if fixed else " - |"))
            else:
                lines.append(f"| {name} | skipped: {entry['skipped']} | - | - |")
        lines.append(f"\nKept `{sel['chosen']}`: {sel['why']}.")
    if s.derived is not None:
        lines += ["", "## Compute-optimal allocation (C = 6 N D)", "", "| quantity | estimate | 95% interval |", "|---|---|---|"]
        for name, value in s.derived.items():
            iv = intervals.get(name)
            cell = f"[{_fmt(iv['low'])}, {_fmt(iv['high'])}]" if iv else "-"
            lines.append(f"| {name} | {_fmt(value)} | {cell} |")
    seen = set()
    for name, entry in (s.derived_outside or {}).items():
        budget = name.partition("@")[2]
        if budget not in seen:  # one row per budget: its N_opt, D_opt, ratio and loss share the reason
            seen.add(budget)
            lines.append(f"| allocation at {budget} | not reported: {entry['why']} | - |")
    if s.allocation_skipped is not None:
        lines += ["", f"Compute-optimal allocation not reported: {s.allocation_skipped}."]
    if s.derived is not None:
        for approach, title in ((s.approach1, "Approach 1 (lowest loss per compute bin)"),
                                (s.approach2, "Approach 2 (IsoFLOP parabolas)")):
            if approach is not None:
                lines.append(f"\n{title}: N_opt ∝ C^{approach['a']:.4f}, D_opt ∝ C^{approach['b']:.4f} "
                             f"from {len(approach['minima'])} budgets.")
    return lines


def _holdout_section(s: FitSummary, holdout: list[dict]) -> list[str]:
    lines = ["", f"## Held-out points (`{s.holdout_rule}`)", "",
             "| run | loss | predicted | 95% prediction interval | relative error |", "|---|---|---|---|---|"]
    for row in holdout:
        band = f"[{_fmt(row['pi_low'])}, {_fmt(row['pi_high'])}]" if "pi_low" in row else "-"
        lines.append(f"| {row.get('run_id')} | {_fmt(row['loss'])} | {_fmt(row['predicted'])} | {band} | {row['rel_error']:+.4%} |")
    lines.append(f"\nMean absolute relative error: {s.mean_abs_rel_error:.4%}.")
    if s.prediction_interval is not None:
        pi = s.prediction_interval
        lines.append(f"Prediction intervals: {pi['method']}, {pi['resamples']} resamples; "
                     f"{pi['coverage']:.0%} of the held-out points lie inside"
                     + (f" (at least {pi['coverage_floor']:.0%} expected: {pi['level']:.0%} less "
                        f"{pi['allowance_se']:g} binomial standard errors over {pi['runs']} held-out run(s)); their median half-width is "
                        f"{pi['median_half_width']:.2%}, {pi['width_over_error']:.1f}x the mean error."
                        if "coverage_floor" in pi else "."))
    return lines
