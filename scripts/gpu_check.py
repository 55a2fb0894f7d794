#!/usr/bin/env python
"""GPU checks in one go: correctness (bf16 autocast vs fp32 losses) and training throughput/MFU
for ladder rungs from 100m to 1b with the real trainer (bf16, torch.compile, fused AdamW).

    python scripts/gpu_check.py --json gpu.json          # on a CUDA machine
    python scripts/gpu_check.py --smoke                  # tiny version on the CPU (tests the script)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

COMMON = ["logging.wandb=false", "logging.progress=false", "checkpoint.final=false"]


def run(overrides: list[str], run_dir: Path) -> tuple[dict, list[dict]]:
    from testbed.config import load_config
    from testbed.train.loop import train

    summary = train(load_config(None, COMMON + overrides), run_dir)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, lines


def correctness(tmp: Path, smoke: bool) -> dict:
    preset = "100k" if smoke else "10m"
    steps = 10 if smoke else 200
    batch = 1024 if smoke else 8192
    base = [f"model.preset={preset}", "data.seq_len=128", "model.max_seq_len=128",
            f"train.global_batch_tokens={batch}", f"train.steps={steps}", f"train.eval_every={steps}",
            "optim.lr=3e-3", f"schedule.warmup_steps={steps // 5}"]
    device = ["train.device=cpu"] if smoke else []
    fp32, _ = run(base + device + ["train.precision=fp32"], tmp / "fp32")
    bf16, _ = run(base + device + ["train.precision=bf16"], tmp / "bf16")
    gap = abs(bf16["val_loss"] - fp32["val_loss"])
    return {"preset": preset, "steps": steps, "fp32_val_loss": fp32["val_loss"],
            "bf16_val_loss": bf16["val_loss"], "abs_gap": gap, "ok": gap < 0.02 * fp32["val_loss"]}


def throughput(tmp: Path, preset: str, seq_len: int, vocab: int, smoke: bool) -> dict:
    from testbed.config import load_config
    from testbed.train.memory import largest_micro_batch

    base = [f"model.preset={preset}", f"model.vocab_size={vocab}", "data.source=random",
            f"data.seq_len={seq_len}", f"model.max_seq_len={seq_len}", "data.val_sequences=8"]
    if smoke:
        micro, extra = 4, ["train.device=cpu", "train.precision=fp32"]
    else:
        micro = min(64, largest_micro_batch(load_config(None, COMMON + base + ["train.precision=bf16"])))
        extra = ["train.precision=bf16", "train.compile=true"]
    accum = max(1, (2 ** 19) // (micro * seq_len)) if not smoke else 1
    steps = 8 if smoke else 40
    _, lines = run(base + extra + [f"train.micro_batch_size={micro}",
                                   f"train.global_batch_tokens={micro * accum * seq_len}",
                                   f"train.steps={steps}", "train.log_every=5",
                                   f"train.eval_every={steps}"], tmp / f"tp-{preset}")
    timed = [x for x in lines if "tokens_per_s" in x][1:]  # the first window holds compilation
    return {"preset": preset, "seq_len": seq_len, "vocab": vocab, "micro_batch": micro,
            "global_batch_tokens": micro * accum * seq_len,
            "tokens_per_s": statistics.median(x["tokens_per_s"] for x in timed),
            "mfu": statistics.median(x["mfu"] for x in timed) if timed[0]["mfu"] is not None else None,
            "peak_mem_gb": max(x["peak_mem_gb"] for x in timed)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny CPU version that checks the script runs")
    p.add_argument("--presets", default="100m,300m,1b", help="ladder rungs to benchmark")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--json", help="write results here")
    args = p.parse_args(argv)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke on a CPU", file=sys.stderr)
        return 2
    presets = ["100k"] if args.smoke else args.presets.split(",")
    seq_len, vocab = (64, 256) if args.smoke else (args.seq_len, args.vocab)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "cpu",
                  "torch": torch.__version__, "correctness": correctness(tmp, args.smoke),
                  "throughput": [throughput(tmp, p_, seq_len, vocab, args.smoke) for p_ in presets]}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if result["correctness"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
