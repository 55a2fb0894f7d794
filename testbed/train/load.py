"""Load a trained model to evaluate or sample from: `load(RUN_OR_CHECKPOINT)`.

    from testbed.train.load import load

    m = load("runs/one")                     # the newest valid checkpoint; or step=, or a
                                             # RUN/checkpoints/step_XXXXXXXX folder
    m.model                                  # the testbed Transformer, eval mode, on `device`
    m.tokenizer                              # the run's TextTokenizer, or None (synthetic data)
    m.sample("The quick brown", max_new_tokens=20)      # text; temperature 0 is greedy
    m.evaluate()                             # val_loss / val_bpb on the run's validation windows

The weights are read from the checkpoint alone (checked against its checksums); the config is
the one saved in it. The tokenizer is the run's (data.path, as `testbed export` finds it) or
`tokenizer=` (a folder or hub name). `testbed sample` is the command-line form.

Text is encoded as the model saw documents in training: EOS, then the text.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from testbed.config import Config, saved_config
from testbed.errors import TestbedError
from testbed.model.transformer import Transformer
from testbed.rundir import RunDir
from testbed.train import checkpoint as ckpt
from testbed.train import device as dev
from testbed.train.distributed import Dist, load_model_state
from testbed.train.export import run_tokenizer

if TYPE_CHECKING:
    from testbed.data.tokenizer import TextTokenizer


def pick_checkpoint(run_dir: Path, step: int | None) -> Path:
    """Checkpoint `step` of the run, or its newest valid one."""
    if step is not None:
        folder = RunDir(run_dir).checkpoints / ckpt.folder_name(step)
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


def resolve_checkpoint(path: str | Path, step: int | None = None) -> Path:
    """A checkpoint folder from a checkpoint folder or a run directory (+ step)."""
    path = Path(path)
    if (path / "state.json").is_file():
        if step is not None and ckpt.step_of(path) != step:
            raise TestbedError(f"{str(path)!r} is the checkpoint of step {ckpt.step_of(path)}, not --step {step}; "
                               f"pass the run directory with --step, or the checkpoint alone")
        return path
    if not path.is_dir():
        raise TestbedError(f"{str(path)!r} does not exist; pass a run directory or RUN_DIR/checkpoints/step_XXXXXXXX")
    if not RunDir(path).checkpoints.is_dir():
        raise TestbedError(f"{str(path)!r} is neither a run directory (no checkpoints/) nor a checkpoint "
                           f"folder (no state.json); pass RUN_DIR or RUN_DIR/checkpoints/step_XXXXXXXX")
    return pick_checkpoint(path, step)


@dataclasses.dataclass
class Loaded:
    """A trained model, ready to evaluate: see the module doc."""

    model: Transformer
    tokenizer: TextTokenizer | None
    config: Config
    checkpoint: Path
    step: int
    device: torch.device
    tokenizer_from: str  # where the tokenizer came from, or why there is none

    @property
    def dtype(self) -> torch.dtype:
        """The run's evaluation precision on this device (fp32 on a CPU)."""
        return dev.resolve_precision(self.config.train.precision, self.device)

    def _need_tokenizer(self) -> TextTokenizer:
        if self.tokenizer is None:
            raise TestbedError(f"text needs the run's tokenizer, but {self.tokenizer_from}")
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        """EOS + the text's tokens: a document start, as in training."""
        tok = self._need_tokenizer()
        return [tok.eos_id, *tok.encode_batch([text])[0]]

    def decode(self, ids: list[int]) -> str:
        """The text of `ids`, special tokens (EOS) left out."""
        backend: Any = self._need_tokenizer().backend  # a tokenizers.Tokenizer
        return backend.decode(list(ids), skip_special_tokens=True)

    @torch.no_grad()
    def generate(self, ids: list[int], max_new_tokens: int = 50, temperature: float = 0.0,
                 top_k: int | None = None, seed: int = 0, stop_at_eos: bool = True) -> list[int]:
        """Up to `max_new_tokens` token ids after `ids`: greedy at temperature 0, else sampled from
        softmax(logits / temperature) over the `top_k` likeliest (all when None), with a
        generator seeded by `seed`. The model reads at most its last model.max_seq_len tokens.
        stop_at_eos: stop after the first EOS (the end of a document), when the run has one."""
        if not ids:
            raise TestbedError("generation needs at least one token to start from (EOS starts a text)")
        if temperature < 0 or max_new_tokens < 0 or (top_k is not None and top_k < 1):
            raise TestbedError(f"temperature={temperature}, max_new_tokens={max_new_tokens} and top_k={top_k} "
                               f"must be >= 0, >= 0 and >= 1")
        eos = self.tokenizer.eos_id if (stop_at_eos and self.tokenizer is not None) else None
        window = self.model.cfg.max_seq_len
        generator = torch.Generator(device=self.device).manual_seed(seed)
        tokens = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        new: list[int] = []
        self.model.eval()
        for _ in range(max_new_tokens):
            with dev.autocast(self.device, self.dtype):
                logits = self.model(tokens[:, -window:])[0, -1].float()
            if temperature == 0:
                token = int(logits.argmax())
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.numel():
                    cutoff = torch.topk(logits, top_k).values[-1]
                    logits = logits.masked_fill(logits < cutoff, float("-inf"))
                token = int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))
            new.append(token)
            if token == eos:
                break
            tokens = torch.cat([tokens, torch.tensor([[token]], device=self.device)], dim=1)
        return new

    def sample(self, prompt: str, max_new_tokens: int = 50, temperature: float = 0.0,
               top_k: int | None = None, seed: int = 0) -> str:
        """The text the model writes after `prompt` (without the prompt; see generate)."""
        ids = self.encode(prompt)
        new = self.generate(ids, max_new_tokens, temperature, top_k, seed)
        # Decoded together: a character may span the prompt's last token and the first new one.
        return self.decode(ids + new)[len(self.decode(ids)):]

    def evaluate(self) -> dict[str, float]:
        """val_loss (nats/token), val_bits_per_token and val_bpb on the run's validation windows,
        computed as the trainer does (the same numbers it logged for this checkpoint)."""
        from testbed.data import loader as data_loader
        from testbed.train.trainer import evaluate

        source = data_loader.make_source(self.config)
        val_ids = data_loader.validation_windows(source, self.config.data.val_sequences)
        optimum = None
        if getattr(source, "has_optimum", False):
            optimum = float(source.optimal_nats(source.windows(val_ids, data_loader.VALIDATION)).sum())
        micro = self.config.train.micro_batch_size or len(val_ids)
        return evaluate(self.model, source, val_ids, int(micro), self.device, self.dtype, Dist(), optimum)


