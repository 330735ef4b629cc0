"""The math of one engine step: run the rows' new tokens through the model, choose each next token.

`last_logits(runner, rows, cache)` runs right-padded rows and returns the logits of each row's
last real token; `choose(...)` picks every row's token with its own SamplingParams. The engine
(engine.py) owns the sequences and the KV pool and calls these two at every step; a draft/verify
pair (speculative decoding) can call them the same way, with a few tokens per row.

The runner is the model itself, or for decoding a FastDecoder: a Llama-family model whose
matrices are in kernel form (quant.py) runs its decode steps as numba kernels, one call per
step (step_kernel.forward, every layer in one parallel region: RMSNorm, the fused q/k/v product,
QK-norm and RoPE, the KV-cache write, attention, the output projection, SwiGLU, the residual adds,
the final norm), instead of some 270 small torch operations per step whose dispatch cost more
than the matrix products. Same arithmetic, same KV cache, float32 throughout: the two paths agree
to float rounding (tests/test_decode.py).
Prefill (many tokens per row) stays on the model's own forward, where BLAS does the work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from pellucid.errors import PellucidError
from pellucid.infer.quant import FusedPart, QuantLinear
from pellucid.infer.sampling import (
    SamplingParams,
    greedy,
    probabilities,
    process_logits,
    sample,
)
from pellucid.model.transformer import Transformer

if TYPE_CHECKING:
    from pellucid.model.kv_cache import KVCache

FAST_TOKENS = 16  # new tokens per row up to which the FastDecoder runs (decode, draft checks)
# ... or new tokens in all, up to which it runs a prefill: on SmolLM2 Q4_1 (AMD EPYC, 2 cores)
# its kernels prefill ~450 tokens/s at any length, the model's forward 255 at 32 tokens and
# 450 at 96 (bench/RESULTS.md, issue 11): a chat prompt's first token comes sooner.
FAST_PREFILL = 64
_NONE = np.zeros(0, np.float32)  # "no QK-norm" for the kernels


class FastDecoder:
    """forward_hidden(ids, cache=...) of a supported model, over its KV cache, as numba kernels.

    Build with `FastDecoder.build(model)`, which returns None when the model is not one it
    runs: RoPE + RMSNorm + SwiGLU without biases (llama, qwen3), every matrix a QuantLinear with
    q/k/v and gate/up fused, float32 embeddings on the CPU.
    """

    def __init__(self, model: nn.Module, layers: list[tuple]) -> None:
        from pellucid.infer import kernels, step_kernel  # numba: only when a model can use it

        self.step, self.threads = step_kernel, kernels.threads
        self.model = model
        cfg = model.cfg
        self.eps, self.n_head = float(cfg.norm_eps), cfg.n_head
        self.emb = model.tok_emb.weight.detach().numpy()  # (V, C) a view
        self.norm = model.norm.weight.detach().numpy()
        self.cos, self.sin = model.rotary.cos.numpy(), model.rotary.sin.numpy()  # (context, D)
        self.layers = step_kernel.typed_list(layers)  # one argument for every layer
        self._kv: tuple[list, list, list] = ([], [], [])  # cache.k it was made for, k, v views

    @classmethod
    def build(cls, model: nn.Module) -> FastDecoder | None:
        if not isinstance(model, Transformer):
            return None
        cfg = model.cfg
        if (
            (cfg.pos, cfg.norm, cfg.mlp, cfg.bias) != ("rope", "rmsnorm", "swiglu", False)
            or model.tok_emb.weight.dtype != torch.float32
            or model.tok_emb.weight.device.type != "cpu"
        ):
            return None
        layers = []
        for blk in model.blocks:
            a, mlp = blk.attn, blk.mlp
            qkv = _fused(a.q_proj, a.k_proj, a.v_proj)
            gate_up = _fused(mlp.gate_proj, mlp.up_proj)
            if None in (qkv, gate_up) or not isinstance(a.o_proj, QuantLinear):
                return None
            if not isinstance(mlp.down_proj, QuantLinear):
                return None
            qk = [
                _NONE if isinstance(n, nn.Identity) else _np(n.weight) for n in (a.q_norm, a.k_norm)
            ]
            layers.append(
                (
                    _np(blk.attn_norm.weight),
                    qkv,
                    *qk,
                    a.o_proj.mat,
                    _np(blk.mlp_norm.weight),
                    gate_up,
                    mlp.down_proj.mat,
                )
            )
        return cls(model, layers)

    def forward_hidden(self, ids: Tensor, *, cache: KVCache) -> Tensor:
        """ids (B, T) int64, row b's tokens at positions cache.lengths[b] + t -> final hidden
        states (B, T, C) after the final norm; their K/V are written into the cache, whose
        lengths the caller advances (as Transformer.forward_hidden)."""
        B, T = ids.shape
        cache.check(T)
        k, v = self._views(cache)
        x = self.emb[ids.reshape(-1).numpy()]  # (B * T, C) a copy: the residual stream
        h = self.step.forward(
            x, cache.lengths.numpy(), T, k, v, self.cos, self.sin, self.eps, self.n_head,
            self.layers, self.norm, self.threads(),
        )  # fmt: skip
        return torch.from_numpy(h).view(B, T, -1)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.model.logits(hidden)

    def forget(self) -> None:
        """Let go of the cache views kept between steps: they hold the buffers alive (the engine
        calls this when its KV pool frees them)."""
        self._kv = ([], [], [])

    def _views(self, cache: KVCache) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """numpy views of the cache's per-layer buffers as typed lists, remade only when the
        buffers change (the pool hands out the same KVCache lists for the same rows): making
        them takes ~0.5 ms for SmolLM2's 30 layers."""
        if self._kv[0] is not cache.k:
            views = [[t.numpy() for t in buffers] for buffers in (cache.k, cache.v)]
            self._kv = (cache.k, *map(self.step.typed_list, views))
        return self._kv[1], self._kv[2]


