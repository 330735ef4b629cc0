"""KVPool: the engine's KV-cache memory, one batched buffer whose rows are the live sequences.

Every layer's keys (and values) live in one buffer of shape (rows, n_kv_head, length, head_dim).
The sequences that have been prefilled occupy rows 0 .. n-1, so one decode forward reads the slice
`buf[:n]` (a view: nothing is copied per step). A sequence that joins is placed in row n and
prefilled there; one that leaves is replaced by the last row (one row copied), so the rows stay
contiguous:

    rows  0 [ seq 7 ......... ]      cancel(3): row 2 (seq 9) moves into row 1
          1 [ seq 3 .....     ]  ->  0 [ seq 7 ......... ]
          2 [ seq 9 ...       ]      1 [ seq 9 ...       ]

Memory is reserved per sequence, `prompt + max_new_tokens` tokens (within the context), when it is
admitted. Rows are contiguous, so each is as long as the longest live reservation (rounded up to
64 tokens when the budget allows): a sequence is admitted only if (live rows + 1) x that length
fits the budget. The buffer grows when an admission needs more (rows doubled, within the budget,
so most joins copy nothing), shrinks when it holds over twice what the live reservations need,
and is freed when none is left, so `nbytes` is 0 whenever nothing is live.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from pellucid.errors import CapacityError
from pellucid.model.config import ModelConfig
from pellucid.model.kv_cache import KVCache, bytes_per_token

CHUNK = 64  # row lengths are rounded up to a multiple of this, so small growths do not copy
MIN_DEFAULT_BUDGET = 256 * 2**20  # bytes: the smallest default budget (tiny models get many rows)


def default_budget(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> int:
    """The pool's budget when none is given: 8 full-context rows (at least 256 MiB), but at most
    a quarter of the device's memory (the machine's RAM on the CPU)."""
    full_rows = max(8 * cfg.context_len * bytes_per_token(cfg, dtype), MIN_DEFAULT_BUDGET)
    try:
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
        else:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError, RuntimeError):  # no sysconf (Windows), no info
        return full_rows
    return min(full_rows, total // 4)


def next_power_of_two(n: int) -> int:
    """>>> next_power_of_two(5), next_power_of_two(8)
    (8, 8)"""
    return 1 << max(n - 1, 0).bit_length()


class KVPool:
    """Reservations by handle, and the buffer rows of the sequences that are prefilled.

    handle: any int the caller uses for one sequence. A handle is first `reserve`d (memory
    accounted, the buffer grown if needed), then `place`d in a row when it is prefilled, and
    `release`d when it finishes or is cancelled.
    """

    def __init__(
        self, cfg: ModelConfig, budget_bytes: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.cfg, self.budget, self.device, self.dtype = cfg, budget_bytes, device, dtype
        self.per_token = bytes_per_token(cfg, dtype)
        self.reserved: dict[int, int] = {}  # handle -> tokens it may hold
        self.rows: list[int] = []  # handles in rows 0 .. n-1, in order
        self.k: list[Tensor] = []  # per layer (rows, n_kv_head, length, head_dim)
        self.v: list[Tensor] = []
        self._views: dict[tuple[int, int], tuple[list[Tensor], list[Tensor]]] = {}

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, length) of the buffer; (0, 0) when nothing is allocated."""
        return (self.k[0].shape[0], self.k[0].shape[2]) if self.k else (0, 0)

    @property
    def nbytes(self) -> int:
        """Bytes of KV memory the pool holds now."""
        rows, length = self.shape
        return rows * length * self.per_token

    def _need(self, extra: int = 0) -> tuple[int, int]:
        """(rows, length) the live reservations need, with one more of `extra` tokens if > 0."""
        sizes = [*self.reserved.values(), *([extra] if extra else [])]
        return len(sizes), max(sizes, default=0)

    def _bytes(self, rows: int, length: int) -> int:
        return rows * length * self.per_token

    def fits(self, n_tokens: int) -> bool:
        """Could a sequence of n_tokens (already capped at the context) be reserved now?"""
        return self._bytes(*self._need(n_tokens)) <= self.budget

    def reserve(self, handle: int, n_tokens: int) -> None:
        """Account n_tokens for `handle`, growing the buffer if needed; CapacityError if the
        budget cannot hold it beside the live reservations."""
        if not self.fits(n_tokens):
            alone = self._bytes(1, n_tokens)
            if alone > self.budget:
                raise CapacityError(
                    f"a sequence of {n_tokens} tokens needs {alone:,} bytes of KV cache, more "
                    f"than the pool's whole budget of {self.budget:,} bytes (kv_budget_bytes)"
                )
            rows, length = self._need(n_tokens)
            raise CapacityError(
                f"the KV-cache pool is full: {len(self.reserved)} live sequences and this one "
                f"need {rows} rows of {length} tokens, {self._bytes(rows, length):,} bytes, over "
                f"the budget of {self.budget:,}; retry when a sequence finishes"
            )
        self.reserved[handle] = n_tokens
        rows, length = self._need()
        have_rows, have_length = self.shape
        if rows > have_rows or length > have_length:
            spare = 2 * have_rows if rows > have_rows else have_rows  # fewer if over budget
            self._resize(max(rows, spare), rows, length)

    def place(self, handle: int) -> int:
        """Give a reserved handle the next free row (for its prefill); returns the row."""
        if handle not in self.reserved or len(self.rows) >= self.shape[0]:
            raise RuntimeError(f"handle {handle} has no reservation to place")  # an engine bug
        self.rows.append(handle)
        return len(self.rows) - 1

    def release(self, handle: int) -> None:
        """Forget `handle`: its row is refilled by the last row; the buffer shrinks or is freed
        when it holds over twice what the remaining reservations need."""
        self.reserved.pop(handle, None)
        if handle in self.rows:
            row, last = self.rows.index(handle), len(self.rows) - 1
            moved = self.rows.pop()
            if row != last:
                self.rows[row] = moved
                for t in (*self.k, *self.v):
                    t[row] = t[last]
        rows, length = self._need()
        if rows == 0:
            self.k, self.v, self._views = [], [], {}
        elif self.nbytes > 2 * self._bytes(rows, self._padded(length)):
            # against the padded need: a short reservation would otherwise look like half of
            # its own padded buffer, and every release of many short sequences would reallocate
            self._resize(rows, rows, length)

    def _padded(self, length: int) -> int:
        """`length` rounded up to a whole CHUNK, within the context."""
        return min(self.cfg.context_len, -(-length // CHUNK) * CHUNK)

    # Buffers are made outside inference mode even from inside a step: inference tensors could
    # not be written again outside it (by a cancel, or by a Session's next turn).
    @torch.inference_mode(False)
    def _resize(self, rows: int, min_rows: int, length: int) -> None:
        """Reallocate to `rows` rows (at least min_rows, fewer if the budget says so) of at least
        `length` tokens, rounded up to CHUNK within the budget; the placed rows are copied."""
        padded = self._padded(length)
        if self._bytes(min_rows, padded) <= self.budget:
            length = padded
        rows = max(min_rows, min(rows, self.budget // self._bytes(1, length)))
        c, n = self.cfg, len(self.rows)
        shape = (rows, c.n_kv_head, length, c.head_dim)
        old_k, old_v = self.k, self.v
        # Zeros, not empty: positions past a row's length are masked, but a NaN there would
        # still turn into NaN through attention's weights @ V (0 x NaN).
        self.k = [
            torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(c.n_layer)
        ]
        self.v = [
            torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(c.n_layer)
        ]
        keep = min(length, old_k[0].shape[2]) if old_k else 0
        for new, old in zip((*self.k, *self.v), (*old_k, *old_v), strict=False):
            new[:n, :, :keep] = old[:n, :, :keep]
        self._views = {}

    def view(self, start: int, stop: int, lengths: list[int]) -> KVCache:
        """A KVCache over rows start .. stop-1 (no copy) holding lengths[i] tokens in row i."""
        key = (start, stop)
        if key not in self._views:
            if len(self._views) > 64:  # row ranges seen lately; a few are reused at every step
                self._views = {}
            self._views[key] = (
                [t[start:stop] for t in self.k],
                [t[start:stop] for t in self.v],
            )
        k, v = self._views[key]
        return KVCache.over(k, v, torch.tensor(lengths, dtype=torch.int64, device=self.device))

    def load(self, row: int, cache: KVCache, n: int) -> None:
        """Copy the first n positions of row 0 of `cache` (a Session's) into `row`."""
        for mine, theirs in zip((*self.k, *self.v), (*cache.k, *cache.v), strict=True):
            mine[row, :, :n] = theirs[0, :, :n]

    @torch.inference_mode(False)
    def save(self, row: int, n: int, into: KVCache | None) -> KVCache:
        """Copy the first n positions of `row` into a 1-row cache: `into` if it has room, else a
        new one of the next power of two >= n tokens (within the context). Returns it."""
        if into is None or into.max_len < n or into.k[0].dtype != self.dtype:
            size = min(self.cfg.context_len, next_power_of_two(max(n, 1)))
            into = KVCache(self.cfg, 1, size, device=self.device, dtype=self.dtype)
        for theirs, mine in zip((*into.k, *into.v), (*self.k, *self.v), strict=True):
            theirs[0, :, :n] = mine[row, :, :n]
        into.lengths = torch.full((1,), n, dtype=torch.int64, device=self.device)
        return into
