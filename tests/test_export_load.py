"""Export with the run's tokenizer (AutoTokenizer + AutoModelForCausalLM + generate on the folder
alone, offline), export of a synthetic-data run (says what it leaves out), the `load` API (the
checkpoint's own val loss) and `testbed sample`."""

from __future__ import annotations

import json

import pytest
import torch
from text_corpus import corpus_text

from testbed.cli import main
from testbed.config import load_config
from testbed.errors import TestbedError

pytestmark = pytest.mark.slow

TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=64",
        "data.seq_len=32", "train.global_batch_tokens=512", "train.log_every=10", "train.eval_every=100",
        "logging.wandb=false", "logging.progress=false", "data.val_sequences=4"]
PROMPT = "The brown cat"




@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A tiny model trained on prepared text: (run dir, data folder, config)."""
    from testbed.data.shards import prepare
    from testbed.train.trainer import train

    root = tmp_path_factory.mktemp("export_load")
    (root / "c.txt").write_text(corpus_text())
    prepare(root / "c.txt", root / "data", vocab_size=320, cache_dir=root / "cache", val_fraction=0.1)
    config = load_config(None, TINY + [f"data.path={root / 'data'}", "train.steps=30", "optim.lr=1e-2",
                                       "checkpoint.every=15"])
    train(config, root / "run")
    return root / "run", root / "data", config


def test_export_writes_a_folder_transformers_loads_and_generates_from(text_run, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from testbed.data.shards import read_manifest
    from testbed.train.load import load

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run, data, _ = text_run
    out = tmp_path / "hf"
    assert main(["export", str(run / "checkpoints" / "step_00000030"), str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "tokenizer.json" in line and f"tokenizer from data.path={data}" in line
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    eos = int(read_manifest(data)["eos_id"])
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == eos
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == eos

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert tok.eos_token_id == tok.bos_token_id == eos
    ids = tok(PROMPT, return_tensors="pt")
    loaded = load(run)
    assert ids.input_ids[0].tolist() == loaded.encode(PROMPT)  # EOS + the text, as the loop scores
    with torch.no_grad():
        generated = model.generate(**ids, max_new_tokens=12, do_sample=False)
    new = generated[0, ids.input_ids.shape[1]:].tolist()
    # Greedy decoding in transformers writes the tokens the testbed model picks itself.
    assert new == loaded.generate(loaded.encode(PROMPT), max_new_tokens=12)[:len(new)]
    text = tok.decode(generated[0], skip_special_tokens=True)
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)


def test_export_of_a_synthetic_run_says_what_it_leaves_out(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from testbed.train.trainer import train

    train(load_config(None, TINY + ["train.steps=2"]), tmp_path / "r")
    capsys.readouterr()
    out = tmp_path / "hf"
    assert main(["export", str(tmp_path / "r" / "checkpoints" / "step_00000002"), str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line
    assert "config.json" in line and "model.safetensors" in line
    assert line.endswith("; no tokenizer files, generation_config.json or EOS id, because the run trained on "
                         "data.source='synthetic', which has no text tokenizer: AutoModelForCausalLM loads the "
                         "folder, AutoTokenizer does not")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["eos_token_id"] is None
    AutoModelForCausalLM.from_pretrained(out)  # the weights load all the same
    # No text to sample from: said, with the reason.
    assert main(["sample", str(tmp_path / "r"), "--prompt", "x"]) == 2
    assert "text needs the run's tokenizer, but the run trained on data.source='synthetic'" in capsys.readouterr().err


def test_load_gives_the_checkpoints_val_loss(text_run):
    from testbed.rundir import RunDir
    from testbed.train.load import load

    run, _, config = text_run
    logged = {line["step"]: line["val_loss"] for line in RunDir(run).index()}
    newest = load(run)
    assert newest.step == 30 and not newest.model.training
    assert newest.evaluate()["val_loss"] == pytest.approx(logged[30], rel=1e-6)
    earlier = load(run, step=15)
    assert earlier.evaluate()["val_loss"] == pytest.approx(logged[15], rel=1e-6)
    folder = load(run / "checkpoints" / "step_00000015")  # a checkpoint folder alone
    assert folder.step == 15 and torch.equal(folder.model.embed.weight, earlier.model.embed.weight)
    assert newest.tokenizer is not None and newest.decode(newest.encode(PROMPT)) == PROMPT
    with pytest.raises(TestbedError, match="no checkpoint at that step"):
        load(run, step=7)
    with pytest.raises(TestbedError, match="neither a run directory"):
        load(run.parent)


def test_sample_prints_the_prompt_and_its_continuation(text_run, capsys):
    from testbed.train.load import load

    run, _, _ = text_run
    args = ["sample", str(run), "--prompt", PROMPT, "--max-new-tokens", "10"]
    assert main(args) == 0
    captured = capsys.readouterr()
    greedy = captured.out.rstrip("\n")
    assert greedy.startswith(PROMPT) and len(greedy) > len(PROMPT)
    assert "step_00000030 (step 30)" in captured.err
    assert greedy == PROMPT + load(run).sample(PROMPT, max_new_tokens=10)  # temperature 0: greedy
    assert main(args + ["--temperature", "1", "--top-k", "1"]) == 0  # top-1 sampling is greedy
    assert capsys.readouterr().out.rstrip("\n") == greedy
    sampled = []
    for seed in (1, 1, 2):
        assert main(args + ["--temperature", "1.5", "--seed", str(seed), "--step", "15"]) == 0
        sampled.append(capsys.readouterr().out)
    assert sampled[0] == sampled[1]  # a seed gives one sample
    assert main(args + ["--temperature", "-1"]) == 2
    assert "temperature=-1.0" in capsys.readouterr().err
