"""Protocols a fit is judged or used by: held-out validation (holdout.py), Chinchilla's
Approaches 1 and 2 (approaches.py), compute-optimal allocation (allocation.py) and ablation
variants compared through their fitted laws (variants.py).
"""
