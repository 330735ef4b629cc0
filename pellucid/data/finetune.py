"""Fine-tuning batches: records -> token ids with a loss mask -> padded or packed batches.

    encoded = encode_lm(records, template, tokenizer, max_len=512)   # ids + assistant-token mask
    batches = ExampleSampler(encoded, batch_size=8, seed=0, collate=pad_lm)

Padded batches are right-padded to their longest row: padding comes after the real tokens, so
causal attention keeps it out of sight and its targets are IGNORE_INDEX. Packed batches
(`pack_rows`) place several examples in one row of `max_len` tokens with `segments` ids, which
the model turns into a block-diagonal causal mask and positions that restart per example: no
token attends across an example boundary. Targets are IGNORE_INDEX on everything but assistant
tokens, so the loss counts the replies only.

The sampler walks the rows in a fresh seeded order each epoch; batch k is a function of
(seed, k), so its state is two integers and a resumed run draws exactly the same batches.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

import torch
from torch import Tensor

from pellucid.data.batches import IGNORE_INDEX, Batch, SeededSteps
from pellucid.data.jsonl import Record
from pellucid.errors import DataError, TokenizerError

if TYPE_CHECKING:
    from pellucid.tokenizer.bpe import Tokenizer
    from pellucid.tokenizer.chat import ChatTemplate

log = logging.getLogger("pellucid")
T_ = TypeVar("T_")


@dataclass
class SFTBatch(Batch):
    """A Batch with optional `segments` (B, T) int64: example ids of packed rows (0 padding)."""

    segments: Tensor | None = None


@dataclass
class ClassBatch(Batch):
    """inputs (B, T) int64 padded either side; targets (B,) int64 label indices;
    segments (B, T) int64, 1 on real tokens, 0 on padding."""

    segments: Tensor | None = None


@dataclass(frozen=True)
class Encoded:
    """One tokenized example: ids, and per id whether it is an assistant token (loss)."""

    ids: tuple[int, ...]
    mask: tuple[bool, ...]
    n_bytes: int  # UTF-8 bytes of its assistant text (for bits per byte)
    line: int  # where it came from


@dataclass(frozen=True)
class EncodedText:
    """One tokenized classification example."""

    ids: tuple[int, ...]
    label: int
    line: int


def _too_long(source: str, n_long: int, n: int, max_len: int, longest: int, line: int) -> DataError:
    return DataError(
        f"{source}: {n_long} of {n} examples are longer than {max_len} tokens (the longest, "
        f"{longest}, at line {line}); cut them with finetune.truncate=true (pellucid eval: "
        "--truncate), or raise finetune.max_len"
    )


def encode_lm(
    records: Sequence[Record],
    template: ChatTemplate,
    tokenizer: Tokenizer,
    max_len: int,
    truncate: bool = False,
    source: str = "data",
) -> list[Encoded]:
    """Render each conversation with `template`, tokenize it and mark the assistant tokens.

    An example needs len(ids) <= max_len + 1 (max_len inputs, each predicting the next id).
    Longer ones are refused with a count (DataError), or with `truncate` cut to fit; a cut
    example left with no assistant token is dropped, and both counts are logged. `source`
    (the file) starts every message.
    """
    out, long, dropped = [], [], 0
    for r in records:
        try:
            ids, mask = template.encode_with_mask(tokenizer, r.messages)
        except TokenizerError as e:  # a byte the vocabulary lacks: say which row holds it
            raise DataError(f"{source}:{r.line}: {e}") from None
        n_bytes = sum(len(m["content"].encode()) for m in r.messages if m["role"] == "assistant")
        if len(ids) > max_len + 1:
            long.append((len(ids), r.line))
            if not truncate:
                continue
            ids, mask = ids[: max_len + 1], mask[: max_len + 1]
            if not any(mask[1:]):
                dropped += 1
                continue
        out.append(Encoded(tuple(ids), tuple(mask), n_bytes, r.line))
    if long and not truncate:
        longest = max(long)
        raise _too_long(source, len(long), len(records), max_len, longest[0], longest[1])
    if long:
        log.info(
            "%s: truncated %d examples to %d tokens; dropped %d left with no reply tokens",
            source, len(long), max_len, dropped,
        )  # fmt: skip
    if not out:
        raise DataError(f"{source}: no examples left to train on")
    return out


def encode_text(
    records: Sequence[Record],
    tokenizer: Tokenizer,
    labels: Sequence[str],
    max_len: int,
    truncate: bool = False,
    source: str = "data",
    keep_head: int = 0,
) -> list[EncodedText]:
    """Tokenize classification texts (no chat template) and map labels to their index.

    A text longer than max_len is refused (with a count), or cut under `truncate` to its first
    `keep_head` tokens joined to its last max_len - keep_head: the classifier reads the last
    token, so the end must survive, while a long text's opening (an email's subject and first
    lines) often says the most; head + tail beat either alone for BERT on long documents (Sun et
    al. 2019, "How to Fine-Tune BERT for Text Classification?").
    """
    if not 0 <= keep_head < max_len:
        raise DataError(f"finetune.keep_head must be in [0, max_len={max_len}), got {keep_head}")
    index = {label: i for i, label in enumerate(labels)}
    out, long = [], []
    for r in records:
        if r.label not in index:
            raise DataError(f"line {r.line}: label {r.label!r} is not one of {list(labels)}")
        try:
            ids = tokenizer.encode(r.text) or [0]
        except TokenizerError as e:
            raise DataError(f"{source}:{r.line}: {e}") from None
        if len(ids) > max_len:
            long.append((len(ids), r.line))
            ids = ids[:keep_head] + ids[len(ids) - (max_len - keep_head) :]
        out.append(EncodedText(tuple(ids), index[r.label], r.line))
    if long and not truncate:
        raise _too_long(source, len(long), len(records), max_len, *max(long))
    if long:
        log.info(
            "%s: truncated %d texts to %d tokens (the first %d and the last %d)",
            source, len(long), max_len, keep_head, max_len - keep_head,
        )  # fmt: skip
    return out


# --- collators ------------------------------------------------------------------------------------


def _targets(e: Encoded) -> list[int]:
    """Next-token targets of an example: ids[1:], IGNORE_INDEX where the target is not the
    assistant's."""
    return [t if m else IGNORE_INDEX for t, m in zip(e.ids[1:], e.mask[1:], strict=True)]


