"""The fused, chunked cross-entropy of the output head against torch's plain path."""

import pytest
import torch
import torch.nn.functional as F

from testbed.model.loss import chunk_tokens, linear_cross_entropy
from testbed.train.memory import largest_fitting


def plain(h, w, t, reduction="mean"):
    return F.cross_entropy((h @ w.t()).float().reshape(-1, w.shape[0]), t.reshape(-1), reduction=reduction)


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
def test_loss_and_gradients_match_torch_cross_entropy(chunk):
    torch.manual_seed(0)
    h = torch.randn(3, 20, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (3, 20))
    ours = linear_cross_entropy(h, w, t, chunk=chunk)
    (gh, gw) = torch.autograd.grad(3.0 * ours, (h, w))
    ref = plain(h, w, t)
    (rh, rw) = torch.autograd.grad(3.0 * ref, (h, w))
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(gh, rh, atol=1e-6) and torch.allclose(gw, rw.to(gw.dtype), atol=1e-6)


def test_sum_reduction_and_no_grad_path_agree():
    torch.manual_seed(1)
    h, w, t = torch.randn(40, 8), torch.randn(30, 8), torch.randint(0, 30, (40,))
    with torch.no_grad():
        total = linear_cross_entropy(h, w, t, reduction="sum", chunk=9)
    assert total.item() == pytest.approx(plain(h, w, t, "sum").item(), rel=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, t, reduction="none")


def test_no_tensor_of_logits_size_is_kept_for_backward():
    """The memory claim: what autograd saves holds no [tokens, vocab] tensor."""
    torch.manual_seed(2)
    n, d, v = 64, 8, 1000
    h = torch.randn(n, d, requires_grad=True)
    w = torch.randn(v, d, requires_grad=True)
    t = torch.randint(0, v, (n,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        linear_cross_entropy(h, w, t, chunk=16).backward()
        assert max(saved) <= v * d  # grad of the weight, not n x v logits
        saved.clear()
        plain(h, w, t).backward()
    assert max(saved) >= n * v  # the plain path keeps them: the hook sees what it should


def test_bf16_autocast_computes_logits_in_bf16_and_reduces_in_fp32():
    torch.manual_seed(3)
    h = torch.randn(32, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    t = torch.randint(0, 40, (32,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(h, w, t, chunk=5)
        ref = plain(h.bfloat16(), w.bfloat16(), t)
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(ref.item(), rel=1e-3)
    ours.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32


def test_chunk_size_bounds_the_logits_of_one_chunk():
    assert chunk_tokens(32768) == 8192 and chunk_tokens(128256) == 2092 and chunk_tokens(256) == 2 ** 20
    assert chunk_tokens(10, limit=5) == 1


@pytest.mark.parametrize("limit", [0, 1, 2, 3, 5, 8, 13, 64, 100])
def test_largest_fitting_finds_the_boundary_with_few_probes(limit):
    candidates = list(range(1, 101))
    probes = []

    def fits(m):
        probes.append(m)
        return m <= limit

    best = largest_fitting(candidates, fits)
    assert best == (limit if limit else None)
    assert len(probes) <= 2 * 7 + 1  # logarithmic, not linear
    divisors = [m for m in candidates if 96 % m == 0]
    assert largest_fitting(divisors, lambda m: m <= 40) == 32


def test_compiled_elementwise_path_matches_the_eager_one():
    """The one-kernel gradient (loss.softmax_grad, compiled on GPUs) computes what the in-place
    eager path does; run here without compiling, since the maths is what could be wrong."""
    from testbed.model import loss as loss_module

    torch.manual_seed(4)
    h = torch.randn(3, 20, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (3, 20))
    eager = linear_cross_entropy(h, w, t, chunk=7)
    ge = torch.autograd.grad(eager, (h, w))
    original = loss_module._compiled_softmax_grad
    loss_module._compiled_softmax_grad = loss_module.softmax_grad
    try:
        fused = linear_cross_entropy(h, w, t, chunk=7, compiled=True)
        gf = torch.autograd.grad(fused, (h, w))
    finally:
        loss_module._compiled_softmax_grad = original
    assert fused.item() == pytest.approx(eager.item(), rel=1e-12)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(ge, gf))
