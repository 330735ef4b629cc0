"""Pre-tokenization: cut text into pieces that BPE merges never cross, and GPT-2's byte alphabet.

A regex splits the text first, so that " dog", " dog." and "dog!" share the token " dog" instead of
learning one token per punctuation variant. Splits are kept whole: joining the pieces gives the
text back, so no character is ever lost here.

    >>> split("Hello world, 2024!", "gpt2")
    ['Hello', ' world', ',', ' 2024', '!']
    >>> split("Hello world, 2024!", "llama3")       # digits in groups of at most 3
    ['Hello', ' world', ',', ' ', '202', '4', '!']
    >>> split("x  12", "smollm")                    # every digit alone (SmolLM2)
    ['x', '  ', '1', '2']

Byte-level BPE works on UTF-8 bytes, but tokenizer.json and GGUF files store tokens as text. GPT-2
maps each byte to one printable character (space -> 'Ġ', newline -> 'Ċ'), so a token's bytes can be
written as a string:

    >>> bytes_to_str(b" hi\\n"), str_to_bytes("Ġhi")
    ('ĠhiĊ', b' hi')
"""

from __future__ import annotations

import regex

from pellucid.errors import TokenizerError

# GPT-2 (and HF's ByteLevel pre-tokenizer): contractions, letters with one optional leading space,
# numbers, other symbols, and whitespace that leaves its last space to the next word.
GPT2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Llama 3 (cl100k-like): case-insensitive contractions, digits in groups of 1-3, newlines apart.
LLAMA3 = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# SmolLM2 (llama.cpp `smollm`; HF Digits(individual_digits) then ByteLevel): each digit alone, then
# GPT-2's rules inside the runs between digits. One regex does both: digits come first, and
# whitespace right before a digit ends its run, as it would at the end of a separate piece.
SMOLLM = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
PATTERNS = {"gpt2": GPT2, "llama3": LLAMA3, "smollm": SMOLLM}


def compile_pattern(pattern: str) -> regex.Pattern:
    """A pattern name ("gpt2", "llama3", "smollm") or a regex source -> compiled regex."""
    try:
        return regex.compile(PATTERNS.get(pattern, pattern))
    except regex.error as e:
        raise TokenizerError(f"bad pre-tokenizer regex {pattern!r:.80}: {e}") from None


def split(text: str, pattern: str | regex.Pattern) -> list[str]:
    """Cut `text` into pieces: every match of the pattern, plus any text between matches.

    The built-in patterns match every character, so `findall` alone is lossless for them; a foreign
    pattern (from someone's tokenizer.json) may skip text, which we keep as pieces of its own, as
    Hugging Face's `Split(behavior="isolated")` does.
    """
    compiled = compile_pattern(pattern) if isinstance(pattern, str) else pattern
    if compiled.pattern in PATTERNS.values():
        return compiled.findall(text)
    pieces, end = [], 0
    for m in compiled.finditer(text):
        if m.start() > end:
            pieces.append(text[end : m.start()])
        if m.end() > m.start():
            pieces.append(m.group())
        end = m.end()
    if end < len(text):
        pieces.append(text[end:])
    return pieces


def _byte_chars() -> list[str]:
    """GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the other 68 bytes
    (controls, space, 0x7F-0xA0, 0xAD) take the characters from U+0100 on, in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(0x100 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


BYTE_CHARS = _byte_chars()  # byte value -> its character
_TO_CHARS = dict(enumerate(BYTE_CHARS))  # str.translate table over latin-1 text
_TO_BYTES = {ord(c): b for b, c in enumerate(BYTE_CHARS)}
_ALPHABET = frozenset(BYTE_CHARS)
# Hugging Face's BpeTrainer numbers the initial alphabet in character order; with GPT-2's table
# that is the order bytes appear in GPT-2's own vocabulary ('!' is 0, 'Ā' (byte 0) is 188).
BYTE_ORDER = sorted(range(256), key=lambda b: BYTE_CHARS[b])


def bytes_to_str(data: bytes) -> str:
    """Token bytes -> GPT-2 byte-level string (b' hi' -> 'Ġhi')."""
    return data.decode("latin-1").translate(_TO_CHARS)


def str_to_bytes(token: str) -> bytes:
    """GPT-2 byte-level string -> token bytes; TokenizerError if a character is not in the table."""
    if not _ALPHABET.issuperset(token):
        bad = next(c for c in token if c not in _ALPHABET)
        raise TokenizerError(f"token {token!r:.60} is not byte-level: {bad!r} stands for no byte")
    return token.translate(_TO_BYTES).encode("latin-1")
