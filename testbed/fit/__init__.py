"""Scaling-law fitting: collect run tables, fit laws robustly, validate and report.

Modules are small and imported lazily by the CLI; see docs/fit.md.
"""
