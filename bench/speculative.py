"""Speculative decoding's speed-up on SmolLM2-135M-Instruct (the shipped Q4_1 GGUF, default mode):
plain greedy decoding against the same engine with prompt-lookup drafts (and, with --draft, a
draft model), in one run, on a chat prompt and on a code-editing prompt.

    python bench/speculative.py                      # plain vs lookup, k = 4
    python bench/speculative.py --k 2,4,8 --new 200  # several draft lengths
    python bench/speculative.py --draft MODEL        # + a draft model sharing the tokenizer

For each prompt and mode: decode tokens/s (prefill and first token left out: Timing's decode
figures), the ratio to plain in the same round, and the acceptance rate (guessed tokens the
model kept / guessed tokens). Rounds alternate the modes, so load from other processes hits
them alike; the median round is reported. Every mode's tokens are checked to equal plain
greedy's (speculative decoding must not change the output).
"""

from __future__ import annotations

import argparse
import statistics

from inference import machine

from pellucid.infer.engine import Engine, Timing
from pellucid.infer.quant import quantize_model
from pellucid.infer.sampling import SamplingParams
from pellucid.infer.speculative import LookupDrafter, ModelDrafter
from pellucid.weights.resolve import DEFAULT_MODEL, load

CODE = """def moving_average(values, window):
    if window <= 0:
        raise ValueError("window must be positive")
    out = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out
"""
PROMPTS = {
    "chat": "What are three good habits for staying healthy? Explain each in a sentence.",
    "code": f"Rewrite this function with type hints and a docstring:\n\n{CODE}",
}


class Counting:
    """A drafter that counts the tokens it guessed."""

    def __init__(self, inner: object) -> None:
        self.inner, self.guessed = inner, 0

    def propose(self, handle: int, ids: list[int], k: int) -> list[int]:
        guesses = self.inner.propose(handle, ids, k)[:k]
        self.guessed += len(guesses)
        return guesses

    def forget(self, handle: int) -> None:
        self.inner.forget(handle)


def once(engine: Engine, ids: list[int], params: SamplingParams) -> tuple[list[int], float, int]:
    """One greedy run: its tokens, decode tokens/s, and the guesses kept (each decode step
    makes its kept guesses + 1 tokens; the first step is the prefill's one token)."""
    timing, out, kept = Timing(), [], 0
    for i, steps in enumerate(engine.generate([ids], params, timing=timing)):
        out += [s.id for s in steps]
        kept += len(steps) - 1 if i else 0
    return out, timing.decode_tokens_per_s, kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--new", type=int, default=160, help="tokens generated per run")
    ap.add_argument("--k", default="4", help="draft lengths, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--draft", help="a draft model spec (same tokenizer) to add as a mode")
    args = ap.parse_args()
    loaded = load(DEFAULT_MODEL)
    model, tok = quantize_model(loaded.model, "auto"), loaded.tokenizer  # generate's default
    small = quantize_model(load(args.draft).model, "auto") if args.draft else None
    drafts: dict[str, Counting | None] = {"plain": None}
    engines = {"plain": Engine(model, tok)}
    for k in map(int, args.k.split(",")):
        kinds = {"lookup": LookupDrafter()}
        if small is not None:
            kinds["draft"] = ModelDrafter(small, model.cfg.vocab_size)
        for kind, drafter in kinds.items():
            drafts[f"{kind} k={k}"] = d = Counting(drafter)
            engines[f"{kind} k={k}"] = Engine(model, tok, draft=d, draft_k=k)
    # Greedy to the end of --new tokens: no stop token, so every mode makes the same count.
    params = SamplingParams(temperature=0, max_new_tokens=args.new)
    warm = SamplingParams(temperature=0, max_new_tokens=12)
    template = loaded.chat_template()
    print(f"machine: {machine()}; {loaded.source.name}, {args.new} new tokens, greedy")
    for engine in engines.values():  # compile the kernels for every row shape, warm the caches
        engine.complete(tok.encode("Hello, hello, hello, hello"), warm)
    for name, text in PROMPTS.items():
        ids = template.encode(tok, [{"role": "user", "content": text}])
        speed: dict[str, list[float]] = {m: [] for m in engines}
        ratio: dict[str, list[float]] = {m: [] for m in engines}
        kept = dict.fromkeys(engines, 0)
        for d in drafts.values():
            if d is not None:
                d.guessed = 0
        want = None
        for _ in range(args.rounds):
            for mode, engine in engines.items():
                got, tps, n_kept = once(engine, ids, params)
                want = got if want is None else want
                assert got == want, f"{mode}: output differs from plain greedy decoding"
                speed[mode].append(tps)
                kept[mode] += n_kept
            for mode in engines:
                ratio[mode].append(speed[mode][-1] / speed["plain"][-1])
        print(f"\n{name} prompt ({len(ids)} tokens):")
        print(f"  {'mode':<12} {'tokens/s':>9} {'x plain':>8} {'accepted':>9}")
        for mode, d in drafts.items():
            acc = f"{kept[mode] / d.guessed:.0%}" if d is not None and d.guessed else "-"
            tps, x = statistics.median(speed[mode]), statistics.median(ratio[mode])
            print(f"  {mode:<12} {tps:9.1f} {x:8.2f} {acc:>9}")


if __name__ == "__main__":
    main()
