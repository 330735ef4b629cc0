"""Training attention with dropout on the CPU: the blocked causal path against the written-out one."""

import dataclasses
import math

import pytest
import torch

from pellucid.model.config import PRESETS
from pellucid.model.cpu_kernels import keep_mask
from pellucid.model.layers import causal_dropout_attention, explicit_attention
from pellucid.model.transformer import Transformer


def _qkv(B=2, H=4, K=2, T=10, D=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, D, generator=g, dtype=dtype).requires_grad_()
    k, v = (torch.randn(B, K, T, D, generator=g, dtype=dtype).requires_grad_() for _ in range(2))
    return q, k, v


def _reference(q, k, v, p, block, seed):
    """softmax(causal q k^T / sqrt(D)) * mask @ v over the full (T, T) matrix, the mask (0 or
    1 / (1 - p)) assembled from the draws the blocked path makes (block i: (B, H, b, end_i))."""
    B, H, T, _ = q.shape
    torch.manual_seed(seed)
    mask = torch.zeros(B, H, T, T, dtype=q.dtype)
    for start in range(0, T, block):
        end = min(T, start + block)
        mask[..., start:end, :end] = keep_mask((B, H, end - start, end), p)
    groups = H // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    weights = scores.masked_fill(~causal, -math.inf).softmax(-1)
    return (weights * mask) @ v, mask > 0


@pytest.mark.parametrize(("T", "block"), [(10, 4), (12, 4), (9, 64)])
def test_blocked_path_equals_full_attention_with_the_same_masks(T, block):
    q, k, v = _qkv(T=T)
    torch.manual_seed(3)
    got = causal_dropout_attention(q, k, v, 0.3, block)
    want, keep = _reference(q, k, v, 0.3, block, seed=3)
    assert 0.55 < keep[..., torch.ones(T, T, dtype=torch.bool).tril()].float().mean() < 0.85
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, (q, k, v), g)
    for a, b in zip(grads, torch.autograd.grad(want, (q, k, v), g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradients_match_finite_differences():
    q, k, v = _qkv(B=1, H=2, K=1, T=6, D=3)
    f = lambda q, k, v: (torch.manual_seed(5), causal_dropout_attention(q, k, v, 0.25, 2))[1]  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, k, v))


def test_one_block_draws_the_masks_of_the_explicit_path():
    """Where T <= block the path makes explicit_attention's draw, so runs keep their dropout."""
    q, k, v = _qkv(T=16, dtype=torch.float32)
    torch.manual_seed(7)
    got = causal_dropout_attention(q, k, v, 0.2)
    torch.manual_seed(7)
    want, _ = explicit_attention(q, k, v, None, 0.2)
    torch.testing.assert_close(got, want)


def test_bf16_autocast_runs_forward_and_backward():
    q, k, v = _qkv(T=40, D=16, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = causal_dropout_attention(q, k, v, 0.2, 16)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and all(t.grad.isfinite().all() for t in (q, k, v))


def test_the_model_trains_through_it_and_evaluates_without_dropout():
    cfg = dataclasses.replace(PRESETS["tiny"], dropout=0.2, context_len=80)
    torch.manual_seed(0)
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 80))
    torch.manual_seed(1)
    a = model(ids)
    a.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    torch.manual_seed(1)
    assert torch.equal(model(ids), a)  # seeded masks
    model.eval()
    assert torch.equal(model(ids), model(ids))  # no dropout in eval
