"""Inference speed on SmolLM2-135M-Instruct (the shipped Q4_1 GGUF): pellucid, transformers and
llama.cpp side by side, measured in one run.

    python bench/inference.py                        # pellucid's default mode vs transformers fp32
    python bench/inference.py --llama-cpp            # + llama.cpp (llama-cpp-python) on the file
    python bench/inference.py --modes auto,fp32,q8   # more pellucid modes (infer/quant.py)
    python bench/inference.py --quality              # + perplexity of each pellucid mode
    python bench/inference.py --threads 1 --cpu-time # CPU seconds, not wall: for a busy machine
    python bench/inference.py --breakdown            # + a batch-1 decode step: matrices vs the rest
    python bench/inference.py --device cuda          # on a GPU: pellucid vs transformers, bf16
    python bench/inference.py --weights random       # SmolLM2's shapes, seeded random weights:
                                                     # speed only, where the file is not at hand

For each system:
- prefill tokens/s: a 512-token prompt to its first token (pellucid: Engine.complete with one new
  token; transformers: one forward with logits_to_keep=1, what generate does; llama.cpp: one
  llama_decode of the 512 tokens);
- decode tokens/s at batch 1 and batch 8 (aggregate): greedy, `--new` tokens per sequence,
  prefill and first token left out (pellucid and transformers: time(1 + N tokens) - time(1);
  llama.cpp: the decode calls alone). Batch 8 = 8 ragged prompts of 10-60 tokens; llama.cpp runs
  them as 8 sequences of one batch per step (llama_batch), as its server does.
Rounds alternate the systems, so load from other processes hits them alike; the median round is
reported. Achieved bandwidth = bytes of weights read per token x batch-1 tokens/s, against this
machine's read bandwidth (summing a 1 GB array) measured in the same run. --cpu-time counts this
process's CPU seconds instead of wall time: with one thread, a figure that other processes'
load barely moves (the machine's memory and caches are still shared).

On a GPU (--device cuda) both systems run the same weights in bf16 (--dtype), timed with the
device synchronised; llama.cpp and the quantized modes are CPU rows. --weights random builds
SmolLM2-135M's exact shapes (PRESETS["llama"] at its 8192 context) with seeded random weights and
hands transformers the same tensors through a saved HF folder: decode and prefill speed do not
depend on the weights' values (no end token stops a row: both run ignoring it), and it needs no
model file, as on a lent GPU machine that reaches no registry.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import math
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numba
import numpy as np
import torch
import transformers

from pellucid.data.sources import load_corpus
from pellucid.infer.engine import Engine
from pellucid.infer.quant import QuantLinear, quantize_model
from pellucid.infer.sampling import SamplingParams
from pellucid.model.config import PRESETS
from pellucid.model.transformer import Transformer
from pellucid.weights.gguf import load_gguf
from pellucid.weights.hf import load_hf, save_hf
from pellucid.weights.resolve import DEFAULT_MODEL, load

clock = time.perf_counter
sync = lambda: None  # noqa: E731  (torch.cuda.synchronize on a GPU: its work is asynchronous)


def machine(device: torch.device) -> str:
    """CPU model and whether it has AMX, from lscpu; and the GPU's name when running on one."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(ln.split(":", 1) for ln in out.splitlines() if ":" in ln)
    name = fields.get("Model name", "?").strip()
    amx = "amx" if "amx_tile" in fields.get("Flags", "") else "no AMX"
    cpu = f"{name} ({fields.get('CPU(s)', '?').strip()} CPUs, {amx})"
    return f"{torch.cuda.get_device_name(device)}, host {cpu}" if device.type == "cuda" else cpu


def read_bandwidth(device: torch.device) -> float:
    """Bytes/s of reading a 1 GB float32 array on the device (best of 5 sums)."""
    x = torch.ones(256 * 1024 * 1024, device=device)
    x.sum()
    best = math.inf
    for _ in range(5):
        best = min(best, timed(x.sum))
    return x.numel() * 4 / best


def timed(fn) -> float:
    t = clock()
    fn()
    sync()
    return clock() - t


def random_smollm2(dtype: torch.dtype, device: torch.device) -> tuple[Transformer, torch.nn.Module]:
    """SmolLM2-135M's shapes with seeded random weights: pellucid's model and transformers' model
    of the same tensors (written once as an HF folder, read by both)."""
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(PRESETS["llama"], context_len=8192))
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, tmp)
        ours = load_hf(tmp, dtype=dtype, device=device).eval()
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype)
    return ours, hf.to(device).eval()


