"""Tokenizers: byte-level BPE trained on a sample of the training split, or a pretrained one.

Training reads the corpus once per (source, sample size, seed, split settings): the sample is
drawn in one pass and cached as a JSONL file, and every vocabulary size of a sweep trains from
that file. Trained tokenizers are cached too, so a second `prepare` at the same size is free.

Cache layout (root: --cache-dir, else $TESTBED_CACHE, else ~/.cache/testbed):
    ROOT/samples/<key>.jsonl        the sampled training documents, best priority first
    ROOT/samples/<key>.json         sample size and the split plan found by the same pass
    ROOT/tokenizers/<key>/tokenizer.json
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from testbed import progress
from testbed.data.sources import (
    DEFAULT_MIN_VAL_DOCS,
    DEFAULT_VAL_FRACTION,
    HASH_SPACE,
    Source,
    SplitPlan,
    SplitScanner,
    check_val_fraction,
)
from testbed.errors import TestbedError
from testbed.rundir import write_text_atomic

if TYPE_CHECKING:
    from tokenizers import Tokenizer

EOS_TOKEN = "<|endoftext|>"
DEFAULT_SAMPLE_BYTES = 100_000_000
MIN_BPE_VOCAB = 257  # 256 byte tokens + EOS


def cache_root(explicit: str | os.PathLike | None = None) -> Path:
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("TESTBED_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "testbed"


def _key(*parts) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:20]


# --------------------------------------------------------------------------- the sample


@dataclass
class Sample:
    """Training documents for tokenizer training, drawn once and cached."""

    path: Path
    key: str
    documents: int
    bytes: int
    plan: SplitPlan
    seed: int
    sample_bytes: int

    def texts(self) -> Iterable[str]:
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                yield json.loads(line)


def _priority(seed: int, doc_hash: int) -> int:
    # A seeded hash of the document: the sample is the lowest priorities, whatever the order.
    data = seed.to_bytes(8, "big", signed=True) + doc_hash.to_bytes(8, "big")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def draw_sample(
    source: Source,
    sample_bytes: int = DEFAULT_SAMPLE_BYTES,
    seed: int = 0,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    min_val_docs: int = DEFAULT_MIN_VAL_DOCS,
    cache_dir: str | os.PathLike | None = None,
) -> Sample:
    """Up to `sample_bytes` of training documents chosen by seeded hash, from one pass.

    The same pass fixes the split plan (validation threshold), which is cached with the sample.
    """
    check_val_fraction(val_fraction)
    if sample_bytes <= 0:
        raise TestbedError(f"sample_bytes={sample_bytes} must be positive; pass e.g. 100000000.")
    key = _key("sample", source.fingerprint, sample_bytes, seed, val_fraction, min_val_docs)
    root = cache_root(cache_dir) / "samples"
    path, meta_path = root / f"{key}.jsonl", root / f"{key}.json"
    if path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        return Sample(path, key, meta["documents"], meta["bytes"], SplitPlan.from_dict(meta["plan"]),
                      seed, sample_bytes)

    scanner = SplitScanner(val_fraction, min_val_docs)
    surely_validation = int(val_fraction * HASH_SPACE)  # the floor can only add validation docs
    heap: list[tuple[int, int, str, int]] = []  # (-priority, hash, text, bytes): drop worst first
    held = 0
    bar = progress.Progress("tokenizer sample: reading the source", unit="B", unit_scale=True)
    for doc in source.iter_documents():
        bar.update(doc.utf8_bytes)
        scanner.add(doc)
        if doc.hash < surely_validation:
            continue
        prio = _priority(seed, doc.hash)
        if len(heap) and held >= sample_bytes and prio > -heap[0][0]:
            continue
        heapq.heappush(heap, (-prio, doc.hash, doc.text, doc.utf8_bytes))
        held += doc.utf8_bytes
        while held - heap[0][3] >= sample_bytes and len(heap) > 1:
            held -= heapq.heappop(heap)[3]
    bar.close()
    plan = scanner.plan(source.spec)
    chosen = sorted((-p, h, t, b) for p, h, t, b in heap if not plan.is_validation(h))
    lines = "".join(json.dumps(t, ensure_ascii=False) + "\n" for _, _, t, _ in chosen)
    total = sum(b for *_, b in chosen)
    write_text_atomic(path, lines)
    meta = {"documents": len(chosen), "bytes": total, "plan": plan.to_dict(),
            "source": source.describe(), "seed": seed, "sample_bytes": sample_bytes}
    write_text_atomic(meta_path, json.dumps(meta, indent=1))
    return Sample(path, key, len(chosen), total, plan, seed, sample_bytes)


# --------------------------------------------------------------------------- tokenizers


@dataclass
class TextTokenizer:
    """A `tokenizers.Tokenizer` plus what the pipeline needs to know about it."""

    backend: Tokenizer
    eos_id: int
    describe_: dict

    @property
    def vocab_size(self) -> int:
        vocab = self.backend.get_vocab(with_added_tokens=True)
        return max(self.backend.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()[:16]

    def describe(self) -> dict:
        return {**self.describe_, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "fingerprint": self.fingerprint}

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def save(self, directory: str | os.PathLike) -> None:
        """tokenizer.json plus the transformers config, so AutoTokenizer can load the folder."""
        from transformers import PreTrainedTokenizerFast

        eos = self.backend.id_to_token(self.eos_id)
        fast = PreTrainedTokenizerFast(tokenizer_object=self.backend, eos_token=eos)
        fast.save_pretrained(str(directory))


def _new_bpe(vocab_size: int, show_progress: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    return tok, trainer


def _counted(texts: Iterable[str], bar: progress.Progress) -> Iterator[str]:
    for text in texts:
        bar.update(len(text.encode("utf-8")))
        yield text


def train_bpe(sample: Sample, vocab_size: int, cache_dir: str | os.PathLike | None = None) -> TextTokenizer:
    """Byte-level BPE with `vocab_size` tokens (EOS included) trained on `sample`, cached."""
    from tokenizers import Tokenizer

    if vocab_size < MIN_BPE_VOCAB:
        raise TestbedError(
            f"vocab_size={vocab_size} is below {MIN_BPE_VOCAB} (256 byte tokens + EOS); "
            f"pass --vocab-size {MIN_BPE_VOCAB} or more."
        )
    key = _key("bpe", sample.key, vocab_size)
    path = cache_root(cache_dir) / "tokenizers" / key / "tokenizer.json"
    describe = {"kind": "bpe", "name": None, "sample_key": sample.key, "sample_bytes": sample.sample_bytes,
                "sample_documents": sample.documents, "seed": sample.seed}
    if path.exists():
        backend = Tokenizer.from_file(str(path))
    else:
        # Progress: on a terminal the tokenizers library's own bars; in a log, lines while the
        # sample is read (the merges that follow report nothing until they are done).
        interactive = progress.is_on() and progress.interactive()
        backend, trainer = _new_bpe(vocab_size, show_progress=interactive)
        if progress.is_on():
            progress.say(f"training a {vocab_size}-token BPE on the tokenizer sample ({sample.documents:,} "
                         f"documents, {sample.bytes / 1e6:.1f} MB)")
        started = time.monotonic()
        texts: Iterable[str] = sample.texts()
        bar = None
        if progress.is_on() and not interactive:
            bar = progress.Progress(f"BPE {vocab_size}: reading the sample", total=sample.bytes, unit="B",
                                    unit_scale=True)
            texts = _counted(texts, bar)
        backend.train_from_iterator(texts, trainer=trainer, length=sample.documents)
        if bar is not None:
            bar.close()
        if progress.is_on():
            progress.say(f"trained the {vocab_size}-token BPE in {time.monotonic() - started:.1f} s")
        got = backend.get_vocab_size(with_added_tokens=True)
        if got < vocab_size:
            raise TestbedError(
                f"vocab_size={vocab_size} is more than the tokenizer sample supports ({got} tokens "
                f"from {sample.bytes} bytes); pass --vocab-size {got} or less, or a larger "
                "--sample-bytes / corpus."
            )
        write_text_atomic(path, backend.to_str())
    eos = backend.token_to_id(EOS_TOKEN)
    if eos is None:  # not a tokenizer this module trained (its EOS is a special token)
        raise TestbedError(f"{str(path)!r} has no {EOS_TOKEN} token; delete it to train the tokenizer again")
    return TextTokenizer(backend, eos, describe)


def _merge_pair(merge) -> tuple[str, str]:
    # tokenizers writes a merge as ["a", "b"]; versions before 0.20 wrote "a b".
    left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
    return left, right


def truncate_bpe(tokenizer: TextTokenizer, vocab_size: int) -> TextTokenizer:
    """The `vocab_size`-token BPE nested in a larger trained one: its special tokens and byte
    alphabet plus its first `vocab_size - base` merges, where base = vocabulary - merges (EOS and
    the 256 bytes). A BPE trainer gives each merge's result the next id, so the kept tokens are
    exactly the ids below `vocab_size`; that is checked, and a tokenizer where it fails (not one
    this module trained) is refused rather than cut at the wrong place."""
    from tokenizers import Tokenizer

    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise TestbedError(f"only a BPE tokenizer can be truncated, not a {model.get('type')!r} one")
    vocab: dict[str, int] = model["vocab"]
    merges = model["merges"]
    base = len(vocab) - len(merges)
    if not base <= vocab_size <= len(vocab):
        raise TestbedError(f"vocab_size={vocab_size} cannot be cut from a {len(vocab)}-token BPE; "
                           f"choose a size in [{base}, {len(vocab)}]")
    kept = merges[:vocab_size - base]
    results = {vocab.get("".join(_merge_pair(m))) for m in kept}
    if results != set(range(base, vocab_size)) or len(set(vocab.values())) != len(vocab) \
            or set(vocab.values()) != set(range(len(vocab))):
        raise TestbedError(f"the tokenizer's merges do not add ids {base}..{vocab_size - 1} in order, "
                           f"so its first merges are not a {vocab_size}-token tokenizer; train one "
                           f"of that size instead")
    model["vocab"] = {token: idx for token, idx in vocab.items() if idx < vocab_size}
    model["merges"] = kept
    spec["added_tokens"] = [t for t in spec.get("added_tokens", []) if t["id"] < vocab_size]
    backend = Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))
    eos = backend.token_to_id(EOS_TOKEN)
    describe = {**tokenizer.describe_, "truncated_from": tokenizer.vocab_size}
    return TextTokenizer(backend, tokenizer.eos_id if eos is None else eos, describe)


def train_tokenizers(
    source: Source,
    vocab_sizes: Iterable[int],
    sample_bytes: int = DEFAULT_SAMPLE_BYTES,
    seed: int = 0,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    min_val_docs: int = DEFAULT_MIN_VAL_DOCS,
    cache_dir: str | os.PathLike | None = None,
    nested: bool = True,
) -> dict[int, TextTokenizer]:
    """BPE tokenizers at several vocabulary sizes from a single sample of the source.

    nested (the default): BPE is trained once, at the largest size, and every smaller size keeps
    its first merges (`truncate_bpe`), so the family is nested: each size's tokens and merges are
    a prefix of every larger one's. nested=False trains each size on its own."""
    sizes = sorted(set(vocab_sizes))
    sample = draw_sample(source, sample_bytes, seed, val_fraction, min_val_docs, cache_dir)
    if not nested:
        return {v: train_bpe(sample, v, cache_dir) for v in sizes}
    for v in sizes:
        if v < MIN_BPE_VOCAB:
            train_bpe(sample, v, cache_dir)  # raises the size error before any training
    largest = train_bpe(sample, sizes[-1], cache_dir)
    return {v: largest if v == sizes[-1] else truncate_bpe(largest, v) for v in sizes}


