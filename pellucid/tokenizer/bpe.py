"""Byte-level BPE: text -> token ids -> text, trained exactly as Hugging Face's BpeTrainer trains.

    >>> tok = Tokenizer.train(["low lower lowest"] * 5, vocab_size=263)
    >>> [tok.token_bytes(i) for i in tok.encode(" lowest lower")]
    [b' lowest', b' lower']
    >>> tok.decode(tok.encode("naïve café 👋"))
    'naïve café 👋'

How it works, in three steps:
1. Pre-tokenize: a regex cuts the text into pieces (pretokenize.py); merges never cross a piece.
2. Bytes: each piece becomes its UTF-8 bytes, one token per byte to begin with (256 base tokens).
3. Merge: repeatedly join the adjacent pair with the lowest merge rank (the pair learned first),
   until no learned pair is left (ties: the leftmost). Training learns those merges: the most
   frequent pair first.

Step 3 has three loops with one result: merge_short for ordinary pieces, merge_long (a heap,
O(n log n)) and merge_repetitive (whole-piece str.replace passes) for pieces of thousands of bytes,
so that a megabyte without a space (RELIABILITY A14) takes about a second, not minutes. Encoding
remembers the ids of each short piece it has seen, which makes ordinary text fast.

Ids follow Hugging Face's trainer: special tokens first, then the 256 bytes in GPT-2's order, then
one id per merge. Text that merely looks like a special token ("<|endoftext|>" typed by a user)
stays plain text unless the caller allows it (`allowed_special`), so user input cannot forge a
control token. Lone surrogates ("\\ud800", which no UTF-8 text can hold) become U+FFFD, as in
tiktoken; every other Python string round-trips exactly: decode(encode(s)) == s.
"""

from __future__ import annotations

import heapq
import logging
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from itertools import chain, count, islice, pairwise, repeat
from pathlib import Path
from typing import Literal

import regex

from pellucid.errors import ConfigError, DataError, TokenizerError
from pellucid.tokenizer.pretokenize import BYTE_ORDER, PATTERNS, compile_pattern, split

log = logging.getLogger("pellucid")

INF = 1 << 62  # rank of a pair that has no merge
_SHORT = 64  # pieces up to this many bytes merge with the simple quadratic loop
_LONG = 4096  # pieces over this many bytes try merge_repetitive first
_REPETITIVE_STEPS = 48  # its budget of whole-piece passes before handing over to merge_long
_CACHE_LIMIT = 100_000  # pieces remembered by encode before the cache starts over
_CACHE_MAX_CHARS = 256  # longer pieces are rare and not worth remembering
ENDOFTEXT = "<|endoftext|>"


# --- encoding: apply merges, lowest rank first ------------------------------------------------------


def merge_short(ids: list[int], ranks: dict[tuple[int, int], int], merged: list[int]) -> list[int]:
    """Merge `ids` in place: join the adjacent pair of lowest rank (leftmost on ties) until none.

    `ranks[(a, b)]` is the rank of merge (a, b) and `merged[rank]` the id it makes. O(n^2), fine
    for the short pieces of ordinary text.

        >>> merge_short([1, 2, 3], {(1, 2): 0, (4, 3): 1}, [4, 5])
        [5]
    """
    rs = list(map(ranks.get, zip(ids, islice(ids, 1, None), strict=False), repeat(INF)))
    while rs:
        r = min(rs)
        if r == INF:
            break
        i = rs.index(r)
        ids[i : i + 2] = (merged[r],)
        del rs[i]
        if i > 0:
            rs[i - 1] = ranks.get((ids[i - 1], ids[i]), INF)
        if i < len(rs):
            rs[i] = ranks.get((ids[i], ids[i + 1]), INF)
    return ids


def merge_long(ids: list[int], ranks: dict[tuple[int, int], int], merged: list[int]) -> list[int]:
    """Same result as merge_short in O(n log n): a heap of (rank, position) over a linked list.

    A piece can be a megabyte of one letter; the quadratic loop would take hours on it. Heap
    entries go stale when a neighbour merges first; we check each one when it comes out.

        >>> merge_long([1, 1, 1, 1], {(1, 1): 0, (2, 2): 1}, [2, 3])
        [3]
    """
    n = len(ids)
    sym: list[int | None] = list(ids)
    nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
    heap = [(r, i) for i, p in enumerate(pairwise(ids)) if (r := ranks.get(p, INF)) < INF]
    heapq.heapify(heap)
    while heap:
        r, i = heapq.heappop(heap)
        j = nxt[i]
        if sym[i] is None or j >= n or ranks.get((sym[i], sym[j])) != r:
            continue  # stale: i was absorbed, or a neighbour changed since this entry was made
        sym[i], sym[j] = merged[r], None
        nxt[i] = nxt[j]
        if nxt[i] < n:
            prv[nxt[i]] = i
            if (r2 := ranks.get((sym[i], sym[nxt[i]]), INF)) < INF:
                heapq.heappush(heap, (r2, i))
        if prv[i] >= 0 and (r2 := ranks.get((sym[prv[i]], sym[i]), INF)) < INF:
            heapq.heappush(heap, (r2, prv[i]))
    return [s for s in sym if s is not None]


