"""A bounded reader for the GGUF container (llama.cpp's file format): metadata and tensor table.

    >>> f = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    >>> f.metadata["general.architecture"], len(f.tensors), f.data_offset
    ('llama', 272, 1709344)

Layout (little-endian): "GGUF", version u32 (2 or 3), tensor count u64, key-value count u64;
then each key-value (key string, value type u32, value); then each tensor's info (name, n_dims
u32, dims u64 fastest-first, ggml type u32, offset u64 relative to the data section); then
padding to `general.alignment` (default 32) and the tensor data. A string is a u64 length and
UTF-8 bytes; an array is an element type u32, a count u64 and the elements.

Why our own reader: every count and length in the header is attacker-controlled. The `gguf`
package trusts them (a 100-byte file can ask for gigabytes, a 2^63-byte string reads as a short
one). Here each declared size is checked against the bytes actually left in the file *before*
anything is allocated, and every failure is one GGUFFormatError naming the field. Tensor data is
not read here (callers memory-map it using the returned offsets), but each tensor's type must be
a known ggml type and its bytes must lie inside the file.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from pellucid.errors import GGUFFormatError

MAX_DIMS = 4  # GGML_MAX_DIMS
# value type -> (struct code, size in bytes) for the fixed-size scalars
_SCALARS = {
    0: ("B", 1),  # UINT8
    1: ("b", 1),  # INT8
    2: ("H", 2),  # UINT16
    3: ("h", 2),  # INT16
    4: ("I", 4),  # UINT32
    5: ("i", 4),  # INT32
    6: ("f", 4),  # FLOAT32
    7: ("?", 1),  # BOOL
    10: ("Q", 8),  # UINT64
    11: ("q", 8),  # INT64
    12: ("d", 8),  # FLOAT64
}
_STRING, _ARRAY = 8, 9
_GGML_TYPES = frozenset(int(t) for t in GGMLQuantizationType if t in GGML_QUANT_SIZES)


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table. `shape` is in GGUF order: shape[0] is the row length."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # from the start of the data section


@dataclass(frozen=True)
class GGUFFile:
    """What the header says: metadata values as Python objects, the tensor table, where data starts."""

    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    alignment: int
    data_offset: int


class _Cursor:
    """Reads little-endian values from a buffer, refusing to read past its end."""

    def __init__(self, buf: mmap.mmap | bytes, where: str) -> None:
        self.buf, self.pos, self.where = buf, 0, where

    def fail(self, msg: str) -> GGUFFormatError:
        return GGUFFormatError(f"{self.where}: {msg} (at byte {self.pos})")

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.left:
            raise self.fail(f"{what} needs {n} bytes but only {self.left} are left in the file")

    def unpack(self, code: str, size: int, what: str) -> Any:
        self.need(size, what)
        (value,) = struct.unpack_from("<" + code, self.buf, self.pos)
        self.pos += size
        return value

    def u32(self, what: str) -> int:
        return self.unpack("I", 4, what)

    def u64(self, what: str) -> int:
        return self.unpack("Q", 8, what)

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not valid UTF-8 ({e.reason} at offset {e.start})") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.unpack(*_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            return self.array(what, depth)
        raise self.fail(f"{what} has unknown value type {vtype}")

    def array(self, what: str, depth: int) -> list[Any]:
        if depth > 2:
            raise self.fail(f"{what} nests arrays too deeply")
        etype, count = self.u32(f"element type of {what}"), self.u64(f"length of {what}")
        if etype in _SCALARS:
            code, size = _SCALARS[etype]
            self.need(count * size, f"{count} elements of {what}")  # checked before allocating
            values = list(struct.unpack_from(f"<{count}{code}", self.buf, self.pos))
            self.pos += count * size
            return values
        # strings and arrays take at least 8 bytes (a length) each
        self.need(count * 8, f"{count} elements of {what}")
        return [self.value(etype, f"{what}[{i}]", depth + 1) for i in range(count)]


def tensor_nbytes(t: TensorInfo) -> int:
    """Bytes of a tensor's data: whole blocks of its ggml type (Python ints: no wrap-around)."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(t.ggml_type)]
    n = 1
    for d in t.shape:
        n *= d
    return n // block * size


