"""Checks on untrusted weight files and names that the libraries underneath do not make.

The safetensors library validates its own format, but its errors are its own type, and it skips
three things we want (its README says so): duplicate JSON keys, non-finite values, and whether the
tensors fit the model. So we parse the header ourselves first, with every length bounded by the
file size before anything is read or allocated, then let the library map the data.

    >>> tensors = load_safetensors("model.safetensors")          # dict name -> Tensor
    >>> check_state(expected_shapes(cfg), tensors, "model.safetensors")

Pickle-based checkpoints (`.bin`, `.pt`, ...) are refused outright: unpickling runs code.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any, NoReturn

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from pellucid.errors import ConfigError, WeightsFormatError
from pellucid.files import parse_json, pellucid_home
from pellucid.model.config import ModelConfig
from pellucid.model.transformer import Transformer

MAX_HEADER = 100 * 1000 * 1000  # the safetensors library's own cap on the JSON header
MAX_METADATA = 1 << 20  # `__metadata__` is free text; a megabyte of it is an attack, not a note
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
# Files that hold pickles: loading one can run arbitrary code, so we never open them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header declares it; start/end are offsets into the data section."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _fail(path: Path, why: str) -> NoReturn:
    raise WeightsFormatError(f"{path.name}: {why}")


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object_pairs_hook: Python's json keeps the last of two equal keys; we refuse both."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry(path: Path, name: str, info: Any) -> TensorEntry:
    """Validate one header entry {"dtype", "shape", "data_offsets"}; the sizes must agree."""
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        _fail(
            path, f"tensor '{name}' needs exactly dtype, shape and data_offsets, got {info!r:.80}"
        )
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        _fail(path, f"tensor '{name}' has unknown dtype {dtype!r:.40}")
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        _fail(path, f"tensor '{name}' has a shape that is not a list of integers: {shape!r:.80}")
    if any(d < 0 for d in shape):
        _fail(path, f"tensor '{name}' has a negative dimension in shape {shape}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        _fail(path, f"tensor '{name}' data_offsets must be two integers, got {offsets!r:.80}")
    start, end = offsets
    if not 0 <= start <= end:
        _fail(path, f"tensor '{name}' has data_offsets [{start}, {end}] (need 0 <= begin <= end)")
    # Python ints do not wrap, so a shape whose product overflows 64 bits just fails to match.
    nbytes = prod(shape) * DTYPE_SIZES[dtype]
    if nbytes != end - start:
        # Such a product can run past the 4,300 digits Python will turn into text.
        need = f"{nbytes}" if nbytes < 10**30 else "more than 10^30"
        _fail(
            path,
            f"tensor '{name}' {dtype}{shape!s:.80} needs {need} bytes but its data_offsets span "
            f"{end - start}",
        )
    return TensorEntry(dtype, tuple(shape), start, end)


def _check_layout(path: Path, entries: dict[str, TensorEntry], data_size: int) -> None:
    """Tensors must tile the data section exactly: no overlap, no hole, nothing past or after it."""
    pos, prev = 0, None
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if e.end > data_size:
            _fail(
                path,
                f"tensor '{name}' ends at data byte {e.end}, past the end of the file ({data_size} data bytes)",
            )
        if e.start < pos:
            _fail(path, f"tensors '{prev}' and '{name}' overlap (byte {e.start} < {pos})")
        if e.start > pos:
            _fail(path, f"hole of {e.start - pos} unused bytes before tensor '{name}'")
        pos, prev = e.end, name
    if pos != data_size:
        _fail(path, f"{data_size - pos} trailing bytes after the last tensor")


def _check_metadata(path: Path, metadata: Any) -> dict[str, str]:
    if not isinstance(metadata, dict):
        _fail(path, f"__metadata__ must be an object of strings, got {type(metadata).__name__}")
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        _fail(path, f"__metadata__ value of '{bad[0]}' is not a string")
    size = sum(len(k) + len(v) for k, v in metadata.items())
    if size > MAX_METADATA:
        _fail(path, f"__metadata__ is {size} characters, over the {MAX_METADATA} limit")
    return metadata


def read_safetensors_header(path: str | Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and validate a safetensors header: ({name: TensorEntry}, __metadata__).

    Layout: 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the data section.
    Nothing larger than N (itself bounded by the file size and MAX_HEADER) is ever read.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            _fail(path, f"{size} bytes is too short for a safetensors file (8-byte header length)")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER:
            _fail(path, f"header length {n} exceeds the {MAX_HEADER}-byte limit")
        if 8 + n > size:
            _fail(path, f"header length {n} runs past the end of the {size}-byte file")
        raw = f.read(n)
    try:
        where = f"{path}: header"
        header = parse_json(raw, where, WeightsFormatError, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        _fail(path, f"duplicate key '{e.args[0]}' in header")
    if not isinstance(header, dict):
        _fail(path, f"header is a JSON {type(header).__name__}, not an object")
    metadata = _check_metadata(path, header.pop("__metadata__", {}))
    entries = {name: _entry(path, name, info) for name, info in header.items()}
    _check_layout(path, entries, size - 8 - n)
    return entries, metadata


def refuse_pickle(path: str | Path) -> None:
    """Raise for pickle-based checkpoints (PyTorch .bin/.pt, .pkl): we never unpickle."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise WeightsFormatError(
            f"{path.name}: pickle-based checkpoints are refused (unpickling can run code); "
            "pellucid loads only safetensors and GGUF weights"
        )


