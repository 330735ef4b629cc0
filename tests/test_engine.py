"""The engine with mock models (nanochat style) and with the real tiny Transformer.

HashModel honours the KVCache contract honestly: it stores each token id in the cache as its "key"
and computes its logits from the ids it can see through the cache's mask, so any mistake in
lengths, padding, keep_rows or truncation changes its output. ScriptModel plays a fixed script of
tokens, for stop strings and UTF-8 chunking.
"""

import codecs

import pytest
import torch
from torch import nn

from pellucid.errors import ConfigError, PellucidError
from pellucid.infer.engine import Engine, Session, Timing, common_prefix, split_stop
from pellucid.infer.sampling import SamplingParams, apply_repetition_penalty, seen_mask
from pellucid.model.config import PRESETS, ModelConfig

EMOJI = "😀".encode()  # 4 bytes


class PieceTokenizer:
    """A stand-in tokenizer: ids 0..255 are bytes, then extra multi-byte pieces, then <eos>."""

    def __init__(self, extra=()):
        self.pieces = [bytes([i]) for i in range(256)] + list(extra)
        self.eos_id = len(self.pieces)
        self.bos_id = None
        self.special_tokens = {"<eos>": self.eos_id}

    @property
    def vocab_size(self):
        return len(self.pieces) + 1

    def token_bytes(self, id):
        return b"<eos>" if id == self.eos_id else self.pieces[id]

    def encode(self, text, allowed_special=frozenset()):
        return list(text.encode())

    def decode(self, ids):
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def id_of(self, piece):
        return self.pieces.index(piece)


def config(vocab_size, context_len=64):
    return ModelConfig(
        vocab_size=vocab_size, context_len=context_len, n_layer=1, n_head=1, n_kv_head=1, n_embd=2
    )


class HashModel(nn.Module):
    """Logits = table[sum over visible positions s of (id_s + 1) * (s + 1), mod 997]."""

    def __init__(self, vocab_size=260, context_len=64):
        super().__init__()
        self.cfg = config(vocab_size, context_len)
        g = torch.Generator().manual_seed(0)
        self.table = nn.Parameter(
            torch.randn(997, vocab_size, generator=g) * 3, requires_grad=False
        )
        self.modes = []

    def forward(self, ids, *, cache=None):
        return self.logits(self.forward_hidden(ids, cache=cache))

    def logits(self, hidden):
        return self.table[hidden[..., 0].long() % 997]

    def forward_hidden(self, ids, *, cache=None):
        self.modes.append(self.training)
        B, T = ids.shape
        if cache is None:
            weights = (ids + 1) * (torch.arange(T) + 1)  # (B, T)
            h = weights.cumsum(1)  # causal: position t sees 0..t
        else:
            pos, mask = cache.prepare(T)  # (B, T), (B, 1, T, S)
            kv = ids.float()[:, None, :, None].expand(B, 1, T, 2)  # the id as key and value
            keys, _ = cache.update(0, kv, kv, pos, mask.shape[-1])  # (B, 1, S, 2)
            seen = keys[:, 0, :, 0].long()  # (B, S)
            weights = (seen + 1) * (torch.arange(seen.shape[1]) + 1)
            h = (weights[:, None, :] * mask[:, 0]).sum(-1)  # (B, T)
        return h[..., None].float()  # (B, T, 1): the "hidden state" is the hash


class ScriptModel(nn.Module):
    """Emits `script` after a prompt of `prompt_len` tokens, whatever the ids are."""

    def __init__(self, script, prompt_len, vocab_size, context_len=64):
        super().__init__()
        self.cfg = config(vocab_size, context_len)
        self.script, self.prompt_len = list(script), prompt_len
        self.dummy = nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, ids, *, cache=None):
        return self.logits(self.forward_hidden(ids, cache=cache))

    def logits(self, hidden):
        return torch.nn.functional.one_hot(hidden[..., 0].long(), self.cfg.vocab_size).float() * 10

    def forward_hidden(self, ids, *, cache=None):
        B, T = ids.shape
        pos = torch.arange(T)[None].expand(B, T)
        if cache is not None:
            pos = pos + cache.lengths[:, None]
        nxt = (pos - self.prompt_len + 1).clamp(0, len(self.script) - 1)
        return torch.tensor(self.script)[nxt][..., None].float()  # (B, T, 1): the next token


