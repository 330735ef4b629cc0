"""Weight-only quantization for fast CPU decoding: int8 and 4-bit blocks, with numba kernels.

Decoding one token reads every weight once, so on a CPU its speed is set by bytes, not FLOPs:
SmolLM2-135M reads 538 MB per token in float32, 143 MB with 8-bit blocks and 85 MB with 4-bit
blocks. PyTorch's stock int8/int4 CPU kernels are slower than its float32 matmul at batch 1
(see bench/RESULTS.md), so the matrix-vector products here are small numba kernels that read
the packed blocks directly and run near the memory bandwidth.

Formats (both cut each weight row into blocks of 32, as llama.cpp's Q8_0 and Q4_1 do):

    q8  (Q8_0-like): w = s * q,      q int8 in [-127, 127], s = max|w| / 127 per block
    q4  (Q4_1-like): w = d * q + m,  q in [0, 15] (two per byte), m = min w, d = (max - min) / 15

A GGUF's Q4_1 weights requantized to q4 give back the same blocks (each block's min and max are
representable), so `--quant q4` on the shipped SmolLM2 file runs the very weights it was
published with.

    >>> quantize_model(model, "q8")          # swaps each nn.Linear for a QuantLinear, in place
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pellucid.errors import ConfigError

log = logging.getLogger("pellucid")

BLOCK = 32
Quant = Literal["q8", "q4"]
MODES = ("auto", "fp32", "q8", "q4")  # auto: q8 where it applies, else fp32
_MATVEC_ROWS = 16  # up to this many input rows use the kernels; more (prefill) dequantize + BLAS


def _kernels() -> ModuleType:
    """The numba kernels, imported on first use so that `pellucid --help` starts fast."""
    from pellucid.infer import quant_kernels

    return quant_kernels


# --- packing ----------------------------------------------------------------------------------------


def pack_q8(w: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """w (N, K) float -> q (N, K) int8, s (N, K/32) float32 with w ~ s * q per block of 32."""
    N, K = w.shape
    blocks = w.detach().float().reshape(N, K // BLOCK, BLOCK)
    s = blocks.abs().amax(-1) / 127  # (N, K/32)
    q = torch.round(blocks / torch.where(s == 0, 1.0, s)[..., None]).clamp_(-127, 127)
    return q.to(torch.int8).reshape(N, K).numpy(), s.numpy()


def pack_q4(w: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w (N, K) float -> packed (N, K/2) uint8, d and m (N, K/32) float32: w ~ d * q + m.

    Byte j of a block holds element j (low nibble) and element j + 16 (high nibble), GGUF's layout.
    """
    N, K = w.shape
    blocks = w.detach().float().reshape(N, K // BLOCK, BLOCK)
    lo, hi = blocks.amin(-1), blocks.amax(-1)  # (N, K/32)
    d = (hi - lo) / 15
    q = torch.round((blocks - lo[..., None]) / torch.where(d == 0, 1.0, d)[..., None]).clamp_(0, 15)
    q = q.to(torch.uint8)
    packed = q[..., :16] | (q[..., 16:] << 4)  # (N, K/32, 16)
    return packed.reshape(N, K // 2).numpy(), d.numpy(), lo.numpy()


# --- the layer ----------------------------------------------------------------------------------


class QuantLinear(nn.Module):
    """y = x W^T (+ b) with W stored as q8 or q4 blocks; x (..., K) float32 -> (..., N) float32.

    Few rows (decoding: one per sequence) go through the numba kernel, which reads each packed
    weight row once for all input rows; many rows (prefill) dequantize the matrix and use BLAS,
    where the arithmetic, not the weight bytes, is the cost.
    """

    def __init__(self, linear: nn.Linear | list[nn.Linear], mode: Quant) -> None:
        super().__init__()
        parts = linear if isinstance(linear, list) else [linear]  # several: one fused matrix
        weight = torch.cat([p.weight.detach() for p in parts])
        N, K = weight.shape
        if K % BLOCK:
            raise ConfigError(f"cannot quantize a {N}x{K} weight: {K} is not a multiple of {BLOCK}")
        self.mode, self.in_features, self.out_features = mode, K, N
        self.packed = pack_q8(weight) if mode == "q8" else pack_q4(weight)
        biases = [p.bias for p in parts]
        has_bias = any(b is not None for b in biases)
        self.bias = (
            torch.cat(
                [
                    torch.zeros(p.out_features) if b is None else b.detach().float()
                    for p, b in zip(parts, biases, strict=True)
                ]
            )
            if has_bias
            else None
        )
        self._last: tuple[Tensor, Tensor] | None = None  # (input, output) for FusedPart
        # what Transformer.num_params counts for this layer (its weights are numpy blocks)
        self.n_weights = N * K + (0 if self.bias is None else N)

    def shared(self, x: Tensor) -> Tensor:
        """forward(x), computed once for the parts of a fused matrix that all get this same x."""
        if self._last is None or self._last[0] is not x:
            self._last = (x, self(x))
        return self._last[1]

    def dequantize(self) -> Tensor:
        """The weight the blocks stand for: (N, K) float32."""
        if self.mode == "q8":
            q, s = self.packed
            w = (
                torch.from_numpy(q).float().view(self.out_features, -1, BLOCK)
                * torch.from_numpy(s)[..., None]
            )
        else:
            p, d, m = (torch.from_numpy(a) for a in self.packed)
            p = p.view(self.out_features, -1, 16)
            q = torch.cat([p & 15, p >> 4], dim=-1).float()  # (N, K/32, 32)
            w = q * d[..., None] + m[..., None]
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features)
        rows = rows if rows.dtype == torch.float32 else rows.float()
        tiles_fit = rows.shape[0] == 1 or self.out_features % 4 == 0
        if (
            rows.shape[0] > _MATVEC_ROWS
            or not tiles_fit
            or x.requires_grad
            or x.device.type != "cpu"
        ):
            y = F.linear(rows, self.dequantize().to(x.device), self.bias)
            return y.reshape(*shape[:-1], self.out_features)
        rows = rows.contiguous()
        out = np.empty((rows.shape[0], self.out_features), dtype=np.float32)
        k = _kernels()
        if self.mode == "q8":
            kernel = k.q8_row if rows.shape[0] == 1 else k.q8_tiles
            kernel(*self.packed, rows.numpy(), out)
        else:
            blocks = rows.view(rows.shape[0], -1, BLOCK)  # (M, K/32, 32)
            xlo = blocks[..., :16].reshape(rows.shape[0], -1).contiguous().numpy()
            xhi = blocks[..., 16:].reshape(rows.shape[0], -1).contiguous().numpy()
            k.q4_rows(*self.packed, xlo, xhi, blocks.sum(-1).numpy(), out)
        y = torch.from_numpy(out)
        if self.bias is not None:
            y += self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.mode}"


