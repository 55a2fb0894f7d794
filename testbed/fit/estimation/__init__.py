"""Estimation: robust multi-start fitting (estimate.py), the wild cluster bootstrap (bootstrap.py)
and the guards that keep reported numbers within what the data support (guards.py).
"""
