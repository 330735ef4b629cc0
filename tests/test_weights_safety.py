"""Untrusted weights (RELIABILITY A1, A2, A6, D1, D2): every bad file or name -> one error of ours."""

import json
import math
import os
import struct
import sys
import tracemalloc

import pytest
import torch
from safetensors.torch import save

from pellucid.errors import ConfigError, PellucidError, WeightsFormatError
from pellucid.model.config import ModelConfig
from pellucid.weights.safety import (
    check_state,
    expected_shapes,
    load_safetensors,
    model_dir,
    read_safetensors_header,
    validate_model_name,
)


def _file(header: dict | list | bytes | str, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file: 8-byte length, header, data. `length` may lie about the header size."""
    if isinstance(header, (dict, list)):
        header = json.dumps(header)
    raw = header.encode("utf-8") if isinstance(header, str) else header
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _t(dtype="F32", shape=(2,), start=0, end=8):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [start, end]}


# The malformed corpus of RELIABILITY A1 (+ A2a, A2d), each with words its error must contain.
MALFORMED = {
    "empty": (b"", "too short"),
    "seven_bytes": (b"\x01\x00\x00\x00\x00\x00\x00", "too short"),
    "header_len_past_file": (_file({}, length=1000), "past the end"),
    "header_len_2_63": (_file({}, length=2**63), "exceeds"),
    "header_101_mb": (_file({}, length=101 * 1000 * 1000), "exceeds"),
    "non_utf8": (_file(b'{"a\xff\xfe": 1}'), "not UTF-8"),
    "non_json": (_file("{not json"), "header: not valid JSON"),
    "array_header": (_file([1, 2, 3]), "not an object"),
    "overlap": (_file({"a": _t(end=8), "b": _t(start=4, end=12)}, bytes(12)), "overlap"),
    "hole": (_file({"a": _t(end=8), "b": _t(start=12, end=20)}, bytes(20)), "hole"),
    "offset_past_eof": (_file({"a": _t(start=0, end=8)}, bytes(4)), "past the end of the file"),
    "trailing_polyglot_bytes": (_file({"a": _t()}, bytes(8) + b"<script>"), "trailing"),
    "size_mismatch": (_file({"a": _t(shape=(3,), end=8)}, bytes(8)), "needs 12 bytes"),
    "shape_overflow": (_file({"a": _t(shape=(2**32, 2**32, 2**2), end=0)}), "needs"),
    "negative_dim": (_file({"a": _t(shape=(-1, 2), end=0)}), "negative dimension"),
    "unknown_dtype": (_file({"a": _t(dtype="F128")}, bytes(8)), "unknown dtype"),
    "non_string_metadata": (_file({"__metadata__": {"k": 1}, "a": _t()}, bytes(8)), "not a string"),
    "duplicate_key": (
        _file('{"a": ' + json.dumps(_t()) + ', "a": ' + json.dumps(_t()) + "}", bytes(8)),
        "duplicate key 'a'",
    ),
    "metadata_over_1mb": (
        _file({"__metadata__": {"k": "x" * (1 << 20)}, "a": _t()}, bytes(8)),
        "__metadata__ is",
    ),
    "shape_not_ints": (_file({"a": _t(shape=("2",))}, bytes(8)), "not a list of integers"),
    "offsets_reversed": (_file({"a": _t(start=8, end=0)}, bytes(8)), "data_offsets"),
    "extra_field": (_file({"a": {**_t(), "x": 1}}, bytes(8)), "exactly dtype"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_safetensors_raise_our_error_naming_the_cause(tmp_path, case):
    blob, words = MALFORMED[case]
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(blob)
    # Refused before reading or allocating what the header claims (2**63 bytes, 101 MB): checked
    # by the memory the attempt took, not by a wall-clock bound, which a busy CI machine broke.
    tracemalloc.start()
    try:
        with pytest.raises(WeightsFormatError) as err:
            load_safetensors(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * len(blob) + (4 << 20)
    msg = str(err.value)
    assert words in msg and "\n" not in msg and path.name in msg


def test_the_library_accepts_what_we_reject(tmp_path):
    # Why our checks exist: safetensors itself takes a duplicate key (keeping one) silently.
    from safetensors.torch import load_file

    path = tmp_path / "dup.safetensors"
    path.write_bytes(MALFORMED["duplicate_key"][0])
    assert list(load_file(path)) == ["a"]


def test_valid_file_round_trips_with_metadata(tmp_path):
    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)}
    path = tmp_path / "ok.safetensors"
    path.write_bytes(save(tensors, metadata={"format": "pt"}))
    entries, metadata = read_safetensors_header(path)
    assert metadata == {"format": "pt"}
    assert entries["w"].shape == (2, 3) and entries["b"].dtype == "BF16"
    got = load_safetensors(path)
    assert torch.equal(got["w"], tensors["w"]) and torch.equal(got["b"], tensors["b"])


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nonfinite_weights_rejected_unless_allowed(tmp_path, value):
    w = torch.zeros(4, 4)
    w[1, 2] = value
    path = tmp_path / "nan.safetensors"
    path.write_bytes(save({"layer.weight": w}))
    with pytest.raises(WeightsFormatError, match=r"'layer.weight' has 1 NaN/Inf"):
        load_safetensors(path)
    assert load_safetensors(path, allow_nonfinite=True)["layer.weight"].shape == (4, 4)


def test_state_check_lists_every_missing_unexpected_and_misshaped_name():
    cfg = ModelConfig(vocab_size=32, n_layer=1, n_head=2, n_embd=8, ffn_dim=16)
    tensors = {n: torch.zeros(s) for n, s in expected_shapes(cfg).items()}
    del tensors["blocks.0.attn.k_proj.weight"]
    tensors["blocks.0.mlp.up_proj.weight"] = torch.zeros(16, 9)
    tensors["extra.weight"] = torch.zeros(3)
    tensors["norm.weight"] = torch.zeros(8, dtype=torch.int32)
    with pytest.raises(WeightsFormatError) as err:
        check_state(expected_shapes(cfg), tensors, "m.safetensors")
    msg = str(err.value)
    assert "missing: blocks.0.attn.k_proj.weight[8, 8]" in msg
    assert "unexpected: extra.weight[3]" in msg
    assert "blocks.0.mlp.up_proj.weight is [16, 9], needs [16, 8]" in msg
    assert "not floating point: norm.weight (torch.int32)" in msg
    assert "\n" not in msg


def test_expected_shapes_of_a_tied_model_omit_the_head():
    tied = expected_shapes(ModelConfig(tie_embeddings=True))
    untied = expected_shapes(ModelConfig(tie_embeddings=False))
    assert "lm_head.weight" not in tied and untied["lm_head.weight"] == (256, 64)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_layer", 10**6),
        ("vocab_size", 0),
        ("vocab_size", 2**40),
        ("context_len", 0),
        ("context_len", -5),
        ("rope_theta", math.nan),
        ("n_head", 3),  # does not divide n_embd=64
    ],
)
def test_config_bounds_rejected_before_any_allocation(field, value):
    # expected_shapes builds on the meta device, after ModelConfig's validation: nothing allocates.
    with pytest.raises(ConfigError, match=field if field != "n_head" else "n_embd"):
        expected_shapes(ModelConfig(**{field: value}))


# --- D1: pickles are never opened ------------------------------------------------------------


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["evil.pt", "evil.pkl", "pytorch_model.bin", "evil.ckpt"])
def test_pickle_files_are_refused_without_unpickling(tmp_path, name):
    import pickle

    marker = tmp_path / "MARKER"
    path = tmp_path / name
    path.write_bytes(pickle.dumps(_Evil(marker)))
    if name == "evil.pt":  # the zip flavour torch.save writes
        torch.save({"x": _Evil(marker)}, path)
    with pytest.raises(WeightsFormatError, match="pickle-based checkpoints are refused"):
        load_safetensors(path)
    assert not marker.exists()


# --- D2: model names ---------------------------------------------------------------------------

BAD_NAMES = [
    "../../etc/passwd",
    "/etc/passwd",
    "a/../../b",
    "..",
    "%2e%2e%2f",
    "..\\..\\x",
    "x\x00.gguf",
    "\uff0e\uff0e\uff0f",  # fullwidth ../
    "a" * 300,
    "",
    ".hidden",
    "a..b",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_model_names_rejected(name):
    with pytest.raises(ConfigError, match="invalid model name"):
        validate_model_name(name)


def test_good_model_names_pass():
    for name in ("smollm2-135m-instruct", "gpt2", "my_model.v2"):
        assert validate_model_name(name) == name


def test_symlink_escape_rejected_without_opening_outside(isolated_home, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    models = isolated_home / "models"
    models.mkdir()
    (models / "sneaky").symlink_to(outside)
    (models / "fine").mkdir()
    opened, recording = [], [True]

    def audit(event, args):
        if recording[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(args[0]))

    sys.addaudithook(audit)  # hooks cannot be removed: this one goes quiet at the end
    assert model_dir("fine") == models / "fine"
    with pytest.raises(ConfigError, match="outside the models folder"):
        model_dir("sneaky")
    for name in BAD_NAMES:
        with pytest.raises(PellucidError):
            model_dir(name)
    recording[0] = False
    assert not [p for p in opened if str(outside) in p or "passwd" in p]