def batchable_ranks(merges: Sequence[tuple[int, int]], merged: Sequence[int]) -> list[bool]:
    """For each rank r: may every occurrence of merge r be applied at once, left to right?

    Yes unless the token merge r makes is used by a merge of *lower* rank: then a pair formed by
    the first occurrence must be merged before the next occurrence (HF's queue pops it first).
    Trained BPE makes a token before using it, but a vocabulary that reaches one token by two
    merges (HF's trainer reuses an existing token) can break this.
    """
    first_use: dict[int, int] = {}
    for rank, (a, b) in enumerate(merges):
        first_use.setdefault(a, rank)
        first_use.setdefault(b, rank)
    return [first_use.get(made, INF) > rank for rank, made in enumerate(merged)]


def merge_repetitive(
    ids: list[int],
    ranks: dict[tuple[int, int], int],
    merges: Sequence[tuple[int, int]],
    merged: Sequence[int],
    batchable: Sequence[bool],
    budget: int = _REPETITIVE_STEPS,
) -> list[int]:
    """Same result as merge_short, fast on long repetitive pieces (a megabyte of spaces).

    The piece becomes a string with one character per id, so that str.replace() applies all
    occurrences of the lowest-rank pair in one pass at C speed, and regexes find the pairs the new
    token forms. A megabyte of one character then needs about 20 passes instead of a million heap
    operations. Varied pieces would need a pass per distinct merge, so after `budget` passes the
    partly merged ids go on to merge_long: both apply merges in the same order, so handing over
    midway changes nothing.

        >>> merge_repetitive([1] * 8, {(1, 1): 0, (2, 2): 1}, [(1, 1), (2, 2)], [2, 3], [True] * 2)
        [3, 3]
    """
    text = "".join(map(chr, ids))
    queued = {r for a, b in set(pairwise(text)) if (r := ranks.get((ord(a), ord(b)), INF)) < INF}
    heap = list(queued)
    heapq.heapify(heap)
    while heap and budget > 0:
        r = heapq.heappop(heap)
        queued.discard(r)
        pair = "".join(map(chr, merges[r]))
        budget -= 1
        if pair not in text:
            continue  # an earlier merge used up its occurrences
        new = merged[r]
        text = text.replace(pair, chr(new), -1 if batchable[r] else 1)
        found = [(r, pair in text)]
        # pairs (new, right) read forwards, (left, new) read backwards, each after one `new`
        after = re.compile(re.escape(chr(new)) + "(?=(.))", re.DOTALL)
        found += [(ranks.get((new, ord(c)), INF), True) for c in set(after.findall(text))]
        found += [(ranks.get((ord(c), new), INF), True) for c in set(after.findall(text[::-1]))]
        for rank, present in found:
            if present and rank < INF and rank not in queued:
                queued.add(rank)
                heapq.heappush(heap, rank)
    ids = list(map(ord, text))
    return merge_long(ids, ranks, merged) if heap else ids


