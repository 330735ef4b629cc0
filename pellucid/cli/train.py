"""`pellucid train` and `pellucid demo`: pretraining runs."""

from __future__ import annotations

import argparse


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pretrain a model (config file + key=value overrides)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.max_steps=200")
    p.add_argument("--config", help="a TOML file with [model], [data] and [train] tables")
    p.add_argument("--out", help="run directory to create (default: runs/<timestamp>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint")
    p.set_defaults(handler=cmd_train)


def _print_run(result: object) -> None:
    if not result.main:  # another rank of a torchrun job: rank 0 tells the result
        return
    run_dir = result.run_dir
    for prompt, text in result.samples:
        print(f"--- sample ({prompt!r}) ---\n{prompt}{text}\n")
    print(f"validation bits per byte: {result.val_bpb:.4f} after {result.state.step} steps")
    print(f"run directory: {run_dir}")
    print(f"  checkpoint:  {result.state.checkpoint}")
    print(f"  metrics:     {run_dir / 'metrics.jsonl'}")
    print(f"  plot:        {run_dir / 'loss.png'}")
    print(f"  report:      {run_dir / 'report.md'}")


def cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pellucid import recipes
    from pellucid.errors import ConfigError
    from pellucid.files import check_output

    if args.resume:
        if args.config or args.out:
            raise ConfigError(
                "--resume takes the config and directory from RUN_DIR; pass only key=value overrides"
            )
        result = recipes.resume(Path(args.resume), args.overrides)
    else:
        run = recipes.load_run_config(args.config, args.overrides)
        out = check_output(args.out, "dir") if args.out else recipes.default_run_dir()
        result = recipes.pretrain(run, out)
    _print_run(result)
    return 0


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train a small Shakespeare model on the CPU, then sample")
    p.add_argument("--minutes", type=float, default=5.0, help="training time (default 5)")
    p.add_argument("--out", help="run directory to create (default: runs/demo-<timestamp>)")
    p.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:

    from pellucid import recipes
    from pellucid.files import check_output

    result = recipes.demo(args.minutes, check_output(args.out, "dir") if args.out else None)
    _print_run(result)
    return 0
