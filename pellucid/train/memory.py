"""Will a training run fit? Memory estimated from the config, checked before anything is allocated.

A 10,000-layer model or `train.batch_size=1000000` used to reach the allocator and die there (or
swap the machine to a halt). The estimate is the usual one for fp32 training with AdamW:

    weights + gradients + 2 AdamW moments    16 bytes x parameters
    activations kept for backward            4 bytes x B x T x (L x (16 C + 3 F + 2 H T) + 3 V)

(per layer: the residual stream, norms, q/k/v/o and the MLP in and out, about 16 C; the MLP
hidden states, 3 F; attention weights and their dropout mask, H T per token each, only where
attention has dropout; then logits, their float copy and their gradient, 3 V). Measured on the
`small` preset at 16 x 256 it is within 25% of the process's peak memory. It is meant to catch what cannot possibly fit, by a factor, not to budget to the
last megabyte: the check only fails above what the machine has available.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pellucid.errors import ConfigError
from pellucid.model.config import ModelConfig


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a training run needs, by part."""

    parameters: int  # count, not bytes
    state_bytes: int  # weights, gradients, AdamW moments
    activation_bytes: int  # for one micro-batch

    @property
    def total_bytes(self) -> int:
        return self.state_bytes + self.activation_bytes


def parameter_count(cfg: ModelConfig) -> int:
    """Parameters of a Transformer built from `cfg`, from the config alone (no tensors)."""
    C, L, V, F = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.ffn_dim
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    attention = C * q + 2 * C * kv + q * C
    mlp = (3 if cfg.mlp == "swiglu" else 2) * C * F
    norms = 2 * C + (2 * cfg.head_dim if cfg.qk_norm else 0)
    if cfg.bias:  # q, k, v, o and the MLP's projections; LayerNorm's shift (RMSNorm has none)
        attention += q + 2 * kv + C
        mlp += (2 if cfg.mlp == "swiglu" else 1) * F + C
        norms += 2 * C if cfg.norm == "layernorm" else 0
    embeddings = V * C * (1 if cfg.tie_embeddings else 2)
    positions = cfg.context_len * C if cfg.pos == "learned" else 0
    final_norm = C * (2 if cfg.bias and cfg.norm == "layernorm" else 1)
    return L * (attention + mlp + norms) + embeddings + positions + final_norm


def estimate(cfg: ModelConfig, batch_size: int, context_len: int | None = None) -> MemoryEstimate:
    """The memory of fp32 AdamW training of `cfg` on micro-batches of batch_size x context_len."""
    T = cfg.context_len if context_len is None else context_len
    P = parameter_count(cfg)
    # Attention with dropout keeps its weights and dropout mask (at most H T each per token, less
    # where causal blocks skip the future: layers.causal_dropout_attention); SDPA keeps O(T).
    weights = 2 * cfg.n_head * T if cfg.dropout > 0 else 0
    per_token = cfg.n_layer * (16 * cfg.n_embd + 3 * cfg.ffn_dim + weights)
    per_token += 3 * cfg.vocab_size
    return MemoryEstimate(P, 16 * P, 4 * batch_size * T * per_token)


def available_bytes() -> int:
    """Memory this process may still use: MemAvailable from /proc/meminfo, else physical RAM."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(
    cfg: ModelConfig, batch_size: int, available: int | None = None, context_len: int | None = None
) -> MemoryEstimate:
    """Raise ConfigError, saying how much would be needed, when training cannot fit in memory.

    context_len: the longest row of a batch when shorter than the model's context (fine-tuning)."""
    need = estimate(cfg, batch_size, context_len)
    have = available_bytes() if available is None else available
    if need.total_bytes > have:
        gb = 1 << 30
        raise ConfigError(
            f"this run needs about {need.total_bytes / gb:,.1f} GB to train "
            f"({need.parameters:,} parameters: {need.state_bytes / gb:,.1f} GB of weights, "
            f"gradients and AdamW moments; {need.activation_bytes / gb:,.1f} GB of activations "
            f"at train.batch_size={batch_size}, context {context_len or cfg.context_len}), but only "
            f"{have / gb:,.1f} GB is available: use a smaller model.* or train.batch_size"
        )
    return need
