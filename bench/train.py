"""Training speed: tokens/s and MFU of pellucid's one training loop at nanoGPT's shapes.

    python bench/train.py                    # CPU, fp32: shapes S and B (nanoGPT's CPU recipe)
    python bench/train.py --quick            # a few steps each: sanity check only
    python bench/train.py --compile          # the same with torch.compile
    python bench/train.py --device cuda --dtype bf16 --shape gpt2-124m --context 1024
                                             # the GPU figure: bf16 autocast, against a bf16 peak
    python bench/train.py --dtype auto       # what train.dtype=auto picks here, and its speed
    python bench/train.py --cpu-time         # 1 thread, timed in CPU time: for a busy machine
    python bench/train.py --profile          # + where 3 steps after warm-up spend their time
    python bench/train.py --nanogpt DIR      # + nanoGPT's own model.py (a checkout in DIR) at
                                             #   the same shapes, same clock and peak

MFU = model FLOPs per token (6N + 12 L H D T, nanoGPT's estimate) x tokens/s / peak, where the
peak is measured in this process: the best fp32 1024^3 matmul on the CPU (bf16 4096^3 on CUDA).
The issue that set the goals (>= 60% on S, >= 80% on B) quoted nanoGPT at 39% (S) and 75% (B)
on another machine; --nanogpt measures nanoGPT itself here, in the same run. The loop is the real
one (`pellucid.train.trainer.train`): data sampling, the per-step sync for the non-finite check
and the metrics log are all counted.

--cpu-time runs one thread and times both the steps and the peak by the thread's CPU time, which
other processes do not inflate: on a shared machine that is busy it measures the efficiency of the
code when the wall clock cannot (its MFU is against the one-thread peak, and is not the 2-thread
figure: mark it so).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import json
import statistics
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

from pellucid.data.batches import WindowSampler
from pellucid.model.config import PRESETS, ModelConfig
from pellucid.model.transformer import Transformer
from pellucid.train import trainer
from pellucid.train.metrics import matmul_flops, read_metrics
from pellucid.train.objectives import lm_loss
from pellucid.train.precision import machine_key, resolve_precision
from pellucid.train.trainer import TrainConfig, train

GPT2 = {"pos": "learned", "norm": "layernorm", "mlp": "gelu", "qk_norm": False}
# nanoGPT's shakespeare_char shapes: 65 characters, tied head, no biases.
SHAPES = {
    "S": (ModelConfig(vocab_size=65, context_len=64, n_layer=4, n_head=4, n_embd=128, **GPT2), 12),
    "B": (
        ModelConfig(
            vocab_size=65, context_len=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2, **GPT2
        ),
        16,
    ),
}


def peak_flops(device: str, dtype: torch.dtype, cpu_time: bool) -> float:
    """The best matmul rate of two half-second measurements (a VM's rate wanders by 10-20%)."""
    clock = time.thread_time if cpu_time else time.perf_counter
    return max(matmul_flops(torch.device(device), dtype, 0.5, clock) for _ in range(2))


def step_profiler(device: str, skip: int) -> torch.profiler.profile:
    """A profiler that records 3 training steps after `skip` (warm-up and compilation); the
    trainer's on_metrics callback advances it once per step."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    when = torch.profiler.schedule(wait=skip, warmup=1, active=3, repeat=1)
    return torch.profiler.profile(activities=activities, schedule=when)


def profile_table(prof: torch.profiler.profile, device: str, rows: int = 25) -> str:
    """The ops that took the most time over the recorded steps (device time on CUDA, CPU time on
    the CPU)."""
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def bench(
    name: str,
    cfg: ModelConfig,
    batch: int,
    steps: int,
    device: str,
    dtype: str,
    compile: bool,
    cpu_time: bool = False,
    profile: bool = False,
) -> dict:
    torch.manual_seed(0)
    model = Transformer(cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 1 << 20).astype(np.uint32)
    sampler = WindowSampler(tokens, batch, cfg.context_len, seed=0, pin_memory=device == "cuda")
    tcfg = TrainConfig(
        max_steps=steps, batch_size=batch, warmup_steps=1, eval_every=0, checkpoint_every=0,
        device=device, dtype=dtype, compile=compile, progress=False, log_every=10**9,
    )  # fmt: skip
    precision = resolve_precision(dtype, torch.device(device))
    before = peak_flops(device, precision.dtype, cpu_time)
    skip = max(1, steps // 3)
    prof = step_profiler(device, skip) if profile else None
    with tempfile.TemporaryDirectory() as tmp, prof or contextlib.nullcontext():
        if cpu_time:  # the trainer's step clock becomes this thread's CPU time
            trainer.time = types.SimpleNamespace(perf_counter=time.thread_time)
        try:
            on_metrics = (lambda _: prof.step()) if prof else None
            state = train(model, lm_loss, sampler, tcfg, Path(tmp), on_metrics=on_metrics)
        finally:
            trainer.time = time
        records = read_metrics(Path(tmp) / "metrics.jsonl")
    timed = records[len(records) // 3 :]  # the first third warms up (and compiles)
    # The peak, measured again after the run: MFU over the best of both is the conservative one.
    peak = max(before, peak_flops(device, precision.dtype, cpu_time))
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in timed)
    return {
        "shape": name,
        "params": model.num_params(),
        "batch": batch,
        "context": cfg.context_len,
        "flops_per_token": model.flops_per_token(),
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * model.flops_per_token() / peak,
        "peak_tflops": peak / 1e12,
        "compile": compile,
        "device": device,
        "dtype": precision.name,
        "precision": state.precision,
        "threads": torch.get_num_threads(),
        "clock": "thread CPU time" if cpu_time else "wall",
        "profile": (
            f"where 3 steps went (after {skip + 1} untimed):\n{profile_table(prof, device)}"
            if prof
            else None
        ),
    }


def nanogpt_tokens_per_s(
    checkout: Path, cfg: ModelConfig, batch: int, steps: int, cpu_time: bool
) -> float:
    """nanoGPT's model.py from a checkout, at the same shape, trained as its train.py does on the
    CPU (AdamW, unfused there; clip 1.0; loss.item() each step), timed by the same clock."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", checkout / "model.py")
    nano = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nano)
    torch.manual_seed(0)
    gcfg = nano.GPTConfig(
        block_size=cfg.context_len, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=False,
    )  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter counts
        model = nano.GPT(gcfg)
        opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    tokens = torch.randint(0, cfg.vocab_size, (1 << 20,))
    clock = time.thread_time if cpu_time else time.perf_counter
    rates = []
    for _ in range(steps):
        start = clock()
        i = torch.randint(len(tokens) - cfg.context_len - 1, (batch,))
        x = torch.stack([tokens[j : j + cfg.context_len] for j in i])
        y = torch.stack([tokens[j + 1 : j + 1 + cfg.context_len] for j in i])
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        rates.append(batch * cfg.context_len / (clock() - start))
    return statistics.median(rates[steps // 3 :])  # as bench(): a third warms up


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--dtype",
        choices=["float32", "fp32", "bfloat16", "bf16", "auto"],
        help="default: float32 on the CPU, bf16 on CUDA; auto: what train.dtype=auto picks; "
        "the peak is measured in the dtype used",
    )
    p.add_argument(
        "--shape",
        action="append",
        choices=[*SHAPES, *PRESETS],
        help="repeatable; default S and B on the CPU, gpt2-124m on CUDA",
    )
    p.add_argument("--context", type=int, help="override the shape's context length")
    p.add_argument("--batch", type=int, help="override the shape's batch (presets: 16)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--quick", action="store_true", help="6 steps per shape")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--cpu-time", action="store_true", help="1 thread, timed in thread CPU time")
    p.add_argument("--profile", action="store_true", help="print the top ops of 3 timed steps")
    p.add_argument("--nanogpt", type=Path, metavar="DIR", help="a nanoGPT checkout (CPU shapes)")
    args = p.parse_args()  # fmt: skip
    if args.cpu_time:
        torch.set_num_threads(1)
    steps = 6 if args.quick else args.steps
    dtype = {"fp32": "float32", "bf16": "bfloat16"}.get(args.dtype, args.dtype)
    dtype = dtype or ("bfloat16" if args.device == "cuda" else "float32")
    names = args.shape or (["gpt2-124m"] if args.device == "cuda" else list(SHAPES))
    print(f"# {machine_key()}")
    for name in names:
        cfg, batch = SHAPES[name] if name in SHAPES else (PRESETS[name], 16)
        if args.context:
            cfg = dataclasses.replace(cfg, context_len=args.context)
        batch = args.batch or batch
        r = bench(
            name, cfg, batch, steps, args.device, dtype, args.compile, args.cpu_time, args.profile
        )
        print(
            f"{name:10s} {r['params'] / 1e6:6.2f}M params  batch {batch} x {cfg.context_len}  "
            f"{r['dtype']}  {r['tokens_per_s']:10,.0f} tok/s  MFU {100 * r['mfu']:5.1f}% "
            f"(of a measured {r['peak_tflops']:.3g} TFLOP/s {r['dtype']} matmul peak, "
            f"{r['clock']})"
        )
        profiled = r.pop("profile")
        if args.nanogpt and name in SHAPES:
            # the same shape: pellucid's FLOPs per token (6N + 12 L H D T) and the run's peak
            tps = nanogpt_tokens_per_s(args.nanogpt, cfg, batch, steps, args.cpu_time)
            n = {"tokens_per_s": tps, "mfu": tps * r["flops_per_token"] / (r["peak_tflops"] * 1e12)}
            print(
                f"{'nanoGPT':10s} {'':6s}         same shape                  "
                f"{n['tokens_per_s']:10,.0f} tok/s  MFU {100 * n['mfu']:5.1f}%  "
                f"(pellucid / nanoGPT: {r['tokens_per_s'] / n['tokens_per_s']:.2f}x)"
            )
            r["nanogpt"] = n
        print(json.dumps(r))
        if profiled:
            print(profiled)


if __name__ == "__main__":
    main()
