"""Preference data: pairs `{"prompt", "chosen", "rejected"}` and prompt files, JSONL, checked.

    pairs = read_pairs("pairs.jsonl")     # [PreferencePair(prompt, chosen, rejected), ...]
    write_pairs("pairs.jsonl", pairs)     # atomic: the old file stays whole until the rename
    prompts = read_prompts("tasks.jsonl") # [PromptRow(prompt, answer | None), ...]

A pair says that a person (or an oracle standing in for one) preferred `chosen` to `rejected`
as the reply to `prompt`; rankers, the reward model and DPO all read this one shape. A prompts
file holds `{"prompt": str, "answer": str (optional)}` rows: `pellucid data tasks` output is one
as it is. Every line is checked before anything uses the file, and a bad one raises a DataError
naming the file, the line number and the field (data/jsonl.py does the line reading). Extra keys
(an id, who ranked) are allowed and ignored.

For training, each pair becomes two conversations (user: prompt, assistant: chosen / rejected)
tokenized with the model's chat template (`encode_pairs`), and B pairs become ONE batch of 2B
right-padded rows, each chosen reply followed by its rejected one (`collate_pairs`): the reward
model and DPO run both through one forward. Targets are the reply tokens only (as in SFT);
`segments` marks the real tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from pellucid.data.finetune import Encoded, SFTBatch, encode_lm, pad_lm
from pellucid.data.jsonl import Record, json_lines, split, string_field
from pellucid.errors import DataError
from pellucid.files import atomic_write

if TYPE_CHECKING:
    from pellucid.tokenizer.bpe import Tokenizer
    from pellucid.tokenizer.chat import ChatTemplate


@dataclass(frozen=True)
class PreferencePair:
    """`chosen` was preferred to `rejected` as the reply to `prompt` (all non-empty, distinct)."""

    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class PromptRow:
    """A prompt to answer, and its reference answer when it has one (generated tasks do)."""

    prompt: str
    answer: str | None = None


def _object(obj: Any, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def parse_pair(obj: Any, where: str) -> PreferencePair:
    """One decoded JSON value -> PreferencePair; DataError naming `where` and the field."""
    obj = _object(obj, where)
    pair = PreferencePair(*(string_field(obj, k, where) for k in ("prompt", "chosen", "rejected")))
    if pair.chosen == pair.rejected:
        raise DataError(f"{where}: fields 'chosen' and 'rejected' are the same text")
    return pair


def read_pairs(path: str | Path) -> list[PreferencePair]:
    """Every pair of a JSONL file, validated line by line (DataError at the first bad line)."""
    return [parse_pair(obj, where) for _, where, obj in json_lines(path)]


def is_pairs_file(path: str | Path) -> bool:
    """Whether a JSONL file's first line is a pair (has "chosen"); False if it cannot be read."""
    try:
        _, _, first = next(json_lines(path))
    except (DataError, StopIteration):
        return False  # the caller's own reader says what is wrong with the file
    return isinstance(first, dict) and "chosen" in first


def write_pairs(path: str | Path, pairs: Iterable[PreferencePair]) -> None:
    """Write pairs as JSONL, one `{"prompt", "chosen", "rejected"}` object a line, atomically."""
    lines = [
        json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
        for p in pairs
    ]
    atomic_write(path, "".join(lines))


def read_prompts(path: str | Path) -> list[PromptRow]:
    """The rows of a prompts file: `prompt` (non-empty string), `answer` (a string if present)."""
    rows = []
    for _, where, obj in json_lines(path):
        obj = _object(obj, where)
        answer = string_field(obj, "answer", where) if obj.get("answer") is not None else None
        rows.append(PromptRow(string_field(obj, "prompt", where), answer))
    return rows


def write_prompts(path: str | Path, rows: Iterable[PromptRow]) -> None:
    """Write a prompts file (the answer key only where a row has one), atomically."""
    out = []
    for r in rows:
        obj = {"prompt": r.prompt} | ({"answer": r.answer} if r.answer is not None else {})
        out.append(json.dumps(obj) + "\n")
    atomic_write(path, "".join(out))


