"""Evaluation of fine-tuned (and base) models: what `pellucid eval` and fine-tuning reports print.

    lm_metrics        assistant-token loss of conversations: perplexity and bits per byte
    class_metrics     a classifier's accuracy, macro-F1 and confusion matrix
    exact_match       greedy answers from the one Engine, compared after `normalize_answer` (data/tasks.py)

Bits per byte divide the summed nats of every assistant token (its end-of-turn token included)
by ln 2 and by the UTF-8 bytes of the assistant text, so models with different tokenizers are
comparable on the same file.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pellucid.data.finetune import Encoded, EncodedText, in_order, pad_lm, pad_text
from pellucid.data.tasks import normalize_answer
from pellucid.infer.conversation import stop_token_ids
from pellucid.infer.engine import Engine
from pellucid.infer.sampling import SamplingParams
from pellucid.model.transformer import eval_mode
from pellucid.train.objectives import sft_loss
from pellucid.train.trainer import evaluate_objective

if TYPE_CHECKING:
    from pellucid.data.jsonl import Record
    from pellucid.tokenizer.bpe import Tokenizer
    from pellucid.tokenizer.chat import ChatTemplate


def lm_metrics(model: nn.Module, examples: Sequence[Encoded], batch_size: int = 8) -> dict:
    """{"n", "loss" (nats per assistant token), "perplexity", "bits_per_byte"} over `examples`."""
    with eval_mode(model):
        loss, n_tokens = evaluate_objective(model, sft_loss, in_order(examples, batch_size, pad_lm))
    n_bytes = sum(e.n_bytes for e in examples)
    return {
        "n": len(examples),
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "bits_per_byte": loss * n_tokens / (math.log(2) * n_bytes) if n_bytes else math.nan,
    }


def confusion_matrix(truth: Sequence[int], pred: Sequence[int], n_labels: int) -> list[list[int]]:
    """counts[i][j]: rows whose true label is i and predicted label j."""
    counts = [[0] * n_labels for _ in range(n_labels)]
    for t, p in zip(truth, pred, strict=True):
        counts[t][p] += 1
    return counts


def macro_f1(confusion: list[list[int]]) -> float:
    """The unweighted mean of per-class F1 = 2 TP / (2 TP + FP + FN), over the classes that
    occur in the truth or the predictions (an absent class has no F1 to average).

    >>> macro_f1([[1, 1], [0, 2]])   # class 0: F1 2/3, class 1: F1 4/5
    0.7333333333333333
    """
    n = len(confusion)
    scores = []
    for c in range(n):
        tp = confusion[c][c]
        fn = sum(confusion[c]) - tp
        fp = sum(confusion[r][c] for r in range(n)) - tp
        if tp + fn + fp:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else math.nan


def class_metrics(
    model: nn.Module, examples: Sequence[EncodedText], n_labels: int, batch_size: int = 16
) -> dict:
    """{"n", "accuracy", "macro_f1", "confusion"} of a Classifier over `examples`."""
    device = next(model.parameters()).device
    # Shortest first: a batch pads to rows of about its own length (the scores ignore order).
    examples = sorted(examples, key=lambda e: len(e.ids))
    preds: list[int] = []
    with eval_mode(model), torch.no_grad():
        for batch in in_order(examples, batch_size, pad_text):
            b = batch.to(device)
            preds += model(b.inputs, segments=b.segments).argmax(-1).tolist()
    truth = [e.label for e in examples]
    confusion = confusion_matrix(truth, preds, n_labels)
    correct = sum(t == p for t, p in zip(truth, preds, strict=True))
    return {
        "n": len(examples),
        "accuracy": correct / len(examples) if examples else math.nan,
        "macro_f1": macro_f1(confusion),
        "confusion": confusion,
    }


def replies(
    model: nn.Module,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    prompts: Sequence[Sequence[dict[str, str]]],
    params: SamplingParams,
    batch_size: int = 16,
) -> list[str]:
    """The model's reply to each prompt conversation (the Engine, `batch_size` at a time).

    Reply i is sampled with seed params.seed + i (when a seed is set), however it is batched.
    """
    engine = Engine(model, tokenizer)
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = [template.encode(tokenizer, p) for p in prompts[i : i + batch_size]]
        seed = None if params.seed is None else params.seed + i
        texts = [""] * len(chunk)
        for steps in engine.generate(chunk, dataclasses.replace(params, seed=seed)):
            for step in steps:
                texts[step.row] += step.text
        out += texts
    return out


def greedy_answers(
    model: nn.Module,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    prompts: Sequence[Sequence[dict[str, str]]],
    max_new_tokens: int = 64,
    batch_size: int = 16,
) -> list[str]:
    """The model's greedy reply to each prompt conversation (the Engine, batched)."""
    params = SamplingParams(
        temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids(tokenizer)
    )
    return replies(model, tokenizer, template, prompts, params, batch_size)


def exact_match(
    model: nn.Module,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    records: Sequence[Record],
    max_new_tokens: int = 64,
    batch_size: int = 16,
) -> dict[str, Any]:
    """{"n", "exact_match" (fraction in [0, 1]), "answers"} of greedy replies vs the references."""
    answers = greedy_answers(
        model, tokenizer, template, [r.prompt for r in records], max_new_tokens, batch_size
    )
    hits = [
        normalize_answer(a) == normalize_answer(r.answer)
        for a, r in zip(answers, records, strict=True)
    ]
    return {
        "n": len(records),
        "exact_match": sum(hits) / len(hits) if hits else math.nan,
        "answers": answers,
    }
