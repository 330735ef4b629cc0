"""Oracle rankers, preference-pair files and the scalar head: the interfaces alignment builds on."""

import json
import re

import pytest
import torch

from pellucid.align.oracle import (
    ORACLES,
    count_sentences,
    count_words,
    get_oracle,
    make_prompts,
    pairs_from_ranking,
    rank,
    win_rate,
)
from pellucid.data.preferences import (
    PreferencePair,
    PromptRow,
    read_pairs,
    read_prompts,
    write_pairs,
    write_prompts,
)
from pellucid.data.tasks import make_tasks
from pellucid.errors import DataError
from pellucid.model.config import ModelConfig
from pellucid.model.heads import ScalarHead
from pellucid.model.transformer import Transformer


def test_sentence_and_word_counts():
    assert count_sentences("It rains. Does it? Yes!  ok") == 4
    assert count_sentences("One sentence, with 3.5 numbers.") == 1
    assert count_sentences("   ") == 0
    assert count_words("a -- b * c's 42") == 4


def test_sentences_oracle_prefers_the_requested_count():
    o = get_oracle("sentences")
    prompt = "Describe a river in exactly two sentences."
    replies = ["It flows.", "It flows. Fish swim in it.", "It flows. Fish swim. Birds sing."]
    assert [o.score(prompt, r) for r in replies] == [-1, 0, -1]
    assert rank(o, prompt, replies) == [1, 0, 1]
    with pytest.raises(DataError, match="exactly N sentences"):
        o.score("Describe a river.", "It flows.")


def test_words_oracle():
    o = get_oracle("words")
    prompt = "Describe a dog in exactly 5 words."
    assert o.score(prompt, "A loyal, furry, happy friend.") == -0
    assert o.score(prompt, "Dogs bark.") == -3
    assert o.score(prompt, "one two three four five six seven") == -2


def test_format_oracle_json_and_bullets():
    o = get_oracle("format")
    prompt = 'Describe a pet as only a JSON object with the keys "name" and "age". No other text.'
    assert o.score(prompt, '{"name": "Rex", "age": 3}') == 2.0
    assert o.score(prompt, '```json\n{"name": "Rex", "age": 3}\n```') == 2.0
    assert o.score(prompt, '{"name": "Rex"}') == 1.5  # Jaccard 1/2
    assert o.score(prompt, '{"name": "Rex", "age": 3, "pet": "dog"}') == pytest.approx(1 + 2 / 3)
    assert o.score(prompt, "Rex is 3 years old.") == 0.0
    assert o.score(prompt, "[1, 2]") == 0.0  # JSON, but not an object
    bullets = "Name some red fruits as a bulleted list of 3 items."
    assert o.score(bullets, "- apple\n- cherry\n* strawberry") == 0
    assert o.score(bullets, "Here:\n- apple\n- cherry") == -1
    assert o.score(bullets, "apple, cherry, strawberry") == -3
    with pytest.raises(DataError, match="format oracle"):
        o.score("Tell me a joke.", "no")


def test_task_oracle_uses_the_generated_answer():
    o = get_oracle("task")
    row = make_tasks("arith", 1, seed=3)[0]
    a, b = map(int, re.findall(r"\d+", row["prompt"])[:2])
    op = re.search(r"\d+ ([-+*]) \d+", row["prompt"])[1]
    right = str({"+": a + b, "-": a - b, "*": a * b}[op])  # worked out here, not imported
    assert o.score(row["prompt"], right + ".", row["answer"]) == 1.0
    assert o.score(row["prompt"], f"The answer is {right}", row["answer"]) == 0.5
    assert o.score(row["prompt"], f"The answer is {right}1", row["answer"]) == 0.0
    with pytest.raises(DataError, match="needs each prompt's answer"):
        o.score(row["prompt"], right)


def test_get_oracle_names_the_choices():
    with pytest.raises(DataError, match=r"did you mean 'words'.*oracles: sentences, words"):
        get_oracle("wrods")


@pytest.mark.parametrize("name", sorted(ORACLES))
def test_generated_prompts_are_distinct_seeded_and_judgeable(name):
    o = get_oracle(name)
    rows = make_prompts(o, 40, seed=1)
    assert len({r.prompt for r in rows}) == 40
    assert make_prompts(o, 40, seed=1) == rows
    assert {r.prompt for r in make_prompts(o, 40, seed=2)} != {r.prompt for r in rows}
    for r in rows:  # every prompt states what its oracle checks: scoring never raises
        assert isinstance(o.score(r.prompt, "Some reply.", r.answer), float)
    assert all((r.answer is not None) == (name == "task") for r in rows)


