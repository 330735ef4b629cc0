"""Shared data for the tokenizer tests: a varied synthetic corpus, tricky strings, and the
`tokenizers` pre-tokenizers and trainer our patterns and training must equal."""

import json
import random
import sysconfig
from pathlib import Path

from tokenizers import Regex, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from pellucid.tokenizer.bpe import Tokenizer
from pellucid.tokenizer.formats import tokenizer_json
from pellucid.tokenizer.pretokenize import LLAMA3

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = str.split(
    "the of and to a in is you that it he was for on are as with his they I at be this have from "
    "or one had by word but not what all were we when your can said there use an each which she "
    "do how their if will up other about out many then them these so some her would make like "
    "naïve café résumé Привет мир 日本語 東京タワー ελληνικά שָׁלוֹם مرحبا नमस्ते 한국어 "
    "😀 👋🏽 👨‍👩‍👧 🇫🇷 e\u0301 ﬁne don't we'll I'M it's they'VE x²"
)
SEPARATORS = [" "] * 12 + ["  ", "\n", "\n\n", "\t", ", ", ". ", "!\n", " - ", "   \n ", "\r\n"]


def varied_text(seed: int, n_words: int = 3000) -> str:
    """English-like words, other scripts, emoji, numbers, whitespace runs, specials and code."""
    rng = random.Random(seed)
    parts = []
    for _ in range(n_words):
        r = rng.random()
        if r < 0.08:
            parts.append(str(rng.randint(0, 10 ** rng.randint(1, 9))))
        elif r < 0.09:
            parts.append(rng.choice(SPECIALS))
        else:
            parts.append(rng.choice(WORDS))
        parts.append(rng.choice(SEPARATORS))
    return "".join(parts)


CODE = Path(sysconfig.get_paths()["stdlib"], "json", "decoder.py").read_text("utf-8")
TRAIN_TEXTS = [varied_text(0), CODE, varied_text(1, 500)]
HELD_OUT = varied_text(2, 1500) + CODE[:3000]

HF_PRE = {
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "llama3": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    ),
    "smollm": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    ),
}


def hf_train(texts, vocab_size, specials, pattern="gpt2", min_frequency=0):
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = HF_PRE[pattern]()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer)
    return hf


def assert_same_model(ours: Tokenizer, hf) -> None:
    """Same vocabulary (every token string and id) and the same merges in the same order."""
    theirs = json.loads(hf.to_str())["model"]
    mine = tokenizer_json(ours)["model"]
    assert mine["vocab"] == theirs["vocab"]
    assert mine["merges"] == [list(m) for m in theirs["merges"]]


TRICKY = [
    "",
    "\x00",
    "a\x00b\x00",
    "e\u0301\u0302\u0303",  # stacked combining marks
    "👨‍👩‍👧‍👦 🏳️‍🌈 👍🏿",  # ZWJ sequences, modifiers
    "   \t\t\n\n\r\n \u00a0\u2003\u3000 ",  # whitespace runs of every kind
    "\x01\x02\x1b[31m\x7f\x9f",  # control characters
    "עברית English العربية",  # RTL next to LTR
    "\U0010ffff\U000e0001\U0001fffe",  # unassigned and noncharacters
    "<|endoftext|><|im_start|>",
    "x  12 3.14159 ١٢٣ ⅷ",
]
