"""The one training loop. Pretraining, SFT, reward modelling and DPO all run through `train`.

Each optimizer step:

    micro-batches  --objective-->  loss_sum / n_targets(step)  --backward-->  grads (accumulated)
    grad norm (clip)  -->  finite?  --yes-->  AdamW step        --no-->  skip, weights unchanged

The loss of every micro-batch is divided by the number of targets of the WHOLE step (summed over
its micro-batches) before backward, so accumulation over k micro-batches equals one big batch and
masked targets weigh the same wherever they fall (torchtitan's global valid-token rule).

A step whose loss or gradient norm is not finite is skipped before `optimizer.step()` and logged
as NaN/Inf; after `max_nonfinite` such steps in a row the run stops with TrainingError naming the
step, and the last checkpoint stays the last good one. Resuming restores weights, optimizer
moments, RNG states and the sampler position, so on CPU fp32 the resumed loss curve equals an
uninterrupted run's bit for bit.

Under torchrun (train/distributed.py) the same loop runs on every rank: the global batch of each
micro-batch is split across the ranks, `n_targets` of the step is summed over all of them before
any backward, and each rank scales its loss by world_size / n_targets, so that the gradient
average DDP and FSDP take equals the single-process gradient (the same rule, one all-reduce more).
Rank 0 alone writes metrics; checkpoints are rank 0's under DDP, every rank's shards under FSDP2,
and either resumes at any world size.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from pellucid.errors import CheckpointError, ConfigError, TrainingError
from pellucid.model.transformer import eval_mode
from pellucid.train import distributed as dist
from pellucid.train.distributed import World
from pellucid.train.metrics import MetricsLog, ProgressBar, measure_peak_flops
from pellucid.train.objectives import Objective
from pellucid.train.optim import build_optimizer, lr_at, set_lr
from pellucid.train.precision import autocast, resolve_precision
from pellucid.weights.checkpoint import (
    RESUME_SHAPE,
    latest_good,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_aside_after,
    set_rng_state,
)

log = logging.getLogger("pellucid")


@dataclass(kw_only=True)
class TrainConfig:
    """How to train: schedule, batch, precision, evaluation, checkpoints (the `train.*` keys)."""

    max_steps: int = 1000  # optimizer steps; the cosine schedule ends at the last one
    # > 0: a time budget in minutes of training steps (evaluation and saving not counted). The run
    # stops, and the cosine ends, when it is spent; max_steps then only caps the step count.
    max_minutes: float = 0.0
    batch_size: int = 16  # sequences per micro-batch, in all (split across ranks under torchrun)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate, reached at the end of warmup
    min_lr: float = 1e-4  # where the cosine decay ends
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices and embeddings only (see optim.py)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = (
        1.0  # max global gradient norm; 0 disables clipping (the norm is still logged)
    )
    eval_every: int = 250  # steps between evaluations; 0: only at the end
    eval_every_minutes: float = 0.0  # > 0: also evaluate after each such span of training time
    eval_batches: int = 20  # batches per evaluation; 0: the whole validation split
    checkpoint_every: int = 500  # steps between checkpoints; 0: only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    seed: int = 1337
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    # auto: bf16 on CUDA; on a CPU bf16 where its matmuls measure >= 2x fp32 (train/precision.py)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    compile: bool = False  # torch.compile the model (first steps are slow while it compiles)
    max_nonfinite: int = 3  # consecutive non-finite steps before the run stops
    log_every: int = 50  # steps between log lines when there is no progress bar
    progress: bool = True  # show a progress bar when stderr is a terminal
    # Data parallelism under torchrun: auto = none in one process, ddp with more ranks; fsdp
    # shards weights, gradients and AdamW moments (train/distributed.py). One process: always none.
    parallel: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    dist_timeout_s: float = 300.0  # how long a collective waits for a missing rank, then fails

    def __post_init__(self) -> None:
        positive = ("max_steps", "batch_size", "grad_accum", "keep_checkpoints", "max_nonfinite")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"config key 'train.{name}' must be >= 1, got {getattr(self, name)}"
                )
        nonneg = ("warmup_steps", "eval_every", "checkpoint_every", "eval_batches", "max_minutes")
        if not self.dist_timeout_s > 0:
            raise ConfigError(
                f"config key 'train.dist_timeout_s' must be > 0, got {self.dist_timeout_s}"
            )
        for name in (*nonneg, "eval_every_minutes"):
            if not getattr(self, name) >= 0:  # NaN fails too
                raise ConfigError(
                    f"config key 'train.{name}' must be >= 0, got {getattr(self, name)}"
                )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"config key 'train.lr' must be a finite number > 0, got {self.lr}")
        if not (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)):
            raise ConfigError(
                f"config key 'train.betas' must be two numbers in [0, 1), got {list(self.betas)}"
            )
        for name in ("eps", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and (value > 0 if name == "eps" else value >= 0)):
                rule = "> 0" if name == "eps" else ">= 0"
                raise ConfigError(
                    f"config key 'train.{name}' must be finite and {rule}, got {value}"
                )
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(
                f"config key 'train.min_lr' must be in [0, lr={self.lr}], got {self.min_lr}"
            )

    @property
    def budget_s(self) -> float:
        """The training-time budget in seconds (0: none, the run is counted in steps)."""
        return 60.0 * self.max_minutes

    def budget_fraction(self, state: TrainState) -> float | None:
        """Fraction of the time budget spent (None for a run counted in steps)."""
        return state.train_time_s / self.budget_s if self.budget_s else None

    def finished(self, state: TrainState) -> bool:
        """Whether the run is over: max_steps taken, or the time budget spent."""
        spent = self.budget_s > 0 and state.train_time_s >= self.budget_s
        return state.step >= self.max_steps or spent


@dataclass
class TrainState:
    """Where a run stands; saved in every checkpoint's state.json and restored on resume."""

    step: int = 0  # optimizer steps taken, skipped non-finite ones included
    tokens: int = 0  # input tokens processed
    flops: float = 0.0  # model FLOPs spent on training steps
    train_time_s: float = 0.0  # wall time inside training steps (evaluation and saving excluded)
    nonfinite_streak: int = 0
    last_loss: float = math.nan
    last_eval: dict[str, float] = field(default_factory=dict)
    checkpoint: str | None = None  # the newest checkpoint this run wrote or resumed from
    resumed_from: str | None = None
    precision: str = ""  # the dtype this session computes in, and why (train/precision.py)
    peak_flops: float = 0.0  # the measured matmul peak of that dtype, all ranks: MFU's denominator


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices). Call once, before building the model."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda, else mps, else cpu; an unavailable explicit device is a ConfigError."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise ConfigError(f"config key 'train.device' is {name!r} but no such device is available")
    return torch.device(name)


