"""Out to the ecosystem: the models pellucid trains by default (the demo's QK-norm architecture,
and the `small` preset without it) leave as Hugging Face folders and GGUF files that other tools
load with the same logits, and come back unchanged."""

import dataclasses
import json

import gguf
import pytest
import torch

from pellucid.cli import main
from pellucid.errors import WeightsFormatError
from pellucid.gguf_reader import read_gguf
from pellucid.model.transformer import Transformer
from pellucid.recipes import DEMO_MODEL, load_run_config
from pellucid.tokenizer.bpe import ENDOFTEXT, Tokenizer
from pellucid.tokenizer.formats import tokenizer_from_gguf_metadata
from pellucid.tokenizer.pretokenize import bytes_to_str
from pellucid.weights.checkpoint import save_checkpoint
from pellucid.weights.gguf import gguf_names, load_gguf, save_gguf
from pellucid.weights.hf import config_to_hf, load_hf, save_hf
from pellucid.weights.resolve import load

Q = gguf.GGMLQuantizationType
TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
    "You are all resolved rather to die than to famish? Resolved. resolved.\n"
) * 8
SAMPLE = "Speak, citizen! Resolved 42 times.\n"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT], 320, special_tokens=[ENDOFTEXT, "<|im_start|>", "<|im_end|>"])


def _demo_cfg(vocab_size):
    """Exactly what `pellucid demo` trains, at a test tokenizer's vocabulary size."""
    cfg = load_run_config(None, DEMO_MODEL).model
    return dataclasses.replace(cfg, vocab_size=vocab_size)


def _small_cfg(vocab_size):
    """`pellucid pretrain`'s default preset (no QK-norm), two blocks deep."""
    return dataclasses.replace(load_run_config().model, vocab_size=vocab_size, n_layer=2)


def _random_model(cfg, seed=0):
    """Random weights, norm gains included, so a mixed-up tensor cannot hide behind ones."""
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.2 if p.dim() == 1 else 0.05))
    return model


def _ids(cfg):
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, cfg.vocab_size, (2, 24), generator=g)


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits.float()


def test_the_demo_architecture_is_qwen3_and_the_default_preset_llama(tok):
    demo = _demo_cfg(tok.vocab_size)
    assert demo.qk_norm and not demo.bias and not demo.tie_embeddings  # what the demo trains
    assert config_to_hf(demo)["architectures"] == ["Qwen3ForCausalLM"]
    assert config_to_hf(_small_cfg(tok.vocab_size))["architectures"] == ["LlamaForCausalLM"]


# --- Hugging Face -------------------------------------------------------------------------------


@pytest.mark.parity
@pytest.mark.parametrize("make", [_demo_cfg, _small_cfg], ids=["demo", "small"])
def test_export_loads_in_transformers_with_equal_logits_and_tokenizer(tmp_path, tok, make):
    transformers = pytest.importorskip("transformers")
    cfg = make(tok.vocab_size)
    ours = _random_model(cfg)
    save_hf(ours, tmp_path, tokenizer=tok)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(theirs).__name__ == ("Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM")
    ids = _ids(cfg)
    torch.testing.assert_close(_logits(theirs, ids), _logits(ours, ids), rtol=1e-5, atol=1e-5)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).encode(SAMPLE) == tok.encode(SAMPLE)
    back = load_hf(tmp_path)  # and back into pellucid: the same config, bit-identical weights
    assert back.cfg == cfg
    for name, t in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name


def _hf_qwen3(transformers, tie):
    """A Qwen3 built by transformers: head_dim unlike n_embd / n_head (as in Qwen3-0.6B), GQA."""
    cfg = transformers.Qwen3Config(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=64,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # the q/k norm gains too: ones would hide a swap of the two
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parity
@pytest.mark.parametrize("tie", [False, True])
def test_qwen3_from_transformers_loads_with_equal_logits(tmp_path, tie):
    transformers = pytest.importorskip("transformers")
    hf = _hf_qwen3(transformers, tie)
    hf.save_pretrained(tmp_path)
    ours = load(tmp_path).model  # through resolve, as every CLI verb loads it
    assert (ours.cfg.qk_norm, ours.cfg.head_dim, ours.cfg.n_kv_head) == (True, 32, 2)
    assert (ours.cfg.rope_theta, ours.cfg.norm_eps, ours.cfg.tie_embeddings) == (1e6, 1e-6, tie)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(ours, ids), _logits(hf, ids), rtol=1e-5, atol=1e-5)


