"""Mutations of valid files into hostile ones, structure-aware where the format has a structure.

Every mutator takes a `random.Random` and the valid file's bytes and returns (bytes, what it did):
- JSON (and the JSON header of safetensors, the lines of JSONL): a field of the parsed value,
  chosen by a walk that favours the top levels, gets a value of another type (a list for an
  object, a number for a string, null, true), a huge or negative number, NaN or infinity, a lone
  surrogate, a deep nesting; or a key goes missing;
- GGUF: an integer of the binary header (a count, a string or array length, a value type, a
  tensor's rank, dimension, type or offset), found by walking the header, gets a hostile value;
- key=value lists: a value becomes a hostile string, a key an unknown or malformed one;
- every format: truncation at a random byte, and byte flips.
"""

import json
import random
import struct
from typing import Any

# Values of every JSON type, each hostile somewhere: wrong types, sizes no machine has, negative
# sizes, NaN/inf (Python's json reads them), an empty string, a lone surrogate (valid JSON, not
# encodable as UTF-8), a long string.
HOSTILE: list[Any] = [
    None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63), 10**30, -(10**30), 1e308, -1e-300,
    float("nan"), float("inf"), float("-inf"), 0.5, "", "x", "\ud800", "a" * 100_000, "NaN", "-1",
    [], [1, "a", None], [[[]]], {}, {"a": 1}, {"": None},
]  # fmt: skip


DEEP = "<deep nesting>"  # `dumps` writes it as 5,000 nested lists


def _children(node: Any) -> list[tuple[Any, Any]]:
    if isinstance(node, dict):
        return [(node, k) for k in node]
    if isinstance(node, list):
        return [(node, i) for i in range(len(node))]
    return []


def _pick(rng: random.Random, root: Any) -> tuple[Any, Any] | None:
    """A (container, key) slot of `root`, by a random walk that stops at each level with p 0.4."""
    slot = None
    node = root
    while kids := _children(node):
        slot = rng.choice(kids)
        node = slot[0][slot[1]]
        if rng.random() < 0.4:
            break
    return slot


def _other_type(rng: random.Random, old: Any) -> Any:
    """A hostile value, of another type than `old` where it can be."""
    choices = [v for v in HOSTILE if type(v) is not type(old)] or HOSTILE
    if rng.random() < 0.1:  # deep nesting: recursion in readers that walk the value
        return DEEP
    return rng.choice(choices)


def mutate_value(rng: random.Random, value: Any) -> tuple[Any, str]:
    """One structure-aware change to a parsed JSON value (changed in place where it can be)."""
    slot = _pick(rng, value)
    if slot is None:  # a scalar at the top: replace it whole
        new = _other_type(rng, value)
        return new, f"top level -> {_short(new)}"
    parent, key = slot
    if isinstance(parent, dict) and rng.random() < 0.25:
        del parent[key]
        return value, f"deleted key {key!r}"
    old = parent[key]
    if isinstance(old, (int, float)) and not isinstance(old, bool) and rng.random() < 0.5:
        new = rng.choice([-old - 1, old * 2**40, -(2**62), 2**64 + old, float("nan"), str(old)])
    elif isinstance(old, list) and old and rng.random() < 0.3:
        new = old * rng.choice([0, 1000])  # empty, or a thousand times as long
    else:
        new = _other_type(rng, old)
    parent[key] = new
    return value, f"{key!r}: {_short(old)} -> {_short(new)}"


def _short(v: Any) -> str:
    return repr(v)[:40]


def dumps(value: Any) -> bytes:
    """JSON text as UTF-8, lone surrogates kept as escapes (valid JSON, like a hostile file's);
    DEEP written as 5,000 nested lists (json.dumps itself would hit the recursion limit)."""
    text = json.dumps(value, allow_nan=True)
    return text.replace(json.dumps(DEEP), "[" * 5000 + "0" + "]" * 5000).encode("utf-8")


