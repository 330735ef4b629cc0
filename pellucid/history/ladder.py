"""The ladder: language models from Shannon to Bengio, trained on the same shards, in one unit.

Every rung sees the same train tokens and is scored on the same validation tokens, in bits per
UTF-8 byte of the validation text (`Shards.bits_per_byte`, the demo's definition): the total
negative log-likelihood of the validation tokens / ln 2 / the validation bytes. Every rung gives
every token a probability > 0, so no score hides an infinite loss. Rungs, in order:

    uniform    every byte value equally likely: log2 256 = 8 bits per byte, the floor of ignorance
    unigram    Shannon's zero-order model: each token by its train frequency (add-one smoothed)
    ngram      interpolated Kneser-Ney on the last n - 1 tokens, n = 2..max_order (ngram.py)
    vectors    skip-gram word vectors (vectors.py): no probabilities, shown by their neighbours
    neural     Bengio's MLP language model on those vectors, frozen (neural.py)

The transformer, the last rung, is the demo's model: `recipes.ladder` adds it. The two rungs that
learn by gradient run through train/trainer.py like every other model of pellucid.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pellucid.data.batches import WindowSampler, eval_batches
from pellucid.data.shards import Shards
from pellucid.history.neural import BengioLM
from pellucid.history.ngram import KneserNey, count_orders
from pellucid.history.vectors import SkipGram, SkipGramSampler, analogy, neighbours, skipgram_loss
from pellucid.infer.sampling import SamplingParams, probabilities, process_logits, sample
from pellucid.tokenizer.bpe import Tokenizer
from pellucid.train.objectives import lm_loss
from pellucid.train.trainer import TrainConfig, evaluate_objective, train

KINDS = ("uniform", "unigram", "ngram", "vectors", "neural", "transformer")
PROBES = (" king", " love", " night", " lord", " thou", " man", " good", " day", " the")
ANALOGIES = (  # a is to b as c is to ?
    (" man", " king", " woman"), (" he", " his", " she"), (" father", " son", " mother"),
    (" thou", " thy", " you"),
)  # fmt: skip


@dataclass(kw_only=True)
class LadderConfig:
    """Sizes and time shares of the rungs below the transformer."""

    max_order: int = 5  # n-gram models for n = 2..max_order
    vector_dim: int = 64  # skip-gram vector width
    window: int = 4  # skip-gram: tokens either side of the centre
    negatives: int = 5  # skip-gram: noise tokens per pair
    neural_context: int = 5  # Bengio's n: the MLP sees the last n tokens
    neural_hidden: int = 256
    vectors_share: float = 0.1  # of the transformer's minutes, for the skip-gram vectors
    neural_share: float = 0.3  # of the transformer's minutes, for the MLP language model
    device: str = "cpu"  # the demo's
    seed: int = 1337


@dataclass
class Rung:
    """One rung's result. `split` is the key of the shards it was trained and scored on."""

    name: str
    kind: str
    bits_per_byte: float | None  # None for the vectors: not a language model
    seconds: float  # training time (counting, for the tables)
    size: int  # parameters, or table entries
    samples: list[tuple[str, str]]  # (prompt, continuation)
    split: str
    text: str = ""  # what the rung shows instead of samples (the vectors' neighbours)

    def to_json(self) -> dict:
        """The rung as `ladder.json` stores it."""
        sample = self.text or "\n\n".join(p + t for p, t in self.samples)
        return {
            "name": self.name, "kind": self.kind, "bits_per_byte": self.bits_per_byte,
            "seconds": round(self.seconds, 2), "size": self.size, "sample": sample,
        }  # fmt: skip


def continue_text(
    next_logits: Callable[[list[int]], Tensor],
    tokenizer: Tokenizer,
    prompt: str,
    params: SamplingParams,
) -> str:
    """Sample a continuation of `prompt` from a model that is not a transformer.

    next_logits(ids) -> (V,) scores of the next token (log-probabilities do). The engine runs the
    transformer with its KV cache; these models have none, so each step just asks again, and
    picks the token with the engine's own sampler (same filters, temperature and seed).
    """
    gen = torch.Generator().manual_seed(params.seed or 0)
    ids = tokenizer.encode(prompt)
    out: list[int] = []
    for _ in range(params.max_new_tokens):
        logits = process_logits(next_logits(ids + out)[None].float(), params)  # (1, V)
        out.append(int(sample(probabilities(logits, params.temperature), gen)))
    return tokenizer.decode(out)


