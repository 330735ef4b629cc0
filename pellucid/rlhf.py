"""`pellucid rlhf`: PPO or GRPO from a policy, a reward and a prompts file, through the one trainer.

    run = load_rlhf_config("smollm2-135m-instruct", "tasks", "tasks.jsonl", algo="grpo",
                           lora=True, assignments=["rl.iterations=10"])
    result = rlhf(run, Path("runs/grpo"))

A run composes `rl` (RLConfig: the algorithm and its numbers), `lora` and `train` around three
specs: the policy to start from (any model spec: a base, an SFT run), the reward and the prompts.
The reward is

    tasks          verifiable: 1 when the reply equals the prompt's answer (train/evaluate.py's
                   normaliser), else 0; the prompts need answers (`pellucid data tasks`)
    oracle:NAME    an oracle ranker's score (align/oracle.py), a programmed stand-in for a person
    a model spec   a reward model (`pellucid reward train`), read at the reply's last token

The reference is the starting policy, frozen: under LoRA the same weights with the adapters off
(no second copy). PPO trains ScalarHead(policy), whose head is the value function; GRPO trains
the policy alone. Before and after training, greedy replies to held-out prompts are scored:
exact match (prompts with answers), the reward, the oracle's win rate of the new replies against
the starting model's (ties half), and the KL to the reference along the replies (as DPO is
measured, align/evaluate.py). The run directory is a model spec like any other and holds

    config.json  finetune.json  metrics.jsonl  rl.png  eval.json  report.md  checkpoints/step_*/
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pellucid import config
from pellucid.align import oracle as oracles
from pellucid.align.dpo import make_reference
from pellucid.align.evaluate import greedy_replies, oracle_scores, reply_kl
from pellucid.align.reward import need_reward_model, score_replies
from pellucid.align.rollouts import Reward, RLConfig, Rollouts, policy_of
from pellucid.data.preferences import PromptRow, read_prompts
from pellucid.data.tasks import normalize_answer
from pellucid.errors import ConfigError, DataError
from pellucid.files import atomic_open, atomic_write, sha256_file
from pellucid.finetune import LoraConfig
from pellucid.recipes import config_hash, default_run_dir
from pellucid.train.objectives import grpo_loss, ppo_loss
from pellucid.train.precision import autocast, resolve_dtype
from pellucid.train.trainer import (
    TrainConfig,
    TrainState,
    resolve_device,
    seed_everything,
    train,
)
from pellucid.weights import adapter
from pellucid.weights.checkpoint import read_json
from pellucid.weights.resolve import DEFAULT_MODEL, load

log = logging.getLogger("pellucid")
PLOT = "rl.png"


@dataclass(kw_only=True)
class RLHFRun:
    """A whole PPO or GRPO run."""

    policy: str = DEFAULT_MODEL  # the model to start from (and the frozen reference)
    reward: str = "tasks"  # "tasks", "oracle:NAME" or a reward-model spec
    prompts: str = ""  # JSONL of {"prompt", "answer"?} to train on
    eval_prompts: str = ""  # held-out prompts; "" holds out eval_max rows of `prompts`
    eval_max: int = 32  # held-out prompts answered before and after
    oracle: str = ""  # judge of the held-out win rate against the starting model ("": none)
    save_every: int = 5  # iterations between checkpoints (0: only at the end)
    rl: RLConfig = field(default_factory=RLConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# RL from a trained model: a constant learning rate, no decay, a checkpoint every few iterations.
DEFAULTS = [
    "train.batch_size=8", "train.warmup_steps=0", "train.lr=1e-5", "train.min_lr=1e-5",
    "train.weight_decay=0", "train.eval_every=0", "train.log_every=1", "train.dtype=float32",
]  # fmt: skip
LORA_DEFAULTS = ["lora.enabled=true", "train.lr=2e-4", "train.min_lr=2e-4"]


@dataclass
class RLHFResult:
    """What a finished run produced."""

    run_dir: Path
    state: TrainState
    before: dict[str, Any]
    after: dict[str, Any]


def load_rlhf_config(
    policy: str | None, reward: str, prompts: str, *, algo: str = "ppo", lora: bool = False,
    assignments: list[str] = (),
) -> RLHFRun:  # fmt: skip
    """Defaults <- LoRA defaults (with `lora`) <- rl.algo <- key=value assignments."""
    run = RLHFRun(policy=policy or DEFAULT_MODEL, reward=reward, prompts=prompts)
    head = DEFAULTS + (LORA_DEFAULTS if lora else []) + [f"rl.algo={algo}"]
    return _derive(config.override(run, head + list(assignments)))


def _derive(run: RLHFRun) -> RLHFRun:
    """train.max_steps and checkpoint_every from the iterations: every optimizer step takes
    `grad_accum` minibatches of one iteration, `epochs` passes over its replies."""
    per_step = run.train.batch_size * run.train.grad_accum
    if run.rl.replies % per_step:
        raise ConfigError(
            f"train.batch_size x train.grad_accum ({per_step}) must divide the replies per "
            f"iteration (rl.prompts_per_iteration x rl.group_size = {run.rl.replies})"
        )
    steps = run.rl.epochs * run.rl.replies // per_step
    train = dataclasses.replace(
        run.train, max_steps=run.rl.iterations * steps, checkpoint_every=steps * run.save_every
    )
    return dataclasses.replace(run, train=train)


# --- rewards ------------------------------------------------------------------------------------


def task_reward(rows: list[PromptRow], replies: list[str]) -> list[float]:
    """1.0 for a reply equal to the row's answer after normalize_answer, else 0.0."""
    return [
        float(normalize_answer(t) == normalize_answer(r.answer or ""))
        for r, t in zip(rows, replies, strict=True)
    ]


