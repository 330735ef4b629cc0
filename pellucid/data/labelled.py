"""Classification data from registry corpora: pure functions from raw files to (text, label).

- `email_text`: a raw email (SpamAssassin) -> its body as plain text: the text/plain parts, else
  the text/html parts with the tags stripped; headers and attachments dropped;
- `passages`: sentences -> passages of about PASSAGE_WORDS words (SOTU and Brown files are long;
  a classifier wants paragraph-sized inputs, and neither source marks its paragraphs);
- `sotu_sentences` / `brown_sentences`: a SOTU speech, a POS-tagged Brown file -> sentences.

Nothing here touches the disk or the network; `pellucid.data.datasets` fetches and caches.
"""

from __future__ import annotations

import email
import email.policy
import re
from html.parser import HTMLParser

MAX_CHARS = 2000  # an email body is cut (at a word boundary) to this many characters
PASSAGE_WORDS = 120  # a passage closes at the first sentence end at or past this many words
MIN_PASSAGE_WORDS = 40  # a shorter tail joins the passage before it

# The Brown corpus genres by the second letter of the file name (its documentation, cats.txt).
BROWN_GENRES = {
    "a": "news",
    "b": "editorial",
    "c": "reviews",
    "d": "religion",
    "e": "hobbies",
    "f": "lore",
    "g": "belles_lettres",
    "h": "government",
    "j": "learned",
    "k": "fiction",
    "l": "mystery",
    "m": "science_fiction",
    "n": "adventure",
    "p": "romance",
    "r": "humor",
}
SOTU_PARTIES = ("Democratic", "Republican")  # the two parties with enough speeches (90 and 92)

_BLOCK_TAGS = frozenset(
    "br p div tr li ul ol table h1 h2 h3 h4 h5 h6 blockquote pre hr title center".split()
)
# A sentence ends at . ! or ? (and any closing quotes or brackets) before a capital or digit.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]\u201d\u2019]*\s+(?=[\"'(\[\u201c\u2018]*[A-Z0-9])")


class _TextOfHTML(HTMLParser):
    """Collects the text of an HTML document: script/style dropped, block tags as line breaks."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0  # depth inside <script>/<style>

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._skip = max(0, self._skip - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """The visible text of an HTML fragment.

    >>> html_to_text("<p>Save <b>70%</b>&nbsp;now!</p><script>x()</script>")
    'Save 70%\\xa0now!'
    """
    parser = _TextOfHTML()
    try:
        parser.feed(html)
        parser.close()
    except (AssertionError, ValueError):  # malformed markup in old spam: keep what was read
        pass
    return tidy("".join(parser.parts))


def tidy(text: str) -> str:
    """Whitespace made tidy: spaces and tabs collapsed, at most one blank line, ends stripped;
    control characters (old mail holds stray ones) dropped: they are no text, and some
    tokenizers (SmolLM2's) have no token for them.

    >>> tidy("Save\x1d  70%\r\n\n\n\nnow\x85 ")
    'Save 70%\n\nnow'
    """
    text = re.sub(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]", "", text)
    text = re.sub(r"[ \t\r\f\v]+", " ", text)
    text = re.sub(r" ?\n ?", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def clip(text: str, limit: int = MAX_CHARS) -> str:
    """`text` cut to at most `limit` characters, at the last whitespace before the cut."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = max(cut.rfind(" "), cut.rfind("\n"))
    return (cut[:space] if space > limit // 2 else cut).rstrip()


def _part_text(part: email.message.Message) -> str:
    payload = part.get_payload(decode=True)  # bytes after quoted-printable/base64, or None
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "latin-1"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:  # an unknown charset name: latin-1 maps every byte
        return payload.decode("latin-1")


def email_text(raw: bytes) -> str:
    """The body of a raw email as plain text, headers dropped, cut to MAX_CHARS.

    The text/plain parts are taken if there are any, else the text/html parts with the markup
    stripped; other parts (attachments, images) are ignored. A type is read leniently
    (`TEXT/PLAIN charset=...`, missing its `;`, is still text/plain). Mail whose MIME structure does
    not parse (a bad boundary) falls back to everything after the headers, markup stripped. Empty
    when the email has no text at all (an image, an iframe).
    """
    message = email.message_from_bytes(raw, policy=email.policy.compat32)  # tolerant of old mail
    plain, html = [], []
    for part in message.walk():
        kind = re.match(r"text/(plain|html)\b", part.get_content_type())
        if part.is_multipart() or kind is None:
            continue
        (plain if kind.group(1) == "plain" else html).append(_part_text(part))
    text = tidy("\n\n".join(plain)) if any(p.strip() for p in plain) else ""
    text = text or html_to_text("\n".join(html))
    if not text and message.get_content_maintype() == "multipart" and not message.is_multipart():
        # A multipart type whose parts did not parse (a bad boundary): read the body as it is.
        body = re.split(rb"\r?\n\r?\n", raw, maxsplit=1)[-1]
        text = html_to_text(body.decode("latin-1"))
    return clip(text)


def passages(sentences: list[str]) -> list[str]:
    """Consecutive sentences joined into passages of about PASSAGE_WORDS words.

    A passage closes at the first sentence that brings it to PASSAGE_WORDS words; a final one under
    MIN_PASSAGE_WORDS words joins the passage before it (or stands alone if it is the only one).
    """
    out: list[list[str]] = []
    current: list[str] = []
    words = 0
    for sentence in sentences:
        current.append(sentence)
        words += len(sentence.split())
        if words >= PASSAGE_WORDS:
            out.append(current)
            current, words = [], 0
    if current:
        if out and words < MIN_PASSAGE_WORDS:
            out[-1] += current
        else:
            out.append(current)
    return [" ".join(p) for p in out]


def sotu_sentences(text: str) -> list[str]:
    """The sentences of a State of the Union text (one long line per speech in the source)."""
    text = re.sub(r"\s+", " ", text).strip()
    return [s for s in _SENTENCE_END.split(text) if s.strip()]


def _detokenize(words: list[str]) -> str:
    """Brown's tokens back to running text: no space before punctuation, `` and '' as quotes."""
    text = " ".join(words)
    text = re.sub(r"``\s*", '"', text)
    text = re.sub(r"\s*''", '"', text)
    text = re.sub(r"\s+([,.;:?!)\]%])", r"\1", text)
    return re.sub(r"([(\[])\s+", r"\1", text)


def brown_sentences(text: str) -> list[str]:
    """The sentences of a Brown corpus file (`word/tag` tokens, one sentence a line), tags dropped.

    >>> brown_sentences("\\n\\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ./.\\n")
    ['The jury said "no".']
    """
    sentences = []
    for line in text.splitlines():
        words = [w for tok in line.split() if (w := tok.rsplit("/", 1)[0])]
        if words:
            sentences.append(_detokenize(words))
    return sentences