def load_safetensors(path: str | Path, *, allow_nonfinite: bool = False) -> dict[str, Tensor]:
    """Read every tensor of a safetensors file after validating it (see read_safetensors_header).

    Returns {name: Tensor} in the file's dtypes (memory-mapped by the library).
    Raises WeightsFormatError naming the cause; NaN/Inf values too unless allow_nonfinite.
    """
    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise WeightsFormatError(f"{path}: no such weights file")
    read_safetensors_header(path)
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:  # our checks should have caught it first
        _fail(path, f"unreadable safetensors data ({str(e).splitlines()[0]})")
    if not allow_nonfinite:
        check_finite(tensors, path.name)
    return tensors


def check_finite(tensors: Mapping[str, Tensor], source: str) -> None:
    """Raise if any floating-point tensor holds NaN or +-Inf (a corrupt or diverged model)."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise WeightsFormatError(
                f"{source}: tensor '{name}' has {bad} NaN/Inf values (allow_nonfinite loads it anyway)"
            )


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every tensor a model of `cfg` needs (the tied output head omitted).

    Built on the meta device, so no memory is allocated whatever the config says, and with one
    block whose names are repeated per layer (every block is alike): a 10,000-layer config in a
    hostile file costs microseconds here, not the minutes of building 10,000 modules.
    """
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(cfg, n_layer=1))
    one = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    block = {n.removeprefix("blocks.0."): s for n, s in one.items() if n.startswith("blocks.0.")}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in one.items():  # in the model's own order, every layer where block 0 was
        if not name.startswith("blocks.0."):
            shapes[name] = shape
        elif "blocks.0." + next(iter(block)) == name:
            shapes |= {f"blocks.{i}.{n}": s for i in range(cfg.n_layer) for n, s in block.items()}
    if cfg.tie_embeddings:
        del shapes["lm_head.weight"]
    return shapes


def _listing(items: list[str], limit: int = 6) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def check_state(
    expected: Mapping[str, tuple[int, ...]], tensors: Mapping[str, Tensor], source: str
) -> None:
    """Raise one line listing every missing, unexpected, mis-shaped or non-float tensor."""
    problems = []
    missing = [f"{n}{list(s)}" for n, s in expected.items() if n not in tensors]
    unexpected = [f"{n}{list(t.shape)}" for n, t in tensors.items() if n not in expected]
    wrong = [
        f"{n} is {list(t.shape)}, needs {list(expected[n])}"
        for n, t in tensors.items()
        if n in expected and tuple(t.shape) != tuple(expected[n])
    ]
    not_float = [f"{n} ({t.dtype})" for n, t in tensors.items() if not t.is_floating_point()]
    for label, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("wrong shape", wrong),
        ("not floating point", not_float),
    ):
        if items:
            problems.append(f"{label}: {_listing(items)}")
    if problems:
        raise WeightsFormatError(f"{source} does not fit the model config: {'; '.join(problems)}")


def validate_model_name(name: str) -> str:
    """Return `name` if it is a safe model name: ASCII letters, digits, '.', '_', '-'; no '..'.

    Rejects path separators, traversal, NUL, percent-escapes and look-alike Unicode, so a name
    from a request can never point outside the models folder.
    """
    if not isinstance(name, str) or not _MODEL_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"invalid model name {name!r:.120}: use 1-100 ASCII letters, digits, '.', '_' or '-', "
            "no path separators or '..'"
        )
    return name


def model_dir(name: str) -> Path:
    """`$PELLUCID_HOME/models/<name>` for a valid name, refusing a symlink that leads outside."""
    root = pellucid_home() / "models"
    path = root / validate_model_name(name)
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise ConfigError(f"model '{name}' resolves outside the models folder {root}")
    return path
