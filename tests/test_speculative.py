"""Speculative decoding (infer/speculative.py in the engine): the same tokens as plain decoding.

Every test compares an engine with a drafter against a plain engine on the same model: greedy
output must be identical token for token (ids, finish reasons), whatever the drafter guesses:
prompt lookup (which often finds nothing), a tiny draft model with other weights (mostly wrong),
the model drafting for itself (always right: drafts run into EOS, max_new_tokens and the context),
and a drafter that guesses junk. Sampling keeps each token a draw from the model's distribution:
the same draws as plain sampling for the same seed, and a chi-square test on a vocabulary of 8.
"""

import dataclasses
import json
import math

import pytest
import torch

from pellucid.errors import ConfigError
from pellucid.infer.engine import Engine
from pellucid.infer.sampling import SamplingParams
from pellucid.infer.speculative import LookupDrafter, ModelDrafter
from pellucid.model.config import PRESETS
from pellucid.model.transformer import Transformer

GREEDY = SamplingParams(temperature=0, max_new_tokens=24, top_logprobs=2)
PROMPTS = [
    [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6],  # repeats: lookup has guesses from the start
    [1, 2, 3, 4],  # nothing to look up until the output repeats itself
    [200],
    list(range(30, 60)),  # long and all distinct
    [7, 7, 7, 7, 7, 7],
]


def tiny(seed, vocab_size=256):
    torch.manual_seed(seed)
    model = Transformer(dataclasses.replace(PRESETS["tiny"], vocab_size=vocab_size))
    with torch.no_grad():  # bigger weights than the init's, so the next token is rarely a near-tie
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
    return model.eval()


@pytest.fixture(scope="module")
def target():
    return tiny(0)


class Junk:
    """Guesses tokens the model (almost) never picks: every guess is rejected."""

    def propose(self, handle, ids, k):
        return [(ids[-1] * 31 + j) % 256 for j in range(k + 3)]  # more than asked: the engine cuts

    def forget(self, handle):
        pass


def drafters(model):
    return {
        "lookup": LookupDrafter(),
        "model": ModelDrafter(tiny(1), model.cfg.vocab_size),
        "self": ModelDrafter(model, model.cfg.vocab_size),
        "junk": Junk(),
    }


def run(engine, prompts, params):
    """{prompt index: [(id, finish_reason), ...]} from one generate call over all prompts."""
    out = {i: [] for i in range(len(prompts))}
    for steps in engine.generate(prompts, params):
        for s in steps:
            out[s.row].append((s.id, s.finish_reason))
    return out


@pytest.fixture(scope="module")
def plain(target):
    """Plain greedy decoding of PROMPTS, once per module."""
    return run(Engine(target), PROMPTS, GREEDY)


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("name", ["lookup", "model", "self", "junk"])
def test_greedy_equals_plain_greedy(target, plain, name, k):
    spec = Engine(target, draft=drafters(target)[name], draft_k=k)
    assert run(spec, PROMPTS, GREEDY) == plain
    assert spec.pool.nbytes == 0 and spec.n_live == 0


@pytest.mark.parametrize("name", ["lookup", "self"])
def test_logprobs_and_alternatives_equal_plain(target, name):
    spec = Engine(target, draft=drafters(target)[name], draft_k=3)
    for i, p in enumerate(PROMPTS[:2]):
        a, b = Engine(target).complete(p, GREEDY), spec.complete(p, GREEDY)
        assert b.ids == a.ids and b.finish_reason == a.finish_reason, i
        assert [s.top[1][0] for s in b.steps] == [s.top[1][0] for s in a.steps]
        torch.testing.assert_close(
            [s.logprob for s in b.steps], [s.logprob for s in a.steps], atol=1e-4, rtol=0
        )


@pytest.mark.parametrize("k", [1, 3, 5])
def test_eos_max_new_tokens_and_context_inside_a_draft(target, k):
    """The model drafting for itself guesses right, so drafts run past each end of a sequence."""
    plain_ids = Engine(target).complete(PROMPTS[1], GREEDY).ids
    eos = plain_ids[6]  # a stop token the output reaches mid-draft
    ctx = target.cfg.context_len
    cases = [
        (PROMPTS[1], dataclasses.replace(GREEDY, stop_token_ids=[eos])),
        (PROMPTS[1], dataclasses.replace(GREEDY, max_new_tokens=7)),
        (PROMPTS[0], dataclasses.replace(GREEDY, max_new_tokens=2)),
        (list(range(ctx - 9)), dataclasses.replace(GREEDY, max_new_tokens=50)),  # context ends it
        (list(range(ctx - 1)), GREEDY),  # room for one token: no draft at all
    ]
    for name in ("self", "lookup"):
        spec = Engine(target, draft=drafters(target)[name], draft_k=k)
        for prompt, params in cases:
            a, b = Engine(target).complete(prompt, params), spec.complete(prompt, params)
            assert (b.ids, b.finish_reason) == (a.ids, a.finish_reason), (name, len(prompt))
    stopped = Engine(target).complete(PROMPTS[1], cases[0][1])
    assert stopped.finish_reason == "stop" and len(stopped.ids) == plain_ids.index(eos) + 1
    assert len(Engine(target).complete(*cases[3]).ids) == 9


