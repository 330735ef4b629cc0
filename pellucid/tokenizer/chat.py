"""Chat templates: a conversation (list of {role, content}) -> the text and ids the model was tuned on.

Models ship their template as Jinja source (GGUF metadata `tokenizer.chat_template`, or
`chat_template` in a Hugging Face `tokenizer_config.json`). We render it exactly as transformers'
`apply_chat_template` does: a sandboxed Jinja environment with trim_blocks and lstrip_blocks, the
variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, and the helpers
`raise_exception`, `strftime_now` and a non-escaping `tojson`.

    >>> t = ChatTemplate(CHATML)
    >>> t.render([{"role": "user", "content": "Hi"}])
    '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'

Templates come from model files, so they are untrusted: the sandbox forbids attribute tricks, and
every template failure becomes one TokenizerError line. The sandbox alone still lets a template
build a 10 GB string (`'x' * 10**10`, or doubling a namespace variable in a loop) or spin in nested
loops for ever, so every render also runs under limits (`_Budget`): repetition and powers checked
before they allocate, no width or count argument above the output cap, and a line-event tracer on
the template's own frames that counts steps and watches the clock and the process's peak memory.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pellucid.errors import TokenizerError
from pellucid.files import read_json

if TYPE_CHECKING:
    from pellucid.tokenizer.bpe import Tokenizer

# The fallback for models that carry no template (our own trained ones): ChatML, as SmolLM2 uses.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant", "tool")

# Limits of one render. Real templates stay far below them: SmolLM2's renders a 20-turn chat in
# about 400 steps and 5 KB; the output cap is 100x the text of a full 8192-token context.
MAX_OUTPUT_CHARS = 4_000_000
MAX_STEPS = 1_000_000  # line events inside the template's code (loop bodies, statements)
MAX_SECONDS = 2.0  # of the rendering thread's CPU time: a busy machine does not inflate it
MAX_MEMORY_GROWTH = 512 << 20  # bytes of peak-RSS growth during one render


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON (as transformers gives).
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Budget:
    """A sys.settrace tracer that stops a render past MAX_STEPS, MAX_SECONDS or MAX_MEMORY_GROWTH.

    Only frames of compiled template code ("<template>") are traced, so Python code the template
    calls into runs at full speed; a step is one line event of the template's own code.
    """

    def __init__(self) -> None:
        self.steps, self.start = 0, time.thread_time()
        self.peak = _peak_rss()

    def __enter__(self) -> _Budget:
        self.previous = sys.gettrace()
        sys.settrace(self._call)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(self.previous)

    def _call(self, frame: Any, event: str, arg: Any) -> Any:
        return self._line if frame.f_code.co_filename == "<template>" else None

    def _line(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            self.steps += 1
            if self.steps > MAX_STEPS:
                raise _LimitError(f"it took more than {MAX_STEPS:,} steps")
            if _peak_rss() - self.peak > MAX_MEMORY_GROWTH:
                raise _LimitError(f"it used more than {MAX_MEMORY_GROWTH >> 20} MB of memory")
            if self.steps % 256 == 0 and time.thread_time() - self.start > MAX_SECONDS:
                raise _LimitError(f"it ran for more than {MAX_SECONDS:g} s")
        return self._line


class _LimitError(jinja2.exceptions.TemplateError):
    """A render went past one of the limits (a TemplateError, so it becomes one line)."""


def _peak_rss() -> int:
    """The process's peak resident memory in bytes (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _check_size(value: Any, what: str) -> None:
    """Refuse an integer argument that would make a string or list longer than the output cap."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_OUTPUT_CHARS:
        raise _LimitError(f"{what} of {value} is over the limit of {MAX_OUTPUT_CHARS:,}")


class _LimitedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, with `*`, `**` and every call and filter checked before they can allocate."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            _check_size(right, "an exponent")  # 10 ** 10 ** 9 would take minutes to compute
            if isinstance(right, int) and abs(right) > 4096 and isinstance(left, int):
                raise _LimitError(f"an exponent of {right} is too large")
        elif any(isinstance(x, (str, list, tuple)) for x in (left, right)):
            sized, times = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
            if isinstance(times, int) and len(sized) * times > MAX_OUTPUT_CHARS:
                raise _LimitError(f"a repetition of {len(sized)} x {times} items is too large")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        for value in (*args, *kwargs.values()):  # "x".ljust(10**10), "x".center(10**10)
            _check_size(value, "an argument")
        return super().call(__context, __obj, *args, **kwargs)


def _limited(fn: Any) -> Any:
    """A filter that refuses huge width/count arguments (`'x'|center(10**10)`)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        for value in (*args[1:], *kwargs.values()):
            _check_size(value, "a filter argument")
        return fn(*args, **kwargs)

    return run


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = _LimitedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters = {name: _limited(fn) for name, fn in env.filters.items()}
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise TokenizerError(f"chat template does not parse: {e}") from None


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Plain dicts with a known role and string content (templates index them directly)."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("content"), str):
            raise TokenizerError(f"chat message {i} needs a string 'content', got {m!r:.80}")
        if m.get("role") not in ROLES:
            raise TokenizerError(
                f"chat message {i} has role {m.get('role')!r}, expected one of {ROLES}"
            )
        out.append(dict(m))
    return out


