"""`testbed fit`: fit scaling laws to a sweep or a table; `testbed fit collect`: build the table.

Imports nothing heavy at module level so `testbed --help` stays instant.
"""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from testbed.fit.options import FitSummary

DESCRIPTION = """Its forms:
  testbed fit collect SWEEP_DIR [--out table.csv|table.parquet]
      turn a sweep's run directories (SWEEP_DIR/runs/<id>/, or any folder of run directories)
      into one tidy table of points: run, labels, N, D, U, compute, loss, point kind...
  testbed fit hparams [SWEEP_TABLE] [--columns lr=col,batch=col,loss=col] [--band 0.005]
          [--seq-len 2048] [--at N=1e9,D=1e11] [--out DIR]
      fit the optimal learning rate (c N^a D^b) and batch size in tokens (c D^b) to an
      LR x batch sweep, from the runs within --band of each (N, D) cell's best loss; without a
      table, the published Step Law rules (Li et al. 2025) are used
  testbed fit SWEEP_DIR_OR_TABLE --law NAME [--columns N=col,D=col,C=col,loss=col]
          [--holdout largest] [--bootstrap K] [--out DIR]
      fit a law (chinchilla, kaplan, power, data_constrained, vocab, farseer, annealing,
      multipower, or one that --import MODULE registers) and write DIR/fit.json, DIR/report.md
      and PNG plots.
  testbed fit SWEEP_DIR_OR_TABLE --law task --task NAME [--at N=1e9,D=2e10] [--chance 0.25]
          [--task-input ND|C] [--task-metric acc|acc_norm] [--bootstrap K] [--out DIR]
      the task law (OLMo ladder): the task's bpb against (N, D) or C, its accuracy against that
      bpb by a sigmoid, and the chained accuracy at each --at target (docs/fit.md).
  testbed fit SWEEP_DIR_OR_TABLE --law mixing [--target source/NAME/val_loss] [--variant regmix]
      data mixing laws (Ye et al.): each source's loss against the mixture weights, held-out
      mixtures predicted, the optimal mixture (docs/fit.md)."""


def _fixes(items: list[str] | None) -> dict[str, float]:
    from testbed.errors import TestbedError

    out = {}
    for item in items or []:
        name, _, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise TestbedError(f"--fix {item!r} is not NAME=NUMBER; write e.g. --fix E=1.69.")
    return out


def _budgets(text: str | None) -> list[float] | None:
    from testbed.errors import TestbedError

    if not text:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise TestbedError(f"--budgets {text!r} is not a comma-separated list of numbers; write e.g. 1e18,1e20.")


