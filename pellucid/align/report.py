"""A model's lineage: every stage from the base to RUN, measured the same way, in one table.

Each run directory names its parent in finetune.json ("base") and report.md; a reward-model
run, a DPO run, an SFT run, a PPO/GRPO run are all such directories. `lineage(RUN)` walks the
parents back to the base (a model name, .gguf or HF folder) and adds any reward model a stage
was trained against ("reward_model"), giving e.g.

    base -> SFT -> reward model -> PPO          base -> SFT -> DPO

`evaluate_line` then measures every stage with the same yardsticks:

    win_rate      the oracle's verdict, stage vs base, on greedy replies to held-out prompts
                  (ties half; the base scores 0.5 against itself by definition)
    oracle_score  the oracle's mean score of the stage's replies
    exact_match   greedy answers to generated tasks, compared as `pellucid eval` does
    kl            KL(stage || base) along the stage's replies, nats per reply
    bits_per_byte the base-independent loss of the tasks' reference answers (a fixed text)
    pairwise_accuracy   reward models only: on held-out preference pairs

Measurements are cached in RUN/lineage.json under a key of the stage and the settings, so a
second `pellucid report` is instant. `plot_line` draws the numbers per stage (matplotlib).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pellucid.align.evaluate import greedy_replies, oracle_scores
from pellucid.align.oracle import Oracle
from pellucid.align.reward import pairs_accuracy
from pellucid.data.finetune import encode_lm
from pellucid.data.jsonl import Record
from pellucid.data.preferences import PromptRow, read_pairs, reply_record
from pellucid.errors import ConfigError
from pellucid.files import atomic_open, atomic_write, read_json, sha256_file
from pellucid.train.evaluate import exact_match, lm_metrics
from pellucid.weights.adapter import META_FILE, read_meta
from pellucid.weights.resolve import LoadedModel, load

log = logging.getLogger("pellucid")
CACHE_FILE = "lineage.json"
PLOT_FILE = "lineage.png"
COLUMNS = ("win_rate", "oracle_score", "exact_match", "kl", "bits_per_byte", "pairwise_accuracy")


@dataclass
class Stage:
    """One model of a line: where it is, what made it, and its measurements."""

    spec: str  # a model spec: the base's name or path, or a run directory
    kind: str  # "base", or the run's task: "sft", "reward", "dpo", "ppo", "grpo", ...
    method: str = ""  # "lora" or "full" for runs
    scores: dict[str, Any] = field(default_factory=dict)


def _meta_of(spec: str) -> dict | None:
    """finetune.json of a run directory (or a checkpoint inside one); None for a base."""
    path = Path(spec)
    for folder in (path, path.parent.parent):  # runs/x, or runs/x/checkpoints/step_N
        if (folder / META_FILE).is_file():
            return read_meta(folder / META_FILE)
    return None


def lineage(run: str | Path) -> list[Stage]:
    """The stages from the base to `run`, oldest first; a stage's reward model comes before it."""
    line: list[Stage] = []
    spec, seen = str(run), set()
    while True:
        meta = _meta_of(spec)
        if meta is None:
            line.append(Stage(spec, "base"))
            break
        key = str(Path(spec).resolve())
        if key in seen:
            raise ConfigError(f"{spec}: its finetune.json lineage loops back on itself")
        seen.add(key)
        line.append(Stage(spec, meta["task"], meta["method"]))
        if isinstance(meta.get("reward_model"), str):
            line.append(Stage(meta["reward_model"], "reward", ""))
        spec = meta["base"]
    return line[::-1]


@dataclass(frozen=True)
class Yardsticks:
    """What every stage is measured on (the same for all)."""

    oracle: Oracle | None = None  # judge of the held-out prompts
    prompts: Sequence[PromptRow] = ()
    tasks: Sequence[Record] = ()  # task rows: exact match and bits per byte
    pairs: str = ""  # held-out preference pairs for reward models ("" for none)
    max_new_tokens: int = 96

    def key(self, spec: str) -> str:
        """A cache key of the stage's weights and these settings."""
        weights = _weights_id(spec)
        what = [
            weights,
            self.oracle.name if self.oracle else "",
            [(r.prompt, r.answer) for r in self.prompts],
            [r.messages for r in self.tasks],
            self.pairs and sha256_file(self.pairs),
            self.max_new_tokens,
        ]
        return hashlib.sha256(json.dumps(what).encode()).hexdigest()


def _weights_id(spec: str) -> str:
    """The newest checkpoint of a run (its name changes as the run trains), else the spec."""
    checkpoints = sorted((Path(spec) / "checkpoints").glob("step_*"))
    return str(checkpoints[-1].resolve()) if checkpoints else spec


