"""numba kernels for decoding on the CPU: matrix products over block-quantized weights, and the
small per-layer steps around them (RMSNorm, RoPE + KV-cache write + attention, SwiGLU).

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
- Each kernel runs `prange` over output rows: one parallel region per matrix product (Q4 with
  several input rows: one for the groups, then one per row left over).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# numba compiles these on first use and caches the machine code next to this file. NumPy's error
# model: a division by zero gives inf/NaN (which the engine reports as NaN logits), not an
# exception from deep inside a kernel.
_parallel = njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
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
def q4_matmul(
    p: np.ndarray, d: np.ndarray, m: np.ndarray, x: np.ndarray, out: np.ndarray, add: bool
) -> None:  # pragma: no cover
    """out (M, N) = x (M, K) @ W^T, or += with add; W in Q4 blocks p (N, K/2) in the kernel byte
    order (above), d, m (N, K/32)."""
    M = x.shape[0]
    R = M - M % 4  # rows in groups (of 8, then one of 4), the 1-3 others one at a time
    if R:
        _q4_groups(p, d, m, _q4_tiles(x, R), out, add, R)
    xq = _q4_inputs(x[R:])
    for r in range(M - R):
        # f * lo + floor(f / 16) * (hi - 16 lo) = lo * x_lo + hi * x_hi for a byte f (a float)
        lo_a, lo_b = xq[r, 0], xq[r, 2]
        hi_a, hi_b = xq[r, 1] - _F(16.0) * lo_a, xq[r, 3] - _F(16.0) * lo_b
        _q4_row(p, d, m, lo_a, hi_a, lo_b, hi_b, _block_sums(xq[r]), out[R + r], add)


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


@_parallel
def _q4_groups(
    p: np.ndarray, d: np.ndarray, m: np.ndarray, xt: np.ndarray, out: np.ndarray, add: bool, R: int
) -> None:  # pragma: no cover
    """Rows 0 .. R-1 of q4_matmul, R a multiple of 4, 8 input rows per pass (4 in the last if R %
    8): each weight is decoded once for all of them. xt: the rows' inputs from _q4_tiles."""
    for n in prange(p.shape[0]):
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


@_parallel
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
) -> None:  # pragma: no cover
    """One input row of q4_matmul: out (N,) (+)= W x, x split as q4_matmul prepares it; xsum:
    _block_sums."""
    Q = p.shape[1] // 2
    for n in prange(p.shape[0]):
        acc = _F(0.0)
        for u in range(Q):  # one block per 8 lanes: its scale multiplies both halves' sum
            fa, fb = _F(p[n, u]), _F(p[n, Q + u])
            acc += d[n, u >> 3] * (
                fa * lo_a[u] + np.floor(fa * _F(0.0625)) * hi_a[u]
                + fb * lo_b[u] + np.floor(fb * _F(0.0625)) * hi_b[u]
            ) + m[n, u >> 3] * xsum[u]  # fmt: skip
        out[n] = out[n] + acc if add else acc


@_parallel
def q8_matmul(
    q: np.ndarray, s: np.ndarray, x: np.ndarray, out: np.ndarray, add: bool
) -> None:  # pragma: no cover
    """out (M, N) (+)= x (M, K) @ W^T with W = s * q, q (N, K) int8, s (N, K/32)."""
    M, N, K = x.shape[0], q.shape[0], q.shape[1]
    M4 = M - M % 4
    for n in prange(N):
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


@_parallel
def f32_matmul(
    w: np.ndarray, x: np.ndarray, out: np.ndarray, add: bool
) -> None:  # pragma: no cover
    """out (M, N) (+)= x (M, K) @ w^T, w (N, K) float32."""
    M, N, K = x.shape[0], w.shape[0], w.shape[1]
    M4 = M - M % 4
    for n in prange(N):
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
def matmul(mat: tuple, x: np.ndarray, out: np.ndarray, add: bool) -> None:  # pragma: no cover
    """out (M, N) = x (M, K) @ W^T (+ out with add) for a matrix in kernel form (kind, a, s, m)."""
    kind, a, s, m = mat
    if kind == Q4:
        q4_matmul(a, s, m, x, out, add)
    elif kind == Q8:
        q8_matmul(a.view(np.int8), s, x, out, add)
    else:
        f32_matmul(a.view(np.float32), x, out, add)


# --- one decoding layer ---------------------------------------------------------------------------


@_serial
def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:  # pragma: no cover
    """(M, C) -> (M, C): x / sqrt(mean(x^2) + eps) * w, row by row (nn.RMSNorm)."""
    out = np.empty_like(x)
    for r in range(x.shape[0]):
        ss = _F(0.0)
        for i in range(x.shape[1]):
            ss += x[r, i] * x[r, i]
        inv = _F(1.0) / np.sqrt(ss / _F(x.shape[1]) + _F(eps))
        for i in range(x.shape[1]):
            out[r, i] = x[r, i] * inv * w[i]
    return out


