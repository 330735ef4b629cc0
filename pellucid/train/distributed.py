"""Scale-out on PyTorch's own engine: torchrun's environment -> a process group, DDP or FSDP2
applied to the model from outside, and the few collectives the one training loop needs.

    torchrun --nproc_per_node N -m pellucid train ...   sets RANK, WORLD_SIZE, LOCAL_RANK
    init_distributed()          -> World(rank, size, local_rank); gloo on the CPU, NCCL on GPUs
    parallelize(model, cfg, mesh) -> the module to call: the model itself, DDP(model), or the
                                   model after `fully_shard` of every block and then of the root

The model files never see any of this (tests/test_distributed.py scans them). Every rank holds
the same config; `train.batch_size` rows of each micro-batch are the GLOBAL batch, split into
`world.size` contiguous slices, rank r taking slice r, so the data, the learning-rate schedule and
(up to the reduction order of the sums) the weights are those of one process.

Checkpoints stay the single-process format (safetensors + JSON, see weights/checkpoint.py):
`gather_state` collects the full weights and optimizer state on rank 0, which alone writes them,
and `apply_state` spreads a full state back over any world size. No `torch.distributed.checkpoint`
files, whose `.metadata` is a pickle (docs/scaling.md says why and what it costs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pellucid.errors import ConfigError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from pellucid.train.trainer import TrainConfig

log = logging.getLogger("pellucid")


@dataclasses.dataclass(frozen=True)
class World:
    """Where this process stands in the job (one plain process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # the rank within this machine: picks the GPU

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, shows progress and writes files."""
        return self.rank == 0


def env_world() -> World:
    """The World that torchrun's environment variables describe (none set: one process)."""
    try:
        rank, size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", 0))
    except ValueError as e:
        raise ConfigError(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {e}") from None
    return World(rank, size, local)


def init_distributed(device: torch.device, timeout_s: float = 300.0) -> World:
    """Join the job's process group once (a no-op in one process, or when already joined).

    gloo on the CPU, NCCL on CUDA (after pinning this process to GPU `local_rank`). `timeout_s`
    bounds every collective: a rank that dies or hangs makes the others fail within it instead
    of waiting forever (torchrun's agent usually stops them sooner, on seeing the exit).
    """
    world = env_world()
    if world.size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(world.local_rank)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        log.info("rank %d of %d joined the %s process group", world.rank, world.size, backend)
    if world.size > 1 and not world.is_main:
        log.setLevel(max(log.getEffectiveLevel(), logging.WARNING))  # rank 0 alone tells the story
    return world


def local_device(device: torch.device, world: World) -> torch.device:
    """A CUDA device becomes this rank's own GPU; CPU and MPS stay as they are."""
    return torch.device("cuda", world.local_rank) if device.type == "cuda" else device


def finish_distributed() -> None:
    """Leave the process group (at the end of a run; safe to call in one process)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def rank_zero_first() -> Iterator[None]:
    """Rank 0 runs the block first (tokenizer training, shard building: cached results), then the
    others run it and find the cache filled instead of racing to build it too."""
    main = not dist.is_initialized() or dist.get_rank() == 0
    if not main:
        dist.barrier()
    yield
    if main and dist.is_initialized():
        dist.barrier()


def resolve_parallel(how: str, world: World) -> str:
    """`train.parallel` -> "none", "ddp" or "fsdp" for this world.

    auto: none in one process, ddp under torchrun with more than one rank. In one process, ddp
    and fsdp fall back to none, so a run started on 8 GPUs resumes on a laptop unchanged.
    """
    if world.size == 1:
        if how in ("ddp", "fsdp"):
            log.info("train.parallel=%s in a single process: training without a wrapper", how)
        return "none"
    if how == "none":
        raise ConfigError(
            f"train.parallel=none with {world.size} ranks would train {world.size} unsynchronised "
            "copies; use auto, ddp or fsdp"
        )
    return "ddp" if how == "auto" else how


def device_mesh(device: torch.device, world: World) -> DeviceMesh | None:
    """A 1-D mesh over every rank (None in one process): FSDP2 shards over it."""
    if world.size == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world.size,))


def parallelize(model: nn.Module, cfg: TrainConfig, mesh: DeviceMesh | None) -> nn.Module:
    """Apply data parallelism to `model` from outside; returns the module to call in training.

    ddp: DistributedDataParallel (every rank a full copy, gradients all-reduced in buckets).
    fsdp: FSDP2 `fully_shard` on each transformer block, then on the root (embeddings, final norm,
    head): parameters, gradients and AdamW moments are sharded over the mesh, each block's weights
    gathered just before its forward and backward. On CUDA with bf16 the mixed-precision policy
    computes in bf16 and reduces gradients in fp32.
    """
    world = World(size=mesh.size() if mesh is not None else 1)
    how = resolve_parallel(cfg.parallel, world)
    if how == "none":
        return model
    if how == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if mesh.device_type == "cuda" and cfg.dtype in ("auto", "bfloat16"):
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    blocks = getattr(model, "blocks", [])
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper or a compiled module (FSDP2 wraps nothing: itself)."""
    while True:
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner


def gradient_sync(wrapped: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce / reduce-scatter on all but a step's last micro-batch."""
    if hasattr(wrapped, "no_sync"):  # DDP
        return contextlib.nullcontext() if sync else wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def is_comm_error(e: BaseException) -> bool:
    """Whether a collective failed because a peer is gone or the timeout passed. gloo raises a
    plain RuntimeError ("Connection reset by peer"), NCCL and the timeout a DistError."""
    text = str(e).lower()
    markers = ("gloo", "nccl", "connection", "timed out", "timeout", "peer")
    return isinstance(e, dist.DistError) or any(m in text for m in markers)


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum each number over all ranks (one collective; identity in one process)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_max(value: float, device: torch.device) -> float:
    """The largest of each rank's `value` (identity in one process)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def all_sum_tensor(t: Tensor) -> Tensor:
    """Sum a tensor over all ranks, in place on a copy (identity in one process)."""
    if not dist.is_initialized():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def full_tensor(t: Tensor) -> Tensor:
    """A DTensor (an FSDP2 gradient norm) as the plain tensor it stands for."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def rank_slice(batch: Any, world: World) -> Any:
    """Rank r's contiguous 1/size of every (B, ...) tensor field of a Batch: rows r*b .. r*b+b-1."""
    if world.size == 1:
        return batch
    changes = {}
    for f in dataclasses.fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, Tensor) and v.dim() > 0:
            b = v.shape[0] // world.size
            changes[f.name] = v[world.rank * b : (world.rank + 1) * b]
    return dataclasses.replace(batch, **changes)


class _Sliced:
    """Wraps a batch iterator that yields global batches: yields this rank's slice of each.

    Other attributes (`state`, `load_state`) are the wrapped iterator's own."""

    def __init__(self, batches: Iterator[Any], world: World) -> None:
        self._batches, self._world = batches, world

    def __iter__(self) -> _Sliced:
        return self

    def __next__(self) -> Any:
        return rank_slice(next(self._batches), self._world)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._batches, name)


def local_batches(batches: Iterator[Any], world: World) -> Iterator[Any]:
    """This rank's part of every global batch: a sampler with `shard(rank, size)` reads only its
    rows (the window sampler); any other iterator is sliced after the fact (`rank_slice`)."""
    if world.size == 1:
        return batches
    if hasattr(batches, "shard"):
        batches.shard(world.rank, world.size)
        return batches
    return _Sliced(batches, world)


def check_divides(batch_size: int, world: World) -> None:
    """The global batch must split into equal slices, one per rank."""
    if batch_size % world.size:
        raise ConfigError(
            f"train.batch_size={batch_size} does not split over {world.size} ranks (it is the "
            f"global batch): make it a multiple of {world.size}"
        )


# --- checkpoints: the full state on rank 0, and back ----------------------------------------------


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The optimizer's parameters in state-dict index order, as their names in the model."""
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def gather_state(
    wrapped: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Full CPU state dicts of model and optimizer on rank 0 (empty elsewhere); a collective.

    The optimizer's comes back keyed by index, as `optimizer.state_dict()` is in one process,
    so a checkpoint does not depend on the world size that wrote it.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(wrapped, options=full)
    osd = get_optimizer_state_dict(wrapped, optimizer, options=full)
    if not weights:  # not rank 0
        return {}, {}
    index = {n: i for i, n in enumerate(_param_names(wrapped, optimizer))}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]
    return weights, {
        "state": {index[n]: s for n, s in osd["state"].items()},
        "param_groups": groups,
    }


def apply_state(
    wrapped: nn.Module,
    optimizer: torch.optim.Optimizer,
    weights: dict[str, Tensor],
    optim_sd: dict[str, Any],
) -> None:
    """Load full (unsharded) state dicts into a DDP or FSDP2 model and its optimizer; each rank
    keeps its own shard. `optim_sd` is index-keyed, as `gather_state` returns it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(wrapped, weights, options=full)
    names = _param_names(wrapped, optimizer)
    osd = {
        "state": {names[i]: s for i, s in optim_sd["state"].items()},
        "param_groups": [
            {**g, "params": [names[i] for i in g["params"]]} for g in optim_sd["param_groups"]
        ],
    }
    set_optimizer_state_dict(wrapped, optimizer, osd, options=full)