def test_self_draft_takes_fewer_steps(target):
    """Right guesses are kept: the model drafting for itself makes k + 1 tokens per step."""
    params = dataclasses.replace(GREEDY, max_new_tokens=20)
    steps = list(Engine(target, draft=drafters(target)["self"], draft_k=4).generate([[3]], params))
    assert [len(s) for s in steps] == [1, 5, 5, 5, 4]  # the prefill's token, then 4 + 1 each


def test_steps_with_drafts_join_and_leave(target):
    """Step-wise: sequences added between steps decode with drafts beside the others."""
    engine = Engine(target, draft=LookupDrafter(), draft_k=3)
    got, handles = {}, {}
    for i, p in enumerate(PROMPTS):
        handles[engine.add(p, GREEDY)] = i
        for s in engine.step():
            got.setdefault(handles[s.row], []).append(s.id)
    while engine.n_live:
        for s in engine.step():
            got[handles[s.row]].append(s.id)
    for i, p in enumerate(PROMPTS):
        assert got[i] == Engine(target).complete(p, GREEDY).ids


def test_lookup_guesses_what_followed_the_last_match():
    d = LookupDrafter(ngram=2)
    assert d.propose(0, [1, 2, 3, 4, 1, 2], 3) == [3, 4, 1]
    assert d.propose(0, [1, 2, 9, 1, 2, 8, 5, 2], 2) == [8, 5]  # latest match of [2] alone
    assert d.propose(0, [1, 2, 3, 4], 3) == []  # nothing repeats
    assert d.propose(0, [4], 3) == []
    assert d.propose(0, [4, 4], 3) == [4]  # only what is there to copy


def test_bad_settings_are_one_line_errors(target):
    with pytest.raises(ConfigError, match="draft_k"):
        Engine(target, draft=LookupDrafter(), draft_k=0)
    with pytest.raises(ConfigError, match="ngram"):
        LookupDrafter(ngram=0)
    with pytest.raises(ConfigError, match="share the tokenizer"):
        ModelDrafter(tiny(1, vocab_size=300), target.cfg.vocab_size)


@pytest.mark.parametrize("name", ["lookup", "model", "self"])
def test_sampling_draws_the_same_tokens_as_plain_sampling(target, name):
    params = SamplingParams(temperature=0.8, top_k=50, max_new_tokens=16, seed=7)
    spec = Engine(target, draft=drafters(target)[name], draft_k=3)
    assert run(spec, PROMPTS, params) == run(Engine(target), PROMPTS, params)


@pytest.mark.slow
def test_sampled_tokens_follow_the_models_distribution():
    """Chi-square goodness of fit of 2,000 sampled continuations: the 2nd and 3rd tokens (64
    cells; the 2nd is drafted by prompt lookup, the 3rd comes from the same check) against
    sum over a of p(a | prompt) p(b | prompt, a) p(c | prompt, a, b) computed from the model.
    (The draft model's draws are checked against plain sampling's above.)"""
    model = tiny(2, vocab_size=8)
    prompt = [1, 2, 3, 1, 2]
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([prompt]))[0, -1], -1)  # (8,) over a
        ab = torch.tensor([[*prompt, a] for a in range(8)])
        p2 = torch.softmax(model(ab)[:, -1], -1)  # (8, 8) over (a, b)
        abc = torch.tensor([[*prompt, a, b] for a in range(8) for b in range(8)])
        p3 = torch.softmax(model(abc)[:, -1], -1).view(8, 8, 8)  # over (a, b, c)
    chunks, n = 20, 100  # in chunks: the pool's bookkeeping grows with the rows live at once
    expected = (p1[:, None, None] * p2[:, :, None] * p3).sum(0).flatten() * chunks * n  # (b, c)
    counts, engine, accepted = torch.zeros(64), Engine(model, draft=LookupDrafter(), draft_k=2), 0
    for c in range(chunks):
        params = SamplingParams(temperature=1.0, max_new_tokens=3, seed=c * n)
        for toks in run(engine, [prompt] * n, params).values():
            counts[toks[1][0] * 8 + toks[2][0]] += 1
            accepted += toks[1][0] == 3  # lookup guessed 3 (what followed [1, 2] before)
    assert 0.05 < accepted / (chunks * n) < 0.95  # guesses are kept and rejected, both often
    big = expected >= 5  # cells too small for chi-square are pooled into one
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    dof = len(obs) - 1
    # The 0.999 quantile of chi-square(dof), Wilson-Hilferty: a wrong rule fails by far.
    bound = dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < bound, (chi2, bound)


def test_cli_generate_speculative_equals_plain(tmp_path, capsys):
    """`pellucid generate --speculative lookup|MODEL`: the same tokens as without it."""
    from test_resolve import TEMPLATE, tiny_model, tiny_tokenizer

    from pellucid.cli import main
    from pellucid.weights.gguf import save_gguf

    model, tok = tiny_model(), tiny_tokenizer()
    path = str(save_gguf(model, tmp_path / "tiny.gguf", tokenizer=tok, chat_template=TEMPLATE))
    base = ["generate", "the fox the fox the", "--model", path, "--json", "--temperature", "0"]
    outs = []
    for extra in ([], ["--speculative", "lookup"], ["--speculative", path, "--draft-k", "3"]):
        assert main([*base, "--max-new-tokens", "12", *extra]) == 0
        outs.append(json.loads(capsys.readouterr().out)["ids"])
    assert outs[1] == outs[0] and outs[2] == outs[0]
    assert main([*base, "--draft-k", "3"]) == 2
    assert "--draft-k needs --speculative" in capsys.readouterr().err
