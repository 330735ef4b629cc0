"""Batches: the Batch class, the seeded window sampler (resumable), and ordered eval batches."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from pellucid.data.batches import IGNORE_INDEX, Batch, WindowSampler, eval_batches
from pellucid.errors import DataError

TOKENS = (np.arange(1000) * 7 % 50_000).astype(np.uint16)  # every window is unique


def _starts(batch):
    """Where each row's window starts in TOKENS (asserting it is a real window)."""
    found = []
    for x, y in zip(batch.inputs.tolist(), batch.targets.tolist(), strict=True):
        s = TOKENS.tolist().index(x[0])
        assert x == TOKENS[s : s + len(x)].tolist() and y == TOKENS[s + 1 : s + 1 + len(y)].tolist()
        found.append(s)
    return found


def test_batch_counts_targets_and_moves_every_tensor_field():
    @dataclasses.dataclass
    class Masked(Batch):
        mask: torch.Tensor
        label: str = "x"

    b = Masked(
        torch.zeros(2, 3, dtype=torch.long),
        torch.tensor([[1, -100, 2], [-100] * 3]),
        torch.ones(2, 3),
    )
    assert b.n_targets == 2
    moved = b.to("cpu")
    assert isinstance(moved, Masked) and moved.label == "x"
    assert torch.equal(moved.targets, b.targets) and torch.equal(moved.mask, b.mask)


def test_window_sampler_draws_real_windows():
    b = next(WindowSampler(TOKENS, batch_size=4, context_len=16, seed=0))
    assert b.inputs.shape == b.targets.shape == (4, 16)
    assert b.inputs.dtype == b.targets.dtype == torch.int64
    assert b.inputs.is_contiguous() and b.n_targets == 64
    assert all(0 <= s <= len(TOKENS) - 17 for s in _starts(b))


def test_window_sampler_reaches_both_ends():
    tokens = np.arange(10, dtype=np.uint16)
    seen = {next(WindowSampler(tokens, 1, 4, seed)).inputs[0, 0].item() for seed in range(200)}
    assert seen == set(range(6))  # starts 0..5: the last window ends on the last token


def test_same_seed_same_batches_other_seed_other_batches():
    a, b, c = (WindowSampler(TOKENS, 4, 8, seed) for seed in (1, 1, 2))
    for _ in range(3):
        x, y, z = next(a), next(b), next(c)
        assert torch.equal(x.inputs, y.inputs) and torch.equal(x.targets, y.targets)
        assert not torch.equal(x.inputs, z.inputs)


def test_resume_from_state_continues_with_the_same_batches():
    sampler = WindowSampler(TOKENS, 4, 8, seed=123)
    batches, saved = [], None
    for i in range(10):
        batches.append(next(sampler))
        if i == 4:
            saved = json.loads(json.dumps(sampler.state()))  # checkpoints store it as JSON
    fresh = WindowSampler(TOKENS, 4, 8, seed=999)
    fresh.load_state(saved)
    for expected in batches[5:]:
        got = next(fresh)
        assert torch.equal(got.inputs, expected.inputs) and torch.equal(
            got.targets, expected.targets
        )
    assert fresh.state() == sampler.state() == {"seed": 123, "step": 10}


def test_sampler_never_touches_the_global_rng():
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    first = next(WindowSampler(TOKENS, 4, 8, seed=5))
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(77)
    assert torch.equal(next(WindowSampler(TOKENS, 4, 8, seed=5)).inputs, first.inputs)


def test_sampler_bad_input():
    with pytest.raises(DataError, match="too few"):
        WindowSampler(np.arange(8), 2, 8, seed=0)
    sampler = WindowSampler(TOKENS, 2, 8, seed=0)
    with pytest.raises(DataError, match="bad sampler state"):
        sampler.load_state({"seed": 1})


def test_eval_batches_cover_every_token_once_in_order():
    tokens = np.arange(1, 24, dtype=np.uint16)  # 23 tokens: 22 targets, rows of 5 -> 5 rows
    batches = list(eval_batches(tokens, batch_size=2, context_len=5))
    assert [b.inputs.shape[0] for b in batches] == [2, 2, 1]
    targets = torch.cat([b.targets.flatten() for b in batches])
    assert targets[targets != IGNORE_INDEX].tolist() == tokens[1:].tolist()
    assert sum(b.n_targets for b in batches) == 22
    last = batches[-1]
    assert last.inputs.tolist() == [[21, 22, 23, 0, 0]]  # padding inputs are valid ids
    assert last.targets.tolist() == [[22, 23, -100, -100, -100]]
    for b in batches:  # inputs predict the next token
        keep = b.targets != IGNORE_INDEX
        assert torch.equal((b.inputs + 1)[keep], b.targets[keep])
    again = list(eval_batches(tokens, 2, 5, max_batches=2))
    assert len(again) == 2 and all(
        torch.equal(x.inputs, y.inputs) for x, y in zip(again, batches, strict=False)
    )
    with pytest.raises(DataError, match="too few"):
        list(eval_batches(tokens[:1], 2, 5))


@pytest.mark.gpu
def test_pinned_batches_move_to_cuda():
    sampler = WindowSampler(TOKENS, 4, 8, seed=0, pin_memory=True)
    b = next(sampler)
    assert b.inputs.is_pinned() and b.targets.is_pinned()
    moved = b.to("cuda")
    assert moved.inputs.is_cuda and torch.equal(moved.targets.cpu(), b.targets)
    (e,) = eval_batches(TOKENS[:9], 4, 8, pin_memory=True)
    assert e.to("cuda").n_targets == 8