class FixedModel(nn.Module):
    """The same logits at every position."""

    def __init__(self, logits):
        super().__init__()
        self.cfg = config(len(logits))
        self.fixed = nn.Parameter(torch.tensor(logits), requires_grad=False)

    def forward(self, ids, *, cache=None):
        return self.logits(self.forward_hidden(ids, cache=cache))

    def logits(self, hidden):
        return self.fixed.expand(*hidden.shape[:-1], -1)

    def forward_hidden(self, ids, *, cache=None):
        return torch.zeros(*ids.shape, 1)


def ids_of(steps_iter):
    rows = {}
    for steps in steps_iter:
        for s in steps:
            rows.setdefault(s.row, []).append(s)
    return {r: [s.id for s in ss] for r, ss in rows.items()}, rows


PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8], [9]]


# --- pure helpers ----------------------------------------------------------------------------------


def test_split_stop_holds_back_possible_starts_only():
    assert split_stop("Hello, wor", ["world"]) == ("Hello, ", "wor", False)
    assert split_stop("Hello, war", ["world"]) == ("Hello, war", "", False)
    assert split_stop("a world b world", ["world", "b"]) == ("a ", "", True)
    assert split_stop("xx", []) == ("xx", "", False)
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2


# --- decoding rules with the mock ------------------------------------------------------------------


def test_temperature_zero_is_greedy_and_logprobs_are_the_models():
    model = HashModel()
    params = SamplingParams(temperature=0, max_new_tokens=12, top_logprobs=3)
    ids, rows = ids_of(Engine(model).generate([PROMPTS[0]], params))
    got, seq = ids[0], list(PROMPTS[0])
    for step in rows[0]:
        logits = model(torch.tensor([seq]))[0, -1]
        logprobs = torch.log_softmax(logits, -1)
        assert step.id == int(logits.argmax())
        assert step.logprob == pytest.approx(float(logprobs[step.id]), abs=1e-5)
        assert [i for i, _ in step.top] == logprobs.topk(3).indices.tolist()
        seq.append(step.id)
    assert seq[len(PROMPTS[0]) :] == got
    assert rows[0][-1].finish_reason == "length" and len(got) == 12


def test_seed_reproducible_and_independent_of_the_batch():
    engine = Engine(HashModel())
    params = SamplingParams(temperature=1.0, top_k=50, max_new_tokens=15, seed=123)
    batch, _ = ids_of(engine.generate(PROMPTS, params))
    again, _ = ids_of(engine.generate(PROMPTS, params))
    assert batch == again
    for row, prompt in enumerate(PROMPTS):  # row i uses seed + i, whoever else is in the batch
        alone, _ = ids_of(
            engine.generate([prompt], SamplingParams(**{**vars(params), "seed": 123 + row}))
        )
        assert alone[0] == batch[row]
    other, _ = ids_of(engine.generate(PROMPTS, SamplingParams(**{**vars(params), "seed": 124})))
    assert other[0] != batch[0]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_ragged_batch_equals_one_by_one_and_cached_equals_uncached(temperature):
    engine = Engine(HashModel())
    params = SamplingParams(temperature=temperature, max_new_tokens=10, seed=5, top_p=0.9)
    batch, _ = ids_of(engine.generate(PROMPTS, params))
    uncached, _ = ids_of(engine.generate(PROMPTS, params, use_cache=False))
    assert batch == uncached
    for row, prompt in enumerate(PROMPTS):
        alone, _ = ids_of(
            engine.generate([prompt], SamplingParams(**{**vars(params), "seed": 5 + row}))
        )
        assert alone[0] == batch[row]


