"""Corpora larger than memory -> fixed-size token shards on disk, tokenized by parallel workers.

    pellucid data prepare CORPUS... --out DIR --tokenizer T [--workers N] [--shard-tokens N]

CORPUS is a file or folder (recursively) of plain text (`.txt`, `.md`, anything else: one file is
one document), JSON Lines (`.jsonl`: field `--field` of each object is a document) or Parquet
(`.parquet`: column `--column` of each row, read a row group at a time with pyarrow); or a
built-in corpus name. The work is cut into units (a text file, 8 MiB of a JSONL file, a Parquet
row group) that `--workers` processes tokenize independently; the parent writes their tokens in
unit order, so the output does not depend on the number of workers. Each document is followed by
the tokenizer's end-of-text token, as in data/shards.py, and with the same dtype rule.

    DIR/val.bin              the first `--val-tokens` tokens of the stream (for evaluation)
    DIR/shard_00000.bin ...  (shard_tokens,) uint16 | uint32 each; the last one may be shorter
    DIR/tokenizer.json       the tokenizer the ids belong to
    DIR/manifest.json        token counts, sha256 per file, tokenizer sha256; written LAST

DIR is built under a temporary name and renamed into place when complete, so a kill leaves no
half-prepared dataset under the final name. data/stream.py reads it back with bounded memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pellucid.data.shards import separator_id, token_dtype, tokenizer_json
from pellucid.data.sources import _folder_files, decode, load_corpus
from pellucid.errors import DataError, FileWriteError
from pellucid.files import _fsync_dir, atomic_open, atomic_write, check_output, sha256_file

log = logging.getLogger("pellucid")

FORMAT = "pellucid-prepared/1"
MANIFEST = "manifest.json"
JSONL_CHUNK = 8 << 20  # bytes of a JSONL file per unit of work


@dataclass(frozen=True)
class Unit:
    """One piece of work: a text file, a byte range of a JSONL file, or a Parquet row group."""

    kind: str  # "text" | "jsonl" | "parquet" | "docs"
    path: str
    start: int = 0  # jsonl: first byte; parquet: row group index
    end: int = 0  # jsonl: end byte (the unit takes the lines that START in [start, end))
    texts: tuple[str, ...] = ()  # kind "docs": the documents themselves (built-in corpora)


@dataclass(frozen=True)
class Options:
    """What to read from each document source."""

    field: str = "text"  # JSONL key holding the text
    column: str = "text"  # Parquet column holding the text


def plan_units(specs: list[str], max_bytes: int = JSONL_CHUNK) -> list[Unit]:
    """The units of work of every corpus spec, in a fixed order (specs as given, files sorted)."""
    units: list[Unit] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if not path.exists():  # a built-in corpus name (or a clear error from sources)
            units += _docs_units(spec, [d.text for d in load_corpus(spec)], max_bytes)
            continue
        files = sorted(_folder_files(path)) if path.is_dir() else [path]
        for f in files:
            units += _file_units(f, max_bytes)
    if not units:
        raise DataError(f"no documents in {' '.join(specs)}")
    return units


def _docs_units(spec: str, texts: list[str], max_chars: int) -> list[Unit]:
    """In-memory documents grouped into units of about `max_chars` characters."""
    units, group, size = [], [], 0
    for t in texts:
        group.append(t)
        size += len(t)
        if size >= max_chars:
            units.append(Unit("docs", spec, texts=tuple(group)))
            group, size = [], 0
    if group:
        units.append(Unit("docs", spec, texts=tuple(group)))
    return units


def _file_units(f: Path, max_bytes: int) -> list[Unit]:
    suffix = f.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            n = pq.ParquetFile(f).num_row_groups
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise DataError(f"{f}: not a readable Parquet file ({e})") from None
        return [Unit("parquet", str(f), g) for g in range(n)]
    if suffix == ".jsonl":
        size = f.stat().st_size
        return [
            Unit("jsonl", str(f), s, min(s + max_bytes, size)) for s in range(0, size, max_bytes)
        ]
    return [Unit("text", str(f))]


def unit_texts(unit: Unit, opts: Options) -> list[str]:
    """The documents of one unit (DataError naming the file, line or column when malformed)."""
    if unit.kind == "docs":
        return list(unit.texts)
    if unit.kind == "text":
        return [decode(Path(unit.path).read_bytes(), unit.path)]
    if unit.kind == "parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(unit.path).read_row_group(unit.start)
        if opts.column not in table.column_names:
            raise DataError(
                f"{unit.path}: no column {opts.column!r} (columns: {', '.join(table.column_names)})"
                "; pass --column"
            )
        return [t for t in table.column(opts.column).to_pylist() if t]
    return list(_jsonl_texts(unit, opts.field))


def _jsonl_texts(unit: Unit, key: str) -> Iterator[str]:
    """Field `key` of each JSON line that starts inside [unit.start, unit.end)."""
    with open(unit.path, "rb") as f:
        if unit.start:  # a line that started before this unit belongs to the previous one
            f.seek(unit.start - 1)
            f.readline()
        while f.tell() < unit.end:
            line = f.readline()
            if not line:
                return
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                text = obj[key]
            except (ValueError, KeyError, TypeError):
                line_no = _line_number(unit.path, f.tell() - len(line))
                raise DataError(
                    f"{unit.path}:{line_no}: not a JSON object with a string field {key!r}; "
                    "pass --field"
                ) from None
            if not isinstance(text, str):
                line_no = _line_number(unit.path, f.tell() - len(line))
                raise DataError(f"{unit.path}:{line_no}: field {key!r} is not a string")
            yield text


def _line_number(path: str, offset: int) -> int:
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n") + 1


# --- workers --------------------------------------------------------------------------------------

_worker: dict[str, Any] = {}


def _init_worker(tokenizer_path: str, opts: Options) -> None:
    from pellucid.tokenizer.formats import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    _worker.update(tok=tok, sep=separator_id(tok), opts=opts, dtype=token_dtype(tok.vocab_size))


def _tokenize(unit: Unit) -> tuple[bytes, int, int]:
    """A unit -> (its tokens as raw bytes, documents, UTF-8 bytes of text). Runs in a worker."""
    tok, sep = _worker["tok"], _worker["sep"]
    texts = unit_texts(unit, _worker["opts"])
    ids: list[int] = []
    for doc in tok.encode_batch(texts):
        ids.extend(doc)
        if sep is not None:
            ids.append(sep)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return np.asarray(ids, dtype=_worker["dtype"]).tobytes(), len(texts), n_bytes


# --- the writer -----------------------------------------------------------------------------------


class _ShardWriter:
    """Cuts a stream of token bytes into val.bin and shard files of exactly `shard_tokens` tokens."""

    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int, val_tokens: int) -> None:
        self.folder, self.itemsize = folder, dtype.itemsize
        self.shard_bytes, self.val_left = shard_tokens * self.itemsize, val_tokens * self.itemsize
        self.val = bytearray()
        self.buffer = bytearray()
        self.shards: list[dict[str, Any]] = []

    def add(self, data: bytes) -> None:
        if self.val_left:
            take = data[: self.val_left]
            self.val += take
            self.val_left -= len(take)
            data = data[len(take) :]
        self.buffer += data
        while len(self.buffer) >= self.shard_bytes:
            self._flush(bytes(self.buffer[: self.shard_bytes]))
            del self.buffer[: self.shard_bytes]

    def _flush(self, data: bytes) -> None:
        name = f"shard_{len(self.shards):05d}.bin"
        with atomic_open(self.folder / name, "wb") as f:
            f.write(data)
        sha = hashlib.sha256(data).hexdigest()
        self.shards.append({"file": name, "tokens": len(data) // self.itemsize, "sha256": sha})

    def close(self) -> dict[str, Any]:
        if self.buffer:
            self._flush(bytes(self.buffer))
        atomic_write(self.folder / "val.bin", bytes(self.val))
        return {"file": "val.bin", "tokens": len(self.val) // self.itemsize,
                "sha256": sha256_file(self.folder / "val.bin")}  # fmt: skip


def prepare(
    specs: list[str],
    out: Path,
    tokenizer_path: str | Path,
    *,
    workers: int = 1,
    shard_tokens: int = 1 << 24,
    val_tokens: int = 0,
    opts: Options | None = None,
) -> dict[str, Any]:
    """Tokenize the corpora `specs` into the prepared dataset `out`; returns its manifest."""
    from pellucid.tokenizer.formats import load_tokenizer

    out = check_output(out, "dir")
    if out.exists() and any(out.iterdir()):
        raise DataError(f"--out {out} exists and is not empty: give a new folder")
    if workers < 1 or shard_tokens < 1 or val_tokens < 0:
        raise DataError("--workers and --shard-tokens must be >= 1, --val-tokens >= 0")
    opts = opts or Options()
    tok = load_tokenizer(tokenizer_path)
    dtype = token_dtype(tok.vocab_size)
    units = plan_units(specs)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        tok_bytes = tokenizer_json(tok)
        atomic_write(tmp / "tokenizer.json", tok_bytes)
        writer = _ShardWriter(tmp, dtype, shard_tokens, val_tokens)
        docs = text_bytes = 0
        for data, n_docs, n_bytes in _run(units, str(tmp / "tokenizer.json"), opts, workers):
            writer.add(data)
            docs, text_bytes = docs + n_docs, text_bytes + n_bytes
        val = writer.close()
        seconds = time.perf_counter() - t0
        val_ids = np.frombuffer(writer.val, dtype=dtype)
        manifest = {
            "format": FORMAT,
            "tokenizer_sha256": hashlib.sha256(tok_bytes).hexdigest(),
            "dtype": dtype.name,
            "vocab_size": tok.vocab_size,
            "separator_id": separator_id(tok),
            "shard_tokens": shard_tokens,
            "train_tokens": sum(s["tokens"] for s in writer.shards),
            "val_tokens": val["tokens"],
            "val_bytes": sum(len(tok.token_bytes(int(i))) for i in val_ids),
            "documents": docs,
            "text_bytes": text_bytes,
            "shards": writer.shards,
            "val": val,
            "sources": list(specs),
            "workers": workers,
            "seconds": round(seconds, 3),
            "mb_per_s_per_worker": round(text_bytes / 1e6 / seconds / workers, 3),
        }
        manifest["train_bytes"] = max(0, text_bytes - manifest["val_bytes"])
        atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, FileWriteError):  # disk full: name the folder asked for, not a temp file
            raise FileWriteError(
                f"could not write {out}: {e.strerror}; nothing was written"
            ) from None
        raise
    return manifest


def _run(
    units: list[Unit], tokenizer_path: str, opts: Options, workers: int
) -> Iterator[tuple[bytes, int, int]]:
    """Each unit's tokenization, in unit order (in this process when workers == 1)."""
    if workers == 1:
        _init_worker(tokenizer_path, opts)
        yield from map(_tokenize, units)
        return
    # spawn: a fresh interpreter per worker, whatever threads (torch) the parent has started
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, _init_worker, (tokenizer_path, opts)) as pool:
        yield from pool.imap(_tokenize, units)  # ordered; the parent only writes
