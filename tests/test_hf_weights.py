"""Hugging Face folders: load GPT-2 / Llama saved by transformers, export ours back, same logits."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pellucid.errors import WeightsFormatError
from pellucid.model.config import ModelConfig
from pellucid.model.transformer import Transformer
from pellucid.weights.hf import config_from_hf, config_to_hf, load_hf, save_hf

transformers = pytest.importorskip("transformers")

VOCAB = 96
IDS = torch.tensor(
    [[5, 17, 3, 88, 42, 0, 61, 7, 7, 19, 95, 2], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
)


def _hf_gpt2(tie=True):
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=32, tie_word_embeddings=tie
    )
    torch.manual_seed(0)
    return _vary_vectors(transformers.GPT2LMHeadModel(cfg).eval())


def _hf_llama(tie=False, bias=False):
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=100_000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        attention_bias=bias,
        mlp_bias=bias,
    )
    torch.manual_seed(0)
    return _vary_vectors(transformers.LlamaForCausalLM(cfg).eval())


def _vary_vectors(model):
    """Random norm gains and biases, so a mix-up cannot hide behind ones and zeros."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


def _hf_logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.float()


def _ours(model, ids=IDS):
    with torch.no_grad():
        return model(ids)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parity
@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_from_transformers_matches_logits(tmp_path, tie):
    hf = _hf_gpt2(tie)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    assert ours.cfg.pos == "learned" and ours.cfg.tie_embeddings is tie
    assert _rel(_ours(ours), _hf_logits(hf)) < 1e-5


@pytest.mark.parity
@pytest.mark.parametrize(("tie", "bias"), [(False, False), (True, True)])
def test_llama_from_transformers_matches_logits(tmp_path, tie, bias):
    hf = _hf_llama(tie, bias)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    assert (ours.cfg.n_kv_head, ours.cfg.rope_theta, ours.cfg.bias) == (2, 100_000.0, bias)
    assert _rel(_ours(ours), _hf_logits(hf)) < 1e-5


@pytest.mark.parity
def test_sharded_checkpoint_loads(tmp_path):
    hf = _hf_llama()
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    assert _rel(_ours(load_hf(tmp_path)), _hf_logits(hf)) < 1e-5


GPT2_LIKE = ModelConfig(
    vocab_size=VOCAB,
    context_len=32,
    n_layer=2,
    n_head=4,
    n_embd=64,
    pos="learned",
    norm="layernorm",
    mlp="gelu",
    bias=True,
)
LLAMA_LIKE = ModelConfig(
    vocab_size=VOCAB,
    context_len=32,
    n_layer=2,
    n_head=4,
    n_kv_head=2,
    n_embd=64,
    ffn_dim=80,
    rope_theta=50_000.0,
    tie_embeddings=False,
)


def _random_model(cfg):
    torch.manual_seed(1)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parity
