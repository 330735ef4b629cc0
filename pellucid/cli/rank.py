"""`pellucid rank` (collect rankings: web page, terminal, or an oracle) and `pellucid prefs`
(export the rankings as preference pairs, import pairs).

    pellucid rank --model M --prompts prompts.jsonl --db prefs.sqlite          # page at /rank
    pellucid rank ... --terminal                                               # in this terminal
    pellucid rank ... --oracle words                                           # no person needed
    pellucid prefs export --db prefs.sqlite --out pairs.jsonl
    pellucid prefs import --db prefs.sqlite pairs.jsonl
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from pellucid.cli.common import add_sampling, emit_json, load, sampling
from pellucid.cli.serve import in_passing_thread
from pellucid.errors import ConfigError, DataError

TERMINAL_HELP = "order best first, '=' ties (e.g. 2 1=3 4) | s skip | u undo | q quit"


def add_rank(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rank", help="sample K replies per prompt and rank them (page/terminal)")
    add_sampling(p, max_new_tokens=128, temperature=1.0)
    p.set_defaults(seed=0)  # the same prompts file, model and seed sample the same replies
    p.add_argument("--prompts", required=True, help='JSONL of {"prompt": str, "answer"?: str}')
    p.add_argument("--db", required=True, help="the SQLite ranking store (made if missing)")
    p.add_argument("--k", type=int, default=4, help="replies sampled per prompt (default 4)")
    p.add_argument("--port", type=int, default=8000, help="port of the page on 127.0.0.1 (0: any)")
    p.add_argument("--terminal", action="store_true", help="rank in this terminal, not a page")
    p.add_argument("--oracle", help="let this oracle rank every prompt instead of a person")
    p.add_argument("--ranker", help="your name, stored with each ranking (default: login name)")
    p.set_defaults(handler=cmd_rank)


def add_prefs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prefs", help="export rankings as preference pairs, or import pairs")
    verbs = p.add_subparsers(dest="prefs_command", required=True, metavar="VERB")
    e = verbs.add_parser("export", help="write every pair the stored rankings imply (JSONL)")
    e.add_argument("--db", required=True, help="the SQLite ranking store")
    e.add_argument("--out", required=True, help='pairs JSONL: {"prompt", "chosen", "rejected"}')
    e.add_argument("--ranker", help="only this ranker's rankings (a name, or oracle:NAME)")
    e.add_argument("--json", action="store_true", help="print the counts as JSON")
    i = verbs.add_parser("import", help="read a pairs JSONL file into the store (all or nothing)")
    i.add_argument("--db", required=True, help="the SQLite ranking store (made if missing)")
    i.add_argument("pairs", help='JSONL of {"prompt", "chosen", "rejected"}')
    i.add_argument("--ranker", help="who made the pairs (default: import:FILENAME)")
    i.add_argument("--json", action="store_true", help="print the count as JSON")
    p.set_defaults(handler=cmd_prefs)


def inert(text: str) -> str:
    """Model text made safe to print: control characters (a terminal escape sequence, say) are
    shown as escapes, not sent to the terminal; line breaks and tabs stay."""
    return "".join(c if c.isprintable() or c in "\n\t" else ascii(c)[1:-1] for c in text)


def login_name() -> str:
    """Who is ranking when --ranker is not given: the login name, if the system knows one."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user with no passwd entry and no $USER
        return "anonymous"


