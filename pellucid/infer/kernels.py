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
- Several input rows (batched decoding): in groups of 4, each weight is decoded once and serves
  all 4 rows (the weights are read from memory once per step, not once per sequence).
- Each kernel runs `prange` over output rows: one parallel region per matrix product (Q4 with
  several input rows: one for the groups of 4, then one per row left over).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# numba compiles these on first use and caches the machine code next to this file. NumPy's error
# model: a division by zero gives inf/NaN (which the engine reports as NaN logits), not an
# exception from deep inside a kernel.
_parallel = njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
_serial = njit(fastmath=True, cache=True, error_model="numpy")

Q4, Q8, F32 = 0, 1, 2  # matrix kinds
_F = np.float32


@_serial
def _q4_inputs(x: np.ndarray) -> np.ndarray:  # pragma: no cover
    """x (M, K) -> (M, 4, K/4): under kernel byte u of a row's first half (block u >> 3, byte
    u & 7), the elements in its low and its high nibble; then the same for the second half."""
    M, Q = x.shape[0], x.shape[1] // 4
    xq = np.empty((M, 4, Q), _F)
    for r in range(M):
        for u in range(Q):
            e = 32 * (u >> 3) + (u & 7)
            xq[r, 0, u], xq[r, 1, u] = x[r, e], x[r, e + 16]
            xq[r, 2, u], xq[r, 3, u] = x[r, e + 8], x[r, e + 24]
    return xq


@_serial
def q4_matmul(
    p: np.ndarray, d: np.ndarray, m: np.ndarray, x: np.ndarray, out: np.ndarray, add: bool
) -> None:  # pragma: no cover
    """out (M, N) = x (M, K) @ W^T, or += with add; W in Q4 blocks p (N, K/2) in the kernel byte
    order (above), d, m (N, K/32)."""
    xq = _q4_inputs(x)
    M4 = x.shape[0] - x.shape[0] % 4
    if M4:
        _q4_groups(p, d, m, xq, out, add, M4)
    for r in range(M4, x.shape[0]):
        # f * lo + floor(f / 16) * (hi - 16 lo) = lo * x_lo + hi * x_hi for a byte f (a float)
        lo_a, lo_b = xq[r, 0], xq[r, 2]
        hi_a, hi_b = xq[r, 1] - _F(16.0) * lo_a, xq[r, 3] - _F(16.0) * lo_b
        xsum = np.zeros(d.shape[1], _F)
        for u in range(lo_a.shape[0]):
            xsum[u >> 3] += xq[r, 0, u] + xq[r, 1, u] + xq[r, 2, u] + xq[r, 3, u]
        _q4_row(p, d, m, lo_a, hi_a, lo_b, hi_b, xsum, out[r], add)


@_parallel
def _q4_groups(
    p: np.ndarray, d: np.ndarray, m: np.ndarray, xq: np.ndarray, out: np.ndarray, add: bool, M4: int
) -> None:  # pragma: no cover
    """Rows 0 .. M4-1 of q4_matmul, 4 input rows per pass: each weight decoded once for them."""
    Q = p.shape[1] // 2
    for n in prange(p.shape[0]):
        for g in range(0, M4, 4):
            a0 = a1 = a2 = a3 = _F(0.0)
            for u in range(Q):
                fa, fb = _F(p[n, u]), _F(p[n, Q + u])
                ha, hb = np.floor(fa * _F(0.0625)), np.floor(fb * _F(0.0625))
                la, lb = fa - _F(16.0) * ha, fb - _F(16.0) * hb
                dj, mj = d[n, u >> 3], m[n, u >> 3]
                w0, w1, w2, w3 = la * dj + mj, ha * dj + mj, lb * dj + mj, hb * dj + mj
                a0 += w0 * xq[g, 0, u] + w1 * xq[g, 1, u] + w2 * xq[g, 2, u] + w3 * xq[g, 3, u]
                a1 += (
                    w0 * xq[g + 1, 0, u] + w1 * xq[g + 1, 1, u]
                    + w2 * xq[g + 1, 2, u] + w3 * xq[g + 1, 3, u]
                )  # fmt: skip
                a2 += (
                    w0 * xq[g + 2, 0, u] + w1 * xq[g + 2, 1, u]
                    + w2 * xq[g + 2, 2, u] + w3 * xq[g + 2, 3, u]
                )  # fmt: skip
                a3 += (
                    w0 * xq[g + 3, 0, u] + w1 * xq[g + 3, 1, u]
                    + w2 * xq[g + 3, 2, u] + w3 * xq[g + 3, 3, u]
                )  # fmt: skip
            _put4(out, g, n, a0, a1, a2, a3, add)


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
    """One input row of q4_matmul: out (N,) (+)= W x, x split as q4_matmul prepares it."""
    Q = p.shape[1] // 2
    for n in prange(p.shape[0]):
        acc = _F(0.0)
        for u in range(Q):  # one block per 8 lanes: its scale multiplies both halves' sum
            fa, fb = _F(p[n, u]), _F(p[n, Q + u])
            acc += d[n, u >> 3] * (
                fa * lo_a[u] + np.floor(fa * _F(0.0625)) * hi_a[u]
                + fb * lo_b[u] + np.floor(fb * _F(0.0625)) * hi_b[u]
            )  # fmt: skip
        for b in range(d.shape[1]):
            acc += m[n, b] * xsum[b]
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
            _put4(out, g, n, a0, a1, a2, a3, add)
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
            _put4(out, g, n, a0, a1, a2, a3, add)
        for r in range(M4, M):
            acc = _F(0.0)
            for j in range(K):
                acc += w[n, j] * x[r, j]
            out[r, n] = out[r, n] + acc if add else acc


@_serial
def _put4(
    out: np.ndarray, g: int, n: int, a0: float, a1: float, a2: float, a3: float, add: bool
) -> None:  # pragma: no cover
    if add:
        a0, a1, a2, a3 = a0 + out[g, n], a1 + out[g + 1, n], a2 + out[g + 2, n], a3 + out[g + 3, n]
    out[g, n], out[g + 1, n], out[g + 2, n], out[g + 3, n] = a0, a1, a2, a3


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
