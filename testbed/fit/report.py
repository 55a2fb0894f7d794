"""Write fit.json and report.md for an analysis."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


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


def write_json(summary: dict, out_dir: Path) -> Path:
    path = out_dir / "fit.json"
    path.write_text(json.dumps(_plain(summary), indent=2) + "\n")
    return path


def markdown(summary: dict, plots: list[str]) -> str:
    lines = [f"# Fit of the {summary['law']} law", "", f"`{summary['formula']}`", ""]
    lines.append(f"{summary['n_points']} points from {summary['n_runs']} runs.")
    if "line" in summary.get("rows", {}):
        lines.append(summary["rows"]["line"][0].upper() + summary["rows"]["line"][1:] + ".")
    if summary.get("dropped"):
        lines.append("Rows dropped: " + "; ".join(f"{k}: {v}" for k, v in summary["dropped"].items()) + ".")
    for warning in summary.get("warnings", []):
        lines.append(f"\n> Warning: {warning}")
    lines.append("")
    if "groups" in summary:
        lines += [f"## Variants of `{summary['by']}` (baseline `{summary['baseline']}`)", "",
                  "| variant | " + " | ".join(next(iter(summary["groups"].values()))["params"]) + " | objective |",
                  "|---" * (len(next(iter(summary["groups"].values()))["params"]) + 2) + "|"]
        for value, entry in summary["groups"].items():
            lines.append(f"| {value} | " + " | ".join(_fmt(v) for v in entry["params"].values()) + f" | {_fmt(entry['objective'])} |")
        lines += ["", "## Compute multipliers (compute the baseline needs to match the variant, ÷ C)", "",
                  "| variant | C | multiplier | 95% interval |", "|---|---|---|---|"]
        for value, comp in summary["comparisons"].items():
            for row in comp["multiplier"]:
                interval = f"[{_fmt(row['low'])}, {_fmt(row['high'])}]" if "low" in row else "-"
                lines.append(f"| {value} | {_fmt(row['C'])} | {_fmt(row['multiplier'])} | {interval} |")
            where = ", ".join(_fmt(c) for c in comp["crossings_C"]) or "none in range"
            lines.append(f"\nCurves of `{value}` and the baseline cross at C = {where}.\n")
    else:
        lines += [f"## Parameters (variant `{summary['variant']}`)", ""]
        intervals = summary.get("intervals", {})
        lines += ["| parameter | estimate | 95% interval | robust SE (p84 − p16)/2 |", "|---|---|---|---|"]
        for name, value in summary["params"].items():
            iv = intervals.get(name)
            cell = f"[{_fmt(iv['low'])}, {_fmt(iv['high'])}] | {_fmt(iv['se'])}" if iv else "- | -"
            note = " (fixed)" if name in summary.get("fixed", {}) else (" (tied)" if name in summary.get("tied", {}) else "")
            lines.append(f"| {name}{note} | {_fmt(value)} | {cell} |")
        kind = summary.get("objective_kind", "huber")
        shape = "" if kind == "huber" else f", {kind}: over-predictions weighted {kind.partition(':')[2] or 'x10'}"
        shape += "" if summary.get("weight", "none") == "none" else f", points weighted by {summary['weight']}"
        lines += ["", f"Objective (sum of Huber, delta={summary.get('huber_delta')}{shape}): {summary['objective']:.9e}; "
                  f"converged: {summary['converged']}; starts: {summary.get('n_starts')}; "
                  f"fit time {summary.get('fit_seconds')} s.",
                  f"Parameters at a bound: {', '.join(summary['at_bound']) or 'none'}; "
                  f"parameters the objective is flat in: {', '.join(summary.get('flat', [])) or 'none'}."]
        if "E_source" in summary:
            lines.append(f"E fixed to {_fmt(summary['fixed'].get('E'))}: {summary['E_source']}.")
        elif "entropy" in summary:
            entropy = summary["entropy"]
            lines.append(f"{entropy['bounds']} bounded below by {_fmt(entropy['value'])}: {entropy['source']}.")
        if "bootstrap" in summary:
            b = summary["bootstrap"]
            lines.append(f"Intervals: percentile, over {b['resamples']} wild bootstrap replicates by run ({b['failed']} failed, counted beyond the ends).")
        if "variant_selection" in summary:
            sel = summary["variant_selection"]
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
        if "derived" in summary:
            lines += ["", "## Compute-optimal allocation (C = 6 N D)", "", "| quantity | estimate | 95% interval |", "|---|---|---|"]
            for name, value in summary["derived"].items():
                iv = intervals.get(name)
                cell = f"[{_fmt(iv['low'])}, {_fmt(iv['high'])}]" if iv else "-"
                lines.append(f"| {name} | {_fmt(value)} | {cell} |")
        seen = set()
        for name, entry in summary.get("derived_outside", {}).items():
            budget = name.partition("@")[2]
            if budget not in seen:  # one row per budget: its N_opt, D_opt, ratio and loss share the reason
                seen.add(budget)
                lines.append(f"| allocation at {budget} | not reported: {entry['why']} | - |")
        if "allocation_skipped" in summary:
            lines += ["", f"Compute-optimal allocation not reported: {summary['allocation_skipped']}."]
        if "derived" in summary:
            for key, title in (("approach1", "Approach 1 (lowest loss per compute bin)"),
                               ("approach2", "Approach 2 (IsoFLOP parabolas)")):
                if key in summary:
                    lines.append(f"\n{title}: N_opt ∝ C^{summary[key]['a']:.4f}, D_opt ∝ C^{summary[key]['b']:.4f} "
                                 f"from {len(summary[key]['minima'])} budgets.")
    if "holdout" in summary:
        lines += ["", f"## Held-out points (`{summary.get('holdout_rule')}`)", "",
                  "| run | loss | predicted | 95% prediction interval | relative error |", "|---|---|---|---|---|"]
        for row in summary["holdout"]:
            pi = f"[{_fmt(row['pi_low'])}, {_fmt(row['pi_high'])}]" if "pi_low" in row else "-"
            lines.append(f"| {row.get('run_id')} | {_fmt(row['loss'])} | {_fmt(row['predicted'])} | {pi} | {row['rel_error']:+.4%} |")
        lines.append(f"\nMean absolute relative error: {summary['mean_abs_rel_error']:.4%}.")
        if "prediction_interval" in summary:
            pi = summary["prediction_interval"]
            lines.append(f"Prediction intervals: {pi['method']}, {pi['resamples']} resamples; "
                         f"{pi['coverage']:.0%} of the held-out points lie inside"
                         + (f" (at least {pi['coverage_floor']:.0%} expected: {pi['level']:.0%} less "
                            f"{pi['allowance_se']:g} binomial standard errors over {pi['runs']} held-out run(s)); their median half-width is "
                            f"{pi['median_half_width']:.2%}, {pi['width_over_error']:.1f}x the mean error."
                            if "coverage_floor" in pi else "."))
    if plots:
        from testbed.fit.plots import CAPTIONS

        lines += ["", "## Plots", ""]
        for plot in plots:
            lines += [f"![{Path(plot).stem}]({Path(plot).name})", ""]
            if Path(plot).stem in CAPTIONS:
                lines += [f"*{CAPTIONS[Path(plot).stem]}*", ""]
    return "\n".join(lines) + "\n"


def write_report(summary: dict, plots: list[str], out_dir: Path) -> Path:
    path = out_dir / "report.md"
    path.write_text(markdown(summary, plots))
    return path
