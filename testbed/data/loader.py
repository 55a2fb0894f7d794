"""Deterministic, resumable batches: the batch of step k is a pure function of (seed, k).

A *source* cuts its token stream into windows of seq_len + 1 tokens (inputs are tokens 0..T-1,
targets 1..T). Sources are registered in DATA_SOURCES and named by `data.source` (DataSource says
what one answers): the built-in synthetic language (unlimited, every window an independent
sequence from the fixed start), prepared token shards (`testbed data prepare`), uniform random
tokens (speed benchmarks), and any a user registers (docs/data.md, "Your own data source").

Order of training windows:
- without repetition (data.unique_tokens unset), window j of the run is the j-th window of a
  seeded permutation of the corpus (shards) or simply the j-th sequence of the synthetic
  stream; no window is ever used twice, and asking for more than the corpus holds is an error;
- with U = data.unique_tokens, the pool is the first U // seq_len windows of that same order;
  epoch e visits the pool in a permutation seeded by (seed, e), so every epoch is reshuffled.

Because position j of the run maps to a window without any state, resuming at step k gives
exactly the batches an uninterrupted run would have seen, across epoch boundaries, and the
global batch is the same whatever the number of processes (each takes a contiguous slice).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from testbed.config import Config, build_dataclass, source_name
from testbed.data.mixture import MixtureOptions, MixtureSource
from testbed.errors import ConfigError, TestbedError
from testbed.registry import Options, Registry

TRAIN, VALIDATION = "train", "validation"


class DataSource:
    """What the loader reads windows from; register a subclass in DATA_SOURCES under the name
    `data.source` gives (docs/data.md, "Your own data source"). The one description of the
    interface the trainer, evaluation and planning rely on:

    - `from_config(config, options)` (classmethod): the source of a resolved config. `options` is
      the validated `Options` dataclass the source registered (`data.source_options.FIELD`), None
      when it registered none. The default calls `cls(config)`, or `cls(config, options=options)`.
    - `vocab_size(config, options)` (classmethod): the vocabulary the tokens are drawn from,
      without building the source: the run is planned (model size, FLOPs) before any data are read.
    - `seq_len`: tokens per training sequence; every window holds seq_len + 1 of them.
    - `num_windows(split)`: how many windows the split ("train" or "validation") holds; None when
      unlimited (then every index is valid).
    - `windows(indices, split)`: integer array [len(indices), seq_len + 1], a pure function of
      (index, split), so that a resumed run reads exactly what an uninterrupted one would.
    - `window_bytes(indices, split)`: int64 [len(indices)], the UTF-8 bytes each window's targets
      stand for (bits per byte); seq_len for tokens that are not text.
    - `fingerprint()`: a short string naming the data exactly (run.json records it).
    - optional: `has_optimum = True` with `optimal_nats(windows)`, the exact -ln p of each
      window's targets under the true distribution (the loss floor); `text_tokenizer()`, the
      tokenizer the tokens were made with (evaluation tasks need it; a source without the
      method has none); `validation_groups()` -> {name: (weight, indices)}: the validation set
      as named groups of validation indices with weights summing to 1 (the source reads
      data.val_sequences itself). Evaluation then reports each group's source/NAME/val_loss and
      source/NAME/val_bpb, and val_loss, val_bpb as their weighted means (docs/data.md,
      "Mixtures"); a source without it is evaluated on the first data.val_sequences windows.
    """

    seq_len: int
    has_optimum: bool = False

    @classmethod
    def from_config(cls, config: Config, options: Options | None = None) -> DataSource:
        return cls(config) if options is None else cls(config, options=options)  # type: ignore[call-arg]

    @classmethod
    def vocab_size(cls, config: Config, options: Options | None = None) -> int:
        raise NotImplementedError(f"{cls.__qualname__} does not say its vocabulary; define the "
                                  f"classmethod vocab_size(config, options)")

    def num_windows(self, split: str = TRAIN) -> int | None:
        raise NotImplementedError

    def windows(self, indices: np.ndarray, split: str = TRAIN) -> np.ndarray:
        raise NotImplementedError

    def window_bytes(self, indices: np.ndarray, split: str = TRAIN) -> np.ndarray:
        return np.full(len(indices), self.seq_len, dtype=np.int64)

    def fingerprint(self) -> str:
        raise NotImplementedError

    def optimal_nats(self, windows: np.ndarray) -> np.ndarray:
        # Read only where has_optimum is True, which a source sets when it defines this.
        raise NotImplementedError(f"{type(self).__qualname__} has no known optimum (has_optimum is False)")


def _check_source(name: str, obj: Any) -> None:
    # The loader and the planner call these two; a source without them would fail only when a
    # run starts, far from the line that registered it.
    if not all(callable(getattr(obj, attr, None)) for attr in ("from_config", "vocab_size")):
        raise ConfigError(f"data source {name!r}: {obj!r} has no from_config and vocab_size; register a "
                          f"subclass of testbed.data.loader.DataSource")


DATA_SOURCES = Registry("data source", "data.source", check=_check_source)


@DATA_SOURCES.register("synthetic")
class SyntheticSource(DataSource):
    """The built-in synthetic language; its tokens count as one byte each for bits per byte."""

    has_optimum = True

    def __init__(self, spec_fields: dict, seq_len: int):
        from testbed.data.synthetic import SyntheticLanguage, SyntheticSpec

        try:
            spec = SyntheticSpec(**spec_fields)
        except TypeError as err:
            raise TestbedError(f"data.synthetic={spec_fields!r} has a key SyntheticSpec does not know "
                               f"({err}); see docs/synthetic-data.md for the fields") from None
        self.language = SyntheticLanguage(spec)
        self.seq_len = seq_len

    @classmethod
    def from_config(cls, config: Config, options: Options | None = None) -> SyntheticSource:
        return cls(config.data.synthetic, config.data.seq_len)

    @classmethod
    def vocab_size(cls, config: Config, options: Options | None = None) -> int:
        from testbed.data.synthetic import SyntheticSpec

        return int(config.data.synthetic.get("vocab_size", SyntheticSpec.vocab_size))

    def num_windows(self, split: str = TRAIN) -> int | None:
        return None  # unlimited

    def windows(self, indices: np.ndarray, split: str = TRAIN) -> np.ndarray:
        return self.language.sequences(np.asarray(indices), self.seq_len + 1, stream=split)

    def optimal_nats(self, windows: np.ndarray) -> np.ndarray:
        """Exact -ln p of each window's targets under the true source, summed per window."""
        return -self.language.log_probs(windows)[:, 1:].sum(axis=1)

    def fingerprint(self) -> str:
        return self.language.fingerprint()


