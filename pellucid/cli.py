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


# --- tokenizer ------------------------------------------------------------------------------------


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

    from pellucid.tokenizer.bpe import ENDOFTEXT, Tokenizer
    from pellucid.tokenizer.formats import load_tokenizer
    from pellucid.tokenizer.pretokenize import bytes_to_str

    if args.tokenizer_cmd == "train":
        from pellucid.data.sources import load_corpus
        from pellucid.errors import ConfigError

        out = Path(args.out) / "tokenizer.json"
        if out.parent.exists() and not out.parent.is_dir():  # say so before training, not after
            raise ConfigError(f"--out {args.out} is a file; give a folder for tokenizer.json")
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
    ids = tok.encode(args.text, allowed_special="all" if args.allow_special else frozenset())
    special = {i: s for s, i in tok.special_tokens.items()}
    raw = [tok.token_bytes(i) for i in ids]
    if args.json:
        _emit_json(
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
    print(f"{len(ids)} tokens for {len(args.text)} characters ({len(args.text.encode())} bytes)")
    for i, b in zip(ids, raw, strict=True):
        kind = " (special)" if i in special else ""
        print(f"{i:>8}  {b.decode('utf-8', errors='replace')!r:<24} {b.hex(' ')}{kind}")
    return 0


# --- generate, chat and export --------------------------------------------------------------------

_MODEL_HELP = (
    "model name (default smollm2-135m-instruct), .gguf file, Hugging Face folder, run directory "
    "or checkpoint"
)


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=_MODEL_HELP)
    p.add_argument(
        "--allow-nonfinite", action="store_true", help="load weights even if they hold NaN/Inf"
    )


def _add_sampling(p: argparse.ArgumentParser, max_new_tokens: int, temperature: float) -> None:
    _add_model(p)
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=temperature, help="0 means greedy (argmax)")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens only")
    p.add_argument("--top-p", type=float, help="sample from the smallest set reaching p")
    p.add_argument("--min-p", type=float, help="drop tokens below min-p x the best one's p")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL penalty, 1 = off")
    p.add_argument("--seed", type=int, help="same seed, same text")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument(
        "--quant",
        choices=["auto", "fp32", "q8", "q4"],
        default="auto",
        help="weights for decoding: auto = q8 on the CPU (fastest passing the quality guard), "
        "fp32 = exact, q4 = 4-bit blocks (see bench/RESULTS.md)",
    )


def _load(args: argparse.Namespace, need_tokenizer: bool = True) -> object:
    """The model --model names (the default one if none), with a tokenizer if needed."""
    from pellucid.errors import TokenizerError
    from pellucid.weights.resolve import DEFAULT_MODEL, load

    loaded = load(args.model or DEFAULT_MODEL, allow_nonfinite=args.allow_nonfinite)
    if need_tokenizer and loaded.tokenizer is None:
        raise TokenizerError(f"model '{args.model}' has no tokenizer to read the prompt with")
    if getattr(args, "quant", None):
        from pellucid.infer.quant import quantize_model

        quantize_model(loaded.model, args.quant)
    return loaded


def _sampling(args: argparse.Namespace, tokenizer: object, top_logprobs: int = 0) -> object:
    from pellucid.infer.conversation import stop_token_ids
    from pellucid.infer.sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        stop=args.stop,
        stop_token_ids=stop_token_ids(tokenizer),
        top_logprobs=top_logprobs,
    )


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a model (streamed, or --json)")
    p.add_argument("prompt", help="the prompt: raw text, or with --chat one user message")
    _add_sampling(p, max_new_tokens=256, temperature=1.0)
    p.add_argument("--chat", action="store_true", help="render the prompt with the chat template")
    p.add_argument("--system", help="system prompt for --chat (default: the template's own)")
    p.add_argument("--top-logprobs", type=int, default=5, help="alternatives per step in --json")
    p.add_argument("--json", action="store_true", help="print one JSON object, not streamed text")
    p.set_defaults(handler=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from pellucid.errors import ConfigError
    from pellucid.infer.engine import Engine

    if args.system is not None and not args.chat:
        raise ConfigError("--system needs --chat (without it the prompt is raw text)")
    loaded = _load(args)
    tokenizer = loaded.tokenizer
    params = _sampling(args, tokenizer, args.top_logprobs if args.json else 0)
    if args.chat:
        system = [] if args.system is None else [{"role": "system", "content": args.system}]
        messages = [*system, {"role": "user", "content": args.prompt}]
        prompt_ids = loaded.chat_template().encode(tokenizer, messages)
    else:
        prompt_ids = tokenizer.encode(args.prompt)
    engine = Engine(loaded.model, tokenizer)
    if not args.json:
        engine.complete(prompt_ids, params, on_text=lambda t: print(t, end="", flush=True))
        print()
        return 0
    _emit_json(engine.complete(prompt_ids, params).to_dict())
    return 0


def add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="talk with a model: multi-turn, streamed (/reset, /exit)")
    # Greedy by default: a small model's first token is often a near-even spread (SmolLM2-135M
    # gives "The" 15%, "L" 14%, "La" 10% for the capital of France), and sampling wanders off.
    _add_sampling(p, max_new_tokens=512, temperature=0.0)
    p.add_argument("--system", help="system prompt (default: the chat template's own, if any)")
    p.add_argument("--stats", action="store_true", help="tokens and speed of each reply, on stderr")
    p.set_defaults(handler=cmd_chat)