def load_pretrained(name_or_path: str) -> TextTokenizer:
    """A pretrained tokenizer by hub name or local folder, through transformers.AutoTokenizer."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as err:  # missing folder, no network, bad files: all "cannot load"
        raise TestbedError(
            f"tokenizer={name_or_path!r} could not be loaded ({type(err).__name__}: {err}); pass a "
            "folder with tokenizer.json or a hub name, or use --vocab-size to train one."
        ) from err
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise TestbedError(
            f"tokenizer={name_or_path!r} has no fast (tokenizers) backend; pass a tokenizer "
            "that ships tokenizer.json."
        )
    if tok.eos_token_id is None:
        raise TestbedError(
            f"tokenizer={name_or_path!r} defines no EOS token; pass a tokenizer with eos_token."
        )
    return TextTokenizer(backend, int(tok.eos_token_id), {"kind": "pretrained", "name": str(name_or_path)})


def load_saved(directory: str | os.PathLike, eos_id: int) -> TextTokenizer:
    """The tokenizer a prepared folder holds (its tokenizer.json)."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(Path(directory) / "tokenizer.json"))
    return TextTokenizer(backend, eos_id, {"kind": "saved", "name": str(directory)})


# --------------------------------------------------------------------------- token bytes


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable character standing for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _component_types(node: object) -> set[str | None]:
    if not isinstance(node, dict):
        return set()
    types = {node.get("type")}
    for child in node.get("decoders", []) or node.get("pretokenizers", []) or []:
        types |= _component_types(child)
    return types


