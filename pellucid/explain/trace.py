"""Seeing the math: one traced forward pass -> the explain data every view renders.

    >>> data = explain(model, tokenizer, "The cat sat on the")
    >>> data["next_token"]["chosen"]["text"]
    ' mat'

`explain` is the one producer of the explain schema (docs/explain.md): the terminal tables, the
PNG figures, the HTML report and the web app all render this dict and compute nothing of their
own. Every number comes from the model's real forward pass (with a Trace, so attention takes the
explicit softmax(QK^T / sqrt(D)) V path) and from the sampling functions the engine uses; nothing
is recomputed by a second implementation that could drift from the first.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pellucid.errors import ConfigError
from pellucid.infer.engine import Engine
from pellucid.infer.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    min_p_filter,
    probabilities,
    sample,
    seen_mask,
    top_k_filter,
    top_p_filter,
)
from pellucid.model.kv_cache import bytes_per_token
from pellucid.model.transformer import Trace, Transformer, eval_mode
from pellucid.tokenizer.bpe import valid_text

if TYPE_CHECKING:
    from pellucid.tokenizer.bpe import Tokenizer

SCHEMA = "pellucid.explain/1"
MAX_TOKENS = 128  # attention matrices grow as layers x heads x T^2: explain is for short prompts
_DIGITS = 6  # significant digits of floats in the JSON (the views show at most 4)


def rounded(x: float) -> float:
    return float(f"{float(x):.{_DIGITS}g}")


def token_info(tokenizer: Tokenizer, id: int) -> dict[str, Any]:
    """{id, text, bytes}: text decodes the token alone (U+FFFD for part of a character).

    A model's vocabulary may be padded past the tokenizer's (for matmul-friendly sizes); those
    ids have no text and show as <unused N>.
    """
    if id >= tokenizer.vocab_size:
        return {"id": id, "text": f"<unused {id}>", "bytes": ""}
    raw = tokenizer.token_bytes(id)
    return {"id": id, "text": raw.decode("utf-8", errors="replace"), "bytes": raw.hex(" ")}


def _top(tokenizer: Tokenizer, probs: Tensor, k: int, logits: Tensor | None = None) -> list[dict]:
    """The k most likely tokens of probs (V,) with prob, logprob (and logit if given)."""
    p, ids = probs.topk(min(k, int((probs > 0).sum()) or 1))
    rows = []
    for pi, i in zip(p.tolist(), ids.tolist(), strict=True):
        row = {
            **token_info(tokenizer, i),
            "prob": rounded(pi),
            "logprob": rounded(torch.tensor(pi).log()),
        }
        if logits is not None:
            row["logit"] = rounded(logits[i])
        rows.append(row)
    return rows


# --- the sections ---------------------------------------------------------------------------------


def model_info(model: Transformer) -> dict[str, Any]:
    """The configuration a reader needs to follow the shapes."""
    c = model.cfg
    keys = ["n_layer", "n_head", "n_kv_head", "n_embd", "head_dim", "ffn_dim", "vocab_size"]
    info = {k: getattr(c, k) for k in keys}
    info |= {"context_len": c.context_len, "pos": c.pos, "norm": c.norm, "mlp": c.mlp}
    return info | {"params": model.num_params(), "tied_embeddings": c.tie_embeddings}


def embeddings(model: Transformer, tokenizer: Tokenizer, ids: Tensor, k: int = 5) -> dict[str, Any]:
    """Norm of each token's embedding row and its k nearest tokens by cosine similarity.

    ids (T,). The table E is (V, C); cosine(e_i, e_j) = e_i . e_j / (|e_i| |e_j|).
    """
    table = model.tok_emb.weight.detach().float()  # (V, C)
    rows = table[ids]  # (T, C)
    cos = F.normalize(rows, dim=-1) @ F.normalize(table, dim=-1).T  # (T, V)
    cos[torch.arange(len(ids)), ids] = -2.0  # a token is not its own neighbour
    best, best_ids = cos.topk(k, dim=-1)
    nearest = [
        [{**token_info(tokenizer, j), "cosine": rounded(c)} for c, j in zip(cs, js, strict=True)]
        for cs, js in zip(best.tolist(), best_ids.tolist(), strict=True)
    ]
    return {
        "dim": table.shape[1],
        "norms": [rounded(n) for n in rows.norm(dim=-1)],
        "nearest": nearest,
    }


def positions(model: Transformer, n_tokens: int) -> dict[str, Any]:
    """Which positional encoding, and what it does at the last position."""
    c, last = model.cfg, n_tokens - 1
    out: dict[str, Any] = {"scheme": c.pos, "last_position": last}
    if c.pos == "rope":
        half = c.head_dim // 2
        inv_freq = 1.0 / (
            c.rope_theta ** (torch.arange(half, dtype=torch.float32) * 2 / c.head_dim)
        )
        angles = last * inv_freq  # radians, one per rotated pair (i, i + D/2)
        out |= {
            "theta": c.rope_theta,
            "head_dim": c.head_dim,
            "pairs": "dimension i is rotated with dimension i + head_dim/2",
            "frequencies": [rounded(f) for f in inv_freq],
            "angles_last": [rounded(a) for a in angles],
        }
    else:
        table = model.pos_emb(torch.arange(n_tokens)[None])[0].detach().float()  # (T, C)
        out |= {"norms": [rounded(n) for n in table.norm(dim=-1)]}
    return out


def attention(
    tokenizer: Tokenizer, ids: list[int], weights: list[Tensor], k: int = 3
) -> list[dict]:
    """Per layer and head: the (T, T) weight matrix and the k most attended tokens of the last row.

    weights: per layer (1, H, T, T), rows sum to 1, zeros above the diagonal (causal mask).
    """
    layers = []
    for layer, w in enumerate(weights):
        heads = []
        for h, m in enumerate(w[0].float()):
            last = m[-1]
            top_w, top_i = last.topk(min(k, len(ids)))
            top = [
                {"index": i, "text": token_info(tokenizer, ids[i])["text"], "weight": rounded(x)}
                for x, i in zip(top_w.tolist(), top_i.tolist(), strict=True)
            ]
            rows = [[rounded(x) for x in row] for row in m.tolist()]
            heads.append({"head": h, "weights": rows, "top_last": top})
        layers.append({"layer": layer, "heads": heads})
    return layers


def logit_lens(model: Transformer, tokenizer: Tokenizer, trace: Trace, k: int = 5) -> list[dict]:
    """What the model would predict if it stopped after each layer: final norm + head applied to
    the residual stream at the last position. After the last layer this is the model's output."""
    stream = [trace.embeddings, *trace.residuals]  # each (1, T, C)
    out = []
    for i, x in enumerate(stream):
        logits = model.logits(model.norm(x[0, -1]))  # (V,)
        label = "embeddings" if i == 0 else f"layer {i - 1}"
        out.append({"layer": i - 1, "label": label, "top": _top(tokenizer, logits.softmax(-1), k)})
    return out