def evaluate_objective(
    model: nn.Module, objective: Objective, batches: Iterable[Any]
) -> tuple[float, int]:
    """Mean loss per target of `objective` over `batches` (no grad): returns (mean, n_targets)."""
    device = next(model.parameters()).device
    total, n = torch.zeros((), device=device), 0
    with torch.no_grad():
        for batch in batches:
            out = objective(model, batch.to(device))
            total += out.loss_sum.detach().float()
            n += out.n_targets
    return (total.item() / n if n else math.nan), n


def _flops_per_token(model: nn.Module, context: int) -> float:
    fn = getattr(model, "flops_per_token", None)
    if fn is not None:
        return float(fn(context))
    return 6.0 * sum(p.numel() for p in model.parameters())  # the 6N rule without attention


def _micro_step(
    model: nn.Module,
    objective: Objective,
    micro: list[Any],
    device: torch.device,
    amp_dtype: torch.dtype,
    world: World | None = None,
) -> tuple[torch.Tensor, int, dict[str, float]]:
    """Forward + backward of one optimizer step's micro-batches; returns (mean loss, targets, metrics).

    `micro` holds this rank's slices; the target count (and the logged loss) are the global ones.
    """
    world = world or World()
    n_step = sum(b.n_targets for b in micro)  # the valid-token count of this step, this rank
    if world.size > 1:
        n_step = int(dist.all_sum([n_step], device)[0])  # ... of the whole step, every rank
    if n_step == 0:
        raise TrainingError("a training step has no targets (every target is -100)")
    loss_sum = torch.zeros((), device=device)
    metrics: dict[str, float] = {}
    for i, batch in enumerate(micro):
        # DDP/FSDP average the ranks' gradients; world.size undoes that average into the sum.
        with dist.gradient_sync(model, i == len(micro) - 1):
            with autocast(device, amp_dtype):
                out = objective(model, batch.to(device))
            loss = (
                out.loss_sum / n_step if world.size == 1 else out.loss_sum * (world.size / n_step)
            )
            loss.backward()
        loss_sum += out.loss_sum.detach().float()
        for k, v in out.metrics.items():
            metrics[k] = metrics.get(k, 0.0) + v / len(micro)
    return dist.all_sum_tensor(loss_sum) / n_step, n_step, metrics


