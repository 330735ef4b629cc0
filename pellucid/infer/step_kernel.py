"""One decode step of a Llama-family model as one numba kernel: every layer in one parallel region.

`forward` runs RMSNorm, the fused q/k/v product, QK-norm and RoPE, the KV-cache write, attention,
the output projection, SwiGLU, the residual adds of every layer, and the final norm, for the new
tokens of each row (decode.FastDecoder calls it once per step; the products are kernels.py's).

How its threads share the work: they all run the same loop over the layers (`_worker`). Each
phase of a layer (a matrix product, the cache writes, attention, SwiGLU) is cut into jobs: a
thread claims the next job from the phase's counter until none is left, then waits until the
phase's second counter says every job is done, and goes on to the next phase. Two atomic
counters per phase are the only synchronisation. A thread that starts late finds phases done and
passes through them, and one thread alone runs every job, so nothing ever waits for a thread that
is not running. A phase's counters are a row of `counters`: jobs claimed at [0], jobs done at
[DONE], 64 bytes apart, so a thread spinning on one does not slow the other's updates.

Why: a parallel region costs ~3.7 us to open and close on an AVX2-only EPYC, and each call from
Python ~12 us with a layer's arrays. The step this replaced made a call per layer with 5 regions
in it (151 regions a step with the head); on SmolLM2 at batch 1 this one region takes 0.93-0.96x
the time of that step (bench/RESULTS.md), and 1.0x at batch 8 (53 ms of products there).
"""

from __future__ import annotations

import platform

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.core.base import BaseContext
from numba.core.typing import Signature
from numba.extending import intrinsic

from pellucid.infer.kernels import _F, _inline, _parallel, _prepare, _rows, _serial

_NO_NORM = np.zeros(0, _F)  # "no norm": a product's input taken as it is

# --- the steps around the products ----------------------------------------------------------------


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


# --- synchronisation: two atomic counters per phase ----------------------------------------------
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
# jobs per thread in a product or SwiGLU phase: claiming is not free (~0.5 us a job with its
# call), and 2 per thread balanced a noisy machine best (SmolLM2 at batch 1, AVX2-only EPYC:
# 1, 2, 4, 8 per thread took 0.92-0.98x, 0.91-0.96x, 0.95-0.97x, 0.99-1.04x the old step)
JOBS_PER_THREAD = 2
DONE = 8
PHASES = 7  # per layer: q/k/v, cache writes, attention, o, gate/up, SwiGLU, down


def _address(
    context: BaseContext, builder: ir.IRBuilder, array_type: types.Array, args: tuple
) -> ir.Value:  # pragma: no cover
    """LLVM pointer to counters[i] for an intrinsic's (counters, i) arguments."""
    a = context.make_array(array_type)(context, builder, args[0])
    return cgutils.get_item_pointer(context, builder, array_type, a, [args[1]])


@intrinsic
def _fetch_add(
    typingctx: object, counters: types.Array, i: types.Integer
) -> tuple:  # pragma: no cover
    """counters[i] += 1 as one atomic step (int64 counters); returns the value before it."""

    def codegen(
        context: BaseContext, builder: ir.IRBuilder, sig: Signature, args: tuple
    ) -> ir.Value:
        one = context.get_constant(types.int64, 1)
        return builder.atomic_rmw(
            "add", _address(context, builder, sig.args[0], args), one, "seq_cst"
        )

    return types.int64(counters, types.intp), codegen


@intrinsic
def _load(typingctx: object, counters: types.Array, i: types.Integer) -> tuple:  # pragma: no cover
    """counters[i], read atomically: what other threads wrote before they counted is visible."""

    def codegen(
        context: BaseContext, builder: ir.IRBuilder, sig: Signature, args: tuple
    ) -> ir.Value:
        return builder.load_atomic(_address(context, builder, sig.args[0], args), "seq_cst", 8)

    return types.int64(counters, types.intp), codegen


@intrinsic
def _pause(typingctx: object) -> tuple:  # pragma: no cover
    """x86's `pause` (a spin-wait hint: the loop yields the core's pipeline, and leaves it without
    a memory-order flush); nothing on other CPUs."""

    def codegen(
        context: BaseContext, builder: ir.IRBuilder, sig: Signature, args: tuple
    ) -> ir.Value:
        if _X86:
            fn = ir.FunctionType(ir.VoidType(), [])
            builder.call(
                cgutils.get_or_insert_function(builder.module, fn, "llvm.x86.sse2.pause"), []
            )
        return context.get_dummy_value()

    return types.none(), codegen


# --- phases: jobs claimed from a counter, then a wait for all of them -----------------------------