def _bounds(items: list[str] | None) -> dict[str, tuple[float, float]]:
    from testbed.errors import TestbedError

    out = {}
    for item in items or []:
        name, _, span = item.partition("=")
        low, sep, high = span.partition(":")
        try:
            if not sep:
                raise ValueError
            out[name.strip()] = (float(low), float(high))
        except ValueError:
            raise TestbedError(f"--bounds {item!r} is not NAME=LOW:HIGH; write e.g. --bounds alpha=0.1:0.8.") from None
    return out


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "fit", help="fit scaling laws to a sweep or table (or: fit collect SWEEP_DIR)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", help="a sweep directory, a .csv/.parquet table, or the word 'collect' or 'hparams'")
    parser.add_argument("sweep_dir", nargs="?", help="with 'collect': the sweep directory to tabulate; with 'hparams': the LR x batch sweep table")
    parser.add_argument("--out", help="fit: output directory (default fit_out); collect: table path (.csv or .parquet, default SWEEP_DIR/points.csv)")
    parser.add_argument("--law", default="chinchilla", help="law to fit: chinchilla, kaplan, power, data_constrained, vocab, farseer, annealing, multipower (default chinchilla)")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import this module first, so the laws it registers can be named by --law, and the schedules "
                             "it registers can say the phases of checkpoints that did not record theirs (repeatable)")
    parser.add_argument("--columns", help="map table columns to the law's names, e.g. N=params,D=tokens,C=flops,loss=val_loss (D = C/(6N) when only C is given)")
    parser.add_argument("--holdout", help="validate on held-out runs: largest (top 10%% by compute), largest:K, largest-N or largest-D "
                        "(the runs of the largest model sizes / token counts), or a rule like 'N>1e8' ('run_fraction>0.8': late checkpoints)")
    parser.add_argument("--bootstrap", type=int, default=0, help="number of bootstrap replicates for intervals (a wild bootstrap by run; default 0: none)")
    parser.add_argument("--variant", default="free", help="law variant: free, tied (alpha=beta), fixed_E (with --fix E=... or the data's entropy), or auto (every variant the data allow, "
                        "validated on the training runs that are largest along the --holdout axis; the lowest error wins, the simpler within 5%%)")
    parser.add_argument("--fix", action="append", metavar="NAME=VALUE", help="fix a parameter for a fixed_* variant, e.g. --fix E=1.69 (repeatable)")
    parser.add_argument("--delta", type=float, default=None,
                        help="Huber delta on log-loss residuals (default 1e-3; with --law task 1.0: least squares)")
    parser.add_argument("--objective", default="huber",
                        help="huber (default), or asymmetric[:W]: an over-prediction counts W times (default 10), so the fit follows the lower envelope of the points")
    parser.add_argument("--weight", default="none", choices=["none", "compute"],
                        help="point weights: none (default) or compute (each point in proportion to its C = 6ND, so the largest runs dominate)")
    parser.add_argument("--points", default="final", choices=["final", "all", "ema", "average"],
                        help="final: final and cooldown points, or the last point of each run of a table (default); all: also intermediate checkpoints; "
                        "ema: the EMA of the weights at each evaluation (train.ema_decay), average: averaged checkpoints (testbed average), "
                        "each in place of a cooldown")
    parser.add_argument("--skip-fraction", type=float, default=0.1, help="with --points all: drop checkpoints in this first fraction of each run (default 0.1)")
    parser.add_argument("--where", action="append", metavar="RULE",
                        help="keep only rows matching a rule, e.g. 'C>=2.18e17', \"label_norm=='pre' or N<1e8\", 'label_lr in [1e-3, 3e-3]'; "
                        "repeated rules combine with and (dropped rows are counted in the report)")
    parser.add_argument("--train-until", type=float, metavar="FRACTION",
                        help="fit only the training runs' checkpoints up to this fraction of their run (with --points all)")
    parser.add_argument("--score-after", type=float, metavar="FRACTION",
                        help="score only the held-out runs' checkpoints past this fraction of their run (with --points all)")
    parser.add_argument("--bounds", action="append", metavar="NAME=LOW:HIGH",
                        help="bound a parameter in its reported units, e.g. --bounds alpha=0.1:0.8 (repeatable)")
    parser.add_argument("--allocation", default="auto", choices=["auto", "yes", "no"],
                        help="compute-optimal allocation, Approaches 1-2 and IsoFLOP plots: auto (only for IsoFLOP-shaped data, default), yes, no")
    parser.add_argument("--budgets", help="compute budgets for allocations and multipliers, comma-separated (default: the largest compute, x10, x100)")
    parser.add_argument("--by", help="compare variants: fit per value of this column (e.g. label_norm_placement) and report compute multipliers")
    parser.add_argument("--baseline", help="with --by: the baseline value (default: the first in sort order)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the bootstrap (default 0)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress on stderr (by default: a bar on a terminal, else a line every 30 s "
                             "of a long fit or bootstrap; TESTBED_PROGRESS_INTERVAL=SECONDS)")
    parser.add_argument("--band", type=float, default=0.005,
                        help="hparams: keep the runs within this relative loss of each (N, D) cell's best (default 0.005; 0: the best run only)")
    parser.add_argument("--seq-len", type=int, default=1,
                        help="hparams: the batch column counts sequences of this many tokens (default 1: it counts tokens)")
    parser.add_argument("--at", "--predict", dest="at", action="append", metavar="N=VALUE,D=VALUE",
                        help="hparams: predict the optimal LR and batch at this model size and token count; --law task: "
                             "predict the task loss and accuracy there (C=VALUE with --task-input C) (repeatable)")
    parser.add_argument("--task", help="--law task: the task whose task/NAME/bpb and task/NAME/acc columns are fitted")
    parser.add_argument("--task-metric", default="acc", choices=["acc", "acc_norm"],
                        help="--law task: the accuracy column, task/NAME/acc (default) or task/NAME/acc_norm")
    parser.add_argument("--task-input", default="ND", choices=["ND", "C"],
                        help="--law task: step 1 fits the task loss against N and D (default) or against compute C")
    parser.add_argument("--chance", type=float,
                        help="--law task: fix the sigmoid's floor b to this chance level (e.g. 0.25 for four choices)")
    parser.add_argument("--target", help="--law mixing: the loss column to fit, e.g. source/web/val_loss "
                        "(default: every source/<name>/val_loss column); its optimal mixture is reported")
    parser.set_defaults(func=handler)