@dataclass(frozen=True)
class ChatTemplate:
    """A model's Jinja chat template and the special-token strings it may refer to."""

    source: str
    bos_token: str = ""
    eos_token: str = ""

    def render(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
    ) -> str:
        """The conversation as the model's prompt text; with add_generation_prompt, ready for
        the assistant's reply."""
        template = _compile(self.source)
        try:
            with _Budget():
                text = template.render(
                    messages=_check_messages(messages),
                    add_generation_prompt=add_generation_prompt,
                    bos_token=self.bos_token,
                    eos_token=self.eos_token,
                )
        except _LimitError as e:
            raise TokenizerError(f"chat template stopped: {e}") from None
        except jinja2.TemplateError as e:  # raise_exception(), sandbox violations, bad syntax use
            raise TokenizerError(f"chat template failed: {str(e).splitlines()[0]}") from None
        except (MemoryError, RecursionError, OverflowError) as e:
            raise TokenizerError(f"chat template failed: {type(e).__name__}") from None
        if len(text) > MAX_OUTPUT_CHARS:
            raise TokenizerError(
                f"chat template stopped: its output of {len(text):,} characters exceeds "
                f"{MAX_OUTPUT_CHARS:,}"
            )
        return text

    def encode(
        self,
        tokenizer: Tokenizer,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """render() then tokenize, special tokens in the template text becoming their ids.

        Like transformers, this also turns special-token text typed inside a message into the
        special token; callers that take text from strangers should strip it first.
        """
        text = self.render(messages, add_generation_prompt=add_generation_prompt)
        return tokenizer.encode(text, allowed_special="all")

    def spans(self, messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, bool]]:
        """The rendered conversation cut into (text, is_assistant) pieces, in order.

        Rendered prefix by prefix: assistant message i's piece is what the template adds after
        the prompt for it (`messages[:i]` with the generation prompt) up to `messages[:i + 1]`:
        the reply and its end-of-turn token. Whitespace after that token stays unmasked (the
        model stops at the token and never writes it). A template whose renders do not extend
        one another (one that rewrites earlier turns) is refused, not guessed at.
        """
        pieces: list[tuple[str, bool]] = []
        done = ""  # the text covered by pieces so far
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1], add_generation_prompt=False)
            if not (before.startswith(done) and through.startswith(before)):
                raise TokenizerError(
                    f"the chat template re-renders earlier turns (at message {i}); "
                    "cannot tell which tokens are the assistant's"
                )
            reply = through[len(before) :]
            tail = len(reply) - len(reply.rstrip())
            pieces += [(before[len(done) :], False), (reply[: len(reply) - tail], True)]
            done = through[: len(through) - tail]
        full = self.render(messages, add_generation_prompt=False)
        if not full.startswith(done):
            raise TokenizerError("the chat template re-renders earlier turns at the end")
        pieces.append((full[len(done) :], False))
        return [(text, flag) for text, flag in pieces if text]

    def encode_with_mask(
        self, tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]]
    ) -> tuple[list[int], list[bool]]:
        """The conversation's ids and, per id, whether it is an assistant token (carries loss).

        Each piece of `spans` is tokenized on its own, so a token never straddles the boundary
        between prompt and reply: every id is wholly the user's or wholly the assistant's.
        """
        ids: list[int] = []
        mask: list[bool] = []
        for text, is_assistant in self.spans(messages):
            piece = tokenizer.encode(text, allowed_special="all")
            ids += piece
            mask += [is_assistant] * len(piece)
        return ids, mask


def _token_text(value: Any) -> str:
    """tokenizer_config.json gives special tokens as a string or as {"content": ...}."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def from_hf_dir(folder: str | Path) -> ChatTemplate | None:
    """The template of a Hugging Face model folder: `chat_template.jinja`, else the
    `chat_template` of tokenizer_config.json (a string, or a list of named ones: "default").
    None when the folder has neither."""
    folder = Path(folder)
    config_path = folder / "tokenizer_config.json"
    config = read_json(config_path, TokenizerError, shape={}) if config_path.exists() else {}
    source = config.get("chat_template")
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            source = jinja_file.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{jinja_file}: cannot read it as UTF-8 text ({e})") from None
    elif isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use"}]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, Mapping)}
        if named.get("default") is None:  # not silently ChatML: the file means some other template
            raise TokenizerError(
                f"{config_path}: chat_template lists no 'default' template (names: "
                f"{', '.join(map(str, named)) or 'none'})"
            )
        source = named["default"]
    if source is None:
        return None
    if not isinstance(source, str):  # not silently ChatML: the file means something else
        raise TokenizerError(
            f"{config_path}: chat_template must be a string or a list with a 'default' "
            f"template, got {type(source).__name__}"
        )
    bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
    return ChatTemplate(source, bos_token=bos, eos_token=eos)


def from_gguf_metadata(metadata: Mapping[str, Any]) -> ChatTemplate | None:
    """The template in GGUF metadata (`tokenizer.chat_template`), with the BOS/EOS token strings
    looked up in `tokenizer.ggml.tokens`. None when the file carries no template."""
    source = metadata.get("tokenizer.chat_template")
    if source is None:
        return None
    if not isinstance(source, str):  # not silently ChatML: the file means something else
        raise TokenizerError(
            f"GGUF tokenizer.chat_template must be a string, got {type(source).__name__}"
        )
    tokens = metadata.get("tokenizer.ggml.tokens")
    tokens = tokens if isinstance(tokens, Sequence) else ()

    def token(key: str) -> str:
        i = metadata.get(key)
        ok = isinstance(i, int) and 0 <= i < len(tokens) and isinstance(tokens[i], str)
        return tokens[i] if ok else ""

    return ChatTemplate(
        source,
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
    )