def build_reward(spec: str, device: torch.device) -> tuple[Reward, str | None]:
    """The reward a spec names (see the module doc), and the reward model's path if it is one."""
    if spec == "tasks":
        return task_reward, None
    if spec.startswith("oracle:"):
        judge = oracles.get_oracle(spec.removeprefix("oracle:"))
        return lambda rows, replies: [
            judge.score(r.prompt, t, r.answer) for r, t in zip(rows, replies, strict=True)
        ], None  # fmt: skip
    loaded = load(spec, device=device)
    rm = need_reward_model(loaded, spec).eval().requires_grad_(False)
    tok, template = loaded.tokenizer, loaded.chat_template()

    def score(rows: Sequence[PromptRow], replies: Sequence[str]) -> list[float]:
        return score_replies(rm, tok, template, [r.prompt for r in rows], replies).tolist()

    return score, str(Path(loaded.source).resolve())


def _check_rows(rows: list[PromptRow], path: str, reward: str, oracle: str) -> None:
    if not rows:
        raise DataError(f"{path}: no prompts")
    if reward in ("tasks", "oracle:task") or oracle == "task":  # these compare with the answer
        missing = next((i for i, r in enumerate(rows) if r.answer is None), None)
        if missing is not None:
            raise DataError(
                f"{path}: row {missing + 1} has no 'answer', which the task reward needs"
            )


# --- evaluation ---------------------------------------------------------------------------------


