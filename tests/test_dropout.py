"""The model's dropout: right statistics, identity in eval, dtype kept, used on every path."""

import dataclasses

import torch

from pellucid.model.config import PRESETS
from pellucid.model.layers import Dropout, dropout
from pellucid.model.transformer import Transformer


def test_drops_p_of_the_elements_and_rescales_the_rest():
    torch.manual_seed(0)
    x = torch.ones(200_000, requires_grad=True)
    y = dropout(x, 0.2)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - 0.2) < 0.005
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1.25))
    assert abs(y.mean().item() - 1.0) < 0.01  # expectation preserved
    y.sum().backward()  # the gradient flows through the kept elements only, scaled the same
    assert torch.equal(x.grad, (kept * 1.25).float())


def test_identity_in_eval_and_at_p_zero_and_keeps_the_dtype():
    x = torch.randn(4, 8)
    assert dropout(x, 0.5, training=False) is x and dropout(x, 0.0) is x
    layer = Dropout(0.5).eval()
    assert layer(x) is x
    assert dropout(x.bfloat16(), 0.5).dtype == torch.bfloat16


def test_model_dropout_is_seeded_and_off_in_eval():
    cfg = dataclasses.replace(PRESETS["tiny"], dropout=0.3)
    torch.manual_seed(0)
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    torch.manual_seed(5)
    a = model(ids)
    torch.manual_seed(5)
    b = model(ids)
    c = model(ids)
    assert torch.equal(a, b) and not torch.equal(b, c)  # seeded masks, fresh each call
    model.eval()
    assert torch.equal(model(ids), model(ids))
    no_drop = Transformer(dataclasses.replace(cfg, dropout=0.0)).eval()
    no_drop.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(ids), no_drop(ids))