def test_rows_finish_independently_and_leave_the_batch():
    tok = PieceTokenizer()
    script = [ord("a"), ord("b"), ord("c"), tok.eos_id, ord("d")]
    model = ScriptModel(script, prompt_len=2, vocab_size=tok.vocab_size)
    engine = Engine(model, tok)
    params = SamplingParams(temperature=0, max_new_tokens=6, stop_token_ids=[tok.eos_id])
    # The script is indexed by position: row 1's longer prompt starts it one token later.
    steps = list(engine.generate([[1, 2], [1, 2, 3]], params))
    assert [[s.row for s in ss] for ss in steps] == [[0, 1], [0, 1], [0, 1], [0]]
    row0 = [s for ss in steps for s in ss if s.row == 0]
    row1 = [s for ss in steps for s in ss if s.row == 1]
    assert [s.id for s in row0] == [ord("a"), ord("b"), ord("c"), tok.eos_id]
    assert [s.id for s in row1] == [ord("b"), ord("c"), tok.eos_id]
    assert row1[-1].finish_reason == "stop" and "".join(s.text for s in row1) == "bc"


def test_max_new_tokens_and_context_length():
    engine = Engine(HashModel(context_len=16))
    done = engine.complete([1, 2, 3], SamplingParams(temperature=0, max_new_tokens=5))
    assert len(done.ids) == 5 and done.finish_reason == "length"
    full = engine.complete(list(range(1, 11)), SamplingParams(temperature=0, max_new_tokens=50))
    assert len(full.ids) == 6 and full.finish_reason == "length"  # 10 + 6 == context 16
    # In a batch the long row leaves first (keep_rows); the other's tokens do not change.
    params = SamplingParams(temperature=0.9, seed=2, max_new_tokens=50)
    batch, _ = ids_of(engine.generate([[1, 2, 3], list(range(1, 11))], params))
    assert [len(batch[0]), len(batch[1])] == [13, 6]
    assert batch[0] == engine.complete([1, 2, 3], params).ids


def test_prompt_errors_are_one_line_and_name_the_numbers():
    engine = Engine(HashModel(context_len=16))
    with pytest.raises(PellucidError) as e:
        engine.generate([list(range(20))], SamplingParams())
    msg = str(e.value)
    assert "20" in msg and "16" in msg and "\n" not in msg
    with pytest.raises(PellucidError, match="empty"):
        engine.generate([[1], []], SamplingParams())
    with pytest.raises(PellucidError, match="token id 999"):
        engine.generate([[1, 999]], SamplingParams())
    with pytest.raises(ConfigError, match="tokenizer"):
        engine.generate([[1]], SamplingParams(stop=["x"]))
    with pytest.raises(ConfigError, match="Session"):
        engine.generate([[1], [2]], SamplingParams(), session=Session())


def test_repetition_penalty_matches_the_formula_step_by_step():
    model = HashModel()
    params = SamplingParams(temperature=0, repetition_penalty=1.8, max_new_tokens=10)
    done = Engine(model).complete(PROMPTS[1], params)
    seq = list(PROMPTS[1])
    for t in done.ids:
        logits = model(torch.tensor([seq]))[:, -1]
        penalized = apply_repetition_penalty(
            logits, seen_mask([seq], 260, torch.device("cpu")), 1.8
        )
        assert t == int(penalized.argmax())
        seq.append(t)

    fixed = FixedModel([0.0, 0.0, 3.0, 2.0, -1.0])  # prefers token 2, then 3
    penalized = Engine(fixed).complete(
        [0], SamplingParams(temperature=0, repetition_penalty=1.8, max_new_tokens=4)
    )
    assert penalized.ids == [2, 3, 2, 2]  # 3/1.8 < 2 picks 3 once; then 3/1.8 > 2/1.8
    plain = Engine(fixed).complete([0], SamplingParams(temperature=0, max_new_tokens=4))
    assert plain.ids == [2, 2, 2, 2]


def test_model_is_in_eval_mode_while_generating_and_its_mode_is_restored():
    model = HashModel()
    model.train()
    Engine(model).complete([1, 2], SamplingParams(temperature=0, max_new_tokens=3))
    assert model.modes and not any(model.modes)
    assert model.training


def test_timing_counts_prefill_and_decode_tokens():
    timing = Timing()
    steps = list(
        Engine(HashModel()).generate(
            PROMPTS, SamplingParams(temperature=0, max_new_tokens=4), timing=timing
        )
    )
    assert len(steps) == 4
    assert timing.prefill_tokens == sum(map(len, PROMPTS)) and timing.decode_tokens == 9
    assert timing.prefill_tokens_per_s > 0 and timing.decode_tokens_per_s > 0