def _np(t: Tensor) -> np.ndarray:
    return t.detach().numpy()


def _fused(*parts: nn.Module) -> tuple | None:
    """The kernel form of projections fused in this order into one QuantLinear, or None."""
    if not all(isinstance(p, FusedPart) and p.fused is parts[0].fused for p in parts):
        return None
    if [p.start for p in parts] != [0, *(p.end for p in parts[:-1])]:
        return None
    return parts[0].fused.mat


def runner_for(
    model: nn.Module, fast: FastDecoder | None, rows: list[list[int]], cache: KVCache | None
) -> nn.Module | FastDecoder:
    """What runs these rows: the FastDecoder (if there is one) over a cache for a few tokens per
    row (decode, draft checks) or a short prefill, the model for long prefills and uncached runs."""
    lengths = list(map(len, rows))
    few = cache is not None and (max(lengths) <= FAST_TOKENS or sum(lengths) <= FAST_PREFILL)
    return fast if few and fast is not None else model


def hidden_states(
    runner: nn.Module | FastDecoder,
    rows: list[list[int]],
    device: torch.device,
    cache: KVCache | None = None,
) -> Tensor:
    """Run the rows' tokens, right-padded with 0: the final hidden states (B, T, C) of every
    position (a row's positions past its length are padding). Causal attention keeps the
    padding unseen by the real tokens. runner: the model, or a FastDecoder (with a cache)."""
    T = max(map(len, rows))
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows], device=device)  # (B, T)
    return runner.forward_hidden(ids, cache=cache)


def last_logits(
    runner: nn.Module | FastDecoder,
    rows: list[list[int]],
    device: torch.device,
    cache: KVCache | None = None,
) -> Tensor:
    """The logits (B, V) of each row's last real token (hidden_states): only B hidden states go
    through the output head, not B x T of them."""
    hidden = hidden_states(runner, rows, device, cache)  # (B, T, C)
    last = torch.tensor([len(r) - 1 for r in rows], device=device)  # (B,)
    return runner.logits(hidden[torch.arange(len(rows), device=device), last])


def choose(
    params: list[SamplingParams],
    seen: list[Tensor | None],
    gens: list[torch.Generator],
    logits: Tensor,
) -> tuple[list[int], list[float], list[list[tuple[int, float]]]]:
    """Pick each row's next token with its own params, tokens seen (for the repetition penalty,
    updated here) and generator; returns ids, their logprobs and the top alternatives.
    logits: (B, V), row b for params[b]."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, V) the model's own
    # A NaN logit (or +inf) makes its whole row of logprobs NaN, and so their sum: one cheap
    # reduction (30 us for 49,152 logits on the CPU, against 85 for logits.isnan().any())
    if bool(logprobs.sum(dim=-1).isnan().any()):  # no distribution to sample from: say so
        raise PellucidError(
            "the model produced NaN logits (non-finite weights or an overflow); "
            "no token can be chosen"
        )
    ids = torch.empty(len(params), 1, dtype=torch.int64, device=logits.device)
    for p, group in _groups(params):
        every = len(group) == len(params)
        z = logits if every else logits[group]  # (G, V)
        penalty = torch.stack([seen[b] for b in group]) if p.repetition_penalty != 1.0 else None
        z = process_logits(z, p, penalty)
        if p.temperature == 0:
            chosen = greedy(z)  # (G, 1)
        else:
            chosen = sample(probabilities(z, p.temperature), [gens[b] for b in group])
        ids = (
            chosen if every else ids.index_copy_(0, torch.tensor(group, device=ids.device), chosen)
        )
    chosen_logprobs = logprobs.gather(1, ids)[:, 0].tolist()
    id_list = ids[:, 0].tolist()
    for s, t in zip(seen, id_list, strict=True):
        if s is not None:
            s[t] = True
    tops: list[list[tuple[int, float]]] = [[] for _ in params]
    k = min(max(p.top_logprobs for p in params), logprobs.shape[-1])
    if k:
        values, top_ids = torch.topk(logprobs, k, dim=-1)  # (B, k)
        tops = [
            list(zip(i[: p.top_logprobs], v[: p.top_logprobs], strict=True))
            for p, i, v in zip(params, top_ids.tolist(), values.tolist(), strict=True)
        ]
    return id_list, chosen_logprobs, tops


def _groups(params: list[SamplingParams]) -> list[tuple[SamplingParams, list[int]]]:
    """Rows with the same sampling chain (temperature and filters; seeds and stop rules aside),
    so each chain runs once over its rows: [(params of the first, [row, ...]), ...]."""
    groups: dict[tuple, tuple[SamplingParams, list[int]]] = {}
    for b, p in enumerate(params):
        key = (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty)
        groups.setdefault(key, (p, []))[1].append(b)
    return list(groups.values())
