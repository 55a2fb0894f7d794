"""The built-in studies; importing this package registers them in testbed.study.base.STUDIES."""

from testbed.study.builtin import ablation, annealing, chinchilla, power, repetition, shape, vocab, wsd  # noqa: F401
