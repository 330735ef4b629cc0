"""numba kernels for two element-wise ops that torch runs slowly on the CPU: GPT-2's tanh-GELU
and dropout's random masks. layers.py uses them on CPU tensors outside torch.compile.

Measured on 2 AVX2 cores (AMD EPYC, bench/RESULTS.md), per (16, 256, 1536) float32 tensor:
- tanh-GELU: torch 13-26 ms forward (its vectorized tanh is slow there, and the forward does
  not always run in parallel) and 13-15 ms backward, against 5-8 ms for erf-GELU; here 4.5 and 6.
  The function is the same, written as x * sigmoid(2 z) with z = sqrt(2 / pi) (x + 0.044715
  x^3), since (1 + tanh z) / 2 = sigmoid(2 z), and computed from e = exp(-2 |z|): both tails
  keep their relative accuracy, where 0.5 x (1 + tanh z) cancels for negative x. Within 6e-7
  of float64 forward and 5e-7 backward (torch's own float32: 4e-7 and 1e-6).
- Dropout masks: torch.rand draws one float at a time from a serial Mersenne Twister (about 7 ns
  per element here). Here each element takes 32 bits of a counter-based generator, SplitMix64
  over (seed, index), in parallel; the seed comes from torch's generator, so torch.manual_seed
  reproduces the masks, at any thread count.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

_parallel = njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
_inline = njit(inline="always", fastmath=True, error_model="numpy")
_F = np.float32
_U = np.uint64

# --- tanh-GELU -------------------------------------------------------------------------------------

_C = math.sqrt(2.0 / math.pi)
_A = 0.044715
# exp(-r) for 0 <= r <= 0.75 to Taylor order 9 (remainder < 2e-8), raised to the 32nd power by
# squaring: exp(-a) for a <= 24, relative error ~1e-6 (32 roundings' worth)
_CUT = 24.0
_TAYLOR = tuple((-1.0) ** k / math.factorial(k) for k in range(10))


@_inline
def _sigmoid2z(x: float) -> tuple[float, float]:  # pragma: no cover
    """(s, s (1 - s)) for s = sigmoid(2 z), z = sqrt(2/pi) (x + 0.044715 x^3)."""
    z2 = _F(2 * _C) * x * (_F(1.0) + _F(_A) * x * x)
    a = abs(z2)
    r = min(a, _F(_CUT)) * _F(1 / 32)
    p = _F(_TAYLOR[9])
    p = p * r + _F(_TAYLOR[8])
    p = p * r + _F(_TAYLOR[7])
    p = p * r + _F(_TAYLOR[6])
    p = p * r + _F(_TAYLOR[5])
    p = p * r + _F(_TAYLOR[4])
    p = p * r + _F(_TAYLOR[3])
    p = p * r + _F(_TAYLOR[2])
    p = p * r + _F(_TAYLOR[1])
    p = p * r + _F(_TAYLOR[0])
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    e = p * p if a < _F(_CUT) else _F(0.0)  # exp(-2|z|); past the cut it is below 4e-11
    d = _F(1.0) / (_F(1.0) + e)
    return (d if z2 >= 0 else e * d), e * d * d


@_parallel
def _gelu_forward(x: np.ndarray, y: np.ndarray) -> None:  # pragma: no cover
    for i in prange(x.size):
        s, _ = _sigmoid2z(x[i])
        y[i] = x[i] * s


@_parallel
def _gelu_backward(g: np.ndarray, x: np.ndarray, dx: np.ndarray) -> None:  # pragma: no cover
    for i in prange(x.size):
        v = x[i]
        s, ss = _sigmoid2z(v)
        # d/dx x s(2z) = s + x s (1 - s) 2 z'
        dx[i] = g[i] * (s + v * ss * _F(2 * _C) * (_F(1.0) + _F(3 * _A) * v * v))


def _flat(t: Tensor) -> np.ndarray:
    """A contiguous float32 CPU tensor's storage as a 1-D array (no copy)."""
    return t.detach().view(-1).numpy()


def _threads() -> None:
    """numba's thread count follows torch's (torch.set_num_threads), once per call."""
    numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


class GeluTanh(torch.autograd.Function):
    """tanh-GELU on a float32 CPU tensor, forward and backward by the kernels above."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor) -> Tensor:
        x = x.contiguous()
        y = torch.empty_like(x)
        _threads()
        _gelu_forward(_flat(x), _flat(y))
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        grad = grad.contiguous()
        dx = torch.empty_like(x)
        _threads()
        _gelu_backward(_flat(grad), _flat(x), _flat(dx))
        return dx


# --- dropout masks ---------------------------------------------------------------------------------

_GOLDEN = _U(0x9E3779B97F4A7C15)


@_inline
def _splitmix(z: int) -> int:  # pragma: no cover
    """SplitMix64's output function: 64 well-mixed bits from a Weyl-sequence state."""
    z = (z ^ (z >> _U(30))) * _U(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U(27))) * _U(0x94D049BB133111EB)
    return z ^ (z >> _U(31))


@_inline
def _put2(
    seed: int, below: int, scale: float, out: np.ndarray, i: int, m: int
) -> None:  # pragma: no cover
    """out[2 i + j] for j < m: scale where half j of draw i (32 bits) is < below, else 0."""
    w = _splitmix(seed + _U(i + 1) * _GOLDEN)
    for j in range(m):
        out[2 * i + j] = scale if (w >> _U(32 * j)) & _U(0xFFFFFFFF) < below else _F(0.0)


@_parallel
def _keep(seed: int, below: int, scale: float, out: np.ndarray) -> None:  # pragma: no cover
    """Fill out with the mask, 2 elements per 64-bit draw (the last draw may fill one)."""
    n = out.size
    for i in prange(n // 2):
        _put2(seed, below, scale, out, i, 2)
    _put2(seed, below, scale, out, n // 2, n % 2)


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> Tensor:
    """A float32 dropout mask of `shape`: 0 with probability p (to within 2^-32), 1 / (1 - p)
    elsewhere, so x * mask is inverted dropout. Seeded from torch's generator."""
    if torch.compiler.is_compiling():  # numba cannot be traced; inductor fuses this draw
        return torch.rand(shape).ge_(p).mul_(1.0 / (1.0 - p))
    out = torch.empty(shape)
    if p >= 1.0:
        return out.zero_()
    seed = int(torch.randint(0, 2**62, ()))
    _threads()
    # an element is kept when its 32 random bits, as an integer, fall below (1 - p) 2^32
    _keep(_U(seed), _U(round((1.0 - p) * 2**32)), _F(1.0 / (1.0 - p)), _flat(out))
    return out
