"""`pellucid rlhf`: PPO or GRPO from a policy, a reward (model, oracle or task check) and prompts."""

from __future__ import annotations

import argparse


def add_rlhf(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rlhf", help="align a model with PPO or GRPO against a reward")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. rl.iterations=20")
    p.add_argument("--policy", help="model to start from (default smollm2-135m-instruct)")
    p.add_argument("--reward", help="'tasks' (exact match, verifiable), 'oracle:NAME', or a "
                   "reward-model spec (a `pellucid reward train` run)")  # fmt: skip
    p.add_argument("--prompts", help='JSONL of {"prompt", "answer"?} to train on')
    p.add_argument("--eval-prompts", help="held-out prompts (default: some of --prompts)")
    p.add_argument("--oracle", help="oracle judging the held-out win rate vs the starting model")
    p.add_argument("--out", help="run directory to create (default runs/<algo>-<timestamp>)")
    p.add_argument("--algo", choices=("ppo", "grpo"), default="ppo")
    p.add_argument(
        "--lora", action="store_true", help="train LoRA adapters; reference = adapters off"
    )
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint")
    p.add_argument("--json", action="store_true", help="print the scores as one JSON object")
    p.set_defaults(handler=cmd_rlhf)


def cmd_rlhf(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pellucid import rlhf
    from pellucid.cli.common import emit_json
    from pellucid.errors import ConfigError

    extra = [f"{k}={v}" for k, v in (("eval_prompts", args.eval_prompts), ("oracle", args.oracle))
             if v]  # fmt: skip
    if args.resume:
        if args.policy or args.reward or args.prompts or args.out or args.lora:
            raise ConfigError("--resume takes models, prompts and settings from RUN_DIR; pass "
                              "only key=value overrides")  # fmt: skip
        result = rlhf.resume(Path(args.resume), extra + args.overrides)
    else:
        run = rlhf.load_rlhf_config(
            args.policy, args.reward or "tasks", args.prompts or "", algo=args.algo,
            lora=args.lora, assignments=extra + args.overrides,
        )  # fmt: skip
        result = rlhf.rlhf(run, Path(args.out) if args.out else None)
    if args.json:
        drop = ("replies",)
        emit_json({k: {n: v for n, v in s.items() if n not in drop}
                   for k, s in (("before", result.before), ("after", result.after))})  # fmt: skip
        return 0
    print(f"before: {rlhf.format_scores(result.before)}")
    print(f"after:  {rlhf.format_scores(result.after)}  ({result.state.step} steps)")
    print(f"run directory: {result.run_dir} (a model spec: pellucid chat --model {result.run_dir})")
    print(f"  report: {result.run_dir / 'report.md'}")
    return 0
