"""The arithmetic of RLHF, as pure functions: KL penalty, the KL controller, GAE, group advantages.

PPO (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"; Ouyang et al.
2022) turns one scored reply into per-token rewards: every token pays beta times its KL to the
frozen reference, and the last token also receives the reward model's score,

    r_t = -beta * (log pi(y_t | .) - log ref(y_t | .))  +  [t = last] * score

then Generalised Advantage Estimation (Schulman et al. 2016) spreads them over the reply with a
learnt value V(s_t):

    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)        A_t = delta_t + gamma * lam * A_{t+1}

and beta itself is steered towards a target KL by the adaptive controller of Ziegler et al.

GRPO (Shao et al. 2024, DeepSeekMath) drops the value function: it samples G replies per prompt
and gives every token of reply i the advantage (score_i - mean of its group) / (std of its group).

Every tensor is (B, T) over target positions (position t predicts token t + 1 of the row), with
`mask` (B, T) bool true on the reply's tokens; everything off the mask comes back as zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pellucid.errors import ConfigError


def kl_per_token(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """The sampled estimate of KL(pi || ref) at each token: log pi - log ref, (B, T).

    Its expectation under pi is the true KL; per token it can be negative. Summed over a reply it
    is log pi(reply) / ref(reply), the reply's KL estimate.
    """
    return logprobs - ref_logprobs


def token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, beta: float) -> Tensor:
    """Per-token rewards: -beta * kl on every reply token, plus the reply's score on its last.

    scores: (B,) one number per reply; kl: (B, T); mask: (B, T) bool. Returns (B, T), zero off
    the mask. A reply is contiguous on its row, so its last token is the mask's last True.
    """
    rewards = -beta * kl * mask
    T = mask.shape[1]
    last = T - 1 - mask.flip(-1).int().argmax(dim=-1)  # (B,)
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation over each row's reply: (advantages, returns), (B, T).

    rewards, values: (B, T) float; mask: (B, T) bool, True on reply tokens (one contiguous run
    per row). After the reply's last token the episode ends: V = 0 there. returns = A + V are
    the value function's regression targets. Both are zero off the mask.
    """
    m = mask.to(values.dtype)
    rewards, values = rewards * m, values * m  # nothing flows in from padding
    B, T = values.shape
    advantages = torch.zeros_like(values)
    running = torch.zeros(B, dtype=values.dtype, device=values.device)  # A_{t+1}
    for t in reversed(range(T)):
        if t + 1 < T:
            next_value, running = values[:, t + 1], running * m[:, t + 1]
        else:
            next_value = torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * m  # the prompt positions before a reply carry nothing
    return advantages, (advantages + values) * m


def whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the masked entries (the whole rollout batch); zero off the mask."""
    values = x[mask]
    if values.numel() < 2:
        return x * mask
    return (x - values.mean()) / (values.std() + eps) * mask


def group_advantages(scores: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """GRPO's advantage of each reply against the others sampled for the same prompt.

    scores: (N,) with N = prompts * group_size, the replies of one prompt consecutive.
    Returns (N,): (score - group mean) / (group std + eps). Each group's advantages sum to zero;
    a group whose replies all score the same teaches nothing (all zero).
    """
    if group_size < 2 or scores.numel() % group_size:
        raise ConfigError(
            f"GRPO needs groups of >= 2 replies that divide the batch; got {scores.numel()} "
            f"replies in groups of {group_size}"
        )
    g = scores.float().view(-1, group_size)  # (prompts, G)
    centred = g - g.mean(dim=1, keepdim=True)
    return (centred / (g.std(dim=1, keepdim=True) + eps)).view(-1)


@dataclass
class KLController:
    """Ziegler et al.'s adaptive KL coefficient: beta grows when the KL overshoots the target and
    shrinks when it undershoots, by at most 20% of the error per `horizon` samples.

        e = clip(KL / target - 1, -0.2, 0.2)       beta <- beta * (1 + e * n / horizon)

    target None keeps beta fixed.
    """

    value: float = 0.05  # beta, the current coefficient
    target: float | None = 6.0  # the KL (nats per reply) to steer towards
    horizon: int = 10000  # samples over which a full correction is made

    def update(self, kl: float, n_samples: int) -> float:
        """Adjust beta after an iteration whose replies had mean KL `kl`; returns the new beta."""
        if self.target is not None and math.isfinite(kl):
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_samples / self.horizon
        return self.value
