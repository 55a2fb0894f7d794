"""Checkpoints on disk: atomic, checksummed, never unpickled.

A checkpoint is a folder `checkpoints/step_XXXXXXXX/` holding
    model.safetensors   the weights (unwrapped, full, fp32 as trained)
    optim.safetensors   the optimiser's tensors (per-parameter state, RNG states)
    ema.safetensors     with train.ema_decay on: the moving average of the weights (as model's)
    state.json          everything else: step, kind, tokens, total_steps, run_id, world_size,
                        the resolved config, optimiser param groups and scalars, the open
                        train-loss window (the data order follows from the step)
    SHA256SUMS          sha256 of each file above
It is written to a hidden temporary folder, fsynced and renamed into place, so a kill at any
moment leaves either the previous checkpoints or the complete new one. `checkpoints/index.jsonl`
gets one line per checkpoint (see docs/run-directory.md). Loading verifies every checksum; a
damaged newest checkpoint is skipped, with a warning, for the one before it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from testbed.errors import TestbedError
from testbed.rundir import CHECKPOINT_KINDS, RunDir, fsync_dir, storage_error

KIND_RANK = {kind: rank for rank, kind in enumerate(CHECKPOINT_KINDS)}  # rolling < science < final
FILES = ("model.safetensors", "optim.safetensors", "state.json")
EMA_FILE = "ema.safetensors"  # only with train.ema_decay on; listed in SHA256SUMS when present
FOLDER = re.compile(r"step_(\d+)")


def folder_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(folder: Path) -> int:
    return int(FOLDER.fullmatch(folder.name).group(1))  # type: ignore[union-attr]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- optimiser state


def flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split torch's optimiser state into tensors (for safetensors) and JSON (the rest)."""
    tensors, scalars = {}, {}
    for idx, pstate in state_dict["state"].items():
        for name, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if not key.startswith("state."):
            continue
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# ----------------------------------------------------------------------------- save


