"""Measuring training: the metrics log, the peak for MFU, the progress bar and the loss plot.

MFU (model FLOPs utilisation) is the model's FLOP/s divided by the device's peak, where the peak
is *measured* here (a large matmul, best of several) rather than read from a spec sheet: on a
CPU the spec depends on clock, vector width and thread count, and the measured matmul rate is
the honest ceiling a training step could reach.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

from pellucid.errors import FileWriteError
from pellucid.files import atomic_open, atomic_write

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


@functools.cache
def measure_peak_flops(device: str, dtype: torch.dtype) -> float:
    """Best matmul FLOP/s measured on `device` with `dtype` (cached for the process).

    CPU: square 1024 matmuls, a size that fits the caches; CUDA: 4096. The best of repeated
    timings over about half a second, so a briefly busy machine is mostly forgiven.
    """
    return matmul_flops(torch.device(device), dtype, 0.5)


def matmul_flops(
    dev: torch.device,
    dtype: torch.dtype,
    seconds: float,
    clock: Callable[[], float] = time.perf_counter,
    tries: int = 4,
) -> float:
    """Best FLOP/s of square `dtype` matmuls on `dev` over about `seconds` (at least `tries`).

    clock: what a try is timed with (bench/train.py --cpu-time passes time.thread_time).
    """
    n = 4096 if dev.type == "cuda" else 1024
    # Its own generator: measuring must not move the global RNG that dropout draws from.
    gen = torch.Generator(dev).manual_seed(0)
    a = torch.randn(n, n, device=dev, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=dev, dtype=dtype, generator=gen)
    reps = 20 if dev.type == "cuda" else 1
    best = math.inf
    deadline = time.perf_counter() + seconds
    for i in range(1000):
        _sync(dev)
        t0 = clock()
        for _ in range(reps):
            a @ b
        _sync(dev)
        best = min(best, (clock() - t0) / reps)
        if i + 1 >= tries and time.perf_counter() > deadline:
            break
    return 2 * n**3 / best


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class MetricsLog:
    """Append-only JSONL file, one object per line (`step`, `loss`, ... or `val_loss`, ...).

    Lines are written whole and flushed at once, so a killed run leaves complete lines. NaN and
    Inf are written as the JSON extensions `NaN`/`Infinity` (Python's json reads them): a
    non-finite loss must show in the log, never be filtered out.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = None

    def write(self, record: dict[str, Any]) -> None:
        try:
            if self._file is None:
                self._file = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
            self._file.write(json.dumps(record) + "\n")
        except OSError as e:  # disk full: one line; a torn last line is skipped by read_metrics
            with contextlib.suppress(OSError):  # closing flushes the same bytes, failing again
                self.close()
            self._file = None
            raise FileWriteError(
                f"could not append to {self.path}: {e.strerror}; the records before are intact"
            ) from None

    def truncate_after(self, step: int) -> None:
        """Drop the records of steps after `step` (a resumed run rewrites them)."""
        self.close()
        keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics JSONL file ([] when there is none); a torn last line is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def plot_curves(records: list[dict[str, Any]], path: Path) -> None:
    """Training loss and validation bits/byte against step, as a PNG (matplotlib, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val, bpb = (_series(records, k) for k in ("loss", "val_loss", "val_bpb"))
    fig, axes = plt.subplots(1, 2 if bpb[0] else 1, figsize=(11 if bpb[0] else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot(*train, lw=0.8, label="train loss")
    if val[0]:
        ax.plot(*val, "o-", ms=3, label="val loss")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if bpb[0]:
        ax = axes[0][1]
        ax.plot(*bpb, "o-", ms=3, color="C2")
        ax.set(xlabel="step", ylabel="bits per byte", title="validation bits per byte")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that carry `key`."""
    hits = [r for r in records if key in r]
    return [r["step"] for r in hits], [r[key] for r in hits]


class ProgressBar:
    """A rich progress bar on stderr, showing step, loss, lr, tokens/s and MFU; a no-op when disabled.

    `total` is in steps, or in seconds for a time-budgeted run. Disabled when stderr is not a
    terminal (logs, CI, tests) or when asked to be quiet; the trainer then writes a log line
    every `log_every` steps instead.
    """

    def __init__(self, total: float, enabled: bool, start: float = 0) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._bar = None
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                Progress,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("train"),
                BarColumn(),
                TaskProgressColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=Console(stderr=True),
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._task = self._bar.add_task("train", total=total, completed=start, info="")

    def update(self, completed: float, info: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, info=info)

    @contextlib.contextmanager
    def running(self) -> Iterator[ProgressBar]:
        if self._bar is None:
            yield self
            return
        with self._bar:
            yield self
