"""LoRA as a module swap: chosen nn.Linear layers become base + a trainable low-rank update.

    y = x W^T + b  +  (alpha / r) * dropout(x) A^T B^T        A: (r, in), B: (out, r)

B starts at zero, so a freshly adapted model computes exactly what its base did; only A and B
train, the base stays frozen. `merge_lora` folds the update into W (W += s B A) for export and
fast decoding, `unmerge_lora` takes it out again, and `adapters_disabled` runs the base model
without touching any weight (DPO's reference under LoRA).

    >>> apply_lora(model, targets=DEFAULT_TARGETS, rank=8, alpha=16)
    >>> [n for n, p in model.named_parameters() if p.requires_grad][:2]
    ['blocks.0.attn.q_proj.lora_A', 'blocks.0.attn.q_proj.lora_B']

Targets are name patterns (fnmatch) over module names; a bare name like `q_proj` matches that
projection in every block. Quantized layers (infer/quant.py) hold no float weight to adapt and
are refused by name.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from pellucid.errors import ConfigError
from pellucid.model.layers import dropout

# The attention and MLP projections of both families (GPT-2's MLP has no gate_proj).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a rank-r update (alpha / r) B A; B zero-initialised."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, p_drop: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.rank, self.alpha, self.p_drop = rank, alpha, p_drop
        self.scale = alpha / rank
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=dtype))
        # Kaiming-uniform A as in the LoRA paper's code; with B = 0 the product is still zero.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False  # True while B A is folded into base.weight
        self.enabled = True  # False inside adapters_disabled()

    def delta(self) -> Tensor:
        """The update to the base weight: (out, in) = scale * B @ A."""
        return self.scale * (self.lora_B @ self.lora_A)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out)."""
        y = self.base(x)
        if self.merged or not self.enabled:
            return y
        h = dropout(x, self.p_drop, self.training) @ self.lora_A.T  # (..., r)
        return y + self.scale * (h @ self.lora_B.T)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, dropout={self.p_drop}, merged={self.merged}"


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    """Every LoRALinear of `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def _matches(name: str, targets: Sequence[str]) -> bool:
    leaf = name.rpartition(".")[2]
    return any(fnmatch.fnmatchcase(name, t) or fnmatch.fnmatchcase(leaf, t) for t in targets)


def apply_lora(
    model: nn.Module,
    targets: Sequence[str] = DEFAULT_TARGETS,
    rank: int = 8,
    alpha: float = 16.0,
    p_drop: float = 0.0,
) -> list[str]:
    """Freeze every parameter of `model`, then wrap each matching nn.Linear in a LoRALinear.

    Returns the names of the wrapped modules. Raises ConfigError when nothing matches, when a
    match is a quantized layer, or when rank/alpha/dropout are out of range.
    """
    if rank < 1 or not alpha > 0 or not 0 <= p_drop < 1:
        raise ConfigError(
            f"LoRA needs rank >= 1, alpha > 0 and 0 <= dropout < 1; got {rank}, {alpha}, {p_drop}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    chosen = [(n, m) for n, m in model.named_modules() if n and _matches(n, targets)]
    for name, module in chosen:
        if isinstance(module, LoRALinear):
            raise ConfigError(f"module '{name}' already has a LoRA adapter")
        if not isinstance(module, nn.Linear):
            kind = type(module).__name__
            why = " (quantized layers are for inference only; load the model in fp32)"
            raise ConfigError(
                f"LoRA target '{name}' is a {kind}, not a float nn.Linear"
                + (why if "Quant" in kind or "Fused" in kind else "")
            )
        if rank > min(module.in_features, module.out_features):  # before A and B are allocated
            raise ConfigError(
                f"LoRA rank {rank} is above the rank of '{name}' "
                f"({module.in_features}x{module.out_features}): lora.rank must be at most "
                f"{min(module.in_features, module.out_features)}"
            )
    if not chosen:
        raise ConfigError(f"LoRA targets {list(targets)} match no module of the model")
    for name, module in chosen:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, LoRALinear(module, rank, alpha, p_drop))
    return [n for n, _ in chosen]


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (W += s B A); forward then skips the adapter."""
    for layer in lora_layers(model):
        if not layer.merged:
            layer.base.weight += layer.delta().to(layer.base.weight.dtype)
            layer.merged = True


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> None:
    """Undo merge_lora (W -= s B A): the base weights come back, up to float rounding."""
    for layer in lora_layers(model):
        if layer.merged:
            layer.base.weight -= layer.delta().to(layer.base.weight.dtype)
            layer.merged = False


def remove_lora(model: nn.Module) -> nn.Module:
    """Merge, then put each plain base nn.Linear back in its wrapper's place (for export and
    quantized decoding: the model's names and modules are the base's again). In place."""
    merge_lora(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, module.base)
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` as its base inside the block (unmerged adapters only; weights untouched)."""
    layers = lora_layers(model)
    if any(layer.merged for layer in layers):
        raise ConfigError("adapters_disabled needs unmerged adapters (call unmerge_lora first)")
    before = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, was in zip(layers, before, strict=True):
            layer.enabled = was


def lora_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors alone ({'blocks.0.attn.q_proj.lora_A': ...}), CPU copies."""
    return {
        n: p.detach().to("cpu", copy=True).contiguous()
        for n, p in model.named_parameters()
        if n.endswith((".lora_A", ".lora_B"))
    }
