"""Engine.generate of this tree against an earlier revision's engine, SmolLM2-135M default mode, one run.

    python bench/engine_steps.py                          # vs the engine before the step-wise core
    python bench/engine_steps.py --before REV --new 64 --rounds 3

Decode tokens/s at batch 1 and batch 8 (aggregate), greedy, measured as in bench/inference.py:
(time for 1 + N new tokens - time for 1 new token) x rows / N, so prefill and the first token drop
out. The earlier engine.py is read from git (`git show REV:pellucid/infer/engine.py`) and loaded
into this process beside today's, over the same model, and the two alternate round by round so
that load from other processes hits both alike; the median round is reported. Then continuous
batching through add/step: 8 sequences joining one per step, aggregate tokens/s of the whole run.
Two threads.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba
import torch

from pellucid.infer import engine as engine_now
from pellucid.infer.quant import quantize_model
from pellucid.infer.sampling import SamplingParams
from pellucid.weights.resolve import load

BEFORE = "177d32c"  # the last commit whose engine ran whole batches (before add/step/cancel)
THREADS = 2


def engine_at(rev: str):
    """The Engine class of pellucid/infer/engine.py at git revision `rev`."""
    source = subprocess.run(
        ["git", "show", f"{rev}:pellucid/infer/engine.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "engine_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("engine_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["engine_before"] = module  # dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return module.Engine


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def rate(engine_cls, model, tok, prompts: list[list[int]], new: int) -> float:
    """Aggregate decode tokens/s of one engine class: (t(1 + new) - t(1)), rows x new tokens."""

    def run(n: int) -> None:
        for _ in engine_cls(model, tok).generate(
            prompts, SamplingParams(temperature=0, max_new_tokens=n)
        ):
            pass

    return len(prompts) * new / (timed(lambda: run(1 + new)) - timed(lambda: run(1)))


def joining(model, tok, prompts: list[list[int]], new: int) -> tuple[float, int]:
    """add/step with one sequence joining per step: tokens/s over the whole run (prefill in), and
    how many sequences got exactly the tokens they get alone (greedy)."""
    engine = engine_now.Engine(model, tok)
    params = SamplingParams(temperature=0, max_new_tokens=new)
    got: dict[int, list[int]] = {}
    waiting, tokens, t = list(enumerate(prompts)), 0, time.perf_counter()
    while waiting or engine.n_live:
        if waiting:
            i, prompt = waiting.pop()
            got[engine.add(prompt, params)] = [i]
        steps = engine.step()
        for step in steps:
            got[step.row].append(step.id)
        tokens += len(steps)
    elapsed = time.perf_counter() - t
    assert engine.kv_bytes_used == 0
    same = sum(ids[1:] == engine.complete(prompts[ids[0]], params).ids for ids in got.values())
    return tokens / elapsed, same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default=BEFORE, help="git revision of the engine to compare with")
    ap.add_argument("--new", type=int, default=64, help="new tokens per sequence")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    numba.set_num_threads(THREADS)
    loaded = load("smollm2-135m-instruct")
    model, tok = quantize_model(loaded.model.eval(), "auto"), loaded.tokenizer
    text = Path(random.__file__).read_text()  # any fixed English-ish text
    ids = tok.encode(text)
    prompts = [ids[i * 997 : i * 997 + 40 + 30 * i] for i in range(8)]  # 40 .. 250 tokens
    engines = {f"before ({args.before})": engine_at(args.before), "now": engine_now.Engine}
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if "Model name" in ln), "")
    print(
        f"SmolLM2-135M-Instruct default mode (the file's blocks), {THREADS} threads, {platform.machine()} {name}"
    )
    results = {(e, b): [] for e in engines for b in (1, 8)}
    rate(engine_now.Engine, model, tok, prompts[:1], 4)  # warm-up
    for _ in range(args.rounds):
        for batch in (1, 8):
            for label, cls in engines.items():
                results[label, batch].append(rate(cls, model, tok, prompts[:batch], args.new))
    print(f"decode tokens/s, {args.new} new tokens, median of {args.rounds} alternating rounds")
    for (label, batch), rates in results.items():
        rates = sorted(rates)
        every = ", ".join(f"{r:.1f}" for r in rates)
        print(f"  {label:>20} batch {batch}: {rates[len(rates) // 2]:7.1f}   (all: {every})")
    speed, same = joining(model, tok, prompts, args.new)
    print(f"add/step, 8 sequences joining one per step: {speed:.1f} tok/s (prefill included);")
    print(f"  {same} of 8 got exactly the greedy tokens they get alone")


if __name__ == "__main__":
    main()
