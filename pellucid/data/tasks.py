"""Generated tasks with checkable answers: `{"prompt", "answer", "family"}` rows for SFT and `eval`.

Each family draws a prompt at random and computes its answer with a program; nothing is typed by
hand but the small vocabularies below. The phrasing is short and fixed per family, and every
prompt says what shape of answer it wants ("Answer with the number only."), so a small chat model
can learn the format in minutes of LoRA SFT while an untuned one, which tends to answer in a
sentence, scores low on exact match.

| family | example prompt | answer |
|---|---|---|
| format | Join the words red and apple with a hyphen. Answer with the result only. | red-apple |
| units | Convert 7 kilometers to meters. Answer with the number only. | 7000 |
| sort | Sort from smallest to largest: 7, 3, 9. Answer with the list only. | 3, 7, 9 |
| json | What is the value of "city" in {"name": "Ana", "city": "Lima"}? Answer with the value only. | Lima |
| arith | What is 17 + 25? Answer with the number only. | 42 |
| count | How many words are in this sentence: the red fox runs? Answer with the number only. | 4 |
| reverse | Reverse the order of these words: red blue green. Answer with the words only. | green blue red |
| mix | a seeded mix of all of the above | |

`make_tasks(name, n, seed)` gives `n` distinct prompts, the same for the same seed (the generator
is `random.Random` seeded with the string "name:seed", stable across runs and machines); other
seeds draw other prompts (each family has thousands to millions). `normalize_answer` is the
comparison `eval` uses: case, whitespace and final punctuation do not count.
"""

from __future__ import annotations

import difflib
import json
import random
import re
import unicodedata
from collections.abc import Callable

from pellucid.errors import DataError

# Vocabularies: plain common English words, short enough to be one or two tokens.
WORDS = (
    "apple bread chair cloud dog eagle field garden horse island jacket kettle lemon mountain "
    "needle ocean pencil queen river stone table umbrella valley window yard zebra anchor "
    "basket candle desert engine forest guitar hammer igloo jungle kitten ladder mirror nest "
    "orange parrot quilt rabbit saddle tiger unicorn violin wagon yacht bottle castle dragon "
    "feather ginger harbor iron jelly koala lantern meadow noodle olive pepper rocket spoon "
    "tomato tunnel velvet walnut butter cabin daisy ferry goose honey ivory kayak lizard marble "
    "nickel oyster peach raven salmon thunder tulip vase whale acorn barrel cactus dolphin "
    "falcon glacier hill jasmine kiwi lotus melon onion panda pebble ribbon sand ticket turtle "
    "wheel badge comet drum fern grape hat lamp moon pine rose ship star tree wolf"
).split()
COLORS = ("red blue green yellow purple orange black white brown pink gray gold").split()
NAMES = (
    "Ana Ben Carla David Elena Farid Grace Hugo Irene Jonas Kira Liam Maya Noah Olga Pedro "
    "Quinn Rosa Sam Tara Umar Vera Wen Yusuf Zoe Aiko Bruno Chloe Diego Emma"
).split()
CITIES = (
    "Lima Oslo Paris Rome Cairo Tokyo Lagos Quito Dublin Vienna Lisbon Madrid Nairobi Seoul "
    "Hanoi Prague Athens Bogota Dakar Riga Sofia Tunis Accra Doha Kyiv Minsk Perth Porto"
).split()
# (from, to, factor): a value in `from` units times factor is the value in `to` units.
CONVERSIONS = (
    ("kilometers", "meters", 1000),
    ("meters", "centimeters", 100),
    ("centimeters", "millimeters", 10),
    ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000),
    ("dollars", "cents", 100),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
    ("weeks", "days", 7),
    ("feet", "inches", 12),
    ("yards", "feet", 3),
    ("years", "months", 12),
)

Task = tuple[str, str]  # (prompt, answer)


def _format(rng: random.Random) -> Task:
    first, second = rng.sample(WORDS, 2)
    kind = rng.randrange(4)
    if kind == 0:  # (not capital letters: exact match ignores case)
        words = [first, second, rng.choice(COLORS)]
        prompt = (
            f"Write these words separated by commas: {' '.join(words)}. Answer with the list only."
        )
        return prompt, ", ".join(words)
    if kind == 1:
        word, times = rng.choice(WORDS + COLORS), rng.choice((2, 3, 4))
        prompt = f"Repeat the word {word} {times} times, separated by spaces. Answer with the words only."
        return prompt, " ".join([word] * times)
    if kind == 2:
        prompt = f"Join the words {first} and {second} with a hyphen. Answer with the result only."
        return prompt, f"{first}-{second}"
    prompt = f"Put the words {first} {second} in square brackets. Answer with the result only."
    return prompt, f"[{first} {second}]"


def _units(rng: random.Random) -> Task:
    src, dst, factor = rng.choice(CONVERSIONS)
    # Powers of ten just append zeros: any value up to 999. Other factors: up to 100.
    top = 999 if factor in (10, 100, 1000) else 100
    value = rng.randint(1, top)
    if rng.random() < 0.5:
        return f"Convert {value} {src} to {dst}. Answer with the number only.", str(value * factor)
    return f"Convert {value * factor} {dst} to {src}. Answer with the number only.", str(value)


