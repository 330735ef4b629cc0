"""Batches: the `Batch` every objective consumes, and the samplers that cut them from token arrays.

Pretraining draws random windows of `context_len + 1` tokens from the train shard
(`WindowSampler`); evaluation walks the val shard in order, each token a target exactly once
(`eval_batches`). In both, inputs are a window without its last token and targets the window
without its first: position t predicts token t + 1.

The sampler is deterministic and its position is two integers: batch number `step` is drawn with a
private `torch.Generator` seeded from (seed, step), so `state()` is `{"seed", "step"}`, restoring
it is O(1) at any step, and the global RNG is never touched.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pellucid.errors import DataError

IGNORE_INDEX = -100  # a target with this id carries no loss (padding, prompt tokens under SFT)


@dataclass
class Batch:
    """One micro-batch. Later objectives subclass it to add fields (attention masks, rewards).

    inputs: (B, T) int64 token ids.
    targets: (B, T) int64 next-token ids, IGNORE_INDEX where no loss is wanted.
    """

    inputs: Tensor
    targets: Tensor

    @property
    def n_targets(self) -> int:
        """Number of targets that carry loss (!= IGNORE_INDEX)."""
        return int((self.targets != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with every tensor field on `device` (asynchronous from pinned memory)."""
        moved = {
            f.name: v.to(device, non_blocking=v.is_pinned())
            for f in dataclasses.fields(self)
            if isinstance(v := getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **moved)


def _to_batch(inputs: np.ndarray, targets: np.ndarray, pin_memory: bool) -> Batch:
    """(B, T) integer arrays -> Batch of (B, T) int64 tensors that own their memory."""
    # astype copies, so inputs and targets never share storage (they overlap in the window).
    x, y = (torch.from_numpy(a.astype(np.int64)) for a in (inputs, targets))
    if pin_memory:  # page-locked host memory lets .to("cuda", non_blocking=True) overlap compute
        x, y = x.pin_memory(), y.pin_memory()
    return Batch(x, y)


def _step_seed(seed: int, step: int) -> int:
    # A hash, not seed + step: samplers with neighbouring seeds must not share batches.
    digest = hashlib.sha256(f"{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


class SeededSteps:
    """A sampler whose next batch is a function of (seed, step): those two are its whole position,
    so a checkpoint stores `state()` and a resumed run draws the same batches."""

    seed: int
    step: int

    def state(self) -> dict[str, int]:
        """The sampler's position, JSON-able."""
        return {"seed": self.seed, "step": self.step}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from a `state()`: the following batches equal those the saved sampler drew."""
        seed, step = state.get("seed"), state.get("step")
        if not (isinstance(seed, int) and isinstance(step, int) and step >= 0):
            raise DataError(f"bad sampler state {state!r}: expected integers 'seed' and 'step'")
        self.seed, self.step = seed, step


class WindowSampler(SeededSteps):
    """An endless iterator of random-window batches over a 1-D token array, or a weighted mix.

    tokens: (N,) integer token ids (a memory-mapped shard, or a prepared dataset streamed from
        disk by data/stream.py: only the windows are read); or, with `weights`, a list of such
        arrays: each row then comes from array i with probability weights[i] / sum(weights).
    Each `next()` returns a Batch of (batch_size, context_len) int64 tensors whose windows start
    uniformly at random in [0, N - context_len - 1] (of the array the row comes from).
    """

    def __init__(
        self,
        tokens: Any,
        batch_size: int,
        context_len: int,
        seed: int,
        *,
        pin_memory: bool = False,
        weights: list[float] | None = None,
    ) -> None:
        if batch_size < 1 or context_len < 1:
            raise DataError(
                f"batch_size and context_len must be >= 1, got {batch_size}, {context_len}"
            )
        sources = list(tokens) if weights is not None else [tokens]
        if weights is not None and (len(weights) != len(sources) or min(weights) <= 0):
            raise DataError(f"need one weight > 0 per token array, got {weights}")
        # window w = tokens[s : s + context_len + 1]
        starts = [len(t) - context_len for t in sources]
        for t, n in zip(sources, starts, strict=True):
            if n < 1:
                raise DataError(
                    f"{len(t)} tokens are too few for one window of context_len + 1 = "
                    f"{context_len + 1} tokens; use a larger corpus or a smaller context_len"
                )
        self.n_starts = starts[0]
        self.tokens = tokens
        self.sources, self.source_starts = sources, starts
        self.weights = None if weights is None else torch.tensor(weights, dtype=torch.float64)
        self.batch_size = batch_size
        self.context_len = context_len
        self.seed = seed
        self.step = 0  # batches drawn so far
        self.pin_memory = pin_memory
        self.rows = slice(0, batch_size)  # the rows of each batch this process reads (`shard`)
        self._generator = torch.Generator()
        self._offsets = np.arange(context_len + 1)  # (T + 1,)

    def __iter__(self) -> WindowSampler:
        return self

    def __next__(self) -> Batch:
        self._generator.manual_seed(_step_seed(self.seed, self.step))
        if self.weights is not None:
            windows = self._mixed_windows()
        else:
            starts = torch.randint(self.n_starts, (self.batch_size,), generator=self._generator)
            starts = starts[self.rows]  # the whole batch is drawn, this rank's rows read
            windows = self.tokens[starts.numpy()[:, None] + self._offsets]  # (B, T + 1)
        self.step += 1
        return _to_batch(windows[:, :-1], windows[:, 1:], self.pin_memory)

    def _mixed_windows(self) -> np.ndarray:
        """(rows, T + 1) windows: each row's source drawn by weight, then its start uniformly."""
        g = self._generator
        src = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=g)
        where = torch.rand(self.batch_size, generator=g, dtype=torch.float64)  # in [0, 1)
        src, where = src[self.rows].numpy(), where[self.rows].numpy()
        windows = np.empty((len(src), len(self._offsets)), dtype=np.int64)
        for i, tokens in enumerate(self.sources):
            rows = np.flatnonzero(src == i)
            if len(rows):
                starts = (where[rows] * self.source_starts[i]).astype(np.int64)
                windows[rows] = tokens[starts[:, None] + self._offsets]
        return windows

    def shard(self, rank: int, world_size: int) -> None:
        """Read only rows rank*b .. rank*b + b - 1 (b = batch_size / world_size) of every batch.

        The batch itself is still drawn whole from (seed, step), so N ranks together read exactly
        the windows one process reads, and `state()` does not depend on the world size.
        """
        if self.batch_size % world_size:
            raise DataError(
                f"batch of {self.batch_size} rows does not split over {world_size} ranks"
            )
        b = self.batch_size // world_size
        self.rows = slice(rank * b, (rank + 1) * b)


def eval_batches(
    tokens: np.ndarray,
    batch_size: int,
    context_len: int,
    max_batches: int | None = None,
    *,
    pin_memory: bool = False,
) -> Iterator[Batch]:
    """Consecutive non-overlapping windows over `tokens`, in order, for evaluation.

    Row r has inputs tokens[r*T : r*T + T] and targets shifted by one, so every token but the
    first is a target exactly once. The last row is padded (inputs 0, targets IGNORE_INDEX), and
    the last batch may have fewer rows. `max_batches` stops early (the first batches, always the
    same ones). Yields Batch of (<= batch_size, context_len) int64 tensors.
    """
    T = context_len
    if len(tokens) < 2:
        raise DataError(f"{len(tokens)} tokens are too few to evaluate on (need at least 2)")
    n_rows = -(-(len(tokens) - 1) // T)  # ceil: the last row may be partial
    n_batches = -(-n_rows // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        rows = range(b * batch_size, min((b + 1) * batch_size, n_rows))
        windows = np.full((len(rows), T + 1), IGNORE_INDEX, dtype=np.int64)  # (R, T + 1)
        for i, r in enumerate(rows):
            w = tokens[r * T : r * T + T + 1]
            windows[i, : len(w)] = w
        # Padded inputs must still be valid ids (0); their targets are IGNORE_INDEX.
        yield _to_batch(np.maximum(windows[:, :-1], 0), windows[:, 1:], pin_memory)
