"""Sampling: parameter validation and the pure logits -> probabilities -> token functions."""

import math

import pytest
import torch

from pellucid.errors import ConfigError
from pellucid.infer.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    greedy,
    min_p_filter,
    probabilities,
    process_logits,
    sample,
    seen_mask,
    top_k_filter,
    top_p_filter,
)

# Probabilities 0.5, 0.3, 0.15, 0.05 as logits, in a shuffled order so no filter can rely on it.
PROBS = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
LOGITS = PROBS.log()


def kept(logits):
    return set(torch.isfinite(logits[0]).nonzero()[:, 0].tolist())


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"seed": -1}, "seed"),
        ({"stop": "END"}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-3]}, "stop_token_ids"),
        ({"top_logprobs": -1}, "top_logprobs"),
    ],
)
def test_bad_params_name_the_parameter(kwargs, name):
    with pytest.raises(ConfigError) as e:
        SamplingParams(**kwargs)
    msg = str(e.value)
    assert f"sampling {name} " in msg and "\n" not in msg


def test_good_params_pass():
    p = SamplingParams(temperature=0, top_k=1, top_p=1.0, min_p=0.0, seed=0, stop=["\n"])
    assert p.temperature == 0 and p.stop == ["\n"]


def test_top_k_keeps_exactly_k_even_with_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 3.0, 0.0]])
    out = top_k_filter(logits, 2)
    assert len(kept(out)) == 2 and kept(out) <= {1, 2, 3, 4}
    assert torch.equal(out[torch.isfinite(out)], torch.tensor([3.0, 3.0]))
    assert torch.equal(top_k_filter(logits, 6), logits)
    assert kept(top_k_filter(LOGITS, 1)) == {1}


@pytest.mark.parametrize(
    ("p", "expect"), [(0.01, {1}), (0.4, {1}), (0.75, {1, 3}), (0.9, {0, 1, 3})]
)
def test_top_p_keeps_the_smallest_set_reaching_p(p, expect):
    assert kept(top_p_filter(LOGITS, p)) == expect


def test_top_p_is_minimal_on_random_rows():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g) * 2
    for p in (0.1, 0.5, 0.9, 0.99):
        out = top_p_filter(logits, p)
        probs = logits.softmax(-1)
        for row in range(logits.shape[0]):
            mask = torch.isfinite(out[row])
            m = int(mask.sum())
            top = probs[row].sort(descending=True).values
            assert probs[row][mask].sum() >= p - 1e-6  # the kept set reaches p ...
            assert top[: m - 1].sum() < p  # ... and one token fewer would not
            assert mask[probs[row].argmax()]  # the most likely token is kept


@pytest.mark.parametrize(
    ("min_p", "expect"), [(0.0, {0, 1, 2, 3}), (0.2, {0, 1, 3}), (0.5, {1, 3}), (1.0, {1})]
)
def test_min_p_keeps_tokens_above_a_fraction_of_the_best(min_p, expect):
    assert kept(min_p_filter(LOGITS, min_p)) == expect


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 0.0]])
    seen = torch.tensor([[True, True, False, False, True]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -4.0, 2.0, -2.0, 0.0]]))


def test_seen_mask_marks_prompt_and_output_tokens():
    mask = seen_mask([[1, 1, 3], [0]], 4, torch.device("cpu"))
    assert mask.tolist() == [[False, True, False, True], [True, False, False, False]]


def test_probabilities_sum_to_one_after_each_filter():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 100, generator=g) * 3
    seen = torch.rand(8, 100, generator=g) < 0.2
    settings = [
        {},
        {"top_k": 5},
        {"top_p": 0.5},
        {"min_p": 0.1},
        {"repetition_penalty": 1.3},
        {"top_k": 20, "top_p": 0.8, "min_p": 0.05, "repetition_penalty": 1.1},
    ]
    for kw in settings:
        for t in (0.0, 0.3, 1.0, 2.5):
            params = SamplingParams(temperature=t, **kw)
            probs = probabilities(process_logits(logits, params, seen), t)
            assert torch.allclose(probs.sum(-1), torch.ones(8), atol=1e-5), (kw, t)
            assert (probs >= 0).all()


def test_temperature_zero_is_argmax_and_temperature_scales_the_logits():
    logits = torch.tensor([[0.1, 2.0, 2.0, -1.0]])
    assert probabilities(logits, 0.0).tolist() == [[0.0, 1.0, 0.0, 0.0]]
    assert torch.allclose(probabilities(logits, 0.5), torch.softmax(logits * 2, -1))
    assert sample(probabilities(logits, 0.0), torch.Generator().manual_seed(3)).item() == 1


def test_greedy_is_torchs_argmax_first_among_ties():
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 5, (6, 300), generator=g).float()  # many ties for the maximum
    logits[2, 7] = math.inf
    logits[3] = -math.inf  # all equal: the first
    logits[4, 11] = math.nan  # numpy and torch both take a NaN as the maximum
    for z in (logits, logits[:, ::2], logits.double()):  # a strided view, and not float32
        got = greedy(z)
        assert got.dtype == torch.int64 and got.shape == (6, 1)
        assert got.tolist() == z.argmax(dim=-1, keepdim=True).tolist()
    assert greedy(logits[0]).tolist() == [int(logits[0].argmax())]  # one row: (V,) -> (1,)
    assert probabilities(logits[0], 0.0).argmax().item() == logits[0].argmax().item()


def test_sample_is_seeded_and_never_picks_a_removed_token():
    probs = probabilities(top_k_filter(LOGITS.expand(4000, 4), 2), 1.0)
    a = sample(probs, torch.Generator().manual_seed(7))
    b = sample(probs, torch.Generator().manual_seed(7))
    c = sample(probs, torch.Generator().manual_seed(8))
    assert a.shape == (4000, 1) and a.dtype == torch.int64
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a[:, 0].tolist()) == {1, 3}  # only the two kept tokens
    share = (a == 1).float().mean().item()  # 0.5 / (0.5 + 0.3) = 0.625
    assert abs(share - 0.625) < 0.03


def test_sample_with_one_generator_per_row_ignores_the_other_rows():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 30, generator=g), -1)
    together = sample(probs, [torch.Generator().manual_seed(s) for s in (10, 11, 12)])
    alone = sample(probs[2:], [torch.Generator().manual_seed(12)])
    assert together[2].item() == alone[0].item()
    draws = [sample(probs[:1], [torch.Generator().manual_seed(s)]).item() for s in range(50)]
    assert len(set(draws)) > 5  # different seeds, different tokens