def _tensor_info(cur: _Cursor, alignment: int) -> TensorInfo:
    name = cur.string("tensor name")
    n_dims = cur.u32(f"n_dims of tensor '{name}'")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"tensor '{name}' has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
    shape = tuple(cur.u64(f"dims of tensor '{name}'") for _ in range(n_dims))
    elements = 1
    for d in shape:
        elements *= d
    if not all(0 < d < 1 << 62 for d in shape) or elements >= 1 << 62:
        raise cur.fail(f"tensor '{name}' has impossible shape {list(shape)}")
    ggml_type = cur.u32(f"type of tensor '{name}'")
    if ggml_type not in _GGML_TYPES:
        raise cur.fail(f"tensor '{name}' has unknown ggml type {ggml_type}")
    block = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)][0]
    if shape[0] % block:
        raise cur.fail(
            f"tensor '{name}' row length {shape[0]} is not a multiple of its block {block}"
        )
    offset = cur.u64(f"offset of tensor '{name}'")
    if offset % alignment:
        raise cur.fail(
            f"tensor '{name}' offset {offset} is not a multiple of the alignment {alignment}"
        )
    return TensorInfo(name, shape, ggml_type, offset)


def parse_gguf(buf: mmap.mmap | bytes, where: str = "GGUF") -> GGUFFile:
    """Parse a GGUF header held in `buf` (bytes or a memory map of the whole file)."""
    cur = _Cursor(buf, where)
    cur.need(4, "magic")
    if bytes(buf[:4]) != b"GGUF":
        raise cur.fail(f"not a GGUF file (magic {bytes(buf[:4])!r})")
    cur.pos = 4
    version = cur.u32("version")
    if version not in (2, 3):
        raise cur.fail(f"GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = cur.u64("tensor count"), cur.u64("metadata count")
    # a key-value takes at least 12 bytes and a tensor info at least 28: bound the counts first
    if n_kv * 12 > cur.left or n_tensors * 28 > cur.left:
        raise cur.fail(
            f"declares {n_kv} metadata entries and {n_tensors} tensors, more than the file holds"
        )
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("metadata key")
        if key in metadata:
            raise cur.fail(f"duplicate metadata key '{key}'")
        metadata[key] = cur.value(cur.u32(f"type of '{key}'"), f"metadata '{key}'")
    alignment = metadata.get("general.alignment", 32)
    if (
        not isinstance(alignment, int)
        or isinstance(alignment, bool)
        or not 0 < alignment <= 1 << 16
        or alignment & (alignment - 1)
    ):
        raise cur.fail(f"general.alignment {alignment!r} is not a power of two up to 65536")
    tensors, names = [], set()
    for _ in range(n_tensors):
        info = _tensor_info(cur, alignment)
        if info.name in names:
            raise cur.fail(f"duplicate tensor name '{info.name}'")
        names.add(info.name)
        tensors.append(info)
    data_offset = -(-cur.pos // alignment) * alignment
    for t in tensors:
        end = data_offset + t.offset + tensor_nbytes(t)
        if end > len(buf):
            raise cur.fail(
                f"tensor '{t.name}' data ends at byte {end}, past the end of the {len(buf)}-byte file"
            )
    return GGUFFile(version, metadata, tensors, alignment, data_offset)


def read_gguf(path: str | Path) -> GGUFFile:
    """Read the header of the GGUF file at `path` (memory-mapped; tensor data is not touched)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            if path.stat().st_size == 0:
                raise GGUFFormatError(f"{path}: empty file, not a GGUF file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return parse_gguf(mm, str(path))
    except FileNotFoundError:
        raise GGUFFormatError(f"{path}: no such GGUF file") from None
    except IsADirectoryError:
        raise GGUFFormatError(f"{path}: is a folder, not a GGUF file") from None
