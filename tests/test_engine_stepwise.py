"""The engine's step-wise core: sequences that join and leave between steps, per-row params, the KV
pool's accounting and budget, cancellation, and Sessions whose cache grows with the conversation.

The rule every test leans on: a sequence's tokens do not depend on who else is in the batch, nor
on when it joined. Each is compared with the same prompt run alone on a fresh engine.
"""

import random
from dataclasses import replace

import pytest
import torch
from test_engine import HashModel, PieceTokenizer, ScriptModel

from pellucid.errors import CapacityError, ConfigError, PellucidError
from pellucid.infer.engine import Engine, Session, Timing
from pellucid.infer.kv_pool import next_power_of_two
from pellucid.infer.sampling import SamplingParams
from pellucid.model.config import PRESETS
from pellucid.model.kv_cache import bytes_per_token

GREEDY = SamplingParams(temperature=0, max_new_tokens=10, top_logprobs=2)


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


def alone(model, prompt, params, tokenizer=None):
    """The same prompt on a fresh engine, by itself: its steps."""
    return Engine(model, tokenizer).complete(prompt, params).steps


def drive(engine, joins, check=None):
    """Step the engine to the end; joins[k] = [(prompt, params), ...] are added before step k.

    Returns {handle: [Step, ...]} and asserts that every live sequence yields exactly one Step
    per step and that a finished one never shows up again.
    """
    out, live, k = {}, set(), 0
    while k in joins or live or any(j > k for j in joins):
        for prompt, params in joins.get(k, []):
            h = engine.add(prompt, params)
            out[h] = []
            live.add(h)
        steps = engine.step()
        assert sorted(s.row for s in steps) == sorted(live)
        for s in steps:
            out[s.row].append(s)
            if s.finish_reason is not None:
                live.discard(s.row)
        assert engine.n_live == len(live)
        if check is not None:
            check(engine)
        k += 1
    return out


