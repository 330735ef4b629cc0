"""`pellucid generate`, `chat` and `export`: a loaded model in use."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from pellucid.cli.common import add_model, add_sampling, emit_json, load, sampling, text_arg
from pellucid.errors import PellucidError

if TYPE_CHECKING:
    from pellucid.infer.conversation import Responder
    from pellucid.infer.engine import Engine
    from pellucid.infer.sampling import SamplingParams
    from pellucid.weights.resolve import LoadedModel


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a model (streamed, or --json)")
    p.add_argument(
        "prompt", help="the prompt: raw text, or with --chat one user message ('-' reads stdin)"
    )
    add_sampling(p, max_new_tokens=256, temperature=1.0)
    p.add_argument("--chat", action="store_true", help="render the prompt with the chat template")
    p.add_argument("--system", help="system prompt for --chat (default: the template's own)")
    p.add_argument("--top-logprobs", type=int, default=5, help="alternatives per step in --json")
    p.add_argument("--json", action="store_true", help="print one JSON object, not streamed text")
    add_speculative(p)
    p.set_defaults(handler=cmd_generate)


def add_speculative(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--speculative",
        metavar="lookup|MODEL",
        help="speculative decoding, same output: guess tokens by prompt lookup, or with a small "
        "draft model sharing the tokenizer (README: Speed)",
    )
    p.add_argument("--draft-k", type=int, help="tokens guessed per step (default 4)")


def make_engine(args: argparse.Namespace, loaded: LoadedModel) -> Engine:
    """The engine for a loaded model, with the drafter --speculative names (if any)."""
    from pellucid.errors import ConfigError
    from pellucid.infer.engine import Engine
    from pellucid.infer.speculative import LookupDrafter, ModelDrafter

    if args.speculative is None:
        if args.draft_k is not None:
            raise ConfigError("--draft-k needs --speculative")
        return Engine(loaded.model, loaded.tokenizer)
    if args.speculative == "lookup":
        draft = LookupDrafter()
    else:
        spec = argparse.Namespace(**{**vars(args), "model": args.speculative})
        small = load(spec, need_tokenizer=False)
        if small.tokenizer is not None and small.tokenizer.vocab != loaded.tokenizer.vocab:
            raise ConfigError(
                f"--speculative {args.speculative}: its tokenizer differs from the model's "
                "(a draft model must share the tokenizer)"
            )
        draft = ModelDrafter(small.model, loaded.model.cfg.vocab_size)
    k = 4 if args.draft_k is None else args.draft_k
    return Engine(loaded.model, loaded.tokenizer, draft=draft, draft_k=k)


def cmd_generate(args: argparse.Namespace) -> int:
    from pellucid.errors import ConfigError

    if args.system is not None and not args.chat:
        raise ConfigError("--system needs --chat (without it the prompt is raw text)")
    loaded = load(args)
    tokenizer = loaded.tokenizer
    params = sampling(args, tokenizer, args.top_logprobs if args.json else 0)
    prompt = text_arg(args.prompt)
    if args.chat:
        system = [] if args.system is None else [{"role": "system", "content": args.system}]
        messages = [*system, {"role": "user", "content": prompt}]
        prompt_ids = loaded.chat_template().encode(tokenizer, messages)
    else:
        prompt_ids = tokenizer.encode(prompt)
    engine = make_engine(args, loaded)
    if not args.json:
        engine.complete(prompt_ids, params, on_text=lambda t: print(t, end="", flush=True))
        print()
        return 0
    emit_json(engine.complete(prompt_ids, params).to_dict())
    return 0


def add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="talk with a model: multi-turn, streamed (/reset, /exit)")
    # Greedy by default: a small model's first token is often a near-even spread (SmolLM2-135M
    # gives "The" 15%, "L" 14%, "La" 10% for the capital of France), and sampling wanders off.
    add_sampling(p, max_new_tokens=512, temperature=0.0)
    p.add_argument("--system", help="system prompt (default: the chat template's own, if any)")
    p.add_argument("--stats", action="store_true", help="tokens and speed of each reply, on stderr")
    add_speculative(p)
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


def _responder(args: argparse.Namespace) -> tuple[Responder, SamplingParams, int]:
    """What `chat` talks to (an engine Conversation, or a program such as ELIZA), its sampling
    settings and context length; prints the banner (and a program's greeting)."""
    from pellucid.weights.resolve import PROGRAMS

    if args.model in PROGRAMS:
        from pellucid.history.eliza import Eliza
        from pellucid.infer.sampling import SamplingParams

        bot = Eliza.doctor()
        print(
            "pellucid chat: ELIZA (Weizenbaum 1966, the DOCTOR script): pattern matching, "
            "no parameters. /reset starts over, /exit quits.",
            file=sys.stderr,
            flush=True,
        )
        print(bot.greeting, flush=True)
        return bot, SamplingParams(), 0
    from pellucid.infer.conversation import Conversation

    loaded = load(args)
    engine = make_engine(args, loaded)
    ctx = engine.cfg.context_len
    print(
        f"pellucid chat: {loaded.source.name}, {loaded.model.num_params() / 1e6:.1f}M parameters, "
        f"context {ctx} tokens. /reset starts over, /exit quits.",
        file=sys.stderr,
        flush=True,
    )
    chat = Conversation(engine, loaded.chat_template(), system=args.system)
    return chat, sampling(args, loaded.tokenizer), ctx


def cmd_chat(args: argparse.Namespace) -> int:
    chat, params, ctx = _responder(args)
    interactive = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):  # invalid UTF-8 in a line becomes U+FFFD, whatever the
        sys.stdin.reconfigure(errors="replace")  # locale (strict under most UTF-8 locales)
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
        if args.stats and turn.completion.ids:  # a program (ELIZA) makes no tokens to count
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
    add_model(p)
    p.add_argument("--format", choices=["hf", "gguf"], required=True)
    p.add_argument("--out", required=True, help="folder (hf) or file (gguf) to write")
    p.add_argument("--qtype", choices=["f32", "f16", "q8_0"], default="f32", help="GGUF type")
    p.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from pellucid.files import check_output
    from pellucid.weights.gguf import save_gguf
    from pellucid.weights.hf import save_hf

    check_output(args.out, "dir" if args.format == "hf" else "file")  # before loading the model
    loaded = load(args, need_tokenizer=False)
    template = loaded.template.source if loaded.template is not None else None
    kwargs = {"tokenizer": loaded.tokenizer, "chat_template": template}
    if args.format == "hf":
        out = save_hf(loaded.model, args.out, **kwargs)
    else:
        out = save_gguf(loaded.model, args.out, qtype=args.qtype, **kwargs)
    print(f"wrote {out} ({args.format}{'' if args.format == 'hf' else ', ' + args.qtype})")
    return 0
