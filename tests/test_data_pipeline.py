"""The real-text pipeline: sources, split, tokenizers, shards, resume, bad input, bits per byte.

Every test writes its own small English-like corpus; nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from testbed.data import sources as sources_mod
from testbed.data.shards import TokenShards, dtype_for, prepare
from testbed.data.sources import Source, open_source
from testbed.data.tokenizer import token_byte_lengths, train_tokenizers
from testbed.errors import TestbedError

WORDS = (
    "the of and to in is that it for was on are as with his they at be this from have or by one "
    "had not but what all were when we there can an your which their said if do will each about "
    "how up out them then she many some so these would other into has more her two like him see "
    "time could no make than first been its who now people made over did down only way find use "
    "may water long little very after words called just where most know café naïve über 東京 ✓"
).split()
VOCABS = (300, 360)
SHARD_TOKENS = 4000


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        sentences = []
        for _ in range(rng.randint(2, 8)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
            sentences.append(" ".join(words).capitalize() + rng.choice([".", "!", "?"]))
        docs.append(f"Doc {i}. " + " ".join(sentences))
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = make_docs(320)
    write_jsonl(root / "all.jsonl", docs)
    (root / "all.txt").write_text("\n\n".join(docs) + "\n")
    pq.write_table(pa.table({"text": docs}), root / "all.parquet")
    for part in range(4):  # parts in order, so the folder reads the same sequence
        write_jsonl(root / "parts" / f"part-{part}.jsonl", docs[part * 80:(part + 1) * 80])
    return {"root": root, "docs": docs, "cache": tmp_path_factory.mktemp("cache")}


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    """Shards for both vocabulary sizes, from one cached sample."""
    out = {}
    for v in VOCABS:
        d = tmp_path_factory.mktemp(f"shards{v}")
        prepare(corpus["root"] / "all.jsonl", d, vocab_size=v, shard_tokens=SHARD_TOKENS,
                cache_dir=corpus["cache"])
        out[v] = d
    return out


def texts(spec, **kw) -> list[str]:
    return list(open_source(spec, **kw).iter_texts())


# --------------------------------------------------------------------------- sources


def test_every_format_reads_the_same_documents(corpus):
    root, docs = corpus["root"], corpus["docs"]
    assert texts(root / "all.jsonl") == docs
    assert texts(root / "all.txt") == docs  # one document per blank-line-separated block
    assert texts(root / "all.parquet") == docs
    assert texts(root / "parts") == docs
    assert texts(str(root / "parts" / "*.jsonl")) == docs


def test_hub_code_path_reads_a_dataset_folder(corpus):
    # The hub branch is load_dataset(name, config, split=..., streaming=True); a local dataset
    # folder answers to the same call, so it stands in for a hub name here.
    hub_like = Source(str(corpus["root"] / "parts"), fingerprint="hub-like")
    assert hub_like.is_hub
    assert list(hub_like.iter_texts()) == corpus["docs"]
    with pytest.raises(TestbedError, match="text_field='body'"):
        next(Source(str(corpus["root"] / "parts"), text_field="body", fingerprint="x").iter_texts())


def test_split_is_stable_under_file_order_and_layout(corpus, tmp_path):
    docs = corpus["docs"]
    shuffled = docs[:]
    random.Random(1).shuffle(shuffled)
    # Same documents, other file names and other grouping: files sort differently.
    for i in range(0, len(shuffled), 50):
        write_jsonl(tmp_path / "other" / f"z{9 - i // 50}-chunk.jsonl", shuffled[i:i + 50])

    def validation_set(spec):
        source = open_source(spec)
        plan = sources_mod.scan_split(source, val_fraction=0.05, min_val_docs=4)
        return {d.text for d in source.iter_documents() if plan.is_validation(d.hash)}

    original = validation_set(corpus["root"] / "all.jsonl")
    assert 5 <= len(original) < len(docs) // 4
    assert validation_set(tmp_path / "other") == original
    assert validation_set(corpus["root"] / "all.parquet") == original


def test_validation_floor_for_tiny_corpora(tmp_path):
    docs = make_docs(30, seed=3)
    plan = sources_mod.scan_split(open_source(write_jsonl(tmp_path / "t.jsonl", docs)),
                                  val_fraction=0.005, min_val_docs=4)
    val = [d for d in docs if plan.is_validation(sources_mod.document_hash(d.encode()))]
    assert len(val) == 4


# --------------------------------------------------------------------------- tokenizers and shards


def test_two_vocab_sizes_train_from_one_read(corpus, tmp_path, monkeypatch):
    reads = []
    original = Source.iter_texts

    def counting(self):
        reads.append(self.spec)
        return original(self)

    monkeypatch.setattr(Source, "iter_texts", counting)
    source = open_source(corpus["root"] / "all.jsonl")
    toks = train_tokenizers(source, [360, 300], sample_bytes=10**8, seed=7, cache_dir=tmp_path)
    assert len(reads) == 1
    assert {v: t.vocab_size for v, t in toks.items()} == {300: 300, 360: 360}
    train_tokenizers(source, [300, 360], sample_bytes=10**8, seed=7, cache_dir=tmp_path)
    assert len(reads) == 1  # sample and tokenizers both came from the cache
    assert len(list((tmp_path / "samples").glob("*.jsonl"))) == 1


def test_manifest_counts_match_direct_computation(corpus, prepared):
    docs = corpus["docs"]
    for v, path in prepared.items():
        shards = TokenShards(path)
        m = shards.manifest
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        ids = [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]
        assert m["vocab_size"] == v == tok.get_vocab_size()
        assert m["dtype"] == "uint16"
        assert m["documents"] == len(docs)
        assert m["bytes"] == sum(len(d.encode("utf-8")) for d in docs)
        assert m["tokens"] == sum(len(x) + 1 for x in ids)
        assert m["splits"]["train"]["documents"] + m["splits"]["validation"]["documents"] == len(docs)
        assert m["splits"]["validation"]["documents"] >= 4
        assert m["eos_id"] == tok.token_to_id("<|endoftext|>")
        assert m["token_bytes_exact"] is True
        assert len(m["shards"]) > 2
        all_tokens = np.concatenate([shards.tokens("train"), shards.tokens("validation")])
        assert (all_tokens == m["eos_id"]).sum() == len(docs)
        # Exactness of bits per byte: each document's token bytes add up to its UTF-8 length.
        lengths = token_byte_lengths(tok)
        assert lengths[m["eos_id"]] == 0
        for doc, doc_ids in zip(docs, ids):
            assert int(lengths[doc_ids].sum()) == len(doc.encode("utf-8"))
    a, b = (TokenShards(prepared[v]).manifest for v in VOCABS)
    assert a["splits"]["validation"]["bytes"] == b["splits"]["validation"]["bytes"]  # same docs
    assert a["tokens"] != b["tokens"]


def test_dtype_follows_vocabulary_size(corpus, prepared, tmp_path):
    assert dtype_for(65536) == "uint16" and dtype_for(65537) == "uint32"
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    # A pretrained-style folder with more than 65536 tokens needs uint32 shards.
    backend = Tokenizer.from_file(str(prepared[300] / "tokenizer.json"))
    backend.add_tokens([f"<x{i}>" for i in range(65536)])
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(tmp_path / "big")
    small = write_jsonl(tmp_path / "s.jsonl", corpus["docs"][:40] + ["<x70> and <x65000> tokens"])
    m = prepare(small, tmp_path / "out", tokenizer=str(tmp_path / "big"), cache_dir=corpus["cache"])
    assert m["dtype"] == "uint32" and m["vocab_size"] == 300 + 65536
    shards = TokenShards(tmp_path / "out")
    stream = np.concatenate([shards.tokens("train"), shards.tokens("validation")])
    assert {300 + 70, 300 + 65000} <= set(stream.tolist())  # ids past 65535 survive the wider dtype


def test_pretrained_folder_gives_the_same_shards(corpus, prepared, tmp_path):
    m = prepare(corpus["root"] / "all.jsonl", tmp_path / "p", tokenizer=str(prepared[300]),
                shard_tokens=SHARD_TOKENS, cache_dir=corpus["cache"])
    ref = TokenShards(prepared[300]).manifest
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in ref["shards"]]


def test_one_and_two_workers_write_identical_shards(corpus, prepared, tmp_path):
    m = prepare(corpus["root"] / "all.jsonl", tmp_path / "w2", vocab_size=300, workers=2,
                shard_tokens=SHARD_TOKENS, cache_dir=corpus["cache"])
    ref = TokenShards(prepared[300]).manifest
    assert [(s["file"], s["sha256"]) for s in m["shards"]] == [(s["file"], s["sha256"]) for s in ref["shards"]]
    assert m["fingerprint"] == TokenShards(prepared[300]).fingerprint()


def test_kill_and_resume(corpus, prepared, tmp_path):
    out = tmp_path / "resumed"
    cmd = [sys.executable, "-m", "testbed", "data", "prepare", "--source", str(corpus["root"] / "all.jsonl"),
           "--vocab-size", "300", "--out", str(out), "--shard-tokens", str(SHARD_TOKENS)]
    env = dict(os.environ, TESTBED_CACHE=str(corpus["cache"]), TESTBED_PREPARE_PAUSE_AFTER_SHARD="2")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    finished: list[dict] = []
    while time.time() < deadline and not finished:
        try:
            finished = json.loads((out / "progress.json").read_text())["shards"]
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert finished, "the first shard never appeared"
    assert not (out / "manifest.json").exists()
    before = {r["file"]: (out / r["file"]).stat() for r in finished}
    (out / ".train-00007.bin.tmp-424242").write_bytes(b"half a shard")  # never to be used

    env.pop("TESTBED_PREPARE_PAUSE_AFTER_SHARD")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stderr
    assert (out / "manifest.json").read_text() == (prepared[300] / "manifest.json").read_text()
    for rec in TokenShards(out).manifest["shards"]:
        assert (out / rec["file"]).read_bytes() == (prepared[300] / rec["file"]).read_bytes()
    for name, st in before.items():
        now = (out / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert not list(out.glob(".*.tmp-*"))


# --------------------------------------------------------------------------- bad input


def test_missing_and_empty_sources_are_clear_errors(tmp_path, capsys):
    with pytest.raises(TestbedError, match="does not exist"):
        open_source(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(TestbedError, match="is empty"):
        open_source(tmp_path / "empty.jsonl")
    from testbed.cli import main

    assert main(["data", "prepare", "--source", str(tmp_path / "nope.jsonl"), "--vocab-size", "300",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: source=") and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_non_utf8_bytes_are_counted_not_fatal(corpus, tmp_path):
    docs = corpus["docs"][:60]
    raw = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode()
    raw = raw.replace(b"Doc 5.", b"Doc \xff5.").replace(b"Doc 7.", b"Doc \xfe\xfe7.")
    (tmp_path / "bad.jsonl").write_bytes(raw)
    source = open_source(tmp_path / "bad.jsonl")
    assert source.non_utf8_replacements == 3
    got = list(source.iter_texts())
    assert got[5].startswith("Doc \ufffd5.") and len(got) == 60
    m = prepare(source, tmp_path / "o", vocab_size=300, cache_dir=tmp_path / "c")
    assert m["non_utf8_replacements"] == 3
    assert m["bytes"] == sum(len(t.encode()) for t in got)


def test_vocab_too_large_for_the_sample(corpus, tmp_path):
    small = write_jsonl(tmp_path / "small.jsonl", make_docs(12, seed=5))
    with pytest.raises(TestbedError, match=r"vocab_size=5000 .* supports \(\d+ tokens"):
        prepare(small, tmp_path / "o", vocab_size=5000, cache_dir=tmp_path / "c")


def test_damaged_shards_are_clear_errors_and_nothing_is_deleted(corpus, prepared, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(prepared[300], out)
    names = sorted(p.name for p in out.iterdir() if p.name != ".verified.json")
    first = out / "train-00000.bin"
    data = first.read_bytes()
    first.write_bytes(data[:-2])  # truncated
    with pytest.raises(TestbedError, match=r"train-00000\.bin.*testbed data prepare"):
        TokenShards(out)
    first.write_bytes(data[:10] + bytes([data[10] ^ 1]) + data[11:])  # edited, same size
    with pytest.raises(TestbedError, match=r"train-00000\.bin.*sha256"):
        TokenShards(out)
    # Preparing into it again with other settings refuses and leaves everything in place.
    with pytest.raises(TestbedError, match="other settings"):
        prepare(corpus["root"] / "all.jsonl", out, vocab_size=360, shard_tokens=SHARD_TOKENS,
                cache_dir=corpus["cache"])
    # Same settings: the damage is reported rather than silently rebuilt over.
    with pytest.raises(TestbedError, match="sha256"):
        prepare(corpus["root"] / "all.jsonl", out, vocab_size=300, shard_tokens=SHARD_TOKENS,
                cache_dir=corpus["cache"])
    assert sorted(p.name for p in out.iterdir() if p.name != ".verified.json") == names
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(TestbedError, match="other files"):
        prepare(corpus["root"] / "all.jsonl", tmp_path / "mine", vocab_size=300, cache_dir=corpus["cache"])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# --------------------------------------------------------------------------- reading and bpb


def test_windows_cover_the_stream_in_order(prepared):
    shards = TokenShards(prepared[300])
    seq_len = 1500  # wider than nothing, crosses shard boundaries of ~4000 tokens
    n = shards.num_windows(seq_len)
    stream = shards.tokens("train")
    assert n == len(stream) // (seq_len + 1) and n >= 3
    w = shards.windows(np.arange(n), seq_len)
    assert w.dtype == np.int64 and w.shape == (n, seq_len + 1)
    assert np.array_equal(w.reshape(-1), stream[: n * (seq_len + 1)])
    assert np.array_equal(shards.windows(np.array([2, 0]), seq_len), w[[2, 0]])


def test_bits_per_byte_from_window_bytes_is_exact(prepared):
    from transformers import AutoTokenizer

    shards = TokenShards(prepared[300])
    tok = AutoTokenizer.from_pretrained(str(prepared[300]))
    seq_len = 64
    idx = np.arange(shards.num_windows(seq_len, "validation"))
    w = shards.windows(idx, seq_len, "validation")
    nats = np.random.default_rng(0).uniform(0.1, 5.0, size=(len(idx), seq_len))  # per target token
    wbytes = shards.window_bytes(idx, seq_len, "validation")
    used, non_ascii = 0, 0
    for row in range(len(idx)):
        text = tok.decode(w[row, 1:].tolist(), skip_special_tokens=True)
        if "\ufffd" in text:  # window edge cut a multi-byte character: decoded text is not exact
            continue
        used += 1
        non_ascii += any(ord(c) > 127 for c in text)
        bpb = nats[row].sum() / (math.log(2) * wbytes[row])
        assert bpb == pytest.approx(nats[row].sum() / (math.log(2) * len(text.encode("utf-8"))), rel=1e-12)
    assert used >= len(idx) // 2 and non_ascii > 0
    # The whole validation split: every token's bytes add up to the validation text bytes.
    assert int(shards.token_bytes[shards.tokens("validation")].sum()) == shards.validation_bytes_total()


def test_a_missing_datasets_package_is_one_clear_error(tmp_path, monkeypatch):
    """datasets is optional (GPU nodes often lack it): reading text without it says what to do."""
    import sys

    (tmp_path / "a.jsonl").write_text('{"text": "hello world"}\n')
    source = open_source(str(tmp_path / "a.jsonl"))
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(TestbedError, match="needs the `datasets` package"):
        list(source.iter_texts())