def cmd_rank(args: argparse.Namespace) -> int:
    from pellucid.align.oracle import get_oracle
    from pellucid.align.rank import rank_with_oracle, sample_into
    from pellucid.align.store import Store, ranker_kind
    from pellucid.data.preferences import read_prompts
    from pellucid.weights.resolve import DEFAULT_MODEL

    rows = read_prompts(args.prompts)  # every flag and file checked before the model loads
    oracle = get_oracle(args.oracle) if args.oracle else None
    ranker = args.ranker or login_name()
    if oracle is None and ranker_kind(ranker) != "person":
        raise ConfigError(f"--ranker {ranker!r}: names starting 'oracle:'/'import:' are reserved")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    spec = args.model or DEFAULT_MODEL
    with Store(args.db) as store:

        def progress(done: int, n: int) -> None:
            print(f"\rsampled {done}/{n} prompts x {args.k} replies", end="", file=sys.stderr)

        def load_and_sample() -> tuple[Any, int]:
            loaded = load(args)
            params = sampling(args, loaded.tokenizer)
            model_id = sample_into(
                store,
                loaded.model,
                loaded.tokenizer,
                loaded.chat_template(),
                spec,
                rows,
                args.k,
                params,
                on_progress=progress,
            )
            return loaded, model_id

        # Not in the main thread: the page's chat would decode beside the OpenMP pool the main
        # thread keeps after running the model, at a third of the speed (in_passing_thread).
        loaded, model_id = in_passing_thread(load_and_sample)
        print(file=sys.stderr)
        if oracle is not None:
            n = rank_with_oracle(store, model_id, oracle)
            print(f"oracle:{oracle.name} ranked {n} prompts ({oracle.description}) into {args.db}")
            return 0
        if args.terminal:
            return rank_in_terminal(store, model_id, ranker)
        return serve_page(args, loaded, store, model_id, spec, ranker)


def serve_page(
    args: argparse.Namespace,
    loaded: Any,
    store: Any,
    model_id: int,
    spec: str,
    ranker: str,
) -> int:
    """The serve app (chat and explain included) with the ranking page, on 127.0.0.1 only."""
    import uvicorn

    from pellucid.cli.serve import bind, served_name
    from pellucid.serve.app import create_app
    from pellucid.serve.rank import RankState, mount_rank

    app = create_app(loaded, model_name=served_name(args.model))
    mount_rank(app, RankState(store, model_id, spec, ranker))
    sock = bind("127.0.0.1", args.port)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/rank"
    print(f"pellucid rank: open {url} (each ranking is saved at once; Ctrl-C stops)", flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def rank_in_terminal(store: Any, model_id: int, ranker: str) -> int:
    """Show each prompt and its replies; read an order, a skip, an undo or quit; save at once."""
    from pellucid.align.rank import parse_order

    while True:
        prompt, left = store.next_prompt(ranker, model_id)
        if prompt is None:
            print(f"nothing left to rank as {ranker}; rankings are in {store.path}")
            return 0
        replies = store.responses(prompt.id, model_id)
        print(
            f"\n=== prompt {prompt.id} ({left} left, ranking as {ranker}) ===\n{inert(prompt.text)}"
        )
        for n, reply in enumerate(replies, start=1):
            print(f"\n--- reply {n} ---\n{inert(reply.text) or '(empty reply)'}")
        while True:
            try:
                line = input(f"\n{TERMINAL_HELP}\n> ").strip().lower()
            except EOFError:
                line = "q"
            if line == "q":
                return 0
            if line == "u":
                undone = store.undo(ranker)
                print("took back your last ranking" if undone else "nothing to undo")
                break
            if line == "s":
                store.save_ranking(prompt.id, model_id, ranker, None)
                break
            try:
                ranks = parse_order(line, len(replies))
            except DataError as e:
                print(f"? {e}")
                continue
            store.save_ranking(
                prompt.id, model_id, ranker, {r.id: x for r, x in zip(replies, ranks, strict=True)}
            )
            print("saved")
            break


def cmd_prefs(args: argparse.Namespace) -> int:
    from pellucid.align.rank import export_pairs, import_pairs
    from pellucid.align.store import Store

    if args.prefs_command == "export":
        with Store(args.db, create=False) as store:
            counts = export_pairs(store, args.out, args.ranker)
        if args.json:
            emit_json(counts)
        else:
            left = counts["left_out_empty"]
            note = f" ({left} with an empty reply left out)" if left else ""
            print(
                f"wrote {counts['pairs']} pairs from {counts['rankings']} rankings to {args.out}{note}"
            )
        return 0
    with Store(args.db) as store:
        n = import_pairs(store, args.pairs, args.ranker)
    if args.json:
        emit_json({"pairs": n})
    else:
        print(f"imported {n} pairs from {args.pairs} into {args.db}")
    return 0
