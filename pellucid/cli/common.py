"""Flags and helpers shared by the verbs: the model spec, sampling flags, loading, JSON output."""

from __future__ import annotations

import argparse
import json


def emit_json(obj: object) -> None:
    print(json.dumps(obj, ensure_ascii=False, indent=2))


_MODEL_HELP = (
    "model name (default smollm2-135m-instruct), .gguf file, Hugging Face folder, run directory "
    "or checkpoint"
)


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=_MODEL_HELP)
    p.add_argument(
        "--allow-nonfinite", action="store_true", help="load weights even if they hold NaN/Inf"
    )


def add_sampling(p: argparse.ArgumentParser, max_new_tokens: int, temperature: float) -> None:
    add_model(p)
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=temperature, help="0 means greedy (argmax)")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens only")
    p.add_argument("--top-p", type=float, help="sample from the smallest set reaching p")
    p.add_argument("--min-p", type=float, help="drop tokens below min-p x the best one's p")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL penalty, 1 = off")
    p.add_argument("--seed", type=int, help="same seed, same text")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    add_quant(p)


def add_quant(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quant",
        choices=["auto", "fp32", "q8", "q4"],
        default="auto",
        help="weights for decoding: auto = a GGUF file's own blocks (its model exactly), other "
        "float weights as 8-bit blocks; fp32 = float32; q8, q4 = requantize (docs/readme/speed.md)",
    )


def load(args: argparse.Namespace, need_tokenizer: bool = True) -> object:
    """The model --model names (the default one if none), with a tokenizer if needed."""
    from pellucid.errors import TokenizerError
    from pellucid.weights.resolve import DEFAULT_MODEL
    from pellucid.weights.resolve import load as load_spec

    loaded = load_spec(
        DEFAULT_MODEL if args.model is None else args.model, allow_nonfinite=args.allow_nonfinite
    )
    if need_tokenizer and loaded.tokenizer is None:
        raise TokenizerError(f"model '{args.model}' has no tokenizer to read the prompt with")
    if getattr(args, "quant", None):
        from pellucid.infer.quant import quantize_model

        quantize_model(loaded.model, args.quant)
    return loaded


def sampling(args: argparse.Namespace, tokenizer: object, top_logprobs: int = 0) -> object:
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
