"""RLHF figures (issue 12, item 6): GRPO on the verifiable task reward, PPO against a reward model,
and where a PPO iteration spends its time.

    python bench/rl.py grpo --policy SFT_RUN          # held-out exact match before/after GRPO
    python bench/rl.py ppo --policy M --reward RM --oracle words --prompts P --eval-prompts H
                                                      # oracle win rate vs the start, KL
    python bench/rl.py timing --reward RM --prompts P # rollout / scoring / update seconds of a
                                                      # PPO iteration, for K epochs and lengths

`grpo` and `ppo` run `pellucid.rlhf.rlhf` (the code behind `pellucid rlhf`) and print one JSON line
with the held-out numbers before and after, the run's per-iteration time split, wall time and the
process's peak resident memory. `grpo` writes its prompts with the task generator (training prompts
seed 2, held-out seed 1, the SFT data of bench/finetune.py is seed 0) unless given files.

`timing` builds SmolLM2-135M-Instruct with LoRA and a value head once per setting, runs
`--iterations` PPO iterations through the real trainer and reports the last one's split: rollout
(the Engine sampling the replies), scoring (policy, reference and value forwards plus the reward
model) and update (K epochs of minibatches: forward, backward, AdamW). Replies are capped at L new
tokens; the oracle prompts ask for long answers, so most replies reach the cap.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import re
import resource
import subprocess
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from pellucid.align.dpo import make_reference
from pellucid.align.rollouts import RLConfig, Rollouts, policy_of
from pellucid.data.preferences import read_prompts
from pellucid.data.tasks import make_tasks
from pellucid.model.heads import ScalarHead
from pellucid.model.lora import apply_lora
from pellucid.rlhf import build_reward, load_rlhf_config, rlhf
from pellucid.train.objectives import ppo_loss
from pellucid.train.trainer import TrainConfig, train
from pellucid.weights.resolve import load

MODEL = "smollm2-135m-instruct"


def machine() -> dict:
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = re.search(r"model name\s*:\s*(.*)", cpu)
    commit = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "--short",
                             "HEAD"], capture_output=True, text=True).stdout.strip()  # fmt: skip
    return {
        "cpu": name.group(1).strip() if name else "?", "amx": " amx" in cpu,
        "threads": torch.get_num_threads(), "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_average": [round(x, 1) for x in os.getloadavg()],
    }  # fmt: skip


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def split_means(history: list[dict]) -> dict:
    keys = ("rollout_s", "scoring_s", "update_s", "reply_tokens")
    done = [h for h in history if "update_s" in h]
    return {k: round(sum(h[k] for h in done) / max(len(done), 1), 2) for k in keys}


def cmd_run(args: argparse.Namespace) -> dict:
    out = Path(args.out or tempfile.mkdtemp(prefix=f"rl-{args.figure}-"))
    out.mkdir(parents=True, exist_ok=True)
    prompts, held = args.prompts, args.eval_prompts
    if args.figure == "grpo" and not prompts:
        for name, seed, n in (("prompts", 2, 1000), ("held", 1, args.n_held)):
            rows = make_tasks("mix", n, seed)
            (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        prompts, held = str(out / "prompts.jsonl"), str(out / "held.jsonl")
    sets = [f"eval_prompts={held}", f"eval_max={args.n_held}", "train.progress=false",
            *args.set]  # fmt: skip
    if args.oracle:
        sets.append(f"oracle={args.oracle}")
    reward = args.reward or ("tasks" if args.figure == "grpo" else "")
    run = load_rlhf_config(args.policy, reward, prompts, algo=args.figure, lora=True,
                           assignments=sets)  # fmt: skip
    t0 = time.perf_counter()
    result = rlhf(run, out / "run")
    wall = time.perf_counter() - t0
    history = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    drop = ("replies",)
    return {
        "figure": args.figure, "policy": args.policy, "reward": reward, "oracle": args.oracle,
        "iterations": run.rl.iterations, "steps": result.state.step,
        "before": {k: v for k, v in result.before.items() if k not in drop},
        "after": {k: v for k, v in result.after.items() if k not in drop},
        "reward_first_last_iteration": [history[0]["reward"], history[-1]["reward"]],
        "wall_s": round(wall), "peak_rss_mb": round(peak_rss_mb()), "run_dir": str(out / "run"),
        "config": dataclasses.asdict(run.rl), "lr": run.train.lr,
    }  # fmt: skip


def time_setting(loaded, reward, rows, epochs: int, length: int, args) -> dict:
    """One PPO setting: fresh LoRA + value head over a copy of the base; the last iteration's split."""
    policy = copy.deepcopy(loaded.model)
    apply_lora(policy, rank=8, alpha=16)
    model = ScalarHead(policy)
    cfg = RLConfig(iterations=args.iterations, prompts_per_iteration=args.prompts_per_iteration,
                   group_size=args.group_size, max_new_tokens=length, epochs=epochs)  # fmt: skip
    ro = Rollouts(model, loaded.tokenizer, loaded.chat_template(), rows, reward, cfg,
                  batch_size=args.batch, seed=0, reference=make_reference(policy_of(model)))  # fmt: skip
    steps = epochs * cfg.replies // args.batch
    tc = TrainConfig(max_steps=args.iterations * steps, batch_size=args.batch, lr=2e-4,
                     min_lr=2e-4, warmup_steps=0, weight_decay=0, checkpoint_every=0,
                     progress=False, dtype="float32")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        train(model, partial(ppo_loss), ro, tc, Path(tmp))
    ro.end_iteration()
    last = ro.history[-1]
    return {"epochs": epochs, "max_new_tokens": length, "replies": cfg.replies,
            **{k: round(last[k], 2) for k in ("rollout_s", "scoring_s", "update_s", "reply_tokens")}}  # fmt: skip


