"""The bounded GGUF header reader: llama.cpp's handcrafted bad files, resource bounds, good files.

Every bad file is built byte by byte here (guided by the list of corruptions in llama.cpp's
tests/test-gguf.cpp, not its code) and must raise GGUFFormatError, fast, without allocating what
the header claims. Good files come from the `gguf` package's writer and must read back as the
`gguf` package's own reader reads them.
"""

import resource
import struct
import time

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pellucid.errors import GGUFFormatError
from pellucid.gguf_reader import parse_gguf, read_gguf

Q8_0 = gguf.GGMLQuantizationType.Q8_0
U8, U32, I32, F32, BOOL, STR, ARR, U64, F64 = 0, 4, 5, 6, 7, 8, 9, 10, 12


def s(text) -> bytes:
    """A GGUF string: u64 length, then the bytes."""
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key, vtype, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def u32(key, v) -> bytes:
    return kv(key, U32, struct.pack("<I", v))


def tensor(name, dims, ggml_type=0, offset=0, n_dims=None) -> bytes:
    n = len(dims) if n_dims is None else n_dims
    return (
        s(name)
        + struct.pack("<I", n)
        + struct.pack(f"<{len(dims)}Q", *dims)
        + struct.pack("<IQ", ggml_type, offset)
    )


def build(kvs=(), tensors=(), *, version=3, n_kv=None, n_tensors=None, data=b"", magic=b"GGUF"):
    """A whole file: header, key-values, tensor infos, padding to 32, data."""
    head = magic + struct.pack(
        "<IQQ",
        version,
        len(tensors) if n_tensors is None else n_tensors,
        len(kvs) if n_kv is None else n_kv,
    )
    body = head + b"".join(kvs) + b"".join(tensors)
    return body + b"\0" * (-len(body) % 32) + data


GOOD_KVS = (kv("general.architecture", STR, s("llama")), u32("llama.block_count", 2))
GOOD_TENSOR = tensor("w", [8, 2])  # F32, 64 bytes
GOOD = build(GOOD_KVS, [GOOD_TENSOR], data=bytes(64))

