"""tokenizer.json both ways with `tokenizers`, GGUF tokenizer metadata, and corrupt files."""

import json

import gguf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pellucid.errors import PellucidError, TokenizerError
from pellucid.tokenizer.bpe import Tokenizer
from pellucid.tokenizer.formats import (
    GGUF_PRE_NAMES,
    load_tokenizer,
    load_tokenizer_json,
    save_tokenizer_json,
    tokenizer_from_gguf_metadata,
    tokenizer_json,
)
from pellucid.tokenizer.pretokenize import bytes_to_str

tk = pytest.importorskip("tokenizers")
from tokenizer_data import HELD_OUT, HF_PRE, SPECIALS, TRAIN_TEXTS, TRICKY, hf_train  # noqa: E402
from tokenizers import models, pre_tokenizers, trainers  # noqa: E402

PATTERNS = ["gpt2", "llama3", "smollm"]
TEXTS = [HELD_OUT, *TRICKY[1:], "x  12\n\n\n  y", "<|im_start|>user\nhi<|im_end|>"]


@pytest.fixture(scope="module")
def trained():
    return {p: Tokenizer.train(TRAIN_TEXTS, 700, SPECIALS, p) for p in PATTERNS}


def _same(a: Tokenizer, b: Tokenizer) -> None:
    assert (a.vocab, a.merges, a.special_tokens, a.pattern) == (
        b.vocab,
        b.merges,
        b.special_tokens,
        b.pattern,
    )
    assert (a.bos_id, a.eos_id, a.ignore_merges) == (b.bos_id, b.eos_id, b.ignore_merges)


# --- ours -> tokenizers ---------------------------------------------------------------------------


@pytest.mark.parity
@pytest.mark.parametrize("pattern", PATTERNS)
def test_tokenizers_loads_our_file_and_encodes_identically(tmp_path, trained, pattern):
    ours = trained[pattern]
    path = tmp_path / "tokenizer.json"
    ours.save(path)
    hf = tk.Tokenizer.from_file(str(path))
    for text in TEXTS:
        ids = ours.encode(text, allowed_special="all")
        assert hf.encode(text).ids == ids
        assert hf.decode(ids, skip_special_tokens=False) == ours.decode(ids) == text
    _same(load_tokenizer_json(path), ours)


@pytest.fixture(scope="module")
def hf_loaded(trained):
    """`tokenizers` loading each of our saved files."""
    return {p: tk.Tokenizer.from_str(json.dumps(tokenizer_json(t))) for p, t in trained.items()}


@pytest.mark.parity
@settings(max_examples=100, deadline=None)
@given(text=st.text(st.characters(exclude_categories=["Cs", "Cn"]), max_size=100))
def test_saved_file_encodes_arbitrary_text_like_tokenizers(trained, hf_loaded, text):
    for pattern, ours in trained.items():
        assert hf_loaded[pattern].encode(text).ids == ours.encode(text, "all"), pattern


def test_save_is_deterministic_and_atomic(tmp_path, trained):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    save_tokenizer_json(trained["gpt2"], a)
    save_tokenizer_json(trained["gpt2"], b)
    assert a.read_bytes() == b.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name not in ("a.json", "b.json")]


# --- tokenizers -> ours ---------------------------------------------------------------------------


@pytest.mark.parity
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("ignore_merges", [False, True])
def test_we_load_files_made_by_tokenizers(tmp_path, pattern, ignore_merges):
    hf = tk.Tokenizer(models.BPE(ignore_merges=ignore_merges))
    hf.pre_tokenizer = HF_PRE[pattern]()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(TRAIN_TEXTS, trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer(tmp_path)  # a folder holding tokenizer.json
    assert ours.pattern == pattern and ours.ignore_merges == ignore_merges
    assert ours.eos_id == 0  # <|endoftext|>, without a tokenizer_config.json
    for text in TEXTS:
        assert ours.encode(text, allowed_special="all") == hf.encode(text).ids


@pytest.mark.parity
def test_legacy_string_merges_and_tokenizer_config(tmp_path):
    hf = hf_train(TRAIN_TEXTS, 600, ["<s>", "</s>", "<|endoftext|>"])
    data = json.loads(hf.to_str())
    data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]  # pre-0.20 files
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = load_tokenizer(tmp_path / "tokenizer.json")
    assert (ours.bos_id, ours.eos_id) == (0, 1)
    assert ours.encode(HELD_OUT, allowed_special="all") == hf.encode(HELD_OUT).ids


# --- corrupt and unsupported files ----------------------------------------------------------------


