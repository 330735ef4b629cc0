"""Which precision a training run computes in: `train.dtype=auto` measures the CPU once and decides.

CPUs differ by a factor of ten here. With Intel AMX a bf16 matmul runs at about 2,460 GFLOP/s
against 320 for fp32 (measured); AMD Zen 4's AVX512-BF16 gives about 2.2x; CPUs with neither run
bf16 at about half the fp32 rate or far less. Which one a run lands on is not ours to choose, so
`auto` times fp32 and bf16 matmuls in turn (a second; a few where bf16 is slow), keeps the two
rates per machine in `$PELLUCID_HOME/probes/`, and trains under bf16 autocast where bf16 is at
least `BF16_SPEEDUP` times as fast, in fp32 elsewhere. On CUDA `auto` is bf16, on MPS fp32, without measuring.

Under bf16 autocast the weights, gradients and AdamW moments stay fp32; the matmuls run in bf16 and
the loss's log-softmax in fp32 (objectives.py). MFU is measured against the peak of the dtype used.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import platform
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pellucid.files import atomic_write, pellucid_home
from pellucid.train.metrics import matmul_flops

log = logging.getLogger("pellucid")

BF16_SPEEDUP = 2.0  # bf16 autocast pays once its matmuls beat fp32 by this much (casts cost too)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    """The dtype a run computes in, and why: one line for the log and the report."""

    dtype: torch.dtype
    reason: str
    peaks: dict[str, float] = field(default_factory=dict)  # matmul FLOP/s by dtype name, if probed

    @property
    def name(self) -> str:
        """ "float32" or "bfloat16"."""
        return str(self.dtype).removeprefix("torch.")


def choose_dtype(peaks: dict[str, float]) -> torch.dtype:
    """bfloat16 where its matmul rate is at least BF16_SPEEDUP x the float32 one, else float32."""
    return torch.bfloat16 if peaks["bfloat16"] >= BF16_SPEEDUP * peaks["float32"] else torch.float32


def machine_key() -> str:
    """What the probe's answer depends on: CPU model, its bf16/AMX flags, torch, thread count."""
    model, flags = platform.processor() or platform.machine(), ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = " ".join(f for f in value.split() if "bf16" in f or f.startswith("amx"))
                break
    return f"{model} | {flags or 'no bf16 flags'} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def probe_path(key: str) -> Path:
    """Where the probe of the machine described by `key` is kept."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return pellucid_home() / "probes" / f"matmul-{digest}.json"


def measure_peaks(
    rounds: int = 3,
    seconds: float = 0.15,
    rate: Callable[[torch.device, torch.dtype, float], float] | None = None,
) -> dict[str, float]:
    """Best CPU matmul FLOP/s of each dtype, measured in alternation so load falls on both alike.

    bf16 is measured again only while the answer is not plain (bf16 between half and 4x the
    threshold: no machine's noise moves a ratio further), and a try may be a long one: on a CPU
    without native bf16 a single 1024^3 bf16 matmul takes ~2 s (1 GFLOP/s against 126 for fp32,
    AVX2-only EPYC), and three rounds of at least four tries took 32 s. fp32's rounds are cheap
    and all run: its first, colder, read 76 GFLOP/s where the later ones reached 126.
    rate: what measures (device, dtype, seconds) -> FLOP/s; by default one-try matmul_flops.
    """
    rate = rate or functools.partial(matmul_flops, tries=1)
    cpu = torch.device("cpu")
    peaks = dict.fromkeys(DTYPES, 0.0)
    plain = False
    for _ in range(rounds):
        for name, dtype in DTYPES.items():
            if not (plain and name == "bfloat16"):
                peaks[name] = max(peaks[name], rate(cpu, dtype, seconds))
        ratio = peaks["bfloat16"] / peaks["float32"]
        plain = not BF16_SPEEDUP / 2 <= ratio <= BF16_SPEEDUP * 4
    return peaks


def cpu_peaks(
    measure: Callable[[], dict[str, float]] = measure_peaks,
) -> tuple[dict[str, float], bool]:
    """This machine's (peaks, cached): read from the probe file, else measured once and kept.

    A probe file that is unreadable, malformed or of another machine is measured again.
    """
    key = machine_key()
    path = probe_path(key)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(path.read_text(encoding="utf-8"))
        peaks = {name: float(saved["peaks"][name]) for name in DTYPES}
        if saved["key"] == key and all(v > 0 for v in peaks.values()):
            return peaks, True
    peaks = measure()
    atomic_write(path, json.dumps({"key": key, "peaks": peaks}, indent=1) + "\n")
    return peaks, False


def resolve_precision(
    name: str,
    device: torch.device,
    peaks: Callable[[], tuple[dict[str, float], bool]] | None = None,
) -> Precision:
    """`train.dtype` -> the Precision to run with; "auto" on a CPU measures (once per machine).

    peaks: returns (matmul FLOP/s by dtype name, whether from the probe file); default cpu_peaks.
    """
    if name != "auto":
        return Precision(DTYPES[name], f"{name} (train.dtype={name})")
    if device.type != "cpu":  # GPUs this targets have bf16 tensor cores; MPS autocast is fp16-first
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        return Precision(dtype, f"{str(dtype)[6:]} (train.dtype=auto on {device.type})")
    rates, cached = (peaks or cpu_peaks)()
    dtype = choose_dtype(rates)
    ratio = rates["bfloat16"] / rates["float32"]
    how = "kept from an earlier probe" if cached else "measured now"
    reason = (
        f"{str(dtype)[6:]} (train.dtype=auto: bf16 matmul {rates['bfloat16'] / 1e9:,.0f} vs fp32 "
        f"{rates['float32'] / 1e9:,.0f} GFLOP/s on this CPU, {ratio:.2f}x "
        f"{'>=' if dtype == torch.bfloat16 else '<'} {BF16_SPEEDUP:g}x; {how})"
    )
    return Precision(dtype, reason, rates)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`train.dtype` -> torch dtype (see resolve_precision)."""
    return resolve_precision(name, device).dtype


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Mixed precision for bf16 (matmuls in bf16, reductions in fp32); a no-op for fp32."""
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device.type, dtype=dtype), warnings.catch_warnings():
        # QK-norm's fp32 gain meets bf16 queries, so torch takes its unfused rms_norm (correct,
        # a little slower) and would say so on every run.
        warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
        yield