BAD = {
    "empty": b"",
    "short_magic": b"GG",
    "bad_magic": b"GGUX" + GOOD[4:],
    "version_1": build(GOOD_KVS, version=1),
    "version_4": build(GOOD_KVS, version=4),
    "version_0": build(GOOD_KVS, version=0),
    "n_tensors_minus_1": build(GOOD_KVS, n_tensors=2**64 - 1),
    "n_kv_minus_1": build(GOOD_KVS, n_kv=2**64 - 1),
    "n_kv_three_too_many": build(GOOD_KVS, n_kv=5),
    "key_length_2_63": build([struct.pack("<Q", 2**63) + b"general.architecture"]),
    "key_length_minus_1": build([struct.pack("<Q", 2**64 - 1) + b"x"]),
    "key_not_utf8": build([kv(b"\xff\xfe", U32, bytes(4))]),
    "bad_value_type": build([kv("k", 13, bytes(8))]),
    "bad_value_type_huge": build([kv("k", 2**32 - 1, bytes(8))]),
    "bad_array_element_type": build([kv("k", ARR, struct.pack("<IQ", 99, 1) + bytes(8))]),
    "string_length_2_63": build([kv("k", STR, struct.pack("<Q", 2**63) + b"hello")]),
    "string_not_utf8": build([kv("k", STR, s(b"\xc3\x28"))]),
    "duplicate_key": build([u32("k", 1), u32("k", 2)]),
    "arrays_nested_too_deep": build(
        [kv("k", ARR, struct.pack("<IQ", ARR, 1) * 4 + struct.pack("<IQ", U8, 0))]
    ),
    "alignment_0": build([u32("general.alignment", 0)]),
    "alignment_13": build([u32("general.alignment", 13)]),
    "alignment_2_31": build([u32("general.alignment", 2**31)]),
    "alignment_2_30": build([u32("general.alignment", 2**30)]),
    "alignment_not_int": build([kv("general.alignment", STR, s("32"))]),
    "alignment_bool": build([kv("general.alignment", BOOL, b"\x01")]),
    "tensor_name_length_2_63": build(
        GOOD_KVS, [struct.pack("<Q", 2**63) + b"w" + struct.pack("<I", 1)]
    ),
    "n_dims_0": build(GOOD_KVS, [tensor("w", [], n_dims=0)], data=bytes(64)),
    "n_dims_5": build(GOOD_KVS, [tensor("w", [1, 1, 1, 1, 1])], data=bytes(64)),
    "n_dims_1e6": build(GOOD_KVS, [tensor("w", [1], n_dims=10**6)], data=bytes(64)),
    "shape_minus_1": build(GOOD_KVS, [tensor("w", [2**64 - 1])], data=bytes(64)),
    "shape_zero": build(GOOD_KVS, [tensor("w", [0, 4])], data=bytes(64)),
    "shape_4_int32_max": build(GOOD_KVS, [tensor("w", [4 * (2**31 - 1)])], data=bytes(64)),
    "shape_product_wraps_u64": build(GOOD_KVS, [tensor("w", [2**32, 2**32])], data=bytes(64)),
    "shape_product_2_62": build(GOOD_KVS, [tensor("w", [2**31, 2**31])], data=bytes(64)),
    "bad_ggml_type": build(GOOD_KVS, [tensor("w", [8], ggml_type=9999)], data=bytes(64)),
    "removed_ggml_type_4": build(GOOD_KVS, [tensor("w", [32], ggml_type=4)], data=bytes(64)),
    "row_not_a_block_multiple": build(GOOD_KVS, [tensor("w", [33], ggml_type=8)], data=bytes(64)),
    "offset_minus_1": build(GOOD_KVS, [tensor("w", [8], offset=2**64 - 1)], data=bytes(64)),
    "offset_misaligned": build(GOOD_KVS, [tensor("w", [8], offset=4)], data=bytes(64)),
    "offset_past_eof": build(GOOD_KVS, [tensor("w", [8], offset=1 << 40)], data=bytes(64)),
    "duplicate_tensor_name": build(
        GOOD_KVS, [tensor("w", [8]), tensor("w", [8], offset=32)], data=bytes(64)
    ),
    "inconsistent_alignment": build(
        [*GOOD_KVS, u32("general.alignment", 64)], [tensor("w", [8], offset=32)], data=bytes(96)
    ),
    "not_enough_data": build(GOOD_KVS, [GOOD_TENSOR], data=bytes(63)),
    "no_data_at_all": build(GOOD_KVS, [GOOD_TENSOR]),
}


def _parse_error(blob: bytes) -> str:
    with pytest.raises(GGUFFormatError) as err:
        parse_gguf(blob, "bad.gguf")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("bad.gguf: ")
    return msg


@pytest.mark.parametrize("name", list(BAD))
def test_handcrafted_bad_file_is_one_format_error(name):
    t0 = time.perf_counter()
    _parse_error(BAD[name])
    assert time.perf_counter() - t0 < 2.0  # a hang guard, with room for a busy machine


def test_errors_name_the_culprit():
    assert "magic" in _parse_error(BAD["bad_magic"])
    assert "version 4" in _parse_error(BAD["version_4"])
    assert "duplicate metadata key 'k'" in _parse_error(BAD["duplicate_key"])
    assert "unknown value type 13" in _parse_error(BAD["bad_value_type"])
    assert "general.alignment 13" in _parse_error(BAD["alignment_13"])
    assert "5 dimensions" in _parse_error(BAD["n_dims_5"])
    assert "duplicate tensor name 'w'" in _parse_error(BAD["duplicate_tensor_name"])
    assert "not a multiple of the alignment" in _parse_error(BAD["offset_misaligned"])
    assert "unknown ggml type 9999" in _parse_error(BAD["bad_ggml_type"])
    assert "past the end" in _parse_error(BAD["not_enough_data"])


def test_every_truncation_of_a_good_file_is_a_format_error():
    assert parse_gguf(GOOD).tensors[0].name == "w"
    for cut in range(len(GOOD)):
        _parse_error(GOOD[:cut])


