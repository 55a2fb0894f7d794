"""`testbed average RUN_DIR --last K [--until-step S]`: the arithmetic mean of the weights of a run's
last K saved checkpoints (up to step S), evaluated on the run's validation windows and recorded in RUN_DIR/averages.jsonl.

Averaging the last checkpoints of a constant-learning-rate run is, like an EMA of the weights
(train.ema_decay), an alternative to a cooldown that costs no training (Hägele et al. 2024; the
checkpoint merging of OLMo). The checkpoints are those of checkpoints/index.jsonl whose folders
still exist; the evaluation is the trainer's, so `--last 1` reproduces the newest checkpoint's
val_loss exactly.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from testbed.data import loader as data_loader
from testbed.errors import TestbedError
from testbed.model.hf import save_hf
from testbed.model.transformer import Transformer
from testbed.plan import resolved_model
from testbed.rundir import RunDir
from testbed.train import checkpoint as ckpt
from testbed.train import device as dev
from testbed.train.distributed import Dist, load_model_state
from testbed.train.resume import load_run_config
from testbed.train.trainer import check_writable, evaluate


def saved_checkpoints(rd: RunDir) -> list[dict]:
    """One index line per checkpoint folder still on disk (a step saved as science and final has
    two lines: the last one wins), oldest first."""
    by_path: dict[str, dict] = {}
    for line in rd.index():
        by_path[line["path"]] = line
    return sorted((line for line in by_path.values()
                   if not line.get("deleted") and (rd.path / line["path"]).is_dir()), key=lambda line: line["step"])


PHASES = ("warmup", "stable", "decay")


def with_phases(lines: list[dict], config=None) -> list[dict]:
    """The index lines with `phase` filled in where an older index lacks it (from the run's
    schedule: a checkpoint at step S is in the phase of 0-based step S - 1)."""
    if all(line.get("phase") for line in lines) or config is None:
        return lines
    from testbed.plan import describe, run_schedule

    total = describe(config)["planned_steps"]
    spec = run_schedule(config, total)
    return [line if line.get("phase") else {**line, "phase": spec.phase(max(int(line["step"]) - 1, 0), total)}
            for line in lines]


def _counts(lines: list[dict], key: str) -> str:
    counts: dict[str, int] = {}
    for line in lines:
        counts[str(line.get(key) or "unknown")] = counts.get(str(line.get(key) or "unknown"), 0) + 1
    return ", ".join(f"{name} {n}" for name, n in counts.items())


def last_checkpoints(rd: RunDir, last: int, phase: str | None = None, config=None,
                     until: int | None = None) -> list[dict]:
    """The newest `last` saved checkpoints; with `phase`, the newest of that phase only; with
    `until`, the newest at or before that step (an average at a point inside the run, where a
    cooldown branch from it would end)."""
    if phase is not None and phase not in PHASES:
        raise TestbedError(f"--phase {phase!r} is not a phase; choose one of {', '.join(PHASES)}")
    saved = saved_checkpoints(rd)
    if not saved:
        raise TestbedError(f"{str(rd.path)!r} has no saved checkpoint in {rd.index_path}; pass a run "
                           f"directory that saved some (checkpoint.every, checkpoint.final)")
    saved = with_phases(saved, config)
    pool = [line for line in saved if (phase is None or line.get("phase") == phase)
            and (until is None or line["step"] <= until)]
    steps = [line["step"] for line in pool]
    if until is not None and not any(line["step"] == until for line in pool):
        have = [line["step"] for line in saved if phase is None or line.get("phase") == phase]
        raise TestbedError(f"--until-step {until}: {str(rd.path)!r} saved no checkpoint at that step (saved: "
                           f"{have}); choose one of them, or save one there (checkpoint.at_tokens)")
    if phase is not None and not pool:
        raise TestbedError(f"--phase {phase}: {str(rd.path)!r} saved no checkpoint in its {phase} phase (its "
                           f"{len(saved)} saved checkpoint(s) are: {_counts(saved, 'phase')}); choose another "
                           f"--phase or leave it out")
    if last < 1 or last > len(pool):
        what = (f"{len(pool)} saved checkpoint(s)" + (f" in its {phase} phase" if phase else "")
                + (f" up to step {until}" if until is not None else ""))
        raise TestbedError(f"--last {last}: {str(rd.path)!r} has {what} (steps {steps}); choose --last between "
                           f"1 and {len(pool)}")
    return pool[-last:]


def describe_choice(chosen: list[dict]) -> str:
    """One line: which checkpoints are averaged, and the phases (and kinds) they mix."""
    steps = [line["step"] for line in chosen]
    span = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"
    phases = list(dict.fromkeys(str(line.get("phase") or "unknown") for line in chosen))
    kinds = f"kinds: {_counts(chosen, 'kind')}"
    if len(phases) == 1:
        return f"averaging {len(chosen)} checkpoint(s), {span}, all in the {phases[0]} phase ({kinds})"
    named = ", ".join(phases[:-1]) + f" and {phases[-1]}"
    return (f"averaging {len(chosen)} checkpoints, {span}, mixing the {named} phases "
            f"({_counts(chosen, 'phase')}; {kinds}); --phase {'stable' if 'stable' in phases else phases[-1]} "
            f"averages one phase only")


def average_weights(folders: list[Path]) -> dict[str, torch.Tensor]:
    """The arithmetic mean of the checkpoints' weights, summed in float64 one checkpoint at a
    time (memory for two copies whatever K), returned in the saved dtype."""
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for folder in folders:
        weights = ckpt.load_weights(folder)
        if total and set(weights) != set(total):
            raise TestbedError(f"checkpoint {str(folder)!r} holds other tensors than {str(folders[0])!r}; "
                               f"average checkpoints of one run only")
        for key, tensor in weights.items():
            if key in total:
                if tensor.shape != total[key].shape:
                    raise TestbedError(f"checkpoint {str(folder)!r}: {key} has shape {tuple(tensor.shape)}, "
                                       f"not {tuple(total[key].shape)}; average checkpoints of one run only")
                total[key] += tensor.double()
            else:
                total[key], dtypes[key] = tensor.double(), tensor.dtype
    return {key: (value / len(folders)).to(dtypes[key]) for key, value in total.items()}


def average_checkpoints(run_dir: str | Path, last: int, out: str | Path | None = None,
                        device: str | None = None, phase: str | None = None, say=None,
                        until: int | None = None) -> dict:
    """Average the last `last` checkpoints of a run (with `phase`: of that schedule phase only; with
    `until`: the last up to that step, which must have one),
    evaluate the average, append the record to RUN_DIR/averages.jsonl and return it; `out`: also
    write the averaged model as a Hugging Face Llama folder (as `testbed export` does). `say`
    (e.g. print) gets one line naming the checkpoints and the phases they mix, before the
    evaluation."""
    rd = RunDir(run_dir)
    if not rd.path.is_dir():
        what = "is a file, not a run directory" if rd.path.exists() else "does not exist"
        raise TestbedError(f"{str(rd.path)!r} {what}; pass the run directory (the folder given to "
                           f"`testbed train --run-dir`, holding run.json and checkpoints/)")
    config = load_run_config(rd.path)
    chosen = last_checkpoints(rd, last, phase, config, until)
    if say is not None:
        say(describe_choice(chosen))
    if out is not None:
        check_writable(Path(out), "--out")
    averaged = average_weights([rd.path / line["path"] for line in chosen])

    target = dev.resolve_device(device or config.train.device)
    dtype = dev.resolve_precision(config.train.precision, target)
    model_cfg = resolved_model(config)
    model = Transformer(model_cfg).to(target)
    load_model_state(model, {k: v.to(target) for k, v in averaged.items()}, config, Dist())
    source = data_loader.make_source(config)
    val_ids = data_loader.validation_windows(source, config.data.val_sequences)
    optimum = None
    if getattr(source, "has_optimum", False):
        optimum = float(source.optimal_nats(source.windows(val_ids, data_loader.VALIDATION)).sum())
    summary = (rd.read_run() or {}).get("summary") or {}
    micro = config.train.micro_batch_size or summary.get("micro_batch_size") or len(val_ids)
    scores = evaluate(model, source, val_ids, int(micro), target, dtype, Dist(), optimum)

    newest = chosen[-1]
    record = {"step": newest["step"], "tokens": newest.get("tokens"), "flops": newest.get("flops"),
              "last": last, "steps": [line["step"] for line in chosen], **scores,
              "out": str(out) if out is not None else None, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if out is not None:
        try:
            save_hf(averaged, model_cfg, out)
        except OSError as err:
            raise TestbedError(f"--out {str(out)!r} cannot be written ({err.strerror or err}); choose an "
                               f"output folder on a writable disk with room") from None
    rd.append_average(record)
    return record
