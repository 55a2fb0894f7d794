"""`testbed eval harness` running lm-eval for real, offline: a tiny model trained on prepared text
with in-loop tasks (one multiple-choice, one completion) is exported and scored by lm-eval on
the same examples (`--train-tasks`) and on a hand-written local task file (`--include-path`);
lm-eval's acc and acc_norm equal the loop's, and the bits per byte of the right answer from its
logged log-likelihoods equal the loop's within 1e-5 relative (fp32 both ways; measured: 3e-8,
the rounding of transformers' Llama against the testbed model)."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
from text_corpus import corpus_text

from testbed.cli import main
from testbed.config import load_config

pytestmark = pytest.mark.slow

TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=64",
        "data.seq_len=32", "train.global_batch_tokens=512", "train.log_every=10", "train.eval_every=100",
        "logging.wandb=false", "logging.progress=false", "data.val_sequences=4"]
BPB_RTOL = 1e-5


def same(share: float):
    """The same share of examples (the two means may round differently in the last bit)."""
    return pytest.approx(share, abs=1e-12)

MC = [
    {"question": "The brown cat", "choices": ["drinks milk", "eats hay", "sings a song"], "answer": 0},
    {"question": "The old dog", "choices": ["drinks milk", "chases the ball"], "answer": 1},
    {"question": "The white horse eats hay in the", "choices": ["barn.", "ball.", "song."], "answer": 0},
    {"question": "The small bird", "choices": ["chases the ball", "sings a song", "eats hay"], "answer": 1},
    {"question": "Story 7: The black", "choices": ["cat", "milk", "in"], "answer": 0},
    # The place is drawn at random in the corpus: the model's pick is a guess, right or wrong.
    {"question": "The brown cat drinks milk in the", "choices": ["garden.", "barn.", "house."], "answer": 2},
    {"question": "The old dog chases the ball in the", "choices": ["garden.", "barn.", "house."], "answer": 1},
    {"question": "The small horse eats hay in the", "choices": ["house.", "garden.", "barn."], "answer": 1},
    {"question": "The white bird sings a song in the", "choices": ["barn.", "house.", "garden."], "answer": 0},
    {"question": "The black cat", "choices": ["drinks milk in the garden.", "eats hay."], "answer": 1},
]
COMPLETION = [
    {"context": "The black dog chases the", "completion": "ball in the garden."},
    {"context": "Story 12: The brown bird sings", "completion": "a song"},
    {"context": "", "completion": "Story 3: The old cat drinks milk"},  # scored after EOS alone
    {"context": "The white cat", "completion": "drinks milk"},
]
# A local task written by hand, as docs/evals.md shows, over the same multiple-choice file.
HAND_TASK = """task: tbmc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""




def need_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but lm_eval is not installed; scripts/setup.sh installs the eval extra")
        pytest.skip("lm_eval is not installed (pip install -e '.[eval]')")


def newest(folder, pattern):
    found = sorted(folder.glob(pattern))
    assert found, f"no {pattern} in {folder}: {sorted(p.name for p in folder.iterdir())}"
    return found[-1]


def bpb_from_samples(path) -> float:
    """Mean over examples of the right answer's -loglik / (ln 2 x its UTF-8 bytes), read
    straight from lm-eval's logged requests and responses."""
    values = []
    for line in path.read_text().splitlines():
        sample = json.loads(line)
        right = int(sample["doc"].get("answer", 0))
        continuation = sample["arguments"][f"gen_args_{right}"]["arg_1"]
        loglik = float(sample["filtered_resps"][right][0])
        values.append(-loglik / (math.log(2) * len(continuation.encode("utf-8"))))
    return sum(values) / len(values)


def test_lm_eval_scores_equal_the_in_loop_task_scores(tmp_path, capsys):
    need_lm_eval()
    from testbed.data.shards import prepare
    from testbed.train.trainer import train

    (tmp_path / "c.txt").write_text(corpus_text())
    prepare(tmp_path / "c.txt", tmp_path / "data", vocab_size=320, cache_dir=tmp_path / "cache", val_fraction=0.1)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc.jsonl").write_text("".join(json.dumps(x) + "\n" for x in MC))
    (tasks / "completion.jsonl").write_text("".join(json.dumps(x) + "\n" for x in COMPLETION))
    (tasks / "tbmc.yaml").write_text(HAND_TASK.format(path=tasks / "mc.jsonl"))
    in_loop = (f"train.tasks=[{{name: mc, path: {tasks / 'mc.jsonl'}}}, "
               f"{{name: gen, path: {tasks / 'completion.jsonl'}, kind: completion}}]")
    config = load_config(None, TINY + [f"data.path={tmp_path / 'data'}", "train.steps=30", "optim.lr=1e-2", in_loop])
    train(config, tmp_path / "run")
    capsys.readouterr()

    out = tmp_path / "results"
    assert main(["eval", "harness", str(tmp_path / "run"), "--train-tasks", "--tasks", "tbmc", "--include-path",
                 str(tasks), "--offline", "--out", str(out), "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    folder = out / "run-step30"
    results = json.loads(newest(folder, "results_*.json").read_text())["results"]
    loop = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    loop = next(x for x in loop if x["step"] == 30 and "task/mc/acc" in x)

    assert results["testbed_mc"]["acc,none"] == same(loop["task/mc/acc"])
    assert results["testbed_mc"]["acc_norm,none"] == same(loop["task/mc/acc_norm"])
    assert results["testbed_gen"]["acc,none"] == same(loop["task/gen/acc"])
    assert results["tbmc"]["acc,none"] == same(loop["task/mc/acc"])  # the hand-written file: the same
    assert results["tbmc"]["acc_norm,none"] == same(loop["task/mc/acc_norm"])
    assert bpb_from_samples(newest(folder, "samples_testbed_mc_*.jsonl")) == pytest.approx(loop["task/mc/bpb"], rel=BPB_RTOL)
    assert bpb_from_samples(newest(folder, "samples_testbed_gen_*.jsonl")) == pytest.approx(loop["task/gen/bpb"], rel=BPB_RTOL)
    # A trained model, not a degenerate one: it picks some right answers and some wrong ones, and
    # writes some completions.
    assert 0 < loop["task/mc/acc"] < 1 and 0 < loop["task/gen/acc"]
    # The harness prints and saves both sides.
    assert "testbed_mc: lm-eval acc" in printed and "in the loop at step 30: acc" in printed
    saved = json.loads((folder / "train_tasks.json").read_text())
    assert saved["testbed_gen"]["bpb"] == pytest.approx(loop["task/gen/bpb"], rel=BPB_RTOL)
