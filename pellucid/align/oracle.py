"""Oracle rankers: programs that rank replies by a stated, checkable preference.

A person ranking replies is the real thing (`pellucid rank`); where a test or a benchmark cannot
wait for one, an oracle stands in. Each states its preference in words (stored with every
ranking it makes) and scores a reply by checking it against what the prompt asked:

| oracle | the prompt asks for | score (higher is better) |
|---|---|---|
| sentences | "... in exactly 3 sentences." | -abs(sentences - 3) |
| words | "... in exactly 12 words." | -abs(words - 12) |
| format | "... only a JSON object with the keys "a", "b"." | 0 not an object, else 1 + key Jaccard |
| | "... a bulleted list of 4 ..." | -abs(bullet lines - 4) |
| json | the JSON half of `format` alone | as format |
| task | a generated task (data/tasks.py), with its answer | 1 exact match, 0.5 contains it, 0 |

    >>> oracle = get_oracle("sentences")
    >>> rank(oracle, "Describe a river in exactly 2 sentences.", ["It flows.", "It flows. Fish."])
    [1, 0]

Each oracle also writes its own prompts (`make_prompts`), drawn by a seeded generator like the
task generator's, so no prompt is typed by hand and held-out prompts are simply another seed.
"""

from __future__ import annotations

import difflib
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pellucid.data.preferences import PreferencePair, PromptRow
from pellucid.data.tasks import COLORS, WORDS, make_tasks, normalize_answer
from pellucid.errors import DataError

_NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve".split()
Scorer = Callable[[str, str, "str | None"], float]


@dataclass(frozen=True)
class Oracle:
    """A stand-in for a person: ranks replies by `description`, a checkable preference."""

    name: str  # e.g. "sentences", "words", "format", "task"
    description: str  # the stated preference, in words (stored with each oracle ranking)
    scorer: Scorer = field(repr=False, compare=False)
    prompt_maker: Callable[[random.Random], PromptRow] = field(repr=False, compare=False)

    def score(self, prompt: str, response: str, answer: str | None = None) -> float:
        """How well `response` does what `prompt` asked; higher is better. DataError when the
        prompt does not state what this oracle checks (or a task comes without its answer)."""
        return float(self.scorer(prompt, response, answer))


# --- reading what the prompt asks for -------------------------------------------------------------


def _requested(prompt: str, noun: str, oracle: str) -> int:
    """N in "exactly N <noun>s" (digits or a number word); DataError if the prompt has none."""
    m = re.search(rf"\bexactly (\d+|{'|'.join(_NUMBERS)}) {noun}s?\b", prompt, re.IGNORECASE)
    if m is None:
        raise DataError(
            f"the {oracle} oracle needs a prompt asking for 'exactly N {noun}s'; got {prompt!r:.80}"
        )
    n = m[1].lower()
    return int(n) if n.isdigit() else _NUMBERS.index(n)


def count_sentences(text: str) -> int:
    """Sentences: pieces ending in . ! or ? followed by space (or the end), holding a letter or
    digit; an unfinished last piece counts too.

    >>> count_sentences("It rains. Does it? Yes!  ok")
    4
    """
    pieces = re.split(r"(?<=[.!?])\s+", text.strip())
    return sum(1 for p in pieces if re.search(r"\w", p))


def count_words(text: str) -> int:
    """Whitespace-separated pieces that hold a letter or digit ("--" and "*" are not words)."""
    return sum(1 for w in text.split() if re.search(r"\w", w))


def _sentences(prompt: str, response: str, answer: str | None) -> float:
    return -abs(count_sentences(response) - _requested(prompt, "sentence", "sentences"))


def _words(prompt: str, response: str, answer: str | None) -> float:
    return -abs(count_words(response) - _requested(prompt, "word", "words"))


def _json_object(text: str) -> dict | None:
    """The reply as a JSON object (a ``` code fence around it allowed), else None."""
    text = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _format(prompt: str, response: str, answer: str | None) -> float:
    if m := re.search(r"JSON object with the keys (.+?)\.(?:\s|$)", prompt):
        wanted = set(re.findall(r'"([^"]+)"', m[1]))
        got = _json_object(response)
        if got is None:
            return 0.0
        return 1.0 + len(wanted & set(got)) / len(wanted | set(got))
    if m := re.search(r"bulleted list of (\d+)\b", prompt):
        bullets = re.findall(r"^\s*[-*\u2022]\s+\S", response, re.MULTILINE)
        return -abs(len(bullets) - int(m[1]))
    raise DataError(
        "the format oracle needs a prompt asking for 'a JSON object with the keys ...' or "
        f"'a bulleted list of N ...'; got {prompt!r:.80}"
    )


def _task(prompt: str, response: str, answer: str | None) -> float:
    if answer is None:
        raise DataError(f"the task oracle needs each prompt's answer; none for {prompt!r:.80}")
    got, want = normalize_answer(response), normalize_answer(answer)
    if got == want:
        return 1.0
    return 0.5 if re.search(rf"(?<!\w){re.escape(want)}(?!\w)", got) else 0.0


# --- writing prompts ---------------------------------------------------------------------------

_DESCRIBE = (
    "Describe {a} {w}",
    "Write about {a} {w}",
    "Tell me about {a} {w}",
    "Explain what {a} {w} is",
)


def _topic(rng: random.Random) -> str:
    w = rng.choice(WORDS)
    a = "an" if w[0] in "aeiou" else "a"
    return rng.choice(_DESCRIBE).format(a=a, w=w)


def _sentences_prompt(rng: random.Random) -> PromptRow:
    n = rng.randint(1, 4)
    return PromptRow(f"{_topic(rng)} in exactly {_NUMBERS[n]} sentence{'s' * (n > 1)}.")