def _qwen3_config(tmp_path, tok, **changes):
    cfg = _demo_cfg(tok.vocab_size)
    save_hf(_random_model(cfg), tmp_path)
    c = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(c | changes))


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"attention_bias": True}, "attention_bias=True is not supported"),
        ({"use_sliding_window": True}, "use_sliding_window=True is not supported"),
        ({"layer_types": ["sliding_attention"] * 4}, "layer_types="),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
    ],
)
def test_qwen3_configs_we_cannot_compute_exactly_are_refused(tmp_path, tok, changes, words):
    _qwen3_config(tmp_path, tok, **changes)
    with pytest.raises(WeightsFormatError) as err:
        load_hf(tmp_path)
    assert words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"bias": True}, "Qwen3ForCausalLM needs bias=False (this model has True)"),
        ({"norm": "layernorm"}, "Qwen3ForCausalLM needs norm=rmsnorm (this model has layernorm)"),
        ({"mlp": "gelu"}, "Qwen3ForCausalLM needs mlp=swiglu (this model has gelu)"),
        ({"pos": "learned"}, "Qwen3ForCausalLM needs pos=rope (this model has learned)"),
    ],
)
def test_export_of_a_qk_norm_model_qwen3_cannot_hold_names_the_field(tok, changes, words):
    cfg = dataclasses.replace(_demo_cfg(tok.vocab_size), **changes)
    with pytest.raises(WeightsFormatError) as err:
        config_to_hf(cfg)
    assert words in str(err.value) and "\n" not in str(err.value)


# --- GGUF ---------------------------------------------------------------------------------------


def _check_tokenizer_metadata(reader, tok, vocab_size):
    """Every tokenizer field as llama.cpp reads it, compared with the tokenizer we wrote."""
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    special = {i: s for s, i in tok.special_tokens.items()}
    want = [special.get(i) or bytes_to_str(b) for i, b in enumerate(tok.vocab)]
    tokens = field("tokenizer.ggml.tokens")
    assert tokens[: tok.vocab_size] == want and len(tokens) == vocab_size
    assert tokens[tok.vocab_size :] == [f"[PAD{i}]" for i in range(tok.vocab_size, vocab_size)]
    types = field("tokenizer.ggml.token_type")
    assert [i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL] == sorted(special)
    assert all(t == gguf.TokenType.UNUSED for t in types[tok.vocab_size :])
    assert field("tokenizer.ggml.merges") == [f"{want[a]} {want[b]}" for a, b in tok.merges]
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert field("tokenizer.ggml.eos_token_id") == tok.eos_id == tok.special_tokens[ENDOFTEXT]


@pytest.mark.parametrize("pad", [0, 5], ids=["exact", "padded_vocab"])
def test_demo_gguf_is_qwen3_with_every_tensor_and_the_tokenizer_intact(tmp_path, tok, pad):
    cfg = _demo_cfg(tok.vocab_size + pad)
    ours = _random_model(cfg)
    path = save_gguf(ours, tmp_path / "demo.gguf", tokenizer=tok, chat_template="{{ m }}")
    reader = gguf.GGUFReader(path)  # the reference reader, not ours
    assert reader.fields["general.architecture"].contents() == "qwen3"
    assert reader.fields["qwen3.attention.key_length"].contents() == cfg.head_dim
    assert reader.fields["qwen3.attention.head_count_kv"].contents() == cfg.n_kv_head
    assert reader.fields["tokenizer.chat_template"].contents() == "{{ m }}"
    state, names = ours.state_dict(), gguf_names(cfg)
    assert {t.name for t in reader.tensors} == set(names.values())
    assert "blk.3.attn_q_norm.weight" in names.values() and "output.weight" in names.values()
    for theirs_name, ours_name in {g: o for o, g in names.items()}.items():
        t = next(t for t in reader.tensors if t.name == theirs_name)
        assert t.tensor_type == Q.F32
        assert tuple(int(n) for n in t.shape[::-1]) == tuple(state[ours_name].shape), theirs_name
        # Stored as they are: no Q/K row permutation for qwen3 (NEOX RoPE in llama.cpp).
        values = torch.from_numpy(t.data.copy()).reshape(state[ours_name].shape)
        assert torch.equal(values, state[ours_name]), theirs_name
    _check_tokenizer_metadata(reader, tok, cfg.vocab_size)
    back_tok = tokenizer_from_gguf_metadata(read_gguf(path).metadata)
    assert back_tok.encode(SAMPLE + ENDOFTEXT, allowed_special="all") == tok.encode(
        SAMPLE + ENDOFTEXT, allowed_special="all"
    )
    back = load_gguf(path)  # and pellucid's own loader: same config, equal logits
    assert back.cfg == cfg
    ids = _ids(cfg)
    assert torch.equal(_logits(back, ids), _logits(ours, ids))


