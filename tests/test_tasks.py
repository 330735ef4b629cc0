"""Generated tasks: determinism, answers re-derived from each prompt by an independent parser,
distinct prompts, clear errors, and the CLI writing valid JSONL atomically."""

import json
import re

import pytest

from pellucid import cli
from pellucid.data import tasks
from pellucid.data.tasks import make_tasks, normalize_answer
from pellucid.errors import DataError

# Conversion factors written out again here (not imported), so a wrong table in tasks.py fails.
FACTORS = {
    ("kilometers", "meters"): 1000,
    ("meters", "centimeters"): 100,
    ("centimeters", "millimeters"): 10,
    ("kilograms", "grams"): 1000,
    ("liters", "milliliters"): 1000,
    ("dollars", "cents"): 100,
    ("hours", "minutes"): 60,
    ("minutes", "seconds"): 60,
    ("days", "hours"): 24,
    ("weeks", "days"): 7,
    ("feet", "inches"): 12,
    ("yards", "feet"): 3,
    ("years", "months"): 12,
}


def _solve(prompt: str) -> str:
    """The answer to a generated prompt, worked out from its text alone."""
    if m := re.fullmatch(r"Write these words separated by commas: ([\w ]+)\. .*", prompt):
        return ", ".join(m[1].split())
    if m := re.fullmatch(r"Repeat the word (\w+) (\d) times, separated by spaces\. .*", prompt):
        return " ".join([m[1]] * int(m[2]))
    if m := re.fullmatch(r"Join the words (\w+) and (\w+) with a hyphen\. .*", prompt):
        return f"{m[1]}-{m[2]}"
    if m := re.fullmatch(r"Put the words ([\w ]+) in square brackets\. .*", prompt):
        return f"[{m[1]}]"
    if m := re.fullmatch(r"Convert (\d+) (\w+) to (\w+)\. .*", prompt):
        value, src, dst = int(m[1]), m[2], m[3]
        if (src, dst) in FACTORS:
            return str(value * FACTORS[src, dst])
        factor = FACTORS[dst, src]
        assert value % factor == 0, prompt  # the answer must be a whole number
        return str(value // factor)
    if m := re.fullmatch(r"Sort from smallest to largest: ([\d, ]+)\. .*", prompt):
        return ", ".join(str(x) for x in sorted(int(v) for v in m[1].split(", ")))
    if m := re.fullmatch(r"Sort in alphabetical order: ([\w, ]+)\. .*", prompt):
        return ", ".join(sorted(m[1].split(", ")))
    if m := re.fullmatch(r'What is the value of "(\w+)" in (\{.*\})\? .*', prompt):
        return str(json.loads(m[2])[m[1]])
    if m := re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\? .*", prompt):
        a, op, b = int(m[1]), m[2], int(m[3])
        return str({"+": a + b, "-": a - b, "*": a * b}[op])
    if m := re.fullmatch(r"How many words are in this sentence: ([\w ]+)\? .*", prompt):
        return str(len(m[1].split()))
    if m := re.fullmatch(r'How many times does "(\w+)" appear in: ([\w, ]+)\? .*', prompt):
        return str(m[2].split(", ").count(m[1]))
    if m := re.fullmatch(r"Reverse the order of these words: ([\w ]+)\. .*", prompt):
        return " ".join(m[1].split()[::-1])
    raise AssertionError(f"no solver matches {prompt!r}")


@pytest.mark.parametrize("name", tasks.NAMES_OF_TASKS)
def test_every_answer_is_what_an_independent_solver_finds(name):
    rows = make_tasks(name, 300, seed=7)
    assert len(rows) == 300
    for row in rows:
        assert set(row) == {"prompt", "answer", "family"}
        assert row["answer"] == _solve(row["prompt"]), row
        assert row["answer"] and "\n" not in row["answer"]
        # Short answers that survive normalisation: nothing of the answer is final punctuation.
        assert normalize_answer(row["answer"]) == row["answer"].casefold()
    assert len({r["prompt"] for r in rows}) == len(rows)  # no duplicate prompts


@pytest.mark.parametrize("name", tasks.NAMES_OF_TASKS)
def test_deterministic_per_seed_and_other_seeds_draw_other_prompts(name):
    assert make_tasks(name, 200, seed=1) == make_tasks(name, 200, seed=1)
    a = {r["prompt"] for r in make_tasks(name, 200, seed=1)}
    b = {r["prompt"] for r in make_tasks(name, 200, seed=2)}
    assert len(a & b) < 0.15 * len(a), f"{name}: seeds 1 and 2 share {len(a & b)} of 200 prompts"


def test_mix_draws_every_family():
    families = {r["family"] for r in make_tasks("mix", 200, seed=0)}
    assert families == set(tasks.FAMILIES)


def test_asking_for_more_prompts_than_exist_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(tasks, "CONVERSIONS", (("weeks", "days", 7),))  # 2 x 100 prompts in all
    with pytest.raises(DataError, match=r"ran out of distinct prompts at 200; ask for --n 200"):
        make_tasks("units", 201, seed=0)
    assert len(make_tasks("units", 200, seed=0)) == 200


def test_bad_name_and_n():
    with pytest.raises(DataError, match=r"unknown task family 'sortt' \(did you mean 'sort'\?\)"):
        make_tasks("sortt", 5, seed=0)
    with pytest.raises(DataError, match="--n must be at least 1"):
        make_tasks("sort", 0, seed=0)


@pytest.mark.parametrize(
    ("got", "want"),
    [
        ("  APPLE. ", "apple"),
        ("3,7, 9", "3, 7, 9"),
        ("3 , 7 ,9!", "3, 7, 9"),
        ("green\n blue  red", "green blue red"),
        ("42?", "42"),
        ("[rose]", "[rose]"),  # brackets are not final punctuation
        ("Lima:", "lima"),
    ],
)
def test_normalize_answer(got, want):
    assert normalize_answer(got) == want


def test_eval_scores_with_the_same_normalisation():
    # `pellucid eval` once kept its own copy, without the comma rule: "3,7,9" missed "3, 7, 9"
    from pellucid.train.evaluate import normalize_answer as used_by_eval

    assert used_by_eval("3,7 ,9.") == used_by_eval("3, 7, 9") == "3, 7, 9"
    assert used_by_eval("\uff14\uff12!") == "42"  # full-width digits (NFKC)


def test_normalize_does_not_merge_different_answers():
    assert normalize_answer("12") != normalize_answer("1, 2")
    assert normalize_answer("nest-falcon") != normalize_answer("nest falcon")


def test_cli_writes_valid_jsonl(tmp_path, capsys):
    out = tmp_path / "tasks.jsonl"
    assert cli.main(["data", "tasks", "mix", "--n", "25", "--seed", "3", "--out", str(out)]) == 0
    assert "25 mix tasks" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows == make_tasks("mix", 25, seed=3)
    assert [p.name for p in tmp_path.iterdir()] == ["tasks.jsonl"]  # no temp file left behind


def test_cli_error_leaves_the_old_file_alone(tmp_path, capsys):
    out = tmp_path / "tasks.jsonl"
    out.write_text("old\n")
    assert cli.main(["data", "tasks", "sotr", "--n", "5", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "pellucid: error: unknown task family 'sotr' (did you mean 'sort'?); "
        "families: format, units, sort, json, arith, count, reverse, mix"
    )
    assert out.read_text() == "old\n"