def test_ranking_ties_and_pairs():
    o = get_oracle("sentences")
    prompt = "Describe a cat in exactly one sentence."
    replies = ["A cat naps.", "Cats purr. They nap.", "A cat hunts.", "A. B. C."]
    ranks = rank(o, prompt, replies)
    assert ranks == [0, 1, 0, 2]
    pairs = pairs_from_ranking(prompt, replies, ranks)
    got = {(p.chosen, p.rejected) for p in pairs}
    assert got == {
        ("A cat naps.", "Cats purr. They nap."), ("A cat naps.", "A. B. C."),
        ("A cat hunts.", "Cats purr. They nap."), ("A cat hunts.", "A. B. C."),
        ("Cats purr. They nap.", "A. B. C."),
    }  # fmt: skip
    assert len(pairs) == 5  # the tie (0 and 2) implies no pair
    assert pairs_from_ranking(prompt, ["same", "same"], [0, 1]) == []
    with pytest.raises(DataError):
        pairs_from_ranking(prompt, ["a"], [0, 1])


def test_win_rate_counts_ties_as_half():
    o = get_oracle("words")
    rows = [PromptRow("Say hi in exactly 2 words.")] * 4
    cand = ["hi there", "hi there", "hi", "hi there friend now"]
    base = ["hi", "hi there", "hi there", "hi there friend"]
    r = win_rate(o, rows, cand, base)
    assert (r["wins"], r["ties"], r["losses"], r["n"]) == (1, 1, 2, 4)
    assert r["win_rate"] == pytest.approx(1.5 / 4)


def test_pairs_round_trip(tmp_path):
    pairs = [PreferencePair("p", "good", "bad"), PreferencePair("é\n🙂", 'a "b"', "c")]
    path = tmp_path / "pairs.jsonl"
    write_pairs(path, pairs)
    assert read_pairs(path) == pairs
    rows = [PromptRow("q1", "a1"), PromptRow("q2")]
    write_prompts(tmp_path / "prompts.jsonl", rows)
    assert read_prompts(tmp_path / "prompts.jsonl") == rows
    assert json.loads((tmp_path / "prompts.jsonl").read_text().splitlines()[1]) == {"prompt": "q2"}


GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({**GOOD, "rejected": "a"}, "fields 'chosen' and 'rejected' are the same text"),
        ({**GOOD, "chosen": ""}, "field 'chosen' is empty"),
        ({**GOOD, "rejected": 7}, "field 'rejected' must be a string, got int"),
        ({"prompt": "p", "chosen": "a"}, "field 'rejected' must be a string, got NoneType"),
        (["p", "a", "b"], "expected a JSON object, got list"),
        ("{not json", "not valid JSON"),
        ("", "blank line"),
    ],
)
def test_bad_preference_lines_are_named(tmp_path, line, message):
    path = tmp_path / "pairs.jsonl"
    text = line if isinstance(line, str) else json.dumps(line)
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n" + text + "\n")
    with pytest.raises(DataError) as e:
        read_pairs(path)
    assert str(e.value).startswith(f"{path}:3: {message}")


def test_bad_bytes_and_empty_files(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"pairs.jsonl:2: not valid UTF-8"):
        read_pairs(path)
    path.write_text("")
    with pytest.raises(DataError, match="empty"):
        read_pairs(path)
    with pytest.raises(DataError, match="cannot read"):
        read_pairs(tmp_path / "missing.jsonl")
    path.write_text(json.dumps({"prompt": "q", "answer": 3}) + "\n")
    with pytest.raises(DataError, match=r":1: field 'answer' must be a string"):
        read_prompts(path)


def test_scalar_head_reads_the_last_real_token_either_padding_side():
    cfg = ModelConfig(vocab_size=50, context_len=16, n_layer=1, n_head=2, n_embd=16, ffn_dim=32)
    torch.manual_seed(0)
    rm = ScalarHead(Transformer(cfg)).eval()
    ids = torch.tensor([[5, 6, 7]])
    values = rm(ids)
    assert values.shape == (1, 3) and values.dtype == torch.float32
    right = torch.tensor([[5, 6, 7, 0, 0]])
    left = torch.tensor([[0, 0, 5, 6, 7]])
    seg_r = torch.tensor([[1, 1, 1, 0, 0]])
    seg_l = torch.tensor([[0, 0, 1, 1, 1]])
    with torch.no_grad():
        expect = values[0, -1]
        assert torch.allclose(rm.reward(right, segments=seg_r), expect.view(1), atol=1e-5)
        assert torch.allclose(rm.reward(left, segments=seg_l), expect.view(1), atol=1e-5)


def test_cli_writes_oracle_prompts(tmp_path, capsys):
    from pellucid.cli import main

    out = tmp_path / "p.jsonl"
    assert main(["data", "prompts", "task", "--n", "5", "--seed", "3", "--out", str(out)]) == 0
    rows = read_prompts(out)
    assert rows == make_prompts(get_oracle("task"), 5, seed=3)
    assert all(r.answer for r in rows)
    assert main(["data", "prompts", "wrods", "--n", "5", "--out", str(out)]) == 2
    assert "did you mean 'words'" in capsys.readouterr().err
