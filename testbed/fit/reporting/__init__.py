"""Reporting: fit.json and report.md (report.py), the fit's plots and shared plot conventions
(plots.py), loss curves of runs (curves_plot.py) and `testbed plot` (plot_cli.py).
"""
