"""Quantized weights for fast CPU decoding: the GGUF file's own blocks by default, or requantized.

Decoding one token reads every weight once, so on a CPU its speed is set by bytes and by the work
of turning them into floats, not by FLOPs: SmolLM2-135M reads 538 MB per token in float32 and
about 100 MB in the shipped file's 4-bit blocks. The matrix-vector products here are numba
kernels (kernels.py) that read packed blocks directly, with float32 activations.

Block formats (each weight row cut into blocks of 32, as in GGUF):

    q4  w = d * q + m,  q in [0, 15] (two per byte), d and m per block   GGUF Q4_1; Q4_0 is m = -8d
    q8  w = d * q,      q int8                                          GGUF Q8_0
    f32 the float32 weights as they are                                 anything else, exactly

Modes (`--quant`):

    auto  the default. A matrix read from a GGUF file runs the file's own blocks: Q4_0/Q4_1 as q4,
          Q8_0 as q8, other quantized types (K-quants, ...) dequantized as f32; so the output is
          the file's model up to float rounding (tests/test_quant.py). Float weights (safetensors,
          a checkpoint, an F16 file, or file weights changed since loading, e.g. LoRA merged in)
          are quantized to q8.
    fp32  the float model, no quantization: the reference.
    q8    requantize every matrix to q8 blocks (an explicit choice: not the file's model).
    q4    requantize to q4 blocks, the output head to q8.

    >>> quantize_model(model, "auto")     # swaps each nn.Linear for a QuantLinear, in place
"""

from __future__ import annotations

import logging
import os
import platform
from collections import Counter
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pellucid.errors import ConfigError

log = logging.getLogger("pellucid")

BLOCK = 32
MODES = ("auto", "fp32", "q8", "q4")
KIND = {"q4": 0, "q8": 1, "f32": 2}  # the kernels' codes for the block formats
_FILE_KINDS = {"Q4_0": "q4", "Q4_1": "q4", "Q8_0": "q8"}  # GGUF types the kernels read as they are
_FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}
_MATVEC_ROWS = 16  # up to this many input rows use the kernels; more (prefill) BLAS on floats
_UNUSED = np.zeros((1, 1), np.float32)  # the m (and s) of formats without them


def _kernels() -> ModuleType:
    """The numba kernels, imported on first use so that `pellucid --help` starts fast."""
    from pellucid.infer import kernels

    return kernels


def prefer_256_bit_vectors() -> None:
    """Have numba compile the kernels for 256-bit vectors (8 float lanes; kernels.py says why):
    decoding 8 sequences of SmolLM2 at once went 1.33x faster on Zen 4, 4 sequences 1.5x, and
    one 0.92x. numba fixes its target machine when the first kernel is declared, so this counts
    only before the kernel modules are imported; a NUMBA_CPU_FEATURES of the user's own wins. x86
    only: the feature is x86's."""
    import numba
    from numba.core.codegen import get_host_cpu_features

    if numba.config.CPU_FEATURES is None and platform.machine().lower() in ("x86_64", "amd64"):
        host = get_host_cpu_features()  # "" where LLVM cannot tell
        numba.config.CPU_FEATURES = f"{host},+prefer-256-bit" if host else "+prefer-256-bit"


# --- kernel form: (kind, a, s, m), see kernels.py ----------------------------------------------------