def _short(text: str, n: int = 40) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= n else flat[: n - 3] + "...")


def _drop_notice(dropped: list[dict[str, str]], context_len: int) -> None:
    what = ", ".join(f"{m['role']} {_short(m['content'])}" for m in dropped)
    print(
        f"[the conversation no longer fits the {context_len}-token context: dropped the "
        f"{len(dropped)} oldest message{'s' * (len(dropped) > 1)} ({what})]",
        file=sys.stderr,
        flush=True,
    )


def _read_line(interactive: bool) -> str | None:
    """The next line the user typed (None at end of input); a '> ' prompt only on a terminal."""
    try:
        return input("> " if interactive else "")
    except EOFError:
        return None


def cmd_chat(args: argparse.Namespace) -> int:
    from pellucid.infer.conversation import Conversation
    from pellucid.infer.engine import Engine

    loaded = _load(args)
    engine = Engine(loaded.model, loaded.tokenizer)
    chat = Conversation(engine, loaded.chat_template(), system=args.system)
    params = _sampling(args, loaded.tokenizer)
    ctx, interactive = engine.cfg.context_len, sys.stdin.isatty()
    print(
        f"pellucid chat: {loaded.source.name}, {loaded.model.num_params() / 1e6:.1f}M parameters, "
        f"context {ctx} tokens. /reset starts over, /exit quits.",
        file=sys.stderr,
        flush=True,
    )
    while (line := _read_line(interactive)) is not None:
        command = line.strip()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            chat.reset()
            print("[conversation reset]", file=sys.stderr, flush=True)
            continue
        if not command or command in ("/help", "/?"):
            print("type a message; /reset starts over, /exit quits", file=sys.stderr)
            continue
        try:
            turn = chat.say(
                line,
                params,
                on_text=lambda t: print(t, end="", flush=True),
                on_drop=lambda dropped: _drop_notice(dropped, ctx),
            )
        except PellucidError as e:
            print(f"pellucid: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
            continue
        except KeyboardInterrupt:  # Ctrl-C stops the reply, not the chat (at the prompt: quits)
            print("\n[reply interrupted; that message was withdrawn]", file=sys.stderr, flush=True)
            continue
        print(flush=True)
        if args.stats:
            t = turn.completion.timing
            print(
                f"[prompt {turn.prompt_tokens} tokens, prefilled {t.prefill_tokens} "
                f"({turn.prompt_tokens - t.prefill_tokens} reused from the cache); "
                f"{len(turn.completion.ids)} tokens at {t.decode_tokens_per_s:.1f} tokens/s]",
                file=sys.stderr,
                flush=True,
            )
    return 0


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a model as a Hugging Face folder or a GGUF file")
    _add_model(p)
    p.add_argument("--format", choices=["hf", "gguf"], required=True)
    p.add_argument("--out", required=True, help="folder (hf) or file (gguf) to write")
    p.add_argument("--qtype", choices=["f32", "f16", "q8_0"], default="f32", help="GGUF type")
    p.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from pellucid.weights.gguf import save_gguf
    from pellucid.weights.hf import save_hf

    loaded = _load(args, need_tokenizer=False)
    template = loaded.template.source if loaded.template is not None else None
    kwargs = {"tokenizer": loaded.tokenizer, "chat_template": template}
    if args.format == "hf":
        out = save_hf(loaded.model, args.out, **kwargs)
    else:
        out = save_gguf(loaded.model, args.out, qtype=args.qtype, **kwargs)
    print(f"wrote {out} ({args.format}{'' if args.format == 'hf' else ', ' + args.qtype})")
    return 0


# --- train and demo -------------------------------------------------------------------------------


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pretrain a model (config file + key=value overrides)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.max_steps=200")
    p.add_argument("--config", help="a TOML file with [model], [data] and [train] tables")
    p.add_argument("--out", help="run directory to create (default: runs/<timestamp>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint")
    p.set_defaults(handler=cmd_train)


def _print_run(result: object) -> None:
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

    if args.resume:
        if args.config or args.out:
            raise ConfigError(
                "--resume takes the config and directory from RUN_DIR; pass only key=value overrides"
            )
        result = recipes.resume(Path(args.resume), args.overrides)
    else:
        run = recipes.load_run_config(args.config, args.overrides)
        result = recipes.pretrain(run, Path(args.out) if args.out else recipes.default_run_dir())
    _print_run(result)
    return 0


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train a small Shakespeare model on the CPU, then sample")
    p.add_argument("--minutes", type=float, default=5.0, help="training time (default 5)")
    p.add_argument("--out", help="run directory to create (default: runs/demo-<timestamp>)")
    p.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pellucid import recipes

    result = recipes.demo(args.minutes, Path(args.out) if args.out else None)
    _print_run(result)
    return 0


# --- explain --------------------------------------------------------------------------------------


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
    from pellucid.infer.sampling import SamplingParams
    from pellucid.weights.resolve import load_model

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
        _emit_json(data)
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
        _emit_json(data)
    else:
        render.terminal_train(data, Console())
    return 0


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
