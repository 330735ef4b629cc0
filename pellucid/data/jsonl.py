"""Fine-tuning data: JSONL files in the shapes people already have, validated line by line.

One example a line, every line of a file in the same shape:

    chat                {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    instruction         {"instruction": str, "input": str (optional), "output": str}   (Alpaca)
    prompt_completion   {"prompt": str, "completion": str}
    task                {"prompt": str, "answer": str}      (scored by exact match in `eval`)
    classification      {"text": str, "label": str}

All but classification become a conversation (`Record.messages`) that the model's chat template
renders; the last assistant message is the one to learn (and, for tasks, the answer to match).
The whole file is checked before anything trains: a bad line raises one DataError naming the
file, the line number and the field; no line is skipped. Extra keys (an id, a task family) are
allowed and ignored.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pellucid.errors import DataError
from pellucid.files import parse_json

SHAPES = ("chat", "instruction", "prompt_completion", "task", "classification")
LM_SHAPES = ("chat", "instruction", "prompt_completion", "task")  # those with assistant text
_ROLES = ("system", "user", "assistant")
MAX_FILE_BYTES = 2**31  # a guard against reading something that is not a dataset


@dataclass(frozen=True)
class Record:
    """One validated example. messages is empty for classification; text/label only there."""

    line: int  # 1-based line number in its file
    shape: str
    messages: tuple[dict[str, str], ...] = ()
    text: str = ""
    label: str = ""

    @property
    def prompt(self) -> tuple[dict[str, str], ...]:
        """The conversation up to the last assistant message (what a model is asked)."""
        return self.messages[:-1]

    @property
    def answer(self) -> str:
        """The last assistant message (the reference reply)."""
        return self.messages[-1]["content"] if self.messages else ""

    def key(self) -> str:
        """What makes two rows "the same example" for the train/eval overlap check: the prompt
        (a reworded answer to a prompt seen in evaluation would still leak it) or the text."""
        return json.dumps(list(self.prompt) if self.messages else self.text, sort_keys=True)


@dataclass
class Dataset:
    """A validated JSONL file."""

    path: Path
    shape: str
    records: list[Record] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        """Classification labels, sorted (the class index order)."""
        return sorted({r.label for r in self.records})


def _shape_of(obj: dict[str, Any]) -> str | None:
    if "messages" in obj:
        return "chat"
    if "instruction" in obj:
        return "instruction"
    if "prompt" in obj and "completion" in obj:
        return "prompt_completion"
    if "prompt" in obj and "answer" in obj:
        return "task"
    if "text" in obj and "label" in obj:
        return "classification"
    return None


def string_field(obj: dict[str, Any], key: str, where: str, *, empty_ok: bool = False) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if not empty_ok and not value.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return value


def _messages(obj: dict[str, Any], where: str) -> tuple[dict[str, str], ...]:
    raw = obj["messages"]
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: field 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(raw):
        at = f"{where}: field 'messages[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{at}' must be an object with 'role' and 'content'")
        if m.get("role") not in _ROLES:
            raise DataError(f"{at}.role' must be one of {list(_ROLES)}, got {m.get('role')!r:.40}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{at}.content' must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "assistant" or not out[-1]["content"].strip():
        raise DataError(f"{where}: field 'messages' must end with a non-empty assistant message")
    if not any(m["role"] == "user" for m in out):
        raise DataError(f"{where}: field 'messages' has no user message")
    return tuple(out)


def parse_record(obj: Any, shape: str | None, where: str, line: int) -> Record:
    """One decoded JSON line -> Record, checked; `shape` is the file's (None on its first line)."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    found = _shape_of(obj)
    if found is None:
        raise DataError(
            f"{where}: unknown shape with keys {sorted(obj)[:6]}; expected 'messages', "
            "'instruction'+'output', 'prompt'+'completion', 'prompt'+'answer' or 'text'+'label'"
        )
    if shape is not None and found != shape:
        raise DataError(f"{where}: a {found} row in a file of {shape} rows")
    if found == "chat":
        return Record(line, found, _messages(obj, where))
    if found == "classification":
        label = obj.get("label")
        if isinstance(label, int) and not isinstance(label, bool):
            label = str(label)  # integer class ids are common; they become their decimal text
        if not isinstance(label, str) or not label.strip():
            raise DataError(f"{where}: field 'label' must be a non-empty string")
        return Record(line, found, text=string_field(obj, "text", where), label=label)
    if found == "instruction":
        user = string_field(obj, "instruction", where)
        extra = string_field(obj, "input", where, empty_ok=True) if "input" in obj else ""
        user = f"{user}\n\n{extra}" if extra.strip() else user
        reply = string_field(obj, "output", where)
    else:
        user = string_field(obj, "prompt", where)
        reply = string_field(obj, "completion" if found == "prompt_completion" else "answer", where)
    messages = ({"role": "user", "content": user}, {"role": "assistant", "content": reply})
    return Record(line, found, messages)


def json_lines(path: str | Path) -> Iterator[tuple[int, str, Any]]:
    """The decoded JSON value of every line of a JSONL file, as (line number, "file:line", value).

    Raises DataError naming the file and line for an unreadable or oversized file, an empty file,
    invalid UTF-8, a blank line or invalid JSON; what the value must be is the caller's check.
    """
    path = Path(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise DataError(f"{path}: larger than {MAX_FILE_BYTES} bytes; not a dataset")
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror or e}") from None
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last line
    if not lines:
        raise DataError(f"{path}: no examples (the file is empty)")
    for n, raw_line in enumerate(lines, start=1):
        where = f"{path}:{n}"
        try:
            text = raw_line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not valid UTF-8 (byte {e.start})") from None
        if not text.strip():
            raise DataError(f"{where}: blank line (one JSON object per line, none empty)")
        yield n, where, parse_json(text, where)


def read_jsonl(path: str | Path, shapes: Sequence[str] = SHAPES) -> Dataset:
    """Read and validate a whole JSONL file; DataError names the first bad line and field.

    shapes: the shapes the caller can use (e.g. LM_SHAPES for SFT); another is refused.
    """
    path = Path(path)
    data = Dataset(path, "")
    for n, where, obj in json_lines(path):
        record = parse_record(obj, data.shape or None, where, n)
        data.shape = record.shape
        data.records.append(record)
    if data.shape not in shapes:
        raise DataError(f"{path}: {data.shape} rows, but this needs one of {list(shapes)}")
    return data


def split(records: list[Record], val_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded shuffle, then the last `val_fraction` (at least one row when there are two or
    more and the fraction is > 0) is validation. Returns (train, val)."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = list(records)
    random.Random(seed).shuffle(order)
    n_val = round(len(order) * val_fraction)
    if val_fraction > 0 and len(order) >= 2:
        n_val = min(max(1, n_val), len(order) - 1)
    return order[: len(order) - n_val], order[len(order) - n_val :]


def drop_overlap(train: list[Record], held_out: list[Record]) -> tuple[list[Record], int]:
    """Training rows whose `key()` also occurs in `held_out` removed; returns (kept, n_dropped)."""
    seen = {r.key() for r in held_out}
    kept = [r for r in train if r.key() not in seen]
    return kept, len(train) - len(kept)