def token_byte_lengths_info(tokenizer) -> tuple[np.ndarray, bool]:
    """(lengths, exact): UTF-8 bytes each token id decodes to, and whether that is exact.

    Exact for byte-level BPE (each character of a token stands for one byte). Other schemes
    (SentencePiece-style `▁` and `<0xNN>` tokens) are counted the same way but flagged inexact,
    since their decoders may drop or add leading spaces. Special tokens count 0 bytes.
    """
    backend = getattr(tokenizer, "backend", None) or getattr(tokenizer, "backend_tokenizer", None) or tokenizer
    spec = json.loads(backend.to_str())
    vocab = backend.get_vocab(with_added_tokens=True)
    specials = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    added = {t["content"] for t in spec.get("added_tokens", [])}
    byte_level = "ByteLevel" in _component_types(spec.get("decoder"))
    byte_of = _byte_decoder()
    lengths = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
    for token, idx in vocab.items():
        if token in specials:
            continue
        if token in added:
            lengths[idx] = len(token.encode("utf-8"))
        elif byte_level and all(ch in byte_of for ch in token):
            lengths[idx] = len(token)
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            lengths[idx] = 1  # SentencePiece byte fallback
        else:
            lengths[idx] = len(token.replace("\u2581", " ").encode("utf-8"))
    return lengths, byte_level


def token_byte_lengths(tokenizer) -> np.ndarray:
    """int64 [V]: UTF-8 bytes each token decodes to (0 for special tokens such as EOS)."""
    return token_byte_lengths_info(tokenizer)[0]