def cmd_timing(args: argparse.Namespace) -> dict:
    loaded = load(args.policy)
    reward, _ = build_reward(args.reward, torch.device("cpu"))
    rows = read_prompts(args.prompts)
    grid = [(k, args.length) for k in args.epochs] + [
        (2, n) for n in args.lengths if n != args.length
    ]
    t0 = time.perf_counter()
    results = [time_setting(loaded, reward, rows, k, n, args) for k, n in grid]
    return {"figure": "timing", "reward": args.reward, "settings": results,
            "wall_s": round(time.perf_counter() - t0), "peak_rss_mb": round(peak_rss_mb())}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="figure", required=True)
    for name in ("grpo", "ppo"):
        s = sub.add_parser(name)
        s.add_argument("--policy", default=MODEL)
        s.add_argument("--reward", help="default: tasks (grpo)")
        s.add_argument("--prompts", help="default (grpo): 1000 generated mix tasks, seed 2")
        s.add_argument("--eval-prompts", help="default (grpo): generated mix tasks, seed 1")
        s.add_argument("--oracle", default="")
        s.add_argument("--n-held", type=int, default=64)
        s.add_argument("--out")
        s.add_argument("--set", action="append", default=[], help="key=value for the run")
    t = sub.add_parser("timing")
    t.add_argument("--policy", default=MODEL)
    t.add_argument("--reward", default="oracle:words", help="a reward-model spec, or an oracle")
    t.add_argument("--prompts", required=True)
    t.add_argument("--epochs", type=int, nargs="+", default=[1, 2, 4])
    t.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64])
    t.add_argument("--length", type=int, default=32, help="the length of the epochs sweep")
    t.add_argument("--iterations", type=int, default=2)
    t.add_argument("--prompts-per-iteration", type=int, default=4)
    t.add_argument("--group-size", type=int, default=2)
    t.add_argument("--batch", type=int, default=4)
    args = p.parse_args()
    result = cmd_timing(args) if args.figure == "timing" else cmd_run(args)
    print(json.dumps({**result, "machine": machine()}))


if __name__ == "__main__":
    main()