def pad_lm(examples: Sequence[Encoded]) -> SFTBatch:
    """Right-pad examples to the longest: inputs (B, T) with 0, targets (B, T) with IGNORE_INDEX."""
    T = max(len(e.ids) - 1 for e in examples)
    inputs = torch.zeros(len(examples), T, dtype=torch.int64)
    targets = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.int64)
    for b, e in enumerate(examples):
        n = len(e.ids) - 1
        inputs[b, :n] = torch.tensor(e.ids[:-1])
        targets[b, :n] = torch.tensor(_targets(e))
    return SFTBatch(inputs, targets)


def pack_rows(examples: Sequence[Encoded], max_len: int) -> list[list[Encoded]]:
    """Greedy packing in order: each row takes examples while their inputs fit in max_len."""
    rows: list[list[Encoded]] = []
    used = max_len  # forces a first row
    for e in examples:
        n = len(e.ids) - 1
        if used + n > max_len:
            rows.append([])
            used = 0
        rows[-1].append(e)
        used += n
    return rows


def collate_packed(rows: Sequence[Sequence[Encoded]]) -> SFTBatch:
    """Packed rows -> inputs/targets (B, T) and segments (B, T): 1, 2, ... per example, 0 padding.

    Each example keeps its own shift (its last input predicts its last id), so no target
    crosses a boundary either.
    """
    T = max(sum(len(e.ids) - 1 for e in row) for row in rows)
    inputs = torch.zeros(len(rows), T, dtype=torch.int64)
    targets = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.int64)
    segments = torch.zeros(len(rows), T, dtype=torch.int64)
    for b, row in enumerate(rows):
        at = 0
        for k, e in enumerate(row, start=1):
            n = len(e.ids) - 1
            inputs[b, at : at + n] = torch.tensor(e.ids[:-1])
            targets[b, at : at + n] = torch.tensor(_targets(e))
            segments[b, at : at + n] = k
            at += n
    return SFTBatch(inputs, targets, segments)


def pad_text(examples: Sequence[EncodedText], side: str = "right") -> ClassBatch:
    """Pad classification examples on `side` ("right" or "left"); segments mark real tokens."""
    T = max(len(e.ids) for e in examples)
    inputs = torch.zeros(len(examples), T, dtype=torch.int64)
    segments = torch.zeros(len(examples), T, dtype=torch.int64)
    for b, e in enumerate(examples):
        n = len(e.ids)
        span = slice(0, n) if side == "right" else slice(T - n, T)
        inputs[b, span] = torch.tensor(e.ids)
        segments[b, span] = 1
    labels = torch.tensor([e.label for e in examples], dtype=torch.int64)
    return ClassBatch(inputs, labels, segments)


# --- sampling -------------------------------------------------------------------------------------


def _epoch_seed(seed: int, epoch: int) -> int:
    digest = hashlib.sha256(f"finetune:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


class ExampleSampler(SeededSteps, Generic[T_]):
    """An endless iterator of batches over `items`, reshuffled (seeded) every epoch.

    Batch k holds the items at global positions k*B .. k*B + B - 1 of the concatenated epoch
    orders, so every item is seen once per epoch and `state()` is {"seed", "step"}.

    With `lengths` (one per item) each epoch's shuffled order is cut into runs of GROUP batches
    and each run sorted longest first: a batch then holds rows of similar length and pads far
    less (transformers' `group_by_length`), while which rows share a run stays random.
    """

    GROUP = 50  # batches per length-sorted run, as transformers' megabatches

    def __init__(
        self,
        items: Sequence[T_],
        batch_size: int,
        seed: int,
        collate: Callable[[list[T_]], Batch],
        lengths: Sequence[int] | None = None,
    ) -> None:
        if not items:
            raise DataError("no examples to draw batches from")
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.items, self.batch_size, self.seed, self.collate = (
            list(items),
            batch_size,
            seed,
            collate,
        )
        if lengths is not None and len(lengths) != len(self.items):
            raise DataError(f"{len(lengths)} lengths for {len(self.items)} examples")
        self.lengths = lengths
        self.step = 0
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            order = torch.randperm(len(self.items), generator=g).tolist()
            if self.lengths is not None:
                run, by_len = self.GROUP * self.batch_size, self.lengths.__getitem__
                order = [
                    i
                    for at in range(0, len(order), run)
                    for i in sorted(order[at : at + run], key=by_len, reverse=True)
                ]
            self._orders = {epoch: order}
        return self._orders[epoch]

    def __iter__(self) -> ExampleSampler[T_]:
        return self

    def __next__(self) -> Batch:
        N, start = len(self.items), self.step * self.batch_size
        picked = []
        for i in range(start, start + self.batch_size):
            picked.append(self.items[self._order(i // N)[i % N]])
        self.step += 1
        return self.collate(picked)


def in_order(
    items: Sequence[T_], batch_size: int, collate: Callable[[list[T_]], Batch]
) -> list[Batch]:
    """Every item once, in order, in batches of `batch_size` (the last may be smaller)."""
    return [collate(list(items[i : i + batch_size])) for i in range(0, len(items), batch_size)]