@pytest.mark.parametrize("cfg", [GPT2_LIKE, LLAMA_LIKE, dataclasses.replace(LLAMA_LIKE, bias=True)])
def test_export_loads_in_transformers_with_same_logits(tmp_path, cfg):
    ours = _random_model(cfg)
    save_hf(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert _rel(_hf_logits(hf), _ours(ours)) < 1e-5
    again = load_hf(tmp_path)  # and back: bit-identical weights
    for name, t in ours.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name


def test_config_mapping_round_trips():
    qwen3_like = dataclasses.replace(LLAMA_LIKE, qk_norm=True, head_dim=32, tie_embeddings=True)
    for cfg in (GPT2_LIKE, LLAMA_LIKE, dataclasses.replace(LLAMA_LIKE, head_dim=32), qwen3_like):
        assert config_from_hf(config_to_hf(cfg)) == cfg


def test_transformers4_style_rope_keys_are_read():
    c = config_to_hf(LLAMA_LIKE)
    del c["rope_parameters"]
    c["rope_scaling"] = None
    assert config_from_hf(c).rope_theta == 50_000.0


@pytest.mark.parametrize(
    "cfg",
    [
        dataclasses.replace(LLAMA_LIKE, qk_norm=True, bias=True),
        dataclasses.replace(GPT2_LIKE, pos="sinusoidal"),
        dataclasses.replace(GPT2_LIKE, n_kv_head=2),
        dataclasses.replace(LLAMA_LIKE, mlp="gelu"),
    ],
)
def test_export_of_an_unrepresentable_model_names_why(cfg):
    with pytest.raises(WeightsFormatError, match="no Hugging Face architecture matches"):
        config_to_hf(cfg)


# --- bad folders ----------------------------------------------------------------------------------


@pytest.fixture
def gpt2_dir(tmp_path):
    _hf_gpt2().save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def _edit_config(folder, **changes):
    c = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    (folder / "config.json").write_text(json.dumps(c))


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"architectures": ["BertForMaskedLM"]}, "unsupported architecture ['BertForMaskedLM']"),
        ({"activation_function": "relu"}, "activation_function='relu' is not supported"),
        ({"n_layer": 10**6}, "n_layer"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"vocab_size": 2**40}, "vocab_size"),
        ({"n_positions": -1}, "context_len"),
        ({"n_head": 5}, "n_embd"),
        ({"n_embd": "64"}, "n_embd"),
        ({"n_layer": None}, "missing key 'n_layer'"),
        # Valid JSON of the wrong shape (each was a traceback from inside the mapping).
        ({"architectures": "GPT2LMHeadModel"}, "'architectures' must be a list"),
        ({"architectures": [3]}, "'architectures[0]' must be a string"),
        ({"rope_scaling": [1.0]}, "'rope_scaling' must be an object"),
        ({"model_type": {"gpt2": 1}}, "'model_type' must be a string"),
    ],
)
def test_bad_config_rejected_before_loading_weights(gpt2_dir, changes, words):
    _edit_config(gpt2_dir, **changes)
    (gpt2_dir / "model.safetensors").write_bytes(b"never read")  # config errors come first
    with pytest.raises(WeightsFormatError, match=r"config\.json") as err:
        load_hf(gpt2_dir)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_unsupported_rope_scaling_named(tmp_path):
    _hf_llama().save_pretrained(tmp_path)
    rope = {"rope_type": "llama3", "rope_theta": 1e5, "factor": 8.0}
    _edit_config(tmp_path, rope_parameters=rope)
    with pytest.raises(WeightsFormatError, match="rope_type='llama3' is not supported"):
        load_hf(tmp_path)


def test_missing_unexpected_and_misshaped_tensors_listed(gpt2_dir):
    tensors = load_file(gpt2_dir / "model.safetensors")
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    tensors["transformer.h.0.ln_2.bias"] = torch.zeros(65)
    tensors["transformer.extra"] = torch.zeros(2)
    save_file(tensors, gpt2_dir / "model.safetensors")
    with pytest.raises(WeightsFormatError) as err:
        load_hf(gpt2_dir)
    msg = str(err.value)
    assert "missing: transformer.h.1.mlp.c_fc.weight[64, 256]" in msg
    assert "unexpected: transformer.extra[2]" in msg
    assert "transformer.h.0.ln_2.bias is [65], needs [64]" in msg


def test_nan_weights_rejected(gpt2_dir):
    tensors = load_file(gpt2_dir / "model.safetensors")
    tensors["transformer.ln_f.weight"][3] = float("nan")
    save_file(tensors, gpt2_dir / "model.safetensors")
    with pytest.raises(WeightsFormatError, match="NaN/Inf"):
        load_hf(gpt2_dir)
    assert load_hf(gpt2_dir, allow_nonfinite=True).norm.weight.isnan().sum() == 1


def test_pickle_only_folder_refused(tmp_path, gpt2_dir):
    (gpt2_dir / "model.safetensors").rename(tmp_path / "elsewhere")
    (gpt2_dir / "pytorch_model.bin").write_bytes(b"\x80\x04evil")
    with pytest.raises(WeightsFormatError, match="pickle-based checkpoints are refused"):
        load_hf(gpt2_dir)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "a/b.safetensors"])
def test_shard_names_cannot_leave_the_folder(gpt2_dir, shard):
    (gpt2_dir / "model.safetensors").unlink()
    index = {"weight_map": {"transformer.wte.weight": shard}}
    (gpt2_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsFormatError, match="invalid shard file name"):
        load_hf(gpt2_dir)


def test_not_a_folder(tmp_path):
    with pytest.raises(WeightsFormatError, match="not a model folder"):
        load_hf(tmp_path / "nope")