def pack(w: Tensor, mode: str) -> tuple:
    """Float weight (N, K) -> kernel form in `mode` (q8: s = max|w| / 127 per block; q4: the block's
    min and (max - min) / 15; f32: a copy)."""
    w = w.detach().float().cpu()
    N, K = w.shape
    if mode == "f32":
        return (KIND["f32"], w.numpy().copy().view(np.uint8), _UNUSED, _UNUSED)
    if K % BLOCK:
        raise ConfigError(f"cannot quantize a {N}x{K} weight: {K} is not a multiple of {BLOCK}")
    blocks = w.reshape(N, K // BLOCK, BLOCK)
    if mode == "q8":
        s = blocks.abs().amax(-1) / 127  # (N, K/32)
        q = torch.round(blocks / torch.where(s == 0, 1.0, s)[..., None]).clamp_(-127, 127)
        return (
            KIND["q8"],
            q.to(torch.int8).reshape(N, K).numpy().view(np.uint8),
            s.numpy(),
            _UNUSED,
        )
    lo, hi = blocks.amin(-1), blocks.amax(-1)  # (N, K/32)
    d = (hi - lo) / 15
    q = torch.round((blocks - lo[..., None]) / torch.where(d == 0, 1.0, d)[..., None]).clamp_(0, 15)
    q = q.to(torch.uint8)
    packed = q[..., :16] | (q[..., 16:] << 4)  # byte j: element j low, element j + 16 high
    return (KIND["q4"], _kernel_order(packed.reshape(N, K // 2).numpy()), d.numpy(), lo.numpy())


def _kernel_order(p: np.ndarray) -> np.ndarray:
    """Q4 bytes (N, K/2) in GGUF's layout -> the kernels' order: bytes 0-7 of every block, then
    bytes 8-15 of every block (kernels.py says why)."""
    N, H = p.shape
    return np.ascontiguousarray(p.reshape(N, H // 16, 2, 8).transpose(0, 2, 1, 3).reshape(N, H))


def from_file(mode: str, arrays: tuple[np.ndarray, ...]) -> tuple:
    """A GGUF tensor's own blocks (FileBlocks.arrays()) -> kernel form, nothing rounded."""
    if mode == "q4":
        p, d, m = arrays
        return (KIND["q4"], _kernel_order(p), d, m)
    q, d = arrays
    return (KIND["q8"], q.view(np.uint8), d, _UNUSED)


def dequantize(mat: tuple) -> Tensor:
    """Kernel form -> the (N, K) float32 weight it stands for, computed as gguf's dequantizer does
    ((d * q) + m, no fused multiply-add), so a file's blocks give back its weights bit for bit."""
    kind, a, s, m = mat
    if kind == KIND["f32"]:
        return torch.from_numpy(a.view(np.float32))
    N, nb = s.shape
    if kind == KIND["q8"]:
        q = torch.from_numpy(a.view(np.int8)).float().view(N, nb, BLOCK)
        return (q * torch.from_numpy(s)[..., None]).view(N, nb * BLOCK)
    p = torch.from_numpy(a).view(N, 2, nb, 8).transpose(1, 2).reshape(N, nb, 16)  # GGUF's order
    q = torch.cat([p & 15, p >> 4], dim=-1).float()  # (N, K/32, 32)
    return (torch.from_numpy(s)[..., None] * q + torch.from_numpy(m)[..., None]).view(N, nb * BLOCK)


def _concat(mats: list[tuple]) -> tuple:
    """Kernel forms of one kind stacked along the output rows: one fused matrix."""
    if len(mats) == 1:
        return mats[0]
    kind = mats[0][0]
    if kind == KIND["q4"]:
        return (kind, *(np.concatenate([mt[i] for mt in mats]) for i in (1, 2, 3)))
    if kind == KIND["q8"]:
        return (
            kind,
            np.concatenate([mt[1] for mt in mats]),
            np.concatenate([mt[2] for mt in mats]),
            _UNUSED,
        )
    return (kind, np.concatenate([mt[1] for mt in mats]), _UNUSED, _UNUSED)


# --- the layer ----------------------------------------------------------------------------------


class QuantLinear(nn.Module):
    """y = x W^T (+ b) with W in kernel form; x (..., K) float32 -> (..., N) float32.

    linear: one nn.Linear, or several read as one matrix (their rows stacked, for FusedPart).
    mode: "q8", "q4" (requantize) or "f32"; mats: per part, the kernel form to use instead of
    packing the float weight (a GGUF file's own blocks). keep_dense: keep the float32 matrix once
    built (prefill), where memory allows.

    Few rows (decoding: one per sequence) go through the numba kernels, which read each packed
    weight row once for all input rows; many rows (prefill) use BLAS on the float32 matrix,
    where the arithmetic, not the weight bytes, is the cost.
    """

    def __init__(
        self,
        linear: nn.Linear | list[nn.Linear],
        mode: str,
        mats: list[tuple | None] | None = None,
        keep_dense: bool = False,
    ) -> None:
        super().__init__()
        parts = linear if isinstance(linear, list) else [linear]
        mats = mats or [None] * len(parts)
        self.mat = _concat(
            [
                mt if mt is not None else pack(p.weight, mode)
                for p, mt in zip(parts, mats, strict=True)
            ]
        )
        self.mode, self.keep_dense = mode, keep_dense
        self.in_features, self.out_features = (
            parts[0].in_features,
            sum(p.out_features for p in parts),
        )
        biases = [p.bias for p in parts]
        self.bias = None
        if any(b is not None for b in biases):
            self.bias = torch.cat(
                [
                    torch.zeros(p.out_features) if b is None else b.detach().float()
                    for p, b in zip(parts, biases, strict=True)
                ]
            )
        self._dense: Tensor | None = None
        self.n_parts = len(parts)
        # (input, output, parts still to read it) for FusedPart
        self._last: tuple[Tensor, Tensor, int] | None = None
        # what Transformer.num_params counts for this layer (its weights are numpy blocks)
        self.n_weights = self.out_features * self.in_features + (
            0 if self.bias is None else self.out_features
        )

    def shared(self, x: Tensor) -> Tensor:
        """forward(x), computed once for the parts of a fused matrix that all get this same x,
        and let go once each part has read it. A prefill's products are large: kept until the
        layer's next call, SmolLM2's 30 layers held 2.4 GB after a 4,096-token prefill, and with
        every product in memory not reused, its 512-token gate/up product took 13.1 ms instead
        of 11.2 (bench/RESULTS.md)."""
        if self._last is None or self._last[0] is not x:
            self._last = (x, self(x), self.n_parts)
        x, y, left = self._last
        self._last = (x, y, left - 1) if left > 1 else None
        return y

    def dequantize(self) -> Tensor:
        """The weight the blocks stand for: (N, K) float32 (kept if keep_dense)."""
        if self._dense is not None:
            return self._dense
        w = dequantize(self.mat)
        if self.keep_dense:
            self._dense = w
        return w

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features)
        rows = rows if rows.dtype == torch.float32 else rows.float()
        if rows.shape[0] > _MATVEC_ROWS or x.requires_grad or x.device.type != "cpu":
            y = F.linear(rows, self.dequantize().to(x.device), self.bias)
            return y.reshape(*shape[:-1], self.out_features)
        out = np.empty((rows.shape[0], self.out_features), dtype=np.float32)
        _kernels().matmul(self.mat, rows.contiguous().numpy(), out, False)
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


# --- choosing each matrix's format ----------------------------------------------------------------


def _choice(
    name: str, linear: nn.Linear, mode: str, blocks: dict, changed: list[str]
) -> tuple[str, tuple | None]:
    """(format, the file's kernel form or None) for one matrix under `mode`; a matrix whose
    weights no longer equal the file's blocks is added to `changed`."""
    if mode == "q4" and name == "lm_head":
        # The output head stays 8-bit in q4 mode, as llama.cpp's Q4 files keep it at 6-8 bits:
        # its errors go straight into the logits, and 4 bits there flipped greedy tokens.
        return "q8", None
    if mode != "auto":
        return mode, None
    found = blocks.get(f"{name}.weight")
    if found is not None and found.qtype not in _FLOAT_TYPES:
        kind = _FILE_KINDS.get(found.qtype)
        if kind is None:  # a format without a kernel (K-quants, ...): its exact float values
            return "f32", None
        mat = from_file(kind, found.arrays())
        if torch.equal(dequantize(mat), linear.weight.detach().float()):
            return kind, mat
        changed.append(name)
    return ("q8", None) if linear.in_features % BLOCK == 0 else ("f32", None)


def _dense_fits(model: nn.Module) -> bool:
    """Whether float32 copies of every matrix (for prefill) fit in an eighth of the RAM."""
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return False
    return 4 * n <= ram // 8


def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """Replace every nn.Linear (the output head included) by a QuantLinear, in place.

    The token embedding stays float32: it is a lookup of one row per token, not a matmul. A tied
    output head gets its own copy in kernel form. q/k/v and gate/up become one fused matrix
    each (FusedParts), in a common format (f32 if the file stores them differently). The GGUF
    blocks that load_gguf attached (model.file_blocks) are used by "auto" and then let go.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown quantization {mode!r}; choose from {list(MODES)}")
    blocks = model.__dict__.pop("file_blocks", None) or {}
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if mode == "fp32" or (mode == "auto" and not on_cpu):
        return model
    keep_dense = _dense_fits(model)
    chosen, changed = Counter(), []
    for parent_name, parent in list(model.named_modules()):
        groups = [
            g for g in FUSE if all(isinstance(getattr(parent, n, None), nn.Linear) for n in g)
        ]
        singles = [
            (n,)
            for n, c in parent.named_children()
            if isinstance(c, nn.Linear) and not any(n in g for g in groups)
        ]
        for names in groups + singles:
            parts = [getattr(parent, n) for n in names]
            full = [f"{parent_name}.{n}" if parent_name else n for n in names]
            picks = [_choice(f, p, mode, blocks, changed) for f, p in zip(full, parts, strict=True)]
            kinds = {k for k, _ in picks}
            # one fused matrix has one format: parts stored differently run exactly, as f32
            kind, mats = (
                (kinds.pop(), [mt for _, mt in picks]) if len(kinds) == 1 else ("f32", None)
            )
            fused = QuantLinear(parts, kind, mats, keep_dense)
            chosen[kind] += len(parts)
            if len(parts) == 1:
                setattr(parent, names[0], fused)
                continue
            start = 0
            for n, p in zip(names, parts, strict=True):
                setattr(parent, n, FusedPart(fused, start, start + p.out_features))
                start += p.out_features
    if changed:  # one line, not one per matrix: a merged LoRA adapter changes them all
        log.info(
            "%d matrices differ from the file's blocks (changed after loading, as by a merged "
            "adapter), so they run as 8-bit blocks: %s%s",
            len(changed), ", ".join(changed[:3]), ", ..." if len(changed) > 3 else "",
        )  # fmt: skip
    log.info(
        "decoding (%s) with %s matrices",
        mode,
        ", ".join(f"{n} {k}" for k, n in sorted(chosen.items())),
    )
    return model
