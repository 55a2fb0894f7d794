"""Evaluation tasks: scores against an independent computation from the model's log-probs, a
task whose answers are known, bad files, the trainer's metrics and `fit collect` columns, the
hub form offline and the lm-evaluation-harness command."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from text_corpus import fox_text

from testbed.config import ModelConfig, TaskConfig, load_config
from testbed.data.tasks import TaskRows, load_task, load_tasks
from testbed.errors import ConfigError, TestbedError
from testbed.model.transformer import Transformer
from testbed.train.distributed import Dist
from testbed.train.tasks import evaluate_tasks

DATA = Path(__file__).resolve().parent / "data" / "tasks"
MC, COMPLETION = DATA / "fox_mc.jsonl", DATA / "fox_completion.jsonl"
TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=64",
        "data.seq_len=32", "train.global_batch_tokens=512", "train.log_every=1", "train.eval_every=1",
        "logging.wandb=false", "logging.progress=false", "data.val_sequences=2"]
TASKS = f"train.tasks=[{{name: fox, path: {MC}}}, {{name: fox_gen, path: {COMPLETION}, kind: completion}}]"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A folder prepared from a small corpus, and its tokenizer."""
    from testbed.data.loader import ShardSource
    from testbed.data.shards import prepare

    root = tmp_path_factory.mktemp("tasks")
    corpus = root / "c.txt"
    corpus.write_text(fox_text(300))
    prepare(corpus, root / "data", vocab_size=300, cache_dir=root / "cache", val_fraction=0.2)
    return root / "data", ShardSource(str(root / "data"), 32).text_tokenizer()


def tiny_model(vocab: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(d_model=32, n_layers=2, n_heads=2, vocab_size=vocab, max_seq_len=64)).eval()


def hand_scores(model, tokenizer, context: str, answer: str, seq_len: int = 32) -> tuple[float, bool]:
    """Nats of `answer` after EOS + `context` and whether each answer token is the argmax, from the
    full logits of one unpadded sequence."""
    ctx = tokenizer.encode_batch([context])[0]
    ans = tokenizer.encode_batch([answer])[0]
    row = torch.tensor([tokenizer.eos_id, *ctx, *ans])[-(seq_len + 1):]
    with torch.no_grad():
        logp = torch.log_softmax(model(row[None, :-1])[0].double(), dim=-1)
    k = len(ans)
    targets = row[-k:]
    picked = logp[-k:].gather(1, targets[:, None])[:, 0]
    return -picked.sum().item(), bool((logp[-k:].argmax(-1) == targets).all())


def test_mc_and_completion_scores_match_a_hand_computation(prepared):
    _, tokenizer = prepared
    model = tiny_model(tokenizer.vocab_size)
    tasks = [load_task(TaskConfig(name="fox", path=str(MC)), 0, tokenizer, 32),
             load_task(TaskConfig(name="gen", path=str(COMPLETION), kind="completion"), 1, tokenizer, 32)]
    # A small token budget: several batches, the last one partly padding.
    got = evaluate_tasks(model, tasks, token_budget=70, device=torch.device("cpu"), dtype=torch.float32, d=Dist())

    acc, acc_norm, bpb = [], [], []
    for line in MC.read_text().splitlines():
        if not line.strip():
            continue
        ex = json.loads(line)
        context = ex.get("question", ex.get("context"))
        nats = [hand_scores(model, tokenizer, context, " " + c)[0] for c in ex["choices"]]
        acc.append(int(np.argmax([-n for n in nats])) == ex["answer"])
        acc_norm.append(int(np.argmax([-n / len(c) for n, c in zip(nats, ex["choices"])])) == ex["answer"])
        right = " " + ex["choices"][ex["answer"]]
        bpb.append(nats[ex["answer"]] / (math.log(2) * len(right.encode("utf-8"))))
    assert got["task/fox/acc"] == pytest.approx(np.mean(acc))
    assert got["task/fox/acc_norm"] == pytest.approx(np.mean(acc_norm))
    assert got["task/fox/bpb"] == pytest.approx(np.mean(bpb), rel=1e-5)
    assert 0 < got["task/fox/bpb"] < 20

    bpb, exact = [], []
    for line in COMPLETION.read_text().splitlines():
        ex = json.loads(line)
        answer = (" " if ex["context"] else "") + ex["completion"]  # no delimiter after an empty context
        nats, greedy = hand_scores(model, tokenizer, ex["context"], answer)
        bpb.append(nats / (math.log(2) * len(answer.encode("utf-8"))))
        exact.append(greedy)
    assert got["task/gen/bpb"] == pytest.approx(np.mean(bpb), rel=1e-5)
    assert got["task/gen/acc"] == pytest.approx(np.mean(exact))
    assert set(got) == {"task/fox/acc", "task/fox/acc_norm", "task/fox/bpb", "task/gen/acc", "task/gen/bpb"}


