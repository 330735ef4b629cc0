"""Preference pairs from a model's own replies: sample K per prompt, rank them with an oracle.

    rows = make_prompts(get_oracle("sentences"), 200, seed=0)
    replies = sample_responses(model, tokenizer, template, rows, k=4, params=params, cache=dir)
    pairs = oracle_pairs(get_oracle("sentences"), rows, replies)   # every pair each ranking implies

Sampling goes through the one Engine (train/evaluate.replies); reply j of prompt i is drawn with
seed params.seed + i * k + j, so the same call gives the same replies. With `cache`, replies are
kept in a JSON file named by a hash of everything that decides them (model id, prompts, k,
sampling settings): benchmarks and figures that rank them again read the same replies back
instead of sampling for minutes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pellucid.align.oracle import Oracle, pairs_from_ranking, rank
from pellucid.data.datasets import resolve_dataset
from pellucid.data.finetune import in_order
from pellucid.data.jsonl import Dataset
from pellucid.data.preferences import (
    EncodedPair,
    PreferencePair,
    PromptRow,
    collate_pairs,
    encode_pairs,
    read_pairs,
    read_prompts,
    split_by_prompt,
)
from pellucid.files import atomic_write, read_json
from pellucid.infer.sampling import SamplingParams
from pellucid.model.transformer import eval_mode
from pellucid.train.evaluate import replies
from pellucid.train.objectives import Objective

if TYPE_CHECKING:
    from pellucid.tokenizer.bpe import Tokenizer
    from pellucid.tokenizer.chat import ChatTemplate

log = logging.getLogger("pellucid")


def conversation(prompt: str) -> list[dict[str, str]]:
    """A prompt as the one user turn of a conversation (what the chat template renders)."""
    return [{"role": "user", "content": prompt}]


def cache_key(model_id: str, rows: Sequence[PromptRow], k: int, params: SamplingParams) -> str:
    """sha256 of what decides a set of sampled replies."""
    what = {
        "model": model_id,
        "prompts": [r.prompt for r in rows],
        "k": k,
        "params": dataclasses.asdict(params),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def sample_responses(
    model: nn.Module,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    rows: Sequence[PromptRow],
    k: int,
    params: SamplingParams,
    *,
    cache: Path | None = None,
    model_id: str = "",
    batch_size: int = 16,
) -> list[list[str]]:
    """K sampled replies to each prompt: out[i][j] is reply j to rows[i].

    cache: a folder; the replies are read from (or written to) `responses-<hash>.json` there,
    the hash covering `model_id` (name the model's weights: a spec and its sha256), the prompts,
    k and params.
    """
    key = cache_key(model_id, rows, k, params)
    path = Path(cache) / f"responses-{key[:16]}.json" if cache is not None else None
    if path is not None and path.is_file():
        saved = read_json(path)
        if isinstance(saved, dict) and saved.get("key") == key:
            return saved["responses"]
    convs = [conversation(r.prompt) for r in rows for _ in range(k)]
    flat = replies(model, tokenizer, template, convs, params, batch_size)
    out = [flat[i * k : (i + 1) * k] for i in range(len(rows))]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps({"key": key, "model": model_id, "responses": out}))
    return out


def oracle_pairs(
    oracle: Oracle, rows: Sequence[PromptRow], responses: Sequence[Sequence[str]]
) -> list[PreferencePair]:
    """Every pair the oracle's ranking of each prompt's replies implies (ties imply none)."""
    pairs: list[PreferencePair] = []
    for row, texts in zip(rows, responses, strict=True):
        pairs += pairs_from_ranking(row.prompt, texts, rank(oracle, row.prompt, texts, row.answer))
    return pairs


# --- a training run's pairs ---------------------------------------------------------------------


@dataclass
class PairData:
    """The pairs of a reward-model or DPO run, tokenized, split by prompt."""

    data: Dataset  # the --data file (shape "preference"; records: its pairs), for the report
    held_out: Dataset | None  # the finetune.eval_data file, if any
    train: list[EncodedPair]
    val: list[EncodedPair]  # the held-out pairs file, else the validation prompts' pairs
    held_rows: list[PromptRow] = field(default_factory=list)  # held-out prompts (not pairs)
    n_dropped: int = 0  # training pairs dropped because their prompt is held out


def read_pair_data(
    data: str,
    eval_data: str,
    *,
    held_pairs: bool,
    val_fraction: float,
    seed: int,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    max_len: int,
    truncate: bool = False,
) -> PairData:
    """Read --data pairs and the held-out file (pairs when `held_pairs`, else prompts, of which a
    pairs or tasks file is one too); pairs whose prompt is held out never train."""
    path = resolve_dataset(data)
    pairs = read_pairs(path)
    held: list[Any] = []
    held_path = resolve_dataset(eval_data) if eval_data else None
    if held_path is not None:
        held = read_pairs(held_path) if held_pairs else read_prompts(held_path)
    if not held_pairs:  # a pairs file read as prompts names each prompt many times
        held = list({r.prompt: r for r in held}.values())
    train, val, dropped = split_by_prompt(pairs, val_fraction, seed, {h.prompt for h in held})
    if dropped:
        log.info("dropped %d training pairs whose prompt is held out in %s", dropped, held_path)
    if held_pairs and held:
        val = held

    def encode(ps: list[PreferencePair]) -> list[EncodedPair]:
        return encode_pairs(ps, template, tokenizer, max_len, truncate) if ps else []

    return PairData(
        Dataset(path, "preference", pairs),  # type: ignore[arg-type]
        Dataset(held_path, "preference" if held_pairs else "prompts") if held_path else None,
        encode(train),
        encode(val),
        [] if held_pairs else held,
        dropped,
    )


def pair_metrics(
    model: nn.Module, objective: Objective, pairs: Sequence[EncodedPair], batch_size: int = 8
) -> dict[str, float]:
    """`objective`'s mean loss per pair and its metrics averaged over `pairs` (no grad, eval
    mode): {"n", "loss", "pairwise_accuracy", "margin", ...} as the objective names them."""
    if not pairs:
        return {}
    device = next(model.parameters()).device
    total: dict[str, float] = {"loss": 0.0}
    with eval_mode(model), torch.no_grad():
        for batch in in_order(pairs, batch_size, collate_pairs):
            out = objective(model, batch.to(device))
            total["loss"] += out.loss_sum.item()
            for k, v in out.metrics.items():  # batch means, weighted by the batch's pairs
                total[k] = total.get(k, 0.0) + v * out.n_targets
    n = len(pairs)
    return {"n": n, **{k: v / n if n else math.nan for k, v in total.items()}}
