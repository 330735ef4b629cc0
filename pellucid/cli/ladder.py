"""`pellucid ladder`: language models from Shannon to the transformer, on one corpus, in one table."""

from __future__ import annotations

import argparse


def add_ladder(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ladder",
        help="climb from byte noise and n-grams through word vectors to the transformer, in bits/byte",
    )
    p.add_argument("--corpus", default="shakespeare", help="corpus name, file, folder or glob")
    p.add_argument(
        "--minutes",
        type=float,
        default=5.0,
        help="the transformer's training time, as `pellucid demo --minutes` (default 5); the "
        "word vectors get a tenth of it and the neural LM three tenths",
    )
    p.add_argument("--out", help="folder for the results (default: runs/ladder-<timestamp>)")
    p.add_argument(
        "--run", help="score this run directory as the transformer instead of training one"
    )
    p.set_defaults(handler=cmd_ladder)


def _table(rungs: list, width: int) -> object:
    """The ladder as a rich table; a sample column only where the console has room for one."""
    from rich.table import Table

    table = Table(title="the ladder: validation bits per byte (lower is better)")
    table.add_column("rung", min_width=18)
    for col in ("kind", "bits/byte", "seconds", "size"):
        table.add_column(col, justify="left" if col == "kind" else "right", no_wrap=True)
    with_sample = width >= 120  # the samples are in ladder.html in full anyway
    if with_sample:
        table.add_column("sample", no_wrap=True, overflow="ellipsis", max_width=width - 90)
    for r in rungs:
        bpb = "-" if r.bits_per_byte is None else f"{r.bits_per_byte:.4f}"
        row = [r.name, r.kind, bpb, f"{r.seconds:.1f}", f"{r.size:,}"]
        shown = r.text or (r.samples[0][0] + r.samples[0][1] if r.samples else "")
        # One line, and nothing a terminal would act on (a corpus may hold escape codes).
        sample = "".join(c if c.isprintable() else " " for c in " ".join(shown.split()))
        table.add_row(*row, *([sample] if with_sample else []))
    return table


def cmd_ladder(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from rich.console import Console
    from rich.markup import escape

    from pellucid import recipes
    from pellucid.files import check_output

    out = check_output(args.out, "dir") if args.out else recipes.default_run_dir("ladder")
    progress = Console(stderr=True)

    def on_rung(r: object) -> None:
        bpb = "-" if r.bits_per_byte is None else f"{r.bits_per_byte:.4f}"
        progress.print(
            f"[bold]{escape(r.name)}[/bold]: {bpb} bits/byte, {r.seconds:.1f} s", highlight=False
        )

    run = Path(args.run) if args.run else None
    rungs = recipes.ladder(args.corpus, args.minutes, out, run, on_rung)
    console = Console(file=sys.stdout)
    console.print(_table(rungs, console.width))
    best = min((r for r in rungs if r.kind == "ngram"), key=lambda r: r.bits_per_byte)
    top = rungs[-1]
    gap = best.bits_per_byte - top.bits_per_byte
    print(
        f"the transformer: {top.bits_per_byte:.4f} bits/byte, {abs(gap):.4f} "
        f"{'below' if gap > 0 else 'ABOVE'} the best n-gram ({best.name}: {best.bits_per_byte:.4f})"
    )
    for name in ("ladder.json", "ladder.png", "ladder.html"):
        print(f"  {out / name}")
    return 0
