"""The `pellucid` console script: argparse subcommands, each a thin handler.

Each verb is built by `add_<verb>(subparsers)` and handled by `cmd_<verb>(args) -> int`. Handlers
parse, call one library (or `recipes`) function, and print. Heavy imports (torch, matplotlib) happen
inside handlers so that `pellucid --help` stays fast. Every `PellucidError` becomes one line on
stderr, `pellucid: error: ...`, with exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

from pellucid import __version__
from pellucid.errors import PellucidError


def _emit_json(obj: object) -> None:
    print(json.dumps(obj, ensure_ascii=False, indent=2))


# --- data -----------------------------------------------------------------------------------------


def add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="fetch and inspect corpora")
    verbs = p.add_subparsers(dest="data_cmd", required=True)
    f = verbs.add_parser("fetch", help="download a named corpus into the cache")
    f.add_argument("name", help="corpus name, e.g. shakespeare")
    i = verbs.add_parser("info", help="show what a corpus spec resolves to")
    i.add_argument("corpus", help="a corpus name, file, folder or glob")
    p.set_defaults(handler=cmd_data)


def cmd_data(args: argparse.Namespace) -> int:
    from pellucid.data import sources

    if args.data_cmd == "fetch":
        path = sources.fetch(args.name)
        print(f"{args.name}: cached at {path}")
    else:
        docs = sources.load_corpus(args.corpus)
        n_chars = sum(len(d.text) for d in docs)
        print(f"{args.corpus}: {len(docs)} documents, {n_chars:,} characters")
    return 0


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_data]


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
    """Entry point; returns the exit code (0 ok, 2 user error, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
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
