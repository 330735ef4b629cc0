"""Seeing the learning cycle: one training step on one text, taken apart.

    >>> data = explain_train(model, tokenizer, "To be, or not to be", lr=1e-3, dropout=0.1)
    >>> data["loss"], data["loss_per_position"][0]
    (5.12, {'index': 0, 'input': 'To', 'target': ' be', 'loss': 6.3, 'prob': 0.0018})

The step is the trainer's own: next-token cross-entropy, backpropagation, then AdamW over the
same parameter groups (weight decay on matrices only). Afterwards the model's weights are put
back exactly, so explaining a step changes nothing.

What it shows, in order: the loss at every position (-log p(target)); the gradient norm of each
layer; the AdamW update size of each layer next to its weight size (the ratio |dW| / |W| is the
fraction by which one step moves the layer); and how many activations each dropout zeroed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pellucid.errors import ConfigError
from pellucid.explain.trace import rounded, token_info
from pellucid.model.layers import Dropout
from pellucid.model.transformer import Transformer
from pellucid.train.optim import param_groups

if TYPE_CHECKING:
    from pellucid.tokenizer.bpe import Tokenizer

SCHEMA = "pellucid.explain-train/1"


def _group(name: str) -> str:
    """Parameter name -> the part of the model it belongs to ("layer 3", "embeddings", ...)."""
    if name.startswith("blocks."):
        return f"layer {name.split('.')[1]}"
    return {"tok_emb": "embeddings", "pos_emb": "embeddings", "norm": "final norm"}.get(
        name.split(".")[0], "output head"
    )


def _norms_by_group(tensors: dict[str, Tensor]) -> dict[str, float]:
    """sqrt(sum of squares) over each group's tensors."""
    sq: dict[str, float] = defaultdict(float)
    for name, t in tensors.items():
        sq[_group(name)] += float(t.float().pow(2).sum())
    return {g: v**0.5 for g, v in sq.items()}


def _count_dropout(model: nn.Module) -> tuple[list[dict], list[Any]]:
    """Forward hooks on every dropout module that count the activations it zeroed."""
    counts: list[dict] = []
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Dropout, Dropout)):
            row = {"module": name, "p": m.p, "zeroed": 0, "elements": 0}
            counts.append(row)

            def hook(_m: nn.Module, inp: tuple[Tensor], out: Tensor, row: dict = row) -> None:
                row["zeroed"] += int(((out == 0) & (inp[0] != 0)).sum())
                row["elements"] += out.numel()

            hooks.append(m.register_forward_hook(hook))
    return counts, hooks


def explain_train(
    model: Transformer,
    tokenizer: Tokenizer,
    text: str,
    *,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    dropout: float = 0.1,
    seed: int = 0,
) -> dict[str, Any]:
    """One training step on `text`, measured; the model is left exactly as it was."""
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise ConfigError(
            "explain-train needs a text of at least two tokens (an input and a target)"
        )
    if len(ids) > model.cfg.context_len + 1:
        raise ConfigError(
            f"text has {len(ids)} tokens; this model takes up to {model.cfg.context_len + 1}"
        )
    if not 0 <= dropout < 1:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
    if not (math.isfinite(lr) and lr > 0):  # torch's AdamW would raise it from deep inside
        raise ConfigError(f"lr (the learning rate) must be a finite number > 0, got {lr}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ConfigError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])  # (1, T) inputs and shifted targets
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    old_p = {m: m.p for m in model.modules() if isinstance(m, (nn.Dropout, Dropout))}
    old_attn = [(b.attn, b.attn.dropout) for b in model.blocks]
    was_training = model.training
    counts, hooks = _count_dropout(model)
    torch.manual_seed(seed)
    try:
        for m in old_p:
            m.p = dropout
        for attn, _ in old_attn:
            attn.dropout = dropout
        model.train()
        model.zero_grad(set_to_none=True)
        logits = model(x)[0]  # (T, V)
        per_pos = F.cross_entropy(logits.float(), y[0], reduction="none")  # (T,)
        loss = per_pos.mean()
        loss.backward()
        params = dict(model.named_parameters())
        grads = {n: p.grad for n, p in params.items() if p.grad is not None}
        opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr)
        opt.step()
        updates = {n: params[n].detach() - saved[n] for n in params}
    finally:
        for h in hooks:
            h.remove()
        for m, p in old_p.items():
            m.p = p
        for attn, p in old_attn:
            attn.dropout = p
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(saved[n])
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    per_pos, loss = per_pos.detach(), loss.detach()
    probs = (-per_pos).exp()
    grad_norms = _norms_by_group(grads)
    weight_norms, update_norms = _norms_by_group(saved), _norms_by_group(updates)
    return {
        "schema": SCHEMA,
        "text": text,
        "lr": lr,
        "weight_decay": weight_decay,
        "dropout": dropout,
        "tokens": [{"index": i, **token_info(tokenizer, t)} for i, t in enumerate(ids)],
        "loss": rounded(loss),
        "loss_per_position": [
            {
                "index": i,
                "input": token_info(tokenizer, ids[i])["text"],
                "target": token_info(tokenizer, ids[i + 1])["text"],
                "loss": rounded(per_pos[i]),
                "prob": rounded(probs[i]),
            }
            for i in range(len(ids) - 1)
        ],
        "grad_norms": [{"part": g, "norm": rounded(v)} for g, v in grad_norms.items()],
        "updates": [
            {
                "part": g,
                "weight_norm": rounded(weight_norms[g]),
                "update_norm": rounded(update_norms[g]),
                "ratio": rounded(update_norms[g] / max(weight_norms[g], 1e-12)),
            }
            for g in weight_norms
        ],
        "dropout_zeroed": [
            {**c, "fraction": rounded(c["zeroed"] / max(c["elements"], 1))} for c in counts
        ],
    }
