"""The transformer: shapes for every architecture choice, causality, both attention paths,
training behaviour (overfitting, dropout), parameter and FLOP counts, loading by assignment."""

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from pellucid.errors import PellucidError, WeightsFormatError
from pellucid.model.config import PRESETS, ModelConfig
from pellucid.model.heads import Classifier, ScalarHead, train_last_blocks
from pellucid.model.layers import Trace, apply_rope, rope_tables
from pellucid.model.transformer import Transformer, eval_mode

SMALL = {"vocab_size": 50, "context_len": 24, "n_layer": 2, "n_head": 4, "n_embd": 32}


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def make(**changes) -> Transformer:
    return Transformer(ModelConfig(**{**SMALL, **changes})).eval()


def ids_for(model: Transformer, B: int = 2, T: int = 10) -> torch.Tensor:
    return torch.randint(0, model.cfg.vocab_size, (B, T))


COMBOS = list(
    itertools.product(
        ["learned", "sinusoidal", "rope"],
        ["layernorm", "rmsnorm"],
        ["gelu", "swiglu"],
        [4, 2, 1],  # n_kv_head: multi-head, grouped-query, multi-query
        [False, True],  # qk_norm
        [False, True],  # tie_embeddings
    )
)


@pytest.mark.parametrize(("pos", "norm", "mlp", "n_kv_head", "qk_norm", "tied"), COMBOS)
def test_shapes_for_every_architecture(pos, norm, mlp, n_kv_head, qk_norm, tied):
    model = make(
        pos=pos,
        norm=norm,
        mlp=mlp,
        n_kv_head=n_kv_head,
        qk_norm=qk_norm,
        tie_embeddings=tied,
        bias=norm == "layernorm",
    )
    ids = ids_for(model, B=3, T=7)
    logits = model(ids)
    assert logits.shape == (3, 7, 50)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert model.forward_hidden(ids).shape == (3, 7, 32)
    assert (model.lm_head.weight is model.tok_emb.weight) == tied
    assert model.num_params() == sum(p.numel() for p in set(model.parameters()))


def test_forward_is_logits_of_hidden():
    model = make()
    ids = ids_for(model)
    torch.testing.assert_close(model(ids), model.logits(model.forward_hidden(ids)), rtol=0, atol=0)


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope"])
def test_causality(pos):
    model = make(pos=pos, n_kv_head=2, qk_norm=True)
    ids = ids_for(model, T=12)
    changed = ids.clone()
    changed[:, 8] = (ids[:, 8] + 1) % model.cfg.vocab_size
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize(("pos", "n_kv_head"), [("learned", 4), ("rope", 2), ("sinusoidal", 1)])
def test_explicit_attention_equals_sdpa(pos, n_kv_head):
    model = make(pos=pos, n_kv_head=n_kv_head, qk_norm=True)
    ids = ids_for(model, T=9)
    trace = Trace()
    traced = model(ids, trace=trace)
    torch.testing.assert_close(traced, model(ids), rtol=0, atol=1e-5)
    assert len(trace.attn_weights) == len(trace.residuals) == 2
    for weights in trace.attn_weights:
        assert weights.shape == (2, 4, 9, 9)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 9))
        assert (weights.triu(diagonal=1) == 0).all()  # no weight on future tokens


def test_trace_reproduces_the_first_block():
    """weights @ V, projected and added to the residual, then the MLP, gives the traced residual."""
    model = make(n_kv_head=2)
    ids = ids_for(model, T=6)
    trace = Trace()
    model(ids, trace=trace)
    block, x = model.blocks[0], trace.embeddings
    B, T, _ = x.shape
    v = block.attn.v_proj(block.attn_norm(x)).view(B, T, 2, 8).transpose(1, 2)  # (B, K, T, D)
    v = v.repeat_interleave(2, dim=1)  # each K/V head serves 2 query heads
    y = (trace.attn_weights[0] @ v).transpose(1, 2).reshape(B, T, 32)
    h = x + block.attn.o_proj(y)
    expected = h + block.mlp(block.mlp_norm(h))
    torch.testing.assert_close(expected, trace.residuals[0], rtol=0, atol=1e-5)


