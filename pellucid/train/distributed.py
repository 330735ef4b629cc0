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

Checkpoints (`save_checkpoint_ranks`, `load_checkpoint_ranks`): under DDP rank 0 writes the
one-process layout; under FSDP2 every rank writes its own shards as safetensors beside a JSON
index (weights/sharded.py), so no rank ever holds the full state. Either loads into any world
size, one plain process included. Not `torch.distributed.checkpoint`, whose `.metadata` is a
pickle (docs/scaling.md says why).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from pellucid.errors import CheckpointError, CheckpointWriteError, ConfigError, WeightsFormatError
from pellucid.weights import sharded
from pellucid.weights.checkpoint import (
    begin_checkpoint,
    checkpoint_path,
    commit_checkpoint,
    frozen_names,
    model_tensors,
    optimizer_tensors,
    read_state,
    restore_optimizer,
    save_checkpoint,
    staging_path,
)
from pellucid.weights.safety import check_finite

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
    """Leave the process group at the end of a run (safe to call in one process). Every rank
    calls it: the barrier makes sure no rank closes its connections while a peer is still
    inside the last collective."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def end_process(code: int) -> NoReturn:
    """End a torchrun worker with exit status `code`, skipping the interpreter's teardown.

    `destroy_process_group` does not stop gloo's threads (two `pt_gloo_runloop`, one
    `gloo_tcp_loop`) while torch objects such as a device mesh or an FSDP2 state still hold
    the group, and ours do until the process ends. A normal exit then finalizes Python and runs
    C++ static destructors with those threads still running, a race that a loaded machine
    loses now and then: the rank dies of SIGABRT, "terminate called without an active
    exception", after a run that succeeded. Everything a run keeps is on disk already (written
    atomically and fsynced), so after flushing the logs and streams, `os._exit` ends the
    process with its threads, no destructor involved.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


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


# --- checkpoints: DDP's rank 0 writes the one-process layout, FSDP2's ranks their own pieces -------


