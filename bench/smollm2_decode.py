"""Decode speed on a real model: pellucid vs transformers, SmolLM2-135M-Instruct, fp32, batch 1.

    python bench/smollm2_decode.py              # 128 new tokens, 3 repeats
    python bench/smollm2_decode.py --new 32     # quicker

Both load the same GGUF, dequantized to float32 (transformers via `gguf_file=`), and decode
greedily from the same prompt ids with a KV cache. Decode tokens/s is measured the same way for
both, end to end through each one's public generation call: (time for 1 + N tokens - time for 1
token) / N, which removes the prefill and the first token. Median of the repeats. The two must
produce the same tokens (checked), so they do the same work.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time

import torch
import transformers

from pellucid.infer.engine import Engine
from pellucid.infer.sampling import SamplingParams
from pellucid.weights.resolve import DEFAULT_MODEL, load

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


def ours_run(engine: Engine, ids: list[int], n: int) -> tuple[float, list[int]]:
    params = SamplingParams(temperature=0, max_new_tokens=n)
    start = time.perf_counter()
    out = engine.complete(ids, params).ids
    return time.perf_counter() - start, out


def theirs_run(model, ids: list[int], n: int) -> tuple[float, list[int]]:
    x = torch.tensor([ids])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            x,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return time.perf_counter() - start, out[0, len(ids) :].tolist()


def decode_rate(run, n: int, repeats: int) -> tuple[float, list[int]]:
    rates, tokens = [], []
    run(1)  # warm-up
    for _ in range(repeats):
        t1, _ = run(1)
        tn, tokens = run(1 + n)
        rates.append(n / (tn - t1))
    return statistics.median(rates), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", type=int, default=128, help="decode tokens per run")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    loaded = load(DEFAULT_MODEL)
    ids = loaded.template.encode(loaded.tokenizer, PROMPT)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        loaded.source.parent, gguf_file=loaded.source.name, dtype=torch.float32
    ).eval()
    engine = Engine(loaded.model, loaded.tokenizer)
    ours_rate, ours_ids = decode_rate(lambda n: ours_run(engine, ids, n), args.new, args.repeats)
    theirs_rate, theirs_ids = decode_rate(
        lambda n: theirs_run(theirs, ids, n), args.new, args.repeats
    )
    same = ours_ids == theirs_ids
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    print(
        f"SmolLM2-135M-Instruct fp32, batch 1, prompt {len(ids)} tokens, {args.new} greedy decode "
        f"tokens, median of {args.repeats}; torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
        f"commit {commit.stdout.strip()}"
    )
    print(f"pellucid     decode {ours_rate:7.1f} tokens/s")
    print(f"transformers decode {theirs_rate:7.1f} tokens/s")
    print(f"ratio pellucid/transformers: {ours_rate / theirs_rate:.2f}; same tokens: {same}")


if __name__ == "__main__":
    main()
