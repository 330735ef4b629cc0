"""Tokenizer files: Hugging Face `tokenizer.json` (read and write) and GGUF metadata (read).

    >>> tok = load_tokenizer("runs/demo/tokenizer.json")      # or a run dir, HF dir, or .gguf
    >>> save_tokenizer_json(tok, "out/tokenizer.json")         # tokenizers.Tokenizer.from_file reads it

Both formats store a byte-level BPE the same way: each token as a string in GPT-2's byte alphabet
('Ġhi' is b' hi'), merges as pairs of such strings in rank order, special tokens as plain text.
The pre-tokenizer is stored as rules; we map each supported rule set onto a pattern name of
pretokenize.py and refuse the others by name, since a wrong pre-tokenizer gives wrong ids
silently.

| pattern | tokenizer.json pre_tokenizer                          | GGUF tokenizer.ggml.pre |
|---------|-------------------------------------------------------|-------------------------|
| gpt2    | ByteLevel(use_regex=true)                             | gpt-2 (also default)    |
| llama3  | Split(Llama 3 regex, Isolated) + ByteLevel(no regex)  | llama-bpe               |
| smollm  | Digits(individual) + ByteLevel(use_regex=true)        | smollm                  |
| regex   | Split(that regex, Isolated) + ByteLevel(no regex)     | -                       |
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pellucid.errors import TokenizerError
from pellucid.files import atomic_write, check_shape, read_json
from pellucid.gguf_reader import read_gguf
from pellucid.tokenizer.bpe import ENDOFTEXT, Tokenizer
from pellucid.tokenizer.pretokenize import GPT2, LLAMA3, PATTERNS, bytes_to_str, str_to_bytes

# Our pattern names <-> llama.cpp's `tokenizer.ggml.pre` values ("default" is GPT-2's regex).
GGUF_PRE_NAMES = {"gpt2": "gpt-2", "llama3": "llama-bpe", "smollm": "smollm"}
_FROM_GGUF_PRE = {v: k for k, v in GGUF_PRE_NAMES.items()} | {"default": "gpt2"}
_BYTE_LEVEL = {"add_prefix_space": False, "trim_offsets": True}
_GGUF_SPECIAL_TYPES = (3, 4)  # CONTROL, USER_DEFINED: matched whole, never merged


# --- tokenizer.json: write ------------------------------------------------------------------------


def _pre_tokenizer_json(pattern: str) -> dict[str, Any]:
    byte_level = {"type": "ByteLevel", **_BYTE_LEVEL}
    if pattern == "gpt2":
        return {**byte_level, "use_regex": True}
    if pattern == "smollm":
        digits = {"type": "Digits", "individual_digits": True}
        return {"type": "Sequence", "pretokenizers": [digits, {**byte_level, "use_regex": True}]}
    split = {
        "type": "Split",
        "pattern": {"Regex": PATTERNS.get(pattern, pattern)},
        "behavior": "Isolated",
        "invert": False,
    }
    return {"type": "Sequence", "pretokenizers": [split, {**byte_level, "use_regex": False}]}


def tokenizer_json(tok: Tokenizer) -> dict[str, Any]:
    """The tokenizer as a `tokenizer.json` object (HF `tokenizers` format, BPE model)."""
    special = {i: text for text, i in tok.special_tokens.items()}
    names = [special.get(i) or bytes_to_str(b) for i, b in enumerate(tok.vocab)]
    added = [
        {
            "id": i,
            "content": text,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, text in sorted(special.items())
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": _pre_tokenizer_json(tok.pattern),
        "post_processor": {"type": "ByteLevel", **_BYTE_LEVEL, "use_regex": True},
        "decoder": {"type": "ByteLevel", **_BYTE_LEVEL, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": tok.ignore_merges,
            "vocab": {name: i for i, name in enumerate(names)},
            "merges": [[names[a], names[b]] for a, b in tok.merges],
        },
    }


def save_tokenizer_json(tok: Tokenizer, path: str | Path) -> None:
    """Write `tokenizer.json` atomically; the same tokenizer always gives the same bytes."""
    text = json.dumps(tokenizer_json(tok), ensure_ascii=False, indent=2) + "\n"
    atomic_write(Path(path), text.encode("utf-8"))


# --- tokenizer.json: read -------------------------------------------------------------------------


# The fields each reader relies on, with their types (pellucid.files.check_shape).
TOKENIZER_JSON = {
    "model": {"type": str, "vocab": dict, "merges?": list},
    "added_tokens?": [{"content": str, "id": int}],
    "pre_tokenizer?": dict,
}
TOKENIZER_CONFIG = {"bos_token?": (str, dict), "eos_token?": (str, dict)}
_PRE_STEP = {"type": str}
_SPLIT = {"pattern": {"Regex": str}, "behavior?": str}


def _pattern_from_json(pre: Any, where: str) -> str:
    """A tokenizer.json `pre_tokenizer` -> our pattern name (or regex); TokenizerError if not ours."""
    steps = (
        pre.get("pretokenizers")
        if isinstance(pre, dict) and pre.get("type") == "Sequence"
        else [pre]
    )
    if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
        raise TokenizerError(
            f"{where}: pre_tokenizer is not byte-level BPE's: {json.dumps(pre)[:120]}"
        )
    for i, step in enumerate(steps):
        check_shape(step, _SPLIT if step.get("type") == "Split" else _PRE_STEP, where,
                    TokenizerError, f"pre_tokenizer step {i}")  # fmt: skip
    kinds = [s.get("type") for s in steps]
    last = steps[-1]
    if kinds[-1] != "ByteLevel" or last.get("add_prefix_space"):
        raise TokenizerError(
            f"{where}: unsupported pre_tokenizer {kinds} (need ByteLevel last, without add_prefix_space)"
        )
    if kinds == ["ByteLevel"] and last.get("use_regex", True):
        return "gpt2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and last.get("use_regex", True)
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not last.get("use_regex", True):
        split = steps[0]
        regex_src = split["pattern"]["Regex"]
        if (
            isinstance(regex_src, str)
            and split.get("behavior") == "Isolated"
            and not split.get("invert")
        ):
            return {GPT2: "gpt2", LLAMA3: "llama3"}.get(regex_src, regex_src)
    raise TokenizerError(f"{where}: unsupported pre_tokenizer {kinds}: {json.dumps(pre)[:160]}")


def _merge_pairs(merges: Any, where: str) -> list[tuple[str, str]]:
    """Merges as ["a b", ...] (older files) or [["a", "b"], ...] -> list of string pairs."""
    if not isinstance(merges, list):
        raise TokenizerError(f"{where}: model.merges is not a list")
    pairs = []
    for m in merges:
        pair = m.split(" ") if isinstance(m, str) else m
        if not (
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)
        ):
            raise TokenizerError(f"{where}: bad merge {m!r:.60}")
        pairs.append((pair[0], pair[1]))
    return pairs


def build_tokenizer(
    names: Sequence[str],
    merges: Sequence[tuple[str, str]],
    special: Mapping[str, int],
    pattern: str,
    where: str,
    **options: Any,
) -> Tokenizer:
    """Token strings (GPT-2 byte alphabet, or plain text for specials) and string merges -> Tokenizer.

    Every error names the file (`where`)."""
    vocab, ids = [], {}
    try:
        for i, name in enumerate(names):
            if not isinstance(name, str):
                raise TokenizerError(f"token {i} is not a string")
            if ids.setdefault(name, i) != i:
                raise TokenizerError(f"duplicate token {name!r:.60}: ids {ids[name]} and {i}")
            vocab.append(name.encode("utf-8") if special.get(name) == i else str_to_bytes(name))
        unknown = next((m for m in merges if m[0] not in ids or m[1] not in ids), None)
        if unknown is not None:
            raise TokenizerError(f"merge {unknown!r:.60} names a string that is not a token")
        return Tokenizer(vocab, [(ids[a], ids[b]) for a, b in merges], special, pattern, **options)
    except TokenizerError as e:
        raise TokenizerError(f"{where}: {e}") from None


def _token_id(value: Any, special: Mapping[str, int]) -> int | None:
    """tokenizer_config.json's bos/eos entry (a string or {"content": ...}) -> its id."""
    text = value.get("content") if isinstance(value, dict) else value
    return special.get(text) if isinstance(text, str) else None


