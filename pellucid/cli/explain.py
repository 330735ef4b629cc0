"""`pellucid explain` and `explain-train`: the math of one prediction and one training step."""

from __future__ import annotations

import argparse
import sys

from pellucid.cli.common import emit_json


def add_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="show every step of the math for the next token of a prompt")
    p.add_argument("prompt", help="the prompt, as raw text")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model spec (default: SmolLM2)")
    p.add_argument(
        "--steps",
        "--step",
        type=int,
        default=0,
        help="also generate N tokens, showing the KV cache",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (argmax)")
    p.add_argument("--top-k", type=int, help="keep the k most likely tokens")
    p.add_argument("--top-p", type=float, help="keep the smallest set reaching probability p")
    p.add_argument(
        "--min-p", type=float, help="drop tokens below min-p x the best one's probability"
    )
    p.add_argument("--seed", type=int, help="seed for sampling when temperature > 0")
    p.add_argument(
        "--json", action="store_true", help="print the explain data as JSON (docs/explain.md)"
    )
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report")
    p.add_argument("--png", metavar="DIR", help="also write the figures as PNG files")
    p.set_defaults(handler=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console

    from pellucid.explain import render
    from pellucid.explain.trace import explain
    from pellucid.files import check_output
    from pellucid.infer.sampling import SamplingParams
    from pellucid.weights.resolve import load_model

    if args.html:  # before the model loads and the forward runs, not after
        check_output(args.html, "file")
    if args.png:
        check_output(args.png, "dir")
    model, tokenizer = load_model(args.model)[:2]
    params = SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=args.seed,
    )
    data = explain(model, tokenizer, args.prompt, params, steps=args.steps)
    if args.json:
        emit_json(data)
    else:
        render.terminal(data, Console())
    if args.html:
        render.save_html(data, Path(args.html))
        print(f"HTML report: {args.html}", file=sys.stderr)
    if args.png:
        paths = render.save_pngs(data, Path(args.png))
        print(f"{len(paths)} figures in {args.png}", file=sys.stderr)
    return 0


def add_explain_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain-train", help="take one training step apart: loss, gradients, updates"
    )
    p.add_argument("text", help="the training text (inputs and next-token targets)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model spec (default: SmolLM2)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate for the step")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--dropout", type=float, default=0.1, help="dropout probability during the step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the data as JSON")
    p.set_defaults(handler=cmd_explain_train)


def cmd_explain_train(args: argparse.Namespace) -> int:
    from rich.console import Console

    from pellucid.explain import render
    from pellucid.explain.train_step import explain_train
    from pellucid.weights.resolve import load_model

    model, tokenizer = load_model(args.model)[:2]
    data = explain_train(
        model,
        tokenizer,
        args.text,
        lr=args.lr,
        weight_decay=args.weight_decay,
        dropout=args.dropout,
        seed=args.seed,
    )
    if args.json:
        emit_json(data)
    else:
        render.terminal_train(data, Console())
    return 0
