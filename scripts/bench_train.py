#!/usr/bin/env python
"""Training throughput: the testbed trainer against a plain `transformers` Llama loop.

Both train the same architecture (d_model, layers, heads, SwiGLU width, vocab), on the same
sequence length and batch, with AdamW, in the same process, alternating rounds so that machine
noise hits both alike. Reported: tokens/s of each (median over rounds), their ratio, and MFU
against the matmul peak measured here for the precision used.

    python scripts/bench_train.py                       # fp32, d256 L4 seq256 batch16 (CPU default)
    python scripts/bench_train.py --precision bf16      # bf16 autocast on both sides
    python scripts/bench_train.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def testbed_round(args, steps: int, workdir: Path, round_id: int) -> float:
    from testbed.config import load_config
    from testbed.train.trainer import train

    config = load_config(None, [
        f"model.d_model={args.d_model}", f"model.n_layers={args.n_layers}", f"model.n_heads={args.n_heads}",
        f"model.max_seq_len={args.seq_len}", f"data.seq_len={args.seq_len}",
        f"data.synthetic={{vocab_size: {args.vocab}}}", f"model.vocab_size={args.vocab}",
        f"train.global_batch_tokens={args.batch * args.seq_len}", f"train.steps={steps}",
        f"train.precision={args.precision}", f"train.compile={str(args.compile).lower()}",
        f"train.device={args.device}", "train.eval_every=1000000", f"train.log_every={steps}",
        "checkpoint.final=false", "logging.wandb=false", "logging.progress=false",
        "data.val_sequences=1", "optim.weight_decay=0.1", "optim.lr=1e-3"])
    summary = train(config, workdir / f"testbed-{round_id}")
    return steps * args.batch * args.seq_len / summary["timing"]["train_s"]


def baseline_round(args, steps: int) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    from testbed.config import ModelConfig

    d_ff = ModelConfig(d_model=args.d_model).d_ff
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=d_ff,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
        max_position_embeddings=args.seq_len, attn_implementation="sdpa")).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    data = torch.randint(0, args.vocab, (steps, args.batch, args.seq_len + 1), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    t0 = time.perf_counter()
    for step in range(steps):
        x = data[step]
        with autocast:
            logits = model(x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, args.vocab), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    loss.item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * args.batch * args.seq_len / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of each side")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the testbed model")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="write the results to this JSON file")
    args = p.parse_args(argv)

    from testbed.config import ModelConfig
    from testbed.model.counting import flops_per_token

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    from testbed.train.device import cpu_has_bf16_units

    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_bf16_units():
        print("this CPU has no bf16 matrix units (AVX512-BF16/AMX): bf16 would be emulated; "
              "not measured", file=sys.stderr)
        return 3
    from testbed.train.device import measure_matmul_peak

    peak = measure_matmul_peak(dtype, device, seconds=1.0, n=2048)
    cfg = ModelConfig(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                      vocab_size=args.vocab, max_seq_len=args.seq_len)
    fpt = flops_per_token(cfg, args.seq_len)

    ours, theirs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        testbed_round(args, 3, Path(tmp), -1)  # warm-up (allocator, kernels, compile)
        baseline_round(args, 3)
        for r in range(args.rounds):
            ours.append(testbed_round(args, args.steps, Path(tmp), r))
            theirs.append(baseline_round(args, args.steps))
            print(f"round {r}: testbed {ours[-1]:,.0f} tok/s, transformers {theirs[-1]:,.0f} tok/s",
                  file=sys.stderr)
    ratios = [a / b for a, b in zip(ours, theirs)]
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "precision": args.precision, "compile": args.compile,
        "config": {"d_model": args.d_model, "n_layers": args.n_layers, "n_heads": args.n_heads,
                   "seq_len": args.seq_len, "batch": args.batch, "vocab": args.vocab},
        "testbed_tokens_per_s": statistics.median(ours),
        "baseline_tokens_per_s": statistics.median(theirs),
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "flops_per_token": fpt,
        "peak_flops": peak,
        "mfu": statistics.median(ours) * fpt / peak,
        "baseline_mfu": statistics.median(theirs) * fpt / peak,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
