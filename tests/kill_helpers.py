"""Kill -9 a training run at random moments, checkpoint writes included, resuming each time: the
loop shared by the fault tests of pretraining, fine-tuning and DPO (issue 16 item 4).

The runs are forked from a server that has imported torch and the test module already
(multiprocessing's forkserver: tests/preloaded.py), so a trial costs the run's own start-up, not
Python's and torch's.
In the child every checkpoint file write counts itself and then waits 20 ms; every other kill waits
for such a write to begin, so at least half land inside a checkpoint write. After each kill every
`step_*` folder must verify (manifest and checksums): only complete folders ever carry that name,
so a resume can never load a partial one.
"""

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numba
import preloaded
import torch
import torch._dynamo  # torch.optim imports it at an optimizer's first construction

from pellucid.weights.checkpoint import checkpoint_dirs, latest_good, verify

# The forkserver imports this module (and the child's) before it forks any run, so what each
# run would otherwise load on its own is loaded once here: torch's compiler stack (~1 s, pulled in
# by AdamW) and numba's typing and target registries (~0.7 s, at a process's first numba call:
# the trial runs' dropout kernels). A serial function only: numba's thread pool must not start
# before a fork.
numba.njit(lambda x: x + 1)(1)


def slow_checkpoint_writes(writes: object) -> None:
    """In the child: each checkpoint file write counts itself in `writes`, then waits 20 ms."""
    import pellucid.weights.checkpoint as ck

    real = ck.atomic_write

    def slow(path: Path, data: bytes) -> None:
        writes.value += 1
        time.sleep(0.02)  # widen the window in which a kill lands mid-checkpoint
        real(path, data)

    ck.atomic_write = slow


def good_step(run_dir: Path) -> int:
    """The step of the newest checkpoint that verifies, -1 if none."""
    good = latest_good(run_dir) if run_dir.exists() else None
    return int(good.name.split("_")[1]) if good is not None else -1


def kill_and_resume(
    child: Callable,
    run_dir: Path,
    args: tuple = (),
    *,
    kills: int = 20,
    window: float = 0.3,
    keep: int | None = None,
) -> int:
    """Start `child(run_dir, resume, writes, *args)` `kills` times and kill -9 each once it has
    written its first own checkpoint: odd trials at a random moment of the next checkpoint file
    write, even ones up to `window` seconds later. Returns how many kills left a half-written
    checkpoint folder behind. `child` must be a top-level function of an importable test module.
    keep: the run's keep_checkpoints, if set: after each kill at most keep + 1 complete folders
    (a kill can land between a new checkpoint's rename and the purge of the oldest).
    """
    ctx = preloaded.context([child.__module__, __name__])
    rng = torch.Generator().manual_seed(16)
    mid_write = 0
    for trial in range(kills):
        last = good_step(run_dir)
        writes = ctx.Value("q", 0, lock=False)  # no lock a killed child could die holding
        proc = ctx.Process(target=child, args=(str(run_dir), last >= 0, writes, *args))
        proc.start()
        deadline = time.monotonic() + 120  # this child's first own checkpoint, however slow
        while proc.is_alive() and good_step(run_dir) <= last and time.monotonic() < deadline:
            time.sleep(0.005)
        if trial % 2:  # at a random moment of the next checkpoint file's write
            seen = writes.value
            while proc.is_alive() and writes.value == seen:
                time.sleep(0.001)
            time.sleep(0.02 * torch.rand((), generator=rng).item())
        else:  # at any moment of the next steps
            time.sleep(window * torch.rand((), generator=rng).item())
        assert proc.is_alive(), "the run finished (or failed) before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        mid_write += any(p.name.startswith(".tmp-") for p in (run_dir / "checkpoints").iterdir())
        for ckpt in checkpoint_dirs(run_dir):  # only complete folders ever carry a step_ name
            verify(ckpt)
        assert keep is None or len(checkpoint_dirs(run_dir)) <= keep + 1
        assert good_step(run_dir) > last  # every trial moved the run on
    return mid_write


def no_leftovers(run_dir: Path) -> bool:
    """After a finished run: no half-written checkpoint folder is left in `checkpoints/`."""
    return not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