@DATA_SOURCES.register("shards")
class ShardSource(DataSource):
    """Token shards written by `testbed data prepare`."""

    def __init__(self, path: str, seq_len: int):
        from testbed.data.shards import TokenShards

        self.shards = TokenShards(path)
        self.seq_len = seq_len

    @classmethod
    def from_config(cls, config: Config, options: Options | None = None) -> ShardSource:
        d = config.data
        if not d.path or not Path(d.path).exists():
            raise TestbedError(f"data.path={d.path!r} does not exist; run `testbed data prepare` "
                               f"to write it, or fix the path")
        return cls(d.path, d.seq_len)

    @classmethod
    def vocab_size(cls, config: Config, options: Options | None = None) -> int:
        from testbed.data.shards import read_manifest

        path = config.data.path
        manifest = Path(path or "") / "manifest.json"
        if not manifest.is_file() and config.model.vocab_size:
            # A run can be planned before its data is prepared when the config states the
            # vocabulary; training still needs the folder (from_config says how to make it).
            return int(config.model.vocab_size)
        if not manifest.is_file():
            raise ConfigError(f"data.path={path!r} holds no manifest.json; run `testbed data prepare` first")
        return int(read_manifest(manifest.parent)["vocab_size"])

    def num_windows(self, split: str = TRAIN) -> int | None:
        return self.shards.num_windows(self.seq_len, split)

    def windows(self, indices: np.ndarray, split: str = TRAIN) -> np.ndarray:
        return self.shards.windows(np.asarray(indices), self.seq_len, split)

    def window_bytes(self, indices: np.ndarray, split: str = TRAIN) -> np.ndarray:
        return self.shards.window_bytes(np.asarray(indices), self.seq_len, split)

    def fingerprint(self) -> str:
        return self.shards.fingerprint()

    def text_tokenizer(self):
        """The tokenizer the folder was prepared with (its tokenizer.json), for evaluation tasks."""
        from testbed.data.tokenizer import load_saved

        if not (self.shards.path / "tokenizer.json").is_file():
            raise TestbedError(f"data.path={str(self.shards.path)!r} has no tokenizer.json, which "
                               f"train.tasks need to tokenise text; prepare the folder again")
        return load_saved(self.shards.path, self.shards.eos_id)


