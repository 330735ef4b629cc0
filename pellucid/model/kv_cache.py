"""KVCache: preallocated keys and values of every layer, with a length per batch row.

Rows advance independently, so prompts of different lengths decode together: the engine prefills
right-padded prompts, then sets each row's true length; padding K/V left behind a row's length is
never attended to (see `prepare`) and is overwritten by that row's next tokens.

    cache = KVCache(cfg, batch_size=2, max_len=128)
    logits = model(ids, cache=cache)      # writes K/V at positions lengths[b] + t
    cache.advance(torch.tensor([5, 3]))   # true prompt lengths; the model never advances it

`KVCache.over` wraps buffers that something else owns (the engine's pool, infer/kv_pool.py): the
model writes through it into those buffers, so a batch of rows can be a slice of a bigger one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pellucid.errors import ConfigError, PellucidError
from pellucid.model.config import ModelConfig


def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes one token's keys and values take in every layer: 2 x n_layer x n_kv_head x head_dim."""
    return 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * dtype.itemsize


class KVCache:
    """Per-layer K/V buffers (B, n_kv_head, max_len, head_dim) and per-row lengths (B,) int64."""

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not 1 <= max_len <= cfg.context_len:
            raise ConfigError(
                f"KV cache max_len must be in [1, context_len={cfg.context_len}], got {max_len}"
            )
        if batch_size < 1:
            raise ConfigError(f"KV cache batch_size must be positive, got {batch_size}")
        self.max_len = max_len
        shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.lengths = torch.zeros(batch_size, dtype=torch.int64, device=device)

    @classmethod
    def over(cls, k: list[Tensor], v: list[Tensor], lengths: Tensor) -> KVCache:
        """A cache over existing per-layer buffers (B, n_kv_head, max_len, head_dim), e.g. views of
        rows of a bigger buffer: nothing is allocated and the model's writes land in them.
        lengths: (B,) int64, the tokens each row already holds."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.lengths = k, v, lengths
        cache.max_len = k[0].shape[2]
        return cache

    @property
    def nbytes(self) -> int:
        """Bytes of the K and V buffers, every layer."""
        return sum(t.nbytes for t in self.k) + sum(t.nbytes for t in self.v)

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def prepare(self, T: int) -> tuple[Tensor, Tensor]:
        """Positions and visibility of T new tokens in every row.

        Returns pos (B, T) int64 = lengths[b] + t, and mask (B, 1, T, S) bool, True where query t
        of row b may see cache position s, i.e. s <= lengths[b] + t. S = max(lengths) + T, so
        attention cost follows the longest row, not max_len. One host sync, for S.
        """
        S = self.check(T)
        pos = self.lengths[:, None] + torch.arange(T, device=self.lengths.device)  # (B, T)
        keys = torch.arange(S, device=pos.device)
        return pos, (keys <= pos[:, :, None]).unsqueeze(1)

    def check(self, T: int) -> int:
        """S = max(lengths) + T, the keys the longest row sees with T new tokens; a one-line
        PellucidError if that does not fit the cache. One host sync."""
        S = int(self.lengths.max()) + T
        if self.max_len < S:
            raise PellucidError(
                f"context length exceeded: {S} tokens do not fit the KV cache of {self.max_len}"
            )
        return S

    def update(
        self, layer: int, k: Tensor, v: Tensor, pos: Tensor, S: int
    ) -> tuple[Tensor, Tensor]:
        """Write `layer`'s new keys/values (B, K, T, D) at positions pos (B, T) (from `prepare`).

        Returns the layer's keys and values over the first S positions: (B, K, S, D) views.
        """
        rows = torch.arange(k.shape[0], device=pos.device)[:, None]  # (B, 1)
        # Advanced indices on dims 0 and 2 around a slice put their (B, T) dims first.
        self.k[layer][rows, :, pos] = k.transpose(1, 2).to(self.k[layer].dtype)  # (B, T, K, D)
        self.v[layer][rows, :, pos] = v.transpose(1, 2).to(self.v[layer].dtype)
        return self.k[layer][:, :, :S], self.v[layer][:, :, :S]

    def advance(self, n: int | Tensor) -> None:
        """Count n more tokens as cached, in every row (int) or per row ((B,) int64)."""
        lengths = self.lengths + n
        low, high = (int(x) for x in torch.aminmax(lengths))
        if high > self.max_len or low < 0:
            raise PellucidError(
                f"cannot advance the KV cache to lengths in [{low}, {high}]: it holds {self.max_len}"
            )
        self.lengths = lengths

    def reset(self) -> None:
        """Forget every row's tokens (the buffers are reused, not freed)."""
        self.lengths.zero_()

    def keep_rows(self, rows: Tensor) -> None:
        """Keep only batch rows `rows` ((N,) int64, in that order), e.g. to drop finished ones."""
        rows = rows.to(self.lengths.device)
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]
        self.lengths = self.lengths.index_select(0, rows)

    def truncate(self, length: int | Tensor) -> None:
        """Roll rows back to at most `length` tokens (int or (B,) int64), e.g. to reuse a prefix."""
        length = torch.as_tensor(length, dtype=torch.int64, device=self.lengths.device)
        if int(length.min()) < 0:
            raise PellucidError(
                f"cannot truncate a KV cache to a negative length ({int(length.min())})"
            )
        self.lengths = torch.minimum(self.lengths, length)
