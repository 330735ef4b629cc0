"""Hugging Face format: a folder of config.json + *.safetensors <-> a pellucid Transformer.

Three families cover what our ModelConfig can express:

    GPT2LMHeadModel   learned positions, LayerNorm with bias, GELU (tanh) MLP, fused q/k/v
    LlamaForCausalLM  RoPE (rotate-half, as ours), RMSNorm, SwiGLU, grouped-query attention
    Qwen3ForCausalLM  Llama plus QK-norm: a per-head RMSNorm (weight: head_dim, eps: rms_norm_eps)
                      on q and k before RoPE, exactly our `qk_norm`; no biases at all

Each family's tensor names and config keys live in ONE place below (`_gpt2_names`,
`_llama_names`, and the Family records) and serve both directions: loading renames their tensors
to ours, exporting renames ours to theirs. Export picks the first family that maps the config
back to itself unchanged; a model none represents exactly is refused, naming the field.

    >>> model = load_hf("path/to/gpt2")                      # config.json + model.safetensors
    >>> save_hf(model, "out/", tokenizer=tok)                # AutoModelForCausalLM loads out/

Only safetensors is read: a folder holding only `pytorch_model.bin` is refused (pickle), and
nothing from the folder is ever executed (no `trust_remote_code`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save
from torch import Tensor

from pellucid.errors import ConfigError, WeightsFormatError
from pellucid.files import atomic_write, check_shape, read_json
from pellucid.model.config import ModelConfig
from pellucid.model.transformer import Transformer
from pellucid.weights.safety import (
    check_state,
    expected_shapes,
    load_safetensors,
    refuse_pickle,
)

if TYPE_CHECKING:
    from pellucid.tokenizer.bpe import Tokenizer

MAX_JSON = 16 << 20  # config.json and the shard index are small; a huge one is not a config
_SHARD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.safetensors")


@dataclass(frozen=True)
class Rename:
    """ours (one name, or the parts fused into one HF tensor along dim 0) <-> theirs.

    `transpose`: GPT-2's Conv1D keeps weights as (in, out), nn.Linear as (out, in).
    """

    ours: tuple[str, ...]
    theirs: str
    transpose: bool = False


def _gpt2_names(cfg: ModelConfig) -> list[Rename]:
    names = [
        Rename(("tok_emb.weight",), "transformer.wte.weight"),
        Rename(("pos_emb.weight",), "transformer.wpe.weight"),
        Rename(("norm.weight",), "transformer.ln_f.weight"),
        Rename(("norm.bias",), "transformer.ln_f.bias"),
    ]
    if not cfg.tie_embeddings:
        names.append(Rename(("lm_head.weight",), "lm_head.weight"))
    for i in range(cfg.n_layer):
        o, t = f"blocks.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            conv = kind == "weight"
            names += [
                Rename((f"{o}attn_norm.{kind}",), f"{t}ln_1.{kind}"),
                Rename(
                    tuple(f"{o}attn.{p}_proj.{kind}" for p in "qkv"), f"{t}attn.c_attn.{kind}", conv
                ),
                Rename((f"{o}attn.o_proj.{kind}",), f"{t}attn.c_proj.{kind}", conv),
                Rename((f"{o}mlp_norm.{kind}",), f"{t}ln_2.{kind}"),
                Rename((f"{o}mlp.up_proj.{kind}",), f"{t}mlp.c_fc.{kind}", conv),
                Rename((f"{o}mlp.down_proj.{kind}",), f"{t}mlp.c_proj.{kind}", conv),
            ]
    return names


def _llama_names(cfg: ModelConfig) -> list[Rename]:
    names = [
        Rename(("tok_emb.weight",), "model.embed_tokens.weight"),
        Rename(("norm.weight",), "model.norm.weight"),
    ]
    if not cfg.tie_embeddings:
        names.append(Rename(("lm_head.weight",), "lm_head.weight"))
    kinds = ("weight", "bias") if cfg.bias else ("weight",)
    for i in range(cfg.n_layer):
        o, t = f"blocks.{i}.", f"model.layers.{i}."
        names += [
            Rename((f"{o}attn_norm.weight",), f"{t}input_layernorm.weight"),
            Rename((f"{o}mlp_norm.weight",), f"{t}post_attention_layernorm.weight"),
        ]
        names += [
            Rename((f"{o}attn.{p}.{kind}",), f"{t}self_attn.{p}.{kind}")
            for p in ("q_proj", "k_proj", "v_proj", "o_proj")
            for kind in kinds
        ]
        if cfg.qk_norm:  # Qwen3's names for the same per-head norms
            names += [
                Rename((f"{o}attn.{p}.weight",), f"{t}self_attn.{p}.weight")
                for p in ("q_norm", "k_norm")
            ]
        names += [
            Rename((f"{o}mlp.{p}.{kind}",), f"{t}mlp.{p}.{kind}")
            for p in ("gate_proj", "up_proj", "down_proj")
            for kind in kinds
        ]
    return names


@dataclass(frozen=True)
class Family:
    """How one transformers architecture maps onto ModelConfig."""

    architecture: str
    model_type: str
    keys: dict[str, str]  # our config field -> their config.json key
    ours_fixed: dict[str, Any]  # our fields this family always has
    theirs_fixed: dict[str, Any]  # their settings we support (and write), with their defaults
    defaults: dict[str, Any]  # their defaults for optional keys (transformers')
    names: Callable[[ModelConfig], list[Rename]]
    ignore: str  # tensors some checkpoints carry that are not weights (buffers)
    extra: dict[str, Any] = field(default_factory=dict)  # written on export only


GPT2 = Family(
    architecture="GPT2LMHeadModel",
    model_type="gpt2",
    keys={
        "vocab_size": "vocab_size",
        "context_len": "n_positions",
        "n_layer": "n_layer",
        "n_head": "n_head",
        "n_embd": "n_embd",
        "ffn_dim": "n_inner",
        "norm_eps": "layer_norm_epsilon",
        "tie_embeddings": "tie_word_embeddings",
    },
    ours_fixed={
        "pos": "learned",
        "norm": "layernorm",
        "mlp": "gelu",
        "bias": True,
        "qk_norm": False,
    },
    theirs_fixed={
        "activation_function": "gelu_new",
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
    },
    defaults={"n_inner": None, "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True},
    names=_gpt2_names,
    ignore=r"\.attn\.(masked_)?bias$",
    extra={"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
)
LLAMA = Family(
    architecture="LlamaForCausalLM",
    model_type="llama",
    keys={
        "vocab_size": "vocab_size",
        "context_len": "max_position_embeddings",
        "n_layer": "num_hidden_layers",
        "n_head": "num_attention_heads",
        "n_kv_head": "num_key_value_heads",
        "n_embd": "hidden_size",
        "ffn_dim": "intermediate_size",
        "head_dim": "head_dim",
        "rope_theta": "rope_theta",
        "norm_eps": "rms_norm_eps",
        "bias": "attention_bias",
        "tie_embeddings": "tie_word_embeddings",
    },
    ours_fixed={"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": False},
    theirs_fixed={"hidden_act": "silu", "rope_type": "default"},
    defaults={
        "num_key_value_heads": None,
        "head_dim": None,
        "rope_theta": 10_000.0,
        "rms_norm_eps": 1e-6,
        "attention_bias": False,
        "tie_word_embeddings": False,
    },
    names=_llama_names,
    ignore=r"\.rotary_emb\.inv_freq$",
)
# Qwen3's MLP never has biases and its attention_bias covers q/k/v/o only, so only bias=False maps.
QWEN3 = Family(
    architecture="Qwen3ForCausalLM",
    model_type="qwen3",
    keys={k: v for k, v in LLAMA.keys.items() if k != "bias"},
    ours_fixed={
        "pos": "rope",
        "norm": "rmsnorm",
        "mlp": "swiglu",
        "qk_norm": True,
        "bias": False,
    },
    theirs_fixed={
        "hidden_act": "silu",
        "rope_type": "default",
        "attention_bias": False,
        "use_sliding_window": False,
    },
    defaults={  # Qwen3Config's, which differ from Llama's in head_dim
        "num_key_value_heads": None,
        "head_dim": 128,
        "rope_theta": 10_000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    },
    names=_llama_names,
    ignore=LLAMA.ignore,
    extra={"sliding_window": None, "attention_dropout": 0.0},
)
FAMILIES = (GPT2, LLAMA, QWEN3)
_ROPE_FAMILIES = (LLAMA, QWEN3)  # transformers 5 writes their RoPE settings in rope_parameters
# Kept alike: a GELU MLP is what the tanh approximation computes (transformers' gelu_new).
_SAME = {"gelu_pytorch_tanh": "gelu_new"}


# The fields the readers below rely on, with their types (pellucid.files.check_shape); the
# numbers they copy into a ModelConfig are checked there.
CONFIG_SHAPE = {
    "architectures?": [str],
    "model_type?": str,
    "layer_types?": [str],
    "rope_parameters?": dict,
    "rope_scaling?": dict,
}
INDEX_SHAPE = {"weight_map": dict}


def _read_json(path: Path, shape: dict[str, Any]) -> dict[str, Any]:
    return read_json(path, WeightsFormatError, shape=shape, max_bytes=MAX_JSON)


def _flatten_rope(c: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 nests RoPE settings in rope_parameters, 4.x in rope_theta + rope_scaling."""
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise WeightsFormatError(
            f"config.json: rope_parameters must be an object, got {rope!r:.60}"
        )
    flat = {**c, "rope_type": rope.get("rope_type", rope.get("type", "default"))}
    if "rope_theta" in rope:
        flat["rope_theta"] = rope["rope_theta"]
    if c.get("mlp_bias", c.get("attention_bias", False)) != c.get("attention_bias", False):
        raise WeightsFormatError("config.json: attention_bias != mlp_bias is not supported")
    return flat


