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
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pellucid.data.jsonl import json_lines, string_field
from pellucid.errors import DataError
from pellucid.files import atomic_write


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