def next_token(
    tokenizer: Tokenizer, logits: Tensor, ids: list[int], params: SamplingParams, k: int = 10
) -> dict[str, Any]:
    """logits (V,) -> softmax -> each filter of the engine's chain -> temperature -> the choice.

    Every stage keeps a set of candidate tokens (the rest get logit -inf) and renormalizes;
    `kept` is the size of that set and `top` its most likely members after renormalizing.
    """
    z = logits.float()[None]  # (1, V)
    stages = [{"name": "softmax", "kept": z.shape[1], "top": _top(tokenizer, z[0].softmax(-1), k)}]

    def stage(name: str, value: float | None, new: Tensor) -> Tensor:
        probs = new[0].softmax(-1)
        top = _top(tokenizer, probs, k)
        kept = int(torch.isfinite(new).sum())
        stages.append(
            {"name": name, "value": value, "kept": kept, "top": top, "sum": rounded(probs.sum())}
        )
        return new

    if params.repetition_penalty != 1.0:
        seen = seen_mask([ids], z.shape[1], z.device)
        z = stage(
            "repetition_penalty",
            params.repetition_penalty,
            apply_repetition_penalty(z, seen, params.repetition_penalty),
        )
    if params.top_k is not None:
        z = stage("top_k", params.top_k, top_k_filter(z, params.top_k))
    if params.top_p is not None:
        z = stage("top_p", params.top_p, top_p_filter(z, params.top_p))
    if params.min_p is not None:
        z = stage("min_p", params.min_p, min_p_filter(z, params.min_p))
    probs = probabilities(z, params.temperature)[0]  # (V,) one-hot at the argmax when greedy
    stages.append(
        {
            "name": "temperature",
            "value": params.temperature,
            "kept": int((probs > 0).sum()),
            "top": _top(tokenizer, probs, k),
            "sum": rounded(probs.sum()),
        }
    )
    # the engine's own draw: the same seed picks the same token as `pellucid generate --seed`
    gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    choice = int(sample(probs[None], gen))
    raw = logits.float().log_softmax(-1)
    return {
        "top": _top(tokenizer, logits.float().softmax(-1), k, logits.float()),
        "stages": stages,
        "chosen": {
            **token_info(tokenizer, choice),
            "prob": rounded(probs[choice]),
            "model_logprob": rounded(raw[choice]),
        },
    }