def same(steps_a, steps_b):
    """Two runs agree on ids, text, finish reason and the reported alternatives."""
    assert [s.id for s in steps_a] == [s.id for s in steps_b]
    assert [s.text for s in steps_a] == [s.text for s in steps_b]
    assert steps_a[-1].finish_reason == steps_b[-1].finish_reason
    assert [[i for i, _ in s.top] for s in steps_a] == [[i for i, _ in s.top] for s in steps_b]
    for a, b in zip(steps_a, steps_b, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


# --- join / leave equivalence ----------------------------------------------------------------------


@pytest.mark.parametrize("which", ["hash", "tiny"])
def test_sequences_joining_mid_decode_equal_the_prompt_run_alone(which, tiny):
    model = HashModel() if which == "hash" else tiny
    prompts = [[5, 6, 7], list(range(1, 12)), [9], [4, 4, 4, 4, 4], [2, 7]]
    lengths = [12, 4, 9, 6, 15]  # some leave while others are still joining
    params = [replace(GREEDY, max_new_tokens=n) for n in lengths]
    joins = {0: [(prompts[0], params[0]), (prompts[1], params[1])], 2: [(prompts[2], params[2])]}
    joins[5] = [(prompts[3], params[3]), (prompts[4], params[4])]  # after prompt 1 has left
    engine = Engine(model)
    got = drive(engine, joins)
    assert len(got) == 5 and engine.kv_bytes_used == 0
    for h, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        same(got[h], alone(model, prompt, p))
        assert len(got[h]) == p.max_new_tokens and got[h][-1].finish_reason == "length"


def test_rows_that_move_in_the_pool_keep_their_tokens(tiny):
    """Cancelling a middle row moves the last row into its place: nobody's tokens change."""
    engine = Engine(tiny)
    prompts = [[1, 2, 3], [8, 9], [3, 3, 3, 3, 3, 3], [7]]
    handles = [engine.add(p, replace(GREEDY, max_new_tokens=12)) for p in prompts]
    got = {h: [] for h in handles}
    for k in range(12):
        if k == 3:
            engine.cancel(handles[1])  # row 1: the last row (prompt 3) moves there
            engine.cancel(handles[1])  # twice: ignored
        if k == 6:
            engine.cancel(handles[0])
        for s in engine.step():
            got[s.row].append(s)
    assert [len(got[h]) for h in handles] == [6, 3, 12, 12]
    for h, p in zip(handles, prompts, strict=True):
        full = alone(tiny, p, replace(GREEDY, max_new_tokens=12))
        assert [s.id for s in got[h]] == [s.id for s in full[: len(got[h])]]
    assert engine.n_live == 0 and engine.kv_bytes_used == 0
    assert engine.step() == []
    engine.cancel(12345)  # unknown handle: ignored


def test_heterogeneous_params_in_one_batch_give_each_rows_tokens_alone():
    tok = PieceTokenizer()
    model = HashModel(vocab_size=tok.vocab_size)
    rows = [
        ([5, 6, 7], SamplingParams(temperature=0, max_new_tokens=9)),
        ([1, 2], SamplingParams(temperature=0.9, top_p=0.8, seed=7, max_new_tokens=14)),
        ([3], SamplingParams(temperature=1.3, top_k=20, seed=7, max_new_tokens=5, top_logprobs=4)),
        ([8, 8], SamplingParams(temperature=0, repetition_penalty=1.5, max_new_tokens=12)),
        ([2, 9], SamplingParams(temperature=0.7, min_p=0.05, seed=99, max_new_tokens=11)),
    ]
    engine = Engine(model, tok)
    got = drive(engine, {0: rows[:3], 1: rows[3:]})
    for h, (prompt, params) in enumerate(rows):
        same(got[h], alone(model, prompt, params, tok))
        assert all(len(s.top) == params.top_logprobs for s in got[h])
    # generate keeps its rule: prompt i samples with seed + i
    p = SamplingParams(temperature=1.0, seed=3, max_new_tokens=6)
    batch = list(engine.generate([[1], [2], [3]], p))
    for i in range(3):
        mine = [s.id for ss in batch for s in ss if s.row == i]
        assert mine == [s.id for s in alone(model, [i + 1], replace(p, seed=3 + i))]


def test_stop_strings_and_utf8_hold_per_row():
    """Rows with different stop strings side by side: each one's text is cut at its own."""
    tok = PieceTokenizer([b"Hello", b" wor", b"ld!", b" \xc3", b"\xa9t\xc3", b"\xa9"])
    pieces = [b"Hello", b" wor", b"ld!", b" \xc3", b"\xa9t\xc3", b"\xa9", b"x"]
    script = [tok.id_of(p) for p in pieces] + [tok.eos_id]
    model = ScriptModel(script, prompt_len=1, vocab_size=tok.vocab_size)
    base = SamplingParams(temperature=0, max_new_tokens=20, stop_token_ids=[tok.eos_id])
    rows = [
        ([0], replace(base, stop=["world"])),
        ([0], replace(base, stop=["\xe9t"])),  # the stop string spans a split character
        ([0], base),
        ([0], replace(base, max_new_tokens=4)),  # ends mid character: the rest flushes
    ]
    engine = Engine(model, tok)
    got = drive(engine, {0: rows[:2], 2: rows[2:]})
    texts = ["".join(s.text for s in got[h]) for h in range(4)]
    assert texts == ["Hello ", "Hello world! ", "Hello world! \xe9t\xe9x", "Hello world! \ufffd"]
    assert [got[h][-1].finish_reason for h in range(4)] == ["stop", "stop", "stop", "length"]
    for h, (prompt, params) in enumerate(rows):
        same(got[h], alone(model, prompt, params, tok))
        assert all("\ufffd" not in s.text for s in got[h][:-1])


# --- the pool: accounting, budget, cancellation ----------------------------------------------------


def test_pool_accounting_is_exact_under_random_joins_cancels_and_finishes():
    model = HashModel(context_len=64)
    per_token = bytes_per_token(model.cfg, torch.float32)
    engine = Engine(model, kv_budget_bytes=per_token * 64 * 6)
    rng = random.Random(0)
    seen_bytes = []
    handles = []
    for _ in range(60):
        if rng.random() < 0.5:
            prompt = [rng.randrange(1, 200) for _ in range(rng.randrange(1, 30))]
            params = replace(GREEDY, max_new_tokens=rng.randrange(1, 30))
            need = min(len(prompt) + params.max_new_tokens, 64)
            if engine.can_admit(need):
                handles.append(engine.add(prompt, params))
            else:
                with pytest.raises(CapacityError):
                    engine.add(prompt, params)
        if handles and rng.random() < 0.2:
            engine.cancel(handles.pop(rng.randrange(len(handles))))
        engine.step()
        seen_bytes.append(engine.kv_bytes_used)
        assert engine.kv_bytes_used <= engine.kv_bytes_budget
        assert engine.kv_bytes_used == sum(t.nbytes for t in engine.pool.k + engine.pool.v)
    assert max(seen_bytes) > 0
    for h in handles:
        engine.cancel(h)
    assert engine.n_live == 0 and engine.kv_bytes_used == 0 and not engine.pool.reserved


def test_capacity_error_when_the_budget_is_exceeded():
    model = HashModel(context_len=256)
    per_token = bytes_per_token(model.cfg, torch.float32)
    engine = Engine(model, kv_budget_bytes=per_token * 130)
    assert engine.kv_bytes_budget == per_token * 130 and engine.kv_bytes_used == 0
    first = engine.add([1] * 20, replace(GREEDY, max_new_tokens=40))  # reserves 60 tokens
    assert engine.kv_bytes_used >= per_token * 60
    # Rows are as long as the longest reservation: two of 60 fit in 130 tokens, three do not.
    assert engine.can_admit(60) and not engine.can_admit(71)
    engine.add([2] * 5, replace(GREEDY, max_new_tokens=20))
    assert not engine.can_admit(10)
    with pytest.raises(CapacityError, match="full") as err:
        engine.add([1] * 5, replace(GREEDY, max_new_tokens=5))
    assert "\n" not in str(err.value)
    with pytest.raises(CapacityError, match="whole budget"):
        engine.add([1] * 20, replace(GREEDY, max_new_tokens=200))
    assert engine.n_live == 2  # the refused ones left nothing behind
    while engine.n_live:
        engine.step()
    assert engine.kv_bytes_used == 0 and engine.can_admit(130)
    assert first == 0 and engine.add([1], GREEDY) == 2  # handles are never reused
    # generate queues what does not fit yet and still gives every prompt its tokens alone
    engine = Engine(model, kv_budget_bytes=per_token * 130)
    prompts = [[1] * 20, [2] * 30, [3] * 10]
    batch = list(engine.generate(prompts, replace(GREEDY, max_new_tokens=40)))
    for i, p in enumerate(prompts):
        mine = [s.id for ss in batch for s in ss if s.row == i]
        assert mine == [s.id for s in alone(model, p, replace(GREEDY, max_new_tokens=40))]
    assert engine.kv_bytes_used == 0


def test_add_validates_like_generate():
    engine = Engine(HashModel(context_len=16))
    with pytest.raises(PellucidError, match="20 tokens") as err:
        engine.add(list(range(20)), GREEDY)
    assert "\n" not in str(err.value)
    with pytest.raises(PellucidError, match="empty"):
        engine.add([], GREEDY)
    with pytest.raises(PellucidError, match="token id 999"):
        engine.add([1, 999], GREEDY)
    with pytest.raises(ConfigError, match="tokenizer"):
        engine.add([1], SamplingParams(stop=["x"]))
    with pytest.raises(ConfigError, match="SamplingParams"):
        engine.add([1], {"temperature": 0})
    with pytest.raises(ConfigError, match="kv_budget_bytes"):
        Engine(HashModel(), kv_budget_bytes=0)
    assert engine.n_live == 0
    engine.add([1, 2], GREEDY)
    with pytest.raises(ConfigError, match="live"):  # generate drives the steps itself
        engine.generate([[1]], GREEDY)


def test_an_abandoned_generate_frees_its_sequences():
    engine = Engine(HashModel())
    it = engine.generate([[1, 2], [3]], replace(GREEDY, max_new_tokens=30))
    next(it), next(it)
    assert engine.n_live == 2 and engine.kv_bytes_used > 0
    it.close()
    assert engine.n_live == 0 and engine.kv_bytes_used == 0


def test_a_failed_step_cancels_everything():
    model = HashModel()
    engine = Engine(model)
    engine.add([1, 2], GREEDY)
    engine.step()
    with torch.no_grad():
        model.table.fill_(float("nan"))
    try:
        with pytest.raises(PellucidError, match="NaN"):
            engine.step()
    finally:
        with torch.no_grad():
            model.table.copy_(HashModel().table)
    assert engine.n_live == 0 and engine.kv_bytes_used == 0


def test_step_timing_splits_prefill_and_decode():
    engine = Engine(HashModel())
    engine.add([1, 2, 3], GREEDY)
    engine.step()
    assert engine.last_step.prefill_tokens == 3 and engine.last_step.decode_tokens == 0
    engine.add([4, 5], GREEDY)
    engine.step()  # one decode row, one prefill
    assert engine.last_step.prefill_tokens == 2 and engine.last_step.decode_tokens == 1
    assert engine.last_step.prefill_s > 0 and engine.last_step.decode_s > 0


# --- sessions --------------------------------------------------------------------------------------


def test_session_cache_grows_with_the_conversation_and_reuses_the_prefix(tiny):
    engine = Engine(tiny)
    params = SamplingParams(temperature=0, max_new_tokens=4)
    session = Session()
    convo = [10, 20, 30]
    sizes = []
    for turn in range(3):
        timing = Timing()
        steps = list(engine.generate([convo], params, session=session, timing=timing))
        ids = [s[0].id for s in steps]
        assert ids == [s.id for s in alone(tiny, convo, params)]
        if turn:  # only the last reply token and the new message are run
            assert timing.prefill_tokens == 1 + 5
        cached = len(convo) + len(ids) - 1
        assert session.ids == [*convo, *ids][:cached]
        assert session.cache.max_len == next_power_of_two(cached) < tiny.cfg.context_len
        assert engine.kv_bytes_used == 0  # between turns the memory is the Session's
        sizes.append(session.cache.max_len)
        convo = [*convo, *ids, 40 + turn, 41, 42, 43, 44]
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0]
    with pytest.raises(ConfigError, match="Session"):
        engine.generate([[1], [2]], params, session=session)


