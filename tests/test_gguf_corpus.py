"""GGUF files handcrafted byte by byte through `load_gguf` (RELIABILITY A3 and A4).

A3 ports llama.cpp's tests/test-gguf.cpp `handcrafted_file_type`s: every bad file must raise
GGUFFormatError (one type: never IndexError, KeyError, UnicodeDecodeError, struct.error ...), and
every good variant must load exactly and round-trip bit for bit through our writer.
A4 bounds the resources a hostile header can claim: each rejected in < 1 s, with < 50 MB of
memory allocated, and nothing silently truncated.
"""

import resource
import struct
import time
import tracemalloc

import pytest
import torch

from pellucid.errors import GGUFFormatError
from pellucid.model.config import ModelConfig
from pellucid.model.transformer import Transformer
from pellucid.weights.gguf import _qk_heads, gguf_names, load_gguf, permute_qk, save_gguf
from pellucid.weights.safety import expected_shapes

CFG = ModelConfig(
    vocab_size=32,
    context_len=16,
    n_layer=1,
    n_head=2,
    n_kv_head=1,
    n_embd=32,
    ffn_dim=32,
    norm_eps=1e-5,
    tie_embeddings=True,
)
U32, F32, STRING, ARRAY, F64 = 4, 6, 8, 9, 12
MAX = 2**64 - 1  # "-1" as a u64


def _str(s: str | bytes, length: int | None = None) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _str(key) + struct.pack("<I", vtype) + payload


def _u32(key: str, value: int) -> bytes:
    return _kv(key, U32, struct.pack("<I", value))


def _weights():
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(s, generator=g) * 0.1 for n, s in expected_shapes(CFG).items()}


def _model():
    return Transformer.from_weights(CFG, _weights()).eval()


def _metadata(alignment=None, extra=()):
    kvs = [
        _kv("general.architecture", STRING, _str("llama")),
        _u32("llama.block_count", CFG.n_layer),
        _u32("llama.context_length", CFG.context_len),
        _u32("llama.embedding_length", CFG.n_embd),
        _u32("llama.feed_forward_length", CFG.ffn_dim),
        _u32("llama.attention.head_count", CFG.n_head),
        _u32("llama.attention.head_count_kv", CFG.n_kv_head),
        _u32("llama.vocab_size", CFG.vocab_size),
        _kv("llama.rope.freq_base", F32, struct.pack("<f", CFG.rope_theta)),
        _kv("llama.attention.layer_norm_rms_epsilon", F32, struct.pack("<f", CFG.norm_eps)),
    ]
    if alignment is not None:
        kvs.append(_u32("general.alignment", alignment))
    return kvs + list(extra)


def _tensor_info(name, dims, ggml_type=0, offset=0):
    return (
        _str(name)
        + struct.pack("<I", len(dims))
        + struct.pack(f"<{len(dims)}Q", *dims)
        + struct.pack("<IQ", ggml_type, offset)
    )


def build(
    *,
    version=3,
    magic=b"GGUF",
    n_kv=None,
    n_tensors=None,
    kvs=None,
    alignment=32,
    declared_alignment=None,
    infos=None,
    data=None,
    truncate=0,
):
    """A llama GGUF of the tiny model, F32, every part replaceable by a test's lie."""
    heads = _qk_heads(CFG)
    blobs, table, offset = [], [], 0
    for ours, theirs in gguf_names(CFG).items():
        t = _weights()[ours]
        t = permute_qk(t, heads[ours]) if ours in heads else t
        raw = t.numpy().astype("<f4").tobytes()
        table.append((theirs, list(t.shape[::-1]), offset))
        blobs.append(raw + bytes(-len(raw) % alignment))
        offset += len(blobs[-1])
    kvs = _metadata(declared_alignment) if kvs is None else kvs
    infos = [_tensor_info(n, d, 0, o) for n, d, o in table] if infos is None else infos
    head = magic + struct.pack("<I", version)
    head += struct.pack(
        "<QQ", len(infos) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv
    )
    body = head + b"".join(kvs) + b"".join(infos)
    blob = body + bytes(-len(body) % alignment) + (b"".join(blobs) if data is None else data)
    return blob[: len(blob) - truncate]


def _infos_with(change):
    """The tensor table with `change(i, name, dims, offset) -> record or None` applied."""
    out, offset = [], 0
    for i, (ours, theirs) in enumerate(gguf_names(CFG).items()):
        dims = list(expected_shapes(CFG)[ours][::-1])
        size = 4 * torch.Size(dims).numel()
        out.append(change(i, theirs, dims, offset) or _tensor_info(theirs, dims, 0, offset))
        offset += size + (-size % 32)
    return out


