"""Judging an aligned model: the oracle's win rate against a baseline, and the KL to a reference.

    replies = greedy_replies(policy, tokenizer, template, rows)
    oracle_scores(policy, reference, tokenizer, template, oracle, rows, baseline_replies)
    -> {"win_rate", "wins", "ties", "losses", "n", "oracle_score", "kl", "kl_per_token", "replies"}

Win rate: the oracle compares the policy's greedy reply to each held-out prompt with the
baseline's (the starting model's), a tie counting half. KL: along each of the policy's replies,
the full-vocabulary KL(policy || reference) of the next-token distributions, summed over the
reply's tokens (its end-of-turn token included) and averaged over replies; `kl_per_token`
divides by tokens instead. Greedy replies make both numbers deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pellucid.align.oracle import Oracle, win_rate
from pellucid.align.pairs import conversation
from pellucid.data.finetune import encode_lm, in_order
from pellucid.data.preferences import PromptRow, collate_rows, reply_record
from pellucid.model.transformer import eval_mode
from pellucid.train.evaluate import greedy_answers
from pellucid.train.objectives import reply_logprobs

if TYPE_CHECKING:
    from pellucid.tokenizer.bpe import Tokenizer
    from pellucid.tokenizer.chat import ChatTemplate


def greedy_replies(
    model: nn.Module,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    rows: Sequence[PromptRow],
    max_new_tokens: int = 96,
    batch_size: int = 16,
) -> list[str]:
    """The model's greedy reply to each prompt (the prompt as one user turn)."""
    convs = [conversation(r.prompt) for r in rows]
    return greedy_answers(model, tokenizer, template, convs, max_new_tokens, batch_size)


@torch.no_grad()
def reply_kl(
    policy: nn.Module,
    reference: Any,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    rows: Sequence[PromptRow],
    replies: Sequence[str],
    batch_size: int = 4,
) -> dict[str, float]:
    """{"kl" (nats per reply), "kl_per_token"}: KL(policy || reference) along `replies`.

    reference: anything with `forward_hidden` and `logits` (a model, dpo.AdaptersOff).
    """
    records = [
        reply_record(r.prompt, t, i) for i, (r, t) in enumerate(zip(rows, replies, strict=True))
    ]
    encoded = encode_lm(records, template, tokenizer, policy.cfg.context_len - 1, truncate=True)
    device = next(policy.parameters()).device
    total, tokens = 0.0, 0
    with eval_mode(policy):
        for batch in in_order(encoded, batch_size, collate_rows):
            b = batch.to(device)
            lp = reply_logprobs(policy, b.inputs, b.targets)  # (N, V)
            lq = reply_logprobs(reference, b.inputs, b.targets)
            total += (lp.exp() * (lp - lq)).sum().item()
            tokens += lp.shape[0]
    return {"kl": total / max(len(encoded), 1), "kl_per_token": total / max(tokens, 1)}


def oracle_scores(
    model: nn.Module,
    reference: Any,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    oracle: Oracle,
    rows: Sequence[PromptRow],
    baseline: Sequence[str] | None,
    max_new_tokens: int = 96,
    replies: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The model's greedy replies to `rows` (or `replies` if given), judged by `oracle`:
    {"replies", "oracle_score" (mean)}, plus the win rate over `baseline` when given and the KL
    to `reference` when given (None skips either)."""
    if replies is None:
        replies = greedy_replies(model, tokenizer, template, rows, max_new_tokens)
    scores = [oracle.score(r.prompt, t, r.answer) for r, t in zip(rows, replies, strict=True)]
    out: dict[str, Any] = {"replies": list(replies), "oracle_score": sum(scores) / len(scores)}
    if baseline is not None:
        out |= win_rate(oracle, rows, replies, baseline)
    if reference is not None:
        out |= reply_kl(model, reference, tokenizer, template, rows, replies)
    return out
