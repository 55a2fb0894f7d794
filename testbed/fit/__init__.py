"""Scaling-law fitting: collect run tables, fit laws robustly, validate and report.

    laws/        what a law is (base.py) and one module per law; `testbed.fit.laws` is the
                 import point for your own law (Law, Param, Variant, register)
    points/      the points to fit: collect a sweep, load a table, select rows
    estimation/  robust multi-start fitting, the wild cluster bootstrap, guards on the numbers
    protocols/   holdout, variant selection, Approaches 1-2, allocation, ablation variants
    reporting/   fit.json and report.md, plots, `testbed plot`
    options.py   what a fit is asked for (FitOptions) and what it found (FitSummary, Analysis)
    analysis.py  one fit from start to finish; cli.py is `testbed fit`

Modules are small and imported lazily by the CLI; see docs/fit.md.
"""
