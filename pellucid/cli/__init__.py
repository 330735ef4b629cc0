"""The `pellucid` console script: argparse subcommands, each a thin handler, a module per family.

Each verb is built by `add_<verb>(subparsers)` and handled by `cmd_<verb>(args) -> int`. Handlers
parse, call one library (or `recipes`) function, and print. Heavy imports (torch, matplotlib) happen
inside handlers so that `pellucid --help` stays fast. Every `PellucidError` becomes one line on
stderr, `pellucid: error: ...`, with exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from pellucid import __version__
from pellucid.cli.align import add_dpo, add_report, add_reward
from pellucid.cli.data import add_data, add_tokenizer
from pellucid.cli.explain import add_explain, add_explain_train
from pellucid.cli.finetune import add_eval, add_finetune
from pellucid.cli.generate import add_chat, add_export, add_generate
from pellucid.cli.ladder import add_ladder
from pellucid.cli.rank import add_prefs, add_rank
from pellucid.cli.rl import add_rlhf
from pellucid.cli.serve import add_serve
from pellucid.cli.train import add_demo, add_train
from pellucid.errors import PellucidError

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_data,
    add_tokenizer,
    add_generate,
    add_chat,
    add_export,
    add_train,
    add_demo,
    add_explain,
    add_explain_train,
    add_finetune,
    add_eval,
    add_rlhf,
    add_serve,
    add_rank,
    add_prefs,
    add_reward,
    add_dpo,
    add_report,
    add_ladder,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pellucid",
        description="A complete, readable LLM stack: tokenizer, transformer, trainer, engine.",
    )
    parser.add_argument("--version", action="version", version=f"pellucid {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 unexpected error, 2 user error, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # pellucid's own log at INFO; other libraries' (gguf's writer, ...) only from WARNING up.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr, force=True)
    logging.getLogger("pellucid").setLevel(logging.INFO)
    try:
        return args.handler(args)
    except PellucidError as e:
        if args.debug:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"pellucid: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pellucid: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or an unforeseen fault: still one line, the traceback on demand
        if args.debug:
            raise
        msg = " ".join(str(e).split())
        print(
            f"pellucid: error: {type(e).__name__}: {msg} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
