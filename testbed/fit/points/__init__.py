"""The points to fit: collected from a sweep (collect.py), loaded from a table and mapped to a
law's names (table.py), and selected by row rules (rules.py).
"""