def _file(tmp_path, trained, edit):
    data = json.loads(json.dumps(tokenizer_json(trained["gpt2"])))
    edit(data)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    return path


def _set(path, value):
    def edit(data):
        *parents, last = path
        for key in parents:
            data = data[key]
        data[last] = value

    return edit


BAD_EDITS = {
    "not_bpe": (_set(["model", "type"], "WordPiece"), "not a BPE tokenizer.json"),
    "normalizer": (_set(["normalizer"], {"type": "NFC"}), "normalizer"),
    "byte_fallback": (_set(["model", "byte_fallback"], True), "byte_fallback"),
    "whitespace_pre": (
        _set(["pre_tokenizer"], {"type": "Whitespace"}),
        "unsupported pre_tokenizer",
    ),
    "prefix_space": (
        _set(["pre_tokenizer", "add_prefix_space"], True),
        "without add_prefix_space",
    ),
    "no_pre": (_set(["pre_tokenizer"], None), "pre_tokenizer"),
    "vocab_not_object": (_set(["model", "vocab"], ["a"]), "must be an object"),
    "id_gap": (lambda d: d["model"]["vocab"].update({"Ġzzz": 9999}), "without gaps"),
    "id_conflict": (lambda d: d["model"]["vocab"].update({"Ġzzz": 5}), "conflicting"),
    "id_not_int": (lambda d: d["model"]["vocab"].update({"Ġzzz": "5"}), "conflicting"),
    "not_byte_level": (lambda d: d["model"]["vocab"].update({"€": 700}), "not byte-level"),
    "merge_unknown": (lambda d: d["model"]["merges"].append(["Ġzzq", "q"]), "not a token"),
    "merge_bad_shape": (lambda d: d["model"]["merges"].append(["a", "b", "c"]), "bad merge"),
    "merge_not_in_vocab": (lambda d: d["model"]["merges"].append(["a", "a"]), "not in the vocab"),
    # Valid JSON of the wrong shape: these used to raise AttributeError/TypeError from deep inside.
    "model_not_object": (_set(["model"], ["BPE"]), "'model' must be an object"),
    "type_not_string": (_set(["model", "type"], 3), "'model.type' must be a string"),
    "added_not_list": (_set(["added_tokens"], {"content": "x"}), "'added_tokens' must be a list"),
    "added_entry": (_set(["added_tokens"], [{"content": 3, "id": 0}]), "added_tokens[0].content"),
    "pre_not_object": (_set(["pre_tokenizer"], ["ByteLevel"]), "'pre_tokenizer' must be an object"),
    "split_pattern_str": (
        _set(
            ["pre_tokenizer"],
            {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": "x"},
                    {"type": "ByteLevel", "use_regex": False},
                ],
            },
        ),
        "pre_tokenizer step 0",
    ),
    "top_level_list": (lambda d: d.clear(), "'model' is missing"),
    "merges_not_list": (_set(["model", "merges"], {"a": "b"}), "'model.merges' must be a list"),
}


@pytest.mark.parametrize("name", list(BAD_EDITS))
def test_corrupt_tokenizer_json_is_one_line(tmp_path, trained, name):
    edit, words = BAD_EDITS[name]
    path = _file(tmp_path, trained, edit)
    with pytest.raises(TokenizerError) as err:
        load_tokenizer(path)
    msg = str(err.value)
    assert words in msg and "\n" not in msg and str(path) in msg


