"""Score evaluation tasks (rows from testbed/data/tasks.py) at each validation.

One forward pass per batch of rows gives the log-probabilities of each row's answer tokens,
with logits computed at those positions only: their sum in nats, and whether every answer token
is the argmax (then greedy decoding from the context writes exactly the answer). Per task:

    task/<name>/acc       mc: share of examples whose right choice has the highest total
                          log-likelihood; completion: share that greedy decoding reproduces
    task/<name>/acc_norm  mc: the same with log-likelihood per character of the choice
                          (lm-eval's acc_norm)
    task/<name>/bpb       mean over examples of the right answer's nats / (ln 2 x its UTF-8
                          bytes): the continuous metric of OLMo's ladder and DataDecide

Every process scores its share of the rows (the same number of batches on each, which FSDP's
collectives need) and one all-reduce gathers the scores.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from testbed.data.tasks import TaskRows
from testbed.train import device as dev
from testbed.train.distributed import Dist, all_reduce_sum


@torch.no_grad()
def score_rows(model: torch.nn.Module, task: TaskRows, token_budget: int, device, dtype,
               d: Dist) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the answer's nats and whether greedy decoding reproduces it."""
    n = len(task.rows)
    lengths = np.asarray([len(r) for r in task.rows])
    # Every batch has one shape (the task's longest row, batch_rows rows), so compiled blocks
    # compile once per task; every process runs the same number of batches.
    width = int(lengths.max()) - 1
    batch_rows = max(1, token_budget // width)
    per_rank = -(-n // d.world)
    per_rank = -(-per_rank // batch_rows) * batch_rows if per_rank > batch_rows else per_rank
    mine = np.full(per_rank, -1)  # -1: a padding row
    share = np.arange(d.rank, n, d.world)
    mine[:len(share)] = share
    nats = torch.zeros(n, dtype=torch.float64, device=device)
    greedy = torch.zeros(n, dtype=torch.float64, device=device)
    positions = np.arange(width)
    for start in range(0, per_rank, batch_rows):
        ids = mine[start:start + batch_rows]
        rows = np.where(ids >= 0, ids, 0)  # a padding row repeats row 0; its scores are dropped
        tokens = np.zeros((len(ids), width + 1), dtype=np.int64)  # right padding: causal, never read
        for b, i in enumerate(rows):
            tokens[b, :lengths[i]] = task.rows[i]
        # The answer's k tokens end the row: targets at inputs L-k-1 .. L-2 of a row of length L.
        end = lengths[rows] - 1
        answer = (positions >= (end - task.answer_tokens[rows])[:, None]) & (positions < end[:, None])
        answer &= (ids >= 0)[:, None]
        tokens_t = torch.from_numpy(tokens).to(device)
        answer_t = torch.from_numpy(answer).to(device)
        with dev.autocast(device, dtype):
            logits = model(tokens_t[:, :-1], logits_at=answer_t)
        targets = tokens_t[:, 1:][answer_t]
        logp = torch.log_softmax(logits.float(), dim=-1)
        token_nats = -logp.gather(1, targets[:, None])[:, 0].double()
        misses = (logits.argmax(dim=-1) != targets).double()
        row_of = torch.arange(len(ids), device=device)[:, None].expand_as(answer_t)[answer_t]
        batch_nats = torch.zeros(len(ids), dtype=torch.float64, device=device).index_add_(0, row_of, token_nats)
        batch_misses = torch.zeros(len(ids), dtype=torch.float64, device=device).index_add_(0, row_of, misses)
        real = torch.from_numpy(ids >= 0).to(device)
        index = torch.from_numpy(ids).to(device)[real]
        nats[index] = batch_nats[real]
        greedy[index] = (batch_misses[real] == 0).double()
    nats, greedy = all_reduce_sum(nats, d), all_reduce_sum(greedy, d)
    return nats.cpu().numpy(), greedy.cpu().numpy() > 0.5


def task_metrics(task: TaskRows, nats: np.ndarray, greedy: np.ndarray) -> dict[str, float]:
    """The task's metrics from its rows' scores (one right row per example)."""
    prefix = f"task/{task.name}/"
    right = task.correct
    bpb = float(np.mean(nats[right] / (math.log(2) * task.answer_bytes[right])))
    if task.kind == "completion":
        return {prefix + "acc": float(np.mean(greedy[right])), prefix + "bpb": bpb}
    loglik = -nats
    # Rows are grouped by example, in order: one slice per example.
    bounds = np.flatnonzero(np.diff(task.example)) + 1
    hits = hits_norm = 0
    for rows in np.split(np.arange(len(nats)), bounds):
        answer = int(np.argmax(right[rows]))
        hits += int(np.argmax(loglik[rows]) == answer)
        hits_norm += int(np.argmax(loglik[rows] / task.answer_chars[rows]) == answer)
    examples = len(bounds) + 1
    return {prefix + "acc": hits / examples, prefix + "acc_norm": hits_norm / examples, prefix + "bpb": bpb}


def evaluate_tasks(model: torch.nn.Module, tasks: list[TaskRows], token_budget: int, device, dtype,
                   d: Dist) -> dict[str, float]:
    """Every task's metrics, keyed task/<name>/<metric>."""
    if not tasks:
        return {}
    model.eval()
    out: dict[str, float] = {}
    for task in tasks:
        out.update(task_metrics(task, *score_rows(model, task, token_budget, device, dtype, d)))
    model.train()
    return out


def summary_line(metrics: dict[str, float]) -> str:
    """The task metrics as one train.log line: `name acc 0.412 acc_norm 0.436 bpb 1.283; ...`."""
    by_task: dict[str, list[str]] = {}
    for key, value in metrics.items():
        _, name, metric = key.split("/")
        by_task.setdefault(name, []).append(f"{metric} {value:.4g}")
    return "; ".join(f"{name} {' '.join(parts)}" for name, parts in by_task.items())
