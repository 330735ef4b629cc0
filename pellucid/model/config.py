"""ModelConfig: every size and architectural choice of the transformer, and the named presets.

One implementation covers GPT-2 and Llama: their differences are data here (position type, norm,
MLP activation, bias, tying), never branches in `forward`.

    >>> cfg = dataclasses.replace(PRESETS["small"], n_layer=8)   # a preset, changed
    >>> cfg.head_dim                                             # derived: n_embd // n_head
    64
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from pellucid.errors import ConfigError

# Upper bounds that no real model reaches; a config beyond them (a typo, a hostile GGUF header)
# is rejected before any tensor is allocated.
_MAX = {
    "vocab_size": 2**31,
    "context_len": 2**20,
    "n_layer": 10_000,
    "n_head": 4096,
    "n_kv_head": 4096,
    "n_embd": 65_536,
    "ffn_dim": 2**20,
    "head_dim": 4096,
}


class _Derived(int):
    """An int that __post_init__ computed rather than the user gave.

    `dataclasses.replace(cfg, n_embd=512)` passes every old field back to `__init__`, so a plain
    int would freeze head_dim at the old width; the marker lets __post_init__ derive it again.
    It is still an int everywhere else (arithmetic, JSON).
    """


@dataclass(kw_only=True)
class ModelConfig:
    """Sizes and choices of a decoder-only transformer (field names follow STYLE.md 5.8)."""

    vocab_size: int = 256  # token id space, special tokens included
    context_len: int = 64  # longest sequence (positions 0 .. context_len - 1)
    n_layer: int = 2  # transformer blocks
    n_head: int = 4  # query heads
    n_kv_head: int | None = None  # key/value heads; None: n_head. 1: multi-query; between: GQA
    n_embd: int = 64  # residual stream width C
    ffn_dim: int | None = None  # MLP hidden width; None: 4 * n_embd (gelu), ~8/3 * n_embd (swiglu)
    head_dim: int | None = None  # per-head width; None: n_embd // n_head
    pos: Literal["learned", "sinusoidal", "rope"] = "rope"  # positional encoding
    rope_theta: float = 10_000.0  # RoPE base (Llama 2: 1e4, SmolLM2: 1e5, Llama 3: 5e5)
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    mlp: Literal["gelu", "swiglu"] = "swiglu"
    qk_norm: bool = False  # RMSNorm over head_dim on queries and keys, before RoPE
    bias: bool = False  # biases in linear layers and LayerNorm
    dropout: float = 0.0  # on embeddings, attention weights and residual branches (training only)
    tie_embeddings: bool = True  # output head shares the token embedding matrix

    def __post_init__(self) -> None:
        _check_types(self)
        if self.n_kv_head is None or isinstance(self.n_kv_head, _Derived):
            self.n_kv_head = _Derived(self.n_head)
        if self.head_dim is None or isinstance(self.head_dim, _Derived):
            if self.n_embd % self.n_head != 0:
                _fail("n_embd", f"{self.n_embd} is not divisible by n_head ({self.n_head})")
            self.head_dim = _Derived(self.n_embd // self.n_head)
        if self.ffn_dim is None or isinstance(self.ffn_dim, _Derived):
            self.ffn_dim = _Derived(default_ffn_dim(self.n_embd, self.mlp))
        _check_values(self)


def default_ffn_dim(n_embd: int, mlp: str) -> int:
    """4C for a GELU MLP; for SwiGLU 8/3 C (same parameter count), rounded up to a multiple of 64."""
    if mlp == "gelu":
        return 4 * n_embd
    return 64 * math.ceil(8 * n_embd / 3 / 64)


def _fail(key: str, why: str) -> None:
    raise ConfigError(f"model config key '{key}': {why}")


_DERIVED = ("n_kv_head", "ffn_dim", "head_dim")  # None means "derive from the others"
_CHOICES = {
    "pos": ("learned", "sinusoidal", "rope"),
    "norm": ("layernorm", "rmsnorm"),
    "mlp": ("gelu", "swiglu"),
}


def _check_types(cfg: ModelConfig) -> None:
    """Types and size bounds first, so deriving sizes never meets a string or a zero.

    Configs also come from GGUF headers and HF config.json files, so nothing is assumed.
    """
    for f in dataclasses.fields(cfg):
        value: Any = getattr(cfg, f.name)
        if f.name in _MAX:
            if value is None and f.name in _DERIVED:
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                _fail(f.name, f"expects an integer, got {value!r}")
            if not 1 <= value <= _MAX[f.name]:  # before any division by it, or allocation
                _fail(f.name, f"must be between 1 and {_MAX[f.name]}, got {value}")
        elif f.name in _CHOICES:
            if value not in _CHOICES[f.name]:
                _fail(f.name, f"must be one of {list(_CHOICES[f.name])}, got {value!r}")
        elif f.type in ("bool", bool):
            if not isinstance(value, bool):
                _fail(f.name, f"expects true or false, got {value!r}")
        elif not isinstance(value, (int, float)) or isinstance(value, bool):
            _fail(f.name, f"expects a number, got {value!r}")


def _check_values(cfg: ModelConfig) -> None:
    """How the (now complete) sizes fit together, and the float ranges."""
    if cfg.n_kv_head > cfg.n_head or cfg.n_head % cfg.n_kv_head != 0:
        _fail(
            "n_kv_head", f"n_head ({cfg.n_head}) must be a multiple of n_kv_head ({cfg.n_kv_head})"
        )
    if cfg.pos == "rope" and cfg.head_dim % 2:
        _fail("head_dim", f"RoPE needs an even head_dim, got {cfg.head_dim}")
    if cfg.pos == "sinusoidal" and cfg.n_embd % 2:
        _fail("n_embd", f"sinusoidal positions need an even n_embd, got {cfg.n_embd}")
    if not (math.isfinite(cfg.rope_theta) and cfg.rope_theta > 0):
        _fail("rope_theta", f"must be a positive finite number, got {cfg.rope_theta}")
    if not (math.isfinite(cfg.norm_eps) and 0 < cfg.norm_eps < 1):
        _fail("norm_eps", f"must be in (0, 1), got {cfg.norm_eps}")
    if not (math.isfinite(cfg.dropout) and 0 <= cfg.dropout < 1):
        _fail("dropout", f"must be in [0, 1), got {cfg.dropout}")


PRESETS: dict[str, ModelConfig] = {
    # For tests: every modern feature on (RoPE, RMSNorm, SwiGLU, grouped-query attention), tiny.
    "tiny": ModelConfig(
        vocab_size=256, context_len=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, ffn_dim=128
    ),
    # The CPU demo model (`pellucid demo`); vocab_size is set from the trained tokenizer.
    "small": ModelConfig(
        vocab_size=4096, context_len=256, n_layer=6, n_head=6, n_embd=384, ffn_dim=1024
    ),
    # GPT-2 small (124M): learned positions, LayerNorm, GELU, biases, tied head; the vocab is
    # 50257 padded to 50304 (a multiple of 64) as nanoGPT does, for faster matmuls.
    "gpt2-124m": ModelConfig(
        vocab_size=50304,
        context_len=1024,
        n_layer=12,
        n_head=12,
        n_embd=768,
        ffn_dim=3072,
        pos="learned",
        norm="layernorm",
        mlp="gelu",
        bias=True,
    ),
    # A Llama shape: SmolLM2-135M's (GQA 9/3, RoPE base 1e5, SwiGLU, tied head).
    "llama": ModelConfig(
        vocab_size=49152,
        context_len=2048,
        n_layer=30,
        n_head=9,
        n_kv_head=3,
        n_embd=576,
        ffn_dim=1536,
        rope_theta=100_000.0,
    ),
}