def family_of(c: dict[str, Any]) -> Family:
    """The family named by config.json's `architectures` (or `model_type`)."""
    archs = c.get("architectures") or []
    for fam in FAMILIES:
        if fam.architecture in archs or (not archs and c.get("model_type") == fam.model_type):
            return fam
    named = archs or c.get("model_type")
    supported = ", ".join(f.architecture for f in FAMILIES)
    raise WeightsFormatError(
        f"config.json: unsupported architecture {named!r:.80} (pellucid reads {supported})"
    )


def config_from_hf(c: dict[str, Any]) -> ModelConfig:
    """Map a transformers config.json (already parsed) onto ModelConfig, checking every value."""
    fam = family_of(c)
    c = _flatten_rope(c)
    # The settings compared below, typed first: a list where a name belongs would not even hash.
    fixed = {f"{key}?": type(want) for key, want in fam.theirs_fixed.items()}
    check_shape(c, fixed, "config.json", WeightsFormatError)
    layer_types = c.get("layer_types") or []
    if not isinstance(layer_types, list) or any(t != "full_attention" for t in layer_types):
        raise WeightsFormatError(
            f"config.json: layer_types={layer_types!r:.60} is not supported (need full_attention only)"
        )
    for key, want in fam.theirs_fixed.items():
        got = c.get(key, want)
        if _SAME.get(got, got) != want:
            raise WeightsFormatError(
                f"config.json: {key}={got!r:.40} is not supported (need {want!r})"
            )
    fields = dict(fam.ours_fixed)
    for ours, theirs in fam.keys.items():
        if theirs not in c and theirs not in fam.defaults:
            raise WeightsFormatError(f"config.json: missing key '{theirs}'")
        fields[ours] = c.get(theirs, fam.defaults.get(theirs))
    if isinstance(fields.get("rope_theta"), int):  # JSON may spell 10000.0 as 10000
        fields["rope_theta"] = float(fields["rope_theta"])
    try:
        return ModelConfig(**fields)
    except ConfigError as e:
        raise WeightsFormatError(f"config.json ({fam.architecture}): {e}") from None


