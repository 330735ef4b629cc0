"""ELIZA (Weizenbaum 1966): the first rung, a chat program with no probabilities at all.

How it answers, as in the 1966 paper:

1. The input is lower-cased and cut into words; `.`, `,`, `?`, `!`, `;` and `but` end a clause.
2. Each word is looked up in the script. A word with a substitute is replaced by it as it is read
   (`i` -> `you`, `my` -> `your`, `you` -> `i`, ...): that is the *pronoun reflection*, done on the
   whole input before any matching, so the script's patterns are written in the reflected words.
3. A word with rules is a *keyword*. Keywords go on a stack: one ranked above the top goes on
   top, any other to the bottom. At a clause delimiter, if a keyword has been found the rest of
   the input is dropped; if not, the clause so far is dropped and scanning goes on.
4. The top keyword's *decomposition* patterns are tried in order against the reflected words
   (0 = any number of words, n = exactly n, (* a b) = one of them, (/tag) = a word so tagged).
   The first that matches picks its next *reassembly* (each decomposition cycles through its
   own), in which a number n is replaced by the n-th matched part. A reassembly may instead send
   the input on to another keyword's rules (= other), to the next keyword on the stack (newkey),
   or rewrite it and then send it on (pre).
5. When the keyword is `my`, one of the script's memory transformations is also stored
   (`lets discuss further why your 3`). An input without any keyword is answered from that
   memory when Weizenbaum's counter (1, 2, 3, 4, 1, ...; one step per input) stands at 4 and
   something is remembered, and otherwise from the `none` rules.

The script is data: history/doctor.txt, Weizenbaum's DOCTOR in his own S-expression form.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from pellucid.errors import ConfigError
from pellucid.infer.conversation import Turn
from pellucid.infer.sampling import SamplingParams
from pellucid.infer.sequence import Completion, Timing

Atom = Any  # a string, or a list of atoms
Element = int | str | frozenset | tuple  # 0/n, a word, (* alternatives), ("/", tag)
_DELIMITERS = {".", ",", "?", "!", ";", "but"}


def parse_sexpr(text: str) -> list[Atom]:
    """The top-level lists of S-expression text (`;` comments); atoms stay strings."""
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith(";"))
    stack: list[list[Atom]] = [[]]
    for tok in re.findall(r"\(|\)|=|[^\s()=]+", text):
        if tok == "(":
            stack.append([])
        elif tok == ")":
            if len(stack) < 2:
                raise ConfigError("ELIZA script: unbalanced ')'")
            done = stack.pop()
            stack[-1].append(done)
        else:
            stack[-1].append(tok)
    if len(stack) != 1:
        raise ConfigError("ELIZA script: unbalanced '('")
    return stack[0]


@dataclass
class Rule:
    """One decomposition pattern and its reassemblies, used in turn (`next` is the counter)."""

    pattern: list[Element]
    reassemblies: list[Atom]
    next: int = 0


@dataclass
class Keyword:
    """A word of the script: its substitute, rank, tags and rules (a rule or a `(= other)` link)."""

    word: str
    substitute: str | None = None
    rank: int = 0
    rules: list[Rule | str] = field(default_factory=list)


def _element(item: Atom) -> Element:
    """A decomposition element from its script form."""
    if isinstance(item, str):
        return int(item) if item.isdigit() else item
    if item and item[0] == "*":
        return frozenset(item[1:])
    if len(item) == 1 and isinstance(item[0], str) and item[0].startswith("/"):
        return ("/", item[0][1:])
    raise ConfigError(f"ELIZA script: bad decomposition element {item!r}")


def _link(item: Atom) -> str | None:
    """'other' for a `(= other)` list, else None."""
    if isinstance(item, list) and len(item) == 2 and item[0] == "=":
        return item[1]
    return None


@dataclass
class Script:
    """A parsed ELIZA script: greeting, keywords, tags, memory rules and the `none` rules."""

    greeting: str
    keywords: dict[str, Keyword]
    tags: dict[str, set[str]]
    memory_word: str
    memory: list[tuple[list[Element], list[str]]]

    @classmethod
    def parse(cls, text: str) -> Script:
        """Read the S-expression form described at the top of history/doctor.txt."""
        entries = parse_sexpr(text)
        greeting, keywords, tags, memory_word, memory = " ".join(entries[0]), {}, {}, "", []
        for entry in entries[1:]:
            try:
                memory_word = _entry(entry, keywords, tags, memory) or memory_word
            except (IndexError, TypeError, ValueError, AttributeError):
                raise ConfigError(f"ELIZA script: cannot read the entry {entry!r:.80}") from None
        script = cls(greeting, keywords, tags, memory_word, memory)
        script.check()
        return script

    def check(self) -> None:
        """Every `(= other)` names a word with rules, and `none` exists (ConfigError if not)."""
        for key in [*self.keywords.values()]:
            for rule in key.rules:
                items = [rule] if isinstance(rule, str) else rule.reassemblies
                for item in items:
                    pre = isinstance(item, list) and item[:1] == ["pre"] and len(item) == 3
                    target = item if isinstance(item, str) else _link(item[2] if pre else item)
                    if target is not None and not self.keywords.get(target, Keyword("")).rules:
                        raise ConfigError(
                            f"ELIZA script: '{key.word}' links to '{target}', which has no rules"
                        )
        if not self.keywords.get("none", Keyword("")).rules:
            raise ConfigError("ELIZA script: no 'none' rules to answer an input without keywords")


def _entry(
    entry: list[Atom], keywords: dict[str, Keyword], tags: dict[str, set[str]], memory: list
) -> str | None:
    """Add one script entry to `keywords`, `tags` or `memory`; returns the memory word, if any."""
    if not isinstance(entry, list):
        raise TypeError("an entry is a list")
    head, rest = entry[0], list(entry[1:])
    if head == "memory":
        for m in rest[1:]:
            at = m.index("=")
            memory.append(([_element(x) for x in m[:at]], m[at + 1 :]))
        return rest[0]
    key = keywords.setdefault(head, Keyword(head))
    if rest[:1] == ["="]:
        key.substitute, rest = rest[1], rest[2:]
    if rest and isinstance(rest[0], str) and rest[0].isdigit():
        key.rank, rest = int(rest[0]), rest[1:]
    if rest[:1] == ["dlist"]:
        for tag in (t.lstrip("/") for t in rest[1]):
            if tag:  # `(/ family)` and `(/family)` alike
                tags.setdefault(tag, set()).update({head, key.substitute or head})
        rest = rest[2:]
    for item in rest:
        if (link := _link(item)) is not None:
            key.rules.append(link)
        elif isinstance(item[0], list) and len(item) > 1:  # ((decomposition) reassembly ...)
            key.rules.append(Rule([_element(x) for x in item[0]], item[1:]))
        else:
            raise ValueError("a rule is ((decomposition) reassembly ...)")
    return None


def match(
    pattern: list[Element], words: list[str], tags: dict[str, set[str]]
) -> list[list[str]] | None:
    """The parts of `words` matched by each element of `pattern`, or None if it does not match.

    0 takes as few words as the rest of the pattern allows (so it finds the first occurrence).
    """
    if not pattern:
        return [] if not words else None
    head, rest = pattern[0], pattern[1:]
    if isinstance(head, int):
        sizes = range(len(words) + 1) if head == 0 else [head] if head <= len(words) else []
        for n in sizes:
            tail = match(rest, words[n:], tags)
            if tail is not None:
                return [words[:n], *tail]
        return None
    if not words:
        return None
    word = words[0]
    if isinstance(head, frozenset):
        ok = word in head
    elif isinstance(head, tuple):
        ok = word in tags.get(head[1], ())
    else:
        ok = word == head
    tail = match(rest, words[1:], tags) if ok else None
    return None if tail is None else [[word], *tail]


def reassemble(template: list[str], parts: list[list[str]]) -> list[str]:
    """The template's words, each number n replaced by the n-th part (1-based)."""
    out: list[str] = []
    for word in template:
        out.extend(
            parts[int(word) - 1] if word.isdigit() and 0 < int(word) <= len(parts) else [word]
        )
    return out


