"""Rollouts: the policy answers prompts through the one Engine, the replies are scored, and the
scored replies come back as Batches for the one trainer, `epochs` passes of minibatches each.

One iteration (collected when the trainer asks for a batch and none is left):

    rollout   draw `prompts_per_iteration` prompts, `group_size` replies each, sampled by
              Engine.generate (the same decode loop as chat and the server); GRPO with
              rl.sampling_rounds > 1 draws more rounds of prompts until that many groups have
              replies that score differently, and keeps those (dynamic sampling)
    scoring   one no-grad forward of prompt + reply: the policy's log-probs of its own tokens
              (and its values, PPO), the reference's log-probs, the reward of each reply
    advantage PPO: KL-shaped per-token rewards, then GAE (ppo.py); GRPO: group-relative scores
    batches   `epochs` shuffled passes over the replies, `batch_size` replies per RolloutBatch

The trainer never learns it is running RL: it sees an iterator of batches and an objective
(`ppo_loss` or `grpo_loss`, train/objectives.py). Prompts, sampling seeds and shuffles are drawn
from (seed, iteration), so a resumed run goes on from the iteration its checkpoint was in
(`state()` / `load_state()`; the replies of an interrupted iteration are sampled again).
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from pellucid.align import ppo
from pellucid.align.pairs import conversation
from pellucid.data.batches import Batch
from pellucid.errors import ConfigError
from pellucid.infer.conversation import stop_token_ids
from pellucid.infer.engine import Engine
from pellucid.infer.sampling import SamplingParams
from pellucid.model.transformer import eval_mode
from pellucid.train.objectives import IGNORE_INDEX, reply_terms

if TYPE_CHECKING:
    from pellucid.data.preferences import PromptRow
    from pellucid.tokenizer.bpe import Tokenizer
    from pellucid.tokenizer.chat import ChatTemplate

# Reward of each reply: (prompt rows, reply texts) -> one float per reply.
Reward = Callable[[Sequence["PromptRow"], Sequence[str]], list[float]]


@dataclass(kw_only=True)
class RLConfig:
    """PPO and GRPO settings (the `rl.*` keys)."""

    algo: Literal["ppo", "grpo"] = "ppo"
    iterations: int = 20  # rollout + update rounds; train.max_steps follows from it
    prompts_per_iteration: int = 8
    group_size: int = 4  # replies sampled per prompt (GRPO's G, >= 2 there)
    max_new_tokens: int = 32  # reply budget
    temperature: float = 1.0  # sampling temperature of the rollouts (no top-k/top-p)
    epochs: int = 2  # K: passes of minibatches over each iteration's replies
    clip: float = 0.2  # PPO/GRPO ratio clip epsilon
    value_clip: float = 0.2  # PPO: how far a value may move from its rollout value
    vf_coef: float = 0.1  # PPO: weight of the value loss
    gamma: float = 1.0  # PPO: discount
    lam: float = 0.95  # PPO: GAE lambda
    kl_coef: float = 0.05  # PPO: initial KL penalty beta; GRPO: beta of the loss's KL term
    # GRPO: draw up to this many rounds of prompts_per_iteration prompts to find that many groups
    # whose replies' rewards differ (DAPO's dynamic sampling: a uniform group's advantages are
    # all zero, so it teaches nothing); 1 trains on the first round's groups as they come
    sampling_rounds: int = 1
    kl_target: float | None = 6.0  # PPO: KL (nats per reply) the controller aims at; None: fixed
    kl_horizon: int = 10000  # PPO: samples over which the controller makes a full correction
    # PPO: standardise each iteration's scores (mean 0, std 1) before the KL is subtracted, so
    # beta means the same whatever the reward's scale (an oracle's -30..0, a reward model's logit)
    normalize_scores: bool = True

    def __post_init__(self) -> None:
        for name in ("iterations", "prompts_per_iteration", "group_size", "max_new_tokens",
                     "sampling_rounds"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"config key 'rl.{name}' must be >= 1, got {getattr(self, name)}")
        if self.epochs < 1 or not (0 < self.clip < 1) or not self.temperature > 0:
            raise ConfigError(
                "config keys 'rl.epochs' >= 1, 0 < 'rl.clip' < 1 and 'rl.temperature' > 0; got "
                f"{self.epochs}, {self.clip}, {self.temperature}"
            )
        if self.algo == "grpo" and self.group_size < 2:
            raise ConfigError("GRPO compares replies: config key 'rl.group_size' must be >= 2")
        if self.algo != "grpo" and self.sampling_rounds > 1:
            raise ConfigError(
                "config key 'rl.sampling_rounds' > 1 filters GRPO's groups: needs rl.algo=grpo"
            )
        if self.kl_coef < 0 or (self.kl_target is not None and not self.kl_target > 0):
            raise ConfigError("config keys 'rl.kl_coef' must be >= 0 and 'rl.kl_target' > 0")

    @property
    def replies(self) -> int:
        """Replies per iteration."""
        return self.prompts_per_iteration * self.group_size


@dataclass
class RolloutBatch(Batch):
    """Scored replies for ppo_loss / grpo_loss. Every (B, T) tensor is over target positions:
    targets are the reply tokens (IGNORE_INDEX on the prompt and padding).

    old_logprobs: (B, T) the policy's log-prob of each target when it was sampled.
    ref_logprobs: (B, T) the reference's. advantages, returns, old_values: (B, T) (returns and
    old_values are PPO's, zeros under GRPO). stats: the iteration's numbers, logged with the loss.
    """

    old_logprobs: Tensor
    ref_logprobs: Tensor
    advantages: Tensor
    returns: Tensor
    old_values: Tensor
    stats: dict[str, float] = field(default_factory=dict)


def policy_of(model: nn.Module) -> nn.Module:
    """The language model inside what trains: PPO trains ScalarHead(policy) (its head is the value
    head), GRPO the policy alone."""
    return getattr(model, "trunk", model)


def _sampling(
    tokenizer: Tokenizer, temperature: float, max_new_tokens: int, seed: int
) -> SamplingParams:
    """Plain sampling (no top-k/top-p: the replies come from the distribution being trained)."""
    return SamplingParams(
        temperature=temperature, max_new_tokens=max_new_tokens,
        stop_token_ids=stop_token_ids(tokenizer), seed=seed,
    )  # fmt: skip


def sample_replies(
    engine: Engine, prompts: list[list[int]], params: SamplingParams
) -> list[tuple[list[int], str]]:
    """Each prompt's reply from the Engine: (token ids, a final stop token included; text)."""
    ids: list[list[int]] = [[] for _ in prompts]
    texts = [""] * len(prompts)
    for steps in engine.generate(prompts, params):
        for s in steps:
            ids[s.row].append(s.id)
            texts[s.row] += s.text
    return list(zip(ids, texts, strict=True))