@_inline
def _claim(c: np.ndarray, finished: bool) -> int:  # pragma: no cover
    """Count the job this thread just ran as done (if `finished`), then claim the next: its
    index (the phase has none left when it is >= its number of jobs). A phase's loop:
    `i = _claim(c, False)`, `while i < jobs: <job i>; i = _claim(c, True)`, `_wait(c, jobs)`."""
    if finished:
        _fetch_add(c, DONE)
    return _fetch_add(c, 0)


@_inline
def _wait(c: np.ndarray, jobs: int) -> None:  # pragma: no cover
    """Spin until the phase's count of jobs done, c[DONE], reaches jobs."""
    while _load(c, DONE) < jobs:
        _pause()


@_serial
def _product(
    c: np.ndarray,
    mat: tuple,
    x: np.ndarray,
    norm: np.ndarray,
    eps: float,
    out: np.ndarray,
    add: bool,
    jobs: int,
) -> None:  # pragma: no cover
    """A phase: out (+)= rms_norm(x, norm) @ W^T (x as it is if norm is empty), in jobs of output
    rows. The input is prepared once per thread, after its first claim (so x is final by then)."""
    N = mat[1].shape[0]
    jobs = min(jobs, N)
    i = _claim(c, False)
    if i < jobs:
        xn = rms_norm(x, norm, eps) if norm.shape[0] else x
        prep = _prepare(mat, xn)
        while i < jobs:
            _rows(mat, xn, prep, out, add, i * N // jobs, (i + 1) * N // jobs)
            i = _claim(c, True)
    _wait(c, jobs)


@_serial
def _cache_write(
    c: np.ndarray,
    proj: np.ndarray,
    lengths: np.ndarray,
    T: int,
    kbuf: np.ndarray,
    vbuf: np.ndarray,
    cos: np.ndarray,
    sin: np.ndarray,
    k_norm: np.ndarray,
    eps: float,
    H: int,
) -> None:  # pragma: no cover
    """A phase: the new tokens' keys (QK-norm, RoPE) and values into the cache, a job per token.
    proj, lengths, T, kbuf, vbuf: as _attend."""
    KV, D = kbuf.shape[1], kbuf.shape[3]
    M = proj.shape[0]
    r = _claim(c, False)
    while r < M:
        b, pos = r // T, lengths[r // T] + r % T
        for g in range(KV):
            key = proj[r, (H + g) * D : (H + g + 1) * D]
            _head(key, kbuf[b, g, pos], k_norm, eps, cos[pos], sin[pos])
            vbuf[b, g, pos] = proj[r, (H + KV + g) * D : (H + KV + g + 1) * D]
        r = _claim(c, True)
    _wait(c, M)


@_serial
def _attend(
    c: np.ndarray,
    proj: np.ndarray,
    lengths: np.ndarray,
    T: int,
    kbuf: np.ndarray,
    vbuf: np.ndarray,
    cos: np.ndarray,
    sin: np.ndarray,
    q_norm: np.ndarray,
    eps: float,
    H: int,
    out: np.ndarray,
) -> None:  # pragma: no cover
    """A phase: attention of T new tokens per row over the KV cache (written by _cache_write), a
    job per token and query head.

    proj: (B * T, (H + 2 KV) D) the q, k, v projections of each new token (row b's token t is
    proj[b * T + t], at position lengths[b] + t); kbuf, vbuf: (rows >= B, KV, L, D) the layer's
    cache. out (B * T, H * D): softmax(q k^T / sqrt(D)) v per query head, each seeing the
    positions up to its own; query head h reads key/value head h // (H / KV) (grouped-query).
    """
    KV, D = kbuf.shape[1], kbuf.shape[3]
    M = proj.shape[0]
    scale = _F(1.0 / np.sqrt(D))
    q = np.empty(D, _F)
    i = _claim(c, False)
    while i < M * H:
        r, h = i // H, i % H
        b, pos = r // T, lengths[r // T] + r % T
        g = h // (H // KV)
        _head(proj[r, h * D : (h + 1) * D], q, q_norm, eps, cos[pos], sin[pos])
        scores = np.empty(pos + 1, _F)
        top = _F(-np.inf)
        for t in range(pos + 1):
            acc = _F(0.0)
            for e in range(D):
                acc += q[e] * kbuf[b, g, t, e]
            scores[t] = acc * scale
            top = max(top, scores[t])
        total = _F(0.0)
        for t in range(pos + 1):
            scores[t] = np.exp(scores[t] - top)
            total += scores[t]
        y = np.zeros(D, _F)
        for t in range(pos + 1):
            wt = scores[t] / total
            for e in range(D):
                y[e] += wt * vbuf[b, g, t, e]
        out[r, h * D : (h + 1) * D] = y
        i = _claim(c, True)
    _wait(c, M * H)


@_serial
def _swiglu(c: np.ndarray, gu: np.ndarray, act: np.ndarray, jobs: int) -> None:  # pragma: no cover
    """A phase: act (M, F) = silu(gate) * up from gu (M, 2F) = [gate | up], in jobs of columns.
    A job takes whole blocks of 64 columns: where its columns start decides which of them the
    vectorized exp computes and which the scalar one, so aligned jobs give the same bits however
    many there are (unaligned ones differed in the last place)."""
    F = act.shape[1]
    blocks = (F + 63) // 64
    jobs = min(jobs, blocks)
    i = _claim(c, False)
    while i < jobs:
        for r in range(act.shape[0]):
            for e in range(i * blocks // jobs * 64, min((i + 1) * blocks // jobs * 64, F)):
                g = gu[r, e]
                act[r, e] = g / (_F(1.0) + np.exp(-g)) * gu[r, F + e]
        i = _claim(c, True)
    _wait(c, jobs)


@_serial
def _worker(
    x: np.ndarray,
    lengths: np.ndarray,
    T: int,
    k: list,
    v: list,
    cos: np.ndarray,
    sin: np.ndarray,
    eps: float,
    H: int,
    layers: list,
    bufs: tuple,
    counters: np.ndarray,
    jobs: int,
) -> None:  # pragma: no cover
    """What each of forward's threads runs: every layer, phase by phase (the comment above)."""
    proj, y, gu, act = bufs
    for i in range(len(layers)):
        attn_norm, qkv, q_norm, k_norm, o, mlp_norm, gate_up, down = layers[i]
        c = counters[PHASES * i : PHASES * (i + 1)]  # this layer's phases, in order
        _product(c[0], qkv, x, attn_norm, eps, proj, False, jobs)
        _cache_write(c[1], proj, lengths, T, k[i], v[i], cos, sin, k_norm, eps, H)
        _attend(c[2], proj, lengths, T, k[i], v[i], cos, sin, q_norm, eps, H, y)
        _product(c[3], o, y, _NO_NORM, eps, x, True, jobs)
        _product(c[4], gate_up, x, mlp_norm, eps, gu, False, jobs)
        _swiglu(c[5], gu, act, jobs)
        _product(c[6], down, act, _NO_NORM, eps, x, True, jobs)


@_parallel
def forward(
    x: np.ndarray,
    lengths: np.ndarray,
    T: int,
    k: list,
    v: list,
    cos: np.ndarray,
    sin: np.ndarray,
    eps: float,
    H: int,
    layers: list,
    norm: np.ndarray,
    threads: int,
) -> np.ndarray:  # pragma: no cover
    """Pre-norm Llama blocks on the residual stream x (B * T, C), in place, then the final norm:
    returns rms_norm(x, norm) (B * T, C). Each block: x += o(attention(qkv(norm(x))));
    x += down(silu(gate(norm(x))) * up(norm(x))).

    lengths (B,) int64: the tokens each cache row holds (row b's token t sits at lengths[b] + t);
    k, v: typed lists of each layer's cache (rows >= B, KV, L, D), which receive the new keys and
    values; cos, sin: RoPE tables (context, D); layers: a typed list of (attn_norm, qkv, q_norm,
    k_norm, o, mlp_norm, gate_up, down), the matrices in kernel form (qkv and gate_up each one
    fused matrix), norms as (C,) or (D,) weights ((0,): no QK-norm); every layer the same shapes.
    threads: threads(), the parts to run (one _worker each).
    """
    M = x.shape[0]
    qkv, gate_up = layers[0][1], layers[0][6]
    F = gate_up[1].shape[0] // 2
    bufs = (
        np.empty((M, qkv[1].shape[0]), _F),
        np.empty((M, H * k[0].shape[3]), _F),
        np.empty((M, 2 * F), _F),
        np.empty((M, F), _F),
    )
    counters = np.zeros((PHASES * len(layers), 2 * DONE), np.int64)
    for _ in prange(threads):
        _worker(
            x, lengths, T, k, v, cos, sin, eps, H, layers, bufs, counters, JOBS_PER_THREAD * threads
        )
    return rms_norm(x, norm, eps)


def typed_list(items: list) -> numba.typed.List:
    """items (arrays, or tuples of the same types) as one numba typed list: one argument to pass
    however many layers (a tuple of n would compile a kernel per n)."""
    return numba.typed.List(items)