def truncate(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    cut = rng.randrange(len(data))
    return data[:cut], f"truncated at {cut} of {len(data)}"


def flip(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    out = bytearray(data)
    where = sorted(rng.randrange(len(out)) for _ in range(rng.choice([1, 2, 8])))
    for i in where:
        out[i] = rng.choice([out[i] ^ (1 << rng.randrange(8)), 0x00, 0xFF, 0x80, ord('"')])
    return bytes(out), f"bytes changed at {where[:4]}"


def raw(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """A truncation or byte flips: what a format-blind fuzzer does (a quarter of all cases)."""
    return truncate(rng, data) if rng.random() < 0.5 else flip(rng, data)


def mutate_json(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    if rng.random() < 0.25:
        return raw(rng, data)
    value, what = mutate_value(rng, json.loads(data))
    return dumps(value), what


def mutate_jsonl(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """One line changed structure-aware, or the file cut, flipped or given an invalid line."""
    lines = data.decode("utf-8").splitlines()
    r = rng.random()
    if r < 0.25:
        return raw(rng, data)
    i = rng.randrange(len(lines))
    if r < 0.35:
        bad = rng.choice(["", "   ", "{", "[]", "null", "1", '"text"', "\x00", '{"a": 1}{}'])
        lines[i] = bad
        what = f"line {i + 1} -> {bad!r}"
    else:
        value, what = mutate_value(rng, json.loads(lines[i]))
        lines[i] = dumps(value).decode("utf-8")
        what = f"line {i + 1}: {what}"
    return ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass"), what


def mutate_safetensors(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """The JSON header changed structure-aware (lengths kept right, or its length prefix made
    hostile), or the file cut or flipped."""
    r = rng.random()
    if r < 0.25:
        return raw(rng, data)
    (n,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8 : 8 + n]), data[8 + n :]
    if r < 0.35:
        bad = rng.choice([0, 1, n - 1, n + 1, len(data), 2**31, 2**63, 2**64 - 1])
        return struct.pack("<Q", bad) + data[8:], f"header length {n} -> {bad}"
    value, what = mutate_value(rng, header)
    text = dumps(value)
    return struct.pack("<Q", len(text)) + text + body, f"header {what}"


# --- GGUF: the header's integers, found by walking it ---------------------------------------------

_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # type -> bytes
STRING, ARRAY = 8, 9


class _Walk:
    """Reads a GGUF header, recording (offset, width, what) of every integer it reads."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos, self.fields = data, 0, []

    def int(self, width: int, what: str) -> int:
        self.fields.append((self.pos, width, what))
        value = int.from_bytes(self.data[self.pos : self.pos + width], "little")
        self.pos += width
        return value

    def string(self, what: str) -> None:
        n = self.int(8, f"{what} length")  # read first: `self.pos += ...` would load pos before
        self.pos += n

    def value(self, vtype: int, what: str) -> None:
        if vtype == STRING:
            self.string(what)
        elif vtype == ARRAY:
            item = self.int(4, f"{what} item type")
            for _ in range(self.int(8, f"{what} count")):
                self.value(item, what)
        else:
            self.int(_SCALARS[vtype], what)


def gguf_fields(data: bytes) -> list[tuple[int, int, str]]:
    """(offset, width, what) of every integer in a valid GGUF file's header."""
    w = _Walk(data)
    w.pos = 8  # magic, version
    n_tensors, n_kv = w.int(8, "tensor count"), w.int(8, "metadata count")
    for k in range(n_kv):
        w.string(f"key {k}")
        w.value(w.int(4, f"value type {k}"), f"value {k}")
    for t in range(n_tensors):
        w.string(f"tensor {t} name")
        for d in range(w.int(4, f"tensor {t} rank")):
            w.int(8, f"tensor {t} dim {d}")
        w.int(4, f"tensor {t} type")
        w.int(8, f"tensor {t} offset")
    return w.fields


def mutate_gguf(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    if rng.random() < 0.25:
        return raw(rng, data)
    fields = gguf_fields(data)
    # Array items (the vocabulary) outnumber the rest a hundredfold: pick among the others mostly.
    header = [f for f in fields if "value" not in f[2] or "type" in f[2] or "count" in f[2]]
    pos, width, what = rng.choice(header if rng.random() < 0.8 else fields)
    old = int.from_bytes(data[pos : pos + width], "little")
    top = 2 ** (8 * width) - 1
    new = rng.choice([0, 1, old + 1, max(old - 1, 0), top, top >> 1, 2**31 + 7, rng.randrange(40)])
    new = min(new, top)
    out = data[:pos] + new.to_bytes(width, "little") + data[pos + width :]
    return out, f"{what}: {old} -> {new}"


def mutate_kv(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """key=value lines (the first line names the config): a value or a key made hostile."""
    lines = data.decode("utf-8").splitlines()
    head, items = lines[0], lines[1:]
    i = rng.randrange(len(items))
    key, _, value = items[i].partition("=")
    r = rng.random()
    if r < 0.6:
        value = rng.choice([
            "nan", "inf", "-inf", "-1", "0", "1e999", "99999999999999999999", "-99999999999",
            "[1, 2]", "{}", "", "true", "null", "abc", "1,2", " ", "0x10", "1e-999", "\ud800",
            "[" * 5000, '"quoted"', "None",
        ])  # fmt: skip
    elif r < 0.85:
        key = rng.choice(["", "train", "train.", ".lr", "train.lr.x", "nope.lr", "model", "=",
                          key.upper(), key + "_", "train..lr"])  # fmt: skip
    else:
        items[i] = key  # no '=' at all
        return "\n".join([head, *items]).encode("utf-8", "surrogatepass"), f"{key!r} without ="
    items[i] = f"{key}={value}"
    return "\n".join([head, *items]).encode("utf-8", "surrogatepass"), f"{key!r} = {value[:30]!r}"
