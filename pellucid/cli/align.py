"""`pellucid reward`, `pellucid dpo` and `pellucid report`: alignment runs and a model's lineage."""

from __future__ import annotations

import argparse

from pellucid.cli.common import emit_json
from pellucid.cli.finetune import add_run_flags

_PAIRS = 'preference pairs JSONL: {"prompt", "chosen", "rejected"} a line'


def add_reward(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reward", help="train a reward model on preference pairs, or score a reply")
    verbs = p.add_subparsers(dest="reward_cmd", required=True, metavar="VERB")
    t = verbs.add_parser("train", help="Bradley-Terry reward model: base + scalar head (--lora)")
    add_run_flags(t, _PAIRS, "held-out pairs JSONL: accuracy before/after, kept out of training")
    t.set_defaults(task="reward")
    s = verbs.add_parser("score", help="print the reward of a reply to a prompt")
    s.add_argument("--model", required=True, help="a reward model (a `reward train` run dir)")
    s.add_argument("--prompt", required=True)
    s.add_argument("--response", required=True, action="append", help="repeatable")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(handler=cmd_reward_score)


def cmd_reward_score(args: argparse.Namespace) -> int:
    from pellucid.align.reward import need_reward_model, score_replies
    from pellucid.weights.resolve import load

    loaded = load(args.model)
    rm = need_reward_model(loaded, args.model)
    n = len(args.response)
    rewards = score_replies(
        rm, loaded.tokenizer, loaded.chat_template(), [args.prompt] * n, args.response
    ).tolist()
    if args.json:
        emit_json({"rewards": rewards})
        return 0
    for r in rewards:
        print(f"{r:.4f}")
    return 0


def add_dpo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dpo", help="align a model to preference pairs with DPO (--lora)")
    add_run_flags(
        p, _PAIRS, "held-out prompts JSONL: with dpo.oracle=NAME, win rate vs the start model"
    )
    p.set_defaults(task="dpo")


def add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="a model's whole lineage, each stage measured the same way")
    p.add_argument("run", help="a run directory (SFT, reward, DPO, PPO, GRPO)")
    p.add_argument("--oracle", default="", help="oracle judging the prompts (default: the run's)")
    p.add_argument("--prompts", default="", help="held-out prompts JSONL (default: the run's)")
    p.add_argument("--tasks", default="", help="task JSONL for exact match and bits per byte")
    p.add_argument("--n-tasks", type=int, default=50, help="generated tasks when no --tasks")
    p.add_argument("--pairs", default="", help="held-out pairs JSONL for reward models")
    p.add_argument("--plot", help="PNG to draw (default RUN/lineage.png)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pellucid.align import report

    y = report.yardsticks(
        args.run, oracle=args.oracle, prompts=args.prompts, tasks=args.tasks,
        pairs=args.pairs, n_tasks=args.n_tasks,
    )  # fmt: skip
    line = report.evaluate_line(args.run, y)
    plot = Path(args.plot) if args.plot else Path(args.run) / report.PLOT_FILE
    report.plot_line(line, plot)
    if args.json:
        emit_json([{"spec": s.spec, "kind": s.kind, "method": s.method, **s.scores} for s in line])
        return 0
    cols = [c for c in report.COLUMNS if any(c in s.scores for s in line)]
    print("| # | stage | model | " + " | ".join(cols) + " |")
    print("|---|---|---|" + "---:|" * len(cols))
    for i, s in enumerate(line):
        cells = [f"{s.scores[c]:.3f}" if c in s.scores else "" for c in cols]
        kind = f"{s.kind} ({s.method})" if s.method else s.kind
        print(f"| {i} | {kind} | {s.spec} | " + " | ".join(cells) + " |")
    if y.oracle is not None:
        print(f"win rate: the {y.oracle.name} oracle, vs the base, {len(y.prompts)} prompts")
    print(f"plot: {plot}")
    return 0
