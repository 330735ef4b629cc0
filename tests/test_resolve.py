"""Model specs (weights/resolve.py): every kind loads the same model, names cannot escape, no pickle.

RELIABILITY D1 (pickles through every model spec), D2 (names, with an open() audit hook) and the
tokenizer half of A6 (bad tokenizer metadata fails before any tensor is read).
"""

import json
import os
import pickle
import shutil
import sys

import gguf
import pytest
import torch

from pellucid.config import to_dict
from pellucid.errors import ConfigError, PellucidError, TokenizerError, WeightsFormatError
from pellucid.model.config import ModelConfig
from pellucid.model.transformer import Transformer
from pellucid.tokenizer.bpe import Tokenizer
from pellucid.tokenizer.chat import CHATML
from pellucid.tokenizer.formats import tokenizer_json
from pellucid.weights import gguf as wg
from pellucid.weights import resolve
from pellucid.weights.checkpoint import save_checkpoint
from pellucid.weights.gguf import save_gguf
from pellucid.weights.hf import save_hf
from pellucid.weights.resolve import load

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = "Paris is the capital of France. The quick brown fox jumps over the lazy dog! 0123456789"
CFG = ModelConfig(
    vocab_size=300,
    context_len=96,
    n_layer=2,
    n_head=4,
    n_kv_head=2,
    n_embd=64,
    ffn_dim=96,
    rope_theta=10_000.0,
    tie_embeddings=False,
)
TEMPLATE = CHATML + "{# pellucid test #}"


def tiny_tokenizer():
    tok = Tokenizer.train([TEXT] * 4, CFG.vocab_size, special_tokens=SPECIALS)
    return Tokenizer(tok.vocab, tok.merges, tok.special_tokens, tok.pattern, eos_id=2)


def tiny_model(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # weights larger than the init's: distinct, confident logits
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(), tiny_tokenizer()


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))


def _checkpoint_run(run_dir, model, tok):
    files = {
        "config.json": json.dumps({"model": to_dict(model.cfg)}),
        "tokenizer.json": json.dumps(tokenizer_json(tok)),
    }
    return save_checkpoint(run_dir, 5, model, None, {}, files=files)


def test_every_kind_of_spec_loads_the_same_model(tmp_path, isolated_home, tiny):
    model, tok = tiny
    ids = tok.encode("The capital of France")
    want = _logits(model, ids)
    gguf_file = save_gguf(model, tmp_path / "m.gguf", tokenizer=tok, chat_template=TEMPLATE)
    hf_dir = save_hf(model, tmp_path / "hf", tokenizer=tok, chat_template=TEMPLATE)
    step = _checkpoint_run(tmp_path / "run", model, tok)
    saved = isolated_home / "models" / "mine"
    saved.mkdir(parents=True)
    shutil.copy(gguf_file, saved / "mine.gguf")
    specs = {
        str(gguf_file): ("gguf", TEMPLATE),
        str(hf_dir): ("hf", TEMPLATE),
        str(tmp_path / "run"): ("checkpoint", None),
        str(step): ("checkpoint", None),
        "mine": ("gguf", TEMPLATE),
    }
    for spec, (kind, template) in specs.items():
        loaded = load(spec)
        assert loaded.kind == kind, spec
        assert torch.equal(_logits(loaded.model, ids), want), spec
        assert loaded.tokenizer.encode("The capital of France") == ids, spec
        # tokenizer.json alone records no EOS: <|endoftext|> is taken (tokenizer/formats.py)
        assert loaded.tokenizer.eos_id == (0 if kind == "checkpoint" else 2), spec
        assert (loaded.template.source if loaded.template else None) == template, spec
        assert not loaded.model.training
    # a model without a template chats in ChatML
    assert load(str(step)).chat_template().source == CHATML


@pytest.mark.parity
def test_sharded_hf_folder_loads(tmp_path, tiny):
    transformers = pytest.importorskip("transformers")
    model, tok = tiny
    save_hf(model, tmp_path / "one", tokenizer=tok)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "one")
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    shutil.copy(tmp_path / "one" / "tokenizer.json", tmp_path / "sharded")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    ids = tok.encode("quick brown fox")
    loaded = load(tmp_path / "sharded")
    assert loaded.kind == "hf" and loaded.tokenizer is not None
    assert torch.equal(_logits(loaded.model, ids), _logits(model, ids))


def test_registry_name_fetches_once_and_is_the_default(tmp_path, monkeypatch, tiny):
    model, tok = tiny
    path = save_gguf(model, tmp_path / "reg.gguf", tokenizer=tok)
    calls = []
    monkeypatch.setitem(resolve.REGISTRY, resolve.DEFAULT_MODEL, lambda: calls.append(1) or path)
    loaded = load("smollm2-135m-instruct")
    assert loaded.source == path and calls == [1]
    # a folder of the same name in the working directory does not shadow a built-in name
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135m-instruct").mkdir()
    assert load("smollm2-135m-instruct").source == path


