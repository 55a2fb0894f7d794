"""End-to-end training on the built-in synthetic language."""

import json
import math

import pytest

from testbed.config import load_config
from testbed.errors import TestbedError
from testbed.train.trainer import train

TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=64",
        "data.seq_len=32", "train.global_batch_tokens=512", "train.log_every=1", "train.eval_every=10",
        "logging.wandb=false", "logging.progress=false", "data.val_sequences=32"]


def cfg(*extra):
    return load_config(None, TINY + list(extra))


def lines(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_identical_runs_give_identical_losses(tmp_path):
    a = train(cfg("train.steps=12"), tmp_path / "a")
    b = train(cfg("train.steps=12"), tmp_path / "b")
    la = [x["train_loss"] for x in lines(tmp_path / "a") if "train_loss" in x]
    lb = [x["train_loss"] for x in lines(tmp_path / "b") if "train_loss" in x]
    assert len(la) == 12 and la == lb
    assert a["val_loss"] == b["val_loss"]
    c = train(cfg("train.steps=12", "train.seed=1"), tmp_path / "c")
    assert c["val_loss"] != a["val_loss"]


def test_micro_batches_accumulate_to_the_same_step(tmp_path):
    whole = train(cfg("train.steps=6"), tmp_path / "whole")
    accum = train(cfg("train.steps=6", "train.micro_batch_size=4"), tmp_path / "accum")
    lw = [x["train_loss"] for x in lines(tmp_path / "whole") if "train_loss" in x]
    la = [x["train_loss"] for x in lines(tmp_path / "accum") if "train_loss" in x]
    assert la == pytest.approx(lw, rel=1e-5)
    assert accum["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-5)


@pytest.mark.slow
def test_loss_falls_clearly_below_the_unigram_entropy(tmp_path):
    from testbed.data.synthetic import SyntheticLanguage, SyntheticSpec

    # A 32-token language: its order-2 structure is learnable within a few hundred steps.
    unigram = SyntheticLanguage(SyntheticSpec(vocab_size=32)).unigram_entropy()
    config = load_config(None, ["model.d_model=64", "model.n_layers=2", "model.n_heads=4",
                                "model.max_seq_len=64", "data.seq_len=64", "train.global_batch_tokens=2048",
                                "train.steps=500", "optim.lr=3e-3", "schedule.warmup_steps=20",
                                "data.synthetic={vocab_size: 32}", "logging.wandb=false",
                                "logging.progress=false", "train.eval_every=500"])
    summary = train(config, tmp_path / "run")
    assert summary["val_loss"] < unigram - 0.25, (summary["val_loss"], unigram)
    assert summary["val_loss"] > summary["val_opt_loss"]  # never below the exact optimum
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["data_entropy"] == pytest.approx(summary["val_opt_loss"])


def test_run_directory_contract(tmp_path):
    summary = train(cfg("train.steps=10", "checkpoint.every=5"), tmp_path / "r")
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    for key in ("n_params", "n_params_non_embedding", "n_params_embedding", "flops_per_token",
                "planned_tokens", "planned_steps", "vocab_size", "config", "summary"):
        assert key in run
    assert run["planned_tokens"] == 10 * 512 and run["vocab_size"] == 128
    assert run["n_params"] == run["n_params_non_embedding"] + run["n_params_embedding"]
    ls = lines(tmp_path / "r")
    train_lines = [x for x in ls if "train_loss" in x]
    eval_lines = [x for x in ls if "val_loss" in x]
    assert [x["step"] for x in train_lines] == list(range(1, 11))
    assert all(x["tokens"] == x["step"] * 512 for x in ls)
    assert all(x["flops"] == x["tokens"] * run["flops_per_token"] for x in ls)
    assert [x["step"] for x in eval_lines] == [5, 10]
    for x in eval_lines:
        assert x["val_bpb"] == pytest.approx(x["val_loss"] / math.log(2))  # synthetic: 1 byte a token
        assert x["val_excess_loss"] == pytest.approx(x["val_loss"] - x["val_opt_loss"])
    assert json.loads((tmp_path / "r" / "status.json").read_text())["state"] == "done"
    assert summary["val_loss"] == eval_lines[-1]["val_loss"]


def test_wandb_offline_run_files_are_written(tmp_path):
    config = load_config(None, TINY + ["train.steps=3", "logging.wandb=true"])
    train(config, tmp_path / "w")
    runs = list((tmp_path / "w" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")), "the offline run holds no .wandb log"


def test_nonfinite_loss_stops_with_the_step(tmp_path):
    config = cfg("train.steps=30", "optim.lr=1e30", "optim.grad_clip=0", "checkpoint.every=1")
    with pytest.raises(TestbedError, match=r"(at|by) step \d+"):
        train(config, tmp_path / "nan")
    status = json.loads((tmp_path / "nan" / "status.json").read_text())
    assert status["state"] == "failed" and "step" in status["message"]
    assert status["diverged"] is True  # a study's LR bracket reads it as a measured outcome


def test_repetition_logs_epochs(tmp_path):
    train(cfg("train.steps=8", "data.unique_tokens=1024"), tmp_path / "rep")
    ls = [x for x in lines(tmp_path / "rep") if "train_loss" in x]
    assert ls[-1]["epoch"] == pytest.approx(8 * 512 / 1024)
    run = json.loads((tmp_path / "rep" / "run.json").read_text())
    assert run["epochs"] == pytest.approx(4.0)


def test_export_of_a_trained_checkpoint_matches_llama(tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from testbed.cli import main
    from testbed.model.transformer import Transformer
    from testbed.plan import resolved_model

    config = cfg("train.steps=4")
    train(config, tmp_path / "r")
    assert main(["export", str(tmp_path / "r" / "checkpoints" / "step_00000004"), str(tmp_path / "hf")]) == 0
    model = Transformer(resolved_model(config)).eval()
    model.load_state_dict(load_file(str(tmp_path / "r" / "checkpoints" / "step_00000004" / "model.safetensors")))
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    x = torch.randint(0, 128, (2, 32))
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() < 1e-5