def load_tokenizer_json(path: str | Path) -> Tokenizer:
    """Read a byte-level BPE `tokenizer.json` (ours, GPT-2's, Llama 3's, SmolLM2's ...).

    BOS/EOS come from a `tokenizer_config.json` beside it when there is one; otherwise
    `<|endoftext|>`, if present, is EOS.
    """
    path = Path(path)
    where = str(path)
    if not path.exists():
        raise TokenizerError(f"{where}: no such tokenizer file")
    data = read_json(path, TokenizerError, shape=TOKENIZER_JSON)
    model = data["model"]
    if model["type"] != "BPE":
        raise TokenizerError(f"{where}: not a BPE tokenizer.json (model.type must be 'BPE')")
    if data.get("normalizer") is not None or model.get("byte_fallback"):
        raise TokenizerError(
            f"{where}: has a normalizer or byte_fallback; only byte-level BPE is supported"
        )
    pattern = _pattern_from_json(data.get("pre_tokenizer"), where)
    vocab = model["vocab"]
    added = data.get("added_tokens") or []
    by_id: dict[int, str] = {}
    special: dict[str, int] = {}
    # Added tokens (special or not) are matched whole and never merged: special tokens to us.
    entries = [(k, v, False) for k, v in vocab.items()]
    entries += [(e["content"], e["id"], True) for e in added]
    for text, i, is_added in entries:
        if not isinstance(i, int) or not isinstance(text, str) or by_id.setdefault(i, text) != text:
            raise TokenizerError(f"{where}: bad or conflicting token entry {text!r:.60} -> {i!r}")
        if is_added:
            special[text] = i
    if sorted(by_id) != list(range(len(by_id))):
        raise TokenizerError(f"{where}: token ids are not 0..{len(by_id) - 1} without gaps")
    names = [by_id[i] for i in range(len(by_id))]
    config_file = path.with_name("tokenizer_config.json")
    config = (
        read_json(config_file, TokenizerError, shape=TOKENIZER_CONFIG)
        if config_file.exists()
        else {}
    )
    eos = _token_id(config.get("eos_token"), special) if config else special.get(ENDOFTEXT)
    return build_tokenizer(
        names,
        _merge_pairs(model.get("merges", []), where),
        special,
        pattern,
        where,
        bos_id=_token_id(config.get("bos_token"), special),
        eos_id=eos,
        ignore_merges=bool(model.get("ignore_merges")),
    )


