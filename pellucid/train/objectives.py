"""Objectives: plain functions from (model, batch) to a summed loss, its target count and metrics.

The trainer never knows which algorithm it runs; pretraining, SFT, reward modelling and DPO differ
only in the objective they pass. Every objective returns the loss SUMMED over its targets (not the
mean) together with the number of targets, so that the trainer can divide by the number of targets
of the whole optimizer step, over all micro-batches (STYLE.md 3.4: the global valid-token rule).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from pellucid.data.batches import Batch

IGNORE_INDEX = -100  # targets with this id carry no loss (padding, prompt tokens under SFT)


@dataclass
class LossOutput:
    """What an objective returns for one micro-batch.

    loss_sum: () float32 tensor with grad, the loss summed over `n_targets` targets.
    n_targets: how many targets the sum covers (the trainer's normaliser).
    metrics: extra numbers to log (already reduced to Python floats).
    """

    loss_sum: Tensor
    n_targets: int
    metrics: dict[str, float] = field(default_factory=dict)


Objective = Callable[[nn.Module, "Batch"], LossOutput]


def lm_loss(model: nn.Module, batch: Batch) -> LossOutput:
    """Next-token cross-entropy, summed over the targets that are not IGNORE_INDEX.

    batch.inputs, batch.targets: (B, T) int64; targets are the inputs shifted left by one, with
    IGNORE_INDEX where no loss is wanted. The model maps (B, T) ids to (B, T, V) logits. A batch
    with `segments` (B, T) (packed examples) passes them on, so examples never see each other.
    """
    segments = getattr(batch, "segments", None)  # packed rows (data/finetune.py)
    logits = model(batch.inputs) if segments is None else model(batch.inputs, segments=segments)
    # float32 for the softmax even under bf16 autocast: the log-sum-exp over a large vocab is
    # where low precision hurts most.
    loss_sum = F.cross_entropy(
        logits.flatten(0, 1).float(),  # (B*T, V)
        batch.targets.flatten(),  # (B*T,)
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return LossOutput(loss_sum, batch.n_targets)


def sequence_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """Sum of the log-probabilities of each row's targets, skipping IGNORE_INDEX positions.

    logits: (B, T, V); targets: (B, T) int64 with IGNORE_INDEX where a token does not count.
    Returns (B,) float32. DPO compares these SUMS (not means) between chosen and rejected
    completions, so a longer completion is not rewarded for its length by averaging.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    mask = targets != IGNORE_INDEX  # (B, T)
    safe = targets.masked_fill(~mask, 0)  # any valid index; masked out below
    picked = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return (picked * mask).sum(dim=-1)


def class_loss(model: nn.Module, batch: Batch) -> LossOutput:
    """Cross-entropy of a classifier's logits against each row's label, summed over rows.

    batch.inputs: (B, T) int64; batch.segments: (B, T) int64, 1 real / 0 padding;
    batch.targets: (B,) int64 label indices. The model maps them to (B, n_labels) logits.
    Metrics: the batch's accuracy.
    """
    logits = model(batch.inputs, segments=batch.segments)  # (B, n_labels)
    loss_sum = F.cross_entropy(logits.float(), batch.targets, reduction="sum")
    accuracy = (logits.argmax(-1) == batch.targets).float().mean().item()
    return LossOutput(loss_sum, batch.n_targets, {"accuracy": accuracy})


def sft_loss(model: nn.Module, batch: Batch) -> LossOutput:
    """lm_loss with the output head run only where a target carries loss (the replies).

    Under SFT most positions are prompt or padding; their logits would be computed and thrown
    away, and the head (vocab x C) is a large share of a small model's FLOPs (21% of
    SmolLM2-135M's). The model needs `forward_hidden` and `logits` (Transformer has both).
    Equal to lm_loss up to float rounding. batch: inputs/targets (B, T), optional segments.
    """
    hidden = model.forward_hidden(batch.inputs, segments=getattr(batch, "segments", None))
    keep = batch.targets != IGNORE_INDEX  # (B, T)
    logits = model.logits(hidden[keep])  # (N, V) for the N loss-carrying positions
    loss_sum = F.cross_entropy(logits.float(), batch.targets[keep], reduction="sum")
    return LossOutput(loss_sum, batch.n_targets)


# --- preferences: the reward model and DPO --------------------------------------------------------
# A preference batch (data/finetune.py `collate_pairs`) holds B pairs as 2B rows, [chosen; rejected]:
# inputs (2B, T), targets (2B, T) (IGNORE_INDEX outside each reply), segments (2B, T) (1 real,
# 0 padding), and its n_targets is B (one target per pair). Both halves go through ONE forward.


def _halves(x: Tensor) -> tuple[Tensor, Tensor]:
    """(2B, ...) -> the chosen (B, ...) and rejected (B, ...) halves."""
    return x[: x.shape[0] // 2], x[x.shape[0] // 2 :]


def pairwise_reward_loss(model: nn.Module, batch: Batch) -> LossOutput:
    """Bradley-Terry: -log sigmoid(r_chosen - r_rejected), summed over the B pairs.

    The model (a ScalarHead) gives each row's reward at its last real token. Under Bradley-Terry
    p(chosen preferred) = sigmoid(r_c - r_r), so this is the pairs' negative log-likelihood.
    Metrics: pairwise_accuracy (share of pairs with r_c > r_r) and margin (mean r_c - r_r).
    """
    rewards = model.reward(batch.inputs, segments=batch.segments)  # (2B,)
    chosen, rejected = _halves(rewards.float())
    diff = chosen - rejected  # (B,)
    metrics = {"pairwise_accuracy": (diff > 0).float().mean().item(), "margin": diff.mean().item()}
    return LossOutput(-F.logsigmoid(diff).sum(), batch.n_targets, metrics)


def reply_logprobs(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """Log-probabilities (N, V) float32 at the N positions whose target is not IGNORE_INDEX
    (row-major order), for inputs/targets (B, T).

    The output head runs only there (as in sft_loss): a preference batch is mostly prompt and
    padding. The model needs `forward_hidden` and `logits` (a Transformer, LoRA or not).
    """
    hidden = model.forward_hidden(inputs)  # (B, T, C)
    return torch.log_softmax(model.logits(hidden[targets != IGNORE_INDEX]).float(), dim=-1)


def per_row_sum(values: Tensor, targets: Tensor) -> Tensor:
    """Sum per row of values (N,) given at the non-IGNORE_INDEX positions of targets (B, T) -> (B,)."""
    rows = (targets != IGNORE_INDEX).nonzero()[:, 0]  # (N,) the row of each counted position
    return torch.zeros(targets.shape[0], device=values.device).index_add(0, rows, values.float())


def completion_logprobs(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """Sum of log p(target) over each row's counted targets: inputs/targets (B, T) -> (B,)."""
    logp = reply_logprobs(model, inputs, targets)  # (N, V)
    picked = logp.gather(-1, targets[targets != IGNORE_INDEX].unsqueeze(-1)).squeeze(-1)  # (N,)
    return per_row_sum(picked, targets)


def dpo_loss(
    model: nn.Module, batch: Batch, *, beta: float, reference: nn.Module | None = None
) -> LossOutput:
    """Direct Preference Optimization (Rafailov et al. 2023), summed over the B pairs:

        -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))

    pi_*, ref_*: SUMS of the reply's token log-probs under the policy and the reference (a mean
    would favour long replies). The reference log-probs are `batch.ref_logps` (2B,) when
    precomputed, else computed by `reference` (a frozen model, or the policy with its adapters
    off), always without gradient. At policy == reference the loss is ln 2 per pair.
    Metrics: reward_accuracy (share of pairs whose implicit reward beta * (pi - ref) is higher
    for chosen), margin (mean reward gap), chosen_reward, rejected_reward.
    """
    policy = completion_logprobs(model, batch.inputs, batch.targets)  # (2B,)
    ref = getattr(batch, "ref_logps", None)
    if ref is None:
        if reference is None:
            raise ValueError("dpo_loss needs a reference model or precomputed batch.ref_logps")
        with torch.no_grad():
            ref = completion_logprobs(reference, batch.inputs, batch.targets)
    rewards = beta * (policy - ref.detach())  # (2B,) implicit rewards
    chosen, rejected = _halves(rewards)
    diff = chosen - rejected  # (B,)
    metrics = {
        "reward_accuracy": (diff > 0).float().mean().item(),
        "margin": diff.mean().item(),
        "chosen_reward": chosen.mean().item(),
        "rejected_reward": rejected.mean().item(),
    }
    return LossOutput(-F.logsigmoid(diff).sum(), batch.n_targets, metrics)
