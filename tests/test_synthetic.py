"""Tests for the built-in synthetic language: determinism, exactness of probabilities, sampling law."""

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from testbed.data.synthetic import BLOCK_SEQS, SyntheticLanguage, SyntheticSpec
from testbed.errors import ConfigError, TestbedError

# A tiny language whose every sequence can be enumerated: V=3, mixed support sizes, and an
# order-3 level that is present for some contexts and missing for others.
TINY = SyntheticSpec(
    vocab_size=3,
    seed=7,
    lam=0.3,
    order3_mean_children=1.5,
    zipf_exponent=1.3,
    support_order0=3,
    support_order1=2,
    support_order2=2,
    support_order3=1,
)


@pytest.fixture(scope="module")
def default_language():
    return SyntheticLanguage(SyntheticSpec())


@pytest.fixture(scope="module")
def tiny_language():
    return SyntheticLanguage(TINY)


# ------------------------------------------------------------------------------ spec and structure


def test_spec_resolves_defaults_and_rejects_bad_values():
    spec = SyntheticSpec(vocab_size=5)
    assert spec.support_sizes() == (5, 5, 5, 5)  # defaults clipped to a tiny vocabulary
    assert SyntheticSpec().support_sizes() == (128, 32, 16, 8)
    assert SyntheticSpec() == SyntheticSpec(support_order0=128)
    for bad in [
        dict(vocab_size=1),
        dict(lam=1.5),
        dict(lam=-0.1),
        dict(zipf_exponent=float("nan")),
        dict(order3_mean_children=-1.0),
        dict(vocab_size=4, support_order1=5),
        dict(support_order2=0),
        dict(seed=-3),
    ]:
        with pytest.raises(ConfigError):
            SyntheticSpec(**bad)


def test_tree_structure(tiny_language, default_language):
    V = default_language.vocab_size
    nodes = default_language.node_distributions()
    by_order = {}
    for ctx in nodes:
        by_order.setdefault(len(ctx), []).append(ctx)
    assert len(by_order[0]) == 1 and len(by_order[1]) == V and len(by_order[2]) == V * V
    # Poisson(4) children per order-2 node: the count is a sum of V^2 Poisson draws.
    n3 = len(by_order[3])
    assert abs(n3 - 4.0 * V * V) < 5 * math.sqrt(4.0 * V * V)
    for ctx in by_order[3]:
        assert ctx[1:] in nodes  # every order-3 node hangs under an existing order-2 node
    # Each q is a Zipf law over its support: sorted probabilities follow rank^-a exactly.
    a = default_language.spec.zipf_exponent
    for ctx in [(), (3,), (5, 9), by_order[3][0]]:
        probs = np.sort(list(nodes[ctx].values()))[::-1]
        ranks = np.arange(1, probs.size + 1)
        expected = ranks**-a / (ranks**-a).sum()
        np.testing.assert_allclose(probs, expected, rtol=1e-12)
    assert [len(nodes[c]) for c in [(), (1,), (1, 2), by_order[3][0]]] == [128, 32, 16, 8]
    assert len(tiny_language.node_distributions()) > 1 + 3 + 9  # some order-3 nodes exist
    assert len(tiny_language.node_distributions()) < 1 + 3 + 9 + 27  # ... but not all


# ----------------------------------------------------------------------------------- determinism


def test_determinism_and_stream_independence(tiny_language):
    spec = SyntheticSpec(vocab_size=16, seed=3)
    lang_a, lang_b = SyntheticLanguage(spec), SyntheticLanguage(spec)
    assert lang_a.fingerprint() == lang_b.fingerprint()
    np.testing.assert_array_equal(
        lang_a.sample(8, 20, np.random.default_rng(1)), lang_b.sample(8, 20, np.random.default_rng(1))
    )
    # Sequence i is the same whichever other indices are requested with it (across blocks too).
    indices = np.array([3, BLOCK_SEQS + 5, 1, 2 * BLOCK_SEQS + 9, 3])
    together = lang_a.sequences(indices, 12)
    for row, i in enumerate(indices):
        np.testing.assert_array_equal(together[row], lang_b.sequences([i], 12)[0])
    assert together.shape == (5, 12) and together.dtype == np.int64
    # Still the same after the block cache has been cycled.
    for b in range(12):
        lang_a.sequences([b * BLOCK_SEQS], 12)
    np.testing.assert_array_equal(lang_a.sequences(indices, 12), together)

    train = lang_a.sequences(np.arange(64), 12, "train")
    validation = lang_a.sequences(np.arange(64), 12, "validation")
    other_seed = SyntheticLanguage(SyntheticSpec(vocab_size=16, seed=4))
    assert (train != validation).mean() > 0.5
    assert (train != other_seed.sequences(np.arange(64), 12)).mean() > 0.5
    assert other_seed.fingerprint() != lang_a.fingerprint()
    with pytest.raises(TestbedError):
        lang_a.sequences([0], 12, stream="test")


# ----------------------------------------------------------------------------- exact probabilities


