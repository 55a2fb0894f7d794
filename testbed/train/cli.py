"""Subcommands: train, branch, schedule plot, mup check, export, average, eval harness. Heavy
imports happen inside handlers."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one model",
                       description="Train one model from a YAML config plus dotted overrides, e.g. "
                                   "`testbed train configs/smoke.yaml optim.lr=3e-3 model.preset=1m`.")
    p.add_argument("config", help="YAML config file (see configs/ and docs/config.md)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides, e.g. optim.lr=3e-3 train.tokens=2e6")
    p.add_argument("--run-dir", help="run directory (default: runs/<name or config hash>)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its newest valid checkpoint (an unfinished "
                        "run directory is resumed automatically; a finished one is left alone)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete a finished or unfinished run in --run-dir and start again")
    p.set_defaults(func=cmd_train)

    b = sub.add_parser("branch", help="start a cooldown branch from a stable-phase checkpoint",
                       description="Start a new run from checkpoint STEP of a WSD or constant run and "
                                   "decay the LR over FRACTION of the branch's total length, so the "
                                   "branch ends at STEP / (1 - FRACTION) steps with the same data order.")
    b.add_argument("run", help="the parent run directory")
    b.add_argument("--step", type=int, required=True, help="checkpoint step to branch from")
    b.add_argument("--decay", type=float, required=True,
                   help="decay fraction of the branch's total length, e.g. 0.2")
    b.add_argument("--shape", default="1-sqrt", help="decay shape: linear, cosine or 1-sqrt")
    b.add_argument("--run-dir", help="branch run directory (default: RUN/branches/step<S>_decay<F>_<shape>, "
                                      "plus the optimiser overrides)")
    b.add_argument("--beta2", type=float, help="AdamW beta2 for the branch only (e.g. 0.99 for the cooldown)")
    b.add_argument("--weight-decay", type=float, help="weight decay for the branch only")
    b.add_argument("--optim", action="append", default=[], metavar="KEY=VALUE",
                   help="any other optim key for the branch only, e.g. --optim betas=[0.9,0.99] "
                        "(repeatable; the parent's optimiser state is kept)")
    b.set_defaults(func=cmd_branch)

    s = sub.add_parser("schedule", help="learning-rate schedule tools")
    ssub = s.add_subparsers(dest="schedule_command", metavar="ACTION")
    sp = ssub.add_parser("plot", help="draw a config's learning-rate schedule to a PNG")
    sp.add_argument("config", help="YAML config file")
    sp.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    sp.add_argument("--out", default="schedule.png", help="PNG path to write (default schedule.png)")
    sp.set_defaults(func=cmd_schedule_plot)
    s.set_defaults(func=lambda args: (s.print_help(), 2)[1])

    m = sub.add_parser("mup", help="µP tools (model.parametrization: mup)")
    msub = m.add_subparsers(dest="mup_command", metavar="ACTION")
    mc = msub.add_parser("check", help="coordinate check: activation scales against width, SP and µP",
                         description="Train a few AdamW steps of CONFIG's model at each width (n_heads kept) "
                                     "under SP and µP and print the mean |activation| of the embedding, each "
                                     "block and the logits: flat across widths under µP, growing under SP.")
    mc.add_argument("config", help="YAML config file")
    mc.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    mc.add_argument("--widths", default="64,128,256,512", help="comma-separated d_model values (default 64,128,256,512)")
    mc.add_argument("--steps", type=int, default=4, help="AdamW steps at the config's lr, constant (default 4)")
    mc.add_argument("--out", help="folder for coord_check.json and coord_check.png (default: none written)")
    mc.set_defaults(func=cmd_mup_check)
    m.set_defaults(func=lambda args: (m.print_help(), 2)[1])

    e = sub.add_parser("export", help="export a checkpoint as a Hugging Face transformers folder",
                       description="Write config.json and model.safetensors that "
                                   "transformers.AutoModelForCausalLM.from_pretrained loads: "
                                   "LlamaForCausalLM, or Qwen3ForCausalLM with model.qk_norm.")
    e.add_argument("checkpoint", help="RUN_DIR/checkpoints/step_XXXXXXXX")
    e.add_argument("out", help="output folder")
    e.set_defaults(func=cmd_export)

    a = sub.add_parser("average", help="average a run's last checkpoints and evaluate the average",
                       description="Average the weights of the last K saved checkpoints of a run (an "
                                   "alternative to a cooldown), evaluate the average on the run's "
                                   "validation windows and record it in RUN_DIR/averages.jsonl, where "
                                   "`testbed fit collect` lists it as an `average` point.")
    a.add_argument("run", help="the run directory")
    a.add_argument("--last", type=int, required=True, metavar="K", help="how many of the newest checkpoints")
    a.add_argument("--out", help="also write the averaged model as a Hugging Face folder here (as testbed export does)")
    a.add_argument("--device", help="evaluate on this device (default: the run's train.device)")
    a.set_defaults(func=cmd_average)

    v = sub.add_parser("eval", help="evaluate a run's checkpoint with outside tools")
    vsub = v.add_subparsers(dest="eval_command", metavar="ACTION")
    h = vsub.add_parser("harness", help="score a checkpoint with EleutherAI's lm-evaluation-harness",
                        description="Export a checkpoint (the newest valid one, or --step) with the "
                                    "run's tokenizer to a temporary folder and run `python -m lm_eval "
                                    "--model hf` on it; needs `pip install lm-eval`.")
    h.add_argument("run", help="the run directory")
    h.add_argument("--tasks", required=True, help="lm-eval task names, comma-separated, e.g. hellaswag,arc_easy")
    h.add_argument("--step", type=int, help="checkpoint step (default: the newest valid checkpoint)")
    h.add_argument("--device", default="cpu", help="lm-eval's --device, e.g. cuda:0 (default cpu)")
    h.add_argument("--batch-size", type=int, default=8, help="lm-eval's --batch_size (default 8)")
    h.add_argument("--limit", type=float, help="lm-eval's --limit: examples per task (or a fraction)")
    h.add_argument("--out", help="lm-eval's --output_path for its results JSON")
    h.add_argument("--tokenizer", help="tokenizer folder or hub name, when the run's data folder has none")
    h.set_defaults(func=cmd_eval_harness)
    v.set_defaults(func=lambda args: (v.print_help(), 2)[1])


def default_run_dir(config) -> str:
    from testbed.rundir import run_id

    return f"runs/{run_id(config.to_dict())}"


def cmd_train(args) -> int:
    from testbed.config import load_config

    config = load_config(args.config, args.overrides)
    from testbed.train.distributed import teardown
    from testbed.train.trainer import train

    run_dir = args.run_dir or default_run_dir(config)
    try:
        summary = train(config, run_dir, resume=args.resume, overwrite=args.overwrite)
    except BaseException:
        teardown(wait=False)  # the other ranks may never reach a barrier
        raise
    teardown()
    code = summary.get("exit_code", 0)
    import os

    if os.environ.get("RANK", "0") != "0":
        return code
    if summary and code == 0 and summary.get("val_loss") is not None:
        extra = f", optimum {summary['val_opt_loss']:.4f}" if summary.get("val_opt_loss") is not None else ""
        print(f"{run_dir}: val_loss {summary['val_loss']:.4f} nats/token{extra}, "
              f"val_bpb {summary['val_bpb']:.4f}; metrics {run_dir}/metrics.jsonl, "
              f"checkpoints {run_dir}/checkpoints")
    elif code:
        print(f"{run_dir}: stopped early ({summary.get('state')}); exit {code}")
    return code


def cmd_branch(args) -> int:
    from testbed.train.branch import branch, optim_overrides

    optim = optim_overrides(args.beta2, args.weight_decay, args.optim)
    summary = branch(args.run, args.step, args.decay, args.shape, args.run_dir, optim)
    return summary.get("exit_code", 0)


def cmd_schedule_plot(args) -> int:
    from testbed.config import load_config
    from testbed.plan import describe, run_schedule
    from testbed.schedules import plot_schedule

    config = load_config(args.config, args.overrides)
    steps = describe(config)["planned_steps"]
    plot_schedule(args.out, steps, config.optim.lr, run_schedule(config, steps),
                  batch_tokens=config.train.global_batch_tokens,
                  title=f"{config.schedule.name} schedule, {steps} steps")
    print(f"wrote {args.out}")
    return 0


def cmd_mup_check(args) -> int:
    from testbed.config import load_config
    from testbed.errors import ConfigError

    config = load_config(args.config, args.overrides)
    try:
        widths = [int(w) for w in args.widths.split(",")]
    except ValueError:
        raise ConfigError(f"--widths={args.widths!r} must be comma-separated whole numbers, e.g. 64,128,256") from None
    bad = [w for w in widths if w <= 0 or w % config.model.n_heads]
    if len(widths) < 2 or bad:
        raise ConfigError(f"--widths={args.widths!r} needs two or more positive widths divisible by "
                          f"model.n_heads={config.model.n_heads}")
    if args.steps < 1:
        raise ConfigError(f"--steps={args.steps} must be at least 1")
    from testbed.train.mup import coordinate_check, coordinate_table, write_coordinate_report

    rows = coordinate_check(config, widths, args.steps)
    print(coordinate_table(rows))
    if args.out:
        print("wrote " + ", ".join(write_coordinate_report(rows, args.out)))
    return 0


def cmd_export(args) -> int:
    from testbed.train.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out)
    print(f"wrote {out}/config.json and {out}/model.safetensors")
    return 0


def cmd_average(args) -> int:
    from testbed.train.average import average_checkpoints

    record = average_checkpoints(args.run, args.last, args.out, args.device)
    print(f"{args.run}: the mean of checkpoints {record['steps']}: val_loss {record['val_loss']:.4f} "
          f"nats/token, val_bpb {record['val_bpb']:.4f}; recorded in {args.run}/averages.jsonl"
          + (f"; model written to {args.out}" if args.out else ""))
    return 0


def cmd_eval_harness(args) -> int:
    from testbed.train.harness import run_harness

    return run_harness(args.run, args.tasks, step=args.step, device=args.device, batch_size=args.batch_size,
                       limit=args.limit, out=args.out, tokenizer=args.tokenizer)