def pack(prompts: list[list[int]], replies: list[list[int]]) -> tuple[Tensor, Tensor]:
    """prompt + reply rows, right-padded with 0: inputs (N, T) and targets (N, T) int64, targets
    the next token on reply positions and IGNORE_INDEX elsewhere (T = longest row - 1)."""
    rows = [p + r for p, r in zip(prompts, replies, strict=True)]
    T = max(map(len, rows)) - 1
    inputs = torch.zeros(len(rows), T, dtype=torch.int64)
    targets = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.int64)
    for i, (row, p) in enumerate(zip(rows, prompts, strict=True)):
        inputs[i, : len(row) - 1] = torch.tensor(row[:-1])
        targets[i, len(p) - 1 : len(row) - 1] = torch.tensor(row[len(p) :])
    return inputs, targets


def _length(targets: Tensor) -> int:
    """Columns of right-padded rows that hold a target: the last reply token's position + 1."""
    real = (targets != IGNORE_INDEX).any(0).nonzero()
    return int(real.max()) + 1 if len(real) else 1


def _spread(keep: Tensor, per_token: Tensor | None) -> Tensor:
    """(N,) numbers at the True positions of keep (B, T) -> (B, T) float32 on the CPU, 0 elsewhere."""
    full = torch.zeros(keep.shape, dtype=torch.float32)
    if per_token is not None:
        full[keep.cpu()] = per_token.float().cpu()
    return full