def _bpb(shards: Shards, logprobs: np.ndarray) -> float:
    """Bits per byte from the natural log-probabilities of the validation targets."""
    return shards.bits_per_byte(float(-logprobs.mean()))


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() or c == "\n" else "\ufffd" for c in text)


def uniform(shards: Shards, prompts: tuple[str, ...], params: SamplingParams) -> Rung:
    """Every byte 1/256: 8 bits per byte; its samples are random bytes."""
    gen = torch.Generator().manual_seed(params.seed or 0)
    n = params.max_new_tokens * 2
    noise = [bytes(torch.randint(256, (n,), generator=gen).tolist()) for _ in prompts]
    # Bytes that print nothing (controls, broken UTF-8 sequences) show as U+FFFD.
    texts = [_printable(b.decode("utf-8", errors="replace")) for b in noise]
    samples = list(zip(prompts, texts, strict=True))
    return Rung(
        "uniform over bytes", "uniform", math.log2(256), 0.0, 256, samples, shards.meta["key"]
    )


def unigram(
    shards: Shards, tokenizer: Tokenizer, prompts: tuple[str, ...], params: SamplingParams
) -> Rung:
    """Shannon's zero-order model: P(w) = (c(w) + 1) / (N + V), whatever came before."""
    t0 = time.perf_counter()
    V = tokenizer.vocab_size
    counts = np.bincount(np.asarray(shards.train, dtype=np.int64), minlength=V)
    logp = np.log((counts + 1) / (counts.sum() + V))
    seconds = time.perf_counter() - t0
    logits = torch.from_numpy(logp)
    samples = [(p, continue_text(lambda ids: logits, tokenizer, p, params)) for p in prompts]
    bpb = _bpb(shards, logp[np.asarray(shards.val[1:], np.int64)])
    # The entropy of the train distribution, for comparison with its cost on validation text.
    name = f"unigram (Shannon, H = {entropy_bits(counts):.2f} bits/token)"
    return Rung(name, "unigram", bpb, seconds, V, samples, shards.meta["key"])


def entropy_bits(counts: np.ndarray) -> float:
    """Shannon entropy H = -sum p log2 p of the distribution the counts estimate (bits/token)."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def ngrams(
    shards: Shards,
    tokenizer: Tokenizer,
    cfg: LadderConfig,
    prompts: tuple[str, ...],
    params: SamplingParams,
) -> Iterator[Rung]:
    """The Kneser-Ney rungs n = 2..max_order; n's time is the counting up to order n."""
    V, key = tokenizer.vocab_size, shards.meta["key"]
    orders = count_orders(shards.train, cfg.max_order, V)
    counting = 0.0  # an order's time is the counting of it and every order below it
    for n in range(1, cfg.max_order + 1):
        t0 = time.perf_counter()
        levels = next(orders)
        counting += time.perf_counter() - t0
        if n < 2:
            continue
        model = KneserNey(levels, n, V)
        bpb = _bpb(shards, model.logprobs(shards.val))
        logits = lambda ids, m=model: torch.from_numpy(np.log(m.distribution(ids)))  # noqa: E731
        samples = [(p, continue_text(logits, tokenizer, p, params)) for p in prompts]
        yield Rung(f"{n}-gram (Kneser-Ney)", "ngram", bpb, counting, model.size, samples, key)


def _train_cfg(minutes: float, batch_size: int, lr: float, cfg: LadderConfig) -> TrainConfig:
    return TrainConfig(
        max_minutes=minutes, max_steps=10**9, batch_size=batch_size, lr=lr, min_lr=lr / 10,
        weight_decay=0.0, warmup_steps=20, eval_every=0, eval_batches=0, checkpoint_every=0,
        device=cfg.device, dtype="float32", log_every=200, seed=cfg.seed,
    )  # fmt: skip


def _single_tokens(tokenizer: Tokenizer, words: tuple[str, ...]) -> dict[str, int]:
    return {w: ids[0] for w in words if len(ids := tokenizer.encode(w)) == 1}