def _hf_config(fam: Family, cfg: ModelConfig) -> dict[str, Any]:
    """The config.json `fam` would have for `cfg` (not yet checked to mean the same model)."""
    c = {"architectures": [fam.architecture], "model_type": fam.model_type}
    c |= fam.theirs_fixed | fam.extra | {t: getattr(cfg, o) for o, t in fam.keys.items()}
    if fam in _ROPE_FAMILIES:
        c.pop("rope_type")
        c["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if fam is LLAMA:
        c["mlp_bias"] = cfg.bias
    return c


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json of the first family that represents `cfg` exactly (checked by mapping
    it back). Raises WeightsFormatError naming, for the closest families, each field they lack."""
    plain = dataclasses.replace(cfg, dropout=0.0)
    misses = []
    for fam in FAMILIES:
        needs = {k: v for k, v in fam.ours_fixed.items() if getattr(cfg, k) != v}
        if not needs:
            c = _hf_config(fam, cfg)
            back = config_from_hf(c)
            if cfg.pos != "rope":  # rope_theta means nothing without RoPE; GPT-2 has no key for it
                back = dataclasses.replace(back, rope_theta=cfg.rope_theta)
            if back == plain:
                return c
            # A size the family cannot hold (GPT-2: no GQA, no head_dim): what it would become.
            needs = {
                f.name: getattr(back, f.name)
                for f in dataclasses.fields(plain)
                if getattr(back, f.name) != getattr(plain, f.name)
            }
        misses.append((len(needs), fam.architecture, needs))
    fewest = min(n for n, _, _ in misses)
    closest = "; ".join(
        f"{arch} needs "
        + ", ".join(f"{k}={v} (this model has {getattr(cfg, k)})" for k, v in needs.items())
        for n, arch, needs in misses
        if n == fewest
    )
    raise WeightsFormatError(f"no Hugging Face architecture matches this model: {closest}")


def _to_theirs(ours: dict[str, Tensor], names: list[Rename]) -> dict[str, Tensor]:
    """Our tensors -> HF tensors (fusing q/k/v and transposing for GPT-2's Conv1D)."""
    out = {}
    for r in names:
        t = torch.cat([ours[n] for n in r.ours]) if len(r.ours) > 1 else ours[r.ours[0]]
        out[r.theirs] = (t.t() if r.transpose else t).contiguous()
    return out


def _to_ours(theirs: dict[str, Tensor], names: list[Rename]) -> dict[str, Tensor]:
    out = {}
    for r in names:
        t = theirs[r.theirs]
        t = t.t() if r.transpose else t
        for name, part in zip(r.ours, t.chunk(len(r.ours)), strict=True):
            out[name] = part.contiguous()
    return out


def _read_shards(folder: Path, allow_nonfinite: bool) -> dict[str, Tensor]:
    """All tensors of model.safetensors, or of the shards model.safetensors.index.json lists."""
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if not index.is_file():
        if not single.is_file():
            pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(
                p.name for p in folder.glob("*.pt")
            )
            if pickles:
                refuse_pickle(folder / pickles[0])
            raise WeightsFormatError(
                f"{folder}: no model.safetensors or model.safetensors.index.json"
            )
        return load_safetensors(single, allow_nonfinite=allow_nonfinite)
    weight_map = _read_json(index, INDEX_SHAPE)["weight_map"]
    if not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightsFormatError(f"{index.name}: 'weight_map' must map tensor names to shard files")
    tensors: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if not _SHARD.fullmatch(shard) or ".." in shard:  # a name, never a path
            raise WeightsFormatError(f"{index.name}: invalid shard file name {shard!r:.80}")
        for name, t in load_safetensors(folder / shard, allow_nonfinite=allow_nonfinite).items():
            if weight_map.get(name) != shard:
                raise WeightsFormatError(
                    f"{shard}: tensor '{name}' is not listed for this shard in {index.name}"
                )
            tensors[name] = t
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise WeightsFormatError(f"{index.name} lists tensors no shard holds: {missing[:6]}")
    return tensors


def load_hf(
    folder: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    allow_nonfinite: bool = False,
    device: torch.device | str | None = None,
) -> Transformer:
    """A transformers model folder (GPT-2, Llama or Qwen3; safetensors) -> Transformer in `dtype`.

    Every problem (unsupported architecture, bad config value, missing/unexpected/mis-shaped
    tensor, NaN) raises one WeightsFormatError line before the model is built.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsFormatError(f"{folder}: not a model folder")
    c = _read_json(folder / "config.json", CONFIG_SHAPE)
    fam = family_of(c)
    cfg = config_from_hf(c)
    theirs = _read_shards(folder, allow_nonfinite)
    theirs = {n: t for n, t in theirs.items() if not re.search(fam.ignore, n)}
    if cfg.tie_embeddings:  # some files store the tied head too; it is the embedding
        theirs.pop("lm_head.weight", None)
    names = fam.names(cfg)
    with torch.device("meta"):  # expected HF shapes: our expected shapes, renamed
        meta = {n: torch.empty(s) for n, s in expected_shapes(cfg).items()}
        want = {n: tuple(t.shape) for n, t in _to_theirs(meta, names).items()}
    check_state(want, theirs, f"{folder.name} ({fam.architecture})")
    ours = {n: t.to(dtype) for n, t in _to_ours(theirs, names).items()}
    return Transformer.from_weights(cfg, ours, device)


def _tokenizer_config(tokenizer: Tokenizer, cfg: ModelConfig, chat_template: str | None) -> dict:
    """tokenizer_config.json for AutoTokenizer: a fast tokenizer over our tokenizer.json."""
    names = {i: s for s, i in tokenizer.special_tokens.items()}
    out: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": cfg.context_len,
        "clean_up_tokenization_spaces": False,
    }
    for role, i in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id)):
        if i is not None and i in names:
            out[role] = names[i]
    if chat_template is not None:
        out["chat_template"] = chat_template
    return out


def save_hf(
    model: Transformer,
    folder: str | Path,
    *,
    tokenizer: Tokenizer | None = None,
    chat_template: str | None = None,
) -> Path:
    """Write `model` as a transformers folder: config.json, model.safetensors and, given a
    tokenizer, tokenizer.json + tokenizer_config.json. Every file is written atomically."""
    folder = Path(folder)
    cfg = model.cfg
    c = config_to_hf(cfg)
    fam = family_of(c)
    ours = {n: t.detach().cpu() for n, t in model.state_dict().items()}
    theirs = _to_theirs(ours, fam.names(cfg))
    dtype = next(iter(theirs.values())).dtype
    c["torch_dtype"] = str(dtype).removeprefix("torch.")
    if tokenizer is not None:
        c |= {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "model.safetensors", save(theirs, metadata={"format": "pt"}))
    atomic_write(folder / "config.json", json.dumps(c, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(folder / "tokenizer.json")
        tok_cfg = _tokenizer_config(tokenizer, cfg, chat_template)
        atomic_write(folder / "tokenizer_config.json", json.dumps(tok_cfg, indent=2) + "\n")
    return folder
