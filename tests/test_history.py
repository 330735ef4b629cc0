"""docs/history.md, checked: each rung's formula against its function on numbers worked by hand,
and the rungs' properties (Kneser-Ney is a distribution, skip-gram finds co-occurring words)."""

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pellucid.data.shards import Shards
from pellucid.errors import ConfigError
from pellucid.history import ladder
from pellucid.history.neural import BengioLM
from pellucid.history.ngram import KneserNey, count, count_orders
from pellucid.history.vectors import (
    SkipGram,
    SkipGramBatch,
    SkipGramSampler,
    analogy,
    neighbours,
    skipgram_loss,
)
from pellucid.infer.sampling import SamplingParams
from pellucid.train.trainer import TrainConfig, train


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


class IdTokenizer:
    """Token i is the character chr(97 + i): enough for the rungs' samples."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def encode(self, text):
        return [ord(c) - 97 for c in text]

    def decode(self, ids):
        return "".join(chr(97 + i) for i in ids)


def shards_of(train, val, val_bytes):
    meta = {"val_tokens": len(val), "val_bytes": val_bytes, "key": "k"}
    return Shards(Path("."), np.array(train), np.array(val), meta)


def test_every_test_named_in_the_doc_exists():
    doc = (Path(__file__).parents[1] / "docs" / "history.md").read_text()
    named = set(re.findall(r"`(test_\w+)`", doc))
    assert len(named) >= 12
    here = Path(__file__).parent
    defined = set(globals()) | {
        name
        for f in ("test_eliza.py", "test_math.py")
        for name in re.findall(r"^def (test_\w+)", (here / f).read_text(), re.M)
    }
    assert named <= defined, named - defined


def test_uniform_is_eight_bits_per_byte():
    params = SamplingParams(max_new_tokens=50, seed=3)
    rung = ladder.uniform(shards_of([0], [0, 1], val_bytes=2), ("a", "b"), params)
    assert rung.bits_per_byte == 8.0 and rung.size == 256 and rung.kind == "uniform"
    for _, text in rung.samples:  # random bytes, shown without anything a terminal runs
        assert text and all(c.isprintable() or c == "\n" for c in text)


# --- Shannon ------------------------------------------------------------------------------------


def test_entropy_by_hand():
    # p = (1/2, 1/4, 1/4): H = 1/2 * 1 + 2 * 1/4 * 2 = 1.5 bits; a zero count adds nothing
    assert ladder.entropy_bits(np.array([2, 1, 1, 0])) == pytest.approx(1.5)


def test_unigram_bits_per_byte_by_hand():
    # train counts (0: 3, 1: 1), V = 2: add-one P(0) = 4/6, P(1) = 2/6. Val targets 0, 1.
    shards = shards_of([0, 0, 0, 1], [1, 0, 1], val_bytes=3)
    rung = ladder.unigram(shards, IdTokenizer(2), ("a",), SamplingParams(max_new_tokens=3, seed=1))
    nats = -(math.log(4 / 6) + math.log(2 / 6)) / 2
    assert rung.bits_per_byte == pytest.approx(nats * 3 / (math.log(2) * 3))
    assert rung.size == 2 and len(rung.samples[0][1]) == 3
    assert "H = 0.81 bits/token" in rung.name  # -(3/4 log2 3/4 + 1/4 log2 1/4) = 0.811


# --- n-grams and Kneser-Ney ----------------------------------------------------------------------


def test_kneser_ney_bigram_by_hand():
    # train 0 1 0 1 0 2 (V = 3). Bigrams: (0,1) x2, (1,0) x2, (0,2) x1 -> D2 = 1 / (1 + 2*2) = 0.2.
    # Continuation counts N1+(. w): 0 <- {1}, 1 <- {0}, 2 <- {0}: one each, so D1 = 1 and the
    # order-1 distribution is (0 + 1 * 3/3 * 1/3) / 3 ... = 1/3 each, though the raw counts are 3:2:1.
    # P(1 | 0) = (2 - 0.2)/3 + 0.2 * 2/3 * 1/3;  P(2 | 1) = 0 + 0.2 * 1/2 * 1/3.
    levels = count(np.array([0, 1, 0, 1, 0, 2]), 2, 3)
    assert levels[0].cont.tolist() == [1, 1, 1]
    model = KneserNey(levels, 2, 3)
    p10 = 1.8 / 3 + 0.2 * 2 / 3 / 3
    p21 = 0.2 * 1 / 2 / 3
    np.testing.assert_allclose(model.distribution([0]), [0.2 * 2 / 9, p10, 0.8 / 3 + 0.2 * 2 / 9])
    np.testing.assert_allclose(np.exp(model.logprobs(np.array([0, 1, 2]))), [p10, p21])


def test_ngram_bits_per_byte_by_hand():
    # The same model through the ladder's rung: val 0 1 2 (3 tokens, say 6 bytes), targets 1, 2.
    shards = shards_of([0, 1, 0, 1, 0, 2], [0, 1, 2], val_bytes=6)
    cfg = ladder.LadderConfig(max_order=2)
    (rung,) = ladder.ngrams(shards, IdTokenizer(3), cfg, ("a",), SamplingParams(max_new_tokens=4))
    nats = -(math.log(1.8 / 3 + 0.2 * 2 / 9) + math.log(0.2 / 6)) / 2
    assert rung.bits_per_byte == pytest.approx(nats * 3 / (math.log(2) * 6))
    assert rung.size == 3 + 3  # 3 unigrams + 3 bigram types
    assert rung.kind == "ngram" and len(rung.samples[0][1]) == 4


def test_kneser_ney_sums_to_one_for_sampled_contexts():
    rng = np.random.default_rng(0)
    V = 12
    weights = np.r_[np.full(6, 3.0), np.full(6, 1.0)]
    tokens = rng.choice(V, size=3000, p=weights / weights.sum())
    tokens[::7] = 3  # some structure, so the higher orders differ from the lower
    levels = count(tokens, 4, V)
    for n in (1, 2, 3, 4):
        model = KneserNey(levels, n, V)
        for _ in range(20):
            start = int(rng.integers(0, len(tokens) - 3))
            seen = tokens[start : start + 3].tolist()
            for history in (seen, rng.integers(0, V, size=3).tolist(), [11, 11, 11], []):
                p = model.distribution(history)
                assert p.sum() == pytest.approx(1.0, abs=1e-12) and p.min() > 0
        # a target's logprob is the distribution of its history at that target
        lp = model.logprobs(tokens[:50])
        for i in (1, 2, 10, 49):
            want = model.distribution(tokens[max(0, i - n + 1) : i].tolist())[tokens[i]]
            assert lp[i - 1] == pytest.approx(math.log(want))


def test_unseen_context_backs_off_to_the_lower_order():
    tri = KneserNey(count(np.array([0, 1, 2, 0, 1, 2, 3]), 3, 5), 3, 5)
    # (3, 1) and (4, 1) never occurred: both fall back on the same order-2 distribution after 1,
    # which (0, 1), seen twice before a 2, does not.
    np.testing.assert_allclose(tri.distribution([3, 1]), tri.distribution([4, 1]))
    assert tri.distribution([0, 1])[2] > tri.distribution([4, 1])[2]
    assert tri.distribution([4])[4] > 0  # token 4 was never seen at all, and still has mass


def test_count_orders_yields_each_order_and_guards_memory():
    orders = list(count_orders(np.arange(10) % 4, 3, 4))
    assert [len(levels) for levels in orders] == [1, 2, 3]
    with pytest.raises(ConfigError, match=r"5-gram tables of 1,000 tokens need about .* GB"):
        next(count_orders(np.zeros(1000, np.int64), 5, 4, available=1000))


# --- word vectors --------------------------------------------------------------------------------


def test_skipgram_loss_by_hand():
    # v_c = (1, 0); the context o has u_o = (2, 0); the one noise token u_n = (0, 1):
    # loss = -log sigmoid(u_o . v_c) - log sigmoid(-u_n . v_c) = -log sigmoid(2) - log sigmoid(0)
    model = SkipGram(3, 2)
    with torch.no_grad():
        model.center.weight.copy_(torch.tensor([[1.0, 0.0], [0, 0], [0, 0]]))
        model.context.weight.copy_(torch.tensor([[0.0, 0.0], [2, 0], [0, 1]]))
    batch = SkipGramBatch(
        torch.tensor([[0]]), torch.tensor([[1, -100]]), negatives=torch.tensor([[[2], [2]]])
    )
    out = skipgram_loss(model, batch)
    assert out.n_targets == 1  # the ignored pair adds nothing
    assert out.loss_sum.item() == pytest.approx(-math.log(sigmoid(2)) - math.log(sigmoid(0)))


def test_skipgram_puts_co_occurring_words_nearest(tmp_path):
    # Two "topics": tokens 0-3 only ever appear among themselves, 4-7 likewise.
    rng = np.random.default_rng(0)
    blocks = [rng.integers(0, 4, 12) + 4 * rng.integers(0, 2) for _ in range(400)]
    tokens = np.concatenate(blocks)
    model = SkipGram(8, 16)
    batches = SkipGramSampler(tokens, 8, 64, window=2, negatives=3, subsample=1.0, seed=0)
    cfg = TrainConfig(
        max_steps=60, batch_size=64, lr=0.05, min_lr=0.005, weight_decay=0.0, warmup_steps=5,
        eval_every=0, checkpoint_every=0, device="cpu", progress=False,
    )  # fmt: skip
    train(model, skipgram_loss, batches, cfg, tmp_path)
    vectors = model.center.weight
    for word in range(8):
        group = set(range(4)) if word < 4 else set(range(4, 8))
        assert set(neighbours(vectors, word, 3)) == group - {word}, word
    assert analogy(vectors, 0, 1, 4) in range(4, 8)  # stays in the topic of the third word


# --- the neural language model -------------------------------------------------------------------


def test_bengio_mlp_by_hand():
    # V = 2, d = 1, n = 2, hidden 1: logits_t = b + U tanh(c + H [e(w_{t-1}); e(w_t)])
    model = BengioLM(torch.tensor([[0.5], [-1.0]]), n=2, hidden=1)
    with torch.no_grad():
        model.hidden.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.hidden.bias.fill_(0.1)
        model.out.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        model.out.bias.copy_(torch.tensor([0.0, 0.5]))
    logits = model(torch.tensor([[0, 1]]))  # (1, 2, 2)
    h0 = math.tanh(0.1 + 1 * 0.0 + 2 * 0.5)  # position 0: nothing before it (a zero vector)
    h1 = math.tanh(0.1 + 1 * 0.5 + 2 * -1.0)
    torch.testing.assert_close(logits[0], torch.tensor([[h0, 0.5 - h0], [h1, 0.5 - h1]]))
    assert model.num_params() == 2 + 3 + 4  # the frozen table counts; only 7 are trained
    assert not model.emb.weight.requires_grad
