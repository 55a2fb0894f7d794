"""Evaluation tasks: read multiple-choice and completion examples and tokenise them into rows.

A task is a JSONL file, one example a line (blank lines are skipped):

    kind mc          {"question" or "context": str, "choices": [str, ...], "answer": int}
    kind completion  {"context": str, "completion": str}

or `hub:DATASET`, read through `datasets.load_dataset(DATASET, subset, split=split)` (needs a
network or the datasets cache), whose rows must carry the same fields.

Each answer becomes one row of tokens: EOS (the document boundary the model saw in training),
the context, then the answer joined to it by the task's delimiter. The answer is encoded apart
from the context, so its tokens are the same whatever precedes it, and is always scored whole:
a row longer than data.seq_len + 1 loses tokens from the front of its context. Scoring the rows
is the trainer's part (testbed/train/tasks.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from testbed.config import TaskConfig
from testbed.errors import ConfigError, TestbedError

HUB_PREFIX = "hub:"


@dataclass
class TaskRows:
    """A task's examples as token rows: one row per choice (mc) or per example (completion)."""

    name: str
    kind: str
    rows: list[np.ndarray]  # token ids, EOS + context + answer
    answer_tokens: np.ndarray  # how many tokens at the end of each row are the answer
    answer_bytes: np.ndarray  # UTF-8 bytes of each row's answer, delimiter included (bits per byte)
    answer_chars: np.ndarray  # characters of each row's answer without the delimiter (acc_norm)
    example: np.ndarray  # the example each row belongs to
    correct: np.ndarray  # per row: whether it is its example's right answer

    @property
    def examples(self) -> int:
        return int(self.example.max()) + 1 if len(self.example) else 0


def text_tokenizer(source: Any, key: str = "train.tasks"):
    """The tokenizer of the run's data, which tasks must share to be scored by the model."""
    tokenizer = getattr(source, "text_tokenizer", None)
    if tokenizer is None:
        kind = type(source).__name__.removesuffix("Source").lower()
        raise ConfigError(f"{key} needs a text tokenizer, but data.source={kind!r} has none (its tokens "
                          f"are not text); train on a folder written by `testbed data prepare` "
                          f"(data.path=FOLDER), or drop {key}")
    return tokenizer()


def read_examples(task: TaskConfig, key: str) -> list[tuple[str, Any]]:
    """(where, example) pairs, `where` naming the line or row for error messages."""
    if task.path.startswith(HUB_PREFIX):
        return hub_examples(task, key)
    path = Path(task.path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}.path={task.path!r} does not exist; give a JSONL file of examples "
                          f"(docs/evals.md) or hub:DATASET")
    examples: list[tuple[str, Any]] = []  # (where, the example's JSON)
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            if task.limit is not None and len(examples) >= task.limit:
                break
            if not line.strip():
                continue
            where = f"{task.path} line {number}"
            try:
                examples.append((where, json.loads(line)))
            except json.JSONDecodeError as err:
                raise ConfigError(f"{key}: {where} is not valid JSON ({err.msg}); each line must be one "
                                  f"JSON object") from None
    return examples


def hub_examples(task: TaskConfig, key: str) -> list[tuple[str, Any]]:
    name = task.path[len(HUB_PREFIX):]
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{key}.path={task.path!r} needs the datasets package; pip install datasets, "
                          f"or give a local JSONL file") from None
    try:
        rows = datasets.load_dataset(name, task.subset, split=task.split)
    except Exception as err:  # offline, unknown name, bad split: all "cannot load"
        reason = str(err).splitlines()[0] if str(err) else ""
        raise TestbedError(f"{key}.path={task.path!r} could not be loaded ({type(err).__name__}: {reason}); "
                           f"hub datasets need a network (or the datasets cache): write the examples "
                           f"to a local JSONL file instead") from None
    count = len(rows) if task.limit is None else min(task.limit, len(rows))
    return [(f"{task.path} row {i}", rows[i]) for i in range(count)]


def parse_example(task: TaskConfig, where: str, example: Any, key: str) -> tuple[str, list[str], int]:
    """(context, answers, index of the right answer), every field checked."""
    def bad(what: str) -> ConfigError:
        fields = ('{"question" or "context": str, "choices": [str, ...], "answer": int}' if task.kind == "mc"
                  else '{"context": str, "completion": str}')
        return ConfigError(f"{key}: {where} {what}; a {task.kind} example is {fields}")

    if not isinstance(example, dict):
        raise bad(f"is a {type(example).__name__}, not an object")
    if task.kind == "completion":
        context, completion = example.get("context"), example.get("completion")
        if not isinstance(context, str):
            raise bad("has no string 'context'")
        if not isinstance(completion, str) or not completion:
            raise bad("has no non-empty string 'completion'")
        return context, [completion], 0
    context = example.get("question", example.get("context"))
    choices, answer = example.get("choices"), example.get("answer")
    if not isinstance(context, str):
        raise bad("has no string 'question' or 'context'")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise bad("needs 'choices': a list of two or more non-empty strings")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise bad(f"has 'answer'={answer!r}; it must be the index of the right choice, 0 to {len(choices) - 1}")
    return context, choices, answer


def load_task(task: TaskConfig, index: int, tokenizer, seq_len: int) -> TaskRows:
    """Read, check and tokenise one task. Rows hold at most seq_len + 1 tokens (inputs and
    targets of one training window)."""
    key = f"train.tasks[{index}]"
    parsed = [(where, *parse_example(task, where, ex, key)) for where, ex in read_examples(task, key)]
    if not parsed:
        raise ConfigError(f"{key}.path={task.path!r} holds no examples; add one JSON object a line")
    contexts, answers, wheres = [], [], []
    example, correct, chars = [], [], []
    for i, (where, context, choices, right) in enumerate(parsed):
        for j, choice in enumerate(choices):
            contexts.append(context)
            answers.append(task.delimiter + choice if context else choice)
            wheres.append(where)
            example.append(i)
            correct.append(j == right)
            chars.append(len(choice))
    # The context of an example is encoded once per choice: batches of short strings are cheap.
    context_ids = tokenizer.encode_batch(contexts)
    answer_ids = tokenizer.encode_batch(answers)
    rows, answer_tokens = [], []
    for where, ctx, ans in zip(wheres, context_ids, answer_ids):
        if not ans:
            raise ConfigError(f"{key}: {where} has an answer that encodes to no tokens")
        if len(ans) > seq_len:
            raise ConfigError(f"{key}: {where} has an answer of {len(ans)} tokens, more than "
                              f"data.seq_len={seq_len} the model reads at once; shorten it")
        row = np.asarray([tokenizer.eos_id, *ctx, *ans], dtype=np.int64)
        rows.append(row[-(seq_len + 1):])
        answer_tokens.append(len(ans))
    return TaskRows(name=task.name, kind=task.kind, rows=rows, answer_tokens=np.asarray(answer_tokens),
                    answer_bytes=np.asarray([len(a.encode("utf-8")) for a in answers]),
                    answer_chars=np.asarray(chars), example=np.asarray(example),
                    correct=np.asarray(correct))


def load_tasks(tasks: list[TaskConfig], source: Any, seq_len: int) -> list[TaskRows]:
    if not tasks:
        return []
    tokenizer = text_tokenizer(source)
    return [load_task(task, i, tokenizer, seq_len) for i, task in enumerate(tasks)]