def test_session_in_a_batch_with_others_and_cancelled_mid_turn(tiny):
    engine = Engine(tiny)
    params = SamplingParams(temperature=0, max_new_tokens=8)
    session = Session()
    engine.complete([1, 2, 3, 4], params, session=session)
    turn2 = [*session.ids, 5, 6]
    other = engine.add([9, 9, 9], params)
    engine.step()
    mine = engine.add(turn2, params, session=session)
    with pytest.raises(ConfigError, match="in use"):
        engine.add(turn2, params, session=session)
    got = {other: [], mine: []}
    for _ in range(3):
        for s in engine.step():
            got[s.row].append(s.id)
    assert got[mine] == [s.id for s in alone(tiny, turn2, params)][:3]
    engine.cancel(mine)  # the session keeps what its row had cached
    assert session.ids == [*turn2, *got[mine][:2]]
    engine.cancel(other)
    turn3 = [*session.ids, 7]
    again = engine.complete(turn3, params, session=session)
    assert again.ids == [s.id for s in alone(tiny, turn3, params)]
    assert again.timing.prefill_tokens == 1
    assert engine.kv_bytes_used == 0


def test_releasing_short_sequences_does_not_reallocate_the_pool_each_time(monkeypatch):
    # The shrink rule compared the buffer (rounded up to CHUNK tokens) with the unrounded need:
    # under CHUNK / 2 tokens a reservation looked like less than half of its own buffer, so every
    # release reallocated and copied the whole pool (quadratic over many short sequences).
    from pellucid.infer import kv_pool

    cfg = replace(PRESETS["tiny"], context_len=256)
    pool = kv_pool.KVPool(
        cfg, budget_bytes=1 << 30, device=torch.device("cpu"), dtype=torch.float32
    )
    for h in range(8):
        pool.reserve(h, 10)
        pool.place(h)
    resizes = []
    real = pool._resize
    monkeypatch.setattr(pool, "_resize", lambda *a: (resizes.append(a), real(*a)))
    for h in range(4):  # half of them leave: the buffer is not over twice what remains
        pool.release(h)
    assert resizes == []
    for h in range(4, 8):
        pool.release(h)
    assert pool.nbytes == 0  # and the last one frees it all
