"""docs/math.md, checked: each function against its formula worked out by hand on small numbers."""

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from pellucid.data.batches import IGNORE_INDEX, Batch
from pellucid.data.shards import Shards
from pellucid.infer.sampling import (
    apply_repetition_penalty,
    min_p_filter,
    probabilities,
    sample,
    top_k_filter,
    top_p_filter,
)
from pellucid.model.config import PRESETS
from pellucid.model.layers import (
    Dropout,
    GeluMLP,
    SwiGLU,
    apply_rope,
    explicit_attention,
    make_norm,
    rope_tables,
    sinusoid_table,
)
from pellucid.model.transformer import Transformer
from pellucid.train.objectives import lm_loss
from pellucid.train.optim import build_optimizer, lr_at
from pellucid.train.trainer import TrainConfig, _clip

E = math.e


def close(a, b, tol=1e-5):
    return torch.testing.assert_close(
        torch.as_tensor(a, dtype=torch.float32),
        torch.as_tensor(b, dtype=torch.float32),
        atol=tol,
        rtol=tol,
    )


def test_every_test_named_in_the_doc_exists():
    doc = (Path(__file__).parents[1] / "docs" / "math.md").read_text()
    named = set(re.findall(r"`(test_\w+)`", doc))
    assert len(named) >= 20
    assert named <= set(globals()), named - set(globals())


# --- inference ----------------------------------------------------------------------------------


def test_embedding_is_a_table_lookup():
    model = Transformer(dataclasses.replace(PRESETS["tiny"], pos="rope", dropout=0.0)).eval()
    ids = torch.tensor([[3, 1, 3]])
    close(model.tok_emb(ids)[0], model.tok_emb.weight[[3, 1, 3]])


def test_sinusoid_table():
    t = sinusoid_table(4, 3)  # C = 4: frequencies 1 and 1/100
    close(t[2], [math.sin(2), math.cos(2), math.sin(0.02), math.cos(0.02)])


def test_rope_rotates_pairs():
    cos, sin = rope_tables(head_dim=4, context_len=3, theta=10000.0)  # angles p*1, p*0.01
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])  # pairs (x0, x2) = (1, 3) and (x1, x3) = (2, 4)
    y = apply_rope(x, cos[2], sin[2])
    a, b = 2.0, 0.02
    want = [
        1 * math.cos(a) - 3 * math.sin(a),
        2 * math.cos(b) - 4 * math.sin(b),
        3 * math.cos(a) + 1 * math.sin(a),
        4 * math.cos(b) + 2 * math.sin(b),
    ]
    close(y, want)
    assert y.norm().item() == pytest.approx(x.norm().item(), rel=1e-6)  # a rotation keeps lengths


def test_layernorm():
    cfg = dataclasses.replace(PRESETS["tiny"], norm="layernorm", norm_eps=1e-12)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mean, var = 2.5, 1.25  # biased variance: ((1.5^2 + 0.5^2) * 2) / 4
    close(make_norm(cfg, 4)(x), [(v - mean) / math.sqrt(var) for v in x.tolist()])


def test_rmsnorm():
    cfg = dataclasses.replace(PRESETS["tiny"], norm="rmsnorm", norm_eps=1e-12)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    rms = math.sqrt((1 + 4 + 9 + 16) / 4)
    close(make_norm(cfg, 4)(x), [v / rms for v in x.tolist()])


def test_causal_attention_by_hand():
    # one head, D = 1, two tokens: q = k = v = [1, 2]
    q = k = torch.tensor([1.0, 2.0]).view(1, 1, 2, 1)
    v = torch.tensor([10.0, 20.0]).view(1, 1, 2, 1)
    out, w = explicit_attention(q, k, v, None)
    # row 0 sees only key 0; row 1 sees scores [2*1, 2*2] / sqrt(1) = [2, 4]
    p = [E**2 / (E**2 + E**4), E**4 / (E**2 + E**4)]
    close(w[0, 0], [[1.0, 0.0], p])
    close(out[0, 0, :, 0], [10.0, 10 * p[0] + 20 * p[1]])


def _mlp_config(mlp: str):
    """A 2-wide config with a 2-wide MLP, small enough to work out by hand."""
    return dataclasses.replace(
        PRESETS["tiny"],
        n_embd=2,
        ffn_dim=2,
        n_head=1,
        n_kv_head=1,
        mlp=mlp,
        bias=False,
        dropout=0.0,
    )


def _set(linear: nn.Linear, rows: list[list[float]]) -> None:
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(rows))


def test_gelu_mlp():
    cfg = _mlp_config("gelu")
    mlp = GeluMLP(cfg)
    _set(mlp.up_proj, [[1, 0], [0, 1]])
    _set(mlp.down_proj, [[1, 0], [0, 1]])

    def gelu(u):
        return 0.5 * u * (1 + math.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))

    close(mlp(torch.tensor([0.5, -1.0])), [gelu(0.5), gelu(-1.0)])


def test_swiglu():
    cfg = _mlp_config("swiglu")
    mlp = SwiGLU(cfg)
    _set(mlp.gate_proj, [[1, 0], [0, 1]])
    _set(mlp.up_proj, [[2, 0], [0, 3]])
    _set(mlp.down_proj, [[1, 1], [0, 1]])

    def silu(u):
        return u / (1 + math.exp(-u))

    h = [silu(1.0) * 2.0, silu(-2.0) * -6.0]
    close(mlp(torch.tensor([1.0, -2.0])), [h[0] + h[1], h[1]])


