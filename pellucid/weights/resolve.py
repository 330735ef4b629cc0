"""Model specs -> (model, tokenizer): the one place that turns "what the user named" into a model.

A spec is, for now, one of
    a run directory          (its newest good checkpoint: runs/demo-.../)
    a checkpoint folder      (runs/demo-.../checkpoints/step_000500/)
Both carry `config.json` (the run config, whose `model` section is a ModelConfig) and
`tokenizer.json` beside `model.safetensors`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pellucid.config import from_dict
from pellucid.errors import CheckpointError
from pellucid.model.config import ModelConfig
from pellucid.model.transformer import Transformer
from pellucid.tokenizer.bpe import Tokenizer
from pellucid.weights.checkpoint import MANIFEST, latest_good, read_json, verify
from pellucid.weights.safety import load_safetensors


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
        raise CheckpointError(f"{spec} holds no complete checkpoint (checkpoints/step_*/)")
    return found


def model_config(folder: Path) -> ModelConfig:
    """The ModelConfig recorded in a checkpoint's config.json (its `model` section)."""
    data = read_json(Path(folder) / "config.json")
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise CheckpointError(f"{folder}/config.json has no 'model' section")
    return from_dict(ModelConfig, data["model"], "model.")


def load_model(
    spec: str | Path, device: str | torch.device | None = None
) -> tuple[Transformer, Tokenizer | None]:
    """Build the model a spec names, weights loaded, in eval mode; and its tokenizer if it has one."""
    folder = checkpoint_folder(spec)
    cfg = model_config(folder)
    tensors = load_safetensors(folder / "model.safetensors")
    # A tied head is stored once (under tok_emb.weight); from_weights re-ties it.
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    model = Transformer.from_weights(cfg, tensors, device=device).eval()
    tok_file = folder / "tokenizer.json"
    tokenizer = Tokenizer.load(tok_file) if tok_file.is_file() else None
    return model, tokenizer