class FusedPart(nn.Module):
    """One projection of a fused QuantLinear: its slice of the output columns.

    Attention's q, k and v projections (and the MLP's gate and up) read the same input, so one
    kernel call over the stacked matrix does all of them: per decode step that is 4 calls per
    layer instead of 7, and each call costs a thread-pool round trip. The first part called with
    an input computes the whole product; the others, called with the very same tensor, slice it.
    """

    def __init__(self, fused: QuantLinear, start: int, end: int) -> None:
        super().__init__()
        self.fused, self.start, self.end = fused, start, end

    def forward(self, x: Tensor) -> Tensor:
        return self.fused.shared(x)[..., self.start : self.end]

    def extra_repr(self) -> str:
        return f"columns {self.start}:{self.end} of a fused matrix"


FUSE = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _fuse_groups(model: nn.Module, mode: Quant) -> None:
    """Replace each group of FUSE projections of one module by FusedParts of one QuantLinear."""
    for module in list(model.modules()):
        for names in FUSE:
            parts = [getattr(module, n, None) for n in names]
            if not all(isinstance(p, nn.Linear) for p in parts):
                continue
            fused, start = QuantLinear(parts, mode), 0
            for name, part in zip(names, parts, strict=True):
                setattr(module, name, FusedPart(fused, start, start + part.out_features))
                start += part.out_features


def auto_mode(model: nn.Module) -> str:
    """The default decoding mode: q8 (fastest that passes the quality guard in tests/test_quant.py
    and bench/RESULTS.md) for a model on the CPU whose widths are whole blocks, else fp32."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    fits = all(m.in_features % BLOCK == 0 and m.out_features % 4 == 0 for m in linears)
    return "q8" if on_cpu and fits and linears else "fp32"


def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """Replace every nn.Linear (the output head included) by a QuantLinear, in place.

    The token embedding stays float32: it is a lookup of one row per token, not a matmul. A tied
    output head gets its own quantized copy for the same reason; it is 8-bit in both modes.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown quantization {mode!r}; choose from {list(MODES)}")
    if mode == "auto":
        mode = auto_mode(model)
    if mode == "fp32":
        return model
    _fuse_groups(model, mode)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        # The output head stays 8-bit in q4 mode, as llama.cpp's Q4 files keep it at 6-8 bits:
        # its errors go straight into the logits, and 4 bits there flipped greedy tokens.
        head_mode = "q8" if name == "lm_head" else mode
        setattr(parent, attr, QuantLinear(linear, head_mode))
    n = sum(isinstance(m, QuantLinear) for m in model.modules())
    log.info("decoding with %s weights (%d matrices; q/k/v and gate/up fused)", mode, n)
    return model
