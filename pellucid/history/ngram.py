"""n-gram language models with interpolated Kneser-Ney smoothing, counted with numpy.

An n-gram model predicts a token from the n - 1 before it, by counting. Raw relative frequencies
give an unseen continuation probability 0 (and infinite bits), so Kneser-Ney (Kneser & Ney 1995,
in Chen & Goodman's interpolated form) takes a fixed discount D off every seen count and hands
the freed mass to the next lower order:

    P_k(w | h) = max(c(h w) - D_k, 0) / c(h .)  +  D_k * N1+(h .) / c(h .) * P_{k-1}(w | h')

where h' is h without its first token, c(h .) = sum_w c(h w) and N1+(h .) the number of distinct
w seen after h. At the highest order c is the raw count; below it c is the continuation count
N1+(. h w), the number of distinct tokens seen *before* h w (so "Francisco" is rare as a
unigram guess even if frequent, because it only ever follows "San"). A context never seen passes
straight to the lower order, and order 1 interpolates with the uniform 1/V, so every token of
the vocabulary gets a probability > 0 and the bits per byte are honest. D_k = n1 / (n1 + 2 n2),
with n1, n2 the numbers of k-grams counted exactly once and twice (Ney, Essen & Kneser 1994).

Storage is a trie in sorted integer keys: the k-gram (h, w) is `rank(h) * V + w`, where rank(h)
is h's index in the sorted (k-1)-gram keys, so every key fits an int64 whatever n and V, and a
lookup is one `np.searchsorted`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pellucid.errors import ConfigError
from pellucid.train.memory import available_bytes


@dataclass(frozen=True)
class Level:
    """The counts of one order k. For k = 1 the keys are the token ids themselves (0..V-1).

    keys: (M,) int64 sorted, rank(context) * V + w. counts: (M,) raw counts c(h w).
    cont: (M,) continuation counts N1+(. h w) (zeros at the top order, which never needs them).
    """

    keys: np.ndarray
    counts: np.ndarray
    cont: np.ndarray


@dataclass(frozen=True)
class Stats:
    """What one order contributes to an interpolated model: per-context totals and a discount.

    value: (M,) the counts used at this order (raw at the top order, continuation below).
    total, types: (C,) sum of `value` and number of nonzero `value` per context rank.
    """

    value: np.ndarray
    total: np.ndarray
    types: np.ndarray
    discount: float


def bytes_needed(n_tokens: int, order: int) -> int:
    """A generous estimate of counting memory: np.unique's sort copies plus the stored tables."""
    return 8 * n_tokens * (6 + 4 * order)


def count_orders(
    tokens: np.ndarray, order: int, vocab_size: int, available: int | None = None
) -> Iterator[list[Level]]:
    """Count the k-grams of `tokens` (N,) for k = 1..order, yielding the levels after each order.

    The list yielded after order k holds orders 1..k, enough for a model of order k. Raises
    ConfigError before allocating anything when the tables would not fit in memory.
    """
    if order < 1:
        raise ConfigError(f"n-gram order must be >= 1, got {order}")
    need = bytes_needed(len(tokens), order)
    have = available_bytes() if available is None else available
    if need > have:
        raise ConfigError(
            f"the {order}-gram tables of {len(tokens):,} tokens need about {need / 2**30:.1f} GB "
            f"but {have / 2**30:.1f} GB is available: use a smaller n-gram order or corpus"
        )
    t = np.asarray(tokens, dtype=np.int64)
    V = vocab_size
    ranks = t  # rank of the k-gram ending at each position, from position k - 1 on
    levels = [Level(np.arange(V), np.bincount(t, minlength=V), np.zeros(V, np.int64))]
    yield list(levels)
    for k in range(2, order + 1):
        keys = ranks[:-1] * V + t[k - 1 :]  # (context = the (k-1)-gram one earlier, token)
        uniq, first, inverse, counts = np.unique(
            keys, return_index=True, return_inverse=True, return_counts=True
        )
        # The suffix of each k-gram type is the (k-1)-gram ending where it ends: its left
        # extensions are what the (k-1)-gram's continuation count counts.
        suffix = ranks[1:][first]
        prev = levels[-1]
        levels[-1] = Level(prev.keys, prev.counts, np.bincount(suffix, minlength=len(prev.keys)))
        levels.append(Level(uniq, counts, np.zeros(len(uniq), np.int64)))
        ranks = inverse.reshape(-1)
        yield list(levels)


def count(tokens: np.ndarray, order: int, vocab_size: int) -> list[Level]:
    """The levels of every order 1..order (see `count_orders`)."""
    *_, levels = count_orders(tokens, order, vocab_size)
    return levels


def discount(value: np.ndarray) -> float:
    """D = n1 / (n1 + 2 n2) over the counts `value` (0.5 when no count is 1 or 2)."""
    n1, n2 = int((value == 1).sum()), int((value == 2).sum())
    return n1 / (n1 + 2 * n2) if n1 + 2 * n2 else 0.5