def kv_bytes_per_token(model: Transformer) -> int:
    """Bytes the KV cache holds per token: a key and a value per layer and KV head."""
    return bytes_per_token(model.cfg, model.tok_emb.weight.dtype)


def cost(model: Transformer, n_tokens: int) -> dict[str, Any]:
    """Matrix shapes of one block and of the head, FLOPs per token, KV-cache bytes per token."""
    c = model.cfg
    C, D, H, K, F_ = c.n_embd, c.head_dim, c.n_head, c.n_kv_head, c.ffn_dim
    shapes = {
        "q_proj": (C, H * D),
        "k_proj": (C, K * D),
        "v_proj": (C, K * D),
        "o_proj": (H * D, C),
    }
    if c.mlp == "swiglu":
        shapes |= {"gate_proj": (C, F_), "up_proj": (C, F_), "down_proj": (F_, C)}
    else:
        shapes |= {"up_proj": (C, F_), "down_proj": (F_, C)}
    matrices = [
        {"name": n, "shape": list(s), "flops_per_token": 2 * s[0] * s[1]} for n, s in shapes.items()
    ]
    matrices.append(
        {"name": "lm_head", "shape": [C, c.vocab_size], "flops_per_token": 2 * C * c.vocab_size}
    )
    return {
        "block_matrices": matrices,
        "n_layer": c.n_layer,
        "attention_flops_per_token": 4 * c.n_layer * H * D * n_tokens,  # QK^T and AV over T keys
        "forward_flops_per_token": model.forward_flops_per_token(n_tokens),
        "kv_cache_bytes_per_token": kv_bytes_per_token(model),
    }


# --- the one producer -----------------------------------------------------------------------------


@torch.inference_mode()
def explain(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str,
    params: SamplingParams | None = None,
    *,
    steps: int = 0,
    top: int = 10,
) -> dict[str, Any]:
    """The explain data for the next token after `prompt` (and `steps` more generated steps)."""
    params = params or SamplingParams(temperature=0.0)
    prompt = valid_text(prompt)  # lone surrogates -> U+FFFD, as encode does: the echo is JSON-safe
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ConfigError("explain needs a prompt of at least one token")
    if len(ids) > min(MAX_TOKENS, model.cfg.context_len):
        raise ConfigError(
            f"explain takes prompts of up to {min(MAX_TOKENS, model.cfg.context_len)} tokens; this one has {len(ids)}"
        )
    with eval_mode(model):
        trace = Trace()
        logits = model(torch.tensor([ids]), trace=trace)[0, -1]  # (V,)
        data = {
            "schema": SCHEMA,
            "prompt": prompt,
            "model": model_info(model),
            "tokens": [{"index": i, **token_info(tokenizer, t)} for i, t in enumerate(ids)],
            "embeddings": embeddings(model, tokenizer, torch.tensor(ids)),
            "positions": positions(model, len(ids)),
            "attention": attention(tokenizer, ids, trace.attn_weights),
            "logit_lens": logit_lens(model, tokenizer, trace),
            "next_token": next_token(tokenizer, logits, ids, params, top),
            "cost": cost(model, len(ids)),
            "sampling": {
                k: getattr(params, k)
                for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
            },
        }
        if steps:
            data["steps"] = generation_steps(model, tokenizer, ids, params, steps)
    return data


def generation_steps(
    model: Transformer, tokenizer: Tokenizer, ids: list[int], params: SamplingParams, n: int
) -> list[dict]:
    """`n` decode steps through the engine, with how the KV cache grows at each one."""
    run = replace(params, max_new_tokens=n, top_logprobs=5, stop=[], stop_token_ids=[])
    done = Engine(model, tokenizer).complete(ids, run)
    per_token = kv_bytes_per_token(model)
    out = []
    for i, s in enumerate(done.steps):
        cached = len(ids) + i  # the tokens whose keys and values this step reads
        out.append(
            {
                "step": i,
                **token_info(tokenizer, s.id),
                "logprob": rounded(s.logprob),
                "top": [{**token_info(tokenizer, j), "logprob": rounded(lp)} for j, lp in s.top],
                "kv_cache_tokens": cached,
                "kv_cache_bytes": cached * per_token,
                "new_tokens_computed": len(ids) if i == 0 else 1,
            }
        )
    return out
