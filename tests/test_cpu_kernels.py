"""The numba CPU kernels for tanh-GELU and dropout masks, against float64 torch and statistics."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pellucid.model.config import PRESETS
from pellucid.model.cpu_kernels import GeluTanh, keep_mask
from pellucid.model.layers import GeluMLP, gelu_tanh


def _inputs():
    """The whole range (both saturated tails, the kernel's cut-off near |2z| = 24) and typical
    activations, in an odd-sized tensor."""
    return torch.cat([torch.linspace(-40, 40, 200_001), 3 * torch.randn(50_001)]).view(-1, 3)


def test_gelu_tanh_forward_and_backward_match_float64():
    x = _inputs().requires_grad_()
    g = torch.randn_like(x)
    y = gelu_tanh(x)
    (dx,) = torch.autograd.grad(y, x, g)
    x64 = x.detach().double().requires_grad_()
    want = F.gelu(x64, approximate="tanh")
    (want_dx,) = torch.autograd.grad(want, x64, g.double())
    assert y.dtype == torch.float32 and y.shape == x.shape
    # torch's own float32 kernels: 4.3e-7 and 2.6e-6 on these inputs
    assert (y.double() - want).abs().max() < 1e-6
    assert (dx.double() - want_dx).abs().max() < 2e-6
    # relative accuracy in the negative tail, where 0.5 x (1 + tanh z) cancels
    tail = (x.detach() < -2) & (x.detach() > -5)
    assert ((y.double() - want) / want)[tail].abs().max() < 1e-5


def test_gelu_tanh_is_used_by_the_mlp_and_falls_back_off_float32():
    assert gelu_tanh(torch.randn(4)).grad_fn is None  # no autograd.Function without grad
    x = torch.randn(2, 5, 8, requires_grad=True)
    assert type(gelu_tanh(x).grad_fn).__name__ == "GeluTanhBackward"
    b = torch.randn(3, 7).bfloat16()
    torch.testing.assert_close(gelu_tanh(b), F.gelu(b, approximate="tanh"))
    cfg = dataclasses.replace(PRESETS["tiny"], mlp="gelu")
    mlp = GeluMLP(cfg)
    h = torch.randn(2, 5, cfg.n_embd)
    want = mlp.down_proj(F.gelu(mlp.up_proj(h), approximate="tanh"))
    torch.testing.assert_close(mlp(h), want, rtol=1e-5, atol=1e-6)


def test_gelu_tanh_gradcheck_in_float32_steps():
    x = torch.linspace(-6, 6, 97).requires_grad_()
    y = GeluTanh.apply(x)
    (dx,) = torch.autograd.grad(y.sum(), x)
    h = 1e-3  # central differences of the float64 function at the same points
    x64 = x.detach().double()
    fd = (F.gelu(x64 + h, approximate="tanh") - F.gelu(x64 - h, approximate="tanh")) / (2 * h)
    torch.testing.assert_close(dx.double(), fd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_keep_mask_drops_p_and_scales_the_rest(p):
    torch.manual_seed(0)
    m = keep_mask((1001, 999), p)  # odd size: the last draw fills one element
    kept = m > 0
    assert abs(1 - kept.float().mean().item() - p) < 0.003
    assert torch.equal(m[kept], torch.full_like(m[kept], 1 / (1 - p)))
    assert abs(m.double().mean().item() - 1.0) < 0.005  # the expectation is kept
    # adjacent elements (two halves of one 64-bit draw, or two draws) are independent
    a, b = kept.view(-1)[:-1:2].float(), kept.view(-1)[1::2].float()
    assert abs((a * b).mean().item() - (1 - p) ** 2) < 0.003
    assert (
        abs((kept.view(-1)[:-1].float() * kept.view(-1)[1:].float()).mean() - (1 - p) ** 2) < 0.003
    )


def test_keep_mask_is_seeded_fresh_per_call_and_independent_of_threads():
    torch.manual_seed(4)
    a, b = keep_mask((64, 33), 0.3), keep_mask((64, 33), 0.3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.manual_seed(4)
        c = keep_mask((64, 33), 0.3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, c) and not torch.equal(a, b)
    assert keep_mask((0, 5), 0.3).shape == (0, 5)
    assert torch.equal(keep_mask((3, 3), 1.0), torch.zeros(3, 3))
    assert torch.equal(keep_mask((3,), 0.0), torch.ones(3))


@pytest.mark.slow
def test_under_torch_compile_the_mlp_and_dropout_use_torch_ops():
    """numba cannot be traced: compiled code takes F.gelu and torch.rand masks, with no graph
    break (fullgraph=True fails on one), and matches eager where there is no randomness."""
    cfg = dataclasses.replace(PRESETS["tiny"], mlp="gelu", dropout=0.2)
    torch.manual_seed(0)
    mlp = GeluMLP(cfg)
    compiled = torch.compile(mlp, fullgraph=True)
    x = torch.randn(2, 5, cfg.n_embd, requires_grad=True)
    y = compiled(x)
    y.sum().backward()
    assert x.grad.isfinite().all() and (y == 0).any()  # dropout ran
    mlp.eval()
    torch.testing.assert_close(compiled(x), mlp(x), rtol=1e-5, atol=1e-6)