def level_stats(level: Level, n_contexts: int, top: bool, vocab_size: int) -> Stats:
    """Per-context totals of one order in a model whose highest order is `top` or not."""
    value = level.counts if top else level.cont
    ctx = level.keys // vocab_size if n_contexts > 1 else np.zeros(len(value), np.int64)
    total = np.bincount(ctx, weights=value, minlength=n_contexts)
    types = np.bincount(ctx[value > 0], minlength=n_contexts).astype(np.float64)
    return Stats(value.astype(np.float64), total, types, discount(value[value > 0]))


class KneserNey:
    """An interpolated Kneser-Ney model of order n over counted levels (see `count`)."""

    def __init__(self, levels: list[Level], n: int, vocab_size: int) -> None:
        if not 1 <= n <= len(levels):
            raise ConfigError(f"order {n} needs levels counted up to {n}, have {len(levels)}")
        self.levels, self.n, self.V = levels[:n], n, vocab_size
        contexts = [1] + [len(lv.keys) for lv in self.levels[:-1]]  # order 1: one empty context
        self.stats = [
            level_stats(lv, c, k == n - 1, vocab_size)
            for k, (lv, c) in enumerate(zip(self.levels, contexts, strict=True))
        ]

    @property
    def size(self) -> int:
        """Table entries: stored k-gram types over all orders (order 1: the vocabulary)."""
        return sum(len(lv.keys) for lv in self.levels)

    def _lookup(self, k: int, ctx: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Rank of (context rank, token) among the order-(k+1) keys, -1 where absent or ctx < 0."""
        keys = self.levels[k].keys
        key = ctx * self.V + w
        pos = np.minimum(np.searchsorted(keys, key), len(keys) - 1)
        return np.where((ctx >= 0) & (keys[pos] == key), pos, -1)

    def _interpolate(
        self, ctx_ranks: list[np.ndarray], word_ranks: list[np.ndarray], w: np.ndarray
    ) -> np.ndarray:
        """P_n(w | h) by the recursion in the module docstring, vectorized over rows.

        ctx_ranks[k], word_ranks[k]: (R,) the rank of the context and of (context, w) at order
        k + 1 (-1: never seen). Order 1's context is the empty one (rank 0).
        """
        s = self.stats[0]
        if s.total[0] == 0:  # nothing counted (a single token): uniform
            return np.full(len(w), 1.0 / self.V)
        p = (np.maximum(s.value[w] - s.discount, 0) + s.discount * s.types[0] / self.V) / s.total[0]
        for k in range(1, self.n):
            s, ctx, hit = self.stats[k], ctx_ranks[k], word_ranks[k]
            c = np.where(hit >= 0, s.value[np.maximum(hit, 0)], 0.0)
            total = np.where(ctx >= 0, s.total[np.maximum(ctx, 0)], 0.0)
            types = np.where(ctx >= 0, s.types[np.maximum(ctx, 0)], 0.0)
            mixed = (np.maximum(c - s.discount, 0) + s.discount * types * p) / np.maximum(total, 1)
            p = np.where(total > 0, mixed, p)  # an unseen context backs off entirely
        return p

    def logprobs(self, tokens: np.ndarray) -> np.ndarray:
        """ln P(tokens[i] | up to n - 1 tokens before it) for i = 1..N-1: (N - 1,) float64.

        Each target sees the history inside `tokens` only (the first targets a shorter one).
        """
        t = np.asarray(tokens, dtype=np.int64)
        ranks = [t]  # ranks[k][i]: rank of the (k+1)-gram ending at i, -1 if unseen or too short
        for k in range(1, self.n):
            r = np.full(len(t), -1, np.int64)
            r[1:] = self._lookup(k, ranks[-1][:-1], t[1:])
            ranks.append(r)
        ctx = [np.zeros(len(t) - 1, np.int64)] + [r[:-1] for r in ranks[:-1]]
        p = self._interpolate(ctx, [r[1:] for r in ranks], t[1:])
        return np.log(p)

    def _context_rank(self, history: list[int], k: int) -> int:
        """Rank of the last k tokens of `history` among the k-gram keys (-1: unseen or too short)."""
        if len(history) < k:
            return -1
        rank = history[-k]
        for j in range(1, k):
            rank = int(self._lookup(j, np.array([rank]), np.array([history[-k + j]]))[0])
            if rank < 0:
                return -1
        return rank

    def distribution(self, history: list[int]) -> np.ndarray:
        """P_n(. | history): (V,) float64 over the whole vocabulary, summing to 1."""
        w = np.arange(self.V)
        ctx = [np.zeros(self.V, np.int64)]
        words = [w]
        for k in range(1, self.n):
            c = np.full(self.V, self._context_rank(history, k), np.int64)
            ctx.append(c)
            words.append(self._lookup(k, c, w))
        return self._interpolate(ctx, words, w)
