"""AdamW with weight decay on matrices only, and the learning-rate schedule.

Weight decay goes to every parameter with two or more dimensions: the linear layers and the
embedding table (with tied embeddings it is also the output head; nanoGPT decays it too). Biases,
norm gains and other vectors are not decayed: shrinking a norm gain towards zero fights the
normalisation instead of regularising anything.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from pellucid.train.trainer import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed group (dim >= 2) and an undecayed one."""
    params = [p for p in model.parameters() if p.requires_grad]  # shared (tied) ones appear once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups`, fused into one kernel where the device supports it.

    The fused implementation exists for CPU, CUDA and MPS in current PyTorch and is much faster
    than `foreach` on CPU as well (one pass over memory instead of a dozen small kernels per
    tensor list), which matters for small models whose step is bound by optimizer overhead.
    """
    groups = param_groups(model, cfg.weight_decay)
    betas = (cfg.betas[0], cfg.betas[1])
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=True)
    except (RuntimeError, TypeError):  # a device without a fused kernel
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, foreach=True)


def lr_at(step: int, cfg: TrainConfig, progress: float | None = None) -> float:
    """Learning rate for the step with 0-based index `step`: linear warmup, then cosine to min_lr.

    Warmup rises linearly to `cfg.lr` over `warmup_steps` steps (the first step already uses
    lr / warmup_steps, never 0). By steps (`progress` None), the cosine then falls from `cfg.lr`
    at the end of warmup to `cfg.min_lr` at the last step, `max_steps - 1`. A time-budgeted run
    passes `progress`, the fraction of its time budget spent (0..1): the cosine follows the
    clock instead, so it reaches `min_lr` exactly when the time is up, whatever the step rate.
    """
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if progress is not None:
        return warm * _cosine(min(1.0, max(0.0, progress)), cfg)
    if step < cfg.warmup_steps:
        return cfg.lr * warm
    span = max(1, cfg.max_steps - 1 - cfg.warmup_steps)
    return _cosine(min(1.0, (step - cfg.warmup_steps) / span), cfg)


def _cosine(progress: float, cfg: TrainConfig) -> float:
    """cfg.lr at progress 0, falling along half a cosine to cfg.min_lr at progress 1."""
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write `lr` into every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
