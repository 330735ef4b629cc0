"""`pellucid data` and `pellucid tokenizer`: corpora and text as tokens."""

from __future__ import annotations

import argparse
import logging

from pellucid.cli.common import emit_json


def add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data", help="fetch and inspect corpora and datasets; generate tasks; prepare shards"
    )
    verbs = p.add_subparsers(dest="data_cmd", required=True)
    f = verbs.add_parser("fetch", help="download a named corpus or dataset into the cache")
    f.add_argument("name", help="corpus (shakespeare) or dataset (spam, python-faq, ...) name")
    i = verbs.add_parser("info", help="show what a corpus spec or dataset name resolves to")
    i.add_argument("corpus", help="a dataset name, or a corpus name, file, folder or glob")
    t = verbs.add_parser("tasks", help="generate tasks with computed answers, as JSONL")
    t.add_argument(
        "name", help="task family: format, units, sort, json, arith, count, reverse, mix"
    )
    t.add_argument("--n", type=int, required=True, help="number of tasks (distinct prompts)")
    t.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    t.add_argument("--out", required=True, help="the JSONL file to write")
    o = verbs.add_parser("prompts", help="generate prompts an oracle can judge, as JSONL")
    o.add_argument("oracle", help="sentences, words, format or task (see `pellucid dpo`)")
    o.add_argument("--n", type=int, required=True, help="number of distinct prompts")
    o.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    o.add_argument("--out", required=True, help="the JSONL file to write")
    add_prepare(verbs)
    p.set_defaults(handler=cmd_data)


def add_prepare(verbs: argparse._SubParsersAction) -> None:
    r = verbs.add_parser("prepare", help="tokenize corpora in parallel into token shards on disk")
    r.add_argument("corpus", nargs="+", help="files/folders of text, .jsonl, .parquet; or a name")
    r.add_argument("--out", required=True, help="new folder for the shards and manifest.json")
    r.add_argument("--tokenizer", required=True, help="tokenizer.json, run directory or .gguf")
    r.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    r.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard file")
    r.add_argument("--val-tokens", type=int, default=0, help="first N tokens go to val.bin")
    r.add_argument("--field", default="text", help="JSONL key holding the text (default text)")
    r.add_argument("--column", default="text", help="Parquet column of the text (default text)")


def cmd_prepare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pellucid.data.prepare import Options, prepare

    m = prepare(
        args.corpus, Path(args.out), args.tokenizer, workers=args.workers,
        shard_tokens=args.shard_tokens, val_tokens=args.val_tokens,
        opts=Options(field=args.field, column=args.column),
    )  # fmt: skip
    print(
        f"{args.out}: {m['documents']:,} documents, {m['train_tokens']:,} train + "
        f"{m['val_tokens']:,} val tokens in {len(m['shards'])} shards; {m['text_bytes'] / 1e6:.1f} MB "
        f"in {m['seconds']:.1f} s ({m['mb_per_s_per_worker']:.2f} MB/s per worker, {m['workers']} workers)"
    )
    return 0


def _describe_dataset(name: str) -> None:
    from pellucid.data import datasets

    ds = datasets.DATASETS[name]
    path = datasets.resolve_dataset(name)
    manifest = datasets.dataset_manifest(name)
    print(f"{name}: {manifest['rows']:,} rows, {ds.shape} shape; {ds.about}")
    print(f"  source: {manifest['source']}; licence: {ds.licence}")
    for label, count in manifest["labels"].items():
        print(f"  {label}: {count:,}")
    print(f"  file: {path}")