def _clip(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global L2 norm of the gradients, () tensor; scales them down to `max_norm` when above it."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)  # a DTensor under FSDP: the norm over all shards
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return dist.full_tensor(norm)


def train(
    model: nn.Module,
    objective: Objective,
    batches: Iterator[Any],
    cfg: TrainConfig,
    run_dir: Path,
    *,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    resume: bool = False,
    files: dict[str, bytes | str] | None = None,
    on_metrics: Callable[[dict[str, Any]], None] | None = None,
) -> TrainState:
    """Train `model` on `batches` with `objective` until `cfg.max_steps`; returns the final state.

    batches: an iterator of Batch objects (inputs/targets (B, T) int64, `n_targets`, `to`); if it
        has `state()` / `load_state(dict)` (the window sampler), its position is checkpointed.
    evaluate: called every `cfg.eval_every` steps and at the end, in eval mode without grad,
        returning e.g. {"val_loss": ..., "val_bpb": ...}; the numbers go into the metrics log.
    resume: continue from the newest good checkpoint of `run_dir` (CheckpointError if none).
    files: extra files stored in every checkpoint (config.json, tokenizer.json).
    on_metrics: called with every metrics record (training steps and evaluations), on rank 0.
    Writes `run_dir/metrics.jsonl` and `run_dir/checkpoints/step_*/`. Under torchrun every rank
    calls `train` alike (same config, same `batches`; each takes its part of every batch).
    """
    run_dir = Path(run_dir)
    device = resolve_device(cfg.device)
    world = dist.init_distributed(device, cfg.dist_timeout_s)
    device = dist.local_device(device, world)
    dist.check_divides(cfg.batch_size, world)
    with dist.rank_zero_first():  # rank 0 probes the machine, the others read its probe file
        precision = resolve_precision(cfg.dtype, device)
    amp_dtype = precision.dtype
    model.to(device)
    model.train()
    wrapped = dist.parallelize(model, cfg, dist.device_mesh(device, world))
    optimizer = build_optimizer(model, cfg)  # after fully_shard: over this rank's shards
    params = [p for p in model.parameters() if p.requires_grad]
    batches = dist.local_batches(batches, world)
    metrics = MetricsLog(run_dir)
    state = _start(run_dir, wrapped, optimizer, batches, metrics, cfg, resume, world)
    forward = torch.compile(wrapped) if cfg.compile else wrapped
    peak = measure_peak_flops(str(device), amp_dtype) * world.size
    state.precision, state.peak_flops = precision.reason, peak
    if world.is_main:
        log.info("precision: %s; MFU against %.3g GFLOP/s", precision.reason, peak / 1e9)
    show = cfg.progress and world.is_main
    bar = ProgressBar(cfg.budget_s or cfg.max_steps, show, _bar_position(cfg, state))

    def emit(record: dict[str, Any]) -> None:
        if not world.is_main:
            return
        metrics.write(record)
        if on_metrics is not None:
            on_metrics(record)

    def save() -> None:
        extra = {
            "train_state": dataclasses.asdict(state),
            "rng": rng_state(),
            "sampler": batches.state() if hasattr(batches, "state") else None,
        }
        args = (run_dir, state.step, model, optimizer, extra, files, cfg.keep_checkpoints)
        if world.size == 1:
            state.checkpoint = str(save_checkpoint(*args))
        else:  # every rank takes part; FSDP2's each write their own shards
            state.checkpoint = str(dist.save_checkpoint_ranks(world, *args))

    try:
        with bar.running():
            while not cfg.finished(state):
                before_s = state.train_time_s
                step_args = (optimizer, params, cfg, state, device, amp_dtype, peak, world)
                record = _one_step(forward, objective, batches, *step_args)
                emit(record)
                last = cfg.finished(state)
                bar.update(_bar_position(cfg, state), _progress_text(record))
                if not bar.enabled and (_due(state.step, cfg.log_every) or last):
                    log.info("%s", _progress_text(record))
                if state.nonfinite_streak >= cfg.max_nonfinite:
                    raise TrainingError(
                        f"stopped at step {state.step}: loss or gradients not finite for "
                        f"{state.nonfinite_streak} steps in a row; last good checkpoint: "
                        f"{state.checkpoint or 'none'}"
                    )
                if evaluate is not None and (last or _eval_due(cfg, state, before_s)):
                    emit(_evaluate(model, forward, evaluate, state, device, amp_dtype))
                # Not while a non-finite streak runs: resuming there would walk into it again.
                if (last or _due(state.step, cfg.checkpoint_every)) and not state.nonfinite_streak:
                    save()
    except RuntimeError as e:  # a rank died or hung: say so in one line, not a gloo traceback
        if not (world.size > 1 and dist.is_comm_error(e)):
            raise
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise TrainingError(
            f"rank {world.rank}: lost contact with the other ranks during step {state.step + 1} "
            f"({why}); the job stops; last complete checkpoint: {state.checkpoint or 'none'}"
        ) from None
    finally:
        metrics.close()
    return state


def _bar_position(cfg: TrainConfig, state: TrainState) -> float:
    """Where the progress bar stands: seconds of the time budget, or steps."""
    return min(state.train_time_s, cfg.budget_s) if cfg.budget_s else state.step


def _eval_due(cfg: TrainConfig, state: TrainState, before_s: float) -> bool:
    """Every `eval_every` steps, and each time the training clock passes `eval_every_minutes`."""
    every_s = 60.0 * cfg.eval_every_minutes
    crossed = every_s > 0 and state.train_time_s // every_s > before_s // every_s
    return _due(state.step, cfg.eval_every) or crossed


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _start(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Any],
    metrics: MetricsLog,
    cfg: TrainConfig,
    resume: bool,
    world: World,
) -> TrainState:
    """A fresh state (seeded from cfg.seed), or the state of the newest good checkpoint.

    `model` is the wrapped one; a checkpoint of any world size loads into any other.
    """
    if not resume:
        # Dropout draws from the global generator: start it from the config's seed whatever
        # ran before (model init, tokenizer training), so a run is reproducible from its config.
        seed_everything(cfg.seed)
        return TrainState()
    path = latest_good(run_dir)
    if path is None:
        raise CheckpointError(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}")
    if world.size == 1:
        saved = load_checkpoint(path, model, optimizer, RESUME_SHAPE)
    else:  # every rank reads only its part
        saved = dist.load_checkpoint_ranks(path, model, optimizer, RESUME_SHAPE)
    state = TrainState(**saved["train_state"])
    set_rng_state(saved["rng"])
    if saved.get("sampler") is not None and hasattr(batches, "load_state"):
        batches.load_state(saved["sampler"])
    dist.barrier()  # every rank has chosen `path` before rank 0 renames the newer ones
    if world.is_main:
        set_aside_after(run_dir, state.step)
        metrics.truncate_after(state.step)  # the resumed run rewrites what came after
    state.resumed_from = state.checkpoint = str(path)
    log.info("resuming from %s (step %d)", path, state.step)
    return state


