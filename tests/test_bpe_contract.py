"""The tokenizer training contract (issue 16 item 9): every merge is the most frequent adjacent pair
of the corpus as segmented so far, on a fresh recount, with ties going to the smaller (left, right)
id pair. Checked against a from-scratch trainer that recounts everything at every merge, on text
with long whitespace runs (indented code, centred licence lines, tabs, trailing blanks), where an
incremental count is easiest to get wrong; and, with `tokenizers` installed, against BpeTrainer."""

import json
import random
import string
import sysconfig
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest

from pellucid.tokenizer.bpe import train_merges
from pellucid.tokenizer.pretokenize import BYTE_ORDER, bytes_to_str, compile_pattern, split


def recount_merges(words: Counter, vocab_size: int) -> list[tuple[int, int]]:
    """Naive BPE: recount every adjacent pair of every word before each merge (O(merges x text))."""
    vocab = [bytes([b]) for b in BYTE_ORDER]
    index = {t: i for i, t in enumerate(vocab)}
    seqs = [([index[bytes([c])] for c in w.encode()], n) for w, n in words.items()]
    merges = []
    while len(vocab) < vocab_size:
        counts = Counter()
        for seq, n in seqs:
            for pair in pairwise(seq):
                counts[pair] += n
        if not counts:
            break
        a, b = min(counts, key=lambda p: (-counts[p], p))
        new = index.setdefault(vocab[a] + vocab[b], len(vocab))
        if new == len(vocab):
            vocab.append(vocab[a] + vocab[b])
        merges.append((a, b))
        for k, (seq, n) in enumerate(seqs):
            out, i = [], 0
            while i < len(seq):  # left to right, non-overlapping: "aaa" + (a, a) -> "aa a"
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == (a, b):
                    out.append(new)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[k] = (out, n)
    return merges


def whitespace_heavy_text(seed: int) -> str:
    """Indented lines of random words, runs of spaces and tabs up to hundreds long, blank lines."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 7))) for _ in range(300)]
    lines = []
    for _ in range(1500):
        indent = rng.choice([" ", "\t", "  \t", "    "]) * rng.choice([0, 1, 2, 3, 4, 8, 20, 80])
        body = " ".join(rng.choices(words, k=rng.randint(1, 6)))
        lines.append(indent + body + " " * rng.choice([0, 0, 1, 5, 40]) + "\n" * rng.randint(0, 2))
    licence = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text("utf-8")[:20_000]
    return "\n".join(lines) + licence


@pytest.mark.parametrize("pattern", ["gpt2", "llama3", "smollm"])
def test_every_merge_is_the_most_frequent_pair_on_a_fresh_recount(pattern):
    words = Counter(split(whitespace_heavy_text(0), compile_pattern(pattern)))
    vocab = [bytes([b]) for b in BYTE_ORDER]
    ours = train_merges(words, vocab, 256 + 250)
    assert len(ours) == 250
    assert ours == recount_merges(words, 256 + 250)


@pytest.mark.parity
def test_bpe_trainer_agrees_on_whitespace_heavy_text():
    pytest.importorskip("tokenizers")
    from tokenizer_data import hf_train

    from pellucid.tokenizer.bpe import Tokenizer

    text = whitespace_heavy_text(1)
    ours = Tokenizer.train([text], 256 + 400, [], "gpt2")
    mine = [[bytes_to_str(ours.token_bytes(i)) for i in m] for m in ours.merges]
    theirs = json.loads(hf_train([text], 256 + 400, [], "gpt2").to_str())["model"]["merges"]
    assert mine == [list(m) for m in theirs]
