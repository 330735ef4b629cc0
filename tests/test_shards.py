"""Token shards: the text-space split, the token files, the cache key, reuse and rebuild."""

import json

import numpy as np
import pytest

from pellucid.data import shards
from pellucid.data.shards import Piece, build_shards, split_documents
from pellucid.data.sources import Document, load_corpus
from pellucid.errors import ConfigError, DataError


class ByteTokenizer:
    """A stand-in: one token per UTF-8 byte, optional specials after the 256 byte ids."""

    def __init__(self, specials=("<|endoftext|>",), vocab_size=None, eos_id=None):
        self.special_tokens = {s: 256 + i for i, s in enumerate(specials)}
        self.vocab_size = vocab_size or 256 + len(specials)
        self.eos_id = eos_id
        self.batches = 0

    def encode_batch(self, texts):
        self.batches += 1
        return [list(t.encode()) for t in texts]

    def save(self, path):
        path.write_text(json.dumps({"bytes": 256, "special": self.special_tokens}))


DOCS = [Document("a.txt", "hello world"), Document("b.txt", "héllo"), Document("c.txt", "end.")]


def test_split_documents_cuts_the_concatenation_at_the_fraction():
    train, val = split_documents(DOCS, 0.25)  # 20 characters: the last 5 are val
    assert "".join(p.text for p in train) == "hello worldhéll"
    assert "".join(p.text for p in val) == "oend."
    assert train == [Piece("hello world", True), Piece("héll", False)]
    assert val == [Piece("o", True), Piece("end.", True)]
    assert split_documents(DOCS, 0.0) == ([Piece(d.text, True) for d in DOCS], [])


def test_build_shards_writes_tokens_separators_and_counts():
    tok = ByteTokenizer()
    s = build_shards(DOCS, tok, val_fraction=0.25)
    eot = 256
    expect_train = [*b"hello world", eot, *"héll".encode()]
    expect_val = [*b"o", eot, *b"end.", eot]
    assert isinstance(s.train, np.memmap) and s.train.dtype == np.uint16
    assert s.train.tolist() == expect_train and s.val.tolist() == expect_val
    m = s.meta
    assert (m["train_tokens"], m["val_tokens"]) == (len(expect_train), len(expect_val))
    assert (m["train_bytes"], m["val_bytes"]) == (16, 5)  # UTF-8 bytes of the text, no separators
    assert m["separator_id"] == eot and m["vocab_size"] == 257 and m["dtype"] == "uint16"
    assert json.loads((s.folder / "meta.json").read_text()) == m
    assert s.bits_per_byte(np.log(2)) == pytest.approx(len(expect_val) / 5)


def test_shards_are_reused_and_keyed_by_content_tokenizer_and_split(isolated_home):
    tok = ByteTokenizer()
    first = build_shards(DOCS, tok)
    assert build_shards(list(DOCS), tok).folder == first.folder
    assert tok.batches == 2  # train and val tokenized once; the second call read the cache
    changed = [*DOCS[:2], Document("c.txt", "end!")]
    others = {
        build_shards(changed, tok).folder,
        build_shards(DOCS, ByteTokenizer(specials=("<|eot|>",))).folder,
        build_shards(DOCS, tok, val_fraction=0.2).folder,
    }
    assert first.folder not in others and len(others) == 3
    assert len(list((isolated_home / "shards").iterdir())) == 4


def test_damaged_shards_are_rebuilt():
    tok = ByteTokenizer()
    s = build_shards(DOCS, tok)
    expected = s.train.tolist()
    (s.folder / "train.bin").write_bytes(b"\0\0")  # truncated: size no longer matches the meta
    assert build_shards(DOCS, tok).train.tolist() == expected
    (s.folder / "meta.json").unlink()  # an interrupted build never wrote its meta
    assert build_shards(DOCS, tok).train.tolist() == expected
    assert tok.batches == 6


def test_dtype_and_separator_follow_the_tokenizer():
    big = build_shards(DOCS, ByteTokenizer(specials=(), vocab_size=70_000, eos_id=7), 0.1)
    assert big.train.dtype == np.uint32 and big.meta["separator_id"] == 7
    assert big.train.tolist()[11] == 7  # eos ends the first document
    plain = build_shards(DOCS, ByteTokenizer(specials=()), 0.0)
    assert bytes(plain.train.tolist()) == "hello worldhélloend.".encode()
    assert plain.val.size == 0 and plain.meta["val_tokens"] == 0


def test_bad_input_is_one_clear_line():
    with pytest.raises(ConfigError, match="val_fraction"):
        build_shards(DOCS, ByteTokenizer(), val_fraction=1.0)
    with pytest.raises(DataError, match="empty corpus"):
        build_shards([Document("a", "")], ByteTokenizer())


def test_with_the_real_tokenizer():
    bpe = pytest.importorskip("pellucid.tokenizer.bpe")
    docs = [Document(f"{i}.txt", f"document {i}: to be or not to be, {i * 7}\n") for i in range(40)]
    tok = bpe.Tokenizer.train([d.text for d in docs], 300, special_tokens=["<|endoftext|>"])
    s = build_shards(docs, tok, val_fraction=0.1)
    assert build_shards(docs, tok).folder == s.folder  # tokenizer.json is a stable key
    eot = tok.special_tokens["<|endoftext|>"]
    text = "".join(d.text + "<|endoftext|>" for d in docs)
    assert tok.decode(s.train.tolist()) + tok.decode(s.val.tolist()) == text
    assert s.train.tolist().count(eot) + s.val.tolist().count(eot) == len(docs)


@pytest.mark.slow
def test_shakespeare_split_convention(real_home, monkeypatch, tmp_path):
    docs = load_corpus("shakespeare")
    monkeypatch.setenv("PELLUCID_HOME", str(tmp_path))  # keep test shards out of the real cache
    s = build_shards(docs, ByteTokenizer(specials=()), val_fraction=0.1)
    text = "".join(d.text for d in docs).encode()
    cut = int(len(text) * 0.9)  # nanoGPT: data[: int(n * 0.9)] is train
    assert s.meta["val_bytes"] == len(text) - cut == 505_720
    assert bytes(s.val.tolist()) == text[cut:]
    assert shards.token_dtype(65_536) == np.uint16
