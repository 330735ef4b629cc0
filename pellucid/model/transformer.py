"""Transformer: token ids -> embeddings (+ positions) -> pre-norm blocks -> final norm -> logits.

    >>> model = Transformer(PRESETS["tiny"])
    >>> model(torch.zeros(2, 8, dtype=torch.long)).shape      # (B, T, vocab_size) float32
    torch.Size([2, 8, 256])

With a KVCache, each row's new tokens continue from that row's cached length (see kv_cache.py).
`forward_hidden` and `logits` split the trunk from the output head, so reward, value and
classifier heads reuse the trunk: forward(ids) == logits(forward_hidden(ids)).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from pellucid.errors import PellucidError, WeightsFormatError
from pellucid.model.config import ModelConfig
from pellucid.model.kv_cache import KVCache
from pellucid.model.layers import (
    Block,
    Dropout,
    Frame,
    Rotary,
    SinusoidalEmbedding,
    Trace,
    make_norm,
)

__all__ = ["Trace", "Transformer", "eval_mode"]

# Linear layers whose outputs add into the residual stream: GPT-2 scales their init by
# 1/sqrt(2 * n_layer) so the stream's variance does not grow with depth.
_RESIDUAL_PROJECTIONS = ("attn.o_proj.weight", "mlp.down_proj.weight")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode (no dropout) inside the block, in its own mode again after it."""
    was = model.training
    model.train(False)
    try:
        yield model
    finally:
        model.train(was)


def segment_frame(segments: Tensor) -> tuple[Tensor, Tensor]:
    """Positions and attention mask for rows holding several examples (packing, left padding).

    segments: (B, T) int64, one id per example, equal ids contiguous (e.g. [1 1 1 2 2 0 0]).
    Returns pos (B, T), restarting at 0 where each segment starts, and mask (B, 1, T, T) bool:
    a token sees the earlier tokens of its own segment only (block-diagonal causal), so an
    example's logits do not depend on its neighbours in the row.
    """
    B, T = segments.shape
    idx = torch.arange(T, device=segments.device).expand(B, T)  # (B, T)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # segment start
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    return idx - first, (same & causal)[:, None]