def test_rope_matches_the_rotate_half_formula():
    """Position p rotates dims (i, i + D/2) by angle p * theta^(-2i/D), as Hugging Face Llama does."""
    D, theta = 8, 100.0
    cos, sin = rope_tables(D, 16, theta)
    x = torch.randn(1, 1, 16, D)
    y = apply_rope(x, cos, sin)
    p, i = 5, 1
    angle = p * theta ** (-2 * i / D)
    a, b = x[0, 0, p, i], x[0, 0, p, i + D // 2]
    torch.testing.assert_close(y[0, 0, p, i], a * math.cos(angle) - b * math.sin(angle))
    torch.testing.assert_close(y[0, 0, p, i + D // 2], b * math.cos(angle) + a * math.sin(angle))
    # Rotations keep lengths, and relative positions are all that queries and keys see.
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))


def test_tiny_model_overfits_one_batch():
    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=32, context_len=16)
    model = Transformer(cfg).train()
    ids = torch.randint(0, 32, (4, 17))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(150):
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_dropout_only_in_training():
    model = make(dropout=0.3)
    plain = make(dropout=0.0)
    plain.load_state_dict(model.state_dict())
    ids = ids_for(model)
    model.train()
    assert not torch.equal(model(ids), model(ids))
    model.eval()
    torch.testing.assert_close(model(ids), model(ids), rtol=0, atol=0)
    torch.testing.assert_close(model(ids), plain(ids), rtol=0, atol=0)


def test_num_params_and_flops_by_hand():
    cfg = ModelConfig(**SMALL, n_kv_head=2, mlp="swiglu", ffn_dim=64, qk_norm=True)
    model = Transformer(cfg)
    C, V, D, H, K, F_, L = 32, 50, 8, 4, 2, 64, 2
    per_layer = C * H * D + 2 * C * K * D + H * D * C + 3 * C * F_ + 2 * C + 2 * D
    n = L * per_layer + C + V * C  # + final norm + tied embedding/head
    assert model.num_params() == n
    assert model.num_params(exclude_embeddings=True) == n - V * C
    assert model.flops_per_token() == 6 * n + 12 * L * H * D * 24
    assert model.flops_per_token(context_len=100) == 6 * n + 12 * L * H * D * 100
    # Untied: the output head is a matmul (counted), the token table a lookup (not counted);
    # a learned position table is a lookup too.
    untied = Transformer(dataclasses.replace(cfg, tie_embeddings=False, pos="learned"))
    assert untied.num_params() == n + V * C + 24 * C
    assert untied.flops_per_token() == model.flops_per_token()


def test_frozen_weights_cost_four_flops_or_two_not_six():
    # A LoRA run's frozen base needs no weight gradient: counting it at 6N put fine-tuning MFU
    # above 100% ("MFU 122.6%" in a LoRA SFT log).
    cfg = ModelConfig(**SMALL, n_kv_head=2, mlp="swiglu", ffn_dim=64, qk_norm=True)
    model = Transformer(cfg)
    full = model.flops_per_token()
    frozen = 0
    for block in model.blocks[:1]:
        for p in block.parameters():
            p.requires_grad_(False)
            frozen += p.numel()
    assert model.flops_per_token() == full - 2 * frozen  # the embedding trains: gradient flows
    # Only the last of the 2 blocks trains (as a classifier's --train-last 1): the first block is
    # forward only (2 FLOPs per weight and a third of its attention), the frozen norm and tied
    # head above it still pass a gradient down (4 per weight).
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.blocks[-1].parameters():
        p.requires_grad_(True)
    first = sum(p.numel() for p in model.blocks[0].parameters())
    rest = (
        sum(p.numel() for p in model.parameters())
        - first
        - sum(p.numel() for p in model.blocks[-1].parameters())
    )
    attention = 12 * 4 * 8 * 24  # 12 H D T
    assert model.flops_per_token() == full - 4 * first - attention * 2 / 3 - 2 * rest
    # the forward is the forward whatever trains (explain reports it for a LoRA run's model too)
    assert model.forward_flops_per_token() * 3 == full
    untied = Transformer(dataclasses.replace(cfg, tie_embeddings=False, pos="learned"))
    before = untied.flops_per_token()
    untied.tok_emb.weight.requires_grad_(False)  # a lookup table: never counted, frozen or not
    assert untied.flops_per_token() == before


def test_classifier_and_reward_model_flops_leave_out_the_unused_output_head():
    # They read hidden states and never run the LM head (V x C, a fifth of SmolLM2's matmul
    # weights): counting it logged a bf16 classify run at "MFU 97%".
    cfg = ModelConfig(**SMALL, n_kv_head=2, mlp="swiglu", ffn_dim=64, qk_norm=True)
    V, C = 50, 32
    clf, rm = Classifier(Transformer(cfg), n_labels=3), ScalarHead(Transformer(cfg))
    full = clf.trunk.flops_per_token()
    assert clf.flops_per_token() == full - 6 * V * C + 6 * 3 * C
    assert rm.flops_per_token(context_len=10) == rm.trunk.flops_per_token(10) - 6 * V * C + 6 * C
    assert clf.trunk.forward_flops_per_token(head=False) == clf.trunk.forward_flops_per_token() - (
        2 * V * C
    )
    value = ScalarHead(Transformer(cfg), value_head=True)  # PPO: the policy's head runs as well
    assert value.flops_per_token() == value.trunk.flops_per_token() + 6 * C
    train_last_blocks(clf, 1)  # the frozen tied head would cost 4 per weight: it costs nothing
    assert clf.flops_per_token() == clf.trunk.flops_per_token() - 4 * V * C + 6 * 3 * C