def _words_prompt(rng: random.Random) -> PromptRow:
    return PromptRow(f"{_topic(rng)} in exactly {rng.choice((5, 8, 10, 12, 15, 20))} words.")


_KEYS = ("name", "age", "city", "color", "pet", "year", "country", "food", "job", "size")
_THINGS = ("fruits", "animals", "colors", "countries", "tools", "sports", "cities", "foods")


def _json_prompt(rng: random.Random) -> PromptRow:
    keys = rng.sample(_KEYS, rng.randint(2, 4))
    quoted = ", ".join(f'"{k}"' for k in keys[:-1]) + f' and "{keys[-1]}"'
    subject = rng.choice(("a person", "a pet", "a trip", "a city", "a meal"))
    return PromptRow(
        f"Describe {subject} as only a JSON object with the keys {quoted}. No other text."
    )


def _format_prompt(rng: random.Random) -> PromptRow:
    if rng.random() < 0.5:
        return _json_prompt(rng)
    n, things = rng.randint(2, 6), rng.choice(_THINGS)
    return PromptRow(f"Name some {rng.choice(COLORS)} {things} as a bulleted list of {n} items.")


def _task_prompt(rng: random.Random) -> PromptRow:
    row = make_tasks("mix", 1, rng.randrange(2**31))[0]
    return PromptRow(row["prompt"], row["answer"])


ORACLES: dict[str, Oracle] = {
    o.name: o
    for o in (
        Oracle(
            "sentences",
            "the reply has exactly the number of sentences the prompt asks for; the further "
            "from it, the worse",
            _sentences,
            _sentences_prompt,
        ),
        Oracle(
            "words",
            "the reply has exactly the number of words the prompt asks for; the further from "
            "it, the worse",
            _words,
            _words_prompt,
        ),
        Oracle(
            "format",
            "the reply is in the format the prompt asks for: only a JSON object with exactly "
            "the keys named (a code fence allowed), or a bulleted list with exactly N items",
            _format,
            _format_prompt,
        ),
        Oracle(
            "json",
            "the reply is only a JSON object (a code fence allowed) with exactly the keys the "
            "prompt names; the closer its keys, the better; anything else is worst",
            _format,
            _json_prompt,
        ),
        Oracle(
            "task",
            "the reply is the task's correct answer alone (compared as `pellucid eval` does); "
            "a reply that contains it beats one that does not",
            _task,
            _task_prompt,
        ),
    )
}


def get_oracle(name: str) -> Oracle:
    """The oracle called `name`; DataError naming the choices (and a near miss) otherwise."""
    if name not in ORACLES:
        close = difflib.get_close_matches(name, ORACLES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(f"unknown oracle {name!r}{hint}; oracles: {', '.join(ORACLES)}")
    return ORACLES[name]


def make_prompts(oracle: Oracle, n: int, seed: int) -> list[PromptRow]:
    """`n` distinct prompts this oracle can judge, the same for the same (oracle, seed)."""
    if n < 1:
        raise DataError(f"--n must be at least 1, got {n}")
    rng = random.Random(f"oracle:{oracle.name}:{seed}")
    rows: dict[str, PromptRow] = {}
    for _ in range(100 * n):  # every family has thousands of prompts; this only guards a bug
        row = oracle.prompt_maker(rng)
        rows.setdefault(row.prompt, row)
        if len(rows) == n:
            return list(rows.values())
    raise DataError(f"the {oracle.name} oracle ran out of distinct prompts at {len(rows)}")


# --- rankings and pairs -------------------------------------------------------------------------


def rank(
    oracle: Oracle, prompt: str, responses: Sequence[str], answer: str | None = None
) -> list[int]:
    """The rank of each response, 0 = best; equal scores share a rank (a tie), and ranks are
    dense (scores 3, 1, 3, 0 rank 0, 1, 0, 2)."""
    scores = [oracle.score(prompt, r, answer) for r in responses]
    order = sorted(set(scores), reverse=True)
    return [order.index(s) for s in scores]


def pairs_from_ranking(
    prompt: str, responses: Sequence[str], ranks: Sequence[int]
) -> list[PreferencePair]:
    """Every pair the ranking implies: each response over every one ranked below it. Ties, and
    two responses with the same text, imply none; a pair is listed once."""
    if len(responses) != len(ranks):
        raise DataError(f"{len(responses)} responses but {len(ranks)} ranks")
    pairs: dict[tuple[str, str], PreferencePair] = {}
    for i, better in enumerate(responses):
        for j, worse in enumerate(responses):
            if ranks[i] < ranks[j] and better != worse:
                pairs.setdefault((better, worse), PreferencePair(prompt, better, worse))
    return list(pairs.values())


def win_rate(
    oracle: Oracle, rows: Sequence[PromptRow], candidate: Sequence[str], baseline: Sequence[str]
) -> dict[str, float]:
    """How often the oracle prefers `candidate[i]` to `baseline[i]` as the reply to `rows[i]`.

    Returns {"win_rate" (ties count half), "wins", "ties", "losses", "n"}.
    """
    if not len(rows) == len(candidate) == len(baseline) > 0:
        raise DataError("win_rate needs one candidate and one baseline reply per prompt")
    wins = ties = 0
    for row, c, b in zip(rows, candidate, baseline, strict=True):
        sc, sb = (oracle.score(row.prompt, r, row.answer) for r in (c, b))
        wins += sc > sb
        ties += sc == sb
    n = len(rows)
    return {
        "win_rate": (wins + 0.5 * ties) / n,
        "wins": wins,
        "ties": ties,
        "losses": n - wins - ties,
        "n": n,
    }
