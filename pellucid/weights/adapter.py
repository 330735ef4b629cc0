"""Fine-tuned models as "a base plus what training changed": the metadata, building, saving.

Every fine-tuning checkpoint (and the run directory) carries `finetune.json`:

    {"format": "pellucid-finetune/1", "base": "smollm2-135m-instruct", "base_sha256": "…",
     "task": "sft" | "classify" | "reward" | "dpo" | ..., "method": "lora" | "full",
     "lora": {"rank", "alpha", "dropout", "targets"} | null, "labels": [...] | null,
     "train_last": -1, "cut": {"max_len", "keep_head"} (a classify run that cut its texts)}

Its model.safetensors holds only the trainable tensors (checkpoint.py leaves frozen ones out):
LoRA's A and B (and a classifier's head), or every weight after full fine-tuning. A LoRA run
also writes `adapter/` (adapter_config.json, the same metadata, and adapter.safetensors): the
adapter alone, loadable over its base wherever the base is. Loading rebuilds the training-time
module tree from the base (`build`), checks the base's sha256, then loads the tensors over it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from torch import nn

from pellucid.errors import WeightsFormatError
from pellucid.files import atomic_write, read_json, sha256_file
from pellucid.model.heads import Classifier, ScalarHead, train_last_blocks
from pellucid.model.lora import apply_lora, lora_layers
from pellucid.model.transformer import Transformer
from pellucid.weights.checkpoint import frozen_names
from pellucid.weights.safety import load_safetensors

FORMAT = "pellucid-finetune/1"
META_FILE = "finetune.json"  # in run directories and checkpoints
ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
# The fields `build` and the loaders read, with their types (pellucid.files.check_shape).
META_SHAPE = {
    "format": str, "base": str, "base_sha256": str, "task": str, "method": str,
    "labels?": [str], "train_last?": int, "cut?": {"max_len": int, "keep_head": int},
    "lora?": {"targets": [str], "rank": int, "alpha": (int, float), "dropout?": (int, float)},
}  # fmt: skip


def spec_sha256(source: Path) -> str:
    """The identity of a base model: sha256 of its file, or of its folder's files' hashes."""
    source = Path(source)
    if source.is_file():
        return sha256_file(source)
    parts = [f"{p.name}:{sha256_file(p)}" for p in sorted(source.iterdir()) if p.is_file()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def read_meta(path: Path) -> dict[str, Any]:
    """A finetune.json / adapter_config.json, checked for the fields `build` needs."""
    meta = read_json(path, WeightsFormatError, shape=META_SHAPE)
    if meta["format"] != FORMAT:
        raise WeightsFormatError(f"{path}: not a {FORMAT} file")
    if meta["task"] == "classify" and meta.get("labels") is None:
        raise WeightsFormatError(f"{path}: a classify run needs its 'labels' list")
    if meta["method"] == "lora" and meta.get("lora") is None:
        raise WeightsFormatError(f"{path}: a LoRA run needs its 'lora' settings")
    return meta


def build(base: Transformer, meta: dict[str, Any]) -> nn.Module:
    """The module tree a run trained: base, + classifier or reward head, + LoRA, with the same
    parameters frozen as during training (which decides what its checkpoints hold)."""
    model: nn.Module = base
    if meta["task"] == "classify":
        model = Classifier(base, len(meta["labels"]))
        train_last_blocks(model, int(meta.get("train_last", -1)))
    if meta["task"] in ("reward", "ppo"):  # PPO trains its value head on the policy
        model = ScalarHead(base, value_head=meta["task"] == "ppo")
    if meta["method"] == "lora":
        lora = meta["lora"]
        trunk = model.trunk if isinstance(model, (Classifier, ScalarHead)) else model
        apply_lora(trunk, lora["targets"], lora["rank"], lora["alpha"], lora.get("dropout", 0.0))
    return model


def adapter_tensors(model: nn.Module) -> dict[str, Any]:
    """What a LoRA run's adapter file holds: the trainable tensors (A, B, a head), CPU copies."""
    frozen = frozen_names(model)
    return {
        n: p.detach().to("cpu", copy=True).contiguous()
        for n, p in model.named_parameters()
        if n not in frozen
    }


def save_adapter(model: nn.Module, meta: dict[str, Any], out_dir: Path) -> Path:
    """Write `out_dir/adapter/` (adapter_config.json + adapter.safetensors); returns the folder."""
    from safetensors.torch import save

    if not lora_layers(model):
        raise WeightsFormatError("save_adapter: the model has no LoRA layers")
    folder = Path(out_dir) / ADAPTER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / ADAPTER_WEIGHTS, save(adapter_tensors(model)))
    atomic_write(folder / ADAPTER_CONFIG, json.dumps(meta, indent=1) + "\n")
    return folder


def load_adapter(model: nn.Module, path: Path) -> None:
    """Load adapter.safetensors into a model `build` made: every trainable tensor, no others."""
    tensors = load_safetensors(path)
    want = set(adapter_tensors(model))
    missing, unexpected = sorted(want - set(tensors)), sorted(set(tensors) - want)
    if missing or unexpected:
        raise WeightsFormatError(
            f"{path} does not fit its base: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    model.load_state_dict(tensors, strict=False)