def load(path: str | Path, step: int | None = None, device: str = "cpu",
         tokenizer: str | None = None) -> Loaded:
    """The model of a checkpoint folder, or of a run directory's newest valid checkpoint (or
    `step`), in eval mode on `device` ("cpu", "cuda:0", "auto"), with the run's tokenizer
    (or `tokenizer`, a folder or hub name) where there is one."""
    from testbed.plan import import_plugins

    folder = resolve_checkpoint(path, step)
    state = ckpt.read_state(folder)
    if state is None or not isinstance(state.get("config"), dict):
        raise TestbedError(f"checkpoint {str(folder)!r} is damaged: its state.json does not parse; "
                           f"pass an earlier checkpoint")
    config = saved_config(state["config"])
    import_plugins(config)
    weights = ckpt.load_weights(folder)
    model_cfg = dataclasses.replace(config.model, vocab_size=int(weights["embed.weight"].shape[0]))
    target = dev.resolve_device(device)
    model = Transformer(model_cfg)
    load_model_state(model, weights, config, Dist())
    model = model.to(target).eval()
    text_tokenizer, where = run_tokenizer(config, tokenizer)
    return Loaded(model=model, tokenizer=text_tokenizer, config=config, checkpoint=folder,
                  step=int(state.get("step", ckpt.step_of(folder))), device=target, tokenizer_from=where)
