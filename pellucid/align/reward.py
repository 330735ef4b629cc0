"""The reward model: a transformer with a scalar head, trained on preference pairs.

    reward(prompt, reply) = ScalarHead(trunk)(chat_template(prompt, reply))[last real token]

It learns from pairs with the Bradley-Terry loss, -log sigmoid(r_chosen - r_rejected)
(train/objectives.pairwise_reward_loss), through the one trainer; `pellucid reward train`
(finetune.py, task "reward") runs it and keeps its run directory a model spec like any other:
`load(run_dir).reward_model` is the ScalarHead, LoRA merged. Held-out pairwise accuracy (the
share of pairs where the chosen reply scores higher) and the mean margin are its measures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from pellucid.align.pairs import PairData, pair_metrics
from pellucid.data.finetune import ExampleSampler, encode_lm, in_order
from pellucid.data.preferences import (
    PreferencePair,
    collate_pairs,
    collate_rows,
    encode_pairs,
    read_pairs,
    reply_record,
)
from pellucid.errors import ConfigError
from pellucid.model.transformer import eval_mode
from pellucid.train.objectives import pairwise_reward_loss
from pellucid.train.trainer import TrainConfig
from pellucid.weights.resolve import load

if TYPE_CHECKING:
    from pathlib import Path

    from pellucid.tokenizer.bpe import Tokenizer
    from pellucid.tokenizer.chat import ChatTemplate
    from pellucid.weights.resolve import LoadedModel


def reward_metrics(rm: nn.Module, pairs: Sequence[Any], batch_size: int = 8) -> dict[str, float]:
    """{"n", "loss", "pairwise_accuracy", "margin"} of a reward model over encoded pairs."""
    return pair_metrics(rm, pairwise_reward_loss, pairs, batch_size)


def prepare(
    model: nn.Module, data: PairData, train: TrainConfig
) -> tuple[ExampleSampler, Callable, Callable, Callable]:
    """(batches, objective, evaluate, scores) of a reward-model run over `data`."""
    B = train.batch_size

    def evaluate(m: nn.Module) -> dict[str, float]:
        r = reward_metrics(m, data.val, B)
        return {"val_pairwise_accuracy": r["pairwise_accuracy"], "val_margin": r["margin"]}

    def scores(m: nn.Module) -> dict[str, float]:
        return reward_metrics(m, data.val, B)

    batches = ExampleSampler(data.train, B, train.seed, collate_pairs)
    return batches, pairwise_reward_loss, evaluate if data.val else None, scores


def score_replies(
    rm: nn.Module,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    prompts: Sequence[str],
    replies: Sequence[str],
    batch_size: int = 8,
) -> Tensor:
    """The reward of replies[i] as the answer to prompts[i]: (N,) float32, on the CPU.

    Tokenized exactly as in training (the chat template, the last real input token read); a
    conversation longer than the model's context is cut to fit.
    """
    records = [reply_record(p, r, i) for i, (p, r) in enumerate(zip(prompts, replies, strict=True))]
    encoded = encode_lm(records, template, tokenizer, rm.cfg.context_len - 1, truncate=True)
    if len(encoded) != len(records):  # a cut left no reply token: the prompt alone is too long
        raise ConfigError("a prompt fills the reward model's whole context; shorten it")
    device = next(rm.parameters()).device
    out = []
    with eval_mode(rm), torch.no_grad():
        for batch in in_order(encoded, batch_size, collate_rows):
            b = batch.to(device)
            out.append(rm.reward(b.inputs, segments=b.segments).float().cpu())
    return torch.cat(out)


def need_reward_model(loaded: LoadedModel, spec: str) -> nn.Module:
    """The ScalarHead a spec loaded, or a ConfigError saying how to train one."""
    if loaded.reward_model is None:
        raise ConfigError(
            f"'{spec}' is not a reward model (train one with `pellucid reward train`)"
        )
    return loaded.reward_model


def pairs_accuracy(
    loaded: LoadedModel, spec: str, pairs: Sequence[PreferencePair], batch_size: int = 8
) -> dict[str, float]:
    """{"n", "loss", "pairwise_accuracy", "margin"} of the reward model a spec loaded."""
    rm = need_reward_model(loaded, spec)
    max_len = rm.cfg.context_len - 1
    encoded = encode_pairs(pairs, loaded.chat_template(), loaded.tokenizer, max_len, truncate=True)
    return reward_metrics(rm, encoded, batch_size)


def evaluate_pairs(spec: str, path: str | Path, batch_size: int = 8) -> dict[str, Any]:
    """`pellucid eval --model RM --data PAIRS.jsonl`: every pair of the file (checked before the
    model loads): {"shape": "preference", "n", "loss", "pairwise_accuracy", "margin"}."""
    pairs = read_pairs(path)
    return {"shape": "preference", **pairs_accuracy(load(spec), spec, pairs, batch_size)}