def copying_model(vocab: int) -> Transformer:
    """A model that predicts its input token again, whatever came before: the blocks add nothing,
    every embedding has unit norm and the head is the embedding, so the current token's logit is
    8 and every other one 8 x its cosine with it: the copy is the argmax, at a small cost."""
    model = tiny_model(vocab)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.out.weight.zero_()
            block.mlp.down.weight.zero_()
        embed = model.embed.weight
        embed.div_(embed.norm(dim=1, keepdim=True))
        model.head.weight.copy_(8 / math.sqrt(32) * embed)  # the final RMSNorm scales by sqrt(d)
    return model


def rows_task(kind: str, contexts: list[list[int]], answers: list[list[list[int]]], right: list[int],
              chars: list[list[int]] | None = None) -> TaskRows:
    rows, k, example, correct = [], [], [], []
    for i, (ctx, choices) in enumerate(zip(contexts, answers)):
        for j, ans in enumerate(choices):
            rows.append(np.asarray([0, *ctx, *ans]))
            k.append(len(ans))
            example.append(i)
            correct.append(j == right[i])
    n = len(rows)
    chars_per_row = [c for cs in chars for c in cs] if chars else [2 * t for t in k]
    return TaskRows(name=kind, kind=kind, rows=rows, answer_tokens=np.asarray(k), answer_bytes=np.full(n, 4),
                    answer_chars=np.asarray(chars_per_row), example=np.asarray(example),
                    correct=np.asarray(correct))


def test_a_task_whose_answers_the_model_is_known_to_pick():
    model = copying_model(64)
    # Repeating the context's last token is the copying model's near-certain choice; every copy
    # costs the same few nats eps (the logits depend on the current token only).
    mc = rows_task("mc", [[5, 9, 7], [3, 3], [11]], [[[7, 7], [3, 4], [7, 1]], [[2], [3]], [[11], [11, 11]]],
                   right=[0, 1, 0], chars=[[4, 4, 4], [2, 2], [1, 100]])
    gen = rows_task("completion", [[5, 9, 7], [8], [4]], [[[7, 7, 7]], [[8, 9]], [[4]]], right=[0, 0, 0])
    got = evaluate_tasks(model, [mc, gen], 64, torch.device("cpu"), torch.float32, Dist())
    assert got["task/mc/acc"] == 1.0
    # Example 3: [11] has the higher total (-eps against -2 eps), but [11, 11] the higher per
    # character (-2 eps / 100): acc_norm picks the wrong one there.
    assert got["task/mc/acc_norm"] == pytest.approx(2 / 3)
    assert got["task/completion/acc"] == pytest.approx(2 / 3)  # [8] -> 9 is not a copy
    assert 0 < got["task/mc/bpb"] < 0.1  # the copies are near certain: few bits