# --- the systems: prefill(ids) and generate(prompts, n) for each ------------------------------------


class Pellucid:
    def __init__(self, model, tok) -> None:
        self.model, self.tok = model, tok

    def prefill(self, ids: list[int]) -> float:
        engine = Engine(self.model, self.tok)
        return timed(lambda: engine.complete(ids, SamplingParams(temperature=0, max_new_tokens=1)))

    def decode(self, prompts: list[list[int]], n: int) -> float:
        def run(k: int) -> None:
            for _ in Engine(self.model, self.tok).generate(
                prompts, SamplingParams(temperature=0, max_new_tokens=k)
            ):
                pass

        return timed(lambda: run(1 + n)) - timed(lambda: run(1))

    def weight_bytes(self) -> int:
        """Bytes one decode step reads: every matrix once (the embedding: one row, not counted)."""
        n = 0
        for m in self.model.modules():
            if isinstance(m, QuantLinear):
                n += sum(a.nbytes for a in m.mat[1:])
            elif isinstance(m, torch.nn.Linear):
                n += m.weight.nbytes
        return n


class Transformers:
    def __init__(self, hf: torch.nn.Module) -> None:
        self.hf = hf

    def prefill(self, ids: list[int]) -> float:
        with torch.inference_mode():
            x = torch.tensor([ids], device=self.hf.device)
            return timed(lambda: self.hf(x, logits_to_keep=1))

    def decode(self, prompts: list[list[int]], n: int) -> float:
        width = max(map(len, prompts))  # left padding, as transformers wants for decoder-only
        dev = self.hf.device
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=dev)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)

        def run(k: int) -> None:
            with torch.inference_mode():
                self.hf.generate(
                    ids, attention_mask=mask, max_new_tokens=k, min_new_tokens=k,
                    do_sample=False, eos_token_id=None, pad_token_id=0,
                )  # fmt: skip

        return timed(lambda: run(1 + n)) - timed(lambda: run(1))


class LlamaCpp:
    """llama.cpp through llama-cpp-python's C API: one context of 8 sequences, greedy."""

    def __init__(self, path, threads: int) -> None:
        import llama_cpp as L

        self.L = L
        self._quiet = L.llama_log_callback(lambda *_: None)  # kept: C holds a pointer to it
        L.llama_log_set(self._quiet, ctypes.c_void_p(0))
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(
            str(path).encode(), L.llama_model_default_params()
        )
        p = L.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = 4096, 512, 512, 8
        p.n_threads = p.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, p)
        self.batch = L.llama_batch_init(512, 0, 8)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.weight_bytes = os.path.getsize(path)  # the file: its tensors plus a little metadata

    def _run(self, items: list[tuple[int, int, int, bool]]) -> list[int]:
        """One llama_decode of (token, position, sequence, wants logits) items; the greedy
        next token of each item that wants logits."""
        b = self.batch
        b.n_tokens = len(items)
        for i, (token, pos, seq, out) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, out
            b.seq_id[i][0] = seq
        if self.L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        picks = []
        for i, item in enumerate(items):
            if item[3]:
                ptr = self.L.llama_get_logits_ith(self.ctx, i)
                row = np.ctypeslib.as_array(
                    ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (self.n_vocab,)
                )
                picks.append(int(row.argmax()))
        return picks

    def _clear(self) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)

    def prefill(self, ids: list[int]) -> float:
        self._clear()
        return timed(lambda: self._run([(t, i, 0, i == len(ids) - 1) for i, t in enumerate(ids)]))

    def decode(self, prompts: list[list[int]], n: int) -> float:
        self._clear()
        tokens = []
        for s, p in enumerate(prompts):
            tokens += self._run([(t, i, s, i == len(p) - 1) for i, t in enumerate(p)])
        start = clock()
        for k in range(n):
            tokens = self._run(
                [
                    (t, len(p) + k, s, True)
                    for s, (t, p) in enumerate(zip(tokens, prompts, strict=True))
                ]
            )
        return clock() - start


