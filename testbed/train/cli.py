"""Subcommands: train, branch, schedule plot, mup check, export, sample, average, eval harness,
parts. Heavy imports happen inside handlers."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    for add in (_add_train, _add_branch, _add_schedule, _add_mup, _add_export, _add_sample, _add_average,
                _add_eval, _add_parts):
        add(sub)


def train_epilog() -> str:
    """The end of `testbed train --help`: where to see the parts and the keys of their settings
    (testbed.config imports no torch)."""
    from testbed.config import PART_OPTIONS

    return ("Parts and their settings: `testbed parts [--import MODULE]` lists every registered part with "
            "its settings and their defaults. A part's settings go under its options key: "
            f"{', '.join(PART_OPTIONS)} (e.g. model.norm_options.alpha=0.25); a schedule's in its own "
            "section (schedule.FIELD). --dry-run shows the chosen parts' settings resolved.")


def _action_group(sub: argparse._SubParsersAction, name: str, help: str, dest: str) -> argparse._SubParsersAction:
    """A command whose ACTIONs are subcommands (`testbed NAME ACTION`); without one it prints its
    help and exits 2. Returns the parser the ACTIONs are added to."""
    group = sub.add_parser(name, help=help)
    actions = group.add_subparsers(dest=dest, metavar="ACTION")
    group.set_defaults(func=lambda args: (group.print_help(), 2)[1])
    return actions


def _add_train(sub: argparse._SubParsersAction) -> None:
    """`testbed train CONFIG [key=value ...]`."""
    p = sub.add_parser("train", help="train one model",
                       description="Train one model from a YAML config plus dotted overrides, e.g. "
                                   "`testbed train configs/smoke.yaml optim.lr=3e-3 model.preset=1m`; "
                                   "`testbed train --run-dir RUN --resume` continues RUN with its own "
                                   "config (RUN/config.yaml).",
                       epilog=train_epilog())
    p.add_argument("config", nargs="?",
                   help="YAML config file (see configs/ and docs/config.md), or a run's run.json; "
                        "omitted: the config of the run in --run-dir")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides, e.g. optim.lr=3e-3 train.tokens=2e6 (a model.preset "
                        "here replaces the file's d_model, n_layers and n_heads, with a note)")
    p.add_argument("--run-dir", help="run directory (default: runs/<name or config hash>)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its newest valid checkpoint (an unfinished "
                        "run directory is resumed automatically; a finished one is left alone)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete a finished or unfinished run in --run-dir and start again")
    p.add_argument("--dry-run", "--print-config", dest="dry_run", action="store_true",
                   help="print the resolved config (YAML) and the plan (N, D, steps, FLOPs, batch, "
                        "schedule), then exit without training or writing anything")
    p.set_defaults(func=cmd_train)


def _add_branch(sub: argparse._SubParsersAction) -> None:
    """`testbed branch RUN --step S --decay F`."""
    b = sub.add_parser("branch", help="start a cooldown branch from a stable-phase checkpoint",
                       description="Start a new run from checkpoint STEP of a run's stable phase (wsd, constant) and "
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


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    """CONFIG and its dotted overrides, for the commands that read a config but train no run."""
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def _tokenizer_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", help="tokenizer folder or hub name, when the run's data folder has none")


def _add_schedule(sub: argparse._SubParsersAction) -> None:
    """`testbed schedule plot`."""
    ssub = _action_group(sub, "schedule", help="learning-rate schedule tools", dest="schedule_command")
    sp = ssub.add_parser("plot", help="draw a config's learning-rate schedule to a PNG")
    _config_arguments(sp)
    sp.add_argument("--out", default="schedule.png", help="PNG path to write (default schedule.png)")
    sp.set_defaults(func=cmd_schedule_plot)


def _add_mup(sub: argparse._SubParsersAction) -> None:
    """`testbed mup check`."""
    msub = _action_group(sub, "mup", help="µP tools (model.parametrization: mup)", dest="mup_command")
    mc = msub.add_parser("check", help="coordinate check: activation scales against width, SP and µP",
                         description="Train a few AdamW steps of CONFIG's model at each width (n_heads kept) "
                                     "under SP and µP and print the mean |activation| of the embedding, each "
                                     "block and the logits: flat across widths under µP, growing under SP.")
    _config_arguments(mc)
    mc.add_argument("--widths", default="64,128,256,512", help="comma-separated d_model values (default 64,128,256,512)")
    mc.add_argument("--steps", type=int, default=4, help="AdamW steps at the config's lr, constant (default 4)")
    mc.add_argument("--out", help="folder for coord_check.json and coord_check.png (default: none written)")
    mc.set_defaults(func=cmd_mup_check)


def _add_export(sub: argparse._SubParsersAction) -> None:
    """`testbed export CHECKPOINT OUT`."""
    e = sub.add_parser("export", help="export a checkpoint as a Hugging Face transformers folder",
                       description="Write config.json and model.safetensors that "
                                   "transformers.AutoModelForCausalLM.from_pretrained loads: "
                                   "LlamaForCausalLM, or Qwen3ForCausalLM with model.qk_norm; with the "
                                   "run's tokenizer (its data folder's) also tokenizer.json, "
                                   "tokenizer_config.json and generation_config.json, for AutoTokenizer "
                                   "and generate.")
    e.add_argument("checkpoint", help="RUN_DIR/checkpoints/step_XXXXXXXX")
    e.add_argument("out", help="output folder")
    _tokenizer_argument(e)
    e.set_defaults(func=cmd_export)


def _add_sample(sub: argparse._SubParsersAction) -> None:
    """`testbed sample RUN --prompt TEXT`."""
    g = sub.add_parser("sample", help="generate text from a run's checkpoint",
                       description="Load a checkpoint (a run's newest valid one, or --step) with the run's "
                                   "tokenizer and print PROMPT followed by the text the model writes after "
                                   "it: greedy at --temperature 0 (the default), else sampled. Runs on a CPU.")
    g.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="a run directory or RUN_DIR/checkpoints/step_XXXXXXXX")
    g.add_argument("--prompt", required=True, help="the text to continue ('' starts a new document)")
    g.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate at most (default 50)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; else sample at this temperature")
    g.add_argument("--top-k", type=int, help="sample from the K likeliest tokens only")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--step", type=int, help="checkpoint step of the run (default: the newest valid one)")
    g.add_argument("--device", default="cpu", help="cpu (default), cuda:0, auto")
    _tokenizer_argument(g)
    g.set_defaults(func=cmd_sample)


def _add_average(sub: argparse._SubParsersAction) -> None:
    """`testbed average RUN --last K`."""
    a = sub.add_parser("average", help="average a run's last checkpoints and evaluate the average",
                       description="Average the weights of the last K saved checkpoints of a run (an "
                                   "alternative to a cooldown), evaluate the average on the run's "
                                   "validation windows and record it in RUN_DIR/averages.jsonl, where "
                                   "`testbed fit collect` lists it as an `average` point.")
    a.add_argument("run", help="the run directory")
    a.add_argument("--last", type=int, required=True, metavar="K", help="how many of the newest checkpoints")
    a.add_argument("--out", help="also write the averaged model as a Hugging Face folder here (as testbed export does)")
    a.add_argument("--device", help="evaluate on this device (default: the run's train.device)")
    a.add_argument("--phase", choices=["warmup", "stable", "decay"],
                   help="average the last K checkpoints of this schedule phase only (default: the last K, "
                        "whatever their phases; the command names the phases it mixes)")
    a.add_argument("--until-step", type=int, metavar="S",
                   help="the last K checkpoints up to step S, which must have one (an average inside the run, "
                        "to compare with a cooldown branch ending there)")
    a.set_defaults(func=cmd_average)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    """`testbed eval harness RUN`."""
    vsub = _action_group(sub, "eval", help="evaluate a run's checkpoint with outside tools", dest="eval_command")
    h = vsub.add_parser("harness", help="score a checkpoint with EleutherAI's lm-evaluation-harness",
                        description="Export a checkpoint (the newest valid one, or --step) with the "
                                    "run's tokenizer to a temporary folder and run `python -m lm_eval "
                                    "--model hf` on it; needs `pip install lm-eval`.")
    h.add_argument("run", help="the run directory")
    h.add_argument("--tasks", help="lm-eval task names (or task .yaml files), comma-separated, e.g. hellaswag,arc_easy")
    h.add_argument("--train-tasks", action="store_true",
                   help="also score the run's own train.tasks through lm-eval (as testbed_<name>) and print "
                        "them beside the in-loop scores of the same step")
    h.add_argument("--include-path", help="lm-eval's --include_path: a folder of local task YAML files")
    h.add_argument("--offline", action="store_true",
                   help="set HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 for lm-eval (no network: local tasks only)")
    h.add_argument("--step", type=int, help="checkpoint step (default: the newest valid checkpoint)")
    h.add_argument("--device", default="cpu", help="lm-eval's --device, e.g. cuda:0 (default cpu)")
    h.add_argument("--batch-size", type=int, default=8, help="lm-eval's --batch_size (default 8)")
    h.add_argument("--limit", type=float, help="lm-eval's --limit: examples per task (or a fraction)")
    h.add_argument("--out", help="lm-eval's --output_path for its results JSON")
    _tokenizer_argument(h)
    h.set_defaults(func=cmd_eval_harness)


def _add_parts(sub: argparse._SubParsersAction) -> None:
    """`testbed parts [--import MODULE ...]`."""
    p = sub.add_parser("parts", help="list the registered parts and their settings",
                       description="List every registry (norms, attention, MLPs, position encodings, "
                                   "initialisations, optimisers, schedules, data sources, laws, studies) with each "
                                   "registered name, its settings with their defaults and the config key "
                                   "that sets each (e.g. model.norm_options.alpha).")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import this module (on PYTHONPATH) first, so the parts it registers are listed "
                        "(repeatable; as a config's imports:)")
    p.set_defaults(func=cmd_parts)


def cmd_parts(args) -> int:
    from testbed.registry import import_modules

    import_modules(args.imports, "--import")
    # The modules that make the built-in registries and register their parts.
    import testbed.data.loader  # noqa: F401
    import testbed.fit.laws  # noqa: F401
    import testbed.model.transformer  # noqa: F401
    import testbed.optim  # noqa: F401
    import testbed.schedules  # noqa: F401
    import testbed.study.builtin  # noqa: F401
    from testbed.train.parts import parts_listing

    print("\n".join(parts_listing()))
    return 0


def default_run_dir(config) -> str:
    from testbed.config import run_id

    return f"runs/{run_id(config.to_dict())}"


def rank_zero() -> bool:
    """Whether this process speaks for the run (rank 0 under torchrun, or the only process)."""
    import os

    return os.environ.get("RANK", "0") == "0"


def load_train_config(config_path: str | None, overrides: list[str], run_dir: str | None = None):
    """The config a command asked for: CONFIG (a YAML file, or a run's run.json) plus overrides;
    without CONFIG, the config of the run in RUN_DIR plus overrides. Notes (a preset on the
    command line replacing the file's shape) go to stderr, from rank 0."""
    import sys

    from testbed.config import load_config, read_yaml, saved_config
    from testbed.errors import ConfigError

    notes: list[str] = []
    if config_path is None:
        if run_dir is None:
            raise ConfigError("give a CONFIG file, or --run-dir of a run to continue with its own config "
                              "(`testbed train --run-dir RUN --resume`)")
        source = run_config(run_dir)
    elif Path(config_path).is_dir():
        raise ConfigError(f"CONFIG {config_path!r} is a folder; to continue the run in it: `testbed train "
                          f"--run-dir {config_path} --resume`; to start a new run from its config: "
                          f"`testbed train {Path(config_path) / 'config.yaml'} --run-dir NEW`")
    else:
        source = read_yaml(config_path)
        if isinstance(source.get("config"), dict) and "run_id" in source:  # a run's run.json
            source = saved_config(source["config"]).to_dict()
    config = load_config(source, overrides, notes=notes)
    if rank_zero():
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    return config


def run_config(run_dir: str) -> dict:
    """The resolved config of the run in RUN_DIR, as a tree: its run.json's, else (through the
    trainer's reader, which imports torch) its newest checkpoint's or its config.yaml's."""
    from testbed.config import saved_config
    from testbed.errors import ConfigError, TestbedError
    from testbed.rundir import RunDir

    rd = RunDir(run_dir)
    if not rd.path.is_dir():
        raise ConfigError(f"--run-dir {run_dir!r} does not exist, and no CONFIG was given; give a CONFIG "
                          f"file to start a run there")
    try:
        run = rd.read_run()
    except TestbedError:
        run = None  # damaged: the checkpoints may still hold the config
    if run is not None and isinstance(run.get("config"), dict):
        return saved_config(run["config"]).to_dict()
    from testbed.train.resume import load_run_config

    return load_run_config(rd.path).to_dict()


def split_config_arg(args) -> None:
    """`testbed train --run-dir RUN key=value`: argparse takes the first override for CONFIG."""
    if args.config and "=" in args.config and not Path(args.config).exists():
        args.overrides = [args.config, *args.overrides]
        args.config = None


def cmd_train(args) -> int:
    split_config_arg(args)
    config = load_train_config(args.config, args.overrides, args.run_dir)
    run_dir = args.run_dir or default_run_dir(config)
    if args.dry_run:
        return dry_run(config, run_dir)
    from testbed.train.distributed import teardown
    from testbed.train.trainer import train

    try:
        summary = train(config, run_dir, resume=args.resume, overwrite=args.overwrite)
    except BaseException:
        teardown(wait=False)  # the other ranks may never reach a barrier
        raise
    teardown()
    code = summary.get("exit_code", 0)
    if not rank_zero():
        return code
    if summary and code == 0 and summary.get("val_loss") is not None:
        extra = f", optimum {summary['val_opt_loss']:.4f}" if summary.get("val_opt_loss") is not None else ""
        print(f"{run_dir}: val_loss {summary['val_loss']:.4f} nats/token{extra}, "
              f"val_bpb {summary['val_bpb']:.4f}; metrics {run_dir}/metrics.jsonl, "
              f"checkpoints {run_dir}/checkpoints")
    elif code:
        print(f"{run_dir}: stopped early ({summary.get('state')}); exit {code}")
    return code


def dry_run(config, run_dir: str) -> int:
    """The resolved config, then the plan as YAML comments (the output is a config file `testbed
    train` accepts); no torch, nothing written."""
    from testbed.errors import TestbedError
    from testbed.plan import plan_lines
    from testbed.rundir import RunDir
    from testbed.train.parts import chosen_lines

    lines = plan_lines(config) + chosen_lines(config)
    rd = RunDir(run_dir)
    try:
        state = rd.read_status().get("state") if rd.exists() else None
    except TestbedError as err:
        state = f"unreadable status: {err}"
    where = f"holds a {state} run" if state else "new" if not rd.path.exists() else "exists, no run in it"
    if rank_zero():
        print(config.to_yaml(), end="")
        print("\n".join(f"# {line}" for line in [*lines, f"run dir {run_dir} ({where})"]))
    return 0


def cmd_branch(args) -> int:
    from testbed.train.branch import branch, optim_overrides

    optim = optim_overrides(args.beta2, args.weight_decay, args.optim)
    summary = branch(args.run, args.step, args.decay, args.shape, args.run_dir, optim)
    return summary.get("exit_code", 0)


def cmd_schedule_plot(args) -> int:
    from testbed.plan import describe, run_schedule
    from testbed.schedules import plot_schedule

    config = load_train_config(args.config, args.overrides)
    steps = describe(config)["planned_steps"]
    plot_schedule(args.out, steps, config.optim.lr, run_schedule(config, steps),
                  batch_tokens=config.train.global_batch_tokens,
                  title=f"{config.schedule.name} schedule, {steps} steps")
    print(f"wrote {args.out}")
    return 0


def cmd_mup_check(args) -> int:
    from testbed.errors import ConfigError

    config = load_train_config(args.config, args.overrides)
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
    from testbed.train.export import export

    print(export(args.checkpoint, args.out, args.tokenizer).summary())
    return 0


def cmd_sample(args) -> int:
    import sys

    from testbed.train.load import load

    loaded = load(args.run, step=args.step, device=args.device, tokenizer=args.tokenizer)
    text = loaded.sample(args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed)
    print(f"{loaded.checkpoint} (step {loaded.step}), tokenizer from {loaded.tokenizer_from}", file=sys.stderr)
    print(args.prompt + text)
    return 0


def cmd_average(args) -> int:
    from testbed.train.average import average_checkpoints

    record = average_checkpoints(args.run, args.last, args.out, args.device, phase=args.phase, say=print,
                                 until=args.until_step)
    print(f"{args.run}: the mean of checkpoints {record['steps']}: val_loss {record['val_loss']:.4f} "
          f"nats/token, val_bpb {record['val_bpb']:.4f}; recorded in {args.run}/averages.jsonl"
          + (f"; model written to {args.out}" if args.out else ""))
    return 0


def cmd_eval_harness(args) -> int:
    from testbed.train.harness import run_harness

    return run_harness(args.run, args.tasks, step=args.step, device=args.device, batch_size=args.batch_size,
                       limit=args.limit, out=args.out, tokenizer=args.tokenizer, include_path=args.include_path,
                       train_tasks=args.train_tasks, offline=args.offline)