def test_processes_share_the_rows_and_the_sum_is_one_process(monkeypatch, prepared):
    """Each of five processes scores its share of 12 rows (three of them pad theirs, so all run
    the same batches); the all-reduce of their scores is the one-process result."""
    from testbed.train import tasks as scoring

    model = tiny_model(prepared[1].vocab_size, seed=1)
    task = load_task(TaskConfig(name="fox", path=str(MC)), 0, prepared[1], 32)  # 12 rows
    monkeypatch.setattr(scoring, "all_reduce_sum", lambda t, d: t)  # each process alone
    args = (torch.device("cpu"), torch.float32)
    whole = scoring.score_rows(model, task, 100, *args, Dist())
    calls = []
    real_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1) or real_forward(*a, **k))
    two_rows = 2 * (max(len(r) for r in task.rows) - 1)  # a budget of two rows a batch
    parts = [scoring.score_rows(model, task, two_rows, *args, Dist(rank=r, world=5)) for r in range(5)]
    assert len(calls) == 5 * 2  # every process the same forward passes: 3 rows, 2 a batch
    assert np.allclose(sum(p[0] for p in parts), whole[0], rtol=1e-6)
    assert np.array_equal(np.sum([p[1] for p in parts], axis=0) > 0, whole[1])


@pytest.mark.parametrize("lines, message", [
    (['{"question": "q", "choices": ["a", "b"], "answer": 0}', "{not json"], "line 2 is not valid JSON"),
    (['{"question": "q", "choices": ["a", "b"], "answer": 2}'], r"line 1 has 'answer'=2; .* 0 to 1"),
    (['{"question": "q", "choices": ["a"], "answer": 0}'], "line 1 needs 'choices'"),
    (['["q", "a"]'], "line 1 is a list, not an object"),
    (['{"choices": ["a", "b"], "answer": 0}'], "line 1 has no string 'question' or 'context'"),
    ([""], "holds no examples"),
])
def test_bad_task_files_name_the_line(tmp_path, prepared, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=message) as err:
        load_task(TaskConfig(name="bad", path=str(path)), 3, prepared[1], 32)
    assert str(err.value).startswith("train.tasks[3]")


def test_task_config_and_source_errors(tmp_path, prepared):
    with pytest.raises(ConfigError, match=r"train.tasks\[0\].path='nowhere.jsonl' does not exist"):
        load_task(TaskConfig(name="x", path="nowhere.jsonl"), 0, prepared[1], 32)
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"context": "a", "completion": "quick brown fox " * 40}) + "\n")
    with pytest.raises(ConfigError, match="more than data.seq_len=32"):
        load_task(TaskConfig(name="x", path=str(path), kind="completion"), 0, prepared[1], 32)
    with pytest.raises(ConfigError, match=r"train.tasks\[1\].kind='choice'"):
        load_config(None, ["train.tasks=[{name: a, path: x}, {name: b, path: y, kind: choice}]"])
    with pytest.raises(ConfigError, match="used by two tasks"):
        load_config(None, ["train.tasks=[{name: a, path: x}, {name: a, path: y}]"])
    with pytest.raises(ConfigError, match=r"unknown config key 'train.tasks\[0\].file'"):
        load_config(None, ["train.tasks=[{name: a, file: x}]"])
    # The synthetic language's tokens are not text: a clear refusal before any run starts.
    from testbed.data.loader import make_source

    config = load_config(None, TINY + [TASKS])
    with pytest.raises(ConfigError, match="data.source='synthetic' has none"):
        load_tasks(config.train.tasks, make_source(config), 32)


def test_limit_and_long_contexts(tmp_path, prepared):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"context": "the quick brown fox " * 30, "completion": f"jumps {i}"}) + "\n"
                            for i in range(5)))
    task = load_task(TaskConfig(name="x", path=str(path), kind="completion", limit=3), 0, prepared[1], 32)
    assert task.examples == 3
    assert all(len(r) == 33 for r in task.rows)  # the context lost its front, the answer is whole
    ans = prepared[1].encode_batch([" jumps 2"])[0]
    assert list(task.rows[2][-len(ans):]) == ans


