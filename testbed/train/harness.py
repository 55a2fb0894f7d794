"""`testbed eval harness`: a run's checkpoint through EleutherAI's lm-evaluation-harness.

The checkpoint is exported (testbed/train/export.py) with the tokenizer of the folder the run
trained on into a temporary folder, which `python -m lm_eval --model hf` then loads like any
transformers model. lm-eval is not a dependency of the testbed: without it the command stops
at once, naming the package to install.
"""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from testbed.config import saved_config
from testbed.errors import TestbedError
from testbed.rundir import RunDir
from testbed.train import checkpoint as ckpt
from testbed.train.export import export_checkpoint


def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise TestbedError("lm_eval is not installed; pip install lm-eval")


def harness_command(model_dir: str | Path, tasks: str, device: str = "cpu", batch_size: int = 8,
                    limit: float | None = None, out: str | Path | None = None) -> list[str]:
    """The lm_eval command line that scores the exported folder `model_dir`."""
    command = [sys.executable, "-m", "lm_eval", "--model", "hf",
               "--model_args", f"pretrained={model_dir},tokenizer={model_dir},dtype=float32",
               "--tasks", tasks, "--device", device, "--batch_size", str(batch_size)]
    if limit is not None:
        command += ["--limit", f"{limit:g}"]
    if out is not None:
        command += ["--output_path", str(out)]
    return command


def pick_checkpoint(run_dir: Path, step: int | None) -> Path:
    if step is not None:
        folder = RunDir(run_dir).checkpoints / f"step_{step:08d}"
        if not (folder / "state.json").is_file():
            steps = [ckpt.step_of(f) for f in ckpt.list_checkpoints(run_dir)]
            raise TestbedError(f"--step {step}: {str(run_dir)!r} has no checkpoint at that step; "
                               f"choose one of {steps or 'none (train with checkpoints first)'}")
        return folder
    folder = ckpt.latest_valid(run_dir)
    if folder is None:
        raise TestbedError(f"{str(run_dir)!r} has no valid checkpoint to evaluate; pass a run directory "
                           f"with checkpoints/step_*")
    return folder


def save_tokenizer(checkpoint: Path, tokenizer: str | None, out: Path) -> None:
    """The run's tokenizer (or `tokenizer`, a folder or hub name) beside the exported weights."""
    from testbed.data.shards import read_manifest
    from testbed.data.tokenizer import load_pretrained, load_saved

    if tokenizer is not None:
        load_pretrained(tokenizer).save(out)
        return
    config = saved_config(ckpt.read_state(checkpoint)["config"])
    folder = Path(config.data.path) if config.data.path else None
    if folder is None or not (folder / "tokenizer.json").is_file():
        where = (f"data.path={config.data.path!r} holds no tokenizer.json (moved?)" if folder
                 else f"the run trained on data.source={config.data.source!r}, which has no text tokenizer")
        raise TestbedError(f"the harness needs the run's tokenizer, but {where}; pass --tokenizer "
                           f"FOLDER_OR_NAME")
    eos_id = int(read_manifest(folder)["eos_id"])
    load_saved(folder, eos_id).save(out)


def run_harness(run_dir: str | Path, tasks: str, step: int | None = None, device: str = "cpu",
                batch_size: int = 8, limit: float | None = None, out: str | Path | None = None,
                tokenizer: str | None = None) -> int:
    """Export, then run lm_eval; its exit status."""
    require_lm_eval()  # before the export: a missing package is the common failure
    run_dir = Path(run_dir)
    checkpoint = pick_checkpoint(run_dir, step)
    with tempfile.TemporaryDirectory(prefix="testbed-harness-") as tmp:
        export_checkpoint(checkpoint, tmp)
        save_tokenizer(checkpoint, tokenizer, Path(tmp))
        command = harness_command(tmp, tasks, device, batch_size, limit, out)
        print(f"{checkpoint}: {shlex.join(command)}", flush=True)
        return subprocess.run(command).returncode