class Rollouts:
    """An endless iterator of RolloutBatch: collect an iteration, yield its minibatches, repeat.

    model: what the trainer trains (ScalarHead(policy) for PPO, the policy for GRPO).
    reference: the frozen starting policy, anything with forward_hidden and logits
    (align/dpo.make_reference: the policy with its adapters off under LoRA, else a frozen copy).
    rows: the prompts; reward: scores replies; batch_size: replies per RolloutBatch (a divisor
    of cfg.replies); amp: the trainer's autocast, so scoring sees the numbers training will.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        rows: Sequence[PromptRow],
        reward: Reward,
        cfg: RLConfig,
        *,
        batch_size: int,
        seed: int,
        reference: Any,
        amp: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> None:
        if cfg.replies % batch_size:
            raise ConfigError(
                f"train.batch_size ({batch_size}) must divide the replies per iteration "
                f"(rl.prompts_per_iteration x rl.group_size = {cfg.replies})"
            )
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.rows, self.reward, self.cfg = list(rows), reward, cfg
        self.batch_size, self.seed, self.reference, self.amp = batch_size, seed, reference, amp
        self.prompt_ids = [template.encode(tokenizer, conversation(r.prompt))
                           for r in self.rows]  # fmt: skip
        self.kl = ppo.KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        self.iteration = 0  # iterations collected so far
        self.queue: list[RolloutBatch] = []
        self.history: list[dict[str, float]] = []  # one record per iteration collected
        self._ready_at = 0.0  # when the latest iteration's batches were ready

    def __iter__(self) -> Rollouts:
        return self

    def __next__(self) -> RolloutBatch:
        if not self.queue:
            self.queue = self.collect()
        return self.queue.pop(0)

    def state(self) -> dict[str, Any]:
        """Where the run stands: the iteration to collect next and the KL coefficient."""
        done = self.iteration if not self.queue else self.iteration - 1
        return {"iteration": done, "kl_coef": self.kl.value}

    def load_state(self, state: dict[str, Any]) -> None:
        self.iteration, self.kl.value, self.queue = int(state["iteration"]), state["kl_coef"], []

    def end_iteration(self) -> None:
        """Record the update time of the latest iteration: since its batches were ready (called
        when the next one is collected, and by the run after the last one)."""
        if self.history and "update_s" not in self.history[-1]:
            self.history[-1]["update_s"] = time.perf_counter() - self._ready_at

    def collect(self) -> list[RolloutBatch]:
        """Sample, score and batch one iteration; returns its `epochs` passes of minibatches."""
        self.end_iteration()
        now = time.perf_counter()
        rng = random.Random(f"{self.seed}:{self.iteration}")
        picks, replies, scores, drawn = self._sample_groups(rng)
        reward_s = drawn.pop("reward_s")  # scoring's, though paid between the rounds
        t_rollout = time.perf_counter() - reward_s
        prompts = [self.prompt_ids[i] for i in picks]
        inputs, targets = pack(prompts, [ids for ids, _ in replies])
        data = self._score(inputs, targets, torch.tensor(scores, dtype=torch.float32))
        stats = {
            "iteration": self.iteration,
            **drawn,
            "reply_tokens": sum(len(ids) for ids, _ in replies) / len(replies),
            "rollout_s": t_rollout - now,
            "scoring_s": time.perf_counter() - t_rollout,
            **data.pop("stats"),
        }
        self.history.append(dict(stats))
        self.iteration += 1
        self._ready_at = time.perf_counter()
        return self._minibatches(inputs, targets, data, stats, rng)

    def _sample_groups(
        self, rng: random.Random
    ) -> tuple[list[int], list[tuple[list[int], str]], list[float], dict[str, float]]:
        """One iteration's replies: (row of each reply, (ids, text) replies, rewards, stats).

        Each round draws prompts_per_iteration new prompts and samples group_size replies to
        each, a group's replies together. With rl.sampling_rounds > 1, rounds go on until that
        many groups with differing rewards are found; those are kept, topped up with uniform
        groups if the rounds run out, in the order drawn. `reward` in the stats is the mean over
        every reply sampled (the policy's success rate, not the filtered batch's).
        """
        cfg, n, G = self.cfg, self.cfg.prompts_per_iteration, self.cfg.group_size
        order = list(range(len(self.rows)))
        policy, groups = policy_of(self.model), []  # (row, [(ids, text)] * G, [reward] * G)
        reward_s = 0.0
        for r in range(cfg.sampling_rounds):
            if r == 0:  # the first round draws as runs before dynamic sampling did
                picks = rng.sample(order, n) if n <= len(order) else rng.choices(order, k=n)
            else:
                unused = sorted(set(order) - {g[0] for g in groups}) or order
                picks = rng.sample(unused, min(n, len(unused)))
            params = _sampling(
                self.tokenizer, cfg.temperature, cfg.max_new_tokens, rng.randrange(2**31)
            )
            rows = [i for i in picks for _ in range(G)]
            replies = sample_replies(
                Engine(policy, self.tokenizer), [self.prompt_ids[i] for i in rows], params
            )
            t = time.perf_counter()
            scores = self.reward([self.rows[i] for i in rows], [text for _, text in replies])
            reward_s += time.perf_counter() - t
            groups += [(i, replies[k * G : (k + 1) * G], scores[k * G : (k + 1) * G])
                       for k, i in enumerate(picks)]  # fmt: skip
            mixed = [k for k, g in enumerate(groups) if len(set(g[2])) > 1]
            if len(mixed) >= n:
                break
        uniform = sorted(set(range(len(groups))) - set(mixed))
        kept = sorted((mixed + uniform)[:n])  # one round: all n groups, as drawn
        everything = [s for g in groups for s in g[2]]
        drawn = {"reward": sum(everything) / len(everything), "reward_s": reward_s}
        if cfg.algo == "grpo":
            drawn |= {"mixed_groups": len(mixed) / len(groups), "sampling_rounds": r + 1}
        picks = [groups[k][0] for k in kept for _ in range(G)]
        replies = [reply for k in kept for reply in groups[k][1]]
        return picks, replies, [s for k in kept for s in groups[k][2]], drawn

    @torch.no_grad()
    def _score(self, inputs: Tensor, targets: Tensor, scores: Tensor) -> dict[str, Any]:
        """Log-probs (policy, reference), values and advantages of packed replies, (N, T) each."""
        cfg, policy = self.cfg, policy_of(self.model)
        head = self.model.head if cfg.algo == "ppo" else None
        device = next(self.model.parameters()).device
        parts: dict[str, list[Tensor]] = {"logp": [], "entropy": [], "values": [], "ref": []}
        with eval_mode(self.model), self.amp():
            for i in range(0, len(inputs), self.batch_size):
                y = targets[i : i + self.batch_size]
                T = _length(y)  # this chunk's rows run only as far as its longest reply
                x, y = inputs[i : i + self.batch_size, :T].to(device), y[:, :T].to(device)
                logp, entropy, values = reply_terms(policy, x, y, head)
                ref_logp = reply_terms(self.reference, x, y)[0]
                keep = targets[i : i + self.batch_size] != IGNORE_INDEX
                for k, v in zip(parts, (logp, entropy, values, ref_logp), strict=True):
                    parts[k].append(_spread(keep, v))
        logp, entropy, values, ref = (torch.cat(parts[k]) for k in parts)
        mask = targets != IGNORE_INDEX
        kl = ppo.kl_per_token(logp, ref) * mask  # (N, T)
        kl_reply = kl.sum(-1).mean().item()  # nats per reply
        stats = {"kl": kl_reply, "kl_coef": self.kl.value, "score_std": scores.std(correction=0).item(),
                 "rollout_entropy": (entropy.sum() / mask.sum()).item()}  # fmt: skip
        if cfg.algo == "ppo":
            if cfg.normalize_scores:
                scores = ppo.whiten(scores, torch.ones_like(scores, dtype=torch.bool))
            rewards = ppo.token_rewards(scores, kl, mask, self.kl.value)
            advantages, returns = ppo.gae(rewards, values, mask, cfg.gamma, cfg.lam)
            advantages = ppo.whiten(advantages, mask)
            self.kl.update(kl_reply, len(inputs))
        else:
            advantages = ppo.group_advantages(scores, cfg.group_size).unsqueeze(-1) * mask
            returns = torch.zeros_like(values)
        return {"old_logprobs": logp, "ref_logprobs": ref, "advantages": advantages,
                "returns": returns, "old_values": values, "stats": stats}  # fmt: skip

    def _minibatches(
        self,
        inputs: Tensor,
        targets: Tensor,
        data: dict[str, Tensor],
        stats: dict[str, float],
        rng: random.Random,
    ) -> list[RolloutBatch]:
        """`epochs` shuffled passes, `batch_size` replies each, trimmed to their longest row."""
        out = []
        for _ in range(self.cfg.epochs):
            order = list(range(len(inputs)))
            rng.shuffle(order)
            for i in range(0, len(order), self.batch_size):
                idx = torch.tensor(order[i : i + self.batch_size])
                T = _length(targets[idx])
                cut = {k: v[idx, :T] for k, v in data.items()}
                out.append(RolloutBatch(inputs[idx, :T], targets[idx, :T], **cut, stats=stats))
        return out
