"""Export to GGUF, then decode greedily in llama.cpp and in pellucid: do the tokens agree?

    python bench/export_llama_cpp.py                        # tiny random demo-architecture model
    python bench/export_llama_cpp.py --model runs/demo      # a trained run (any model spec)
    python bench/export_llama_cpp.py --model smollm2-135m-instruct --qtype q8_0

Trains nothing. Without --model it builds the architecture `pellucid demo` trains (QK-norm, so
the `qwen3` GGUF architecture) with random weights and a BPE tokenizer learned from pellucid's
own source files; a model without QK-norm exports as `llama`. Both sides decode the same prompt
ids from the same exported file (pellucid reads it back with its own loader), so a quantized
export is compared like for like. llama.cpp's greedy choice is argmax over its logits, taken
directly, so no sampler setting can differ.

llama.cpp comes from llama-cpp-python, a bench-only dependency that builds llama.cpp from source
(about 10 minutes on 2 cores): `pip install llama-cpp-python`. Without it the script exports,
decodes in pellucid, and prints a skip line for the comparison.

Also printed: whether llama.cpp tokenizes the prompt text as pellucid does (the GGUF tokenizer
metadata at work), the largest first-step logit difference, and the smallest top-1/top-2 logit
gap along pellucid's path (a divergence at a near-tie says little; elsewhere it is a bug).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import torch

import pellucid
from pellucid.infer.engine import Engine
from pellucid.infer.sampling import SamplingParams
from pellucid.model.transformer import Transformer
from pellucid.recipes import DEMO_MODEL, load_run_config
from pellucid.tokenizer.bpe import ENDOFTEXT, Tokenizer
from pellucid.weights.gguf import architecture_of, load_gguf, save_gguf
from pellucid.weights.resolve import load

INSTALL = "pip install llama-cpp-python  (builds llama.cpp from source, ~10 min)"


def random_demo(vocab_size: int, seed: int) -> tuple[Transformer, Tokenizer]:
    """The demo's architecture, random weights (spread out so greedy choices are not near-ties)."""
    sources = sorted(Path(pellucid.__file__).parent.rglob("*.py"))
    tokenizer = Tokenizer.train(
        [p.read_text("utf-8") for p in sources], vocab_size, special_tokens=[ENDOFTEXT]
    )
    cfg = dataclasses.replace(
        load_run_config(None, DEMO_MODEL).model, vocab_size=tokenizer.vocab_size
    )
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.2 if p.dim() == 1 else 0.05))
    return model, tokenizer


def pellucid_greedy(model: Transformer, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy ids from the Engine, and at each step the top-1 minus top-2 logit gap."""
    params = SamplingParams(temperature=0, max_new_tokens=n)
    ids = [steps[0].id for steps in Engine(model).generate([prompt], params)]
    with torch.no_grad():  # one forward over the whole path gives every step's logits
        logits = model(torch.tensor([prompt + ids]))[0, len(prompt) - 1 : -1]  # (n, V)
    top2 = logits.topk(2, dim=-1).values
    return ids, (top2[:, 0] - top2[:, 1]).tolist()


def llama_cpp_greedy(llm, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """Greedy ids in llama.cpp (argmax of its logits each step), and its first-step logits."""
    llm.reset()
    llm.eval(prompt)
    first = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    ids = []
    for _ in range(n):
        ids.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([ids[-1]])
    return ids, first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", help="a model spec (run dir, .gguf, HF folder, name); default: random demo"
    )
    ap.add_argument("--qtype", choices=["f32", "f16", "q8_0"], default="f32")
    ap.add_argument("--prompt", default="def main() -> None:\n")
    ap.add_argument("--tokens", type=int, default=48, help="new tokens to decode")
    ap.add_argument("--vocab", type=int, default=512, help="tokenizer size for the random model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="GGUF file to write (default: a temporary file)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.model is None:
        model, tokenizer = random_demo(args.vocab, args.seed)
        source = f"random demo architecture (seed {args.seed})"
    else:
        loaded = load(args.model)
        model, tokenizer, source = loaded.model, loaded.tokenizer, str(loaded.source)
        if tokenizer is None:
            raise SystemExit(f"{args.model}: has no tokenizer, and llama.cpp needs one in the GGUF")
    cfg = model.cfg
    prompt = tokenizer.encode(args.prompt)
    n = min(args.tokens, cfg.context_len - len(prompt))
    tmp = tempfile.TemporaryDirectory()
    path = Path(args.out or Path(tmp.name) / "model.gguf")
    save_gguf(model, path, qtype=args.qtype, tokenizer=tokenizer)
    print(f"model: {source}; {cfg.n_layer} layers, {cfg.n_embd} wide, vocab {cfg.vocab_size}")
    print(
        f"exported: {path} (GGUF {architecture_of(cfg)}, {args.qtype}, {path.stat().st_size:,} bytes)"
    )

    ours_model = load_gguf(path).eval()  # what the file holds, as pellucid reads it
    ours, gaps = pellucid_greedy(ours_model, prompt, n)
    print(f"pellucid greedy ({n} tokens after a {len(prompt)}-token prompt): {ours}")
    print(f"smallest top-1/top-2 logit gap on pellucid's path: {min(gaps):.2e}")

    try:
        import llama_cpp
    except ImportError:
        print(f"llama.cpp: SKIPPED, llama_cpp is not importable; to compare: {INSTALL}")
        return
    # logits_all: llama-cpp-python 0.3 keeps `scores` only then (its sampler needs none).
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=cfg.context_len,
        n_threads=args.threads,
        logits_all=True,
        verbose=False,
    )
    theirs_prompt = llm.tokenize(args.prompt.encode("utf-8"), add_bos=False, special=False)
    print(f"llama.cpp tokenizes the prompt as pellucid does: {list(theirs_prompt) == prompt}")
    theirs, first = llama_cpp_greedy(llm, prompt, n)
    with torch.no_grad():
        ours_first = ours_model(torch.tensor([prompt]))[0, -1].numpy()
    print(f"llama.cpp {llama_cpp.__version__} greedy: {theirs}")
    print(f"first-step logits: max |llama.cpp - pellucid| = {np.abs(first - ours_first).max():.2e}")
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), None)
    if same is None:
        print(f"greedy tokens AGREE: {n} of {n}")
    else:
        print(
            f"greedy tokens DIFFER from token {same} on ({same} of {n} agree; pellucid's "
            f"top-1/top-2 gap there: {gaps[same]:.2e})"
        )


if __name__ == "__main__":
    main()
