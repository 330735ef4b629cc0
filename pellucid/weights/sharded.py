"""Sharded checkpoints: every rank of an FSDP2 run writes the pieces it holds; nobody gathers.

A sharded checkpoint folder holds, beside state.json, config.json, tokenizer.json and the
manifest (weights/checkpoint.py, which lists every file below with its sha256):

    shard-{r}-of-{N}.safetensors   rank r's pieces: its part of every weight (`model.<name>`)
                                   and of both AdamW moments (`optim.state.<i>.<key>`)
    shards.json                    the index: per tensor its global shape, dtype and pieces,
                                   each piece a box (offset and shape per dim) in one file

    {"format": "pellucid-shards/1", "world": 2, "aliases": {"lm_head.weight": "tok_emb.weight"},
     "tensors": {"model.tok_emb.weight": {"shape": [256, 64], "dtype": "F32", "pieces": [
         {"file": "shard-0-of-2.safetensors", "offset": [0, 0], "shape": [128, 64]},
         {"file": "shard-1-of-2.safetensors", "offset": [128, 0], "shape": [128, 64]}]}}}

FSDP2's `Shard(0)` gives rank r rows [r*ceil(n/N), ...) of each tensor; the box records whatever
the placements and the mesh gave (train/distributed.py asks torch, as DCP does), so any
placement fits. A tensor that is not sharded (a buffer, AdamW's step count) is one piece in rank
0's file. JSON and safetensors only, so nothing here is ever unpickled (DCP's `.metadata` is).

Reading: `ShardReader(folder)` returns any box of any tensor, reading from each file only the
slices that overlap it (`safe_open(...).get_slice`): one process asks for whole tensors, a rank
of another world size for its own shard. A single-file checkpoint (model.safetensors,
optim.safetensors) reads through the same reader, as one piece per tensor.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor

from pellucid.errors import CheckpointError, WeightsFormatError
from pellucid.files import atomic_write, check_shape, read_json
from pellucid.weights.safety import TensorEntry, read_safetensors_header

INDEX = "shards.json"
FORMAT = "pellucid-shards/1"
SINGLE = {"model": "model.safetensors", "optim": "optim.safetensors"}  # the unsharded layout
DTYPES = {
    "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
_SHARD = re.compile(r"^shard-\d+-of-\d+\.safetensors$")
_TENSOR = {"shape": [int], "dtype": str, "pieces": [{"file": str, "offset": [int], "shape": [int]}]}


def shard_file(rank: int, world: int) -> str:
    """The file rank `rank` of `world` writes its pieces into."""
    return f"shard-{rank}-of-{world}.safetensors"


def dtype_name(t: Tensor) -> str:
    """The safetensors name of `t`'s dtype ("F32"), as the index records it."""
    return next(k for k, v in DTYPES.items() if v == t.dtype)


def write_shard(folder: Path, rank: int, world: int, pieces: dict[str, Tensor]) -> dict[str, Any]:
    """Write one rank's pieces atomically; returns its manifest entry {"sha256", "bytes"}.

    Hashing the bytes in memory spares rank 0 reading every rank's file back to checksum it.
    """
    data = save(pieces)
    atomic_write(Path(folder) / shard_file(rank, world), data)
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def index_json(
    world: int,
    meta: dict[str, tuple[list[int], str]],
    boxes: list[dict[str, list[list[int]]]],
    aliases: dict[str, str],
) -> str:
    """The index: `meta` {name: (global shape, dtype)}; `boxes[r]` {name: [offset, shape]} of the
    pieces rank r wrote, in rank order."""
    tensors = {n: {"shape": s, "dtype": d, "pieces": []} for n, (s, d) in meta.items()}
    for rank, mine in enumerate(boxes):
        for name, (offset, shape) in mine.items():
            piece = {"file": shard_file(rank, world), "offset": offset, "shape": shape}
            tensors[name]["pieces"].append(piece)
    return json.dumps({"format": FORMAT, "world": world, "aliases": aliases, "tensors": tensors})


@dataclass(frozen=True)
class Piece:
    """One stored box of a tensor: `key` in `file`, starting at `offset` in the full tensor."""

    file: str
    key: str
    offset: tuple[int, ...]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Layout:
    """A full tensor as stored: its global shape, dtype and the pieces that tile it."""

    shape: tuple[int, ...]
    dtype: str
    pieces: list[Piece]