def test_unknown_names_and_missing_paths_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown model 'nope'.*smollm2-135m-instruct"):
        load("nope")
    with pytest.raises(WeightsFormatError, match="no such model file or folder"):
        load(str(tmp_path / "missing"))
    with pytest.raises(WeightsFormatError, match="no such model file or folder"):
        load("missing.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsFormatError, match="holds no model"):
        load(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(WeightsFormatError, match="not a model file"):
        load(tmp_path / "notes.txt")


# --- D2: names that try to leave the models folder --------------------------------------------

BAD_NAMES = [
    "../../etc/passwd",
    "/etc/passwd",
    "a/../../b",
    "..",
    "%2e%2e%2f",
    "..\\..\\x",
    "x\x00.gguf",
    "\uff0e\uff0e\uff0f",
    "a" * 300,
    "",
]


def test_names_never_open_a_file_outside_the_models_folder(isolated_home, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "evil.gguf").write_bytes(b"GGUF")
    models = isolated_home / "models"
    models.mkdir()
    (models / "sneaky").symlink_to(outside)
    (models / "inner").mkdir()
    (models / "inner" / "m.gguf").symlink_to(outside / "evil.gguf")
    opened, recording = [], [True]

    def audit(event, args):
        if recording[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.path.realpath(os.fsdecode(args[0])))

    sys.addaudithook(audit)  # hooks cannot be removed: this one goes quiet at the end
    try:
        for name in [*BAD_NAMES, "sneaky", "inner"]:
            with pytest.raises(PellucidError) as err:
                load(name, names_only=True)
            assert "\n" not in str(err.value)
    finally:
        recording[0] = False
    root = os.path.realpath(models)
    assert not [p for p in opened if not p.startswith(root) and ("outside" in p or "passwd" in p)]


# --- D1: pickles are refused through every model spec -----------------------------------------


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickles_refused_through_every_spec(tmp_path, isolated_home, tiny):
    marker = tmp_path / "MARKER"
    payload = pickle.dumps(_Evil(marker))
    (tmp_path / "evil.pkl").write_bytes(payload)
    torch.save({"x": _Evil(marker)}, tmp_path / "evil.pt")
    hf_bin = tmp_path / "hf_bin"
    save_hf(tiny[0], hf_bin)
    (hf_bin / "model.safetensors").unlink()
    (hf_bin / "pytorch_model.bin").write_bytes(payload)
    only_pickle = tmp_path / "only_pickle"
    only_pickle.mkdir()
    (only_pickle / "model.pt").write_bytes(payload)
    saved = isolated_home / "models" / "pickled"
    saved.mkdir(parents=True)
    (saved / "pytorch_model.bin").write_bytes(payload)
    for spec in (tmp_path / "evil.pkl", tmp_path / "evil.pt", hf_bin, only_pickle):
        with pytest.raises(WeightsFormatError, match="pickle-based checkpoints are refused"):
            load(spec)
    with pytest.raises(WeightsFormatError):
        load("pickled")
    assert not marker.exists()


# --- A6: bad tokenizer metadata fails before any tensor is read -------------------------------


def _gguf_with_tokens(path, model, tokens, token_types=None, merges=()):
    w = gguf.GGUFWriter(path, "llama")
    wg._add_metadata(w, model.cfg, "f32")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    if token_types is not None:
        w.add_array("tokenizer.ggml.token_type", token_types)
    w.add_token_merges(list(merges))
    for ours, theirs in wg.gguf_names(model.cfg).items():
        t = model.state_dict()[ours]
        heads = wg._qk_heads(model.cfg)
        w.add_tensor(theirs, (wg.permute_qk(t, heads[ours]) if ours in heads else t).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _names(tok):
    from pellucid.tokenizer.pretokenize import bytes_to_str

    special = {i: s for s, i in tok.special_tokens.items()}
    return [special.get(i) or bytes_to_str(b) for i, b in enumerate(tok.vocab)]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ("duplicate_token", "duplicate token"),
        ("unknown_merge", "not a token"),
        ("types_length", "token_type"),
        ("types_not_ints", "token_type"),
    ],
)
def test_bad_tokenizer_metadata_rejected_before_tensors(tmp_path, monkeypatch, tiny, change, words):
    model, tok = tiny
    names = _names(tok)
    merges = [f"{names[a]} {names[b]}" for a, b in tok.merges]
    types = [3 if i < 3 else 1 for i in range(len(names))]
    if change == "duplicate_token":
        names[200] = names[100]
    elif change == "unknown_merge":
        merges[5] = "Ġnot_a_token x"
    elif change == "types_length":
        types = types[:10]
    elif change == "types_not_ints":
        types = ["x"] * len(names)
    _gguf_with_tokens(tmp_path / "m.gguf", model, names, types, merges)
    monkeypatch.setattr(wg, "_dequantize", lambda *a: pytest.fail("dequantized a tensor"))
    with pytest.raises((TokenizerError, WeightsFormatError)) as err:
        load(tmp_path / "m.gguf")
    assert words in str(err.value) and "\n" not in str(err.value)
