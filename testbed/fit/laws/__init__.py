"""Scaling laws: what a law is (base.py), the classic ones (classic.py: Chinchilla, Kaplan, power)
and one module per published law, each registering itself in `LAWS` on import.

This package is the one import point for laws, the fitter's and a user's own alike:
`from testbed.fit.laws import Law, Param, Variant, register`. Importing it loads every built-in
law once; the law modules import from testbed.fit.laws.base, never from here.
"""

from testbed.fit.laws import annealing, datacon, farseer, multipower, vocab  # noqa: F401  (register on import)
from testbed.fit.laws.base import (
    LAWS,
    Law,
    Param,
    Variant,
    features,
    get_law,
    law_inputs,
    needed_columns,
    register,
)
from testbed.fit.laws.classic import CHINCHILLA, KAPLAN, POWER

__all__ = ["CHINCHILLA", "KAPLAN", "LAWS", "POWER", "Law", "Param", "Variant", "features", "get_law",
           "law_inputs", "needed_columns", "register"]
