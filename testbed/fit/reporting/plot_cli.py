"""`testbed plot RUN_OR_SWEEP [--out DIR]`: the loss curves of a run, or of every run of a sweep
(testbed/fit/reporting/curves_plot.py draws them).

Imports nothing heavy at module level so `testbed --help` stays instant.
"""

from __future__ import annotations

from pathlib import Path

DPI = 110  # testbed.fit.reporting.style.DPI, without importing numpy and matplotlib here


def register(sub) -> None:
    p = sub.add_parser("plot", help="draw the loss curves of a run or of every run of a sweep",
                       description="Draw loss against tokens and against FLOPs (training loss a line, "
                                   "validation loss a marker) for a run directory, or for every run of a "
                                   "sweep directory coloured by model size: DIR/loss_vs_tokens.png and "
                                   "DIR/loss_vs_flops.png.")
    p.add_argument("path", metavar="RUN_OR_SWEEP", help="a run directory, a sweep directory or a folder of runs")
    p.add_argument("--out", help="output folder (default: RUN_OR_SWEEP/plots)")
    p.add_argument("--dpi", type=int, default=DPI, help=f"resolution of the PNGs (default {DPI})")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args) -> int:
    from testbed.errors import TestbedError
    from testbed.fit.reporting.curves_plot import plot_curves

    root = Path(args.path)
    if root.exists() and not root.is_dir():
        raise TestbedError(f"{args.path!r} is a file; pass a run directory or a sweep directory")
    if args.dpi < 20 or args.dpi > 600:
        raise TestbedError(f"--dpi {args.dpi} is outside 20-600; 100 suits a page, 300 a print")
    written = plot_curves(root, args.out or root / "plots", args.dpi)
    print("wrote " + ", ".join(written))
    return 0