def handler(args) -> int:
    if args.source == "collect":
        return _collect(args)
    if args.source == "hparams":
        return _hparams(args)
    from testbed.errors import TestbedError

    if args.sweep_dir:
        raise TestbedError(f"unexpected second argument {args.sweep_dir!r}; only 'collect' takes a sweep directory after it.")
    if args.law == "task":
        return _task_law(args)
    if args.law == "mixing":  # data mixing laws (testbed/fit/laws/mixing.py)
        from testbed.fit.laws import mixing

        return mixing.run_cli(args)
    return _fit(args)


def _collect(args) -> int:
    from pathlib import Path

    from testbed.errors import TestbedError
    from testbed.fit.points.collect import collect_runs, write_table

    if not args.sweep_dir:
        raise TestbedError("fit collect needs a sweep directory; run testbed fit collect SWEEP_DIR.")
    from testbed.registry import import_modules

    import_modules(args.imports, "--import")  # a user schedule asked for an older checkpoint's phase
    table = collect_runs(args.sweep_dir)
    out = write_table(table, args.out or Path(args.sweep_dir) / "points.csv")
    kinds = table["point_kind"].value_counts().to_dict()
    print(f"{len(table)} points from {table['run_id'].nunique()} runs ({kinds}) -> {out}")
    return 0


def _sizes(item: str) -> tuple[float, float]:
    values = _target(item, ({"N", "D"},), "N=VALUE,D=VALUE; write e.g. --at N=1e9,D=1e11")
    return values["N"], values["D"]


def _hparams(args) -> int:
    import json
    from pathlib import Path

    import pandas as pd

    from testbed.fit.laws import steplaw
    from testbed.fit.points.table import apply_columns, parse_columns, read_source

    at = [_sizes(item) for item in args.at or []]
    if args.sweep_dir and Path(args.sweep_dir).is_dir():
        # A sweep directory: each run's final point, with the run's planned tokens as D so the
        # batch sizes of one (N, D) cell share it (their step counts round D differently).
        runs = read_source(args.sweep_dir)
        runs = runs.loc[runs["point_kind"] == "final"]
        frame = pd.DataFrame({"N": runs["N_non_embedding"], "D": runs["planned_tokens"], "lr": runs["peak_lr"],
                              "batch": runs["batch_tokens"], "loss": runs["loss"]})
        frame = apply_columns(frame, parse_columns(args.columns))
    elif args.sweep_dir:
        frame = apply_columns(read_source(args.sweep_dir), parse_columns(args.columns))
    if args.sweep_dir:
        if "batch" in frame.columns:
            frame["batch"] = frame["batch"] * args.seq_len
        rules = steplaw.fit_rules(frame, args.band)
        source = (f"fitted to {args.sweep_dir}: {rules['runs_in_band']} runs within {args.band:.2%} of the best "
                  f"of {rules['cells']} (N, D) cells")
    else:
        rules = dict(steplaw.PUBLISHED)
        source = "published Step Law rules (Li et al. 2025)"
    print(source)
    warnings = list((rules.get("skipped") or {}).values())  # a rule whose axis never varies
    for warning in warnings:
        print(f"warning: {warning}")
    print(f"lr_opt = {rules['lr_coef']:.4g} * N^{rules['lr_N_exp']:.4f} * D^{rules['lr_D_exp']:.4f}"
          if rules["lr_coef"] is not None else "lr_opt: not fitted (lr never varies)")
    print(f"batch_opt (tokens) = {rules['bs_coef']:.4g} * D^{rules['bs_D_exp']:.4f}"
          if rules["bs_coef"] is not None else "batch_opt: not fitted (batch never varies)")
    predictions = []
    for n, d in at:
        lr, batch = steplaw.predict(rules, n, d)
        predictions.append({"N": n, "D": d, "lr": None if lr is None else float(lr),
                            "batch_tokens": None if batch is None else float(batch)})
        print(f"N={n:.4g}, D={d:.4g}: lr {'not fitted' if lr is None else f'{float(lr):.4g}'}, batch "
              f"{'not fitted' if batch is None else f'{float(batch):.4g} tokens'}")
    if args.out:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "hparams.json").write_text(json.dumps({"source": source, "rules": rules, "warnings": warnings,
                                                           "predictions": predictions}, indent=2))
        print(f"written: {out_dir / 'hparams.json'}")
        if args.sweep_dir and not args.no_plots:  # loss against LR per (N, D) cell, the rule's lr_opt marked
            from testbed.fit.reporting.lr_plots import hparams_plot

            print(f"written: {hparams_plot(frame, rules, out_dir / 'lr_sensitivity.png')}")
    return 0


