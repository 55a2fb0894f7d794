"""`testbed export`: a training checkpoint -> a LlamaForCausalLM folder (see testbed/model/hf.py)."""

from __future__ import annotations

from pathlib import Path

from testbed.config import saved_config
from testbed.errors import TestbedError
from testbed.model.hf import save_llama
from testbed.plan import resolved_model
from testbed.train import checkpoint as ckpt


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """Write config.json + model.safetensors for LlamaForCausalLM from a testbed checkpoint."""
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / "state.json").is_file():
        raise TestbedError(f"{str(checkpoint_dir)!r} is not a checkpoint folder; pass "
                           f"RUN_DIR/checkpoints/step_XXXXXXXX")
    loaded = ckpt.load(checkpoint_dir)
    return save_llama(loaded["model"], resolved_model(saved_config(loaded["state"]["config"])), out_dir)