# --- text: stop strings and UTF-8 (RELIABILITY.md A12) ---------------------------------------------


def play(pieces, stop, max_new_tokens=50, extra=(), stop_token_ids=None):
    """Run a ScriptModel that emits `pieces` (bytes each), return (completion, tokenizer)."""
    tok = PieceTokenizer(extra)
    script = [tok.id_of(p) for p in pieces] + [tok.eos_id]
    model = ScriptModel(script, prompt_len=1, vocab_size=tok.vocab_size)
    ids = [tok.eos_id] if stop_token_ids is None else stop_token_ids
    params = SamplingParams(
        temperature=0, stop=stop, stop_token_ids=ids, max_new_tokens=max_new_tokens
    )
    return Engine(model, tok).complete([0], params), tok


def expected_text(tok, ids, stops):
    """The non-streaming answer: decode everything, cut at the earliest stop string."""
    text = tok.decode([i for i in ids if i != tok.eos_id])
    cuts = [text.find(s) for s in stops if s in text]
    return text[: min(cuts)] if cuts else text


@pytest.mark.parametrize(
    ("pieces", "stop", "want"),
    [
        ([b"Hello", b" wor", b"ld!", b" more"], ["world"], "Hello "),  # stop spans two tokens
        ([b"caf", b"\xc3", b"\xa9 au", b" lait"], ["\xe9 au"], "caf"),  # "é" split over tokens
        ([b"ok ", EMOJI[:2], EMOJI[2:] + b"!", b"x"], ["😀!"], "ok "),  # emoji split over tokens
        ([b"a\xc3", b"\xa9b", b"c"], ["b"], "a\xe9"),  # the cut lands inside a multibyte token
        ([b"x", b"<", b"/", b"s", b">", b"tail"], ["</s>", "<|"], "x"),
        ([b"one wo", b"rk, two", b" words"], ["word"], "one work, two "),  # near miss, then hit
    ],
)
def test_stop_strings_never_leak_and_stream_equals_final_text(pieces, stop, want):
    extra = [p for p in pieces if len(p) > 1]
    done, tok = play(pieces, stop, extra=extra)
    assert done.text == want == expected_text(tok, done.ids, stop)
    assert done.finish_reason == "stop" and done.steps[-1].finish_reason == "stop"
    emitted = ""
    for step in done.steps:  # no prefix of the text ever ended inside a stop string
        emitted += step.text
        assert want.startswith(emitted)


def test_partial_stop_at_the_end_is_emitted_when_generation_ends():
    done, _ = play([b"abc", b" wor"], ["world"], max_new_tokens=2, extra=[b"abc", b" wor"])
    assert done.text == "abc wor" and done.finish_reason == "length"
    assert done.steps[0].text == "abc" and done.steps[1].text == " wor"


def test_stop_token_ends_without_its_text():
    done, tok = play([b"h", b"i"], [])
    assert done.ids == [ord("h"), ord("i"), tok.eos_id]
    assert done.text == "hi" and done.finish_reason == "stop"


def test_utf8_chunks_are_whole_characters():
    text = "a😀é🎉z"
    done, _ = play([bytes([b]) for b in text.encode()], [])
    assert done.text == text
    for step in done.steps:
        step.text.encode("utf-8")  # no lone surrogates
        assert "\ufffd" not in step.text
    assert [s.text for s in done.steps if s.text] == list(text)


def test_streaming_equals_final_text_on_random_bytes():
    """Random bytes (often invalid UTF-8): the deltas still join to the incremental decode."""
    tok = PieceTokenizer()
    engine = Engine(HashModel(vocab_size=tok.vocab_size), tok)
    params = SamplingParams(temperature=1.0, seed=3, max_new_tokens=40, stop=["\x80\x81"])
    done = engine.complete([1, 2, 3], params)
    raw = b"".join(tok.token_bytes(i) for i in done.ids)
    decoded = codecs.decode(raw, "utf-8", errors="replace")
    assert decoded.startswith(done.text)


# --- sessions: prefix reuse ------------------------------------------------------------------------


