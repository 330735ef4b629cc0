"""DPO: align a model to preference pairs directly, against a frozen reference (no reward model).

The loss (train/objectives.dpo_loss) raises the policy's log-probability of each chosen reply
over the rejected one, measured relative to a reference model, with `beta` setting how far from
the reference the policy may go. The reference is

    under LoRA   the policy itself with its adapters off (model/lora.adapters_disabled): the
                 base weights are frozen and shared, so there is no second copy of them;
    full         a frozen copy of the starting model, or nothing at all with
                 `dpo.precompute_ref=true`: the reference log-probs of every training pair are
                 computed once, before the first step, and ride along in the batches.

`pellucid dpo` (finetune.py, task "dpo") runs it through the one trainer, resumable like any
fine-tuning run. With `--eval-data PROMPTS.jsonl` and `dpo.oracle=NAME`, the held-out prompts
are answered (greedy) by the reference and by the policy before and after training, and the
oracle's win rate of policy over reference and the KL to the reference are reported.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from pellucid.align.evaluate import greedy_replies, oracle_scores
from pellucid.align.oracle import get_oracle
from pellucid.align.pairs import PairData, pair_metrics
from pellucid.data.finetune import ExampleSampler, in_order
from pellucid.data.preferences import EncodedPair, collate_pairs
from pellucid.errors import ConfigError, PellucidError
from pellucid.model.lora import adapters_disabled, lora_layers
from pellucid.model.transformer import eval_mode
from pellucid.train.objectives import completion_logprobs, dpo_loss
from pellucid.train.trainer import TrainConfig

if TYPE_CHECKING:
    from pellucid.weights.resolve import LoadedModel


@dataclass(kw_only=True)
class DPOConfig:
    """DPO settings (the `dpo.*` keys)."""

    beta: float = (
        0.1  # the inverse temperature of the implicit reward; higher: stay nearer the reference
    )
    precompute_ref: bool = False  # reference log-probs once, before training (memory is short)
    oracle: str = ""  # judge of the held-out win rate (--eval-data prompts); "" for none
    max_new_tokens: int = 96  # reply budget when answering the held-out prompts

    def __post_init__(self) -> None:
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ConfigError(f"config key 'dpo.beta' must be a finite number > 0, got {self.beta}")
        if self.max_new_tokens < 1:
            raise ConfigError(
                f"config key 'dpo.max_new_tokens' must be >= 1, got {self.max_new_tokens}"
            )
        if self.oracle:
            try:
                get_oracle(self.oracle)
            except PellucidError as e:
                raise ConfigError(f"config key 'dpo.oracle': {e}") from None


class AdaptersOff:
    """The base model under a LoRA-adapted one, as a reference: the same module with its adapters
    off (and in eval mode) for the length of each call. No weight is copied or touched."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @contextlib.contextmanager
    def active(self) -> Iterator[nn.Module]:
        """Inside the block, `self.model` computes the base model."""
        with eval_mode(self.model), adapters_disabled(self.model):
            yield self.model

    def forward_hidden(self, ids: Tensor, **kwargs: Any) -> Tensor:
        with self.active() as base:
            return base.forward_hidden(ids, **kwargs)

    def logits(self, hidden: Tensor) -> Tensor:
        with self.active() as base:
            return base.logits(hidden)


def make_reference(model: nn.Module) -> Any:
    """The policy with adapters off under LoRA; else a frozen copy of its current weights."""
    if lora_layers(model):
        return AdaptersOff(model)
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def reference_context(reference: Any) -> contextlib.AbstractContextManager:
    """Where the reference can run as a plain model (for the engine): (its module, in a block)."""
    if isinstance(reference, AdaptersOff):
        return reference.active()
    return contextlib.nullcontext(reference)


@torch.no_grad()
def with_reference(pairs: list[EncodedPair], reference: Any, batch_size: int) -> list[EncodedPair]:
    """Each pair with its reference log-probs (chosen, rejected) filled in: computed once."""
    device = next(p for p in _params(reference)).device
    out: list[EncodedPair] = []
    for i, batch in enumerate(in_order(pairs, batch_size, collate_pairs)):
        b = batch.to(device)
        logps = completion_logprobs(reference, b.inputs, b.targets).tolist()  # (2B,) interleaved
        chunk = pairs[i * batch_size : i * batch_size + len(logps) // 2]
        out += [replace(p, ref=(logps[2 * j], logps[2 * j + 1])) for j, p in enumerate(chunk)]
    return out


def _params(reference: Any) -> Iterator[nn.Parameter]:
    return (reference.model if isinstance(reference, AdaptersOff) else reference).parameters()


def _at_reference(model: nn.Module, reference: Any) -> bool:
    """Whether the policy still computes what the reference does (no step taken yet)."""
    if isinstance(reference, AdaptersOff):
        return all(not layer.lora_B.any() for layer in lora_layers(model))
    if reference is None:
        return False
    return all(
        torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters(), strict=True)
    )


def prepare(
    model: nn.Module, loaded: LoadedModel, data: PairData, train: TrainConfig, cfg: DPOConfig,
    eval_max: int,
) -> tuple[ExampleSampler, Callable, Callable, Callable]:  # fmt: skip
    """(batches, objective, evaluate, scores) of a DPO run over `data`; `model` is the policy
    before its first step (the reference is made from it)."""
    B = train.batch_size
    tok, template = loaded.tokenizer, loaded.chat_template()
    reference = make_reference(model)
    rows = data.held_rows[:eval_max] if cfg.oracle else []
    if cfg.oracle and not rows:
        raise ConfigError("dpo.oracle judges held-out prompts: pass --eval-data PROMPTS.jsonl")
    judge = get_oracle(cfg.oracle) if rows else None
    baseline: list[str] = []
    if judge is not None:  # the reference's own answers: what the policy has to beat
        with reference_context(reference) as ref:
            baseline = greedy_replies(ref, tok, template, rows, cfg.max_new_tokens)
    train_pairs, val_pairs = data.train, data.val
    if cfg.precompute_ref:
        train_pairs = with_reference(train_pairs, reference, B)
        val_pairs = with_reference(val_pairs, reference, B)
        if not isinstance(reference, AdaptersOff):
            reference = None  # the copy's memory goes back; the KL is then not measured

    def objective(m: nn.Module, batch: Any) -> Any:
        if isinstance(reference, nn.Module):  # the frozen copy follows the policy's device
            reference.to(batch.inputs.device)
        return dpo_loss(m, batch, beta=cfg.beta, reference=reference)

    def evaluate(m: nn.Module) -> dict[str, float]:
        r = pair_metrics(m, objective, val_pairs, B)
        return {f"val_{k}": r[k] for k in ("loss", "reward_accuracy", "margin")}

    def scores(m: nn.Module) -> dict[str, Any]:
        out: dict[str, Any] = pair_metrics(m, objective, val_pairs, B)
        if judge is not None:
            mine = baseline if _at_reference(m, reference) else None
            won = oracle_scores(
                m, reference, tok, template, judge, rows, baseline, cfg.max_new_tokens, mine
            )
            out |= {k: v for k, v in won.items() if k != "n"}  # eval.json keeps the replies
            out["n_prompts"] = won["n"]
        return out

    batches = ExampleSampler(train_pairs, B, train.seed, collate_pairs)
    return batches, objective, evaluate if val_pairs else None, scores
