"""`pellucid tokenizer train` and `pellucid tokenizer encode`, called in-process, and their errors."""

import json
import logging

import gguf
import pytest
from tokenizer_data import TRAIN_TEXTS, varied_text

from pellucid import cli
from pellucid.tokenizer.formats import load_tokenizer


@pytest.fixture(autouse=True)
def root_handlers():
    """cli.main installs a root log handler on the captured stderr; take it away afterwards.
    Start without root handlers too: one left by an earlier test may point at a closed stream."""
    saved = logging.root.handlers[:]
    logging.root.handlers[:] = []
    yield
    logging.root.handlers[:] = saved


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    text = "the quick brown fox jumps over the lazy dog 12345\n" * 40 + varied_text(5, 600)
    path.write_text(text)
    return path


def _error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("pellucid: error: ")
    assert "Traceback" not in "\n".join(lines)
    return lines[-1]


@pytest.mark.parametrize("pattern", ["gpt2", "llama3", "smollm"])
def test_train_writes_tokenizer_json_and_logs_progress(tmp_path, corpus, capsys, pattern):
    out = tmp_path / "tok"
    argv = ["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "300", "--out", str(out)]
    assert cli.main([*argv, "--pattern", pattern]) == 0
    captured = capsys.readouterr()
    assert "training a 300-token BPE" in captured.err  # the progress line
    assert str(out / "tokenizer.json") in captured.out and "300 tokens" in captured.out
    tok = load_tokenizer(out / "tokenizer.json")
    assert tok.vocab_size == 300 and tok.pattern == pattern
    assert tok.special_tokens == {"<|endoftext|>": 0} and tok.eos_id == 0
    assert tok.decode(tok.encode(" the lazy dog")) == " the lazy dog"
    assert len(tok.encode(" the lazy dog")) == 3  # whole words learned


def test_train_with_own_special_tokens(tmp_path, corpus):
    out = tmp_path / "tok"
    argv = ["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "280"]
    argv += ["--out", str(out), "--special", "<s>", "--special", "</s>"]
    assert cli.main(argv) == 0
    assert load_tokenizer(out).special_tokens == {"<s>": 0, "</s>": 1}


def test_encode_shows_tokens_ids_and_bytes(tmp_path, corpus, capsys):
    out = tmp_path / "tok"
    cli.main(
        ["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "300", "--out", str(out)]
    )
    tok = load_tokenizer(out)
    capsys.readouterr()
    text = "the fox 👋<|endoftext|>"
    for spec in (out, out / "tokenizer.json"):  # a run directory or the file itself
        assert cli.main(["tokenizer", "encode", "--tokenizer", str(spec), text]) == 0
        printed = capsys.readouterr().out.splitlines()
        ids = tok.encode(text)
        assert printed[0].startswith(f"{len(ids)} tokens")
        rows = printed[1:]
        assert [int(r.split()[0]) for r in rows] == ids
        assert "'the'" in rows[0] and rows[0].rstrip().endswith("74 68 65")
        assert "f0 9f" in "".join(rows)  # the emoji's bytes
        assert "(special)" not in "".join(rows)  # special-token text stays text by default


def test_encode_json(tmp_path, corpus, capsys):
    out = tmp_path / "tok"
    cli.main(
        ["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "300", "--out", str(out)]
    )
    capsys.readouterr()
    text = "the dog<|endoftext|>"
    assert cli.main(["tokenizer", "encode", "--tokenizer", str(out), text, "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert (
        cli.main(
            ["tokenizer", "encode", "--tokenizer", str(out), text, "--json", "--allow-special"]
        )
        == 0
    )
    special = json.loads(capsys.readouterr().out)
    tok = load_tokenizer(out)
    assert plain["ids"] == tok.encode(text) and 0 not in plain["ids"]
    assert special["ids"] == tok.encode(text, allowed_special="all") and special["ids"][-1] == 0
    assert special["tokens"][:2] == ["the", "Ġdog"] and special["tokens"][-1] == "<|endoftext|>"
    assert "".join(plain["text"]) == text
    assert bytes.fromhex("".join(plain["bytes"])) == text.encode()


def test_encode_with_a_gguf_tokenizer(tmp_path, capsys):
    from test_tokenizer_formats import _write_gguf

    from pellucid.tokenizer.bpe import Tokenizer

    tok = Tokenizer.train(TRAIN_TEXTS, 400, ["<|endoftext|>"], "smollm")
    path = _write_gguf(tmp_path / "m.gguf", tok, "smollm")
    assert cli.main(["tokenizer", "encode", "--tokenizer", str(path), "x  12", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ids"] == tok.encode("x  12")


def test_bad_input_is_one_line_without_traceback(tmp_path, corpus, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    train = ["tokenizer", "train", "--out", str(tmp_path / "o")]
    cases = [
        ([*train[:-1], str(corpus), "--corpus", str(corpus), "--vocab-size", "300"], "is a file"),
        ([*train, "--corpus", str(empty), "--vocab-size", "300"], "is empty"),
        ([*train, "--corpus", str(corpus), "--vocab-size", "200"], "vocab_size 200 is too small"),
        ([*train, "--corpus", str(tmp_path / "nope.txt"), "--vocab-size", "300"], "nope.txt"),
    ]
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "tokenizer.json").write_text('{"model": {"type": "BPE", "vo')
    bare = gguf.GGUFWriter(tmp_path / "bare.gguf", "llama")
    bare.write_header_to_file()
    bare.write_kv_data_to_file()
    bare.write_tensors_to_file()
    bare.close()
    encode = ["tokenizer", "encode", "hello", "--tokenizer"]
    cases += [
        ([*encode, str(tmp_path / "trunc")], "tokenizer.json: not valid JSON"),
        ([*encode, str(tmp_path / "bare.gguf")], "has no tokenizer metadata"),
        ([*encode, str(tmp_path / "missing.json")], "no such tokenizer"),
    ]
    for argv, words in cases:
        assert cli.main(argv) == 2, argv
        assert words in _error_line(capsys)
    assert not (tmp_path / "o" / "tokenizer.json").exists()


def test_invalid_utf8_in_the_corpus_is_replaced_with_a_warning(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good text here " * 20 + b"\xff\xfe broken " + b"more text " * 20)
    out = tmp_path / "tok"
    argv = ["tokenizer", "train", "--corpus", str(bad), "--vocab-size", "280", "--out", str(out)]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "bad.txt" in err and "300" in err  # names the file and the offset of the first bad byte
    tok = load_tokenizer(out)
    assert "\ufffd" in tok.decode(tok.encode("\ufffd")) and tok.vocab_size == 280


def test_encode_argv_with_a_lone_surrogate_shows_u_fffd(tmp_path, corpus, capsys):
    # Undecodable argv bytes reach Python as lone surrogates; this used to raise UnicodeEncodeError.
    out = tmp_path / "tok"
    cli.main(
        ["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "300", "--out", str(out)]
    )
    capsys.readouterr()
    assert cli.main(["tokenizer", "encode", "--tokenizer", str(out), "a\udcffb"]) == 0
    printed = capsys.readouterr().out
    assert "tokens for 3 characters (5 bytes)" in printed.splitlines()[0]
    assert [r.split()[-1] for r in printed.splitlines()[1:]] == [
        "61",
        "ef",
        "bf",
        "bd",
        "62",
    ]  # U+FFFD