def evaluate_policy(
    policy: nn.Module, loaded: Any, rows: list[PromptRow], reward: Reward, run: RLHFRun,
    reference: Any, baseline: list[str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Greedy replies to the held-out rows, their reward and exact match (rows with answers);
    with `baseline` (the starting model's replies) also the KL to the reference along them and
    the oracle's win rate over the baseline (align/evaluate.py, as DPO reports them)."""
    if not rows:
        return {"n": 0, "replies": []}
    tok, template = loaded.tokenizer, loaded.chat_template()
    replies = greedy_replies(policy, tok, template, rows, run.rl.max_new_tokens)
    scores = reward(rows, replies)
    out: dict[str, Any] = {"n": len(rows), "reward": sum(scores) / len(scores), "replies": replies}
    if all(r.answer is not None for r in rows):
        out["exact_match"] = sum(task_reward(rows, replies)) / len(rows)
    if baseline is not None and run.oracle:
        judge = oracles.get_oracle(run.oracle)
        out |= oracle_scores(
            policy, reference, tok, template, judge, rows, baseline, replies=replies
        )
    elif baseline is not None:
        out |= reply_kl(policy, reference, tok, template, rows, replies)
    return out


# --- the run ------------------------------------------------------------------------------------


def _held_out(run: RLHFRun) -> tuple[list[PromptRow], list[PromptRow]]:
    """(training rows, held-out rows): the eval file's, else a seeded eval_max of the prompts."""
    rows = read_prompts(run.prompts)
    _check_rows(rows, run.prompts, run.reward, run.oracle)
    if run.eval_prompts:
        held = read_prompts(run.eval_prompts)[: run.eval_max]
        _check_rows(held, run.eval_prompts, run.reward, run.oracle)
        seen = {r.prompt for r in held}
        return [r for r in rows if r.prompt not in seen], held
    order = list(range(len(rows)))
    random.Random(run.train.seed).shuffle(order)
    n = min(run.eval_max, len(rows) // 5)  # never more than a fifth of the prompts
    held = [rows[i] for i in sorted(order[:n])]
    return [rows[i] for i in sorted(order[n:])], held


def _meta(run: RLHFRun, loaded: Any, reward_model: str | None) -> dict[str, Any]:
    """finetune.json: the policy as the base (report.py follows it), and the reward model."""
    base = str(Path(loaded.source).resolve()) if Path(run.policy).exists() else run.policy
    return {
        "format": adapter.FORMAT,
        "base": base,
        "base_sha256": adapter.spec_sha256(loaded.source),
        "task": run.rl.algo,
        "method": "lora" if run.lora.enabled else "full",
        "lora": dataclasses.asdict(run.lora) if run.lora.enabled else None,
        "labels": None,
        "train_last": -1,
        "reward_model": reward_model,
    }


@dataclass
class _Parts:
    """A run's models and data, ready for the trainer."""

    loaded: Any  # the starting policy as loaded (tokenizer, template)
    model: nn.Module  # what trains: the policy (GRPO) or ScalarHead(policy) (PPO)
    policy: nn.Module
    reference: Any  # the frozen start (align/dpo.make_reference)
    reward: Reward
    rollouts: Rollouts
    held: list[PromptRow]
    meta: dict[str, Any]


def _build(run: RLHFRun) -> _Parts:
    """Prompts, reward, policy, reference and rollouts of a run (every input checked first)."""
    rows, held = _held_out(run)
    if run.oracle:
        oracles.get_oracle(run.oracle)  # an unknown name fails now, not after training
    device = resolve_device(run.train.device)
    reward, rm_path = build_reward(run.reward, device)
    loaded = load(run.policy)
    if loaded.tokenizer is None:
        raise ConfigError(f"model '{run.policy}' has no tokenizer; rlhf needs one")
    meta = _meta(run, loaded, rm_path)
    seed_everything(run.train.seed)  # LoRA's A and the value head are drawn from the run's seed
    model = adapter.build(loaded.model, meta).to(device)  # PPO: with its value head
    policy = policy_of(model)
    # The frozen start: under LoRA the policy with its adapters off, else a copy made now.
    reference = make_reference(policy)
    amp = partial(autocast, device, resolve_dtype(run.train.dtype, device))
    rollouts = Rollouts(
        model, loaded.tokenizer, loaded.chat_template(), rows, reward, run.rl,
        batch_size=run.train.batch_size, seed=run.train.seed, reference=reference, amp=amp,
    )  # fmt: skip
    return _Parts(loaded, model, policy, reference, reward, rollouts, held, meta)


def rlhf(run: RLHFRun, out_dir: Path | None = None, *, resume: bool = False) -> RLHFResult:
    """Train `run.policy` with PPO or GRPO into `out_dir` (or continue it with `resume`)."""
    run_dir = Path(out_dir) if out_dir is not None else default_run_dir(run.rl.algo)
    if not resume and ((run_dir / "checkpoints").exists() or (run_dir / "metrics.jsonl").exists()):
        raise ConfigError(
            f"{run_dir} already holds a run: pass --resume {run_dir} or another --out"
        )
    if not run.prompts:
        raise ConfigError("rlhf needs --prompts FILE.jsonl")
    p, rl = _build(run), run.rl
    objective = (
        partial(ppo_loss, clip=rl.clip, value_clip=rl.value_clip, vf_coef=rl.vf_coef)
        if rl.algo == "ppo"
        else partial(grpo_loss, clip=rl.clip, beta=rl.kl_coef)
    )
    files = {
        "config.json": json.dumps(config.to_dict(run), indent=1) + "\n",
        adapter.META_FILE: json.dumps(p.meta, indent=1) + "\n",
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        atomic_write(run_dir / name, text)
    scored = partial(evaluate_policy, p.policy, p.loaded, p.held, p.reward, run, p.reference)
    eval_file, t0 = run_dir / "eval.json", time.perf_counter()
    if resume and eval_file.is_file():
        before = read_json(eval_file)["before"]
    else:
        log.info("scoring the starting policy on %d held-out prompts ...", len(p.held))
        before = scored()
        atomic_write(eval_file, json.dumps({"before": before}, indent=1))
    state = train(p.model, objective, p.rollouts, run.train, run_dir, resume=resume, files=files)
    p.rollouts.end_iteration()
    after = scored(before["replies"])
    atomic_write(eval_file, json.dumps({"before": before, "after": after}, indent=1))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    plot_iterations(records, run_dir / PLOT)
    wall = time.perf_counter() - t0
    write_report(run_dir, run, p.meta, state, before, after, p.rollouts.history, wall)
    return RLHFResult(run_dir, state, before, after)


def resume(run_dir: Path, assignments: list[str] | None = None) -> RLHFResult:
    """Continue a run from its newest good checkpoint, with its own config (+ overrides, e.g. a
    larger rl.iterations)."""
    run = config.from_dict(RLHFRun, read_json(Path(run_dir) / "config.json"))
    return rlhf(_derive(config.override(run, assignments or [])), run_dir, resume=True)


# --- plot and report ----------------------------------------------------------------------------

_PANELS = (
    ("reward", "mean reward"),
    ("kl", "KL to the reference (nats / reply)"),
    ("entropy", "entropy (nats / token)"),
    ("clip_frac", "clip fraction"),
    ("value_error", "value error (MSE)"),
    ("kl_coef", "KL coefficient beta"),
    ("mixed_groups", "groups whose rewards differ"),  # GRPO: those that teach
)


def iteration_means(records: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """metrics.jsonl's per-step records -> per-iteration means of every number they carry."""
    sums: dict[int, dict[str, list[float]]] = {}
    for r in records:
        if "iteration" in r and not r.get("skipped"):
            per = sums.setdefault(int(r["iteration"]), {})
            for k, v in r.items():
                if isinstance(v, (int, float)):
                    per.setdefault(k, []).append(float(v))
    return {i: {k: sum(v) / len(v) for k, v in per.items()} for i, per in sorted(sums.items())}


def plot_iterations(records: list[dict[str, Any]], path: Path) -> None:
    """Reward, KL, entropy, clip fraction, value error, beta and (GRPO) the share of groups with
    differing rewards against iteration, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = iteration_means(records)
    panels = [(k, t) for k, t in _PANELS if any(k in m for m in means.values())]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        its = [i for i, m in means.items() if key in m]
        ax.plot(its, [means[i][key] for i in its], "o-", ms=3)
        ax.set(xlabel="iteration", title=title)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)


def format_scores(scores: dict[str, Any]) -> str:
    """'exact_match 0.4844, win_rate 0.7500, ...': the held-out numbers a run has."""
    keys = ("exact_match", "win_rate", "reward", "kl")
    return ", ".join(f"{k} {scores[k]:.4f}" for k in keys if isinstance(scores.get(k), float))


def write_report(
    run_dir: Path, run: RLHFRun, meta: dict, state: TrainState, before: dict, after: dict,
    history: list[dict[str, float]], wall_s: float,
) -> None:  # fmt: skip
    """report.md: the parent model, the reward, held-out scores before and after, the time split."""
    timed = [h for h in history if "update_s" in h]
    split = {k: sum(h[k] for h in timed) / max(len(timed), 1)
             for k in ("rollout_s", "scoring_s", "update_s")}  # fmt: skip
    per_iteration = (
        f"- per iteration (mean of this session's {len(timed)}): rollout "
        f"{split['rollout_s']:.1f} s, scoring {split['scoring_s']:.1f} s, update "
        f"{split['update_s']:.1f} s"
        if timed  # (a resumed run that had already finished runs none)
        else "- per iteration: none ran in this session (the run had reached rl.iterations)"
    )
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    data = [Path(p) for p in (run.prompts, run.eval_prompts) if p]
    lines = [
        f"# {run_dir.name}: {run.rl.algo.upper()} ({meta['method']})",
        "",
        "## Result (greedy replies to the held-out prompts)",
        f"- before: {format_scores(before)}",
        f"- after:  {format_scores(after)}  ({state.step} steps, {run.rl.iterations} iterations)",
        f"- curves: ![rl]({PLOT}) (per-step numbers in `metrics.jsonl`, replies in `eval.json`)",
        "",
        "## Lineage",
        f"- parent model (policy and reference): `{meta['base']}` sha256 {meta['base_sha256']}",
        f"- reward: `{run.reward}`"
        + (f"; win rate judged by the `{run.oracle}` oracle" if run.oracle else ""),
        *[f"- prompts: `{p.resolve()}` sha256 {sha256_file(p)}" for p in data],
        f"- parent checkpoint: {state.resumed_from or 'none'}; last: {state.checkpoint}",
        f"- config sha256: {config_hash(run)}; command: `{' '.join(sys.argv)}`",
        "",
        "## Compute",
        per_iteration,
        f"- {wall_s:.0f} s wall time this session (with evaluation); peak memory {peak_mb:.0f} MB; "
        f"{torch.get_num_threads()} threads",
        "",
        "## Config",
        f"```json\n{json.dumps(config.to_dict(run), indent=1)}\n```",
        "",
    ]
    atomic_write(run_dir / "report.md", "\n".join(lines))