def breakdown(model, steps: int = 32) -> tuple[float, float, float]:
    """(seconds per batch-1 decode step, of which in the matrix kernels, the rest): the
    FastDecoder's forward and output head over a KV cache of 40 tokens, and every matrix of the
    step alone on a random input, the two timed in turns (medians of `steps` each). The rest is
    the step's "other": norms, RoPE, attention, cache writes, and the Python around them: the
    median of each turn's difference, so a machine that drifts during the run moves both sides
    of it alike (timed one after the other, the difference once came out negative)."""
    from pellucid.infer import kernels
    from pellucid.infer.decode import FastDecoder
    from pellucid.model.kv_cache import KVCache

    fast = FastDecoder.build(model)
    cache = KVCache(model.cfg, 1, 128)
    cache.advance(40)
    ids = torch.ones(1, 1, dtype=torch.long)
    mats = [m for layer in fast.layers for m in (layer[1], layer[4], layer[6], layer[7])]
    mats.append(model.lm_head.mat)
    outs = [np.empty((1, m[1].shape[0]), np.float32) for m in mats]
    xs = [np.random.randn(1, m[2].shape[1] * 32).astype(np.float32) for m in mats]

    def matrices() -> None:
        for m, x, out in zip(mats, xs, outs, strict=True):
            kernels.matmul(m, x, out, False)

    def step() -> None:
        model.logits(fast.forward_hidden(ids, cache=cache)[:, -1])
        cache.advance(1)

    times, per_matrix = [], []
    with torch.inference_mode():
        step()  # warm-up: first calls load or compile the kernels
        matrices()
        for _ in range(steps):
            times.append(timed(step))
            per_matrix.append(timed(matrices))
    other = [t - m for t, m in zip(times, per_matrix, strict=True)]
    return tuple(float(np.median(v)) for v in (times, per_matrix, other))


def perplexity(model, ids: list[int], window: int = 1024) -> float:
    nll, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(ids) - 1, window):
            x = torch.tensor([ids[i : i + window + 1]], device=next(model.parameters()).device)
            logits = model(x[:, :-1])[0]
            nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            count += x.shape[1] - 1
    return math.exp(nll / count)


def systems_for(args: argparse.Namespace, device: torch.device, path: Path | None, tok) -> dict:
    """The systems to compare, by name: transformers first (the ratios' reference). On a GPU or
    with random weights, pellucid runs the same float weights; on the CPU with the file, each of
    --modes (and llama.cpp with --llama-cpp)."""
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    label = "fp32" if dtype == torch.float32 else str(dtype).removeprefix("torch.")
    if args.weights == "random":
        ours, hf = random_smollm2(dtype, device)
    else:
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype
        ).to(device)
        ours = load_gguf(path).to(device, dtype) if device.type == "cuda" else None
    systems = {f"transformers {label}": Transformers(hf.eval())}
    if ours is not None:
        systems[f"pellucid {label}"] = Pellucid(ours.eval(), tok)
        return systems
    for mode in args.modes.split(","):
        name = "pellucid default (auto)" if mode == "auto" else f"pellucid {mode}"
        systems[name] = Pellucid(quantize_model(load_gguf(path).eval(), mode), tok)
    if args.llama_cpp:
        systems["llama.cpp"] = LlamaCpp(path, args.threads)
    return systems


