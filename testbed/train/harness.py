"""`testbed eval harness`: a run's checkpoint through EleutherAI's lm-evaluation-harness.

The checkpoint is exported (testbed/train/export.py, with the run's tokenizer) into a temporary
folder, which `python -m lm_eval --model hf` then loads like any transformers model. lm-eval is
the optional `eval` extra (pip install -e '.[eval]'): without it the command stops at once,
naming the package to install.

Tasks: lm-eval's own by name (they read their hub datasets, so they need a network or its
cache), local task YAML files (`--include-path DIR`, or a .yaml path in --tasks), and with
`--train-tasks` the run's own `train.tasks` (docs/evals.md), written as lm-eval tasks named
`testbed_<name>`: the same examples the trainer scores in the loop, scored by lm-eval, with the
bits per byte of the right answer computed from lm-eval's logged log-likelihoods, so the two
evaluations can be compared number for number. `--offline` sets HF_HUB_OFFLINE and
HF_DATASETS_OFFLINE for lm-eval (without a network, hub look-ups otherwise time out first).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from testbed.config import Config, saved_config
from testbed.errors import TestbedError
from testbed.rundir import RunDir
from testbed.train import checkpoint as ckpt
from testbed.train.export import export
from testbed.train.load import pick_checkpoint

__all__ = ["harness_command", "pick_checkpoint", "require_lm_eval", "run_harness", "write_train_tasks"]

TASK_PREFIX = "testbed_"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise TestbedError("lm_eval is not installed; pip install lm-eval")


def harness_command(model_dir: str | Path, tasks: str, device: str = "cpu", batch_size: int = 8,
                    limit: float | None = None, out: str | Path | None = None,
                    include_path: str | Path | None = None, log_samples: bool = False) -> list[str]:
    """The lm_eval command line that scores the exported folder `model_dir`."""
    command = [sys.executable, "-m", "lm_eval", "--model", "hf",
               "--model_args", f"pretrained={model_dir},tokenizer={model_dir},dtype=float32",
               "--tasks", tasks, "--device", device, "--batch_size", str(batch_size)]
    if limit is not None:
        command += ["--limit", f"{limit:g}"]
    if out is not None:
        command += ["--output_path", str(out)]
    if include_path is not None:
        command += ["--include_path", str(include_path)]
    if log_samples:
        command += ["--log_samples"]
    return command


def write_train_tasks(config: Config, folder: Path) -> dict[str, Path]:
    """The run's train.tasks as lm-eval task files in `folder`: {task name: YAML path}.

    An mc task becomes a multiple_choice task (acc, acc_norm; target_delimiter the task's
    delimiter), a completion task a loglikelihood task (acc: greedy decoding writes the
    completion), each over a JSONL copy of its examples (its `limit` applied)."""
    import yaml

    from testbed.data.tasks import parse_example, read_examples

    if not config.train.tasks:
        raise TestbedError("--train-tasks: the run has no train.tasks to score; name lm-eval tasks with --tasks")
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for i, task in enumerate(config.train.tasks):
        key = f"train.tasks[{i}]"
        name = TASK_PREFIX + task.name
        docs = []
        for where, example in read_examples(task, key):
            context, answers, right = parse_example(task, where, example, key)
            if task.kind == "mc":
                docs.append({"context": context, "choices": answers, "answer": right})
            else:  # the loop joins context and completion with the delimiter, none after an empty context
                docs.append({"context": context, "target": (task.delimiter if context else "") + answers[0]})
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
        spec: dict = {"task": name, "dataset_path": "json",
                      "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
                      "test_split": "test", "doc_to_text": "context"}
        metric = {"aggregation": "mean", "higher_is_better": True}
        if task.kind == "mc":
            spec.update(output_type="multiple_choice", doc_to_choice="choices", doc_to_target="answer",
                        target_delimiter=task.delimiter,
                        metric_list=[{"metric": "acc", **metric}, {"metric": "acc_norm", **metric}])
        else:
            spec.update(output_type="loglikelihood", doc_to_target="target",
                        metric_list=[{"metric": "acc", **metric}])
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True), encoding="utf-8")
        written[name] = path
    return written


def newest(folder: Path, pattern: str) -> Path | None:
    found = sorted(folder.glob(pattern))
    return found[-1] if found else None


def answer_bpb(samples: Path) -> float:
    """Mean over examples of the right answer's bits per UTF-8 byte (delimiter included), from
    lm-eval's logged samples of a task written by write_train_tasks: the in-loop task/<name>/bpb."""
    values = []
    for line in samples.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        sample = json.loads(line)
        args = list(sample["arguments"].values())
        right = int(sample["doc"].get("answer", 0))  # a completion task: its one request
        continuation = args[right]["arg_1"]
        loglik = float(sample["filtered_resps"][right][0])
        values.append(-loglik / (math.log(2) * len(continuation.encode("utf-8"))))
    return sum(values) / len(values)


