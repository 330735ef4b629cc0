"""LoRA (model/lora.py) and the classifier head (model/heads.py)."""

import pytest
import torch
from finetune_helpers import CFG
from torch import nn

from pellucid.errors import ConfigError
from pellucid.infer.quant import quantize_model
from pellucid.model.heads import Classifier, last_real_index, train_last_blocks
from pellucid.model.lora import (
    LoRALinear,
    adapters_disabled,
    apply_lora,
    lora_layers,
    merge_lora,
    remove_lora,
    unmerge_lora,
)
from pellucid.model.transformer import Transformer


def _model(seed=0):
    torch.manual_seed(seed)
    return Transformer(CFG).eval()


def _ids(B=2, T=12, seed=1):
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def _train_b(model):
    """Give every adapter a non-zero B, as training would."""
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_B.normal_(std=0.05)


def test_zero_initialised_b_leaves_logits_unchanged_and_only_adapters_train():
    model, ids = _model(), _ids()
    before = model(ids)
    wrapped = apply_lora(model, rank=4, alpha=8)
    assert len(wrapped) == CFG.n_layer * 7  # q k v o gate up down in every block
    assert torch.equal(model(ids), before)  # bit for bit at step 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)


def test_targets_are_name_patterns():
    model = _model()
    assert apply_lora(model, targets=["blocks.1.attn.*_proj"], rank=2) == [
        f"blocks.1.attn.{p}_proj" for p in "qkvo"
    ]
    with pytest.raises(ConfigError, match="match no module"):
        apply_lora(_model(), targets=["nothing"])


def test_merge_equals_adapter_and_unmerge_restores_the_base():
    model, ids = _model(), _ids()
    base = {n: p.clone() for n, p in model.state_dict().items()}
    base_logits = model(ids)
    apply_lora(model, rank=4, alpha=8)
    _train_b(model)
    adapted = model(ids)
    assert (adapted - base_logits).abs().max() > 1e-3  # the adapter does change the model
    merge_lora(model)
    torch.testing.assert_close(model(ids), adapted, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    for name, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            torch.testing.assert_close(layer.base.weight, base[f"{name}.weight"], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(ids), adapted, rtol=1e-5, atol=1e-5)  # adapter path again
    plain = remove_lora(model)
    assert not lora_layers(plain) and set(plain.state_dict()) == set(base)
    torch.testing.assert_close(plain(ids), adapted, rtol=1e-5, atol=1e-5)


def test_adapters_disabled_gives_the_base_model():
    model, ids = _model(), _ids()
    reference = model(ids)
    apply_lora(model, rank=4)
    _train_b(model)
    with adapters_disabled(model):
        assert torch.equal(model(ids), reference)
    assert not torch.allclose(model(ids), reference)
    merge_lora(model)
    with pytest.raises(ConfigError, match="unmerged"), adapters_disabled(model):
        pass


def test_lora_on_quantized_layers_is_refused_by_name():
    model = quantize_model(_model(), "q8")
    with pytest.raises(ConfigError, match="quantized layers are for inference only"):
        apply_lora(model)


@pytest.mark.parametrize("bad", [{"rank": 0}, {"alpha": 0}, {"p_drop": 1.0}])
def test_bad_lora_settings(bad):
    with pytest.raises(ConfigError):
        apply_lora(_model(), **bad)


def test_classifier_reads_the_last_real_token_under_both_paddings():
    torch.manual_seed(0)
    clf = Classifier(_model(), n_labels=3).eval()
    texts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    T = 7
    right = torch.zeros(3, T, dtype=torch.long)
    left = torch.zeros(3, T, dtype=torch.long)
    seg_r, seg_l = torch.zeros_like(right), torch.zeros_like(left)
    for b, t in enumerate(texts):
        right[b, : len(t)], seg_r[b, : len(t)] = torch.tensor(t), 1
        left[b, T - len(t) :], seg_l[b, T - len(t) :] = torch.tensor(t), 1
    assert (
        last_real_index(seg_r).tolist() == [4, 1, 2] and last_real_index(seg_l).tolist() == [6] * 3
    )
    with torch.no_grad():
        out_r, out_l = clf(right, segments=seg_r), clf(left, segments=seg_l)
        alone = torch.cat(
            [
                clf(torch.tensor([t]), segments=torch.ones(1, len(t), dtype=torch.long))
                for t in texts
            ]
        )
        # by hand: the head on the trunk's hidden state at each text's last token, run alone
        by_hand = torch.stack(
            [clf.head(clf.trunk.forward_hidden(torch.tensor([t]))[0, -1]) for t in texts]
        )
    torch.testing.assert_close(out_r, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_l, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone, by_hand, rtol=1e-5, atol=1e-5)


def test_train_last_blocks_freezes_the_rest():
    clf = Classifier(_model(), n_labels=2)
    train_last_blocks(clf, 1)
    trainable = {
        n.split(".")[0] + "." + n.split(".")[1]
        for n, p in clf.named_parameters()
        if p.requires_grad
    }
    assert trainable == {"head.weight", "head.bias", "trunk.norm", "trunk.blocks"}
    assert all(
        p.requires_grad == n.startswith(("head", "trunk.norm", f"trunk.blocks.{CFG.n_layer - 1}."))
        for n, p in clf.named_parameters()
    )
    assert isinstance(clf.head, nn.Linear)