def main() -> None:
    global clock, sync
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", type=int, default=64, help="new tokens per sequence when decoding")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="auto", help="pellucid modes, comma-separated (CPU)")
    ap.add_argument("--llama-cpp", action="store_true", help="add llama.cpp (llama-cpp-python)")
    ap.add_argument("--cpu-time", action="store_true", help="this process's CPU seconds (1 thread)")
    ap.add_argument("--quality", action="store_true", help="perplexity on 100 KB of held-out text")
    ap.add_argument("--breakdown", action="store_true", help="a decode step: matrices vs the rest")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="(GPU)")
    ap.add_argument(
        "--weights", default="gguf", choices=["gguf", "random"],
        help="the shipped file, or its shapes with seeded random weights (speed only)",
    )  # fmt: skip
    args = ap.parse_args()
    device = torch.device(args.device)
    cpu_only = [args.llama_cpp, args.cpu_time, args.breakdown, args.modes != "auto"]
    if device.type == "cuda" and any(cpu_only):
        ap.error("--llama-cpp, --cpu-time, --breakdown and --modes are CPU measurements")
    if args.weights == "random" and (args.quality or args.llama_cpp or args.modes != "auto"):
        ap.error("--quality, --llama-cpp and --modes need the file's weights (--weights gguf)")
    if args.cpu_time:
        if args.threads != 1:
            ap.error("--cpu-time counts CPU seconds of all threads: use it with --threads 1")
        clock = time.process_time
    if device.type == "cuda":
        sync = torch.cuda.synchronize
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    if args.weights == "gguf":
        loaded = load(DEFAULT_MODEL)
        tok, path = loaded.tokenizer, loaded.source
        text = "".join(d.text for d in load_corpus("shakespeare"))
        long_prompt = tok.encode(text[:4000])[:512]
        prompts = [tok.encode(text[i * 997 : i * 997 + 40 + 30 * i]) for i in range(8)]  # ragged
        name = path.name
    else:  # the same lengths as the text prompts give: 512, and 8 ragged ones of 10-60 tokens
        tok, path, name = None, None, "SmolLM2-135M shapes, seeded random weights"
        rng = np.random.default_rng(0)
        long_prompt = rng.integers(0, 49152, 512).tolist()
        prompts = [rng.integers(0, 49152, 10 + 7 * i).tolist() for i in range(8)]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    print(
        f"SmolLM2-135M-Instruct ({name}) on {machine(device)}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, numba {numba.__version__}, {args.threads} "
        f"threads, {platform.machine()}, commit {commit.stdout.strip()}; "
        f"{'CPU time' if args.cpu_time else 'wall time'}; load average {os.getloadavg()[0]:.1f}"
    )
    bw = read_bandwidth(device)
    print(f"memory read bandwidth ({device.type}): {bw / 1e9:.1f} GB/s")
    systems = systems_for(args, device, path, tok)
    results = {name: {"prefill": [], "b1": [], "b8": []} for name in systems}
    # Warm-up: compilation, caches, thread pools, and the prefill's one-time costs. A prompt
    # longer than decode.FAST_PREFILL is what makes pellucid build its float32 copies for
    # prefill (0.3 s for SmolLM2), so the warm-up prefills the whole prompt: with a short one
    # the first round's prefill paid that and ran at 0.6x the others.
    for s in systems.values():
        s.prefill(long_prompt)
        s.decode(prompts[:2], 2)
    for _ in range(args.rounds):
        for name, s in systems.items():
            r = results[name]
            r["prefill"].append(len(long_prompt) / s.prefill(long_prompt))
            r["b1"].append(args.new / s.decode(prompts[:1], args.new))
            r["b8"].append(8 * args.new / s.decode(prompts, args.new))
    med = {n: {k: sorted(v)[len(v) // 2] for k, v in r.items()} for n, r in results.items()}
    hf, lc = next(v for n, v in med.items() if n.startswith("transformers")), med.get("llama.cpp")
    print(f"load average after: {os.getloadavg()[0]:.1f}\n")
    print(
        "| system | prefill 512 tok/s | decode b1 tok/s | decode b8 tok/s (aggregate) | b8 / b1 "
        "| achieved bandwidth (b1) | prefill vs transformers | b1 vs llama.cpp |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, m in med.items():
        s = systems[name]
        nbytes = s.weight_bytes() if isinstance(s, Pellucid) else getattr(s, "weight_bytes", 0)
        achieved = f"{nbytes * m['b1'] / 1e9:.1f} GB/s = {nbytes * m['b1'] / bw:.0%}"
        if not nbytes or args.cpu_time:  # per CPU second: not comparable with the wall-clock read
            achieved = ""
        vs_lc = f"{m['b1'] / lc['b1']:.2f}x" if lc else ""
        print(
            f"| {name} | {m['prefill']:.0f} | {m['b1']:.1f} | {m['b8']:.1f} | {m['b8'] / m['b1']:.2f} "
            f"| {achieved} | {m['prefill'] / hf['prefill']:.2f}x | {vs_lc} |"
        )
    print("\nevery round (prefill, b1, b8):")
    for name, r in results.items():
        print(
            f"  {name}: "
            + "; ".join(f"{k} " + ", ".join(f"{x:.1f}" for x in v) for k, v in r.items())
        )
    if args.breakdown and "auto" in args.modes.split(","):
        step, mats, other = breakdown(systems["pellucid default (auto)"].model)
        print(
            f"batch-1 decode step of the default mode: {step * 1e3:.2f} ms, of which matrices "
            f"{mats * 1e3:.2f} ms and everything else {other * 1e3:.2f} ms (medians)"
        )
    if args.quality:
        held_out = tok.encode(text[-100_000:])
        for name, s in systems.items():
            if isinstance(s, Pellucid):
                print(f"perplexity (100 KB held out), {name}: {perplexity(s.model, held_out):.4f}")


if __name__ == "__main__":
    main()
