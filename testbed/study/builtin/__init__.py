"""The built-in studies; importing this package registers them in testbed.study.base.STUDIES."""

from testbed.study.builtin import (  # noqa: F401
    ablation,
    annealing,
    chinchilla,
    mixture,
    optimizers,
    power,
    repetition,
    shape,
    vocab,
    wsd,
)
