"""`testbed data ...`: prepare token shards, train tokenizers, inspect a prepared folder.

Nothing heavy is imported here at module level so that `testbed --help` stays instant; each
handler imports the pipeline when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys


def _add_source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True,
                   help="a .txt/.jsonl/.parquet file, a folder or glob of them, or a Hugging Face "
                        "hub dataset name (streamed)")
    p.add_argument("--text-field", default="text",
                   help="column holding the document text in JSONL/Parquet/hub rows (default: text)")
    p.add_argument("--hub-config", default=None, help="hub dataset config, e.g. sample-10BT")
    p.add_argument("--split", default="train", help="hub dataset split to read (default: train)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="fraction of documents (by text hash) held out for validation (default: 0.005)")
    p.add_argument("--min-val-docs", type=int, default=None,
                   help="least number of validation documents for tiny corpora (default: 4)")
    p.add_argument("--cache-dir", default=None,
                   help="cache root for samples and trained tokenizers "
                        "(default: $TESTBED_CACHE or ~/.cache/testbed)")


def _add_sample_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sample-bytes", type=int, default=None,
                   help="bytes of training text sampled to train BPE (default: 100000000)")
    p.add_argument("--seed", type=int, default=0, help="seed choosing the tokenizer sample (default: 0)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress on stderr (by default: bars on a terminal, else a line every 30 s of a "
                        "long step; TESTBED_PROGRESS_INTERVAL=SECONDS)")


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="prepare and inspect tokenised datasets",
                                 description="Prepare and inspect tokenised datasets.")
    sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])

    prep = sub.add_parser("prepare", help="tokenise a source into memory-mapped shards",
                          description="Tokenise a source into train/validation shards with a manifest. "
                                      "Re-running after a kill resumes; finished shards are kept.")
    _add_source_options(prep)
    which = prep.add_mutually_exclusive_group(required=True)
    which.add_argument("--vocab-size", type=int, help="train a byte-level BPE tokenizer of this size")
    prep.add_argument("--nested-in", type=int, default=None, metavar="LARGER",
                      help="with --vocab-size: train BPE once at LARGER and keep its first merges, so "
                      "folders prepared at several sizes hold a nested family (docs/data.md)")
    which.add_argument("--tokenizer", help="pretrained tokenizer: hub name or local folder (AutoTokenizer)")
    _add_sample_options(prep)
    prep.add_argument("--out", required=True, help="folder to write shards, manifest.json and the tokenizer to")
    prep.add_argument("--workers", type=int, default=1, help="tokenising processes (default: 1)")
    prep.add_argument("--shard-tokens", type=int, default=None,
                      help="tokens per shard; shards end at the next document boundary (default: 50000000)")
    prep.set_defaults(func=_prepare)

    tok = sub.add_parser("train-tokenizer", help="train BPE tokenizers at several sizes from one sample",
                         description="Train byte-level BPE tokenizers, one per --vocab-size, from one "
                                     "cached sample of the training split: the largest is trained "
                                     "and each smaller one keeps its first merges (--per-size: "
                                     "train each on its own).")
    _add_source_options(tok)
    tok.add_argument("--vocab-size", type=int, nargs="+", required=True, help="one or more vocabulary sizes")
    _add_sample_options(tok)
    tok.add_argument("--save", default=None, help="also save each tokenizer to SAVE/vocab-<size>/")
    tok.add_argument("--per-size", action="store_true",
                     help="train every size on its own instead of training the largest once and "
                          "keeping its first merges for each smaller size (the default, a nested family)")
    tok.set_defaults(func=_train_tokenizer)

    info = sub.add_parser("info", help="summarise and verify a prepared folder",
                          description="Print the manifest summary of a prepared folder and verify its shards.")
    info.add_argument("path", help="a folder written by `testbed data prepare`")
    info.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    info.set_defaults(func=_info)


def _split_kwargs(args) -> dict:
    from testbed.data.sources import DEFAULT_MIN_VAL_DOCS, DEFAULT_VAL_FRACTION

    return {
        "val_fraction": DEFAULT_VAL_FRACTION if args.val_fraction is None else args.val_fraction,
        "min_val_docs": DEFAULT_MIN_VAL_DOCS if args.min_val_docs is None else args.min_val_docs,
    }


def _check_numbers(args) -> None:
    """Flags out of range are refused before anything is read or written (0 is no default)."""
    from testbed.errors import TestbedError

    for flag, value, low in (("--shard-tokens", getattr(args, "shard_tokens", None), 1),
                             ("--sample-bytes", args.sample_bytes, 1), ("--min-val-docs", args.min_val_docs, 0),
                             ("--workers", getattr(args, "workers", None), 1)):
        if value is not None and value < low:
            raise TestbedError(f"{flag} {value} must be at least {low}; leave it out for the default")
    if args.val_fraction is not None and not 0.0 <= args.val_fraction < 1.0:
        raise TestbedError(f"--val-fraction {args.val_fraction} is outside [0, 1); pass a small fraction "
                           f"such as 0.005")


def _open(args):
    from testbed.data.sources import open_source

    _check_numbers(args)

    source = open_source(args.source, args.text_field, args.hub_config, args.split)
    if source.non_utf8_replacements:
        print(f"warning: {source.non_utf8_replacements} invalid UTF-8 sequence(s) in {args.source} "
              "were replaced by U+FFFD", file=sys.stderr)
    return source


def _log(msg: str) -> None:
    from testbed.progress import say

    say(msg)


def _prepare(args) -> int:
    from testbed import progress
    from testbed.data.shards import DEFAULT_SHARD_TOKENS, prepare
    from testbed.data.tokenizer import DEFAULT_SAMPLE_BYTES

    source = _open(args)
    try:
        with progress.enabled(not args.quiet):
            manifest = prepare(
                source, args.out,
                vocab_size=args.vocab_size, tokenizer=args.tokenizer, nested_in=args.nested_in,
                workers=args.workers,
                shard_tokens=DEFAULT_SHARD_TOKENS if args.shard_tokens is None else args.shard_tokens,
                sample_bytes=DEFAULT_SAMPLE_BYTES if args.sample_bytes is None else args.sample_bytes,
                seed=args.seed,
                cache_dir=args.cache_dir, log=None if args.quiet else _log, **_split_kwargs(args),
            )
    finally:
        source.close()
    _print_summary(args.out, manifest)
    return 0


def _train_tokenizer(args) -> int:
    from pathlib import Path

    from testbed import progress
    from testbed.data.tokenizer import DEFAULT_SAMPLE_BYTES, train_tokenizers

    source = _open(args)
    try:
        sample_bytes = DEFAULT_SAMPLE_BYTES if args.sample_bytes is None else args.sample_bytes
        with progress.enabled(not args.quiet):
            toks = train_tokenizers(source, args.vocab_size, sample_bytes=sample_bytes,
                                    seed=args.seed, cache_dir=args.cache_dir, nested=not args.per_size,
                                    **_split_kwargs(args))
    finally:
        source.close()
    for size, tok in toks.items():
        line = f"vocab {size}: fingerprint {tok.fingerprint}"
        if args.save:
            folder = Path(args.save) / f"vocab-{size}"
            tok.save(folder)
            line += f" -> {folder}"
        print(line)
    return 0


def _print_summary(path, manifest: dict) -> None:
    s = manifest["splits"]
    print(f"{path}: {manifest['tokens']:,} tokens, {manifest['bytes']:,} bytes, "
          f"{manifest['documents']:,} documents, vocab {manifest['vocab_size']} ({manifest['dtype']}), "
          f"EOS {manifest['eos_id']}")
    for name in ("train", "validation"):
        print(f"  {name}: {s[name]['tokens']:,} tokens, {s[name]['bytes']:,} bytes, "
              f"{s[name]['documents']:,} documents, {s[name]['shards']} shard(s)")
    print(f"  bytes per token {manifest['bytes'] / max(1, manifest['tokens']):.3f}; "
          f"token bytes exact: {manifest['token_bytes_exact']}; "
          f"non-UTF-8 replacements: {manifest['non_utf8_replacements']}; "
          f"fingerprint {manifest['fingerprint']}")


def _info(args) -> int:
    from testbed.data.shards import TokenShards

    shards = TokenShards(args.path, verify="full")
    if args.json:
        print(json.dumps(shards.manifest, indent=1))
    else:
        _print_summary(args.path, shards.manifest)
    return 0