def cmd_data(args: argparse.Namespace) -> int:
    from pellucid.data import datasets, sources

    if args.data_cmd == "prepare":
        return cmd_prepare(args)
    if args.data_cmd == "prompts":
        from pellucid.align.oracle import get_oracle, make_prompts
        from pellucid.data.preferences import write_prompts

        write_prompts(args.out, make_prompts(get_oracle(args.oracle), args.n, args.seed))
        print(f"{args.out}: {args.n} prompts for the {args.oracle} oracle (seed {args.seed})")
    elif args.data_cmd == "tasks":
        import json

        from pellucid.data.tasks import make_tasks
        from pellucid.files import atomic_open, check_output

        check_output(args.out, "file")  # before generating
        rows = make_tasks(args.name, args.n, args.seed)
        with atomic_open(args.out, "w") as out:
            out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        print(f"{args.out}: {len(rows)} {args.name} tasks (seed {args.seed})")
    elif args.data_cmd == "fetch" and args.name in datasets.DATASETS:
        path = datasets.resolve_dataset(args.name)
        print(f"{args.name}: {datasets.dataset_manifest(args.name)['rows']:,} rows at {path}")
    elif args.data_cmd == "fetch":
        path = sources.fetch(args.name)
        print(f"{args.name}: cached at {path}")
    elif args.corpus in datasets.DATASETS:
        _describe_dataset(args.corpus)
    else:
        datasets.resolve_dataset(args.corpus)  # a near-miss of a dataset name: say which one
        docs = sources.load_corpus(args.corpus)
        n_chars = sum(len(d.text) for d in docs)
        print(f"{args.corpus}: {len(docs)} documents, {n_chars:,} characters")
    return 0


def add_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer, or see text as tokens")
    verbs = p.add_subparsers(dest="tokenizer_cmd", required=True)
    t = verbs.add_parser("train", help="train on a corpus; writes OUT/tokenizer.json")
    t.add_argument(
        "--corpus", required=True, help="corpus name (shakespeare), file, folder or glob"
    )
    t.add_argument("--vocab-size", type=int, required=True, help="ids in all, specials included")
    t.add_argument("--out", required=True, help="folder to write tokenizer.json into")
    t.add_argument("--pattern", choices=["gpt2", "llama3", "smollm"], default="gpt2")
    t.add_argument(
        "--special", action="append", help="special token (repeatable; default <|endoftext|>)"
    )
    e = verbs.add_parser("encode", help="show each token of TEXT: its id, text and bytes")
    e.add_argument("text", help="the text to encode")
    e.add_argument("--tokenizer", required=True, help="tokenizer.json, run directory or .gguf")
    e.add_argument(
        "--allow-special", action="store_true", help="read special-token text as control tokens"
    )
    e.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=cmd_tokenizer)


def cmd_tokenizer(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from pellucid.tokenizer.bpe import ENDOFTEXT, Tokenizer, valid_text
    from pellucid.tokenizer.formats import load_tokenizer
    from pellucid.tokenizer.pretokenize import bytes_to_str

    if args.tokenizer_cmd == "train":
        from pellucid.data.sources import load_corpus
        from pellucid.files import check_output

        out = check_output(Path(args.out), "dir") / "tokenizer.json"  # before training, not after
        check_output(out, "file")
        docs = load_corpus(args.corpus)
        n_chars = sum(len(d.text) for d in docs)
        logging.getLogger("pellucid").info(
            "training a %d-token BPE on %s (%d documents, %s characters) ...",
            args.vocab_size,
            args.corpus,
            len(docs),
            f"{n_chars:,}",
        )
        start = time.perf_counter()
        specials = args.special or [ENDOFTEXT]
        tok = Tokenizer.train([d.text for d in docs], args.vocab_size, specials, args.pattern)
        out.parent.mkdir(parents=True, exist_ok=True)
        tok.save(out)
        took = time.perf_counter() - start
        print(f"{out}: {tok.vocab_size} tokens ({len(tok.merges)} merges) in {took:.1f} s")
        return 0
    tok = load_tokenizer(args.tokenizer)
    text = valid_text(args.text)  # argv may carry lone surrogates (undecodable bytes): U+FFFD
    ids = tok.encode(text, allowed_special="all" if args.allow_special else frozenset())
    special = {i: s for s, i in tok.special_tokens.items()}
    raw = [tok.token_bytes(i) for i in ids]
    if args.json:
        emit_json(
            {
                "ids": ids,
                "tokens": [
                    special.get(i) or bytes_to_str(b) for i, b in zip(ids, raw, strict=True)
                ],
                "text": [b.decode("utf-8", errors="replace") for b in raw],
                "bytes": [b.hex(" ") for b in raw],
            }
        )
        return 0
    print(f"{len(ids)} tokens for {len(text)} characters ({len(text.encode())} bytes)")
    for i, b in zip(ids, raw, strict=True):
        kind = " (special)" if i in special else ""
        print(f"{i:>8}  {b.decode('utf-8', errors='replace')!r:<24} {b.hex(' ')}{kind}")
    return 0