class _PieceCache(dict):
    """piece -> token ids; a miss runs BPE on the piece (dict.__missing__ keeps hits in C)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer

    def __missing__(self, piece: str) -> tuple[int, ...]:
        ids = self.tokenizer.encode_piece(piece)
        if len(piece) <= _CACHE_MAX_CHARS:
            if len(self) >= _CACHE_LIMIT:
                self.clear()
            self[piece] = ids
        return ids


def valid_text(text: str) -> str:
    """`text`, with lone surrogates (not encodable as UTF-8) replaced by U+FFFD, as tiktoken does.

    A surrogate pair spelled as two code points ("\\ud83d\\ude00") becomes the character it spells.
    """
    if not isinstance(text, str):
        raise TokenizerError(f"can only encode str, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


# --- the tokenizer ----------------------------------------------------------------------------------


class Tokenizer:
    """A byte-level BPE vocabulary: `vocab[id]` is the token's bytes, `merges` the learned pairs.

    Args:
        vocab: bytes of every id (a special token's are its UTF-8 text).
        merges: (left id, right id) in rank order; each must make a token of the vocabulary.
        special_tokens: text -> id of tokens that are never merged (`<|endoftext|>`, `<|im_start|>`).
        pattern: "gpt2", "llama3", "smollm" or a regex source (see pretokenize.py).
        ignore_merges: a piece that is already one token is taken whole (Llama 3 does this).
    """

    def __init__(
        self,
        vocab: Sequence[bytes],
        merges: Sequence[tuple[int, int]],
        special_tokens: Mapping[str, int] | None = None,
        pattern: str = "gpt2",
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        ignore_merges: bool = False,
    ) -> None:
        self.vocab = [bytes(t) for t in vocab]
        self.special_tokens = dict(special_tokens or {})
        self.pattern, self.ignore_merges = pattern, ignore_merges
        self.bos_id, self.eos_id = bos_id, eos_id
        self._regex = compile_pattern(pattern)
        self._check_ids()
        special_ids = set(self.special_tokens.values())
        self._ordinary: dict[bytes, int] = {}
        for i, t in enumerate(self.vocab):
            if i not in special_ids and self._ordinary.setdefault(t, i) != i:
                raise TokenizerError(f"duplicate token {t!r:.60}: ids {self._ordinary[t]} and {i}")
        self._byte_ids = [self._ordinary.get(bytes([b]), -1) for b in range(256)]
        self.merges = [(int(a), int(b)) for a, b in merges]
        self._ranks: dict[tuple[int, int], int] = {}
        self._merged: list[int] = []
        for rank, (a, b) in enumerate(self.merges):
            self._ranks[(a, b)] = rank  # a repeated pair keeps its last rank, as in HF
            self._merged.append(self._merge_id(rank, a, b, special_ids))
        self._batchable = batchable_ranks(self.merges, self._merged)
        self._cache = _PieceCache(self)
        self._special_regex: dict[frozenset[str], regex.Pattern] = {}

    def _check_ids(self) -> None:
        n = len(self.vocab)
        for name, i in [*self.special_tokens.items(), ("bos", self.bos_id), ("eos", self.eos_id)]:
            if i is not None and not (isinstance(i, int) and 0 <= i < n):
                raise TokenizerError(f"token {name!r} has id {i!r}, outside the vocabulary of {n}")
        for text, i in self.special_tokens.items():
            if not text or self.vocab[i] != text.encode("utf-8"):
                raise TokenizerError(f"special token {text!r} does not match vocabulary entry {i}")
        if len(set(self.special_tokens.values())) != len(self.special_tokens):
            raise TokenizerError("two special tokens share one id")

    def _merge_id(self, rank: int, a: int, b: int, special_ids: set[int]) -> int:
        n = len(self.vocab)
        if not (0 <= a < n and 0 <= b < n) or a in special_ids or b in special_ids:
            raise TokenizerError(f"merge {rank} ({a}, {b}) refers to an unknown or special token")
        made = self._ordinary.get(self.vocab[a] + self.vocab[b])
        if made is None:
            joined = self.vocab[a] + self.vocab[b]
            raise TokenizerError(
                f"merge {rank} makes {joined!r:.60}, which is not in the vocabulary"
            )
        return made

    @property
    def vocab_size(self) -> int:
        """Size of the id space, special tokens included."""
        return len(self.vocab)

    def token_bytes(self, id: int) -> bytes:
        """The bytes of one token (a special token's UTF-8 text)."""
        return self.vocab[self._check_id(id)]

    def _check_id(self, id: int) -> int:
        if not 0 <= id < len(self.vocab):
            raise TokenizerError(
                f"token id {id} is outside the vocabulary (0..{len(self.vocab) - 1})"
            )
        return id

    # --- encode -------------------------------------------------------------------------------------

    def encode_piece(self, piece: str) -> tuple[int, ...]:
        """Ids of one pre-token piece, uncached: its bytes, then merges, lowest rank first.

        Raises TokenizerError if the vocabulary has no token for one of the bytes (SmolLM2 lacks
        21 of the 256; other tokenizers drop such bytes silently, losing text).
        """
        data = piece.encode("utf-8")
        if self.ignore_merges and (whole := self._ordinary.get(data)) is not None:
            return (whole,)
        ids = list(map(self._byte_ids.__getitem__, data))
        if -1 in ids:
            bad = data[ids.index(-1)]
            raise TokenizerError(
                f"cannot encode {piece!r:.40}: the vocabulary has no token for byte 0x{bad:02x}"
            )
        if len(ids) <= _SHORT:
            return tuple(merge_short(ids, self._ranks, self._merged))
        if len(ids) <= _LONG or len(self.vocab) > sys.maxunicode:
            return tuple(merge_long(ids, self._ranks, self._merged))
        return tuple(merge_repetitive(ids, self._ranks, self.merges, self._merged, self._batchable))

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of `text`, with any special-token text encoded as plain text."""
        pieces = split(valid_text(text), self._regex)
        return list(chain.from_iterable(map(self._cache.__getitem__, pieces)))

    def encode(
        self, text: str, allowed_special: AbstractSet[str] | Literal["all"] = frozenset()
    ) -> list[int]:
        """Text -> token ids. Special tokens are recognised only if in `allowed_special` ("all").

        >>> tok = Tokenizer.train(["hi"], 260, special_tokens=["<|endoftext|>"])
        >>> tok.encode("<|endoftext|>", allowed_special="all")
        [0]
        >>> len(tok.encode("<|endoftext|>"))                  # plain text by default
        13
        """
        allowed = self.special_tokens.keys() if allowed_special == "all" else allowed_special
        if not allowed:
            return self.encode_ordinary(text)
        key = frozenset(allowed)
        if key not in self._special_regex:
            unknown = key - self.special_tokens.keys()
            if unknown:
                raise TokenizerError(f"not special tokens of this tokenizer: {sorted(unknown)}")
            alternatives = "|".join(regex.escape(s) for s in sorted(key, key=len, reverse=True))
            self._special_regex[key] = regex.compile(f"({alternatives})")
        ids: list[int] = []
        # split() with a group alternates plain text (even indices) and special tokens (odd ones)
        for i, part in enumerate(self._special_regex[key].split(valid_text(text))):
            ids.extend(self.encode_ordinary(part) if i % 2 == 0 else (self.special_tokens[part],))
        return ids

    def encode_batch(
        self, texts: Sequence[str], allowed_special: AbstractSet[str] | Literal["all"] = frozenset()
    ) -> list[list[int]]:
        """encode() of each text; they share the piece cache, so a batch is faster than one call each."""
        return [self.encode(t, allowed_special) for t in texts]

    # --- decode -------------------------------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Ids -> the concatenated bytes of their tokens; TokenizerError on an id out of range."""
        ids = list(ids)
        if ids and not (min(ids) >= 0 and max(ids) < len(self.vocab)):
            self._check_id(next(i for i in ids if not 0 <= i < len(self.vocab)))
        return b"".join(map(self.vocab.__getitem__, ids))

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text. Bytes that are not valid UTF-8 (half a character) become U+FFFD, as in HF."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # --- files --------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write Hugging Face `tokenizer.json` (atomically); `tokenizers` loads it as is."""
        from pellucid.tokenizer.formats import save_tokenizer_json

        save_tokenizer_json(self, path)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Read a byte-level BPE `tokenizer.json` (ours, or GPT-2/Llama-3/SmolLM2-style from HF)."""
        from pellucid.tokenizer.formats import load_tokenizer_json

        return load_tokenizer_json(path)

    # --- training -----------------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        special_tokens: Sequence[str] = (),
        pattern: str = "gpt2",
        *,
        min_frequency: int = 0,
    ) -> Tokenizer:
        """Learn merges from `texts` until the vocabulary has `vocab_size` ids (specials included).

        Gives the same vocabulary and merges as HF `BpeTrainer(vocab_size, min_frequency,
        special_tokens, initial_alphabet=ByteLevel.alphabet())` with a ByteLevel pre-tokenizer
        (for "gpt2"). Stops early, with a smaller vocabulary, if no pair occurs `min_frequency`
        times (or at all). `<|endoftext|>`, if among the specials, becomes `eos_id`.
        """
        if pattern not in PATTERNS:
            raise ConfigError(
                f"unknown pre-tokenizer pattern {pattern!r}; choose from {list(PATTERNS)}"
            )
        specials = list(special_tokens)
        if len(set(specials)) != len(specials) or not all(
            isinstance(s, str) and s for s in specials
        ):
            raise ConfigError(f"special tokens must be distinct non-empty strings: {specials}")
        if vocab_size < 256 + len(specials):
            raise ConfigError(
                f"vocab_size {vocab_size} is too small: 256 byte tokens + {len(specials)} special "
                f"tokens need at least {256 + len(specials)}"
            )
        regex_ = compile_pattern(pattern)
        words: Counter[str] = Counter()
        for text in texts:
            words.update(split(valid_text(text), regex_))
        if not words:
            raise DataError("cannot train a tokenizer on an empty corpus")
        vocab = [s.encode("utf-8") for s in specials] + [bytes([b]) for b in BYTE_ORDER]
        merges = train_merges(words, vocab, vocab_size, min_frequency)
        if len(vocab) < vocab_size:
            log.info("tokenizer: the corpus ran out of pairs at %d tokens", len(vocab))
        special_ids = {s: i for i, s in enumerate(specials)}
        return cls(vocab, merges, special_ids, pattern, eos_id=special_ids.get(ENDOFTEXT))


def train_merges(
    words: Mapping[str, int], vocab: list[bytes], vocab_size: int, min_frequency: int = 0
) -> list[tuple[int, int]]:
    """The BPE training loop over word counts; appends new tokens to `vocab`, returns the merges.

    Same algorithm and tie-breaking as HF's BpeTrainer: a max-heap of (count, pair) where equal
    counts go to the smaller pair of ids; each merge updates the pair counts incrementally in the
    words that contain the pair, never recounting the corpus. Entries whose count went stale are
    re-pushed with the current count when they reach the top. Pair (a, b) is the int a << 32 | b.

        >>> vocab = [bytes([b]) for b in range(256)]
        >>> train_merges({"abab": 3, "ab": 1}, vocab, 258)      # 'ab' (count 7), then 'abab'
        [(97, 98), (256, 256)]
        >>> vocab[256:]
        [b'ab', b'abab']
    """
    index = {t: i for i, t in enumerate(vocab)}
    seqs, counts = [], []  # each distinct word of 2+ bytes as token ids, and how often it occurs
    for word, n in words.items():
        data = word.encode("utf-8")
        if len(data) > 1:
            seqs.append([index[data[i : i + 1]] for i in range(len(data))])
            counts.append(n)
    pair_counts: defaultdict[int, int] = defaultdict(int)
    where: defaultdict[int, set[int]] = defaultdict(set)
    for w, (seq, n) in enumerate(zip(seqs, counts, strict=False)):
        for a, b in pairwise(seq):
            pair_counts[a << 32 | b] += n
            where[a << 32 | b].add(w)
    tick = count()  # never compare the position sets of two entries with equal count and pair
    heap = [(-pair_counts[p], p, next(tick), pos) for p, pos in where.items()]
    heapq.heapify(heap)
    merges: list[tuple[int, int]] = []
    while len(vocab) < vocab_size and heap:
        neg, pair, _, pos = heapq.heappop(heap)
        if -neg != pair_counts[pair]:
            heapq.heappush(heap, (-pair_counts[pair], pair, next(tick), pos))
            continue
        if -neg < max(1, min_frequency):
            break
        a, b = pair >> 32, pair & 0xFFFFFFFF
        new = index.setdefault(vocab[a] + vocab[b], len(vocab))  # HF reuses an existing token
        if new == len(vocab):
            vocab.append(vocab[a] + vocab[b])
        merges.append((a, b))
        changed: defaultdict[int, set[int]] = defaultdict(set)
        for w in pos:
            _merge_word(seqs[w], a, b, new, counts[w], w, pair_counts, changed)
        for p, pos2 in changed.items():
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p, next(tick), pos2))
    return merges


def _merge_word(
    seq: list[int],
    a: int,
    b: int,
    new: int,
    n: int,
    w: int,
    pair_counts: defaultdict[int, int],
    changed: defaultdict[int, set[int]],
) -> None:
    """Replace each (a, b) in `seq` (left to right) by `new`, and move the `n` counts of the pairs
    around it. Like HF's Word::merge, the merged pair's own count is left as it is."""
    i = 0
    while True:
        try:
            i = seq.index(a, i)
        except ValueError:
            return
        if i + 1 < len(seq) and seq[i + 1] == b:
            if i > 0:
                left = seq[i - 1]
                pair_counts[left << 32 | a] -= n
                pair_counts[left << 32 | new] += n
                changed[left << 32 | new].add(w)
            seq[i : i + 2] = (new,)
            if i + 1 < len(seq):
                right = seq[i + 1]
                pair_counts[b << 32 | right] -= n
                pair_counts[new << 32 | right] += n
                changed[new << 32 | right].add(w)
        i += 1
