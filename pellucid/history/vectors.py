"""Word vectors: skip-gram with negative sampling (Mikolov et al. 2013), trained by the one Trainer.

Each token w gets two vectors, v_w (as a centre) and u_w (as a context). For a centre c and a
token o seen within `window` positions of it, the model is asked to tell o apart from K "noise"
tokens n_1..n_K drawn from the unigram distribution raised to 3/4:

    loss(c, o) = -log sigmoid(u_o . v_c) - sum_k log sigmoid(-u_{n_k} . v_c)

Tokens that occur in the same contexts end up with centre vectors pointing the same way, so the
nearest neighbours of a vector by cosine are tokens used alike, and offsets can carry relations
(king - man + woman ~ queen, when the corpus says so). The vectors are not a language model on
their own: history/neural.py reads them, frozen, as the input of one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pellucid.data.batches import IGNORE_INDEX, Batch
from pellucid.errors import DataError
from pellucid.train.objectives import LossOutput


class SkipGram(nn.Module):
    """Centre and context tables, (V, dim) each; word2vec's init (small centre, zero context)."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.center = nn.Embedding(vocab_size, dim)
        self.context = nn.Embedding(vocab_size, dim)
        nn.init.uniform_(self.center.weight, -0.5 / dim, 0.5 / dim)
        nn.init.zeros_(self.context.weight)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


@dataclass
class SkipGramBatch(Batch):
    """inputs: (B, 1) centre ids; targets: (B, 2W) context ids (IGNORE_INDEX outside the window
    drawn for that centre); negatives: (B, 2W, K) noise ids, K per (centre, context) pair."""

    negatives: Tensor | None = None


def skipgram_loss(model: nn.Module, batch: SkipGramBatch) -> LossOutput:
    """The negative-sampling loss of the module docstring, summed over the real pairs."""
    v = model.center(batch.inputs)  # (B, 1, d)
    valid = batch.targets != IGNORE_INDEX  # (B, 2W)
    u = model.context(batch.targets.clamp(min=0))  # (B, 2W, d)
    noise = model.context(batch.negatives)  # (B, 2W, K, d)
    pos = (u * v).sum(-1)  # (B, 2W)
    neg = (noise * v.unsqueeze(2)).sum(-1)  # (B, 2W, K)
    per_pair = -F.logsigmoid(pos) - F.logsigmoid(-neg).sum(-1)
    return LossOutput((per_pair * valid).sum(), batch.n_targets)


def _seed(seed: int, step: int) -> int:
    return int.from_bytes(hashlib.sha256(f"sg:{seed}:{step}".encode()).digest()[:8], "little")


class SkipGramSampler:
    """Endless SkipGramBatch iterator over a token array; batch `step` depends on (seed, step) only.

    Frequent tokens are thinned once, as word2vec does (a token of frequency f is kept with
    probability min(1, sqrt(t/f) + t/f)); each centre then gets a window of b ~ U{1..window}
    tokens either side, and K noise tokens per pair from unigram^0.75.
    """

    def __init__(
        self, tokens: np.ndarray, vocab_size: int, batch_size: int, *, window: int = 4,
        negatives: int = 5, subsample: float = 1e-4, seed: int = 0,
    ) -> None:  # fmt: skip
        t = np.asarray(tokens, dtype=np.int64)
        if len(t) < 2 * window + 2:
            raise DataError(f"{len(t)} tokens are too few for skip-gram windows of {window}")
        counts = np.bincount(t, minlength=vocab_size).astype(np.float64)
        freq = counts / counts.sum()
        keep = np.minimum(
            1.0, np.sqrt(subsample / np.maximum(freq, 1e-12)) + subsample / np.maximum(freq, 1e-12)
        )
        draw = np.random.default_rng(seed).random(len(t))
        pos = np.flatnonzero(draw < keep[t])
        self.centres = pos[(pos >= window) & (pos < len(t) - window)]
        self.tokens, self.window, self.k, self.batch_size = t, window, negatives, batch_size
        self.noise = torch.from_numpy(counts**0.75)  # torch.multinomial normalises it
        self.offsets = np.r_[-window:0, 1 : window + 1]  # (2W,)
        self.seed, self.step = seed, 0

    def __iter__(self) -> SkipGramSampler:
        return self

    def __next__(self) -> SkipGramBatch:
        g = torch.Generator().manual_seed(_seed(self.seed, self.step))
        self.step += 1
        B, W = self.batch_size, self.window
        pick = torch.randint(len(self.centres), (B,), generator=g).numpy()
        centre = self.centres[pick]  # (B,) positions
        reach = torch.randint(1, W + 1, (B, 1), generator=g).numpy()  # word2vec's shrunk window
        ctx = self.tokens[centre[:, None] + self.offsets]  # (B, 2W)
        ctx = np.where(np.abs(self.offsets) <= reach, ctx, IGNORE_INDEX)
        neg = torch.multinomial(self.noise, B * 2 * W * self.k, replacement=True, generator=g)
        return SkipGramBatch(
            torch.from_numpy(self.tokens[centre][:, None]),
            torch.from_numpy(ctx),
            negatives=neg.view(B, 2 * W, self.k),
        )


def _unit(vectors: Tensor) -> Tensor:
    return F.normalize(vectors.detach().float(), dim=-1)


def nearest(vectors: Tensor, query: Tensor, k: int, exclude: list[int] = ()) -> list[int]:
    """The k ids whose rows of `vectors` (V, d) have the highest cosine with `query` (d,)."""
    sims = _unit(vectors) @ F.normalize(query.detach().float(), dim=0)  # (V,)
    sims[list(exclude)] = -float("inf")
    return sims.topk(k).indices.tolist()


def neighbours(vectors: Tensor, word: int, k: int = 5) -> list[int]:
    """The k nearest ids to `word` by cosine, itself excluded."""
    return nearest(vectors, vectors[word], k, [word])


def analogy(vectors: Tensor, a: int, b: int, c: int) -> int:
    """a is to b as c is to ?: the id nearest to v_b - v_a + v_c (unit vectors), a, b, c excluded."""
    u = _unit(vectors)
    return nearest(vectors, u[b] - u[a] + u[c], 1, [a, b, c])[0]
