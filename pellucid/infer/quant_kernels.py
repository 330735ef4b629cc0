"""numba kernels for quant.py: out = x @ W^T with W in q8 or q4 blocks of 32 (see quant.py).

Shapes: x (M, K) float32, out (M, N) float32, blocks of 32 along K; one thread per output row
(or per tile of 4 rows), `prange` over them. Measured on the 2-core CPU (bench/RESULTS.md), for
SmolLM2's 49152 x 576 output head:

- one input row (batch-1 decoding): a single flat loop over K whose block scale is looked up as
  s[n, j >> 5] vectorizes fully; nested per-block loops (a dot per block, then * scale) did not
  and ran 8-10x slower.
- several rows (batched decoding): each tile of 4 weight rows is read and scaled once, then
  serves all M input rows, so the weights are read once per step, not once per sequence.
- q4: x is split beforehand into the halves matching the low and high nibbles (xlo, xhi), so
  the kernel's loads stay contiguous; the block minimum's term m * sum(x) uses block sums of x.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# numba compiles these on first use and caches the machine code next to this file.
_jit = njit(parallel=True, fastmath=True, cache=True)


@_jit
def q8_row(
    q: np.ndarray, s: np.ndarray, x: np.ndarray, out: np.ndarray
) -> None:  # pragma: no cover
    """q (N, K) int8, s (N, K/32) float32, x (1, K): out[0, n] = sum_j q[n, j] s[n, j/32] x[j]."""
    N, K = q.shape
    for n in prange(N):
        acc = np.float32(0.0)
        for j in range(K):
            acc += np.float32(q[n, j]) * x[0, j] * s[n, j >> 5]
        out[0, n] = acc


@_jit
def q8_tiles(
    q: np.ndarray, s: np.ndarray, x: np.ndarray, out: np.ndarray
) -> None:  # pragma: no cover
    """As q8_row for M rows of x; N must be a multiple of 4. Each tile of 4 weight rows is scaled
    to float32 once, then serves every input row (plain float dot products, vectorized)."""
    N, K = q.shape
    M = x.shape[0]
    for t in prange(N // 4):
        n = 4 * t
        w = np.empty((4, K), np.float32)
        for r in range(4):
            for j in range(K):
                w[r, j] = np.float32(q[n + r, j]) * s[n + r, j >> 5]
        for m in range(M):
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for j in range(K):
                xv = x[m, j]
                a0 += w[0, j] * xv
                a1 += w[1, j] * xv
                a2 += w[2, j] * xv
                a3 += w[3, j] * xv
            out[m, n], out[m, n + 1], out[m, n + 2], out[m, n + 3] = a0, a1, a2, a3


@_jit
def q4_rows(
    p: np.ndarray,
    d: np.ndarray,
    mn: np.ndarray,
    xlo: np.ndarray,
    xhi: np.ndarray,
    xsum: np.ndarray,
    out: np.ndarray,
) -> None:  # pragma: no cover
    """p (N, K/2) uint8; d, mn (N, K/32); xlo, xhi (M, K/2) the elements under the low and high
    nibbles; xsum (M, K/32): out[m, n] = sum_b d[n, b] (q . x)_b + mn[n, b] xsum[m, b]."""
    N, H = p.shape
    M, nb = xlo.shape[0], H // 16
    for n in prange(N):
        for m in range(M):
            acc = np.float32(0.0)
            for j in range(H):
                byte = p[n, j]
                acc += d[n, j >> 4] * (
                    np.float32(byte & 15) * xlo[m, j] + np.float32(byte >> 4) * xhi[m, j]
                )
            for b in range(nb):
                acc += mn[n, b] * xsum[m, b]
            out[m, n] = acc