def _measure(
    loaded: LoadedModel,
    stage: Stage,
    base: LoadedModel,
    base_replies: list[str] | None,
    y: Yardsticks,
) -> dict[str, Any]:
    if stage.kind == "reward":
        if not y.pairs:
            return {}
        r = pairs_accuracy(loaded, stage.spec, read_pairs(y.pairs))
        return {"pairwise_accuracy": r["pairwise_accuracy"], "margin": r["margin"]}
    tok, template = loaded.tokenizer, loaded.chat_template()
    out: dict[str, Any] = {}
    if y.oracle is not None and y.prompts:
        reference = None if stage.kind == "base" else base.model
        won = oracle_scores(
            loaded.model,
            reference,
            tok,
            template,
            y.oracle,
            y.prompts,
            base_replies,
            y.max_new_tokens,
        )
        out |= {k: won[k] for k in ("win_rate", "oracle_score", "kl") if k in won}
        out.setdefault("kl", 0.0)  # the base against itself
    if y.tasks:
        out["exact_match"] = exact_match(loaded.model, tok, template, y.tasks, 32)["exact_match"]
        ctx = loaded.model.cfg.context_len - 1
        out["bits_per_byte"] = lm_metrics(loaded.model, encode_lm(y.tasks, template, tok, ctx))[
            "bits_per_byte"
        ]
    return out


def evaluate_line(run: str | Path, y: Yardsticks) -> list[Stage]:
    """The lineage of `run`, each stage measured with `y` (cached in RUN/lineage.json)."""
    line = lineage(run)
    cache_path = Path(run) / CACHE_FILE
    cache = read_json(cache_path) if cache_path.is_file() else {}
    base, base_replies = None, None
    for stage in line:
        key = y.key(stage.spec)
        if key not in cache:
            if base is None:  # the base, and its replies to the prompts, once per report
                base = load(line[0].spec)
                if base.tokenizer is None:
                    raise ConfigError(
                        f"model '{line[0].spec}' has no tokenizer; the report needs one"
                    )
                if y.oracle is not None and y.prompts:
                    base_replies = greedy_replies(
                        base.model,
                        base.tokenizer,
                        base.chat_template(),
                        y.prompts,
                        y.max_new_tokens,
                    )
            log.info("measuring %s (%s) ...", stage.spec, stage.kind)
            loaded = base if stage.kind == "base" else load(stage.spec)
            cache[key] = _measure(loaded, stage, base, base_replies, y)
            atomic_write(cache_path, json.dumps(cache, indent=1))
        stage.scores = cache[key]
    return line


def plot_line(line: Sequence[Stage], path: Path) -> None:
    """One panel per measure, a point per stage, stages in order along the x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [c for c in COLUMNS if any(c in s.scores for s in line)]
    fig, axes = plt.subplots(1, max(len(present), 1), figsize=(3.2 * max(len(present), 1), 3.2))
    axes = [axes] if len(present) <= 1 else list(axes)
    names = [f"{i}:{s.kind}" for i, s in enumerate(line)]
    for ax, col in zip(axes, present, strict=False):
        xs = [i for i, s in enumerate(line) if col in s.scores]
        ax.plot(xs, [line[i].scores[col] for i in xs], marker="o")
        ax.set_xticks(range(len(line)), names, rotation=30, fontsize=8)
        ax.set_title(col, fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def task_rows(rows: Sequence[dict]) -> list[Record]:
    """Generated task rows {"prompt", "answer"} as the records exact match reads."""
    return [reply_record(r["prompt"], r["answer"], i) for i, r in enumerate(rows, start=1)]


def yardsticks(
    run: str | Path,
    *,
    oracle: str = "",
    prompts: str = "",
    tasks: str = "",
    pairs: str = "",
    n_tasks: int = 50,
    max_prompts: int = 200,
) -> Yardsticks:
    """The measures of a report: the oracle and held-out prompts default to those of the run's
    config.json (`dpo.oracle`, `finetune.eval_data`); tasks default to `n_tasks` generated ones
    (task family "mix", seed 12345, so the same for every report)."""
    from pellucid.align.oracle import get_oracle
    from pellucid.data.jsonl import read_jsonl
    from pellucid.data.preferences import read_prompts
    from pellucid.data.tasks import make_tasks

    config_file = Path(run) / "config.json"
    cfg = read_json(config_file) if config_file.is_file() else {}
    if isinstance(cfg, dict):
        oracle = oracle or cfg.get("dpo", {}).get("oracle", "")
        prompts = prompts or (cfg.get("finetune", {}).get("eval_data", "") if oracle else "")
    rows = (
        list({r.prompt: r for r in read_prompts(prompts)}.values())[:max_prompts] if prompts else []
    )
    if tasks:
        records = read_jsonl(tasks, ("task",)).records
    else:
        records = task_rows(make_tasks("mix", n_tasks, seed=12345)) if n_tasks > 0 else []
    return Yardsticks(get_oracle(oracle) if oracle else None, rows, records, pairs)
