"""The built-in synthetic language: a seeded variable-order Markov source with exact probabilities.

The source is a probabilistic suffix tree over a vocabulary of V tokens:

    order 0   the root (empty context)
    order 1   all V contexts "last token"
    order 2   all V*V contexts "last two tokens" (a complete level)
    order 3   for each order-2 node a Poisson(mean) number of children "last three tokens"

Every node n carries a distribution q_n: Zipf-shaped probabilities over a small random support.
With the matched chain n_1 (last token) ... n_D (deepest node that matches the history),

    p(x | history) = lam^D q_0(x) + sum_{j=1..D} (1 - lam) lam^(D-j) q_{n_j}(x)

and sampling draws the level with exactly those weights (a geometric walk up from the deepest
node), then a token from that level's q. Because every conditional is known in closed form, the
loss of the best possible predictor (the conditional entropy) is computed exactly, so a training
run can report the lowest achievable loss beside its own.

Sequences are independent and all start from the same empty history: the optimum depends on the
position (position 0 sees only q_0), so validation data are whole sequences scored from the start.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import cast

import numpy as np
from scipy.special import entr

from testbed.errors import ConfigError, TestbedError

# Bumped whenever the generator changes, so fingerprints of old data never match new data.
GENERATOR_VERSION = 1
MAX_ORDER = 3
STREAMS = {"train": 0, "validation": 1}
BLOCK_SEQS = 256  # sequences per deterministic block in `sequences`
CACHED_BLOCKS = 8

# Support sizes used when the spec leaves them unset (clipped to the vocabulary size).
DEFAULT_SUPPORT = {1: 32, 2: 16, 3: 8}


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that defines a synthetic language; equal specs give identical languages."""

    vocab_size: int = 128
    seed: int = 0
    lam: float = 0.2  # back-off weight: probability of moving one level towards the root
    order3_mean_children: float = 4.0
    zipf_exponent: float = 1.2  # steepness of each node's distribution; sets the scaling exponent
    support_order0: int | None = None  # root support; None = the whole vocabulary
    support_order1: int | None = None  # None = min(32, vocab_size)
    support_order2: int | None = None  # None = min(16, vocab_size)
    support_order3: int | None = None  # None = min(8, vocab_size)

    def __post_init__(self):
        _check_int("vocab_size", self.vocab_size, 2, "use at least 2 tokens")
        _check_int("seed", self.seed, 0, "use a non-negative integer seed")
        if not (isinstance(self.lam, (int, float)) and 0.0 <= self.lam <= 1.0):
            raise ConfigError(f"synthetic.lam is {self.lam!r}; set it to a number in [0, 1].")
        mean = self.order3_mean_children
        if not (isinstance(mean, (int, float)) and 0.0 <= mean <= self.vocab_size):
            raise ConfigError(
                f"synthetic.order3_mean_children is {mean!r}; set it to a number in "
                f"[0, vocab_size={self.vocab_size}]."
            )
        a = self.zipf_exponent
        if not (isinstance(a, (int, float)) and np.isfinite(a) and a >= 0):
            raise ConfigError(
                f"synthetic.zipf_exponent is {a!r}; set it to a finite number >= 0."
            )
        # Resolve unset support sizes so that equal languages compare (and hash) equal.
        for order in range(MAX_ORDER + 1):
            name = f"support_order{order}"
            value = getattr(self, name)
            if value is None:
                value = self.vocab_size if order == 0 else min(DEFAULT_SUPPORT[order], self.vocab_size)
                object.__setattr__(self, name, value)
            _check_int(name, value, 1, f"use a support size between 1 and vocab_size={self.vocab_size}")
            if value > self.vocab_size:
                raise ConfigError(
                    f"synthetic.{name} is {value}; set it to at most vocab_size={self.vocab_size}."
                )

    def support_sizes(self) -> tuple[int, int, int, int]:
        # Each None is replaced by its default in __post_init__.
        return cast(tuple[int, int, int, int],
                    (self.support_order0, self.support_order1, self.support_order2, self.support_order3))


def _check_int(name, value, minimum, fix):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"synthetic.{name} is {value!r}; {fix}.")


def _random_subsets(rng: np.random.Generator, n_rows: int, size: int, vocab: int) -> np.ndarray:
    """[n_rows, size] distinct tokens per row: a uniformly random ordered subset of range(vocab)."""
    if 2 * size > vocab:
        # Dense supports: a random permutation per row is cheapest.
        return np.argsort(rng.random((n_rows, vocab)), axis=1)[:, :size]
    # Sparse supports: fill column by column, redrawing only the entries that repeat an earlier
    # column (sequential sampling without replacement, vectorised across rows).
    out = np.empty((n_rows, size), dtype=np.int64)
    for col in range(size):
        todo = np.arange(n_rows)
        while todo.size:
            draw = rng.integers(vocab, size=todo.size)
            clash = (out[todo, :col] == draw[:, None]).any(axis=1)
            out[todo[~clash], col] = draw[~clash]
            todo = todo[clash]
    return out