class Transformer(nn.Module):
    """A decoder-only transformer built from a ModelConfig (GPT-2 and Llama families alike)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        positions = {
            "learned": lambda: nn.Embedding(cfg.context_len, cfg.n_embd),
            "sinusoidal": lambda: SinusoidalEmbedding(cfg),
            "rope": lambda: None,  # RoPE rotates queries and keys inside attention instead
        }
        self.pos_emb = positions[cfg.pos]()
        self.rotary = Rotary(cfg) if cfg.pos == "rope" else None
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layer))
        self.norm = make_norm(cfg, cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02) matrices, residual projections / sqrt(2 n_layer), zero biases."""
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():  # a tied weight is listed once
            if p.is_meta:  # built by from_weights, about to be replaced: nothing to draw
                continue
            if p.dim() >= 2:
                std = residual_std if name.endswith(_RESIDUAL_PROJECTIONS) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)  # norm gains

    @classmethod
    def from_weights(
        cls,
        cfg: ModelConfig,
        tensors: Mapping[str, Tensor],
        device: torch.device | str | None = None,
    ) -> Transformer:
        """Build a model around existing tensors without initialising (or allocating) weights twice.

        The model is made on the meta device and `tensors` (named as in `state_dict()`) are
        assigned, keeping their dtype. A tied model needs only `tok_emb.weight`. Raises
        WeightsFormatError naming missing, unexpected or mis-shaped tensors.
        """
        with torch.device("meta"):
            model = cls(cfg)
        tensors = dict(tensors)
        if cfg.tie_embeddings and "tok_emb.weight" in tensors:
            tensors["lm_head.weight"] = tensors["tok_emb.weight"]
        expected = {name: t.shape for name, t in model.state_dict().items()}
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise WeightsFormatError(
                f"weights do not fit the model config: missing {missing}, unexpected {unexpected}"
            )
        for name, shape in expected.items():
            if tensors[name].shape != shape:
                raise WeightsFormatError(
                    f"weight '{name}' has shape {list(tensors[name].shape)}, the config needs {list(shape)}"
                )
        model.load_state_dict(tensors, strict=True, assign=True)
        if cfg.tie_embeddings:  # assign=True replaced both names by (possibly) distinct tensors
            model.lm_head.weight = model.tok_emb.weight
        for module in model.modules():
            if isinstance(module, (Rotary, SinusoidalEmbedding)):
                module.reset_buffers(device)
        return model.to(device)

    def forward(
        self,
        ids: Tensor,
        *,
        cache: KVCache | None = None,
        trace: Trace | None = None,
        segments: Tensor | None = None,
    ) -> Tensor:
        """ids (B, T) int64 -> logits (B, T, vocab_size) float32.

        With `cache`, row b's tokens take positions cache.lengths[b] + t and see cache positions
        up to there; their K/V are written into the cache, whose lengths the caller advances.
        Without a cache, attention is plain causal over positions 0 .. T-1. With `segments`
        (B, T) int64, see `segment_frame`: several examples share a row without seeing each other.
        """
        return self.logits(self.forward_hidden(ids, cache=cache, trace=trace, segments=segments))

    def forward_hidden(
        self,
        ids: Tensor,
        *,
        cache: KVCache | None = None,
        trace: Trace | None = None,
        segments: Tensor | None = None,
    ) -> Tensor:
        """ids (B, T) int64 -> final hidden states (B, T, C), after the final norm."""
        B, T = ids.shape
        if cache is None:
            if self.cfg.context_len < T:
                raise PellucidError(
                    f"context length exceeded: {T} tokens, the model's context_len is {self.cfg.context_len}"
                )
            pos, mask = torch.arange(T, device=ids.device)[None], None  # (1, T)
            if segments is not None:
                pos, mask = segment_frame(segments)
        elif segments is not None:
            raise PellucidError("segments (packed rows) cannot be combined with a KV cache")
        else:
            if cache.batch_size != B:
                raise PellucidError(f"batch of {B} rows given to a KV cache of {cache.batch_size}")
            pos, mask = cache.prepare(T)  # (B, T), (B, 1, T, S)
        x = self.tok_emb(ids)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)
        x = self.drop(x)
        rope = self.rotary(pos) if self.rotary is not None else None
        frame = Frame(pos=pos, rope=rope, mask=mask, cache=cache, trace=trace)
        if trace is not None:
            trace.embeddings = x.detach()
        for block in self.blocks:
            x = block(x, frame)
            if trace is not None:
                trace.residuals.append(x.detach())
        return self.norm(x)

    def logits(self, hidden: Tensor) -> Tensor:
        """Hidden states (..., C) after the final norm -> logits (..., vocab_size) float32."""
        return self.lm_head(hidden).float()

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, a tied matrix counted once.

        exclude_embeddings drops the token and position embedding tables (Kaplan et al.'s
        "non-embedding" N; with tied embeddings that also drops the output head). Layers that
        keep their weights outside nn.Parameter (quantized blocks, infer/quant.py) report them
        as `n_weights`; a tied head's quantized copy is not counted twice.
        """
        n = sum(p.numel() for p in self.parameters())
        n += sum(
            m.n_weights
            for name, m in self.named_modules()
            if hasattr(m, "n_weights") and not (self.cfg.tie_embeddings and name == "lm_head")
        )
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel() + self._pos_params()
        return n

    def forward_flops_per_token(self, context_len: int | None = None, head: bool = True) -> float:
        """Forward FLOPs per token: 2N + 4 L H D T, whatever trains (a third of flops_per_token
        when everything does).

        N counts the parameters that take part in matmuls: all of them except lookup tables
        (the position table, and the token table unless it is tied to the output head, whose
        matmul is real work). This is nanoGPT's count for GPT-2. The second term is attention
        (QK^T and weights @ V) over T = context_len (default: the config's) keys, without
        discounting the causal mask. head=False leaves out the output head, for a model that
        reads the hidden states only (a classifier, a reward model).
        """
        cfg = self.cfg
        T = cfg.context_len if context_len is None else context_len
        lookups = self._pos_params() + (0 if cfg.tie_embeddings else self.tok_emb.weight.numel())
        N = self.num_params() - lookups - (0 if head else self.lm_head.weight.numel())
        return 2.0 * N + 4.0 * cfg.n_layer * cfg.n_head * cfg.head_dim * T

    def flops_per_token(self, context_len: int | None = None, head: bool = True) -> float:
        """Training FLOPs per token (forward + backward), PaLM's estimate: 6N + 12 L H D T, three
        times the forward (see forward_flops_per_token).

        Frozen weights (a LoRA run's base, a classifier's frozen blocks) need no weight
        gradient: 4 FLOPs per weight and token where a gradient still flows through their block
        to a trainable weight below, 2 (the forward alone, attention included) where none does.
        Without this a LoRA or classifier run logged MFU above 100%.
        """
        cfg = self.cfg
        T = cfg.context_len if context_len is None else context_len
        backward_attention = 8.0 * cfg.n_head * cfg.head_dim * T  # per layer (forward: 4)
        # A gradient flows through a block if anything at or below it trains (an embedding
        # included); weights held outside nn.Parameter (quantized) count fully, as in N.
        grad = self.tok_emb.weight.requires_grad or any(
            p.requires_grad for p in (self.pos_emb.parameters() if self.pos_emb else ())
        )
        saved = 0.0
        top = [self.norm, self.lm_head] if head else [self.norm]
        for part in [*self.blocks, nn.ModuleList(top)]:
            params = list(part.parameters())
            grad = grad or any(p.requires_grad for p in params)
            saved += sum(p.numel() for p in params if not p.requires_grad) * (2.0 if grad else 4.0)
            if not grad and isinstance(part, Block):
                saved += backward_attention
        return 3.0 * self.forward_flops_per_token(T, head) - saved

    def _pos_params(self) -> int:
        return sum(p.numel() for p in self.pos_emb.parameters()) if self.pos_emb is not None else 0