def _sort(rng: random.Random) -> Task:
    size = rng.randint(3, 5)
    if rng.random() < 0.5:
        items = [str(x) for x in rng.sample(range(100), size)]
        answer = sorted(items, key=int)
        prompt = f"Sort from smallest to largest: {', '.join(items)}. Answer with the list only."
    else:
        items = rng.sample(WORDS, size)
        answer = sorted(items)
        prompt = f"Sort in alphabetical order: {', '.join(items)}. Answer with the list only."
    return prompt, ", ".join(answer)


_FIELDS: dict[str, Callable[[random.Random], str | int]] = {
    "name": lambda rng: rng.choice(NAMES),
    "age": lambda rng: rng.randint(18, 90),
    "city": lambda rng: rng.choice(CITIES),
    "color": lambda rng: rng.choice(COLORS),
    "pet": lambda rng: rng.choice(("cat", "dog", "fish", "bird", "rabbit", "turtle")),
    "year": lambda rng: rng.randint(1950, 2024),
}


def _json(rng: random.Random) -> Task:
    keys = rng.sample(sorted(_FIELDS), 3)
    record = {k: _FIELDS[k](rng) for k in keys}
    key = rng.choice(keys)
    prompt = f'What is the value of "{key}" in {json.dumps(record)}? Answer with the value only.'
    return prompt, str(record[key])


def _arith(rng: random.Random) -> Task:
    op = rng.choices("+-*", weights=(9, 9, 2))[0]  # the times tables hold only 121 prompts
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        answer = a * b
    else:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if op == "-" and b > a:
            a, b = b, a  # no negative answers
        answer = a + b if op == "+" else a - b
    return f"What is {a} {op} {b}? Answer with the number only.", str(answer)


def _count(rng: random.Random) -> Task:
    if rng.random() < 0.5:
        words = [rng.choice(COLORS if i % 2 else WORDS) for i in range(rng.randint(3, 8))]
        prompt = (
            f"How many words are in this sentence: {' '.join(words)}? Answer with the number only."
        )
        return prompt, str(len(words))
    target = rng.choice(COLORS)
    items = [rng.choice([*COLORS[:5], target]) for _ in range(rng.randint(4, 8))]
    listing = ", ".join(items)
    prompt = f'How many times does "{target}" appear in: {listing}? Answer with the number only.'
    return prompt, str(items.count(target))


def _reverse(rng: random.Random) -> Task:
    words = rng.sample(WORDS + COLORS, rng.randint(3, 5))
    prompt = f"Reverse the order of these words: {' '.join(words)}. Answer with the words only."
    return prompt, " ".join(reversed(words))


FAMILIES: dict[str, Callable[[random.Random], Task]] = {
    "format": _format,
    "units": _units,
    "sort": _sort,
    "json": _json,
    "arith": _arith,
    "count": _count,
    "reverse": _reverse,
}
NAMES_OF_TASKS = (*FAMILIES, "mix")
_GIVE_UP = 5000  # draws in a row without a new prompt: the family has no more to give


def make_tasks(name: str, n: int, seed: int) -> list[dict]:
    """`n` rows `{"prompt", "answer", "family"}` of task family `name` (or "mix"), distinct prompts.

    Deterministic for (name, seed). Raises DataError for an unknown name, n < 1, or an n larger
    than the number of distinct prompts the family can make.
    """
    if name not in NAMES_OF_TASKS:
        close = difflib.get_close_matches(name, NAMES_OF_TASKS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(
            f"unknown task family {name!r}{hint}; families: {', '.join(NAMES_OF_TASKS)}"
        )
    if n < 1:
        raise DataError(f"--n must be at least 1, got {n}")
    rng = random.Random(f"{name}:{seed}")
    families = sorted(FAMILIES) if name == "mix" else [name]
    rows: list[dict] = []
    seen: set[str] = set()
    stale = 0
    while len(rows) < n:
        family = rng.choice(families)
        prompt, answer = FAMILIES[family](rng)
        if prompt in seen:
            stale += 1
            if stale >= _GIVE_UP:
                raise DataError(
                    f"task family {name!r} ran out of distinct prompts at {len(rows)}; "
                    f"ask for --n {len(rows)} or fewer"
                )
            continue
        stale = 0
        seen.add(prompt)
        rows.append({"prompt": prompt, "answer": answer, "family": family})
    return rows


def normalize_answer(text: str) -> str:
    """An answer as exact match compares it (`pellucid eval`, fine-tuning reports): Unicode
    NFKC (full-width digits are digits), case folded, whitespace collapsed (one space after a
    comma, none before), final punctuation (. ! ? ; : , 。 and spaces) stripped.

    >>> normalize_answer("  The  List:  3 ,7,9. "), normalize_answer("APPLE!")
    ('the list: 3, 7, 9', 'apple')
    """
    text = " ".join(unicodedata.normalize("NFKC", text).split()).casefold()
    text = re.sub(r"\s*,\s*", ", ", text)
    return text.rstrip(".!?;:,。 ")
