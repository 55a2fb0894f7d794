"""A tokenizer ladder from one BPE training: each smaller vocabulary keeps the largest one's first
merges, so the family is nested; per-size training stays available."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer

from testbed.cli import main
from testbed.data.sources import open_source
from testbed.data.tokenizer import EOS_TOKEN, train_tokenizers, truncate_bpe
from testbed.errors import TestbedError

SIZES = [270, 300, 360, 420]
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "tokenizer", "ladder",
         "nested", "merge", "vocabulary", "alpha", "beta", "gamma", "über", "naïve", "日本"]


@pytest.fixture(scope="module")
def source_path(tmp_path_factory):
    rng = random.Random(3)
    docs = [" ".join(rng.choice(WORDS) + rng.choice(["", "s", "ed", "ing", ","]) for _ in range(60))
            for _ in range(300)]
    path = tmp_path_factory.mktemp("ladder") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def ladders(source_path, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    source = open_source(str(source_path))
    try:
        nested = train_tokenizers(source, SIZES, sample_bytes=10**7, cache_dir=cache)
        per_size = train_tokenizers(source, SIZES, sample_bytes=10**7, cache_dir=cache, nested=False)
    finally:
        source.close()
    return nested, per_size


def model_of(tok) -> dict:
    return json.loads(tok.backend.to_str())["model"]


def test_the_ladder_is_nested_and_each_size_is_the_first_merges_of_the_largest(ladders):
    nested, _ = ladders
    largest = model_of(nested[SIZES[-1]])
    for size in SIZES:
        tok = nested[size]
        assert tok.vocab_size == size
        model = model_of(tok)
        # the first-merges truncation, computed here from the largest tokenizer's file
        assert model["merges"] == largest["merges"][:size - 257]
        assert model["vocab"] == {t: i for t, i in largest["vocab"].items() if i < size}
        assert tok.backend.token_to_id(EOS_TOKEN) == tok.eos_id == 0
    for small, big in zip(SIZES, SIZES[1:]):
        a, b = model_of(nested[small]), model_of(nested[big])
        assert a["vocab"].items() <= b["vocab"].items()
        assert b["merges"][:len(a["merges"])] == a["merges"]


def test_derived_tokenizers_are_valid_and_round_trip(ladders, tmp_path):
    nested, _ = ladders
    text = "the naïve fox jumps over 日本 überladders, quickly!"
    lengths = []
    for size, tok in nested.items():
        reloaded = Tokenizer.from_str(tok.backend.to_str())  # a valid tokenizers object
        ids = reloaded.encode(text, add_special_tokens=False).ids
        assert max(ids) < size
        assert reloaded.decode(ids) == text
        lengths.append(len(ids))
        tok.save(tmp_path / f"v{size}")
        assert Tokenizer.from_file(str(tmp_path / f"v{size}" / "tokenizer.json")).get_vocab_size() == size
    assert lengths == sorted(lengths, reverse=True)  # more merges, fewer tokens
    assert nested[SIZES[0]].describe()["truncated_from"] == SIZES[-1]


def test_per_size_training_stays_available(ladders):
    nested, per_size = ladders
    for size in SIZES:
        assert per_size[size].vocab_size == size
        assert "truncated_from" not in per_size[size].describe()
        # This trainer is greedy with a fixed tie-break, so on this corpus the two agree.
        assert model_of(per_size[size]) == model_of(nested[size])


def test_truncation_refuses_sizes_outside_the_tokenizer(ladders):
    nested, _ = ladders
    for bad in (256, SIZES[-1] + 1):
        with pytest.raises(TestbedError, match=f"vocab_size={bad} cannot be cut"):
            truncate_bpe(nested[SIZES[-1]], bad)


def test_cli_trains_nested_by_default_and_per_size_on_request(source_path, tmp_path, capsys):
    args = ["data", "train-tokenizer", "--source", str(source_path), "--vocab-size", "300", "360",
            "--sample-bytes", "10000000", "--cache-dir", str(tmp_path / "c")]
    assert main([*args, "--save", str(tmp_path / "n")]) == 0
    assert main([*args, "--per-size", "--save", str(tmp_path / "p")]) == 0
    capsys.readouterr()
    small = json.loads((tmp_path / "n" / "vocab-300" / "tokenizer.json").read_text())["model"]
    big = json.loads((tmp_path / "n" / "vocab-360" / "tokenizer.json").read_text())["model"]
    assert small["merges"] == big["merges"][:300 - 257]
    assert (tmp_path / "p" / "vocab-300" / "tokenizer.json").is_file()


def test_prepare_nested_in_cuts_from_the_larger_bpe(source_path, tmp_path, capsys):
    """`data prepare --vocab-size V --nested-in L` holds the first merges of the L-token BPE (not
    a V-token BPE trained on its own), over the same documents as the L-token folder."""
    from testbed.data.shards import TokenShards

    cache = ["--cache-dir", str(tmp_path / "c"), "--sample-bytes", "10000000", "--val-fraction", "0.1"]
    for size in (300, 420):
        assert main(["data", "prepare", "--source", str(source_path), "--vocab-size", str(size),
                     "--nested-in", "420", "--out", str(tmp_path / f"v{size}"), *cache]) == 0
    capsys.readouterr()
    small = json.loads((tmp_path / "v300" / "tokenizer.json").read_text())["model"]
    big = json.loads((tmp_path / "v420" / "tokenizer.json").read_text())["model"]
    assert small["merges"] == big["merges"][:300 - 257] and len(small["vocab"]) == 300
    shards = {s: TokenShards(tmp_path / f"v{s}") for s in (300, 420)}  # verifies every shard
    # the same documents in each folder: the smaller vocabulary needs more tokens for them
    bytes_ = {s: json.loads((tmp_path / f"v{s}" / "manifest.json").read_text())["splits"]["train"]["bytes"]
              for s in shards}
    assert bytes_[300] == bytes_[420]
    tokens = {s: json.loads((tmp_path / f"v{s}" / "manifest.json").read_text())["splits"]["train"]["tokens"]
              for s in shards}
    assert tokens[300] > tokens[420]
    # a nested-in size smaller than the vocabulary is refused with the fix
    assert main(["data", "prepare", "--source", str(source_path), "--vocab-size", "420",
                 "--nested-in", "300", "--out", str(tmp_path / "bad"), *cache]) == 2
    assert "--nested-in 300 needs --vocab-size at most 300" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
