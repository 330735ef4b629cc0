"""Issue 16 item 4 (fine-tuning and DPO): kill -9 a LoRA SFT run and a full-weights DPO run at
random moments, checkpoint writes included, 20 times each, resuming each time through the
fine-tuning run machinery (pellucid/finetune.py); the final adapter (SFT) and weights (DPO) equal an
uninterrupted run's bit for bit (CPU, fp32), and no partial checkpoint is ever loaded.

Twenty kills each, as the issue asks and as for pretraining (tests/test_hardening_faults.py, whose
loop this shares: tests/kill_helpers.py), rather than fewer to fit a minute: measured on the shared
2-core EPYC, the SFT test took 91 s of CPU (all processes; the pretraining test takes 67 s there
and about 70 s of wall time on a quiet machine), so about 90 s quiet; lower `kills` in
kill_and_resume if CI time is short (every other kill still lands inside a checkpoint write).
LoRA for SFT and full weights for DPO, so that both kinds of checkpoint (trainable tensors only,
and every weight with a frozen reference beside it) go through the kills. NaN/inf stopping with the step and the last good
checkpoint named is tests/test_trainer.py::test_consecutive_nonfinite_steps_stop_the_run_with_the_step
(the one trainer every run goes through).
"""

from pathlib import Path

import finetune_helpers as h
import pytest
import torch
from kill_helpers import kill_and_resume, no_leftovers, slow_checkpoint_writes

from pellucid import finetune
from pellucid.data.preferences import PreferencePair, write_pairs
from pellucid.train.metrics import read_metrics
from pellucid.weights.checkpoint import checkpoint_dirs
from pellucid.weights.safety import load_safetensors

STEPS = 100  # enough that 20 kills (each after 1-4 steps) never reach the end
QUIET = ["train.progress=false", "train.log_every=1000", "finetune.eval_max=2",
         "finetune.max_new_tokens=2", f"train.max_steps={STEPS}", "train.batch_size=4"]  # fmt: skip
RUNS = {  # task: (data file, LoRA or not, assignments)
    "sft": ("train.jsonl", True, ["lora.dropout=0.1"]),  # dropout: its RNG must resume too
    "dpo": ("pairs.jsonl", False, ["train.lr=1e-4"]),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    h.base_run(d / "base")
    h.write_jsonl(d / "train.jsonl", h.parity_rows(120, seed=0))
    rows = h.parity_rows(80, seed=0)
    write_pairs(d / "pairs.jsonl", [PreferencePair(r["prompt"], r["answer"], "No.") for r in rows])
    return d


def _run(files: Path, task: str, run_dir: Path, resume: bool, *extra: str) -> None:
    data, lora, assignments = RUNS[task]
    run = finetune.load_finetune_config(
        task, str(files / "base"), str(files / data), lora=lora,
        assignments=[*QUIET, *assignments, *extra],
    )  # fmt: skip
    finetune.finetune(run, run_dir, resume=resume)


def _child(run_dir: str, resume: bool, writes: object, files: str, task: str) -> None:
    """The run to kill: a checkpoint after every step, its file writes slowed."""
    slow_checkpoint_writes(writes)
    _run(Path(files), task, Path(run_dir), resume, "train.checkpoint_every=1")


def _trained(run_dir: Path, task: str) -> dict[str, torch.Tensor]:
    """What the run trained: the LoRA adapter it exported, or the last checkpoint's weights."""
    if RUNS[task][1]:
        return load_safetensors(run_dir / "adapter" / "adapter.safetensors")
    return load_safetensors(checkpoint_dirs(run_dir)[-1] / "model.safetensors")


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_20_random_kills_then_resume_give_the_uninterrupted_result(files, tmp_path, task):
    run_dir = tmp_path / "killed"
    mid_write = kill_and_resume(_child, run_dir, (str(files), task))
    assert mid_write >= 10, f"only {mid_write} of 20 kills landed inside a checkpoint write"
    _run(files, task, run_dir, True, f"train.checkpoint_every={STEPS}")  # the rest, unkilled
    assert no_leftovers(run_dir)
    _run(files, task, tmp_path / "straight", False, f"train.checkpoint_every={STEPS}")
    killed, straight = _trained(run_dir, task), _trained(tmp_path / "straight", task)
    assert killed.keys() == straight.keys() and killed
    assert all(torch.equal(killed[k], straight[k]) for k in killed)  # bit for bit
    assert _losses(run_dir) == _losses(tmp_path / "straight")
    assert len(_losses(run_dir)) == STEPS