BAD = {
    "bad_magic": (lambda: build(magic=b"GGUG"), "not a GGUF file"),
    "version_1": (lambda: build(version=1), "version 1"),
    "version_future": (lambda: build(version=4), "version 4"),
    "n_tensors_minus_1": (lambda: build(n_tensors=MAX), "more than the file holds"),
    "n_kv_minus_1": (lambda: build(n_kv=MAX), "more than the file holds"),
    "key_size_minus_1": (
        lambda: build(kvs=[_str("k", length=MAX) + struct.pack("<I", U32)]),
        "needs",
    ),
    "bad_value_type": (lambda: build(kvs=[*_metadata(), _kv("x", 99, b"")]), "unknown value type"),
    "duplicate_key": (
        lambda: build(kvs=[*_metadata(), _u32("llama.block_count", 1)]),
        "duplicate metadata key",
    ),
    "alignment_0": (lambda: build(declared_alignment=0), "alignment"),
    "alignment_13": (lambda: build(declared_alignment=13), "alignment"),
    "alignment_2_31": (lambda: build(declared_alignment=2**31), "alignment"),
    "name_too_long": (
        lambda: build(
            infos=_infos_with(lambda i, n, d, o: _tensor_info("x" * 70000, d) if i == 0 else None)
        ),
        "",
    ),
    "n_dims_5": (
        lambda: build(
            infos=_infos_with(
                lambda i, n, d, o: _tensor_info(n, [*d, 1, 1, 1, 1][:5], 0, o) if i == 0 else None
            )
        ),
        "dimensions",
    ),
    "n_dims_1e6": (
        lambda: build(
            infos=_infos_with(
                lambda i, n, d, o: _str(n) + struct.pack("<I", 10**6) if i == 0 else None
            )
        ),
        "dimensions",
    ),
    "shape_minus_1": (
        lambda: build(
            infos=_infos_with(
                lambda i, n, d, o: _tensor_info(n, [MAX, 1], 0, o) if i == 0 else None
            )
        ),
        "shape",
    ),
    "shape_4_int32_max": (
        lambda: build(
            infos=_infos_with(
                lambda i, n, d, o: _tensor_info(n, [32, 4 * (2**31 - 1)], 0, o) if i == 0 else None
            )
        ),
        "past the end",
    ),
    "shape_product_wraps_u64": (
        lambda: build(
            infos=_infos_with(
                lambda i, n, d, o: _tensor_info(n, [2**32, 2**32 + 32], 0, o) if i == 0 else None
            )
        ),
        "shape",
    ),
    "bad_ggml_type": (
        lambda: build(
            infos=_infos_with(lambda i, n, d, o: _tensor_info(n, d, 1000, o) if i == 0 else None)
        ),
        "ggml type",
    ),
    "offset_minus_1": (
        lambda: build(
            infos=_infos_with(
                lambda i, n, d, o: _tensor_info(n, d, 0, MAX & ~31) if i == 0 else None
            )
        ),
        "past the end",
    ),
    "duplicate_tensor_name": (
        lambda: build(
            infos=_infos_with(
                lambda i, n, d, o: _tensor_info("token_embd.weight", d, 0, o) if i == 1 else None
            )
        ),
        "duplicate tensor name",
    ),
    "inconsistent_alignment": (
        lambda: build(
            infos=_infos_with(lambda i, n, d, o: _tensor_info(n, d, 0, o + 4) if i == 1 else None)
        ),
        "alignment",
    ),
    "overlapping_tensors": (
        lambda: build(
            infos=_infos_with(lambda i, n, d, o: _tensor_info(n, d, 0, 0) if i == 1 else None)
        ),
        "overlap",
    ),
    "not_enough_data": (lambda: build(truncate=100), "past the end"),
}


def _non_utf8_key():
    kvs = _metadata()
    kvs.append(_str(b"k\xff\xfe") + struct.pack("<I", U32) + bytes(4))
    return build(kvs=kvs)


BAD["non_utf8_key"] = (_non_utf8_key, "UTF-8")


def _missing_tensor():
    infos = _infos_with(lambda i, n, d, o: None)
    del infos[3]
    return build(infos=infos)


BAD["missing_tensor"] = (_missing_tensor, "missing")


@pytest.mark.parametrize("case", sorted(BAD))
def test_every_bad_file_is_one_gguf_format_error(tmp_path, case):
    make, words = BAD[case]
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(make())
    with pytest.raises(GGUFFormatError) as err:  # the one type; anything else fails the test
        load_gguf(path)
    msg = str(err.value)
    assert words in msg and "\n" not in msg, msg


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"alignment": 64, "declared_alignment": 64},
        {"kvs": _metadata(extra=[_u32("x.unknown", 7)])},
    ],
    ids=["plain", "alignment_64", "unknown_key"],
)
def test_good_files_load_exactly_and_round_trip_through_our_writer(tmp_path, variant):
    path = tmp_path / "good.gguf"
    path.write_bytes(build(**variant))
    model, want = load_gguf(path), _model()
    for name, t in want.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name
    ours = save_gguf(model, tmp_path / "again.gguf")
    assert ours.read_bytes() == save_gguf(want, tmp_path / "ref.gguf").read_bytes()
    again = load_gguf(ours)
    assert all(torch.equal(again.state_dict()[n], t) for n, t in want.state_dict().items())


# --- A4: resource bounds -----------------------------------------------------------------------


def _array(key, etype, count, payload=b""):
    return _kv(key, ARRAY, struct.pack("<IQ", etype, count) + payload)


# Each on top of a complete, valid model: only the hostile part can make the load fail.
HOSTILE = {
    "5M_float64_elements": lambda: build(kvs=[*_metadata(), _array("a", F64, 5_000_000)]),
    "string_2_63": lambda: build(kvs=[*_metadata(), _kv("s", STRING, _str("hello", length=2**63))]),
    "1M_strings_of_2_40": lambda: build(
        kvs=[*_metadata(), _array("a", STRING, 10**6, struct.pack("<Q", 2**40) * 4)]
    ),
    "tensor_past_eof": lambda: build(
        infos=_infos_with(
            lambda i, n, d, o: _tensor_info(n, d, 0, o + (1 << 40)) if i == 0 else None
        )
    ),
    "alignment_2_30": lambda: build(declared_alignment=2**30),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_headers_are_rejected_fast_and_small(tmp_path, case):
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(HOSTILE[case]())
    assert path.stat().st_size < 64 << 10  # a small file that claims far more
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(GGUFFormatError):  # fails: never read as 'hello' or truncated
            load_gguf(path)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert elapsed < 1.0 and peak < 50 << 20 and grown < 50 << 10, (elapsed, peak, grown)
