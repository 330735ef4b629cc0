"""Drafters for speculative decoding: cheap guesses at a sequence's next few tokens.

The engine (engine.py, `Engine(..., draft=...)`) asks a drafter for up to k tokens per sequence,
feeds the sequence's last token and the guesses through ONE forward of the model over its KV
cache, and keeps the guesses the model itself would have produced: at each position it chooses a
token exactly as plain decoding would (sampling.py, the row's own params and generator); while
that token equals the guess it goes on, and the first one that differs is kept as the model's
own token and ends the step. The K/V written for the rejected guesses are past the row's new
length, so they are never attended to and are overwritten (the cache's rollback is the length).

Both drafters here are deterministic: their guess is a point mass q = 1 at one token. For such
a q, the standard acceptance rule (Leviathan et al. 2023: accept with probability min(1, p/q),
else draw from max(0, p - q) renormalized) is "draw from p; accept if the draw is the guess; else
the draw is the token": each position's token is a draw from the model's p, one draw of the
row's generator each, in order. So greedy output is plain greedy output, and sampled output is
the same text that plain sampling gives with the same seed (to float rounding of the logits).

- LookupDrafter (prompt lookup, Saxena 2023): find the latest earlier occurrence of the
  sequence's last n tokens and guess what followed it. No model; it shines when the output
  copies the prompt (editing code, quoting, summarizing).
- ModelDrafter: a small model with the same vocabulary runs k greedy steps over its own KV cache
  per sequence, which is rolled back to the tokens the big model kept.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from pellucid.errors import ConfigError
from pellucid.infer.decode import FastDecoder, last_logits, runner_for
from pellucid.infer.kv_pool import next_power_of_two
from pellucid.infer.sampling import greedy
from pellucid.infer.sequence import common_prefix
from pellucid.model.kv_cache import KVCache


class Drafter(Protocol):
    def propose(self, handle: int, ids: list[int], k: int) -> list[int]:
        """Up to k guessed tokens to follow ids (the sequence so far) of the engine's sequence
        `handle`; [] for no guess."""
        ...

    def forget(self, handle: int) -> None:
        """The sequence `handle` is finished: drop what is kept for it."""
        ...


class LookupDrafter:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the sequence's last
    n tokens (n from `ngram` down to 1), up to k of them. Keeps no state."""

    def __init__(self, ngram: int = 3) -> None:
        if isinstance(ngram, bool) or not isinstance(ngram, int) or ngram < 1:
            raise ConfigError(f"lookup ngram must be an integer >= 1, got {ngram!r}")
        self.ngram = ngram

    def propose(self, handle: int, ids: list[int], k: int) -> list[int]:
        L = len(ids)
        for n in range(min(self.ngram, L - 1), 0, -1):
            tail = ids[L - n :]
            # Latest start first; start + n <= L - 1, so at least one token follows a match.
            for start in range(L - n - 1, -1, -1):
                if ids[start] == tail[0] and ids[start : start + n] == tail:
                    return ids[start + n : start + n + k]
        return []

    def forget(self, handle: int) -> None:
        pass


class ModelDrafter:
    """Greedy guesses of a draft model that shares the tokenizer (same vocabulary), with one KV
    cache per sequence that grows by powers of two and keeps the prefix the next call shares."""

    def __init__(self, model: nn.Module, vocab_size: int) -> None:
        if model.cfg.vocab_size != vocab_size:
            raise ConfigError(
                f"the draft model's vocabulary has {model.cfg.vocab_size} tokens but the model's "
                f"has {vocab_size}: a draft model must share the tokenizer"
            )
        self.model, self.fast = model.eval(), FastDecoder.build(model)
        first = next(model.parameters())
        self.device = first.device
        self.dtype = first.dtype if first.is_floating_point() else torch.float32
        self.caches: dict[int, tuple[KVCache, list[int]]] = {}  # handle -> cache, ids it holds

    @torch.inference_mode()
    def propose(self, handle: int, ids: list[int], k: int) -> list[int]:
        ctx = self.model.cfg.context_len
        k = min(k, ctx - len(ids))  # its last guess is fed to nobody: len(ids) + k - 1 < ctx
        if k < 1:
            return []
        cache, held = self.caches.get(handle) or (None, [])
        # Reuse what the cache holds of ids, but run at least one token: its logits guess.
        n = min(common_prefix(held, ids), len(ids) - 1)
        cache = self._room(cache, n, len(ids) + k - 1)
        cache.lengths = torch.tensor([n], device=self.device)  # roll back past the rejected ones
        feed, guesses = ids[n:], []
        for _ in range(k):
            runner = runner_for(self.model, self.fast, [feed], cache)
            logits = last_logits(runner, [feed], self.device, cache)  # (1, V)
            cache.advance(len(feed))
            feed = greedy(logits)[0].tolist()  # the sampler's argmax: first among ties
            guesses += feed
        self.caches[handle] = (cache, ids + guesses[:-1])
        return guesses

    def forget(self, handle: int) -> None:
        self.caches.pop(handle, None)

    def _room(self, cache: KVCache | None, keep: int, need: int) -> KVCache:
        """`cache` if it holds `need` tokens, else a bigger one with its first `keep` copied."""
        if cache is not None and cache.max_len >= need:
            return cache
        size = min(self.model.cfg.context_len, next_power_of_two(need))
        new = KVCache(self.model.cfg, 1, size, device=self.device, dtype=self.dtype)
        if cache is not None:
            for mine, old in zip((*new.k, *new.v), (*cache.k, *cache.v), strict=True):
                mine[:, :, :keep] = old[:, :, :keep]
        return new