def tokenize(text: str) -> list[str]:
    """Lower-case words (apostrophes kept) and clause delimiters, in order."""
    return re.findall(r"[a-z0-9']+|[.,?!;]", text.lower())


def _sentence(words: list[str]) -> str:
    text = " ".join(words)
    text = re.sub(r"\bi\b", "I", text)  # also I'm, I've
    return re.sub(r"(^|[.?!] )([a-z])", lambda m: m[1] + m[2].upper(), text)


_NEWKEY = object()  # the reassembly (newkey): try the next keyword on the stack


class Eliza:
    """A conversation with an ELIZA script; `say` and `reset` as `pellucid chat` drives them."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.greeting = _sentence(script.greeting.split())
        self.reset()

    @classmethod
    def doctor(cls) -> Eliza:
        """ELIZA with Weizenbaum's DOCTOR script (history/doctor.txt)."""
        text = resources.files("pellucid.history").joinpath("doctor.txt").read_text("utf-8")
        return cls(Script.parse(text))

    def reset(self) -> None:
        """Forget the memory and start every rule's reassemblies from the first again."""
        self.memories: list[list[str]] = []
        self.limit = 1
        self._memory_next = 0
        for key in self.script.keywords.values():
            for rule in key.rules:
                if isinstance(rule, Rule):
                    rule.next = 0

    def scan(self, text: str) -> tuple[list[str], list[Keyword]]:
        """Steps 1-3: the reflected words of the clause kept, and the keyword stack."""
        words: list[str] = []
        stack: list[Keyword] = []
        for word in tokenize(text):
            if word in _DELIMITERS:
                if stack:
                    break
                words = []
                continue
            key = self.script.keywords.get(word)
            if key is not None and key.rules:
                if stack and key.rank > stack[0].rank:
                    stack.insert(0, key)
                else:
                    stack.append(key)
            words.append(key.substitute if key is not None and key.substitute else word)
        return words, stack

    def _apply(self, key: Keyword, words: list[str], depth: int = 0) -> list[str] | object | None:
        """Step 4 for one keyword: the reply's words, _NEWKEY, or None if nothing matched."""
        if depth > 10:  # a script whose links go round in a circle
            raise ConfigError(f"ELIZA script: the rules of '{key.word}' link in a loop")
        for rule in key.rules:
            if isinstance(rule, str):
                return self._apply(self.script.keywords[rule], words, depth + 1)
            parts = match(rule.pattern, words, self.script.tags)
            if parts is None:
                continue
            if key.word == self.script.memory_word:
                self._remember(words)
            reply = rule.reassemblies[rule.next % len(rule.reassemblies)]
            rule.next += 1
            if (link := _link(reply)) is not None:
                return self._apply(self.script.keywords[link], words, depth + 1)
            if reply == ["newkey"]:
                return _NEWKEY
            if reply and reply[0] == "pre":
                rewritten = reassemble(reply[1], parts)
                return self._apply(self.script.keywords[_link(reply[2])], rewritten, depth + 1)
            return reassemble(reply, parts)
        return None

    def _remember(self, words: list[str]) -> None:
        """Step 5: store the next memory transformation that matches (they are used in turn)."""
        pattern, template = self.script.memory[self._memory_next % len(self.script.memory)]
        self._memory_next += 1
        parts = match(pattern, words, self.script.tags)
        if parts is not None:
            self.memories.append(reassemble(template, parts))

    def respond(self, text: str) -> str:
        """ELIZA's answer to one input."""
        words, stack = self.scan(text)
        self.limit = self.limit % 4 + 1
        for key in stack:
            reply = self._apply(key, words)
            if isinstance(reply, list):
                return _sentence(reply)
        if self.limit == 4 and self.memories:
            return _sentence(self.memories.pop(0))
        return _sentence(self._apply(self.script.keywords["none"], words))

    def say(
        self,
        text: str,
        params: SamplingParams | None = None,
        on_text: Callable[[str], None] | None = None,
        on_drop: Callable[[list[dict[str, str]]], None] | None = None,
    ) -> Turn:
        """The chat interface (infer/conversation.py's Responder): no tokens, no sampling."""
        reply = self.respond(text)
        if on_text is not None:
            on_text(reply)
        return Turn(Completion([], [], reply, [], "stop", Timing()), 0)