def test_gpt2_flops_match_nanogpt():
    """nanoGPT's estimate for GPT-2 124M at T=1024: 6 * 123.69M + 12 * 12 * 12 * 64 * 1024."""
    with torch.device("meta"):
        model = Transformer(PRESETS["gpt2-124m"])
    n = model.num_params() - 1024 * 768  # nanoGPT's get_num_params() drops the position table
    assert model.flops_per_token() == 6 * n + 12 * 12 * 12 * 64 * 1024
    assert abs(model.flops_per_token() / 1e6 - 855.4) < 0.1


def test_init_scales_residual_projections():
    model = Transformer(dataclasses.replace(PRESETS["tiny"], n_layer=8, n_embd=256, n_head=4))
    assert abs(model.blocks[0].attn.q_proj.weight.std().item() - 0.02) < 0.002
    expected = 0.02 / math.sqrt(16)
    assert abs(model.blocks[0].attn.o_proj.weight.std().item() - expected) < 0.001
    assert abs(model.blocks[3].mlp.down_proj.weight.std().item() - expected) < 0.001


def test_parameter_names_are_stable():
    names = set(make(mlp="swiglu", qk_norm=True, pos="learned", tie_embeddings=False).state_dict())
    for name in [
        "tok_emb.weight",
        "pos_emb.weight",
        "blocks.0.attn_norm.weight",
        "blocks.0.attn.q_proj.weight",
        "blocks.0.attn.k_proj.weight",
        "blocks.0.attn.v_proj.weight",
        "blocks.0.attn.o_proj.weight",
        "blocks.0.attn.q_norm.weight",
        "blocks.0.attn.k_norm.weight",
        "blocks.1.mlp_norm.weight",
        "blocks.1.mlp.gate_proj.weight",
        "blocks.1.mlp.up_proj.weight",
        "blocks.1.mlp.down_proj.weight",
        "norm.weight",
        "lm_head.weight",
    ]:
        assert name in names
    # Derived tables (RoPE, sinusoids) are never saved.
    assert not any(
        "cos" in n or "sin" in n or "table" in n for n in make(pos="sinusoidal").state_dict()
    )


@pytest.mark.parametrize(
    ("pos", "tied"), [("rope", True), ("sinusoidal", False), ("learned", True)]
)
def test_from_weights_assigns_without_copying(pos, tied):
    model = make(pos=pos, tie_embeddings=tied, n_kv_head=2)
    tensors = dict(model.state_dict())
    if tied:
        del tensors["lm_head.weight"]  # tied files store the matrix once
    loaded = Transformer.from_weights(model.cfg, tensors).eval()
    ids = ids_for(model)
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    assert (loaded.lm_head.weight is loaded.tok_emb.weight) == tied
    assert (
        loaded.blocks[0].attn.q_proj.weight.data_ptr()
        == tensors["blocks.0.attn.q_proj.weight"].data_ptr()
    )


def test_from_weights_names_what_does_not_fit():
    model = make()
    tensors = dict(model.state_dict())
    del tensors["blocks.1.attn.q_proj.weight"]
    tensors["extra.weight"] = torch.zeros(1)
    with pytest.raises(
        WeightsFormatError,
        match=r"missing \['blocks.1.attn.q_proj.weight'\], unexpected \['extra.weight'\]",
    ):
        Transformer.from_weights(model.cfg, tensors)
    tensors = dict(model.state_dict())
    tensors["norm.weight"] = torch.ones(33)
    with pytest.raises(WeightsFormatError, match=r"'norm.weight' has shape \[33\]") as err:
        Transformer.from_weights(model.cfg, tensors)
    assert "\n" not in str(err.value)


def test_too_long_input_is_a_clear_error():
    model = make()
    with pytest.raises(PellucidError, match="context length exceeded"):
        model(torch.zeros(1, 25, dtype=torch.long))


def test_bfloat16_autocast_still_gives_float32_logits():
    model = make(n_kv_head=2)
    ids = ids_for(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
    assert logits.dtype == torch.float32
    assert (logits.argmax(-1) == model(ids).argmax(-1)).float().mean() > 0.8


def test_eval_mode_turns_dropout_off_inside_and_restores_the_mode_even_on_an_error():
    model = Transformer(PRESETS["tiny"])
    for mode in (True, False):
        model.train(mode)
        with pytest.raises(KeyError), eval_mode(model) as m:
            assert m is model and not any(x.training for x in model.modules())
            raise KeyError("an error inside")
        assert all(x.training == mode for x in model.modules())
