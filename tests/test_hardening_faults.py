"""Issue 16 item 4 (pretraining): kill -9 a training run at random moments, checkpoint writes
included, 20 times, resuming each time; the final weights equal an uninterrupted run's (CPU, fp32).

A checkpoint is written after every step, each of its files slowed by 20 ms; every other kill
waits for a file write to begin, so at least half land inside a checkpoint write. After each kill
every checkpoint folder must verify (manifest and checksums), and the resume must never load a
partial one. RELIABILITY B1/B2 in one test. The runs are forked from a server that has imported
torch already (multiprocessing's forkserver), so 20 trials cost seconds of start-up, not minutes.
"""

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import losses, run

from pellucid.weights.checkpoint import checkpoint_dirs, latest_good, verify

STEPS = 150  # enough that 20 kills (each after 1-4 steps) never reach the end


def _train_child(run_dir: str, resume: bool, writes: object) -> None:
    """The run to kill: each checkpoint file write counts itself in `writes`, then waits 20 ms."""
    import pellucid.weights.checkpoint as ck

    real = ck.atomic_write

    def slow(path: Path, data: bytes) -> None:
        writes.value += 1
        time.sleep(0.02)  # widen the window in which a kill lands mid-checkpoint
        real(path, data)

    ck.atomic_write = slow
    run(Path(run_dir), resume=resume, max_steps=STEPS, checkpoint_every=1, keep_checkpoints=2)


def good_step(run_dir: Path) -> int:
    good = latest_good(run_dir) if run_dir.exists() else None
    return int(good.name.split("_")[1]) if good is not None else -1


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint_dirs(run_dir)[-1] / "model.safetensors")


@pytest.mark.slow
def test_20_random_kills_then_resume_give_the_uninterrupted_weights(tmp_path):
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    rng = torch.Generator().manual_seed(16)
    run_dir = tmp_path / "killed"
    kills = mid_write = 0
    while kills < 20:
        last = good_step(run_dir)
        writes = ctx.Value("q", 0, lock=False)  # no lock a killed child could die holding
        child = ctx.Process(target=_train_child, args=(str(run_dir), last >= 0, writes))
        child.start()
        deadline = time.monotonic() + 120  # this child's first own checkpoint, however slow
        while child.is_alive() and good_step(run_dir) <= last and time.monotonic() < deadline:
            time.sleep(0.005)
        if kills % 2:  # at a random moment of the next checkpoint file's write
            seen = writes.value
            while child.is_alive() and writes.value == seen:
                time.sleep(0.001)
            time.sleep(0.02 * torch.rand((), generator=rng).item())
        else:  # at any moment of the next steps
            time.sleep(0.3 * torch.rand((), generator=rng).item())
        assert child.is_alive(), "the run finished (or failed) before it could be killed"
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        kills += 1
        mid_write += any(p.name.startswith(".tmp-") for p in (run_dir / "checkpoints").iterdir())
        for ckpt in checkpoint_dirs(run_dir):  # only complete folders ever carry a step_ name
            verify(ckpt)
        assert good_step(run_dir) > last  # every trial moved the run on
    assert mid_write >= 10, f"only {mid_write} of 20 kills landed inside a checkpoint write"
    state = run(run_dir, resume=True, max_steps=STEPS, checkpoint_every=1, keep_checkpoints=2)
    assert state.step == STEPS and state.resumed_from is not None
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    run(tmp_path / "straight", max_steps=STEPS, checkpoint_every=STEPS)
    killed, straight = final_weights(run_dir), final_weights(tmp_path / "straight")
    assert killed.keys() == straight.keys()
    assert all(torch.equal(killed[k], straight[k]) for k in killed)  # bit for bit
    assert losses(run_dir) == losses(tmp_path / "straight")