def save_checkpoint_ranks(
    world: World,
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    files: dict[str, bytes | str] | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` of `run_dir`; every rank calls this (a collective).

    DDP: rank 0 holds the whole state and writes the one-process layout. FSDP2: no full tensor
    is gathered anywhere. Each rank writes its pieces into the shared temporary folder
    (`weights/sharded.py`), holding its shard of the state twice at most (as tensors, and
    serialized); one all-gather of a little JSON tells rank 0 every rank's boxes and checksum;
    rank 0 then writes the index, state.json and, LAST, the manifest, and renames the folder into
    place. A rank that fails makes every rank raise the same CheckpointWriteError.
    """
    model = unwrap(model)
    device = next(model.parameters()).device
    if not any(isinstance(p, DTensor) for p in model.parameters()):
        outcome: dict[str, Any] = {"error": None}
        if world.is_main:
            args = (run_dir, step, model, optimizer, state, files, keep)
            outcome["error"] = _error_of(lambda: save_checkpoint(*args))
        _raise_first(all_gather_json(outcome, device))  # nobody runs ahead of a failed save
        return checkpoint_path(run_dir, step)
    pieces, boxes, meta, aliases, rest = _local_pieces(model, optimizer, world.rank)
    mine: dict[str, Any] = {"boxes": boxes, "error": None}
    if world.is_main:  # a failure here must reach the others too, not leave them at the barrier
        mine["error"] = _error_of(lambda: begin_checkpoint(run_dir, step, "ranks"))
    barrier()  # the empty folder exists before anyone writes into it
    tmp = staging_path(run_dir, step, "ranks")
    if mine["error"] is None:
        mine["error"] = _error_of(lambda: _write_pieces(tmp, step, world, pieces, mine))
    records = all_gather_json(mine, device)
    _raise_first(records)
    outcome = {"error": None}
    if world.is_main:
        index = sharded.index_json(world.size, meta, [r["boxes"] for r in records], aliases)
        payload = {
            sharded.INDEX: index,
            "state.json": json.dumps({**state, "step": step, "optimizer": rest}),
            **(files or {}),
        }
        written = {sharded.shard_file(r, world.size): rec["file"] for r, rec in enumerate(records)}
        outcome["error"] = _error_of(lambda: commit_checkpoint(tmp, step, payload, written, keep))
    _raise_first(all_gather_json(outcome, device))  # rank 0's commit, told to every rank
    return checkpoint_path(run_dir, step)


def _write_pieces(
    tmp: Path, step: int, world: World, pieces: dict[str, Tensor], mine: dict[str, Any]
) -> None:
    """Write this rank's shard file into `tmp`; its checksum goes to `mine["file"]`."""
    try:
        check_finite(pieces, f"rank {world.rank}")
        mine["file"] = sharded.write_shard(tmp, world.rank, world.size, pieces)
    except (WeightsFormatError, OSError) as e:
        raise CheckpointWriteError(
            f"cannot write checkpoint step_{step:06d} on rank {world.rank}: {e}; the previous "
            "one is intact"
        ) from None


def _error_of(write: Callable[[], Any]) -> str | None:
    """Run `write`; its CheckpointWriteError's message, or None when it succeeded."""
    try:
        write()
    except CheckpointWriteError as e:
        return str(e)
    return None


def _raise_first(records: list[dict[str, Any]]) -> None:
    """Every rank raises the first rank's error, so that all stop at the same save."""
    errors = [r["error"] for r in records if r["error"]]
    if errors:
        raise CheckpointWriteError(errors[0])


def _local_pieces(
    model: nn.Module, optimizer: torch.optim.Optimizer, rank: int
) -> tuple[dict[str, Tensor], dict[str, list], dict[str, tuple[list[int], str]], dict, dict]:
    """What this rank writes of the model and optimizer state.

    Returns (pieces {index name: local tensor}, their boxes {name: [offset, shape]}, every
    tensor's (global shape, dtype), the tied aliases, the optimizer's JSON rest). Names and
    flattening are those of the one-process files (weights/checkpoint.py), prefixed `model.` and
    `optim.`; a DTensor contributes its local shard, never its full tensor.
    """
    sd, osd = model.state_dict(), optimizer.state_dict()
    weights, aliases = model_tensors(model, {n: _local(t) for n, t in sd.items()})
    local_state = {i: {k: _local(v) for k, v in s.items()} for i, s in osd["state"].items()}
    optim, rest = optimizer_tensors(None, {**osd, "state": local_state})
    whole = {f"model.{n}": sd[n] for n in weights}
    whole |= {f"optim.{n}": osd["state"][int(n.split(".")[1])][n.split(".")[2]] for n in optim}
    local = {f"model.{n}": t for n, t in weights.items()} | {
        f"optim.{n}": t for n, t in optim.items()
    }
    boxes = {n: b for n, t in whole.items() if (b := _box(t, rank)) is not None}
    meta = {n: (list(t.shape), sharded.dtype_name(t)) for n, t in whole.items()}
    return {n: local[n] for n in boxes}, boxes, meta, aliases, rest


def _local(t: Any) -> Any:
    return t.to_local() if isinstance(t, DTensor) else t


def _box(t: Tensor, rank: int) -> list[list[int]] | None:
    """[offset, shape] of this rank's piece of `t` within the full tensor, or None when it writes
    none: a plain tensor is written by rank 0 alone, a replicated DTensor by its first holder."""
    if not isinstance(t, DTensor):
        return [[0] * t.dim(), list(t.shape)] if rank == 0 else None
    mesh = t.device_mesh
    if any(p.is_replicate() and mesh.get_local_rank(d) for d, p in enumerate(t.placements)):
        return None
    shape, offset = _local_box(t)
    return [list(offset), list(shape)]


def _local_box(t: DTensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(shape, offset) of this rank's shard of `t`, as torch computes it for DCP."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    return compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)


def all_gather_json(value: Any, device: torch.device) -> list[Any]:
    """Every rank's JSON-able `value`, in rank order: `all_gather_object` without its pickle."""
    data = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)
    padded = torch.zeros(int(all_max(len(data), device)), dtype=torch.uint8, device=device)
    padded[: len(data)] = data.to(device)
    out = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    dist.all_gather(out, padded)
    return [json.loads(t.cpu().numpy().tobytes().rstrip(b"\0")) for t in out]


def load_checkpoint_ranks(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, shape: dict[str, Any]
) -> dict[str, Any]:
    """Load checkpoint `path`, of either layout and any world size, into this rank's model and
    optimizer; returns its state.json, checked against `shape`. Each rank reads only the values
    it holds: its shard's box under FSDP2 (the overlapping slices of the files), whole tensors
    under DDP."""
    model = unwrap(model)
    saved = read_state(path, shape)
    reader = sharded.ShardReader(path)
    skip = frozen_names(model)
    weights = {
        n: _read_like(reader, "model." + reader.aliases.get(n, n), t)
        for n, t in model.state_dict().items()
        if n not in skip
    }
    model.load_state_dict(weights, strict=not skip)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    optim = {}
    for name in reader.names("optim"):
        i = int(name.split(".")[2])
        if i >= len(params):
            raise CheckpointError(f"{path}: {name} has no parameter in this optimizer")
        same = reader.layout(name).shape == tuple(params[i].shape)  # a moment, not a step count
        optim[name[6:]] = _read_like(reader, name, params[i]) if same else reader.read(name)
    restore_optimizer(optimizer, optim, saved["optimizer"])
    return saved


def _read_like(reader: sharded.ShardReader, name: str, like: Tensor) -> Tensor:
    """Tensor `name` of the checkpoint, placed as `like`: a DTensor of only this rank's box, or
    the whole tensor."""
    if reader.layout(name).shape != tuple(like.shape):
        raise CheckpointError(
            f"{reader.folder}: {name} is {list(reader.layout(name).shape)}, the model's "
            f"{list(like.shape)}"
        )
    if not isinstance(like, DTensor):
        return reader.read(name)
    shape, offset = _local_box(like)
    local = reader.read(name, offset, shape).to(like.device)
    return DTensor.from_local(
        local, like.device_mesh, like.placements, run_check=False, shape=like.shape,
        stride=like.stride(),
    )  # fmt: skip