def train_task_scores(results_dir: Path, names: list[str]) -> dict[str, dict[str, float]]:
    """{task: {acc, acc_norm, bpb}} of lm-eval's results and samples in `results_dir`."""
    results_file = newest(results_dir, "results_*.json")
    if results_file is None:
        return {}
    results = json.loads(results_file.read_text(encoding="utf-8"))["results"]
    scores = {}
    for name in names:
        got = results.get(name, {})
        row = {metric: float(got[f"{metric},none"]) for metric in ("acc", "acc_norm") if f"{metric},none" in got}
        samples = newest(results_dir, f"samples_{name}_*.jsonl")
        if samples is not None:
            row["bpb"] = answer_bpb(samples)
        scores[name] = row
    return scores


def in_loop_scores(run_dir: Path, step: int) -> dict[str, float]:
    """The task metrics the trainer logged at `step` (empty when none were)."""
    try:
        records = RunDir(run_dir).metrics()
    except TestbedError:
        return {}
    found: dict[str, float] = {}
    for record in records:
        if record.get("step") == step:
            found.update({k: v for k, v in record.items() if k.startswith("task/")})
    return found


def comparison_lines(scores: dict[str, dict[str, float]], loop: dict[str, float], step: int) -> list[str]:
    lines = []
    for name, row in scores.items():
        task = name[len(TASK_PREFIX):]
        line = f"{name}: lm-eval " + " ".join(f"{m} {v:.4g}" for m, v in row.items())
        here = {m: loop[f"task/{task}/{m}"] for m in row if f"task/{task}/{m}" in loop}
        if here:
            line += f"; in the loop at step {step}: " + " ".join(f"{m} {v:.4g}" for m, v in here.items())
        lines.append(line)
    return lines


def move_results(out: Path, model_dir: Path, label: str) -> Path | None:
    """lm-eval writes into OUT/<its name for the model path>, here a temporary one: move that
    folder's files to OUT/<label>."""
    written = out / re.sub(r"[\"<>:/|\\?*\[\]]+", "__", str(model_dir))
    if not written.is_dir():
        return None
    target = out / label
    target.mkdir(parents=True, exist_ok=True)
    for file in written.iterdir():
        shutil.move(str(file), str(target / file.name))
    written.rmdir()
    return target


def run_harness(run_dir: str | Path, tasks: str | None, step: int | None = None, device: str = "cpu",
                batch_size: int = 8, limit: float | None = None, out: str | Path | None = None,
                tokenizer: str | None = None, include_path: str | Path | None = None,
                train_tasks: bool = False, offline: bool = False) -> int:
    """Export, then run lm_eval; its exit status."""
    require_lm_eval()  # before the export: a missing package is the common failure
    if not tasks and not train_tasks:
        raise TestbedError("name the tasks to score: --tasks NAME[,NAME...] (lm-eval's, or local ones with "
                           "--include-path), and/or --train-tasks for the run's own train.tasks")
    if include_path is not None and not Path(include_path).is_dir():
        raise TestbedError(f"--include-path {str(include_path)!r} is not a folder; pass the folder of the "
                           f"task YAML files")
    run_dir = Path(run_dir)
    checkpoint = pick_checkpoint(run_dir, step)
    step = ckpt.step_of(checkpoint)
    with tempfile.TemporaryDirectory(prefix="testbed-harness-") as tmp:
        model_dir = Path(tmp) / "model"
        export(checkpoint, model_dir, tokenizer, need_tokenizer=True)
        names = [t for t in (tasks or "").split(",") if t]
        written: dict[str, Path] = {}
        if train_tasks:
            config = saved_config((ckpt.read_state(checkpoint) or {})["config"])  # export has checked it
            written = write_train_tasks(config, Path(tmp) / "tasks")
            names += [str(path) for path in written.values()]
        results = Path(out) if out is not None else (Path(tmp) / "results" if written else None)
        command = harness_command(model_dir, ",".join(names), device, batch_size, limit, results,
                                  include_path, log_samples=bool(written))
        print(f"{checkpoint}: {shlex.join(command)}", flush=True)
        if offline:
            code = subprocess.run(command, env={**os.environ, **OFFLINE}).returncode
        else:
            code = subprocess.run(command).returncode
        if results is None or results.suffix == ".json":
            return code
        where = move_results(results, model_dir, f"{run_dir.name}-step{step}")
        if code == 0 and written and where is not None:
            scores = train_task_scores(where, list(written))
            for line in comparison_lines(scores, in_loop_scores(run_dir, step), step):
                print(line)
            if out is not None:
                (where / "train_tasks.json").write_text(json.dumps(scores, indent=1))
        if out is not None and where is not None:
            print(f"results in {where}")
    return code