def _check_numbers(args) -> None:
    import math

    from testbed.errors import TestbedError

    if args.delta is not None and not (math.isfinite(args.delta) and args.delta > 0):
        raise TestbedError(f"--delta {args.delta} must be a positive number (the Huber threshold on "
                           f"log-loss residuals); leave it out for the default 1e-3.")
    if args.bootstrap < 0:
        raise TestbedError(f"--bootstrap {args.bootstrap} must be 0 (no intervals) or a positive number "
                           f"of resamples, e.g. --bootstrap 200.")


def _fit(args) -> int:
    from pathlib import Path

    _check_numbers(args)
    from testbed.registry import import_modules

    import_modules(args.imports, "--import")
    from testbed import progress
    from testbed.fit.analysis import FitOptions, analyse
    from testbed.fit.reporting.report import write_json, write_report

    options = FitOptions(
        law=args.law, columns=args.columns, holdout=args.holdout, bootstrap=args.bootstrap,
        variant=args.variant, fix=_fixes(args.fix), delta=1e-3 if args.delta is None else args.delta, points=args.points,
        skip_fraction=args.skip_fraction, where=args.where, budgets=_budgets(args.budgets),
        by=args.by, baseline=args.baseline, seed=args.seed, train_until=args.train_until,
        score_after=args.score_after, bounds=_bounds(args.bounds), allocation=args.allocation,
        objective=args.objective, weight=args.weight,
    )
    with progress.enabled(not args.quiet):
        analysis = analyse(args.source, options)
    out_dir = Path(args.out or "fit_out")
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = []
    if not args.no_plots:
        from testbed.fit.reporting.plots import write_plots

        plots = write_plots(analysis, out_dir)
    summary = analysis.summary
    summary.plots = [Path(p).name for p in plots]
    write_json(summary, out_dir)
    write_report(summary, plots, out_dir)
    params = ", ".join(f"{k}={v:.5g}" for k, v in summary.params.items())
    print(f"{analysis.law.formula}")
    if summary.variant_selection is not None:
        selection = summary.variant_selection
        print(f"variant selection ({selection['rule']}):")
        for name, entry in selection["validation"].items():
            error = f"{entry['mean_abs_rel_error']:.4%}" if "mean_abs_rel_error" in entry else f"skipped: {entry['skipped']}"
            if entry.get("fixed"):
                error += " (" + ", ".join(f"{k}={v:.4g}" for k, v in entry["fixed"].items()) + (
                    f"; {entry['E_source']}" if "E_source" in entry else "") + ")"
            print(f"  {name}: {error}")
        print(f"  kept {selection['chosen']}: {selection['why']}")
    print(f"fitted ({summary.variant}): {params}; objective {summary.objective:.6e}")
    if summary.rows and "line" in summary.rows:
        print(summary.rows["line"])
    intervals = {name: i for name, i in (summary.intervals or {}).items()
                 if name not in (summary.fixed or {}) and math.isfinite(i.get("low", math.nan))}
    if intervals:  # the estimates a reader quotes, each with its 95% interval
        print("95% intervals (wild bootstrap by run): " + ", ".join(
            f"{name} {i['estimate']:.4g} [{i['low']:.4g}, {i['high']:.4g}]" for name, i in intervals.items()))
    floor = floor_line(summary)
    if floor:
        print(floor)
    if summary.mean_abs_rel_error is not None and summary.holdout is not None:
        runs = len({str(row.get("run_id")) for row in summary.holdout})
        print(f"held-out ({args.holdout}): mean absolute relative error {summary.mean_abs_rel_error:.3%} "
              f"over {len(summary.holdout)} points of {runs} run(s)")
    if summary.prediction_interval is not None:
        print(coverage_line(summary.prediction_interval))
    for warning in summary.warnings:
        print(f"warning: {warning}")
    print(f"report: {out_dir / 'report.md'}; plots: {', '.join(str(out_dir / Path(p).name) for p in plots) or 'none'}")
    return 0


