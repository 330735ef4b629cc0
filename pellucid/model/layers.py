"""The parts of a transformer block: norms, positions, attention, MLP.

Every choice between GPT-2 and Llama parts is made once, when the module is built, from
`ModelConfig` data; `forward` methods hold no per-family branches.

Shapes: B batch, T new tokens, S keys visible (T without a cache), C = n_embd, H = n_head,
K = n_kv_head, D = head_dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from pellucid.model.config import ModelConfig

if TYPE_CHECKING:
    from pellucid.model.kv_cache import KVCache


@dataclass
class Trace:
    """What one traced forward records, for the explain feature and the logit lens.

    Passing a Trace switches attention to the explicit path (softmax(QK^T/sqrt(D) + mask) V),
    which is slower than SDPA but exposes the weights.
    """

    embeddings: Tensor | None = None  # (B, T, C) residual stream entering block 0
    attn_weights: list[Tensor] = field(
        default_factory=list
    )  # per layer (B, H, T, S), rows sum to 1
    residuals: list[Tensor] = field(default_factory=list)  # per layer (B, T, C), after the block


@dataclass
class Frame:
    """What every layer of one forward needs besides its input: built once per forward."""

    pos: Tensor  # (B or 1, T) int64 position of each new token
    rope: tuple[Tensor, Tensor] | None  # cos, sin: (B or 1, 1, T, D); None without RoPE
    mask: Tensor | None  # (B, 1, T, S) bool, True where a query may attend; None: plain causal
    cache: KVCache | None
    trace: Trace | None


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    """The configured norm over the last `dim` features (torch's fused F.layer_norm / F.rms_norm)."""
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


# --- positions -------------------------------------------------------------------------------------


def rope_tables(
    head_dim: int, context_len: int, theta: float, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """cos and sin of RoPE angles, each (context_len, head_dim) float32.

    Frequencies are computed exactly as Hugging Face's Llama does (float32 throughout), and laid
    out as [f_0 .. f_{D/2-1}, f_0 .. f_{D/2-1}] for the "rotate half" pairing (dim i with i + D/2),
    so real Llama weights need no permutation here.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)  # (D/2,)
    angles = torch.arange(context_len, device=device).float()[:, None] * inv_freq  # (context, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (context, D)
    return angles.cos(), angles.sin()


def rotate_half(x: Tensor) -> Tensor:
    """(..., D) -> (..., D): [x1, x2] -> [-x2, x1], the 90-degree turn of each (i, i + D/2) pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate queries or keys x (B, heads, T, D) by their positions' angles (cos/sin broadcast)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # float32 tables; x may be bfloat16 (autocast)
    return x * cos + rotate_half(x) * sin


def sinusoid_table(
    n_embd: int, context_len: int, device: torch.device | str | None = None
) -> Tensor:
    """The fixed encoding of "Attention Is All You Need": (context_len, n_embd) float32.

    Even features are sin(pos / 10000^(2i/C)), odd ones cos of the same angle.
    """
    pos = torch.arange(context_len, dtype=torch.float32, device=device)[:, None]
    inv_freq = torch.exp(
        torch.arange(0, n_embd, 2, dtype=torch.float32, device=device)
        * (-math.log(10_000.0) / n_embd)
    )
    table = torch.empty(context_len, n_embd, device=device)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)
    return table


class SinusoidalEmbedding(nn.Module):
    """A position "embedding" with no parameters: rows of a fixed table (a non-persistent buffer)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("table", sinusoid_table(cfg.n_embd, cfg.context_len), persistent=False)

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute the table (after building on the meta device)."""
        self.table = sinusoid_table(self.cfg.n_embd, self.cfg.context_len, device)

    def forward(self, pos: Tensor) -> Tensor:
        """pos (B or 1, T) int64 -> (B or 1, T, C)."""
        return self.table[pos]


class Rotary(nn.Module):
    """RoPE cos/sin tables up to context_len (non-persistent buffers: derived, never saved)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        cos, sin = rope_tables(cfg.head_dim, cfg.context_len, cfg.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute the tables (after building on the meta device)."""
        self.cos, self.sin = rope_tables(
            self.cfg.head_dim, self.cfg.context_len, self.cfg.rope_theta, device
        )

    def forward(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """pos (B or 1, T) int64 -> cos, sin each (B or 1, 1, T, D), ready to broadcast over heads."""
        return self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)


# --- dropout ---------------------------------------------------------------------------------------


def _cpu_kernels():  # noqa: ANN202
    """pellucid.model.cpu_kernels, imported on first use: numba takes ~0.4 s to load, which
    model imports, GPU runs and SwiGLU models without dropout need not pay."""
    from pellucid.model import cpu_kernels

    return cpu_kernels


def _eager_cpu(x: Tensor) -> bool:
    """Whether x is where the numba kernels apply: on the CPU, outside torch.compile (inductor
    fuses these ops itself, and cannot trace into numba)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout: zero each element with probability p, scale the rest by 1 / (1 - p).

    On the CPU (eager) the mask comes from cpu_kernels.keep_mask, 4-5x faster there than
    torch.rand and 8x faster than the bernoulli_ that F.dropout uses. Elsewhere F.dropout's
    fused kernel is the fast one.
    """
    if not training or p == 0.0:
        return x
    if not _eager_cpu(x):
        return F.dropout(x, p, training=True)
    return x * _cpu_kernels().keep_mask(x.shape, p).to(x.dtype)


def gelu_tanh(x: Tensor) -> Tensor:
    """GPT-2's GELU, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), any shape. float32 on the
    CPU (eager) goes through cpu_kernels: 2-3x torch's own kernels there, forward and backward."""
    if x.dtype == torch.float32 and _eager_cpu(x):
        return _cpu_kernels().GeluTanh.apply(x)
    return F.gelu(x, approximate="tanh")


class Dropout(nn.Module):
    """nn.Dropout with `dropout` above (no parameters, so state dicts are unchanged)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        """x (...) -> (...), dropped out in training mode only."""
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


# --- attention -------------------------------------------------------------------------------------


def explicit_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float = 0.0
) -> tuple[Tensor, Tensor]:
    """softmax(q k^T / sqrt(D) + mask) v, written out so the weights can be returned.

    q: (B, H, T, D); k, v: (B, K, S, D) with H a multiple of K (each key/value head serves
    H // K consecutive query heads, as SDPA's enable_gqa and Hugging Face's repeat_kv do);
    mask: (B, 1, T, S) bool or None for causal (S == T).
    Returns the output (B, H, T, D) and the weights (B, H, T, S) before dropout.
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)  # (B, H, S, D)
        v = v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if mask is None:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return dropout(weights, dropout_p) @ v, weights


class _CausalDropoutAttention(torch.autograd.Function):
    """Causal attention with dropout on its weights, forward and backward written out (CPU training).

    Autograd over the explicit path keeps three (B, H, T, T) float tensors per layer and walks
    each of them a dozen times; this keeps two (the weights and the dropout mask) and skips the keys after each block of queries: causal masking makes them zero. Queries go in
    blocks of `block`, block i seeing keys [0, end of block i), so about half of QK^T and of the
    weights is never computed (5/8 of it remains at T = 4 x block).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx: FunctionCtx, q: Tensor, k: Tensor, v: Tensor, p: float, block: int) -> Tensor:
        # Contiguous once, so the per-block matmuls below copy nothing; scaling q costs T / D
        # times less than scaling the scores.
        qs = (q * (1.0 / math.sqrt(q.shape[-1]))).contiguous()  # (B, H, T, D)
        k, v = k.contiguous(), v.contiguous()
        T = q.shape[-2]
        outs, saved = [], []
        for start in range(0, T, block):
            end = min(T, start + block)
            s = qs[..., start:end, :] @ k[..., :end, :].transpose(-2, -1)  # (B, H, b, end)
            future = torch.ones(end - start, end - start, dtype=torch.bool, device=q.device)
            s[..., start:].masked_fill_(future.triu_(1), float("-inf"))
            w = s.softmax(dim=-1)
            # as `dropout`: 1 / (1 - p) where kept; a float mask, since multiplying by a bool
            # one converts it to a float copy first (and masked_fill is slower still)
            keep = _cpu_kernels().keep_mask(w.shape, p).to(w.dtype)
            outs.append((w * keep) @ v[..., :end, :])
            saved += [w, keep]
        ctx.save_for_backward(qs, k, v, *saved)
        ctx.block = block
        return torch.cat(outs, dim=-2)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        qs, k, v, *saved = ctx.saved_tensors
        grad = grad.contiguous()
        dq, dk, dv = torch.empty_like(qs), torch.zeros_like(k), torch.zeros_like(v)
        for i in range(0, len(saved), 2):
            w, keep = saved[i], saved[i + 1]
            start = i // 2 * ctx.block
            end = start + w.shape[-2]
            g = grad[..., start:end, :]  # (B, H, b, D)
            dv[..., :end, :] += (w * keep).transpose(-2, -1) @ g
            dw = (g @ v[..., :end, :].transpose(-2, -1)).to(w.dtype).mul_(keep)  # (B, H, b, end)
            ds = torch._softmax_backward_data(dw, w, -1, w.dtype)  # d loss / d scores
            dq[..., start:end, :] = ds @ k[..., :end, :]
            dk[..., :end, :] += ds.transpose(-2, -1) @ qs[..., start:end, :]
        return dq.mul_(1.0 / math.sqrt(qs.shape[-1])), dk, dv, None, None


def causal_dropout_attention(q: Tensor, k: Tensor, v: Tensor, p: float, block: int = 64) -> Tensor:
    """softmax(q k^T / sqrt(D), causal) with dropout p on the weights, times v: (B, H, T, D).

    q: (B, H, T, D); k, v: (B, K, T, D), H a multiple of K. The same computation and the same
    dropout masks as `explicit_attention` + `dropout` where T <= block; faster and lighter (see
    _CausalDropoutAttention), for training on the CPU, where SDPA has no fused dropout.
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return _CausalDropoutAttention.apply(q, k, v, p, block)


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads (n_kv_head), optional QK-norm and RoPE.

    q/k/v stay separate projections: one fused qkv matmul measured no faster for CPU training
    (GPT-2 shape S: 58.6 vs 57.9 ms per step, 1 thread), and separate weights map one to one
    onto Hugging Face and GGUF tensors. Fusing for decode belongs with quantized weights.
    """

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer  # index of this layer's K/V in a KVCache
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        # QK-norm bounds the attention logits (OLMo 2, Qwen3); Identity keeps forward branch-free.
        norm = nn.RMSNorm if cfg.qk_norm else None
        self.q_norm = norm(cfg.head_dim, eps=cfg.norm_eps) if norm else nn.Identity()
        self.k_norm = norm(cfg.head_dim, eps=cfg.norm_eps) if norm else nn.Identity()
        self.dropout = cfg.dropout
        self.resid_dropout = Dropout(cfg.dropout)

    def forward(self, x: Tensor, frame: Frame) -> Tensor:
        """x (B, T, C) -> (B, T, C); writes this layer's new K/V into frame.cache if given."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_head, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        # q: (B, H, T, D); k, v: (B, K, T, D)
        if frame.rope is not None:
            q, k = apply_rope(q, *frame.rope), apply_rope(k, *frame.rope)
        if frame.cache is not None:
            k, v = frame.cache.update(self.layer, k, v, frame.pos, frame.mask.shape[-1])
        dropout_p = self.dropout if self.training else 0.0
        # With dropout on the CPU, SDPA falls back to its unfused path with a slow mask draw:
        # causal_dropout_attention is the same computation, faster (packed rows: explicit path).
        cpu_dropout = dropout_p > 0 and x.device.type == "cpu"
        if cpu_dropout and frame.trace is None and frame.mask is None:
            y = causal_dropout_attention(q, k, v, dropout_p)
        elif frame.trace is not None or cpu_dropout:
            y, weights = explicit_attention(q, k, v, frame.mask, dropout_p)
            if frame.trace is not None:
                frame.trace.attn_weights.append(weights.detach())
        else:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=frame.mask,
                dropout_p=dropout_p,
                is_causal=frame.mask is None,
                enable_gqa=self.n_kv_head != self.n_head,
            )
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H * D)
        return self.resid_dropout(self.o_proj(y))


# --- feed-forward ----------------------------------------------------------------------------------


class GeluMLP(nn.Module):
    """GPT-2's MLP: down(gelu_tanh(up(x)))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(cfg.n_embd, cfg.ffn_dim, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.n_embd, bias=cfg.bias)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, C) -> (B, T, C)."""
        return self.dropout(self.down_proj(gelu_tanh(self.up_proj(x))))


class SwiGLU(nn.Module):
    """Llama's MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.ffn_dim, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.ffn_dim, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.n_embd, bias=cfg.bias)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, C) -> (B, T, C)."""
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


MLPS: dict[str, type[nn.Module]] = {"gelu": GeluMLP, "swiglu": SwiGLU}


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg, cfg.n_embd)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = make_norm(cfg, cfg.n_embd)
        self.mlp = MLPS[cfg.mlp](cfg)

    def forward(self, x: Tensor, frame: Frame) -> Tensor:
        """x (B, T, C) -> (B, T, C)."""
        x = x + self.attn(self.attn_norm(x), frame)
        return x + self.mlp(self.mlp_norm(x))