def test_huge_declared_sizes_rejected_fast_without_allocating():
    """A4: ~100-byte files declaring 5M FLOAT64s, a 2^63-byte string, 10^6 strings of 2^40 bytes."""
    many_floats = build([kv("k", ARR, struct.pack("<IQ", F64, 5_000_000) + bytes(16))])
    many_strings = build(
        [kv("k", ARR, struct.pack("<IQ", STR, 10**6) + struct.pack("<Q", 2**40) + b"x")]
    )
    assert len(many_floats) <= 100 and len(many_strings) <= 100
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for blob in (many_floats, many_strings, BAD["string_length_2_63"]):
        t0 = time.perf_counter()
        msg = _parse_error(blob)
        assert time.perf_counter() - t0 < 3.0  # a hang guard, with room for a busy machine
        assert "left in the file" in msg
    # ru_maxrss is in KiB on Linux: the peak grew by less than 50 MB
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 50_000


def test_read_gguf_file_errors(tmp_path):
    (tmp_path / "empty.gguf").write_bytes(b"")
    for path, words in [
        (tmp_path / "none.gguf", "no such GGUF file"),
        (tmp_path, "is a folder"),
        (tmp_path / "empty.gguf", "empty file"),
    ]:
        with pytest.raises(GGUFFormatError, match=words):
            read_gguf(path)


def _write_with_gguf_package(path):
    w = gguf.GGUFWriter(path, "llama")
    w.add_string("text", "héllo 👋")
    w.add_uint32("llama.block_count", 3)
    w.add_int64("neg", -5)
    w.add_float32("eps", 1e-5)
    w.add_float64("pi", 3.141592653589793)
    w.add_bool("flag", True)
    w.add_uint8("small", 255)
    w.add_array("tokens", ["a", "bb", "Ġc", ""])
    w.add_array("ids", [1, 2, 3])
    w.add_array("scores", [0.5, -1.25])
    w.add_tensor("f32", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("f16", np.ones((2, 32), dtype=np.float16))
    q = gguf.quantize(np.linspace(-1, 1, 256, dtype=np.float32).reshape(4, 64), Q8_0)
    w.add_tensor("q8", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_good_file_reads_as_the_gguf_package_reads_it(tmp_path):
    path = tmp_path / "good.gguf"
    _write_with_gguf_package(path)
    ours, theirs = read_gguf(path), gguf.GGUFReader(path)
    expected = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata == expected  # float32 values widen to the same Python floats
    assert ours.metadata["tokens"] == ["a", "bb", "Ġc", ""] and ours.metadata["eps"] != 1e-5
    assert ours.metadata["text"] == "héllo 👋" and ours.metadata["flag"] is True
    assert [(t.name, t.shape, t.ggml_type, ours.data_offset + t.offset) for t in ours.tensors] == [
        (t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.data_offset))
        for t in theirs.tensors
    ]
    assert ours.version == 3 and ours.alignment == 32


def test_custom_alignment_is_honoured(tmp_path):
    blob = build(
        [u32("general.alignment", 64)],
        [tensor("w", [8], offset=0), tensor("v", [8], offset=64)],
    )
    blob += b"\0" * (-len(blob) % 64) + bytes(128)
    f = parse_gguf(blob)
    assert f.alignment == 64 and f.data_offset % 64 == 0
    assert [t.offset for t in f.tensors] == [0, 64]


RICH = build(
    [
        *GOOD_KVS,
        kv("s", STR, s("héllo")),
        kv("tokens", ARR, struct.pack("<IQ", STR, 3) + s("a") + s("Ġb") + s("")),
        kv("ids", ARR, struct.pack("<IQ", I32, 3) + struct.pack("<3i", 1, -2, 3)),
        kv("pi", F64, struct.pack("<d", 3.14)),
        u32("general.alignment", 32),
    ],
    [GOOD_TENSOR, tensor("q", [32, 2], ggml_type=8, offset=64)],  # Q8_0: 2 blocks of 34 bytes
    data=bytes(64 + 68),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_files_raise_only_format_errors(data):
    """A5 in small: random byte edits and cuts of a valid file either parse or raise
    GGUFFormatError; never another exception, a hang or a huge allocation."""
    assert len(parse_gguf(RICH).tensors) == 2
    blob = bytearray(RICH)
    for _ in range(data.draw(st.integers(1, 6))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.sampled_from([0, 1, 0xFF]))
    blob = blob[: data.draw(st.integers(0, len(blob)))]
    try:
        parse_gguf(bytes(blob))
    except GGUFFormatError as e:
        assert "\n" not in str(e)
