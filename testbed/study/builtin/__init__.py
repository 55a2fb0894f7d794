"""The built-in studies; importing this package registers them in testbed.study.base.STUDIES."""

from testbed.study.builtin import (  # noqa: F401
    ablation,
    annealing,
    chinchilla,
    discrepancy,
    mixture,
    mup_transfer,
    optimizers,
    power,
    repetition,
    shape,
    stability,
    vocab,
    wsd,
)