class ShardReader:
    """Any box of any tensor of a checkpoint folder, sharded (shards.json) or single-file.

    Names carry their section: `model.tok_emb.weight`, `optim.state.0.exp_avg`. Files open
    lazily, once each, after their header passed weights/safety.py's checks.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._files: dict[str, Any] = {}
        self._headers: dict[str, dict[str, TensorEntry]] = {}
        if (self.folder / INDEX).is_file():
            self.tensors, self.aliases = _read_index(self.folder / INDEX)
        else:
            self.tensors, self.aliases = self._single_layout()

    def names(self, section: str) -> list[str]:
        """The stored tensors of `section` ("model" or "optim"), with their prefix."""
        return [n for n in self.tensors if n.startswith(section + ".")]

    def layout(self, name: str) -> Layout:
        """How tensor `name` is stored (CheckpointError when the checkpoint lacks it)."""
        if name not in self.tensors:
            raise CheckpointError(f"{self.folder}: the checkpoint holds no tensor {name}")
        return self.tensors[name]

    def read_section(self, section: str) -> dict[str, Tensor]:
        """Every tensor of `section`, whole, keyed without the prefix (one process's reading)."""
        return {n.split(".", 1)[1]: self.read(n) for n in self.names(section)}

    def read(
        self, name: str, offset: tuple[int, ...] | None = None, shape: tuple[int, ...] | None = None
    ) -> Tensor:
        """`shape` values of tensor `name` from `offset` on (default: all of it), read from only
        the pieces that overlap that box. The pieces must cover it exactly once."""
        layout = self.layout(name)
        offset = tuple(offset or (0,) * len(layout.shape))
        shape = tuple(layout.shape if shape is None else shape)
        if any(o < 0 or o + s > n for o, s, n in zip(offset, shape, layout.shape, strict=True)):
            raise CheckpointError(f"{self.folder}: {name} {list(layout.shape)} has no box {shape}")
        out = torch.empty(shape, dtype=DTYPES[layout.dtype])
        covered = 0
        for p in layout.pieces:
            spans = _overlap(offset, shape, p.offset, p.shape)
            if spans is None:
                continue
            part = self._part(p, _slices(spans, p.offset))
            if part.dtype != out.dtype:
                raise CheckpointError(f"{self.folder}/{p.file}: {p.key} is not {layout.dtype}")
            out[_slices(spans, offset)] = part
            covered += math.prod(hi - lo for lo, hi in spans)
        if covered != out.numel():
            raise CheckpointError(
                f"{self.folder}: the pieces of {name} cover {covered} of {out.numel()} values"
            )
        return out

    def _part(self, p: Piece, box: tuple[slice, ...]) -> Tensor:
        """The `box` of piece `p`, read from its file (only those bytes)."""
        entries = self._header(p.file)
        if p.key not in entries or entries[p.key].shape != p.shape:
            raise CheckpointError(f"{self.folder}/{p.file}: no {p.key} of shape {list(p.shape)}")
        try:
            if p.file not in self._files:
                self._files[p.file] = safe_open(str(self.folder / p.file), framework="pt")
            f = self._files[p.file]
            return f.get_slice(p.key)[box] if box else f.get_tensor(p.key)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{self.folder}/{p.file}: cannot read {p.key} ({e})") from None

    def _header(self, file: str) -> dict[str, TensorEntry]:
        if file not in self._headers:
            try:
                self._headers[file], _ = read_safetensors_header(self.folder / file)
            except (WeightsFormatError, OSError) as e:
                raise CheckpointError(f"{self.folder}: {e}") from None
        return self._headers[file]

    def _single_layout(self) -> tuple[dict[str, Layout], dict[str, str]]:
        """model.safetensors and optim.safetensors as one piece per tensor."""
        tensors, aliases = {}, {}
        for section, file in SINGLE.items():
            if not (self.folder / file).is_file():
                continue
            for key, e in self._header(file).items():
                if e.dtype not in DTYPES:
                    raise CheckpointError(f"{self.folder}/{file}: {key} has dtype {e.dtype}")
                piece = Piece(file, key, (0,) * len(e.shape), e.shape)
                tensors[f"{section}.{key}"] = Layout(e.shape, e.dtype, [piece])
        if (self.folder / SINGLE["model"]).is_file():
            _, meta = read_safetensors_header(self.folder / SINGLE["model"])
            try:
                aliases = json.loads(meta.get("aliases", "{}"))
            except ValueError as e:
                raise CheckpointError(
                    f"{self.folder}/model.safetensors: bad aliases ({e})"
                ) from None
        return tensors, aliases


def _overlap(
    offset: tuple[int, ...],
    shape: tuple[int, ...],
    p_offset: tuple[int, ...],
    p_shape: tuple[int, ...],
) -> list[tuple[int, int]] | None:
    """[start, stop) per dim of where two boxes overlap, None where they do not (a 0-d tensor's
    boxes always overlap: the empty list)."""
    spans = [
        (max(a, b), min(a + s, b + t))
        for a, s, b, t in zip(offset, shape, p_offset, p_shape, strict=True)
    ]
    return None if any(lo >= hi for lo, hi in spans) else spans


def _slices(spans: list[tuple[int, int]], origin: tuple[int, ...]) -> tuple[slice, ...]:
    """`spans` (full-tensor coordinates) as slices into a box that starts at `origin`."""
    return tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(spans, origin, strict=True))


def _read_index(path: Path) -> tuple[dict[str, Layout], dict[str, str]]:
    """shards.json, checked field by field: one CheckpointError line naming what is wrong."""
    data = read_json(path, CheckpointError, shape={"format": str, "tensors": dict, "aliases": dict})
    if data["format"] != FORMAT:
        raise CheckpointError(f"{path}: format {data['format']!r:.40}, expected {FORMAT}")
    tensors = {}
    for name, entry in data["tensors"].items():
        check_shape(entry, _TENSOR, str(path), CheckpointError, f"tensors.{name}")
        pieces = [
            Piece(p["file"], name, tuple(p["offset"]), tuple(p["shape"])) for p in entry["pieces"]
        ]
        ndim = len(entry["shape"])
        bad = [p.file for p in pieces if not _SHARD.match(p.file) or len(p.offset) != ndim]
        if entry["dtype"] not in DTYPES or bad or any(len(p.shape) != ndim for p in pieces):
            raise CheckpointError(f"{path}: tensor {name} has a bad dtype, file name or box")
        tensors[name] = Layout(tuple(entry["shape"]), entry["dtype"], pieces)
    return tensors, {str(k): str(v) for k, v in data["aliases"].items()}