def test_session_reuses_the_prefix_and_matches_a_fresh_prefill():
    engine = Engine(HashModel())
    params = SamplingParams(temperature=0.7, seed=1, max_new_tokens=6)
    session = Session()
    first = engine.complete([3, 1, 4, 1, 5], params, session=session)
    assert session.ids == [3, 1, 4, 1, 5, *first.ids[:-1]]  # the last token is not yet cached
    turn2 = [3, 1, 4, 1, 5, *first.ids, 9, 2, 6]
    timing = Timing()
    reused = list(engine.generate([turn2], params, session=session, timing=timing))
    fresh = list(engine.generate([turn2], params))
    assert [s[0].id for s in reused] == [s[0].id for s in fresh]
    assert timing.prefill_tokens == 4  # the last generated token and the three new ones
    edited = [3, 1, 7, 7]  # diverges inside the cached prefix
    again = engine.complete(edited, params, session=session)
    assert again.ids == engine.complete(edited, params).ids


# --- the real tiny Transformer ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from pellucid.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny"])
    with torch.no_grad():  # bigger weights than the init's, so the next token is rarely a near-tie
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
    return model.eval()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_tiny_transformer_cached_uncached_and_ragged_agree(tiny, temperature):
    engine = Engine(tiny)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [42], [9, 8, 7, 6]]
    params = SamplingParams(temperature=temperature, seed=11, max_new_tokens=20)
    cached, _ = ids_of(engine.generate(prompts, params))
    uncached, _ = ids_of(engine.generate(prompts, params, use_cache=False))
    assert cached == uncached
    for row, prompt in enumerate(prompts):
        alone, _ = ids_of(
            engine.generate([prompt], SamplingParams(**{**vars(params), "seed": 11 + row}))
        )
        assert alone[0] == cached[row]


def test_tiny_transformer_session_matches_fresh(tiny):
    engine = Engine(tiny)
    params = SamplingParams(temperature=0, max_new_tokens=8)
    session = Session()
    first = engine.complete([10, 20, 30], params, session=session)
    turn2 = [10, 20, 30, *first.ids, 40, 50]
    assert engine.complete(turn2, params, session=session).ids == engine.complete(turn2, params).ids


# --- the CLI verb ----------------------------------------------------------------------------------


@pytest.fixture
def scripted_cli(monkeypatch):
    """`pellucid generate` over a ScriptModel, with the model loader stubbed out."""
    import sys
    import types

    tok = PieceTokenizer([b"lo", b" w\xc3", b" STOP"])
    pieces = [b"lo", b" w\xc3", b"\xa9", b"!", b" STOP", b"x"]
    model = ScriptModel([tok.id_of(p) for p in pieces], prompt_len=3, vocab_size=tok.vocab_size)
    fake = types.ModuleType("pellucid.weights.resolve")
    fake.DEFAULT_MODEL = "default"
    fake.load = lambda spec, **options: types.SimpleNamespace(model=model, tokenizer=tok)
    monkeypatch.setitem(sys.modules, "pellucid.weights.resolve", fake)
    return tok


def test_cli_generate_json(scripted_cli, capsys):
    import json

    from pellucid.cli import main

    args = ["generate", "--model", "m", "Hel", "--json", "--temperature", "0", "--stop", " STOP"]
    assert main([*args, "--top-logprobs", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_ids"] == list(b"Hel")
    assert out["text"] == "lo w\xe9!" and out["finish_reason"] == "stop"
    assert len(out["ids"]) == len(out["steps"]) == 5
    step = out["steps"][0]
    assert step["id"] == scripted_cli.id_of(b"lo") and step["logprob"] <= 0
    assert [t["id"] for t in step["top"]][:1] == [step["id"]] and len(step["top"]) == 2
    assert set(out["timing"]) >= {"prefill_tokens_per_s", "decode_tokens_per_s"}


def test_cli_generate_streams_text(scripted_cli, capsys):
    from pellucid.cli import main

    assert (
        main(["generate", "--model", "m", "Hel", "--temperature", "0", "--max-new-tokens", "3"])
        == 0
    )
    assert capsys.readouterr().out == "lo w\xe9\n"
    assert main(["generate", "--model", "m", "Hel", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err