def save(run_dir: Path, step: int, kind: str, model_state: dict[str, torch.Tensor],
         optim_state: dict, rng: dict[str, torch.Tensor], state: dict, index_fields: dict,
         ema_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write one checkpoint atomically and append its line to the index. Rank 0 only."""
    ckpt_root = RunDir(run_dir).checkpoints
    name = folder_name(step)
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
    needed = sum(t.numel() * t.element_size() for t in (*model_state.values(), *(ema_state or {}).values()))
    needed += sum(t.numel() * t.element_size() for p in optim_state["state"].values() for t in p.values()
                  if torch.is_tensor(t))
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _write_folder(tmp, kind, step, model_state, optim_state, rng, state, ema_state)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _storage_error(err, final, needed, "the partial folder was removed") from None
    try:
        _move_into_place(ckpt_root, tmp, final)
        RunDir(run_dir).append_index(dict(index_fields, step=step, kind=kind, path=f"checkpoints/{name}"))
    except OSError as err:
        raise _storage_error(err, final, 0, "the folder is complete but may lack its index line, "
                                            "which the resume writes") from None
    return final


def _storage_error(err: OSError, final: Path, needed: int, written: str) -> OSError:
    """A full, over-quota or read-only disk as one error (rundir.storage_error); any other
    OSError as it is."""
    return storage_error(err, final, what=f"checkpoint {str(final)!r}", needed=needed,
                         state=f"{written}, and the earlier checkpoints are intact",
                         again="run the same command with --resume")


def _untied(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Shared storage (tied embeddings) cannot be saved twice by safetensors: keep the first name."""
    seen: dict[int, str] = {}
    weights = {}
    for key, tensor in model_state.items():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen and tensor.numel() > 0:
            continue
        seen[ptr] = key
        weights[key] = tensor.detach().contiguous().cpu()
    return weights


def _write_folder(tmp: Path, kind: str, step: int, model_state: dict[str, torch.Tensor], optim_state: dict,
                  rng: dict[str, torch.Tensor], state: dict, ema_state: dict[str, torch.Tensor] | None) -> None:
    _save_tensors(_untied(model_state), tmp / "model.safetensors")
    files: tuple[str, ...] = FILES
    if ema_state is not None:
        _save_tensors(_untied(ema_state), tmp / EMA_FILE)
        files = (*FILES, EMA_FILE)
    opt_tensors, opt_meta = flatten_optimizer(optim_state)
    for key, value in rng.items():
        opt_tensors[f"rng.{key}"] = value.contiguous().cpu()
    _save_tensors(opt_tensors, tmp / "optim.safetensors")
    state = dict(state, step=step, kind=kind, optimizer=opt_meta)
    (tmp / "state.json").write_text(json.dumps(state, indent=1, default=str))
    sums = "".join(f"{sha256(tmp / f)}  {f}\n" for f in files)
    (tmp / "SHA256SUMS").write_text(sums)
    for f in (*files, "SHA256SUMS"):
        with open(tmp / f, "rb") as fh:
            os.fsync(fh.fileno())


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    try:
        save_file(tensors, str(path))
    except OSError:
        raise
    except Exception as err:  # safetensors reports I/O errors as its own type: "... (os error 28)"
        found = re.search(r"os error (\d+)", str(err))
        if found is None:
            raise
        raise OSError(int(found.group(1)), str(err), str(path)) from err


def _move_into_place(ckpt_root: Path, tmp: Path, final: Path) -> None:
    name = final.name
    if final.exists():  # the same step saved again (e.g. science and final): replace it
        old = ckpt_root / f".old-{name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(ckpt_root)


def read_index(run_dir: Path) -> list[dict]:
    return RunDir(run_dir).index()


def apply_retention(run_dir: Path, keep_rolling: int) -> None:
    """Keep every science and final checkpoint; of rolling-only folders keep the newest n."""
    lines = read_index(run_dir)
    best_kind: dict[str, str] = {}
    for line in lines:
        if line.get("deleted"):
            continue
        k = best_kind.get(line["path"])
        if k is None or KIND_RANK[line["kind"]] > KIND_RANK[k]:
            best_kind[line["path"]] = line["kind"]
    rolling = sorted((p for p, k in best_kind.items() if k == "rolling"))
    doomed = set(rolling[:-keep_rolling]) if len(rolling) > keep_rolling else set()
    if not doomed:
        return
    for path in doomed:
        shutil.rmtree(Path(run_dir) / path, ignore_errors=True)
    for line in lines:
        if line["path"] in doomed:
            line["deleted"] = True
    RunDir(run_dir).write_index(lines)


def truncate_index(run_dir: Path, after_step: int) -> None:
    """On resume: forget index lines of checkpoints newer than the one resumed from."""
    lines = read_index(run_dir)
    kept = [line for line in lines if line["step"] <= after_step]
    if len(kept) != len(lines):
        RunDir(run_dir).write_index(kept)


def set_aside_newer(run_dir: Path, step: int) -> list[Path]:
    """On resume from `step`: move the checkpoint folders newer than it (the resume skipped them
    as damaged) to hidden `.damaged-step_*` folders, kept for inspection. Left in place, they
    would sit outside the index, escape retention and be re-examined at every resume."""
    moved = []
    for folder in list_checkpoints(run_dir):
        if step_of(folder) > step:
            aside = folder.with_name(f".damaged-{folder.name}")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(folder, aside)
            moved.append(aside)
    return moved


# ----------------------------------------------------------------------------- load


def verify(folder: Path) -> str | None:
    """None if the folder is complete and every checksum matches, else what is wrong."""
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        return "SHA256SUMS is missing"
    expected = {}
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            expected[parts[1]] = parts[0]
    for f in FILES:
        if f not in expected:
            return f"{f} is not listed in SHA256SUMS"
    for f in expected:  # the required files and the optional ones present (ema.safetensors)
        if f not in (*FILES, EMA_FILE):
            return f"SHA256SUMS lists an unknown file {f!r}"
        if not (folder / f).is_file():
            return f"{f} is missing"
        if sha256(folder / f) != expected[f]:
            return f"{f} does not match its checksum (truncated or modified)"
    state = read_state(folder)
    if state is None:
        return "state.json is not a JSON object"
    named = FOLDER.fullmatch(folder.name)
    if (named and state.get("step") != int(named.group(1))) or not isinstance(state.get("step"), int) \
            or state.get("kind") not in KIND_RANK:
        return f"state.json has step {state.get('step')!r} and kind {state.get('kind')!r}"
    if not isinstance(state.get("optimizer"), dict) or not isinstance(state.get("config"), dict):
        return "state.json lacks the optimizer state or the config"
    return None


def read_state(folder: Path) -> dict[str, Any] | None:
    """A checkpoint's state.json, or None when it is missing or does not parse."""
    try:
        state = json.loads((folder / "state.json").read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders (step_<digits>), oldest first; anything else in checkpoints/ (a stray
    folder or file, a hidden .tmp-/.old-/.damaged- folder) is not a checkpoint and is ignored."""
    root = RunDir(run_dir).checkpoints
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if FOLDER.fullmatch(p.name) and p.is_dir()), key=step_of)


def clear_interrupted(run_dir: Path) -> list[str]:
    """On resume: what interrupted saves left in checkpoints/. A `.tmp-*` folder never completed
    its rename: removed. An `.old-step_*` folder is the previous copy of a checkpoint being
    replaced: removed, or renamed back when the kill came before the new copy took its place.
    Returns a line per folder for train.log."""
    root = RunDir(run_dir).checkpoints
    if not root.is_dir():
        return []
    done = []
    for path in sorted(root.iterdir()):
        if not path.is_dir():
            continue
        if path.name.startswith(".tmp-"):
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path}, left by an interrupted checkpoint save")
        elif path.name.startswith(".old-"):
            name = path.name[len(".old-"):].rsplit("-", 1)[0]
            if FOLDER.fullmatch(name) and not (root / name).exists() and verify(path) is None:
                os.replace(path, root / name)
                done.append(f"restored {root / name} from {path}, left by an interrupted checkpoint save")
            else:
                shutil.rmtree(path, ignore_errors=True)
                done.append(f"removed {path}, left by an interrupted checkpoint save")
    if done:
        fsync_dir(root)
    return done


def unindexed(run_dir: Path, max_step: int) -> list[Path]:
    """Verified checkpoint folders up to `max_step` that no index line names (a kill between a
    folder's rename and its index line, or an index line lost with a cut tail)."""
    named = {line.get("path") for line in read_index(run_dir)}
    return [folder for folder in list_checkpoints(run_dir)
            if step_of(folder) <= max_step and f"checkpoints/{folder.name}" not in named
            and verify(folder) is None]


def latest_valid(run_dir: Path, max_step: int | None = None) -> Path | None:
    """The newest checkpoint that verifies; damaged ones are skipped with a warning."""
    for folder in reversed(list_checkpoints(run_dir)):
        step = step_of(folder)
        if max_step is not None and step > max_step:
            continue
        problem = verify(folder)
        if problem is None:
            return folder
        warnings.warn(f"checkpoint {folder} is damaged ({problem}); falling back to an earlier one",
                      stacklevel=2)
    return None


def load(folder: Path) -> dict[str, Any]:
    problem = verify(folder)
    if problem:
        raise TestbedError(f"checkpoint {str(folder)!r} is damaged: {problem}; resume from an earlier "
                           f"checkpoint or retrain")
    try:
        model = load_file(str(folder / "model.safetensors"))
        opt = load_file(str(folder / "optim.safetensors"))
        ema = load_file(str(folder / EMA_FILE)) if (folder / EMA_FILE).is_file() else None
    except Exception as err:  # safetensors' own error type: the files hold no valid tensors
        raise TestbedError(f"checkpoint {str(folder)!r} is damaged: its tensors do not load ({err}); resume "
                           f"from an earlier checkpoint or retrain") from None
    state = read_state(folder) or {}
    rng = {k[len("rng."):]: v for k, v in opt.items() if k.startswith("rng.")}
    optim_state = unflatten_optimizer(opt, state.pop("optimizer"))
    return {"model": model, "optim": optim_state, "rng": rng, "state": state, "ema": ema}


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Only the weights of a checkpoint (verified like load's), for averaging or evaluation."""
    problem = verify(folder)
    if not problem:
        try:
            return load_file(str(folder / "model.safetensors"))
        except Exception as err:  # safetensors' own error type: the file holds no valid tensors
            problem = f"its weights do not load ({err})"
    if not folder.is_dir():  # not damage: a trainer still running removed it under its keep policy
        raise TestbedError(f"checkpoint {str(folder)!r} was removed while it was being read (the run's "
                           f"trainer deletes rolling checkpoints beyond checkpoint.keep_rolling); run again to "
                           f"use the checkpoints saved now")
    raise TestbedError(f"checkpoint {str(folder)!r} is damaged: {problem}; leave it out or retrain")


def checkpoint_at(run_dir: Path, step: int) -> Path:
    folder = Path(run_dir) / "checkpoints" / folder_name(step)
    if not folder.is_dir():
        steps = [step_of(p) for p in list_checkpoints(run_dir)]
        raise TestbedError(f"--step {step}: {run_dir} has no checkpoint at that step; "
                           f"checkpoints exist at steps {steps}")
    return folder