def test_conditionals_sum_to_one(default_language):
    seqs = default_language.sequences(np.arange(48), 40, "validation")
    dist = default_language.conditional_probs(seqs)
    assert dist.shape == (48, 40, 128)
    assert (dist >= 0).all()
    np.testing.assert_allclose(dist.sum(axis=2), 1.0, atol=1e-12)
    # log_probs agrees with the full distribution at the observed tokens.
    observed = np.take_along_axis(dist, seqs[..., None], axis=2)[..., 0]
    np.testing.assert_allclose(default_language.log_probs(seqs), np.log(observed), rtol=1e-12)
    with pytest.raises(TestbedError):
        default_language.log_probs(np.array([[0, 128]]))


def naive_conditional(nodes, lam, history, token):
    """p(token | history) straight from the definition, with dictionary context lookups."""
    chain = [()]
    for j in range(1, len(history) + 1):
        context = tuple(history[-j:])
        if context not in nodes:
            break
        chain.append(context)
    depth = len(chain) - 1
    p = lam**depth * nodes[()].get(token, 0.0)
    for j in range(1, depth + 1):
        p += (1 - lam) * lam ** (depth - j) * nodes[chain[j]].get(token, 0.0)
    return p


def test_brute_force_enumeration(tiny_language):
    nodes, lam, length = tiny_language.node_distributions(), TINY.lam, 5
    seqs = np.array(list(itertools.product(range(3), repeat=length)))
    naive = np.array(
        [[math.log(naive_conditional(nodes, lam, list(s[:t]), s[t])) for t in range(length)] for s in seqs]
    )
    log_probs = tiny_language.log_probs(seqs)
    np.testing.assert_allclose(log_probs, naive, rtol=0, atol=1e-12)
    seq_probs = np.exp(naive.sum(axis=1))
    assert abs(seq_probs.sum() - 1.0) < 1e-12
    # Chain rule: H(X_1..X_T) equals the expected sum of per-position conditional entropies.
    joint_entropy = -(seq_probs * np.log(seq_probs)).sum()
    per_position = tiny_language.entropies(seqs)
    assert abs(joint_entropy / length - (seq_probs[:, None] * per_position).sum() / length) < 1e-9
    # Position 0 sees only the root: its entropy is H(q_0).
    q0 = np.array(list(nodes[()].values()))
    np.testing.assert_allclose(per_position[:, 0], -(q0 * np.log(q0)).sum(), rtol=1e-12)


# ------------------------------------------------------------------------------- the sampling law


def chi_square_pvalue(observed, expected):
    """Pearson chi-square p-value, pooling cells whose expected count is below 5."""
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    statistic = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    return stats.chi2.sf(statistic, keep.sum() - 1)


def test_whole_sequence_frequencies_match_exact_probabilities(tiny_language):
    # Full 5-token sequences of the tiny language cover every level, order 3 included.
    length, n = 5, 200_000
    seqs = np.array(list(itertools.product(range(3), repeat=length)))
    exact = np.exp(tiny_language.log_probs(seqs).sum(axis=1))
    sample = tiny_language.sample(n, length, np.random.default_rng(11))
    counts = np.bincount(sample @ (3 ** np.arange(length - 1, -1, -1)), minlength=seqs.shape[0])
    assert chi_square_pvalue(counts, n * exact) > 1e-6


def test_four_gram_frequencies_match_exact_conditionals():
    # Deep in the sequence, each token must follow p(. | history): for every 4-gram cell the
    # count of observed tokens minus the summed exact probabilities is a martingale, so its
    # z-score is standard normal; 256 cells with Bonferroni at 1e-6 give |z| < 6.
    lang = SyntheticLanguage(SyntheticSpec(vocab_size=4, seed=5, order3_mean_children=2.0))
    seqs = lang.sample(3000, 48, np.random.default_rng(2))
    dist = lang.conditional_probs(seqs)[:, 3:]  # [n, t, V] for positions t >= 3
    context = (seqs[:, :-3] * 16 + seqs[:, 1:-2] * 4 + seqs[:, 2:-1]).ravel()
    observed = np.bincount(context * 4 + seqs[:, 3:].ravel(), minlength=256)
    dist = dist.reshape(-1, 4)
    expected = np.stack([np.bincount(context, dist[:, x], 64) for x in range(4)], axis=1).ravel()
    variance = np.stack([np.bincount(context, dist[:, x] * (1 - dist[:, x]), 64) for x in range(4)], 1)
    z = (observed - expected) / np.sqrt(np.maximum(variance.ravel(), 1e-12))
    assert np.abs(z[expected > 20]).max() < 6.0
    assert (expected > 20).sum() > 100


def test_sampled_loss_matches_entropy_and_beats_unigram(default_language):
    seqs = default_language.sequences(np.arange(256), 129, "validation")
    nll = -default_language.log_probs(seqs)
    entropy = default_language.entropies(seqs)
    # nll - entropy is a martingale difference sequence: uncorrelated, mean zero.
    diff = (nll - entropy).ravel()
    assert abs(diff.mean()) < 5 * diff.std() / math.sqrt(diff.size)
    unigram = default_language.unigram_entropy(n_seqs=64, length=128)
    assert unigram <= math.log(128) + 1e-9
    assert entropy.mean() < unigram - 1.0 and nll.mean() < unigram - 1.0
