"""numba kernels for decoding on the CPU: matrix products over block-quantized weights (the rest
of a decode step, and the step as one kernel, are in step_kernel.py).

Matrices come in "kernel form", one tuple whatever the format (quant.py builds them):

    (kind, a, s, m)    kind Q4: a (N, K/2) uint8, two 4-bit q per byte; w = s * q + m per block
                       kind Q8: a (N, K) int8 viewed as uint8;          w = s * q per block
                       kind F32: a (N, 4K), float32 viewed as uint8;    w as it is
                       s, m (N, K/32) float32 block scales and minimums (1 x 1 unused for F32)

Q4 covers GGUF's Q4_0 (m = -8 s) and Q4_1, Q8 is Q8_0, and F32 anything else exactly
(K-quants dequantized). Activations stay float32 throughout: results equal the dequantized matrix
product up to float rounding.

Q4 bytes, the kernel byte order: in GGUF's layout byte j (0-15) of a block holds element j in
its low nibble and element j + 16 in its high nibble. quant.py reorders each row's bytes once,
at load: the first K/4 bytes are bytes 0-7 of every block, the last K/4 bytes bytes 8-15. Kernel
byte u of the first half is then byte u & 7 of block u >> 3, and u + K/4 its partner 8 bytes on:
a vector of 8 lanes holds one block's half, and two vectors its whole block.

Why the loops look the way they do (measured on AMD EPYCs with and without AVX-512,
bench/RESULTS.md):
- One flat loop over a weight row, reductions into scalars, no stores: LLVM vectorizes it (8
  float lanes: it keeps to 256-bit vectors even compiling for AVX-512 CPUs such as znver4 and
  sapphirerapids, read off the assembly). A loop that also stores, with an index like
  s[n, j >> 5], is not vectorized at all.
- Nibbles are split in float arithmetic: f = byte; hi = floor(f / 16); lo = f - 16 hi. With
  integer `& 15` / `>> 4` numba widens each byte to int64 and the loop runs at half the speed.
- Q4 with one input row: x is split beforehand into the elements under the low and high nibbles
  (x_lo, x_hi) and its block sums, so the block minimum costs m * sum(x) once per block; and
  byte * x_lo + hi * (x_hi - 16 x_lo) = lo * x_lo + hi * x_hi saves computing lo (12-26% faster).
  Each step takes a byte from both halves of one block, so the block's scale multiplies their
  sum once instead of each product (the kernel byte order above), and this loop is a parallel
  kernel of its own: inside the same function as the 4-row loop it gained nothing. On SmolLM2's
  Q4 matrices on an AVX2-only EPYC: 0.80-0.86x the time at one row; decoding 62 -> 76 tokens/s.
  The block minimums ride in the same loop, each of a block's 8 lanes adding m * sum(x) / 8: a
  second loop over the blocks after each row, with its own set-up and sums, made short rows
  (K = 576) 1.6x slower from L1 and 1.17x from memory (one thread).
- Several input rows (batched decoding): each weight is decoded once and serves a group of rows
  (the weights are read from memory once per step, not once per sequence): 4 rows in Q8 and F32,
  8 in Q4 (then 4). Q4 groups read their inputs from a copy in tiles whose 32 streams sit at
  constant offsets (_q4_tiles): at the rows' own strides the 8-row loop needed a register per
  stream and spilled. 8 rows of SmolLM2's Q4 matrices on an AVX2-only EPYC: 0.81-0.87x the time
  of the 4-row loop it replaced.
- Vector width: LLVM picks 8 float lanes for these loops on AVX2 CPUs and on Intel's AVX-512
  ones; for AMD Zen 4 it picks 16 for the row-group loop, and fetches each lane's block scale
  with a gather. 8 rows of SmolLM2's Q4 matrices there took 1.6-1.8x the time of 8-lane code,
  while a batch-1 step ran 8% faster with 16 lanes (the one-row loop compiles the same; the Q8
  output head and the step's other loops gain). quant.prefer_256_bit_vectors asks for 8 lanes
  everywhere; the server, which batches, calls it (bench/RESULTS.md).
- Every product is written for a range of output rows (`_rows`), so it runs two ways: `matmul`
  splits the rows over the threads in one parallel region (`prange`), and step_kernel.forward
  runs a whole decode step in one parallel region, its threads taking ranges of rows as jobs.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

# numba compiles these on first use and caches the machine code next to this file. NumPy's error
# model: a division by zero gives inf/NaN (which the engine reports as NaN logits), not an
# exception from deep inside a kernel. The parallel kernels (the entry points) release the GIL:
# they touch only the arrays they are given, and the server's event loop runs meanwhile (one
# thread runs a model's kernels at a time: the engine's, or the server's scheduler thread).
_parallel = njit(parallel=True, fastmath=True, cache=True, error_model="numpy", nogil=True)
_serial = njit(fastmath=True, cache=True, error_model="numpy")
# inlined into their callers at compile time: constant arguments (a loop count, a flag) fold
_inline = njit(inline="always", fastmath=True, error_model="numpy")

Q4, Q8, F32 = 0, 1, 2  # matrix kinds
_F = np.float32


@_serial
def _q4_inputs(x: np.ndarray) -> np.ndarray:  # pragma: no cover
    """x (M, K) -> (M, 4, K/4): under kernel byte u of a row's first half (block u >> 3, byte
    u & 7), the elements in its low and its high nibble; then the same for the second half."""
    M, Q = x.shape[0], x.shape[1] // 4
    xq = np.empty((M, 4 * Q), _F)
    for r in range(M):
        for b in range(Q // 8):
            _split_block(x, r, b, xq[r], 8 * b, Q)
    return xq.reshape(M, 4, Q)


@_inline
def _split_block(
    x: np.ndarray, r: int, b: int, dst: np.ndarray, c: int, stride: int
) -> None:  # pragma: no cover
    """Block b of row r of x into the 4 parts of _q4_inputs: part k's 8 elements (kernel bytes
    8 b .. 8 b + 7) at dst[c + k stride ..]."""
    e = 32 * b
    for j in range(8):
        dst[c + j] = x[r, e + j]  # low nibbles of bytes 0-7
        dst[c + stride + j] = x[r, e + 16 + j]  # their high nibbles
        dst[c + 2 * stride + j] = x[r, e + 8 + j]  # bytes 8-15: low
        dst[c + 3 * stride + j] = x[r, e + 24 + j]  # and high


@_serial
def _q4_prepare(x: np.ndarray) -> tuple:  # pragma: no cover
    """What a Q4 product reads of x (M, K): (xt, R, lo_a, hi_a, lo_b, hi_b, sums). Rows 0 .. R-1
    (R = M - M % 4) go in groups, their inputs in tiles xt (_q4_tiles); the 1-3 others one at a
    time, each split as _q4_inputs splits it, (M - R, K/4) per part, with the high parts folded
    (f * lo + floor(f / 16) * (hi - 16 lo) = lo * x_lo + hi * x_hi for a byte f, as a float) and
    its block sums (_block_sums)."""
    M = x.shape[0]
    R = M - M % 4  # rows in groups (of 8, then one of 4), the 1-3 others one at a time
    xt = _q4_tiles(x, R) if R else np.empty((0, 32 * STRIDE), _F)
    xq = _q4_inputs(x[R:])  # (M - R, 4, K/4)
    lo_a, lo_b = xq[:, 0].copy(), xq[:, 2].copy()
    hi_a, hi_b = xq[:, 1] - _F(16.0) * lo_a, xq[:, 3] - _F(16.0) * lo_b
    sums = np.empty_like(lo_a)
    for r in range(M - R):
        sums[r] = _block_sums(xq[r])
    return xt, R, lo_a, hi_a, lo_b, hi_b, sums


@_serial
def _q4_rows(
    p: np.ndarray,
    d: np.ndarray,
    m: np.ndarray,
    prep: tuple,
    out: np.ndarray,
    add: bool,
    n0: int,
    n1: int,
) -> None:  # pragma: no cover
    """Output rows n0 .. n1-1 of out (M, N) (+)= x (M, K) @ W^T, W in Q4 blocks p (N, K/2) in the
    kernel byte order (above), d, m (N, K/32); prep: _q4_prepare(x)."""
    xt, R, lo_a, hi_a, lo_b, hi_b, sums = prep
    if R:
        _q4_groups(p, d, m, xt, out, add, R, n0, n1)
    for r in range(lo_a.shape[0]):
        _q4_row(p, d, m, lo_a[r], hi_a[r], lo_b[r], hi_b[r], sums[r], out[R + r], add, n0, n1)


# Row groups read their inputs in tiles of TILE kernel bytes per half (4 TILE weights), each of
# a group's 32 input streams (8 rows x the 4 parts of _q4_inputs) STRIDE floats after the last:
# constants, so one register addresses all 32 (fixed offsets). With the streams at the rows' own
# runtime strides LLVM ran out of registers for their addresses and reloaded 7 from the stack at
# every step. STRIDE = TILE + 8 staggers the streams across cache sets. TILE is a multiple of 8:
# a tile holds whole blocks, so its scales start at d[n, t TILE / 8].
TILE = 128
STRIDE = TILE + 8


@_serial
def _q4_tiles(x: np.ndarray, R: int) -> np.ndarray:  # pragma: no cover
    """Rows 0 .. R-1 of x (M, K), R a multiple of 4, split as _q4_inputs splits a row and laid
    out in tiles: (G * T, 32 STRIDE) with row group g (rows 8 g .. 8 g + 7, the last maybe 4) in
    tile t (kernel bytes t TILE ..) at row g T + t, and its row r's part k at columns
    (4 r + k) STRIDE + u. Copied a block at a time: block b's 8 bytes of each half are kernel
    bytes 8 b .. 8 b + 7, in one tile (TILE is a multiple of 8)."""
    Q = x.shape[1] // 4
    T = (Q + TILE - 1) // TILE
    xt = np.empty(((R + 7) // 8 * T, 32 * STRIDE), _F)
    for i in range(R):
        for b in range(Q // 8):
            u = 8 * b
            c = 4 * (i % 8) * STRIDE + u % TILE
            _split_block(x, i, b, xt[i // 8 * T + u // TILE], c, STRIDE)
    return xt


@_serial
def _q4_groups(
    p: np.ndarray,
    d: np.ndarray,
    m: np.ndarray,
    xt: np.ndarray,
    out: np.ndarray,
    add: bool,
    R: int,
    n0: int,
    n1: int,
) -> None:  # pragma: no cover
    """Input rows 0 .. R-1 of _q4_rows, R a multiple of 4, 8 per pass (4 in the last if R % 8):
    each weight is decoded once for all of them. xt: the rows' inputs from _q4_tiles."""
    for n in range(n0, n1):
        for g in range(R // 8):
            _put(out, 8 * g, n, _q4_group(p, d, m, xt, n, g, True), 8, add)
        if R % 8:
            _put(out, R - 4, n, _q4_group(p, d, m, xt, n, R // 8, False), 4, add)


@_inline
def _q4_group(
    p: np.ndarray, d: np.ndarray, m: np.ndarray, xt: np.ndarray, n: int, g: int, eight: bool
) -> tuple:  # pragma: no cover
    """Weight row n times row group g (8 rows, or 4 without `eight`): the 8 sums (4 unused without
    `eight`). Whole tiles run a loop of TILE steps (a constant count), the last partial tile its
    own."""
    Q = p.shape[1] // 2
    T = (Q + TILE - 1) // TILE
    acc = (_F(0.0), _F(0.0), _F(0.0), _F(0.0), _F(0.0), _F(0.0), _F(0.0), _F(0.0))
    for t in range(T):
        o = t * TILE
        pa, pb, dn, mn = p[n, o:], p[n, Q + o :], d[n, o >> 3 :], m[n, o >> 3 :]
        if o + TILE <= Q:
            acc = _q4_tile(pa, pb, dn, mn, xt[g * T + t], TILE, acc, eight)
        else:
            acc = _q4_tile(pa, pb, dn, mn, xt[g * T + t], Q - o, acc, eight)
    return acc


@_inline
def _q4_tile(
    pa: np.ndarray,
    pb: np.ndarray,
    dn: np.ndarray,
    mn: np.ndarray,
    xi: np.ndarray,
    L: int,
    acc: tuple,
    eight: bool,
) -> tuple:  # pragma: no cover
    """acc (8 rows' sums) + L kernel bytes of one tile: each byte pair's 4 weights decoded once,
    times rows 0-3 of the group and, with `eight`, rows 4-7."""
    lo = (acc[0], acc[1], acc[2], acc[3])
    hi = (acc[4], acc[5], acc[6], acc[7])
    for u in range(L):
        fa, fb = _F(pa[u]), _F(pb[u])
        ha, hb = np.floor(fa * _F(0.0625)), np.floor(fb * _F(0.0625))
        la, lb = fa - _F(16.0) * ha, fb - _F(16.0) * hb
        dj, mj = dn[u >> 3], mn[u >> 3]
        w = (la * dj + mj, ha * dj + mj, lb * dj + mj, hb * dj + mj)
        lo = _dot4(w, xi, 0, u, lo)
        if eight:
            hi = _dot4(w, xi, 16 * STRIDE, u, hi)
    return (lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3])


@_inline
def _dot4(w: tuple, xi: np.ndarray, c: int, u: int, acc: tuple) -> tuple:  # pragma: no cover
    """acc (4 rows) + the 4 weights w times each row's 4 parts; row r's part k at xi[c + (4 r + k)
    STRIDE + u]."""
    S = STRIDE
    return (
        acc[0] + w[0] * xi[c + u] + w[1] * xi[c + S + u]
        + w[2] * xi[c + 2 * S + u] + w[3] * xi[c + 3 * S + u],
        acc[1] + w[0] * xi[c + 4 * S + u] + w[1] * xi[c + 5 * S + u]
        + w[2] * xi[c + 6 * S + u] + w[3] * xi[c + 7 * S + u],
        acc[2] + w[0] * xi[c + 8 * S + u] + w[1] * xi[c + 9 * S + u]
        + w[2] * xi[c + 10 * S + u] + w[3] * xi[c + 11 * S + u],
        acc[3] + w[0] * xi[c + 12 * S + u] + w[1] * xi[c + 13 * S + u]
        + w[2] * xi[c + 14 * S + u] + w[3] * xi[c + 15 * S + u],
    )  # fmt: skip


@_serial
def _block_sums(xq: np.ndarray) -> np.ndarray:  # pragma: no cover
    """One row of _q4_inputs (4, Q) -> (Q,): at kernel byte u, an eighth of the sum of the 32
    elements of its block u >> 3 (the 8 lanes of a block add up to the whole sum)."""
    s = np.empty(xq.shape[1], _F)
    for b in range(xq.shape[1] // 8):
        total = _F(0.0)
        for u in range(8 * b, 8 * b + 8):
            total += xq[0, u] + xq[1, u] + xq[2, u] + xq[3, u]
        s[8 * b : 8 * b + 8] = total * _F(0.125)
    return s


@_serial
def _q4_row(
    p: np.ndarray,
    d: np.ndarray,
    m: np.ndarray,
    lo_a: np.ndarray,
    hi_a: np.ndarray,
    lo_b: np.ndarray,
    hi_b: np.ndarray,
    xsum: np.ndarray,
    out: np.ndarray,
    add: bool,
    n0: int,
    n1: int,
) -> None:  # pragma: no cover
    """One input row of _q4_rows: out[n0:n1] (+)= W[n0:n1] x, x split as _q4_prepare prepares it."""
    Q = p.shape[1] // 2
    for n in range(n0, n1):
        acc = _F(0.0)
        for u in range(Q):  # one block per 8 lanes: its scale multiplies both halves' sum
            fa, fb = _F(p[n, u]), _F(p[n, Q + u])
            acc += d[n, u >> 3] * (
                fa * lo_a[u] + np.floor(fa * _F(0.0625)) * hi_a[u]
                + fb * lo_b[u] + np.floor(fb * _F(0.0625)) * hi_b[u]
            ) + m[n, u >> 3] * xsum[u]  # fmt: skip
        out[n] = out[n] + acc if add else acc


@_serial
def _q8_rows(
    q: np.ndarray, s: np.ndarray, x: np.ndarray, out: np.ndarray, add: bool, n0: int, n1: int
) -> None:  # pragma: no cover
    """Output rows n0 .. n1-1 of out (M, N) (+)= x (M, K) @ W^T with W = s * q, q (N, K) int8,
    s (N, K/32)."""
    M, K = x.shape[0], q.shape[1]
    M4 = M - M % 4
    for n in range(n0, n1):
        for g in range(0, M4, 4):
            a0 = a1 = a2 = a3 = _F(0.0)
            for j in range(K):
                w = _F(q[n, j]) * s[n, j >> 5]
                a0 += w * x[g, j]
                a1 += w * x[g + 1, j]
                a2 += w * x[g + 2, j]
                a3 += w * x[g + 3, j]
            _put(out, g, n, (a0, a1, a2, a3), 4, add)
        for r in range(M4, M):
            acc = _F(0.0)
            for j in range(K):
                acc += _F(q[n, j]) * x[r, j] * s[n, j >> 5]
            out[r, n] = out[r, n] + acc if add else acc


@_serial
def _f32_rows(
    w: np.ndarray, x: np.ndarray, out: np.ndarray, add: bool, n0: int, n1: int
) -> None:  # pragma: no cover
    """Output rows n0 .. n1-1 of out (M, N) (+)= x (M, K) @ w^T, w (N, K) float32."""
    M, K = x.shape[0], w.shape[1]
    M4 = M - M % 4
    for n in range(n0, n1):
        for g in range(0, M4, 4):
            a0 = a1 = a2 = a3 = _F(0.0)
            for j in range(K):
                a0 += w[n, j] * x[g, j]
                a1 += w[n, j] * x[g + 1, j]
                a2 += w[n, j] * x[g + 2, j]
                a3 += w[n, j] * x[g + 3, j]
            _put(out, g, n, (a0, a1, a2, a3), 4, add)
        for r in range(M4, M):
            acc = _F(0.0)
            for j in range(K):
                acc += w[n, j] * x[r, j]
            out[r, n] = out[r, n] + acc if add else acc


@_serial
def _put(out: np.ndarray, r: int, n: int, a: tuple, k: int, add: bool) -> None:  # pragma: no cover
    """out[r + j, n] (+)= a[j] for the first k sums of a."""
    for j in range(k):
        out[r + j, n] = a[j] + out[r + j, n] if add else a[j]


@_serial
def _prepare(mat: tuple, x: np.ndarray) -> tuple:  # pragma: no cover
    """What a product with this matrix reads besides x: _q4_prepare(x) for Q4, nothing (empty
    arrays of the same types) for the others."""
    if mat[0] == Q4:
        return _q4_prepare(x)
    none = np.empty((0, 0), _F)
    return np.empty((0, 32 * STRIDE), _F), 0, none, none, none, none, none


@_serial
def _rows(
    mat: tuple, x: np.ndarray, prep: tuple, out: np.ndarray, add: bool, n0: int, n1: int
) -> None:  # pragma: no cover
    """Output rows n0 .. n1-1 of out (M, N) = x (M, K) @ W^T (+ out with add), for a matrix in
    kernel form (kind, a, s, m); prep: _prepare(mat, x)."""
    kind, a, s, m = mat
    if kind == Q4:
        _q4_rows(a, s, m, prep, out, add, n0, n1)
    elif kind == Q8:
        _q8_rows(a.view(np.int8), s, x, out, add, n0, n1)
    else:
        _f32_rows(a.view(np.float32), x, out, add, n0, n1)


def threads() -> int:
    """How many parts the kernels split their work into: numba's thread pool size (an attribute
    read; numba.get_num_threads() takes ~2 us from Python, and a kernel that calls it is not
    cached). Fewer live threads (numba.set_num_threads) each run several parts."""
    return numba.config.NUMBA_NUM_THREADS


def matmul(mat: tuple, x: np.ndarray, out: np.ndarray, add: bool) -> None:
    """out (M, N) = x (M, K) @ W^T (+ out with add) for a matrix in kernel form (kind, a, s, m)."""
    _matmul(mat, x, out, add, threads())


@_parallel
def _matmul(
    mat: tuple, x: np.ndarray, out: np.ndarray, add: bool, threads: int
) -> None:  # pragma: no cover
    """matmul, one range of output rows per part (threads()). Each part prepares x itself:
    passing one prepared tuple into the parallel region cost more. Each _rows call costs ~0.4
    us: 64 ranges instead of 2 took 1.2x the time of SmolLM2's down projection at one row."""
    N = mat[1].shape[0]
    for i in prange(threads):
        _prepared_rows(mat, x, out, add, i * N // threads, (i + 1) * N // threads)


@_serial
def _prepared_rows(
    mat: tuple, x: np.ndarray, out: np.ndarray, add: bool, n0: int, n1: int
) -> None:  # pragma: no cover
    """_rows n0 .. n1-1 with x prepared here."""
    _rows(mat, x, _prepare(mat, x), out, add, n0, n1)
