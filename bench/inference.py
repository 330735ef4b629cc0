"""Inference speed on SmolLM2-135M-Instruct: pellucid's modes vs transformers, in one run.

    python bench/inference.py                   # speed table (about 4 minutes on 2 cores)
    python bench/inference.py --quality         # + perplexity of each mode on 100 KB of text
    python bench/inference.py --layers          # + where one batch-1 decode step spends its time

For each pellucid mode (fp32, q8, q4; see pellucid/infer/quant.py) and for transformers'
`generate` on the same GGUF dequantized to float32:
- prefill tokens/s: one forward over a 512-token prompt;
- decode tokens/s at batch 1 and batch 8 (aggregate): greedy, 128 new tokens, measured as
  (time for 1 + N new tokens - time for 1) / N, so prefill and the first token drop out.
It also measures this machine's memory read bandwidth (summing a 1 GB array) and reports each
mode's achieved bytes/s: (weight bytes + KV-cache bytes read per token) x tokens/s.
Two threads everywhere (torch and numba).
"""

from __future__ import annotations

import argparse
import math
import platform
import subprocess
import time
from collections import defaultdict

import numba
import torch
import transformers

from pellucid.data.sources import load_corpus
from pellucid.infer.engine import Engine
from pellucid.infer.quant import QuantLinear, quantize_model
from pellucid.infer.sampling import SamplingParams
from pellucid.weights.gguf import load_gguf
from pellucid.weights.resolve import DEFAULT_MODEL, load

THREADS = 2


