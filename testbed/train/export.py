"""`testbed export`: a training checkpoint -> a transformers folder, LlamaForCausalLM or
Qwen3ForCausalLM (see testbed/model/hf.py), with the run's tokenizer when it had one.

The weights need only the checkpoint: the vocabulary comes from its embedding. The tokenizer
comes from the folder the run trained on (data.path, written by `testbed data prepare`: its
tokenizer.json and the EOS id of its manifest) or from `tokenizer=` (a folder or hub name). With
it the folder also gets EOS as BOS and EOS in config.json and a generation_config.json, so
AutoTokenizer, AutoModelForCausalLM and `generate` work on the folder alone. Without one (the
synthetic language and `random` data have no text; a data folder that has moved) the weights
are still written, and the summary line says what is missing and why.

The exported tokenizer puts EOS in front of every text it encodes (add_special_tokens, the
transformers default): in training every document followed an EOS, and the in-loop task scores
(testbed/train/tasks.py) condition on one the same way, so lm-eval and `generate` see what the
model was trained on.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from testbed.config import Config, saved_config
from testbed.errors import TestbedError
from testbed.model.hf import save_hf
from testbed.train import checkpoint as ckpt
from testbed.train.trainer import check_writable


@dataclasses.dataclass
class Exported:
    """What `export` wrote to `out`; `missing`: why no tokenizer was written (None: one was)."""

    out: Path
    files: list[str]
    tokenizer_from: str | None = None
    missing: str | None = None

    def summary(self) -> str:
        """One line: the files written and, without a tokenizer, what is not and why."""
        line = f"wrote {', '.join(str(self.out / f) for f in self.files)}"
        if self.tokenizer_from:
            line += f" (tokenizer from {self.tokenizer_from})"
        if self.missing:
            line += (f"; no tokenizer files, generation_config.json or EOS id, because {self.missing}: "
                     f"AutoModelForCausalLM loads the folder, AutoTokenizer does not")
        return line


def run_tokenizer(config: Config, tokenizer: str | None = None):
    """(TextTokenizer, where it came from) for the run of `config`, or (None, why there is none).

    `tokenizer`: a folder or hub name that replaces the run's (load_pretrained)."""
    from testbed.data.shards import read_manifest
    from testbed.data.tokenizer import load_pretrained, load_saved

    if tokenizer is not None:
        return load_pretrained(tokenizer), f"--tokenizer {tokenizer}"
    if not config.data.path:
        return None, f"the run trained on data.source={config.data.source!r}, which has no text tokenizer"
    folder = Path(config.data.path)
    if not (folder / "tokenizer.json").is_file():
        return None, (f"the run's data.path={config.data.path!r} holds no tokenizer.json (moved? pass "
                      f"--tokenizer FOLDER_OR_NAME)")
    return load_saved(folder, int(read_manifest(folder)["eos_id"])), f"data.path={config.data.path}"


def save_tokenizer(tokenizer, out_dir: Path, max_length: int) -> list[str]:
    """tokenizer.json + tokenizer_config.json that AutoTokenizer loads: the run's tokenizer with
    its EOS as BOS, EOS and pad token, put in front of each encoded text (see the module doc)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tokenizer.backend.to_str())  # a copy: the source stays as it is
    eos = backend.id_to_token(tokenizer.eos_id)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{eos} $A", pair=f"{eos} $A {eos} $B:1", special_tokens=[(eos, tokenizer.eos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=eos, eos_token=eos, pad_token=eos,
                                   model_max_length=max_length)
    written = [Path(p).name for p in fast.save_pretrained(str(out_dir))]
    # The class every transformers release since 4.x loads (5.x writes its own new name).
    config_file = out_dir / "tokenizer_config.json"
    tok_config = json.loads(config_file.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(tok_config, indent=1))
    return sorted(set(written))


def export(checkpoint_dir: str | Path, out_dir: str | Path, tokenizer: str | None = None,
           need_tokenizer: bool = False) -> Exported:
    """Write the checkpoint as a transformers folder: config.json + model.safetensors, and with
    the run's tokenizer (or `tokenizer`) also tokenizer.json, tokenizer_config.json and
    generation_config.json. need_tokenizer: no tokenizer is an error instead of a note."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    if not (checkpoint_dir / "state.json").is_file():
        raise TestbedError(f"{str(checkpoint_dir)!r} is not a checkpoint folder; pass "
                           f"RUN_DIR/checkpoints/step_XXXXXXXX")
    check_writable(out_dir, "export target")
    loaded = ckpt.load(checkpoint_dir)
    config = saved_config(loaded["state"]["config"])
    model = dataclasses.replace(config.model, vocab_size=int(loaded["model"]["embed.weight"].shape[0]))
    text_tokenizer, where = run_tokenizer(config, tokenizer)
    if text_tokenizer is None and need_tokenizer:
        raise TestbedError(f"this needs the run's tokenizer, but {where}")
    if text_tokenizer is not None and text_tokenizer.vocab_size > model.vocab_size:
        raise TestbedError(f"the tokenizer from {where} has {text_tokenizer.vocab_size} tokens, more than the "
                           f"model's {model.vocab_size}; pass the tokenizer the run trained with")
    eos = text_tokenizer.eos_id if text_tokenizer is not None else None
    try:
        save_hf(loaded["model"], model, out_dir, eos_token_id=eos)
        files = ["config.json", "model.safetensors"]
        if text_tokenizer is None:
            return Exported(out_dir, files, missing=where)
        files += ["generation_config.json", *save_tokenizer(text_tokenizer, out_dir, model.max_seq_len)]
    except OSError as err:
        raise TestbedError(f"export target {str(out_dir)!r} cannot be written ({err.strerror or err}); "
                           f"choose an output folder on a writable disk with room") from None
    return Exported(out_dir, files, tokenizer_from=where)


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, tokenizer: str | None = None) -> Path:
    """`export`, returning only the output folder."""
    return export(checkpoint_dir, out_dir, tokenizer).out