def test_truncated_and_garbled_files_are_one_line(tmp_path, trained):
    good = json.dumps(tokenizer_json(trained["gpt2"])).encode()
    path = tmp_path / "tokenizer.json"
    blobs = [good[:n] for n in (0, 1, 100, len(good) // 2, len(good) - 1)]
    blobs += [b"\xff\xfe garbage", b"[1, 2, 3]", b"null", b'{"model": 3}']
    for blob in blobs:
        path.write_bytes(blob)
        with pytest.raises(TokenizerError) as err:
            load_tokenizer(path)
        assert "\n" not in str(err.value)


def test_tokenizer_spec_resolution(tmp_path, trained):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000010").mkdir(parents=True)
    trained["llama3"].save(run / "checkpoints" / "step_000010" / "tokenizer.json")
    assert load_tokenizer(run).pattern == "llama3"  # a run directory: its latest checkpoint
    trained["gpt2"].save(run / "tokenizer.json")
    assert load_tokenizer(run).pattern == "gpt2"  # a tokenizer.json at the top wins
    for spec, words in [
        (tmp_path / "nothing", "no such tokenizer"),
        (tmp_path / "run" / "checkpoints", "has no tokenizer.json"),
        (tmp_path / "none.gguf", "no such GGUF file"),
    ]:
        with pytest.raises(PellucidError, match=words):
            load_tokenizer(spec)


# --- GGUF metadata --------------------------------------------------------------------------------


def _write_gguf(path, tok: Tokenizer, pre="smollm", skip=(), **extra):
    """Tokenizer metadata as llama.cpp's converter writes it, with the gguf package's writer."""
    special = set(tok.special_tokens.values())
    w = gguf.GGUFWriter(path, "llama")
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": [
            t.decode() if i in special else bytes_to_str(t) for i, t in enumerate(tok.vocab)
        ],
        "tokenizer.ggml.token_type": [3 if i in special else 1 for i in range(tok.vocab_size)],
        "tokenizer.ggml.merges": [
            f"{bytes_to_str(tok.vocab[a])} {bytes_to_str(tok.vocab[b])}" for a, b in tok.merges
        ],
        **extra,
    }
    for key, value in meta.items():
        if key in skip:
            continue
        if isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("pattern", PATTERNS)
def test_tokenizer_from_gguf_metadata(tmp_path, trained, pattern):
    ours = trained[pattern]
    path = _write_gguf(
        tmp_path / "m.gguf",
        ours,
        GGUF_PRE_NAMES[pattern],
        **{"tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2},
    )
    loaded = load_tokenizer(path)
    assert (loaded.vocab, loaded.merges, loaded.special_tokens) == (
        ours.vocab,
        ours.merges,
        ours.special_tokens,
    )
    assert (loaded.pattern, loaded.bos_id, loaded.eos_id) == (pattern, 1, 2)
    for text in TEXTS:
        assert loaded.encode(text, allowed_special="all") == ours.encode(text, "all")


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"pre": "deepseek-coder"}, "unknown pre-tokenizer 'deepseek-coder'"),
        ({"skip": ["tokenizer.ggml.model", "tokenizer.ggml.tokens"]}, "no tokenizer metadata"),
        ({"skip": ["tokenizer.ggml.tokens"]}, "tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.model": "llama"}, "'llama' is not supported"),
        ({"tokenizer.ggml.token_type": [1, 1]}, "differ in length"),
        ({"tokenizer.ggml.token_type": ["x"] * 700}, "token_type must hold integers"),
        ({"tokenizer.ggml.pre": ["smollm"]}, "unknown pre-tokenizer ['smollm']"),
        ({"tokenizer.ggml.eos_token_id": 700}, "eos_token_id 700 is not a token id (0..699)"),
        ({"tokenizer.ggml.tokens": ["a"] * 700}, "duplicate token"),
        ({"tokenizer.ggml.merges": ["Ġnot_a_token x"]}, "not a token"),
    ],
)
def test_gguf_tokenizer_metadata_errors(tmp_path, trained, kwargs, words):
    path = _write_gguf(tmp_path / "m.gguf", trained["gpt2"], **kwargs)
    with pytest.raises(TokenizerError) as err:
        load_tokenizer(path)
    assert words in str(err.value) and str(path) in str(err.value)


def test_gguf_without_any_tokenizer_metadata(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "bare.gguf", "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(TokenizerError, match="has no tokenizer metadata"):
        load_tokenizer(tmp_path / "bare.gguf")
    with pytest.raises(TokenizerError, match="GGUF: has no tokenizer metadata"):
        tokenizer_from_gguf_metadata({})


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ("{not json", "not valid JSON"),
        ('["a"]', "must be an object"),
        ('{"eos_token": 5}', "'eos_token' must be a string or an object"),
        (b"\xff\xfe{}", "not UTF-8"),
    ],
)
def test_a_bad_tokenizer_config_beside_it_is_one_line(tmp_path, trained, config, words):
    path = _file(tmp_path, trained, lambda d: None)
    side = path.with_name("tokenizer_config.json")
    side.write_bytes(config if isinstance(config, bytes) else config.encode())
    with pytest.raises(TokenizerError) as err:
        load_tokenizer(path)
    assert words in str(err.value) and str(side) in str(err.value) and "\n" not in str(err.value)


def test_a_fifo_is_refused_not_read_for_ever(tmp_path, trained):
    import os

    path = _file(tmp_path, trained, lambda d: None)
    os.mkfifo(path.with_name("tokenizer_config.json"))  # opening it to read would block
    with pytest.raises(TokenizerError, match="not a regular file"):
        load_tokenizer(path)