def test_hub_tasks_fail_clearly_offline(monkeypatch, prepared):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    task = TaskConfig(name="arc", path="hub:allenai/ai2_arc", subset="ARC-Easy", split="validation")
    with pytest.raises(TestbedError, match=r"train.tasks\[0\].path='hub:allenai/ai2_arc' could not be loaded "
                                           r".*need a network"):
        load_task(task, 0, prepared[1], 32)


def test_training_logs_task_metrics_and_collect_has_them(tmp_path, prepared):
    from safetensors.torch import load_file

    from testbed.fit.points.collect import collect_runs
    from testbed.plan import resolved_model
    from testbed.train.trainer import train

    folder, tokenizer = prepared
    config = load_config(None, TINY + [f"data.path={folder}", "train.steps=2", "checkpoint.every=1", TASKS])
    train(config, tmp_path / "r")
    evals = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in evals if "val_loss" in x]
    assert [x["step"] for x in evals] == [1, 2]
    keys = {"task/fox/acc", "task/fox/acc_norm", "task/fox/bpb", "task/fox_gen/acc", "task/fox_gen/bpb"}
    assert all(keys <= set(x) for x in evals)
    # The logged scores are those of the saved weights.
    model = Transformer(resolved_model(config)).eval()
    model.load_state_dict(load_file(str(tmp_path / "r" / "checkpoints" / "step_00000002" / "model.safetensors")))
    again = evaluate_tasks(model, load_tasks(config.train.tasks, type("S", (), {"text_tokenizer": lambda s: tokenizer})(), 32),
                           512, torch.device("cpu"), torch.float32, Dist())
    for key in keys:
        assert evals[-1][key] == pytest.approx(again[key], rel=1e-6)
    log = (tmp_path / "r" / "train.log").read_text()
    assert "step 2 tasks: fox acc" in log and "fox_gen acc" in log
    table = collect_runs(tmp_path / "r")
    assert list(table["step"]) == [1, 2]
    assert keys <= set(table.columns)
    assert table[["task/fox/bpb"]].iloc[-1, 0] == pytest.approx(evals[-1]["task/fox/bpb"])


def test_harness_names_the_missing_package(monkeypatch, tmp_path, capsys):
    from testbed.cli import main

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed, whatever is
    assert main(["eval", "harness", str(tmp_path), "--tasks", "hellaswag"]) == 2
    assert capsys.readouterr().err.strip() == "error: lm_eval is not installed; pip install lm-eval"


def test_harness_exports_and_runs_lm_eval(monkeypatch, tmp_path, prepared):
    import subprocess

    from testbed.cli import main
    from testbed.train import harness
    from testbed.train.trainer import train

    folder, _ = prepared
    train(load_config(None, TINY + [f"data.path={folder}", "train.steps=2"]), tmp_path / "r")
    seen = {}

    def fake_run(command):
        model_dir = Path(command[command.index("--model_args") + 1].split(",")[0].removeprefix("pretrained="))
        seen["command"] = command
        seen["files"] = sorted(p.name for p in model_dir.iterdir())
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(harness, "require_lm_eval", lambda: None)
    monkeypatch.setattr(harness.subprocess, "run", fake_run)
    assert main(["eval", "harness", str(tmp_path / "r"), "--tasks", "hellaswag,arc_easy", "--limit", "20",
                 "--out", str(tmp_path / "results")]) == 0
    model_dir = seen["command"][seen["command"].index("--model_args") + 1].split(",")[0].removeprefix("pretrained=")
    assert seen["command"] == [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                               f"pretrained={model_dir},tokenizer={model_dir},dtype=float32",
                               "--tasks", "hellaswag,arc_easy", "--device", "cpu", "--batch_size", "8",
                               "--limit", "20", "--output_path", str(tmp_path / "results")]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(seen["files"])
    assert not Path(model_dir).exists()  # the export was temporary
