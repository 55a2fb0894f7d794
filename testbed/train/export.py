"""`testbed export`: a training checkpoint -> a transformers folder, LlamaForCausalLM or
Qwen3ForCausalLM (see testbed/model/hf.py).

Export needs only the checkpoint: the vocabulary comes from its embedding, never from the data
folder the run trained on (which may have moved since)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from testbed.config import saved_config
from testbed.errors import TestbedError
from testbed.model.hf import save_hf
from testbed.train import checkpoint as ckpt
from testbed.train.trainer import check_writable


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """Write config.json + model.safetensors for the model's transformers class from a testbed
    checkpoint."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    if not (checkpoint_dir / "state.json").is_file():
        raise TestbedError(f"{str(checkpoint_dir)!r} is not a checkpoint folder; pass "
                           f"RUN_DIR/checkpoints/step_XXXXXXXX")
    check_writable(out_dir, "export target")
    loaded = ckpt.load(checkpoint_dir)
    config = saved_config(loaded["state"]["config"])
    model = dataclasses.replace(config.model, vocab_size=int(loaded["model"]["embed.weight"].shape[0]))
    try:
        return save_hf(loaded["model"], model, out_dir)
    except OSError as err:
        raise TestbedError(f"export target {str(out_dir)!r} cannot be written ({err.strerror or err}); "
                           f"choose an output folder on a writable disk with room") from None
