"""Streaming decode: token ids arrive one at a time, text leaves in whole characters only.

A token may hold part of a UTF-8 character (an emoji is 4 bytes, often split over 2-3 byte-level
tokens). Decoding each token alone would print U+FFFD replacement marks mid-stream; instead the
decoder keeps the incomplete tail of the byte stream until the character completes.

    >>> from pellucid.tokenizer.bpe import Tokenizer
    >>> tok = Tokenizer.train(["hi"], 257)               # byte tokens + one merge, 'hi'
    >>> dec = StreamDecoder(tok)
    >>> [dec.push(i) for i in tok.encode("👋 hi")]       # the emoji is 4 byte tokens
    ['', '', '', '👋', ' ', 'hi']
    >>> dec.push(tok.encode("👋")[0]), dec.flush()      # a truncated character ends as U+FFFD
    ('', '\ufffd')

Joining every push() and the final flush() gives exactly tokenizer.decode(all ids).
"""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pellucid.tokenizer.bpe import Tokenizer


class StreamDecoder:
    """Incremental ids -> text for one sequence; invalid bytes become U+FFFD as in decode()."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        # Python's incremental UTF-8 decoder holds an incomplete trailing character back until
        # its remaining bytes arrive, and replaces bytes that can never become one right away.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, id: int) -> str:
        """Add one token; return the text completed by it (possibly '')."""
        return self._utf8.decode(self.tokenizer.token_bytes(id))

    def flush(self) -> str:
        """End of sequence: return what is left (an unfinished character becomes U+FFFD)."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