def read_bandwidth() -> float:
    """Bytes/s of reading a 1 GB float32 array (best of 5 sums)."""
    x = torch.ones(256 * 1024 * 1024)
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step reads: every matrix once (the embedding only one row: not counted)."""
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            n += sum(a.nbytes for a in m.packed)
        elif isinstance(m, torch.nn.Linear):
            n += m.weight.numel() * m.weight.element_size()
        elif name.endswith("norm"):
            n += sum(p.numel() * 4 for p in m.parameters())
    return n


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def decode_rate(run, new: int, rows: int) -> float:
    """Aggregate decode tokens/s: (t(1 + new) - t(1)) for `rows` sequences, median of 3."""
    run(1)
    rates = []
    for _ in range(3):
        t1, tn = timed(lambda: run(1)), timed(lambda: run(1 + new))
        rates.append(rows * new / (tn - t1))
    return sorted(rates)[1]


def ours(model, tok, prompts: list[list[int]], n: int) -> None:
    params = SamplingParams(temperature=0, max_new_tokens=n)
    for _ in Engine(model, tok).generate(prompts, params):
        pass


def theirs(model, prompts: list[list[int]], n: int) -> None:
    width = max(map(len, prompts))  # left padding, as transformers wants for decoder-only batches
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )


def prefill_rate(forward, ids: list[int]) -> float:
    forward(ids[:16])
    return len(ids) / min(timed(lambda: forward(ids)) for _ in range(2))


def perplexity(model, ids: list[int], window: int = 1024) -> float:
    nll, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(ids) - 1, window):
            x = torch.tensor([ids[i : i + window + 1]])
            logits = model(x[:, :-1])[0]
            nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            count += x.shape[1] - 1
    return math.exp(nll / count)


def layer_times(model, tok, prompt: list[int], n: int = 32) -> dict[str, float]:
    """Seconds per decode step in each kind of projection, and in everything else ("other").

    Forward hooks time every projection; a run of 1 token (prefill) is subtracted from a run of
    1 + n, leaving n decode steps.
    """
    spent: dict[str, float] = defaultdict(float)
    starts: dict[int, float] = {}

    def before(mod, _args):
        starts[id(mod)] = time.perf_counter()

    def after(mod, _args, _out, kind):
        spent[kind] += time.perf_counter() - starts[id(mod)]

    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, torch.nn.Linear)):
            kind = name.split(".")[-1]
            hooks.append(m.register_forward_pre_hook(before))
            hooks.append(m.register_forward_hook(lambda mod, a, o, k=kind: after(mod, a, o, k)))
    runs = []
    for new in (1, 1 + n):
        spent.clear()
        total = timed(lambda new=new: ours(model, tok, [prompt], new))
        runs.append(dict(spent) | {"step": total})
    for h in hooks:
        h.remove()
    per = {k: (runs[1][k] - runs[0].get(k, 0.0)) / n for k in runs[1]}
    per["other"] = per["step"] - sum(v for k, v in per.items() if k != "step")
    return per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--modes", default="fp32,q8,q4")
    ap.add_argument("--quality", action="store_true", help="perplexity on 100 KB of held-out text")
    ap.add_argument("--layers", action="store_true", help="time per projection kind, batch 1")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    numba.set_num_threads(THREADS)
    loaded = load(DEFAULT_MODEL)
    tok, path = loaded.tokenizer, loaded.source
    text = "".join(d.text for d in load_corpus("shakespeare"))
    long_prompt = tok.encode(text[:4000])[:512]
    prompts = [tok.encode(text[i * 997 : i * 997 + 40 + 30 * i]) for i in range(8)]  # ragged
    bw = read_bandwidth()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    print(
        f"SmolLM2-135M-Instruct ({path.name}); torch {torch.__version__}, transformers "
        f"{transformers.__version__}, numba {numba.__version__}, {THREADS} threads, "
        f"{platform.machine()}, commit {commit.stdout.strip()}"
    )
    print(f"memory read bandwidth: {bw / 1e9:.1f} GB/s")
    rows = []
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()

    def hf_forward(ids):
        with torch.inference_mode():
            hf(torch.tensor([ids]))

    hf_row = (
        "transformers fp32",
        prefill_rate(hf_forward, long_prompt),
        decode_rate(lambda n: theirs(hf, prompts[:1], n), args.new, 1),
        decode_rate(lambda n: theirs(hf, prompts, n), args.new, 8),
        None,
    )
    held_out = tok.encode(text[-100_000:]) if args.quality else []
    for mode in args.modes.split(","):
        model = quantize_model(load_gguf(path).eval(), mode)

        def fwd(ids, model=model):
            with torch.inference_mode():
                model(torch.tensor([ids]))

        kv = (
            2
            * model.cfg.n_layer
            * model.cfg.n_kv_head
            * model.cfg.head_dim
            * 4
            * (len(prompts[0]) + args.new // 2)
        )
        b1 = decode_rate(lambda n, m=model: ours(m, tok, prompts[:1], n), args.new, 1)
        b8 = decode_rate(lambda n, m=model: ours(m, tok, prompts, n), args.new, 8)
        achieved = (weight_bytes(model) + kv) * b1
        ppl = perplexity(model, held_out) if args.quality else None
        rows.append((f"pellucid {mode}", prefill_rate(fwd, long_prompt), b1, b8, achieved, ppl))
        if args.layers:
            per = {
                k: f"{1e3 * v:.2f}" for k, v in sorted(layer_times(model, tok, prompts[0]).items())
            }
            print(f"  {mode}: ms per batch-1 decode step, by projection (all layers): {per}")
    print(
        f"\n| mode | prefill 512 tok/s | decode b1 tok/s | decode b8 tok/s (aggregate) | b8 / b1 | achieved bandwidth | vs transformers b1 |{' ppl 100 KB |' if args.quality else ''}"
    )
    print(f"|---|---|---|---|---|---|---|{'---|' if args.quality else ''}")
    _, hp, hb1, hb8, _ = hf_row
    print(
        f"| transformers fp32 | {hp:.0f} | {hb1:.1f} | {hb8:.1f} | {hb8 / hb1:.2f} | | 1.00x |{' |' if args.quality else ''}"
    )
    for name, p, b1, b8, achieved, ppl in rows:
        q = f" {ppl:.4f} |" if ppl is not None else ""
        print(
            f"| {name} | {p:.0f} | {b1:.1f} | {b8:.1f} | {b8 / b1:.2f} | {achieved / 1e9:.1f} GB/s = {achieved / bw:.0%} | {b1 / hb1:.2f}x |{q}"
        )


if __name__ == "__main__":
    main()