def test_softmax_with_temperature():
    z = torch.tensor([[1.0, 2.0, 3.0]])
    s = E**0.5 + E**1 + E**1.5
    close(probabilities(z, 2.0)[0], [E**0.5 / s, E**1 / s, E**1.5 / s])
    close(probabilities(z, 0.0)[0], [0.0, 0.0, 1.0])  # greedy


def test_repetition_penalty():
    z = torch.tensor([[2.0, -2.0, 2.0]])
    seen = torch.tensor([[True, True, False]])
    close(apply_repetition_penalty(z, seen, 2.0)[0], [1.0, -4.0, 2.0])


def test_top_k_keeps_exactly_k():
    z = torch.tensor([[1.0, 3.0, 3.0, 2.0]])
    out = top_k_filter(z, 2)[0]
    assert torch.isfinite(out).sum() == 2 and out[1] == 3 and out[2] == 3


def test_top_p_smallest_set():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = top_p_filter(p.log(), 0.8)[0]
    # mass above each token: 0, 0.5, 0.8, 0.95 -> keep the first two (0.5 + 0.3 reaches 0.8)
    assert torch.isfinite(out).tolist() == [True, True, False, False]
    out = top_p_filter(p.log(), 0.81)[0]
    assert torch.isfinite(out).tolist() == [True, True, True, False]


def test_min_p():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = min_p_filter(p.log(), 0.3)[0]  # keep p >= 0.3 * 0.5 = 0.15
    assert torch.isfinite(out).tolist() == [True, True, True, False]


def test_inverse_cdf_sampling():
    probs = torch.tensor([[0.2, 0.5, 0.3]])  # CDF 0.2, 0.7, 1.0
    g = torch.Generator().manual_seed(0)
    u = torch.rand(1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).item()
    want = 0 if u < 0.2 else (1 if u < 0.7 else 2)
    assert sample(probs, g).item() == want
    draws = sample(probs.expand(20000, 3), torch.Generator().manual_seed(1)).flatten()
    freq = torch.bincount(draws, minlength=3) / 20000
    close(freq, [0.2, 0.5, 0.3], tol=0.02)


# --- learning -----------------------------------------------------------------------------------


class _Fixed(nn.Module):
    """A 'model' whose logits are fixed, to check the loss alone."""

    def __init__(self, logits):
        super().__init__()
        self.z = logits

    def forward(self, ids):
        return self.z


def test_cross_entropy_by_hand():
    z = torch.tensor([[[0.0, math.log(3.0)], [math.log(4.0), 0.0]]])  # p(1) = 3/4; p(0) = 4/5
    batch = Batch(
        inputs=torch.zeros(1, 2, dtype=torch.long), targets=torch.tensor([[1, IGNORE_INDEX]])
    )
    out = lm_loss(_Fixed(z), batch)
    assert out.n_targets == 1
    close(out.loss_sum, -math.log(3 / 4))
    batch = Batch(inputs=torch.zeros(1, 2, dtype=torch.long), targets=torch.tensor([[1, 0]]))
    close(lm_loss(_Fixed(z), batch).loss_sum, -math.log(3 / 4) - math.log(4 / 5))


def test_bits_per_byte():
    s = Shards(Path("."), None, None, {"val_tokens": 100, "val_bytes": 400})
    assert s.bits_per_byte(2.0) == pytest.approx(2.0 * 100 / (400 * math.log(2)))


def test_dropout_scaling():
    drop = Dropout(0.25).train()
    x = torch.ones(10000)
    y = drop(x)
    assert all(v == 0 or v == pytest.approx(1 / 0.75) for v in y.unique().tolist())
    assert (y == 0).float().mean() == pytest.approx(0.25, abs=0.02)
    assert torch.equal(drop.eval()(x), x)


def test_adamw_two_steps_by_hand():
    lr, wd, b1, b2, eps = 0.1, 0.5, 0.9, 0.99, 1e-8
    model = nn.Linear(1, 1, bias=True)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(1.0)
    cfg = TrainConfig(lr=lr, weight_decay=wd, betas=(b1, b2), eps=eps)
    opt = build_optimizer(model, cfg)
    w = bvar = 1.0
    mw = vw = mb = vb = 0.0
    for t, g in enumerate([2.0, -1.0], start=1):
        model.weight.grad = torch.tensor([[g]])
        model.bias.grad = torch.tensor([g])
        opt.step()
        mw, vw = b1 * mw + (1 - b1) * g, b2 * vw + (1 - b2) * g * g
        w = w - lr * wd * w - lr * (mw / (1 - b1**t)) / (math.sqrt(vw / (1 - b2**t)) + eps)
        mb, vb = b1 * mb + (1 - b1) * g, b2 * vb + (1 - b2) * g * g
        bvar = bvar - lr * (mb / (1 - b1**t)) / (math.sqrt(vb / (1 - b2**t)) + eps)  # no decay
        assert model.weight.item() == pytest.approx(w, rel=1e-6)
        assert model.bias.item() == pytest.approx(bvar, rel=1e-6)


def test_warmup_then_cosine():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=14)
    assert [lr_at(s, cfg) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_at(13, cfg) == pytest.approx(0.1)  # the last step
    assert lr_at(4 + 9 // 2, cfg) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 9))
    )


def test_clipping():
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])  # norm 5
    norm = _clip([p], 1.0)
    assert norm.item() == pytest.approx(5.0)
    close(p.grad, [0.6, 0.8])
    p.grad = torch.tensor([0.3, 0.4])
    _clip([p], 1.0)
    close(p.grad, [0.3, 0.4])  # below the limit: unchanged