@_serial
def _head(
    src: np.ndarray, dst: np.ndarray, norm: np.ndarray, eps: float, cos: np.ndarray, sin: np.ndarray
) -> None:  # pragma: no cover
    """One query or key head (D,): QK-norm if `norm` has weights, then RoPE, into dst (rotate-half
    pairs (i, i + D/2); the cos/sin rows repeat their first half, see layers.rope_tables)."""
    D, half = src.shape[0], src.shape[0] // 2
    v = src.copy()
    if norm.shape[0]:
        ss = _F(0.0)
        for i in range(D):
            ss += v[i] * v[i]
        v *= norm / np.sqrt(ss / _F(D) + _F(eps))
    for i in range(half):
        x1, x2 = v[i], v[i + half]
        dst[i] = x1 * cos[i] - x2 * sin[i]
        dst[i + half] = x2 * cos[i + half] + x1 * sin[i + half]


@_parallel
def attention(
    proj: np.ndarray,
    lengths: np.ndarray,
    T: int,
    kbuf: np.ndarray,
    vbuf: np.ndarray,
    cos: np.ndarray,
    sin: np.ndarray,
    q_norm: np.ndarray,
    k_norm: np.ndarray,
    eps: float,
    H: int,
) -> np.ndarray:  # pragma: no cover
    """Attention of T new tokens per row over the KV cache, which receives their keys and values.

    proj: (B * T, (H + 2 KV) D) the q, k, v projections of each new token (row b's token t is
    proj[b * T + t], at position lengths[b] + t); kbuf, vbuf: (rows >= B, KV, L, D) the layer's
    cache. Returns (B * T, H * D): softmax(q k^T / sqrt(D)) v per query head, each seeing the
    positions up to its own; query head h reads key/value head h // (H / KV) (grouped-query).
    """
    KV, D = kbuf.shape[1], kbuf.shape[3]
    M = proj.shape[0]
    q = np.empty((M, H, D), _F)
    for r in range(M):  # normalize and rotate; keys and values go straight into the cache
        b, pos = r // T, lengths[r // T] + r % T
        for h in range(H):
            _head(proj[r, h * D : (h + 1) * D], q[r, h], q_norm, eps, cos[pos], sin[pos])
        for g in range(KV):
            _head(
                proj[r, (H + g) * D : (H + g + 1) * D],
                kbuf[b, g, pos],
                k_norm,
                eps,
                cos[pos],
                sin[pos],
            )
            vbuf[b, g, pos] = proj[r, (H + KV + g) * D : (H + KV + g + 1) * D]
    out = np.empty((M, H * D), _F)
    scale = _F(1.0 / np.sqrt(D))
    for i in prange(M * H):
        r, h = i // H, i % H
        b, S = r // T, lengths[r // T] + r % T + 1
        g = h // (H // KV)
        scores = np.empty(S, _F)
        top = _F(-np.inf)
        for t in range(S):
            acc = _F(0.0)
            for e in range(D):
                acc += q[r, h, e] * kbuf[b, g, t, e]
            scores[t] = acc * scale
            top = max(top, scores[t])
        total = _F(0.0)
        for t in range(S):
            scores[t] = np.exp(scores[t] - top)
            total += scores[t]
        y = np.zeros(D, _F)
        for t in range(S):
            wt = scores[t] / total
            for e in range(D):
                y[e] += wt * vbuf[b, g, t, e]
        out[r, h * D : (h + 1) * D] = y
    return out


@_serial
def block(
    x: np.ndarray,
    lengths: np.ndarray,
    T: int,
    kbuf: np.ndarray,
    vbuf: np.ndarray,
    cos: np.ndarray,
    sin: np.ndarray,
    eps: float,
    H: int,
    w: tuple,
) -> None:  # pragma: no cover
    """One pre-norm Llama block on the residual stream x (B * T, C), in place:
    x += o(attention(qkv(norm(x)))); x += down(silu(gate(norm(x))) * up(norm(x))).

    w: (attn_norm, qkv, q_norm, k_norm, o, mlp_norm, gate_up, down), the matrices in kernel form
    (qkv and gate_up each one fused matrix), norms as (C,) or (D,) weights ((0,): no QK-norm).
    """
    attn_norm, qkv, q_norm, k_norm, o, mlp_norm, gate_up, down = w
    M = x.shape[0]
    proj = np.empty((M, qkv[1].shape[0]), _F)
    matmul(qkv, rms_norm(x, attn_norm, eps), proj, False)
    y = attention(proj, lengths, T, kbuf, vbuf, cos, sin, q_norm, k_norm, eps, H)
    matmul(o, y, x, True)
    F = gate_up[1].shape[0] // 2
    gu = np.empty((M, 2 * F), _F)
    matmul(gate_up, rms_norm(x, mlp_norm, eps), gu, False)
    act = np.empty((M, F), _F)
    for r in range(M):
        for i in range(F):
            g = gu[r, i]
            act[r, i] = g / (_F(1.0) + np.exp(-g)) * gu[r, F + i]  # silu(gate) * up
    matmul(down, act, x, True)