def _target(item: str, accepted: tuple[set[str], ...] = ({"N", "D"}, {"C"}),
            form: str = "N=VALUE,D=VALUE or C=VALUE; write e.g. --at N=1e9,D=2e10") -> dict[str, float]:
    """One --at value as {name: number}, its names one of the `accepted` sets."""
    from testbed.errors import TestbedError

    values = {}
    for part in item.split(","):
        name, _, value = part.partition("=")
        try:
            values[name.strip()] = float(value)
        except ValueError:
            values = {}
            break
    if set(values) not in accepted:
        raise TestbedError(f"--at {item!r} is not {form}.")
    return values


def _task_law(args) -> int:
    """`testbed fit SOURCE --law task --task NAME`: the two-step task law (testbed/fit/tasks.py)."""
    import json
    from pathlib import Path

    from testbed.errors import TestbedError

    _check_numbers(args)
    if not args.task:
        raise TestbedError("--law task needs --task NAME (the task whose task/NAME/bpb and task/NAME/acc columns "
                           "are fitted).")
    # Options of the other laws that the task law does not apply: refused, not silently ignored.
    unused = {"--holdout": args.holdout, "--where": args.where, "--by": args.by, "--budgets": args.budgets,
              "--weight": args.weight != "none", "--variant": args.variant != "free", "--fix": args.fix}
    given = [flag for flag, value in unused.items() if value]
    if given:
        raise TestbedError(f"--law task does not take {', '.join(given)}; leave {'it' if len(given) == 1 else 'them'} "
                           f"out (the task law fits both steps on every point; docs/fit.md)")
    from testbed import progress
    from testbed.fit import tasks
    from testbed.fit.reporting.report import _plain

    targets = [_target(item) for item in args.at or []]
    points = tasks.load_task_points(args.source, args.task, metric=args.task_metric, inputs=args.task_input,
                                    columns=args.columns, points=args.points, skip_fraction=args.skip_fraction)
    with progress.enabled(not args.quiet):
        fitted = tasks.fit_task(points.frame, args.task, metric=args.task_metric, inputs=args.task_input,
                                chance=args.chance, delta=1.0 if args.delta is None else args.delta,
                                bootstrap=args.bootstrap, seed=args.seed)
    predictions = tasks.predict(fitted, targets)
    lines = tasks.report_lines(fitted, predictions)
    print("\n".join(line.removeprefix("# ") for line in lines))
    out_dir = Path(args.out or "fit_out")
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = tasks.summary(fitted, predictions)
    summary["dropped"] = points.dropped
    (out_dir / "fit.json").write_text(json.dumps(_plain(summary), indent=2) + "\n")
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    print(f"report: {out_dir / 'report.md'}; fit: {out_dir / 'fit.json'}")
    return 0


def floor_line(summary: FitSummary) -> str | None:
    """Where the irreducible loss E came from: fixed (and why), or bounded below by the data's entropy."""
    fixed = summary.fixed or {}
    if "E" in fixed:
        return f"E fixed to {fixed['E']:.4g}: {summary.E_source or '--fix'}"
    entropy = summary.entropy
    if entropy:
        return (f"{entropy['bounds']} bounded below by {entropy['value']:.4g}: {entropy['source']}; "
                f"--variant fixed_E (or --fix {entropy['bounds']}={entropy['value']:.4g}) fixes it there")
    return None


def coverage_line(pi: dict) -> str:
    """The held-out calibration of the prediction intervals, in one line."""
    return (f"{pi['level']:.0%} prediction intervals hold {pi['inside']} of {pi['points']} held-out points "
            f"({pi['coverage']:.0%}; at least {pi['coverage_floor']:.0%} expected: {pi['level']:.0%} less "
            f"{pi['allowance_se']:g} binomial standard errors over {pi['runs']} run(s)); median half-width "
            f"{pi['median_half_width']:.2%}, "
            f"{pi['width_over_error']:.1f}x the mean held-out error")