def _one_step(
    model: nn.Module,
    objective: Objective,
    batches: Iterator[Any],
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    cfg: TrainConfig,
    state: TrainState,
    device: torch.device,
    amp_dtype: torch.dtype,
    peak: float,
    world: World,
) -> dict[str, Any]:
    """One optimizer step (skipped when non-finite); updates `state`, returns its metrics record.

    Every rank reaches the same loss and norm (both global), so all skip a step or none does.
    """
    t0 = time.perf_counter()
    lr = lr_at(state.step, cfg, cfg.budget_fraction(state))
    set_lr(optimizer, lr)
    micro = [next(batches) for _ in range(cfg.grad_accum)]
    loss_t, _, extra = _micro_step(model, objective, micro, device, amp_dtype, world)
    norm_t = _clip(params, cfg.grad_clip)
    loss, norm = loss_t.item(), norm_t.item()  # the one host sync of the step
    finite = math.isfinite(loss) and math.isfinite(norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    if world.size > 1:  # one clock for all: a time budget must end every rank at the same step
        dt = dist.all_max(dt, device)
    tokens = sum(b.inputs.numel() for b in micro) * world.size
    flops = _flops_per_token(dist.unwrap(model), micro[0].inputs.shape[-1]) * tokens
    state.step += 1
    state.tokens += tokens
    state.flops += flops
    state.train_time_s += dt
    state.nonfinite_streak = 0 if finite else state.nonfinite_streak + 1
    state.last_loss = loss
    record = {
        "step": state.step,
        "loss": loss,
        "lr": lr,
        "grad_norm": norm,
        "tokens_per_s": tokens / dt,
        "mfu": flops / dt / peak,
        **extra,
    }
    if not finite:
        record["skipped"] = True
        log.warning(
            "step %d: non-finite loss %s or grad norm %s; step skipped", state.step, loss, norm
        )
    return record


def _evaluate(
    model: nn.Module,
    forward: nn.Module,
    evaluate: Callable[[nn.Module], dict[str, float]],
    state: TrainState,
    device: torch.device,
    amp_dtype: torch.dtype,
) -> dict[str, Any]:
    with eval_mode(model), torch.no_grad(), autocast(device, amp_dtype):
        result = evaluate(forward)
    state.last_eval = dict(result)
    parts = ", ".join(f"{k} {v:.4f}" for k, v in result.items())
    log.info("step %d: %s", state.step, parts)
    return {"step": state.step, **result}


def _progress_text(record: dict[str, Any]) -> str:
    return (
        f"step {record['step']}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
        f"{record['tokens_per_s']:,.0f} tok/s  MFU {100 * record['mfu']:.1f}%"
    )