@pytest.mark.parity
@pytest.mark.parametrize("make", [_demo_cfg, _small_cfg], ids=["qwen3", "llama"])
def test_gguf_read_by_transformers_gives_equal_logits(tmp_path, tok, make):
    # transformers' GGUF reader implements llama.cpp's conventions on its own (Q/K rows
    # un-permuted for llama, kept for qwen3): an oracle for the layout we write. It ignores
    # key_length, so the config comes from our HF mapping.
    transformers = pytest.importorskip("transformers")
    cfg = make(tok.vocab_size)
    ours = _random_model(cfg)
    save_gguf(ours, tmp_path / "m.gguf", tokenizer=tok)
    c = config_to_hf(cfg)
    config = transformers.AutoConfig.for_model(c.pop("model_type"), **c)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="m.gguf", config=config
    ).eval()
    ids = _ids(cfg)
    torch.testing.assert_close(_logits(theirs, ids), _logits(ours, ids), rtol=1e-5, atol=1e-5)


def test_a_qwen3_gguf_written_by_the_gguf_package_loads(tmp_path, tok):
    # Written with GGUFWriter directly, in llama.cpp's qwen3 layout (q/k rows as in HF).
    cfg = _demo_cfg(tok.vocab_size)
    ours = _random_model(cfg)
    w = gguf.GGUFWriter(tmp_path / "q.gguf", "qwen3")
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.context_len)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    for ours_name, theirs_name in gguf_names(cfg).items():
        w.add_tensor(theirs_name, ours.state_dict()[ours_name].numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    back = load_gguf(tmp_path / "q.gguf")
    assert back.cfg == cfg
    ids = _ids(cfg)
    assert torch.equal(_logits(back, ids), _logits(ours, ids))


def test_gguf_missing_qk_norms_are_listed(tmp_path, tok):
    path = save_gguf(_random_model(_demo_cfg(tok.vocab_size)), tmp_path / "m.gguf")
    reader = gguf.GGUFReader(path)
    w = gguf.GGUFWriter(tmp_path / "cut.gguf", "qwen3")
    for key, f in reader.fields.items():
        if key.startswith("qwen3."):
            w.add_uint32(key, f.contents()) if isinstance(f.contents(), int) else w.add_float32(
                key, f.contents()
            )
    for t in reader.tensors:
        if t.name != "blk.1.attn_k_norm.weight":
            w.add_tensor(t.name, t.data.copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(WeightsFormatError, match=r"missing: blk\.1\.attn_k_norm\.weight\[32\]"):
        load_gguf(tmp_path / "cut.gguf")


def test_gguf_tokenizer_larger_than_the_model_is_refused(tmp_path, tok):
    cfg = _demo_cfg(tok.vocab_size - 1)
    with pytest.raises(WeightsFormatError, match="tokenizer has 320 tokens but the model's vocab"):
        save_gguf(_random_model(cfg), tmp_path / "m.gguf", tokenizer=tok)
    assert not (tmp_path / "m.gguf").exists()


# --- `pellucid export` of a run -----------------------------------------------------------------


def _run_dir(tmp_path, tok):
    """A run directory as `pellucid demo` leaves it: a checkpoint with config and tokenizer."""
    cfg = _demo_cfg(tok.vocab_size)
    model = _random_model(cfg)
    tok.save(tmp_path / "tokenizer.json")
    files = {
        "config.json": json.dumps({"model": dataclasses.asdict(cfg)}),
        "tokenizer.json": (tmp_path / "tokenizer.json").read_text(),
    }
    save_checkpoint(tmp_path / "run", 10, model, None, {}, files)
    return tmp_path / "run", model


@pytest.mark.parametrize("fmt", ["gguf", "hf"])
def test_pellucid_export_of_a_demo_run_reads_back_equal(tmp_path, capsys, tok, fmt):
    run, model = _run_dir(tmp_path, tok)
    out = tmp_path / ("m.gguf" if fmt == "gguf" else "hf")
    assert main(["export", "--model", str(run), "--format", fmt, "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    back = load(out)
    assert back.tokenizer.encode(SAMPLE) == tok.encode(SAMPLE)
    ids = _ids(model.cfg)
    assert torch.equal(_logits(back.model, ids), _logits(model, ids))
