"""`data.source: mixture`: several prepared folders (`testbed data prepare`) drawn with weights.

    data:
      source: mixture
      source_options:
        sources: {web: data/web, code: data/code}   # name -> prepared folder (at least two)
        weights: {web: 0.75, code: 0.25}            # same names, >= 0, summing to 1 (within 1e-6)

Order (a pure function of the run's window position j, so resuming is exact and the global
batch is the same for any number of processes): each weight is rounded to a multiple of 1/P
(P = 1000, largest remainders, so the counts add up to P; the realised weights are in the
fingerprint run.json records). A fixed pattern of P slots (smooth weighted round-robin, in the
sorted order of the names) holds component c in exactly count[c] slots, spread evenly. Position j
is block j // P, slot j % P: component pattern[slot], and its k-th window with
k = block * count[c] + (the slot's rank among c's slots). That is the k-th window of c's own
order: epoch e = k // n_c of a permutation of c's n_c training windows seeded by (data.seed, c's
name, e), so a component used up is reshuffled and repeated on its own (its epochs:
`component_epochs`), while the others go on with theirs.

Validation: each component's first data.val_sequences validation windows, as a group with its
realised weight (`validation_groups`); the trainer reports source/NAME/val_loss and val_bpb per
group, val_loss = sum_i w_i L_i and val_bpb = sum_i w_i nats_i/tokens_i over
ln 2 * sum_i w_i bytes_i/tokens_i (docs/data.md, "Mixtures").
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from testbed.config import Config
from testbed.errors import ConfigError, TestbedError
from testbed.registry import Options

# testbed.data.loader registers MixtureSource as `mixture` (it imports this module, so this
# module does not import it: the split names are repeated here).
TRAIN, VALIDATION = "train", "validation"

P = 1000  # weights are realised as multiples of 1/P; the pattern repeats every P windows
KEY = "data.source_options"
EXAMPLE = "e.g. {web: 0.75, code: 0.25}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class MixtureOptions(Options):
    sources: dict[str, str] = field(default_factory=dict)  # name -> folder written by `testbed data prepare`
    weights: dict[str, float] = field(default_factory=dict)  # name -> weight: >= 0, summing to 1

    def check(self) -> None:
        self.require(isinstance(self.sources, dict) and len(self.sources) >= 2, "sources",
                     "give at least two prepared folders by name, e.g. {web: data/web, code: data/code}")
        self.require(all(isinstance(k, str) and k and "/" not in k for k in self.sources), "sources",
                     "name each folder with a word without '/' (it becomes the metric source/NAME/val_loss)")
        self.require(all(isinstance(v, str) and v for v in self.sources.values()), "sources",
                     "give each name the path of a folder written by `testbed data prepare`")
        self.require(isinstance(self.weights, dict) and set(self.weights) == set(self.sources), "weights",
                     f"give one weight for each of data.source_options.sources "
                     f"({', '.join(sorted(self.sources))}) and no other, {EXAMPLE}")
        self.require(all(_is_number(w) and w >= 0 for w in self.weights.values()), "weights",
                     f"make every weight a number of at least 0, {EXAMPLE}")
        total = sum(self.weights.values())
        self.require(abs(total - 1.0) <= 1e-6, "weights",
                     f"make the weights sum to 1 (they sum to {total:.6g}); they are not normalised for you")


def realised_counts(weights: dict[str, float], names: list[str]) -> np.ndarray:
    """Slots out of P per component (in `names` order): the weights times P, rounded by largest
    remainders so that they add up to P exactly (ties to the earlier name)."""
    exact = [round(float(weights[n]) * P, 6) for n in names]
    counts = [int(math.floor(x)) for x in exact]
    order = sorted(range(len(names)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:P - sum(counts)]:
        counts[i] += 1
    return np.asarray(counts, dtype=np.int64)


def slot_pattern(counts: np.ndarray) -> np.ndarray:
    """The component of each of the P slots: smooth weighted round-robin, so every component's
    slots are spread evenly and component c fills exactly counts[c] of them."""
    current = np.zeros(len(counts), dtype=np.int64)
    pattern = np.empty(P, dtype=np.int64)
    for slot in range(P):
        current += counts
        pick = int(np.argmax(current))  # ties: the earliest component
        pattern[slot] = pick
        current[pick] -= P
    return pattern


def _name_seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def _error(field_name: str, value: Any, fix: str) -> ConfigError:
    return ConfigError(f"{KEY}.{field_name} is {value!r}; {fix}")


def _saved_tokenizer(path: str) -> str | None:
    """sha256 of a folder's tokenizer.json (None without one). A folder prepared with
    `--tokenizer FOLDER` records another fingerprint than FOLDER's trained tokenizer (loaded, not
    trained) yet saves the very same file: the file decides when the fingerprints differ."""
    file = Path(path) / "tokenizer.json"
    return hashlib.sha256(file.read_bytes()).hexdigest() if file.is_file() else None


def read_manifests(options: MixtureOptions) -> dict[str, dict]:
    """Each component's manifest (names sorted), checked to share one tokenizer and vocabulary:
    a folder without a manifest, or two folders that differ, is one error naming them."""
    from testbed.data.shards import read_manifest

    manifests = {}
    for name in sorted(options.sources):
        path = options.sources[name]
        if not (Path(path) / "manifest.json").is_file():
            raise _error("sources", options.sources,
                         f"{name}={path!r} holds no manifest.json; run `testbed data prepare --out {path}` "
                         f"first, or fix the path")
        try:
            manifests[name] = read_manifest(path)
        except TestbedError as err:
            raise _error("sources", options.sources, f"{name}={path!r}: {err}") from None
    first, *rest = manifests
    for name in rest:
        a, b = manifests[first], manifests[name]
        differ = []
        tok_a = (a.get("tokenizer") or {}).get("fingerprint")
        tok_b = (b.get("tokenizer") or {}).get("fingerprint")
        saved = _saved_tokenizer(options.sources[first])
        if tok_a != tok_b and (saved is None or saved != _saved_tokenizer(options.sources[name])):
            differ.append(f"tokenizer fingerprint {tok_a} vs {tok_b}")
        if int(a["vocab_size"]) != int(b["vocab_size"]):
            differ.append(f"vocab_size {a['vocab_size']} vs {b['vocab_size']}")
        if differ:
            raise _error("sources", options.sources,
                         f"folders {options.sources[first]!r} ({first}) and {options.sources[name]!r} ({name}) "
                         f"differ: {'; '.join(differ)}; prepare every folder with one tokenizer "
                         f"(`testbed data prepare --tokenizer {options.sources[first]}`)")
    return manifests


class MixtureSource:
    """Prepared folders drawn with fixed weights (module docstring: the order, validation). It
    answers what testbed.data.loader.DataSource describes, plus `validation_groups`."""

    has_optimum = False

    def __init__(self, config: Config, options: MixtureOptions):
        read_manifests(options)
        self.names = sorted(options.sources)
        self.paths = [options.sources[n] for n in self.names]
        self.weights = {n: float(options.weights[n]) for n in self.names}
        self.seq_len = config.data.seq_len
        self.seed = config.data.seed
        self.val_sequences = config.data.val_sequences
        from testbed.data.shards import TokenShards

        self.parts = [TokenShards(p) for p in self.paths]
        self.counts = realised_counts(self.weights, self.names)
        self.realised = {n: int(c) / P for n, c in zip(self.names, self.counts)}
        self.pattern = slot_pattern(self.counts)
        # The rank of each slot among its component's slots (k within the block).
        self.slot_rank = np.empty(P, dtype=np.int64)
        seen = np.zeros(len(self.names), dtype=np.int64)
        for slot, c in enumerate(self.pattern):
            self.slot_rank[slot] = seen[c]
            seen[c] += 1
        self.n_train = [p.num_windows(self.seq_len, TRAIN) for p in self.parts]
        for name, path, count, n in zip(self.names, self.paths, self.counts, self.n_train):
            if count and not n:
                raise _error("sources", options.sources,
                             f"{name}={path!r} holds no training window of {self.seq_len + 1} tokens; "
                             f"prepare more text, lower data.seq_len, or give {name} weight 0")
        n_val = [min(self.val_sequences, p.num_windows(self.seq_len, VALIDATION)) for p in self.parts]
        for name, path, n in zip(self.names, self.paths, n_val):
            if not n:
                raise _error("sources", options.sources,
                             f"{name}={path!r} holds no validation window; prepare it with a larger "
                             f"validation fraction or more documents")
        self.val_offsets = np.concatenate([[0], np.cumsum(n_val)]).astype(np.int64)
        self._name_seeds = [_name_seed(n) for n in self.names]

    @classmethod
    def from_config(cls, config: Config, options: Options | None = None) -> MixtureSource:
        """The source of a resolved config with its validated options."""
        assert isinstance(options, MixtureOptions)
        return cls(config, options)

    @classmethod
    def vocab_size(cls, config: Config, options: Options | None = None) -> int:
        assert isinstance(options, MixtureOptions)
        if config.model.vocab_size and not all((Path(p) / "manifest.json").is_file() for p in options.sources.values()):
            # As for shards: a mixture can be planned before its folders are prepared when the
            # config states the vocabulary; training still needs them (from_config says so).
            return int(config.model.vocab_size)
        manifests = read_manifests(options)
        return int(next(iter(manifests.values()))["vocab_size"])

    # ---------------------------------------------------------------- positions -> windows

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(component, k) of each training position: its slot's component, and the how-manyth
        window of that component it is."""
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        block, slot = np.divmod(positions, P)
        comp = self.pattern[slot]
        return comp, block * self.counts[comp] + self.slot_rank[slot]

    def _component_windows(self, c: int, k: np.ndarray) -> np.ndarray:
        """The windows of component c at its positions k: epoch k // n of its own reshuffled order."""
        n = self.n_train[c]
        epochs, within = np.divmod(k, n)
        out = np.empty_like(k)
        for e in np.unique(epochs):
            mask = epochs == e
            out[mask] = _permutation(self.seed, self._name_seeds[c], int(e), n)[within[mask]]
        return out

    def _split_ids(self, indices: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if split == TRAIN:
            comp, k = self.locate(indices)
            ids = np.empty_like(k)
            for c in np.unique(comp):
                mask = comp == c
                ids[mask] = self._component_windows(int(c), k[mask])
            return comp, ids
        total = int(self.val_offsets[-1])
        if len(indices) and (indices.min() < 0 or indices.max() >= total):
            raise IndexError(f"validation window index out of range [0, {total})")
        comp = np.searchsorted(self.val_offsets, indices, side="right") - 1
        return comp, indices - self.val_offsets[comp]

    def _gather(self, indices: np.ndarray, split: str, read) -> np.ndarray | None:
        comp, ids = self._split_ids(indices, split)
        out = None
        for c in np.unique(comp):
            mask = comp == c
            got = read(self.parts[int(c)], ids[mask])
            if out is None:
                out = np.empty((len(ids), *got.shape[1:]), dtype=got.dtype)
            out[mask] = got
        return out

    def num_windows(self, split: str = TRAIN) -> int | None:
        # Unlimited for training (each component repeats on its own); the loader maps position j
        # of the run straight to window j, so this source alone decides the order.
        return None if split == TRAIN else int(self.val_offsets[-1])

    def windows(self, indices: np.ndarray, split: str = TRAIN) -> np.ndarray:
        out = self._gather(indices, split, lambda part, ids: part.windows(ids, self.seq_len, split))
        return np.empty((0, self.seq_len + 1), dtype=np.int64) if out is None else out

    def window_bytes(self, indices: np.ndarray, split: str = TRAIN) -> np.ndarray:
        out = self._gather(indices, split, lambda part, ids: part.window_bytes(ids, self.seq_len, split))
        return np.empty(0, dtype=np.int64) if out is None else out

    # ---------------------------------------------------------------- validation, bookkeeping

    def validation_groups(self) -> dict[str, tuple[float, np.ndarray]]:
        """Each component's first data.val_sequences validation windows (as this source's
        validation indices) with its realised weight; evaluation weighs them (DataSource)."""
        return {n: (self.realised[n], np.arange(self.val_offsets[c], self.val_offsets[c + 1], dtype=np.int64))
                for c, n in enumerate(self.names)}

    def component_epochs(self, positions: int) -> dict[str, float]:
        """Epochs over each component's training windows after the run's first `positions` windows
        (above 1: that component repeats, reshuffled each epoch)."""
        block, rest = divmod(int(positions), P)
        used = block * self.counts + np.bincount(self.pattern[:rest], minlength=len(self.names))
        return {n: float(used[c]) / self.n_train[c] if self.n_train[c] else 0.0
                for c, n in enumerate(self.names)}

    def fingerprint(self) -> str:
        parts = ",".join(f"{n}={self.realised[n]:g}:{p.fingerprint()}" for n, p in zip(self.names, self.parts))
        return f"mixture-P{P}[{parts}]"

    def text_tokenizer(self):
        """The tokenizer every component was prepared with (read_manifests checked they agree)."""
        from testbed.data.tokenizer import load_saved

        first = self.parts[0]
        if not (first.path / "tokenizer.json").is_file():
            raise TestbedError(f"{KEY}.sources: {str(first.path)!r} has no tokenizer.json, which "
                               f"train.tasks need to tokenise text; prepare the folder again")
        return load_saved(first.path, first.eos_id)


@lru_cache(maxsize=8)
def _permutation(seed: int, name_seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, 0x313C, name_seed, epoch]).permutation(n)