def describe_vectors(vectors: Tensor, tokenizer: Tokenizer, counts: np.ndarray) -> str:
    """Nearest neighbours of a few words, and the analogies their tokens allow, as text."""
    one = _single_tokens(tokenizer, PROBES + tuple(w for triple in ANALOGIES for w in triple))
    probes = [one[w] for w in PROBES if w in one][:5]
    if len(probes) < 3:  # a corpus or tokenizer without these words: its most frequent words
        words = [i for i in np.argsort(-counts) if tokenizer.decode([int(i)]).strip().isalpha()]
        probes = [int(i) for i in words[:5]]
    show = lambda i: tokenizer.decode([i]).strip() or repr(tokenizer.decode([i]))  # noqa: E731
    lines = [f"{show(w)}: {', '.join(show(i) for i in neighbours(vectors, w))}" for w in probes]
    for a, b, c in ANALOGIES:
        if {a, b, c} <= one.keys():
            d = analogy(vectors, one[a], one[b], one[c])
            lines.append(f"{a.strip()} : {b.strip()} :: {c.strip()} : {show(d)}")
    return "\n".join(lines)


def vectors(
    shards: Shards, tokenizer: Tokenizer, cfg: LadderConfig, minutes: float, run_dir: Path
) -> tuple[Rung, Tensor]:
    """Skip-gram vectors trained for `minutes` through the Trainer; returns the rung and (V, d)."""
    V = tokenizer.vocab_size
    model = SkipGram(V, cfg.vector_dim)
    batches = SkipGramSampler(
        shards.train, V, 256, window=cfg.window, negatives=cfg.negatives, seed=cfg.seed
    )
    state = train(model, skipgram_loss, batches, _train_cfg(minutes, 256, 1e-2, cfg), run_dir)
    table = model.center.weight.detach().cpu()
    counts = np.bincount(np.asarray(shards.train, dtype=np.int64), minlength=V)
    text = describe_vectors(table, tokenizer, counts)
    size, key = model.num_params(), shards.meta["key"]
    rung = Rung("skip-gram vectors", "vectors", None, state.train_time_s, size, [], key, text)
    return rung, table


def neural(
    shards: Shards, tokenizer: Tokenizer, table: Tensor, cfg: LadderConfig, minutes: float,
    run_dir: Path, prompts: tuple[str, ...], params: SamplingParams, context_len: int = 128,
) -> Rung:  # fmt: skip
    """Bengio's MLP on the frozen vectors, trained and scored like the transformer."""
    model = BengioLM(table, cfg.neural_context, cfg.neural_hidden)
    batches = WindowSampler(shards.train, 16, context_len, cfg.seed)
    state = train(model, lm_loss, batches, _train_cfg(minutes, 16, 1e-2, cfg), run_dir)
    model.eval()
    loss, _ = evaluate_objective(model, lm_loss, eval_batches(shards.val, 64, context_len))
    n, device = cfg.neural_context, next(model.parameters()).device

    def logits(ids: list[int]) -> Tensor:
        with torch.no_grad():  # the last n tokens are all the model ever reads
            return model(torch.tensor([ids[-n:]], device=device))[0, -1].cpu()

    samples = [(p, continue_text(logits, tokenizer, p, params)) for p in prompts]
    bpb, size = shards.bits_per_byte(loss), model.num_params()
    name = f"neural LM (Bengio, {n} tokens)"
    return Rung(name, "neural", bpb, state.train_time_s, size, samples, shards.meta["key"])


def climb(
    shards: Shards, tokenizer: Tokenizer, minutes: float, out_dir: Path, prompts: tuple[str, ...],
    params: SamplingParams, cfg: LadderConfig | None = None, on_rung: Callable[[Rung], None] | None = None,
) -> list[Rung]:  # fmt: skip
    """Every rung below the transformer, in ladder order; `on_rung` hears each as it finishes."""
    cfg = cfg or LadderConfig()
    rungs: list[Rung] = []

    def done(rung: Rung) -> None:
        rungs.append(rung)
        if on_rung is not None:
            on_rung(rung)

    done(uniform(shards, prompts, params))
    done(unigram(shards, tokenizer, prompts, params))
    for rung in ngrams(shards, tokenizer, cfg, prompts, params):
        done(rung)
    rung, table = vectors(shards, tokenizer, cfg, minutes * cfg.vectors_share, out_dir / "vectors")
    done(rung)
    mlp_minutes = minutes * cfg.neural_share
    mlp = neural(shards, tokenizer, table, cfg, mlp_minutes, out_dir / "neural", prompts, params)
    done(mlp)
    return rungs
