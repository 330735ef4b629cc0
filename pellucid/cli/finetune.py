"""`pellucid finetune sft|classify` and `pellucid eval`: adapting a model, and measuring it."""

from __future__ import annotations

import argparse

from pellucid.cli.common import emit_json


def add_run_flags(t: argparse.ArgumentParser, data_help: str, eval_help: str) -> None:
    """The flags of every fine-tuning-like run (finetune, reward train, dpo)."""
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.max_steps=200")
    t.add_argument("--model", help="base model spec (default smollm2-135m-instruct)")
    t.add_argument("--data", help=data_help)
    t.add_argument("--out", help="run directory to create (default runs/<task>-<timestamp>)")
    t.add_argument("--lora", action="store_true", help="train LoRA adapters, base frozen")
    t.add_argument("--eval-data", help=eval_help)
    t.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint")
    t.set_defaults(handler=cmd_finetune)


def add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model: sft (chat/instruction) or classify")
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK")
    for task, what in (("sft", "instruction / chat SFT"), ("classify", "a classifier head")):
        t = tasks.add_parser(task, help=f"{what} (LoRA with --lora)")
        add_run_flags(
            t,
            "training JSONL (chat, instruction, prompt/completion, task"
            + (")" if task == "sft" else "; here text/label rows)"),
            "held-out JSONL: scored before/after, kept out of training",
        )
        if task == "sft":
            t.add_argument("--pack", action="store_true", help="pack examples into full rows")
        else:
            t.add_argument("--train-last", type=int, help="train only the last N blocks + head")


def cmd_finetune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pellucid import finetune
    from pellucid.errors import ConfigError
    from pellucid.files import check_output

    extra = []
    if args.eval_data:
        extra.append(f"finetune.eval_data={args.eval_data}")
    if getattr(args, "pack", False):
        extra.append("finetune.pack=true")
    if getattr(args, "train_last", None) is not None:
        extra.append(f"finetune.train_last={args.train_last}")
    if args.resume:
        if args.data or args.out or args.model or args.lora:
            raise ConfigError("--resume takes model, data and settings from RUN_DIR; pass only "
                              "key=value overrides")  # fmt: skip
        result = finetune.resume(Path(args.resume), extra + args.overrides)
    else:
        run = finetune.load_finetune_config(
            args.task, args.model, args.data or "", lora=args.lora,
            assignments=extra + args.overrides,
        )  # fmt: skip
        out = check_output(args.out, "dir") if args.out else None  # before loading anything
        result = finetune.finetune(run, out)
    print(f"before: {finetune._fmt(result.before)}")
    print(f"after:  {finetune._fmt(result.after)}  ({result.state.step} steps)")
    print(f"run directory: {result.run_dir} (a model spec: pellucid chat --model {result.run_dir})")
    print(f"  report: {result.run_dir / 'report.md'}")
    return 0


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score a model on a JSONL file (bpb, exact match, accuracy)")
    p.add_argument("--model", help="model spec (default smollm2-135m-instruct)")
    p.add_argument("--data", required=True, help="JSONL: chat, instruction, prompt/completion, "
                   "task or classification rows")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=64, help="reply budget for task rows")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=0, help="score only the first N rows")
    p.add_argument("--show", type=int, default=0, help="print the first N answers to task rows")
    p.add_argument("--truncate", action="store_true", help="cut rows longer than the context")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=cmd_eval)


_KEYS = ("n", "bits_per_byte", "perplexity", "accuracy", "macro_f1", "exact_match",
         "pairwise_accuracy", "margin")  # fmt: skip


def cmd_eval(args: argparse.Namespace) -> int:
    from pellucid.errors import ConfigError
    from pellucid.finetune import evaluate_file

    if args.max_new_tokens < 1 or args.batch_size < 1 or args.limit < 0:
        raise ConfigError("--max-new-tokens and --batch-size must be >= 1, --limit >= 0")
    r = evaluate_file(
        args.model, args.data, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, limit=args.limit, truncate=args.truncate,
    )  # fmt: skip
    if args.json:
        out = {k: r[k] for k in _KEYS if k in r}
        if "confusion" in r:
            out["confusion"], out["labels"] = r["confusion"], r["labels"]
        emit_json(out)
        return 0
    print(f"{r['n']} {r['shape']} rows")
    for k in _KEYS[1:]:
        if k in r:
            print(f"  {k:14s} {r[k]:.4f}")
    if "confusion" in r:
        print("  confusion (rows: true label, columns: predicted):")
        for label, row in zip(r["labels"], r["confusion"], strict=True):
            print(f"    {label:>12s} " + " ".join(f"{c:6d}" for c in row))
    for answer in r.get("answers", [])[: args.show]:
        print(f"  > {answer!r}")
    return 0
