"""Issue 16 item 4 (pretraining): kill -9 a training run at random moments, checkpoint writes
included, 20 times, resuming each time; the final weights equal an uninterrupted run's (CPU, fp32).

A checkpoint is written after every step, each of its files slowed by 20 ms; every other kill
waits for a file write to begin, so at least half land inside a checkpoint write. After each kill
every checkpoint folder must verify (manifest and checksums), and the resume must never load a
partial one. RELIABILITY B1/B2 in one test. The loop is tests/kill_helpers.py, shared with the
fine-tuning and DPO runs' (test_hardening_faults_finetune.py).
"""

from pathlib import Path

import pytest
import torch
from kill_helpers import kill_and_resume, no_leftovers, slow_checkpoint_writes
from safetensors.torch import load_file
from test_trainer import losses, run

from pellucid.weights.checkpoint import checkpoint_dirs

STEPS = 150  # enough that 20 kills (each after 1-4 steps) never reach the end


def _train_child(run_dir: str, resume: bool, writes: object) -> None:
    """The run to kill, its checkpoint writes slowed."""
    slow_checkpoint_writes(writes)
    run(Path(run_dir), resume=resume, max_steps=STEPS, checkpoint_every=1, keep_checkpoints=2)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint_dirs(run_dir)[-1] / "model.safetensors")


@pytest.mark.slow
def test_20_random_kills_then_resume_give_the_uninterrupted_weights(tmp_path):
    run_dir = tmp_path / "killed"
    mid_write = kill_and_resume(_train_child, run_dir)
    assert mid_write >= 10, f"only {mid_write} of 20 kills landed inside a checkpoint write"
    state = run(run_dir, resume=True, max_steps=STEPS, checkpoint_every=1, keep_checkpoints=2)
    assert state.step == STEPS and state.resumed_from is not None
    assert no_leftovers(run_dir)
    run(tmp_path / "straight", max_steps=STEPS, checkpoint_every=STEPS)
    killed, straight = final_weights(run_dir), final_weights(tmp_path / "straight")
    assert killed.keys() == straight.keys()
    assert all(torch.equal(killed[k], straight[k]) for k in killed)  # bit for bit
    assert losses(run_dir) == losses(tmp_path / "straight")