# --- GGUF metadata --------------------------------------------------------------------------------


def tokenizer_from_gguf_metadata(metadata: Mapping[str, Any], where: str = "GGUF") -> Tokenizer:
    """A llama.cpp `gpt2`-model tokenizer (tokens, merges, token types, pre, bos/eos) -> Tokenizer."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind is None:
        raise TokenizerError(f"{where}: has no tokenizer metadata (tokenizer.ggml.model)")
    if kind != "gpt2":
        raise TokenizerError(
            f"{where}: tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')"
        )
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if not isinstance(pre, str) or pre not in _FROM_GGUF_PRE:
        raise TokenizerError(
            f"{where}: unknown pre-tokenizer {pre!r:.60}; supported: {sorted(_FROM_GGUF_PRE)}"
        )
    names = metadata.get("tokenizer.ggml.tokens")
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(names or [])
    merges = metadata.get("tokenizer.ggml.merges") or []
    if not isinstance(names, list) or not isinstance(types, list) or len(types) != len(names):
        raise TokenizerError(
            f"{where}: tokenizer.ggml.tokens and token_type are missing or differ in length"
        )
    if not all(type(t) is int for t in types):  # bool is an int subclass: refused too
        raise TokenizerError(f"{where}: tokenizer.ggml.token_type must hold integers")
    special = {
        n: i for i, (n, t) in enumerate(zip(names, types, strict=True)) if t in _GGUF_SPECIAL_TYPES
    }

    def token_id(key: str) -> int | None:
        i = metadata.get(key)
        if i is not None and not (type(i) is int and 0 <= i < len(names)):
            raise TokenizerError(
                f"{where}: {key} {i!r:.40} is not a token id (0..{len(names) - 1})"
            )
        return i

    return build_tokenizer(
        names,
        _merge_pairs(merges, where),
        special,
        _FROM_GGUF_PRE[pre],
        where,
        bos_id=token_id("tokenizer.ggml.bos_token_id"),
        eos_id=token_id("tokenizer.ggml.eos_token_id"),
    )


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """A `tokenizer.json`, a folder holding one (run dir, checkpoint, HF dir) or a `.gguf` file."""
    path = Path(spec)
    if path.is_dir():
        for candidate in (
            path / "tokenizer.json",
            *sorted(path.glob("checkpoints/*/tokenizer.json"))[-1:],
        ):
            if candidate.is_file():
                return load_tokenizer_json(candidate)
        raise TokenizerError(f"{spec}: folder has no tokenizer.json")
    if path.suffix == ".gguf":
        return tokenizer_from_gguf_metadata(read_gguf(path).metadata, str(path))
    if not path.is_file():
        raise TokenizerError(
            f"{spec}: no such tokenizer (give a tokenizer.json, a run directory or a .gguf)"
        )
    return load_tokenizer_json(path)
