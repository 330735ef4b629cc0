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
# A preference batch (data/preferences.py `collate_pairs`) holds B pairs as 2B rows, interleaved
# (row 2i: pair i's chosen reply, row 2i + 1: its rejected one):
# inputs (2B, T), targets (2B, T) (IGNORE_INDEX outside each reply), segments (2B, T) (1 real,
# 0 padding), and its n_targets is B (one target per pair). Both halves go through ONE forward.


def _halves(x: Tensor) -> tuple[Tensor, Tensor]:
    """(2B, ...) interleaved rows -> the chosen (B, ...) and the rejected (B, ...) ones."""
    return x[0::2], x[1::2]


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
    """Per-row sums (B,) of values (N,) given at the non-IGNORE_INDEX positions of targets (B, T)."""
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


# --- RL: PPO and GRPO over scored replies (batches from align/rollouts.py) ----------------------


def reply_terms(
    lm: nn.Module, inputs: Tensor, targets: Tensor, head: nn.Module | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The policy's log-prob of each reply token, its entropy there, and a value head's value.

    lm: anything with forward_hidden and logits; inputs, targets: (B, T) int64, targets
    IGNORE_INDEX off the reply. Returns three (N,) float32 tensors over the N reply positions in
    row-major order (values None without a head). As in reply_logprobs, the output head runs on
    those positions only; the value head reads the same hidden states (one trunk forward).
    """
    hidden = lm.forward_hidden(inputs)  # (B, T, C)
    keep = targets != IGNORE_INDEX
    h = hidden[keep]  # (N, C)
    logp_all = torch.log_softmax(lm.logits(h).float(), dim=-1)  # (N, V)
    logp = logp_all.gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    values = head(h).squeeze(-1).float() if head is not None else None
    return logp, entropy, values


def _clipped_policy(
    logp: Tensor, old: Tensor, advantages: Tensor, clip: float
) -> tuple[Tensor, dict[str, float]]:
    """PPO's clipped surrogate per token, (N,), to minimise: the pessimistic (larger) of the
    unclipped and clipped -ratio * A, so a step gains nothing from moving the ratio past 1 +- clip.
    """
    ratio = torch.exp(logp - old)
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    with torch.no_grad():
        metrics = {
            "clip_frac": ((ratio - 1).abs() > clip).float().mean().item(),
            "approx_kl": (0.5 * (logp - old) ** 2).mean().item(),  # policy moved from rollout
        }
    return loss, metrics


def ppo_loss(
    model: nn.Module,
    batch: Batch,
    *,
    clip: float = 0.2,
    value_clip: float = 0.2,
    vf_coef: float = 0.1,
) -> LossOutput:
    """Clipped policy loss + vf_coef x clipped value loss, summed over reply tokens.

    model: ScalarHead(policy): `trunk` the policy, `head` its value head (one scalar per
    position, read where the next reply token is predicted). batch: a RolloutBatch with
    old_logprobs, advantages, returns, old_values (B, T). The value loss is the larger of
    (V - R)^2 and (V_clipped - R)^2 / 2, V_clipped within value_clip of the rollout's value.
    Metrics: policy and value loss, clip fraction, entropy, value error, and the batch's stats.
    """
    logp, entropy, values = reply_terms(model.trunk, batch.inputs, batch.targets, model.head)
    keep = batch.targets != IGNORE_INDEX
    old_v, returns = batch.old_values[keep], batch.returns[keep]
    pg, metrics = _clipped_policy(logp, batch.old_logprobs[keep], batch.advantages[keep], clip)
    v_clipped = old_v + (values - old_v).clamp(-value_clip, value_clip)
    vf = 0.5 * torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)
    metrics |= {
        "policy_loss": pg.mean().item(),
        "value_loss": vf.mean().item(),
        "value_error": ((values - returns) ** 2).mean().item(),
        "entropy": entropy.mean().item(),
    }
    return LossOutput((pg + vf_coef * vf).sum(), batch.n_targets, metrics | batch.stats)


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Schulman's "k3" estimate of KL(pi || ref) per token: exp(d) - d - 1, d = log ref - log pi.

    Unbiased under samples from pi, never negative, and its gradient pulls pi towards ref.
    """
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def grpo_loss(
    model: nn.Module, batch: Batch, *, clip: float = 0.2, beta: float = 0.04
) -> LossOutput:
    """GRPO (DeepSeekMath): the clipped policy loss with each reply's group-relative advantage
    on all its tokens, plus beta x the k3 KL to the reference, summed over reply tokens (each
    token weighs the same, DAPO's token-level normalisation). No value head: model is the policy.
    batch: a RolloutBatch with old_logprobs, ref_logprobs and advantages (B, T).
    """
    logp, entropy, _ = reply_terms(model, batch.inputs, batch.targets)
    keep = batch.targets != IGNORE_INDEX
    pg, metrics = _clipped_policy(logp, batch.old_logprobs[keep], batch.advantages[keep], clip)
    kl = kl_k3(logp, batch.ref_logprobs[keep])
    metrics |= {
        "policy_loss": pg.mean().item(),
        "kl_k3": kl.mean().item(),
        "entropy": entropy.mean().item(),
    }
    return LossOutput((pg + beta * kl).sum(), batch.n_targets, metrics | batch.stats)