# --- batches ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedPair:
    """A tokenized pair; `ref` holds the reference's log-probs (chosen, rejected) once computed."""

    chosen: Encoded
    rejected: Encoded
    ref: tuple[float, float] | None = None


@dataclass
class PreferenceBatch(SFTBatch):
    """B pairs as 2B rows (chosen, rejected, chosen, ...): inputs, targets (IGNORE_INDEX outside
    the replies) and segments (1 real, 0 padding), all (2B, T); ref_logps (2B,) float32 when precomputed.
    One target per pair: n_targets is B, so the trainer averages the loss over pairs."""

    ref_logps: Tensor | None = None

    @property
    def n_targets(self) -> int:
        return self.inputs.shape[0] // 2


def reply_record(prompt: str, reply: str, line: int = 0) -> Record:
    """A prompt and a reply as a two-turn conversation (user, assistant) to tokenize."""
    messages = ({"role": "user", "content": prompt}, {"role": "assistant", "content": reply})
    return Record(line, "prompt_completion", messages)


def encode_pairs(
    pairs: Sequence[PreferencePair],
    template: ChatTemplate,
    tokenizer: Tokenizer,
    max_len: int,
    truncate: bool = False,
) -> list[EncodedPair]:
    """Tokenize each pair's two conversations (data/finetune.encode_lm: too-long ones refused with
    a count, or cut under `truncate`). A pair whose half lost every reply token is dropped."""
    records = [
        reply_record(p.prompt, reply, i)
        for i, p in enumerate(pairs, start=1)
        for reply in (p.chosen, p.rejected)
    ]
    by_pair: dict[int, list[Encoded]] = {}
    for e in encode_lm(records, template, tokenizer, max_len, truncate):
        by_pair.setdefault(e.line, []).append(e)
    out = [EncodedPair(*halves) for halves in by_pair.values() if len(halves) == 2]
    if not out:
        raise DataError("no preference pairs left to train on")
    return out


def collate_rows(rows: Sequence[Encoded]) -> SFTBatch:
    """Right-padded rows (data/finetune.pad_lm) with segments (B, T): 1 on real inputs, 0 after."""
    lm = pad_lm(rows)  # inputs/targets (B, T)
    lengths = torch.tensor([len(e.ids) - 1 for e in rows])  # (B,) real inputs per row
    lm.segments = (torch.arange(lm.inputs.shape[1])[None] < lengths[:, None]).long()  # (B, T)
    return lm


def collate_pairs(pairs: Sequence[EncodedPair]) -> PreferenceBatch:
    """B pairs -> one PreferenceBatch of 2B right-padded rows, interleaved: row 2i is pair i's
    chosen reply, row 2i + 1 its rejected one. Any contiguous slice of an even number of rows
    (a rank's share under torchrun, train/distributed.rank_slice) holds whole pairs."""
    lm = collate_rows([e for p in pairs for e in (p.chosen, p.rejected)])
    ref = None
    if all(p.ref is not None for p in pairs):
        ref = torch.tensor([x for p in pairs for x in p.ref])  # (2B,) interleaved the same way
    return PreferenceBatch(lm.inputs, lm.targets, lm.segments, ref)


def split_by_prompt(
    pairs: Sequence[PreferencePair], val_fraction: float, seed: int, held_out: Iterable[str] = ()
) -> tuple[list[PreferencePair], list[PreferencePair], int]:
    """(train, val, n_dropped): pairs whose prompt is in `held_out` dropped, then a seeded split of
    the distinct PROMPTS (jsonl.split), so no prompt has pairs on both sides: pairs of one prompt
    share replies, and a reply seen in training would leak into validation."""
    held = set(held_out)
    kept = [p for p in pairs if p.prompt not in held]
    train_prompts, _ = split(sorted({p.prompt for p in kept}), val_fraction, seed)
    chosen = set(train_prompts)
    train = [p for p in kept if p.prompt in chosen]
    val = [p for p in kept if p.prompt not in chosen]
    if not train:
        raise DataError("no preference pairs left to train on after the split")
    return train, val, len(pairs) - len(kept)
