"""Cross-entropy of the output head without materialising the logits of the whole batch.

A plain `F.cross_entropy(head(h).float(), targets)` keeps, per token, V logits in the compute
precision, their fp32 copy, the fp32 log-softmax saved for backward and the fp32 gradient: at
vocab 128k and seq 2048 that is about 3 GB per sequence, more than the rest of a 1B model's
activations. Here the head's matmul and the loss are fused and cut into chunks of tokens. Each
chunk's logits live only while that chunk is processed, and since the gradient of the summed
loss with respect to the logits (softmax minus one-hot) is known in the forward pass, the
gradients of h and of the head weight are computed there too (as Liger's fused linear
cross-entropy does); backward only scales them. The matmul count equals the plain path's
(forward, grad of h, grad of W), so it costs no speed, and it is the one place the testbed
computes a cross-entropy: training, validation and the memory probe all call it.

Logits are computed in the autocast dtype (bf16 on a GPU) and reduced in fp32; the weight
gradient is accumulated in fp32 across chunks. With `compiled=True` (the trainer sets it where it
compiles the blocks) the elementwise work between the two matmuls, which the eager path does in
about six passes over fp32 logits, is one compiled kernel that reads the bf16 logits and writes
the bf16 gradient.

An optional z-loss (PaLM, Chowdhery et al. 2022) adds `z_loss * mean(lse^2)`, lse the log of the
softmax normaliser of each token, to the objective: it keeps the output logits from drifting
while costing nothing extra, since the lse is computed here anyway, and its gradient
(2 * z_loss * lse * softmax per token) folds into the same chunked pass.
"""

from __future__ import annotations

import torch

# Logit elements per chunk (2^28: 1 GiB in fp32). At vocab 32k that is 8192 tokens, at 128k
# 2048 tokens, and a CPU run at a small vocabulary is a single chunk.
CHUNK_LOGITS = 2 ** 28


def chunk_tokens(vocab_size: int, limit: int = CHUNK_LOGITS) -> int:
    return max(1, limit // vocab_size)


def compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def chunk_loss(hc: torch.Tensor, w: torch.Tensor, tc: torch.Tensor, dtype: torch.dtype):
    """(fp32 logits, their log-sum-exp, summed loss) of one chunk of tokens."""
    logits = (hc.to(dtype) @ w.t()).float()
    lse = torch.logsumexp(logits, dim=-1)
    return logits, lse, (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()


def softmax_grad(logits: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype, z_weight: float = 0.0):
    """(summed loss, summed lse^2, d (loss + z_weight * lse^2) / d logits in `dtype`) of one chunk,
    written for torch.compile to fuse into one pass; the eager path below does the same in place."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    loss = (lse - x.gather(1, targets[:, None])).sum()
    one_hot = torch.arange(x.shape[1], device=x.device)[None, :] == targets[:, None]
    probs = torch.exp(x - lse)
    if z_weight:
        return loss, lse.square().sum(), (probs * (1.0 + 2.0 * z_weight * lse) - one_hot.float()).to(dtype)
    return loss, None, (probs - one_hot.float()).to(dtype)


_compiled_softmax_grad = None


def compiled_softmax_grad():
    global _compiled_softmax_grad
    if _compiled_softmax_grad is None:
        # dynamic=False: a run has two chunk lengths at most (full and last), one graph each.
        _compiled_softmax_grad = torch.compile(softmax_grad, dynamic=False)
    return _compiled_softmax_grad


class FusedLinearCrossEntropy(torch.autograd.Function):
    """sum over tokens of -log softmax(h @ W^T)[target] + z_weight * lse^2, with gradients for h
    and W. Returns (that objective, the summed cross-entropy, the summed lse^2); the last two are
    for logging and carry no gradient. With z_weight 0 the objective is the cross-entropy."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, dtype, compiled, z_weight):
        w = weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        z_total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, h.shape[0], chunk):
            hc, tc = h[start:start + chunk].to(dtype), targets[start:start + chunk]
            if compiled:
                loss, z, g = compiled_softmax_grad()(hc @ w.t(), tc, dtype, z_weight)
                if z_weight:
                    z_total += z
            else:
                logits, lse, loss = chunk_loss(hc, w, tc, dtype)
                # d(sum of losses)/d(logits) = softmax - one_hot, built in the logits' memory;
                # the z-loss adds 2 * z_weight * lse * softmax.
                probs = logits.sub_(lse[:, None]).exp_()
                if z_weight:
                    z_total += lse.square().sum()
                    probs.mul_(1.0 + 2.0 * z_weight * lse[:, None])
                probs[torch.arange(len(tc), device=tc.device), tc] -= 1.0
                g = probs.to(dtype)
            total += loss
            grad_h[start:start + chunk] = g @ w
            grad_w.add_(g.t() @ hc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        if not z_weight:
            ce = total.detach().clone()
            ctx.mark_non_differentiable(ce, z_total)
            return total, ce, z_total
        objective = total + z_weight * z_total
        ctx.mark_non_differentiable(total, z_total)
        return objective, total, z_total

    @staticmethod
    def backward(ctx, grad_total, _grad_ce=None, _grad_z=None):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_total.to(grad_h.dtype), (grad_w * grad_total).to(ctx.weight_dtype),
                None, None, None, None, None)


@torch.no_grad()
def _loss_only(h, weight, targets, chunk, dtype, z_weight: float = 0.0):
    w = weight.to(dtype)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    z_total = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, h.shape[0], chunk):
        _, lse, loss = chunk_loss(h[s:s + chunk], w, targets[s:s + chunk], dtype)
        total += loss
        if z_weight:
            z_total += lse.square().sum()
    return total + z_weight * z_total if z_weight else total, total, z_total


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         reduction: str = "mean", chunk: int | None = None,
                         compiled: bool = False) -> torch.Tensor:
    """Cross-entropy in nats of logits h @ weight^T against targets; h [..., d], targets [...].
    compiled: fuse the elementwise part of the gradient with torch.compile."""
    return linear_cross_entropy_terms(h, weight, targets, 0.0, reduction, chunk, compiled)[0]


def linear_cross_entropy_terms(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               z_loss: float = 0.0, reduction: str = "mean", chunk: int | None = None,
                               compiled: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(objective, cross-entropy, mean or summed lse^2): the objective, which carries the gradient,
    is the cross-entropy plus z_loss times the lse^2 term (PaLM's z-loss); the other two are
    detached, for logging (the lse^2 term is zero when z_loss is 0)."""
    h = h.reshape(-1, h.shape[-1])
    targets = targets.reshape(-1)
    chunk = chunk or chunk_tokens(weight.shape[0])
    dtype = compute_dtype(h, weight)
    device_type = h.device.type
    # The casts are explicit; autocast inside would only repeat them.
    with torch.autocast(device_type, enabled=False):
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            terms = FusedLinearCrossEntropy.apply(h, weight, targets, chunk, dtype, compiled, float(z_loss))
        else:
            terms = _loss_only(h, weight, targets, chunk, dtype, float(z_loss))
    if reduction == "sum":
        return terms[0], terms[1], terms[2]
    if reduction == "mean":
        n = targets.numel()
        return terms[0] / n, terms[1] / n, terms[2] / n
    raise ValueError(f"reduction={reduction!r}: use 'mean' or 'sum'")