@DATA_SOURCES.register("random")
class RandomSource(DataSource):
    """Uniform random tokens at any vocabulary: for speed benchmarks only (nothing to learn)."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int):
        self.vocab, self.seq_len, self.seed = vocab_size, seq_len, seed

    @classmethod
    def from_config(cls, config: Config, options: Options | None = None) -> RandomSource:
        if config.model.vocab_size is None:
            raise ConfigError("data.source='random' needs model.vocab_size")
        return cls(config.model.vocab_size, config.data.seq_len, config.data.seed)

    @classmethod
    def vocab_size(cls, config: Config, options: Options | None = None) -> int:
        return int(config.model.vocab_size or 0)  # validation requires it for this source

    def num_windows(self, split: str = TRAIN) -> int | None:
        return None

    def windows(self, indices: np.ndarray, split: str = TRAIN) -> np.ndarray:
        stream = 0 if split == TRAIN else 1
        return np.stack([np.random.default_rng([self.seed, stream, int(i)]).integers(
            0, self.vocab, self.seq_len + 1) for i in indices])

    def fingerprint(self) -> str:
        return f"random-v{self.vocab}-s{self.seed}"


def source_class(config: Config) -> tuple[Any, Options | None]:
    """The registered source `config` names (data.path implies shards, testbed.config.source_name)
    and its validated options (None: it declares none)."""
    d = config.data
    name = source_name(d)
    cls = DATA_SOURCES.get(name)
    options = DATA_SOURCES.make_options(name, getattr(d, "source_options", None), "data.source_options",
                                        convert=build_dataclass)
    return cls, options


def make_source(config: Config) -> DataSource:
    cls, options = source_class(config)
    return cls.from_config(config) if options is None else cls.from_config(config, options=options)


def source_vocab_size(config: Config) -> int:
    """The vocabulary of the data `config` names, read without building its source."""
    cls, options = source_class(config)
    return int(cls.vocab_size(config) if options is None else cls.vocab_size(config, options=options))


class BatchPlan:
    """Which windows make up each step's global batch."""

    def __init__(self, source, global_batch_seqs: int, seed: int, unique_tokens: int | None,
                 total_steps: int):
        self.source = source
        self.batch = global_batch_seqs
        self.seed = seed
        self.total_steps = total_steps
        available = source.num_windows(TRAIN)
        seq_len = source.seq_len
        needed = total_steps * global_batch_seqs
        self.pool = None
        if unique_tokens is not None:
            self.pool = unique_tokens // seq_len
            if self.pool < global_batch_seqs:
                raise TestbedError(
                    f"data.unique_tokens={unique_tokens} holds {self.pool} windows of {seq_len} "
                    f"tokens, fewer than one batch of {global_batch_seqs}; raise data.unique_tokens "
                    f"to at least {global_batch_seqs * seq_len}")
            if available is not None and self.pool > available:
                raise TestbedError(
                    f"data.unique_tokens={unique_tokens} exceeds the corpus's "
                    f"{available * seq_len} training tokens; lower it or prepare more data")
        elif available is not None and needed > available:
            raise TestbedError(
                f"the run needs {needed * seq_len:,} training tokens ({total_steps} steps) but the "
                f"corpus holds {available * seq_len:,} (in windows of {seq_len}); shorten the run, "
                f"or set data.unique_tokens to repeat data")
        self.available = available

    @property
    def unique_tokens(self) -> int | None:
        return None if self.pool is None else self.pool * self.source.seq_len

    def epochs_at(self, step: int) -> float:
        """Epochs over the unique pool completed after `step` steps (0 without repetition)."""
        if self.pool is None:
            return step * self.batch / self.available if self.available else 0.0
        return step * self.batch / self.pool

    @lru_cache(maxsize=1)
    def _corpus_order(self) -> np.ndarray | None:
        if self.available is None:
            return None
        return np.random.default_rng([self.seed, 0x5EED]).permutation(self.available)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return _epoch_permutation(self.seed, epoch, self.pool)

    def positions_to_windows(self, positions: np.ndarray) -> np.ndarray:
        order = self._corpus_order()
        if self.pool is None:
            return positions if order is None else order[positions]
        epochs, within = np.divmod(positions, self.pool)
        out = np.empty_like(positions)
        for e in np.unique(epochs):
            mask = epochs == e
            slot = self._epoch_order(int(e))[within[mask]]
            out[mask] = slot if order is None else order[slot]
        return out

    def window_ids(self, step: int, rank: int = 0, world: int = 1) -> np.ndarray:
        """The windows this process reads at `step` (a contiguous slice of the global batch)."""
        per_rank = self.batch // world
        start = step * self.batch + rank * per_rank
        return self.positions_to_windows(np.arange(start, start + per_rank, dtype=np.int64))

    def batch_tokens(self, step: int, rank: int = 0, world: int = 1) -> np.ndarray:
        return self.source.windows(self.window_ids(step, rank, world), TRAIN)


@lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, pool: int) -> np.ndarray:
    return np.random.default_rng([seed, 0xE90C, epoch]).permutation(pool)


def validation_windows(source, n: int) -> np.ndarray:
    """The fixed validation set: the first n validation windows (independent of training), or,
    for a source with `validation_groups`, every window of its groups."""
    groups = getattr(source, "validation_groups", None)
    if groups is not None:
        return np.concatenate([np.asarray(ids, dtype=np.int64) for _, ids in groups().values()])
    available = source.num_windows(VALIDATION)
    if available is not None:
        if available == 0:
            raise TestbedError("the data source has no validation windows; prepare it with a larger "
                               "validation fraction or more documents")
        n = min(n, available)
    return np.arange(n, dtype=np.int64)


# Built-in sources defined in modules of their own (which do not import this one), registered
# here so that their names are always known.
DATA_SOURCES.register("mixture", options=MixtureOptions)(MixtureSource)
