"""Generation speed: tokens/s with and without the KV cache, and decode cost vs context length.

    python bench/generate.py                      # `small` preset, random weights, 256 new tokens
    python bench/generate.py --quick              # a few seconds: sanity check only
    python bench/generate.py --png gen.png        # also plot ms/token against the context length

Goals (issue 3, item 7): the cache makes 256-token generation >= 5x faster, and decode time per
token stays roughly flat as the context grows (an uncached step re-runs the whole context, so its
cost grows with it). Greedy decoding, batch 1, so both runs produce the same tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time

import torch

from pellucid.infer.engine import Engine
from pellucid.infer.sampling import SamplingParams
from pellucid.model.config import PRESETS
from pellucid.model.transformer import Transformer


def build(preset: str, context_len: int, device: str) -> Transformer:
    cfg = dataclasses.replace(PRESETS[preset], context_len=context_len)
    torch.manual_seed(0)
    return Transformer(cfg).to(device).eval()


def tokens_per_s(
    engine: Engine, prompt: list[int], new: int, use_cache: bool
) -> tuple[float, list]:
    """End-to-end new tokens per second (prefill included), and the tokens produced."""
    params = SamplingParams(temperature=0, max_new_tokens=new)
    start = time.perf_counter()
    ids = [steps[0].id for steps in engine.generate([prompt], params, use_cache=use_cache)]
    return len(ids) / (time.perf_counter() - start), ids


def ms_per_token(engine: Engine, context: int, new: int, use_cache: bool) -> float:
    """Median decode time per token after a prompt of `context` tokens (prefill excluded).

    The median of the steps, not their mean, so that a stall of a busy machine does not count.
    """
    prompt = [(7 * i) % engine.cfg.vocab_size for i in range(context)]
    params = SamplingParams(temperature=0, max_new_tokens=new + 1)
    times, start = [], time.perf_counter()
    for _ in engine.generate([prompt], params, use_cache=use_cache):
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
    return 1000 * statistics.median(times[1:])  # times[0] is the prefill


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--contexts", default="32,64,128,256,512,1024")
    ap.add_argument("--curve-tokens", type=int, default=16, help="decode steps per context point")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--png", help="write the ms/token curve here")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a sanity run in seconds")
    args = ap.parse_args()
    if args.quick:
        args.preset, args.new_tokens, args.contexts, args.curve_tokens = "tiny", 32, "8,16,32", 4
    if args.threads:
        torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]
    needed = max(args.prompt_len + args.new_tokens, max(contexts) + args.curve_tokens)
    model = build(args.preset, needed, args.device)
    engine = Engine(model)
    print(
        f"preset {args.preset} ({model.num_params() / 1e6:.1f}M params), device {args.device}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.processor()}"
    )

    prompt = list(range(1, args.prompt_len + 1))
    tokens_per_s(engine, prompt, 8, True)  # warm-up
    cached, ids_cached = tokens_per_s(engine, prompt, args.new_tokens, True)
    uncached, ids_uncached = tokens_per_s(engine, prompt, args.new_tokens, False)
    same = "identical" if ids_cached == ids_uncached else "DIFFERENT"
    print(
        f"\n{args.new_tokens} new tokens after a {args.prompt_len}-token prompt (greedy, batch 1)"
    )
    print(f"  with KV cache     {cached:9.1f} tokens/s")
    print(f"  without KV cache  {uncached:9.1f} tokens/s")
    ratio = cached / uncached
    print(f"  speed-up          {ratio:9.1f}x  (goal >= 5x: {'met' if ratio >= 5 else 'not met'})")
    print(f"  tokens            {same}")

    print(f"\ndecode ms/token vs context ({args.curve_tokens} steps each)")
    print(f"  {'context':>8} {'cached':>10} {'uncached':>10}")
    rows = []
    for c in contexts:
        row = (c, ms_per_token(engine, c, args.curve_tokens, True))
        row += (ms_per_token(engine, c, args.curve_tokens, False),)
        rows.append(row)
        print(f"  {row[0]:>8} {row[1]:>10.2f} {row[2]:>10.2f}")
    if args.png:
        plot(rows, args.png, args.preset)
        print(f"\nplot: {args.png}")


def plot(rows: list[tuple[int, float, float]], path: str, preset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r[0] for r in rows], [r[1] for r in rows], "o-", label="KV cache")
    ax.plot([r[0] for r in rows], [r[2] for r in rows], "s--", label="no cache")
    ax.set(
        xlabel="context length (tokens)", ylabel="decode ms / token", title=f"{preset}: decode cost"
    )
    ax.set_xscale("log", base=2)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