class SyntheticLanguage:
    """A seeded synthetic language with exact next-token probabilities (numpy only)."""

    def __init__(self, spec: SyntheticSpec):
        self.spec = spec
        V = self.vocab_size = spec.vocab_size
        rng = np.random.default_rng([spec.seed, GENERATOR_VERSION])

        # Order-3 contexts: each order-2 node (index prev2*V + prev1) gets a Poisson number of
        # children, each a distinct third-last token. keys3 = order2_index*V + third_last, sorted.
        n_children = np.minimum(rng.poisson(spec.order3_mean_children, V * V), V)
        keys = []
        for count in np.unique(n_children[n_children > 0]):
            parents = np.flatnonzero(n_children == count)
            third = _random_subsets(rng, parents.size, int(count), V)
            keys.append((parents[:, None] * V + third).ravel())
        self.keys3 = np.sort(np.concatenate(keys)) if keys else np.zeros(0, dtype=np.int64)

        # Per-order node tables: tokens[o] and probs[o] are [n_nodes_o, support_o], each row
        # sorted by token so that (node, token) keys are globally sorted for binary search.
        self.n_nodes = (1, V, V * V, self.keys3.size)
        ranks = np.arange(1, max(spec.support_sizes()) + 1, dtype=np.float64)
        self.tokens, self.probs = [], []
        for order, (n, size) in enumerate(zip(self.n_nodes, spec.support_sizes())):
            zipf = ranks[:size] ** -float(spec.zipf_exponent)
            zipf /= zipf.sum()
            toks = _random_subsets(rng, n, size, V)  # rank k goes to toks[:, k]: a random token
            order_by_token = np.argsort(toks, axis=1)
            self.tokens.append(np.take_along_axis(toks, order_by_token, axis=1))
            self.probs.append(zipf[order_by_token])
        self.q0 = np.zeros(V)
        self.q0[self.tokens[0][0]] = self.probs[0][0]
        # Sorted lookup keys (node*V + token) for each order's q, used by log_probs.
        self.prob_keys = [
            (np.arange(n)[:, None] * V + toks).ravel() for n, toks in zip(self.n_nodes, self.tokens)
        ]
        self._build_sampler()
        self._blocks: OrderedDict = OrderedDict()

    # ----------------------------------------------------------------------------- structure

    def _build_sampler(self):
        """Global node ids, ancestor table and one flat CDF so that a token is one searchsorted."""
        V = self.vocab_size
        self.offsets = np.cumsum((0,) + self.n_nodes)  # global id of each order's first node
        n_total = int(self.offsets[-1])
        # anc[g, k]: the k-th ancestor of node g (saturating at the root).
        parent = np.zeros(n_total, dtype=np.int64)
        parent[self.offsets[2] : self.offsets[3]] = self.offsets[1] + np.arange(V * V) % V
        parent[self.offsets[3] :] = self.offsets[2] + self.keys3 // V
        anc = np.empty((n_total, MAX_ORDER + 1), dtype=np.int64)
        anc[:, 0] = np.arange(n_total)
        for k in range(1, MAX_ORDER + 1):
            anc[:, k] = parent[anc[:, k - 1]]
        self.ancestors = anc
        # Node g's entries are g + cdf (last one exactly g + 1), so the flat array is sorted and
        # searchsorted(g + u) for u in [0, 1) lands inside node g.
        cdfs, toks = [], []
        for order in range(MAX_ORDER + 1):
            cdf = np.cumsum(self.probs[order], axis=1)
            cdf[:, -1] = 1.0
            ids = self.offsets[order] + np.arange(self.n_nodes[order])
            cdfs.append((ids[:, None] + cdf).ravel())
            toks.append(self.tokens[order].ravel())
        self.flat_cdf = np.concatenate(cdfs)
        self.flat_tokens = np.concatenate(toks)
        self.keys3_padded = np.append(self.keys3, np.iinfo(np.int64).max)  # sentinel for lookups

    def node_distributions(self) -> dict[tuple[int, ...], dict[int, float]]:
        """Every node as {context (oldest token first): {token: probability}}; for tests and docs."""
        V = self.vocab_size
        contexts: list[list[tuple[int, ...]]] = [[()], [(a,) for a in range(V)],
                                                 [(b, a) for b in range(V) for a in range(V)]]
        contexts.append([(int(k % V), int(k // V // V), int(k // V % V)) for k in self.keys3])
        out: dict[tuple[int, ...], dict[int, float]] = {}
        for order in range(MAX_ORDER + 1):
            for node, ctx in enumerate(contexts[order]):
                toks, probs = self.tokens[order][node], self.probs[order][node]
                out[ctx] = {int(t): float(p) for t, p in zip(toks, probs)}
        return out

    def fingerprint(self) -> str:
        """Short stable hash of the spec (and generator version): equal fingerprints, equal data."""
        payload = json.dumps(
            {"generator": GENERATOR_VERSION, **dataclasses.asdict(self.spec)}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    # ------------------------------------------------------------------------------ sampling

    def _order3_lookup(self, order2: np.ndarray, third_last: np.ndarray):
        """Index into keys3 of the order-3 node (order2, third_last), and whether it exists."""
        query = order2 * self.vocab_size + third_last
        idx = np.searchsorted(self.keys3_padded, query)
        return idx, self.keys3_padded[idx] == query

    def sample(self, n_seqs: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """int64 [n_seqs, length]: independent sequences from the empty history."""
        V, lam = self.vocab_size, float(self.spec.lam)
        # All randomness drawn up front: the number of back-off steps k (P(k >= j) = lam^j,
        # clipped at the root by the ancestor table) and the uniform that picks the token.
        thresholds = lam ** np.arange(1, MAX_ORDER + 1)
        backoff = (rng.random((length, n_seqs, 1)) < thresholds).sum(axis=2)
        uniform = rng.random((length, n_seqs))
        anc, flat_cdf, flat_tokens = self.ancestors, self.flat_cdf, self.flat_tokens
        out = np.empty((length, n_seqs), dtype=np.int64)  # position-major: rows are contiguous
        zeros = np.zeros(n_seqs, dtype=np.int64)
        for t in range(length):
            if t == 0:
                deepest = zeros
            elif t == 1:
                deepest = self.offsets[1] + out[0]
            else:
                order2 = out[t - 2] * V + out[t - 1]
                deepest = self.offsets[2] + order2
                if t >= 3:
                    idx, found = self._order3_lookup(order2, out[t - 3])
                    deepest = np.where(found, self.offsets[3] + idx, deepest)
            node = anc[deepest, backoff[t]]
            out[t] = flat_tokens[np.searchsorted(flat_cdf, node + uniform[t], side="right")]
        return np.ascontiguousarray(out.T)

    def sequences(self, indices, length: int, stream: str = "train") -> np.ndarray:
        """int64 [len(indices), length]; sequence i of a stream never depends on the other indices.

        Sequences are generated in blocks of BLOCK_SEQS, block b from its own generator seeded
        by (seed, stream, b, length), so any index can be regenerated on its own.
        """
        if stream not in STREAMS:
            raise TestbedError(f"stream is {stream!r}; use one of {sorted(STREAMS)}.")
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and indices.min() < 0:
            raise TestbedError(f"sequence index {int(indices.min())} is negative; use indices >= 0.")
        out = np.empty((indices.size, length), dtype=np.int64)
        blocks = indices // BLOCK_SEQS
        for b in np.unique(blocks):
            rows = np.flatnonzero(blocks == b)
            out[rows] = self._block(STREAMS[stream], int(b), length)[indices[rows] % BLOCK_SEQS]
        return out

    def _block(self, stream_id: int, block: int, length: int) -> np.ndarray:
        key = (stream_id, block, length)
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return self._blocks[key]
        rng = np.random.default_rng([self.spec.seed, stream_id, block, length])
        self._blocks[key] = self.sample(BLOCK_SEQS, length, rng)
        if len(self._blocks) > CACHED_BLOCKS:
            self._blocks.popitem(last=False)
        return self._blocks[key]

    # ------------------------------------------------------------------------ exact scoring

    def _contexts(self, seqs: np.ndarray):
        """Per position: local node index at each order (-1 where absent) and the depth D."""
        seqs = self._check_seqs(seqs)
        V = self.vocab_size
        n, length = seqs.shape
        nodes = np.full((MAX_ORDER + 1, n, length), -1, dtype=np.int64)
        nodes[0] = 0
        nodes[1, :, 1:] = seqs[:, :-1]
        order2 = seqs[:, :-2] * V + seqs[:, 1:-1]
        nodes[2, :, 2:] = order2
        # position t >= 3: order-2 context (x_{t-2}, x_{t-1}) is order2[:, t-2]; third-last is x_{t-3}
        idx, found = self._order3_lookup(order2[:, 1:], seqs[:, :-3])
        nodes[3, :, 3:] = np.where(found, idx, -1)
        depth = (nodes[1:] >= 0).sum(axis=0)  # levels 1..3 are nested, so D = count of matches
        return seqs, nodes, depth

    def _level_weights(self, depth: np.ndarray) -> np.ndarray:
        """[MAX_ORDER+1, ...] mixture weight of each order at depth D (zero for orders > D)."""
        lam = float(self.spec.lam)
        orders = np.arange(MAX_ORDER + 1).reshape(-1, *([1] * depth.ndim))
        weights = np.where(orders <= depth, (1 - lam) * lam ** np.maximum(depth - orders, 0), 0.0)
        weights[0] = lam**depth
        return weights

    def log_probs(self, seqs: np.ndarray) -> np.ndarray:
        """float64 [n, length]: exact ln p(x_t | x_<t); position 0 uses q_0 alone."""
        seqs, nodes, depth = self._contexts(seqs)
        weights = self._level_weights(depth)
        prob = weights[0] * self.q0[seqs]
        for order in range(1, MAX_ORDER + 1):
            present = nodes[order] >= 0
            query = nodes[order][present] * self.vocab_size + seqs[present]
            keys = self.prob_keys[order]
            idx = np.minimum(np.searchsorted(keys, query), keys.size - 1)
            q = np.where(keys[idx] == query, self.probs[order].ravel()[idx], 0.0)
            prob[present] += weights[order][present] * q
        return np.log(prob)

    def conditional_probs(self, seqs: np.ndarray) -> np.ndarray:
        """float64 [n, length, V]: the full next-token distribution p(. | x_<t) at every position."""
        seqs, nodes, depth = self._contexts(seqs)
        n, length = seqs.shape
        weights = self._level_weights(depth).reshape(MAX_ORDER + 1, -1)
        nodes = nodes.reshape(MAX_ORDER + 1, -1)
        dist = weights[0][:, None] * self.q0[None, :]
        rows = np.arange(n * length)[:, None]
        for order in range(1, MAX_ORDER + 1):
            present = np.flatnonzero(nodes[order] >= 0)
            node = nodes[order][present]
            # Tokens within a node are distinct, so fancy-index += never hits a cell twice.
            dist[rows[present], self.tokens[order][node]] += (
                weights[order][present, None] * self.probs[order][node]
            )
        return dist.reshape(n, length, self.vocab_size)

    def entropies(self, seqs: np.ndarray, chunk_tokens: int = 65536) -> np.ndarray:
        """float64 [n, length]: exact H(X_t | x_<t) in nats, the optimal expected loss there."""
        seqs = self._check_seqs(seqs)
        n, length = seqs.shape
        out = np.empty((n, length))
        rows_per_chunk = max(1, chunk_tokens // max(length, 1))
        for start in range(0, n, rows_per_chunk):
            dist = self.conditional_probs(seqs[start : start + rows_per_chunk])
            out[start : start + rows_per_chunk] = entr(dist).sum(axis=2)  # entr = -p ln p, 0 at 0
        return out

    def unigram_entropy(self, n_seqs: int = 512, length: int = 256) -> float:
        """Entropy (nats) of the marginal token distribution: the best context-free loss.

        The marginal is estimated as the average exact conditional over sampled histories,
        which has far less variance than counting tokens.
        """
        rng = np.random.default_rng([self.spec.seed, len(STREAMS), GENERATOR_VERSION])
        seqs = self.sample(n_seqs, length, rng)
        marginal = np.zeros(self.vocab_size)
        for start in range(0, n_seqs, 64):
            marginal += self.conditional_probs(seqs[start : start + 64]).sum(axis=(0, 1))
        marginal /= marginal.sum()
        nonzero = marginal[marginal > 0]
        return float(-(nonzero * np.log(nonzero)).sum())

    def _check_seqs(self, seqs) -> np.ndarray:
        seqs = np.asarray(seqs)
        if seqs.ndim != 2 or not np.issubdtype(seqs.dtype, np.integer):
            raise TestbedError(
                f"token array has shape {seqs.shape} and dtype {seqs.dtype}; pass a 2-D integer "
                "array [n_seqs, length]."
            )
        if seqs.size and (seqs.min() < 0 or seqs.max() >= self.vocab_size):
            raise TestbedError(
                f"token ids span [{seqs.min()}, {seqs.max()}]; they must lie in "
                f"[0, vocab_size={self.vocab_size})."
            )
        return seqs.astype(np.int64, copy=False)
