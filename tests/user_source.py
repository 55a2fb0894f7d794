"""A data source defined outside the package, with a setting of its own, loaded by a config's
`imports: [user_source]` (tests/test_data_sources.py, docs/data.md): tokens counting up modulo
`data.source_options.period`, each window starting where its index and split put it. Every token
follows from the one before, so a model learns the stream in a few steps."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from testbed.data.loader import DATA_SOURCES, DataSource
from testbed.registry import Options


@dataclass(frozen=True)
class CountingOptions(Options):
    period: int = 8  # the tokens are 0..period-1: the vocabulary

    def check(self):
        self.require(self.period >= 2, "period", "set it to an integer of at least 2, e.g. 8")


@DATA_SOURCES.register("test_counting", options=CountingOptions)
class CountingSource(DataSource):
    def __init__(self, config, options: CountingOptions):
        self.seq_len = config.data.seq_len
        self.seed = config.data.seed
        self.period = options.period

    @classmethod
    def vocab_size(cls, config, options: CountingOptions) -> int:
        return options.period

    def num_windows(self, split="train"):
        return None  # unlimited

    def windows(self, indices, split="train"):
        # A pure function of (index, split): resuming reads what an uninterrupted run would.
        offset = 0 if split == "train" else 1
        starts = (np.asarray(indices, dtype=np.int64) * 3 + offset + self.seed) % self.period
        return (starts[:, None] + np.arange(self.seq_len + 1)) % self.period

    def fingerprint(self):
        return f"counting-p{self.period}-s{self.seed}"
