"""OpenAI request bodies -> what the engine takes: prompt ids and SamplingParams, or a 4xx.

Every malformed input gets an `APIError` (status, message naming the parameter, OpenAI's error
type and code), never a 500 or a framework's own error shape. The checks follow OpenAI's
documented ranges and vLLM/TGI's validation: numbers must be JSON numbers (not strings or
booleans), `n` and `stop` are capped, and prompt + max_tokens must fit the context, with the
arithmetic in the message:

    max_tokens is too large: 50. This model's maximum context length is 128 tokens and your
    request has 100 input tokens (50 > 128 - 100)

An omitted max_tokens means "whatever fits": the reply may run to the end of the context and
then finishes with "length".

Chat prompts are rendered with the model's template, but a message's text is tokenized as plain
text: `<|im_end|>` typed by a user stays those characters, never the control token (RELIABILITY
A15). `encode_chat` renders the template around placeholders, tokenizes only the template's own
text with special tokens allowed, and the messages' text without.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from pellucid.errors import PellucidError
from pellucid.infer.sampling import SamplingParams
from pellucid.tokenizer.bpe import valid_text

if TYPE_CHECKING:
    from pellucid.tokenizer.bpe import Tokenizer
    from pellucid.tokenizer.chat import ChatTemplate


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        # Both may quote the request, lone surrogates included: made encodable as JSON.
        message, param = valid_text(message), None if param is None else valid_text(param)
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 invalid_request_error."""
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (the server's caps)."""

    n_max: int = 8  # most choices per request (vLLM's VLLM_MAX_N_SEQUENCES idea)
    max_stop: int = 4  # stop sequences per request (OpenAI: up to 4)
    max_stop_chars: int = 256  # one stop string's length: the hold-back scan is O(len) per token
    max_logprobs: int = 20  # top_logprobs / logprobs cap (OpenAI: 20 for chat)


@dataclass
class GenRequest:
    """A validated request: the prompts and how to sample them, plus how to answer."""

    kind: str  # "chat" or "completion"
    model: str | None  # the model name asked for (None: the served one)
    params: SamplingParams  # the base params; choice j of a prompt is seeded seed + j
    n: int  # choices per prompt
    stream: bool
    include_usage: bool  # stream_options.include_usage: a final chunk with usage
    logprobs: int | None  # None: no logprobs; else how many top alternatives per token
    max_tokens: int | None  # what the client asked for (None: the default, within the context)
    default_max_tokens: int | None = None  # when max_tokens is omitted (None: all the room left)
    messages: list[dict[str, str]] = field(default_factory=list)  # chat only
    prompts: list[str | list[int]] = field(default_factory=list)  # completions only


# --- JSON field readers -----------------------------------------------------------------------------


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; invalid JSON, deep nesting or a non-object -> 400."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError too
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise bad(f"the request body is not valid JSON: {reason}") from None
    if not isinstance(data, dict):
        raise bad(f"the request body must be a JSON object, got {_json_type(data)}")
    return data


def _json_type(x: object) -> str:
    if x is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string"}.get(
        type(x), "an array" if isinstance(x, list) else "an object"
    )


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def get_int(body: Mapping, name: str, lo: int, hi: int, default: int | None) -> int | None:
    """An optional integer field in [lo, hi] (null means the default)."""
    x = body.get(name)
    if x is None:
        return default
    if isinstance(x, float) and x.is_integer():
        x = int(x)
    if not _is_int(x):
        raise bad(f"'{name}' must be an integer, got {_json_type(x)}", name)
    if not lo <= x <= hi:
        raise bad(f"'{name}' must be between {lo} and {hi}, got {x}", name)
    return x


def get_float(
    body: Mapping, name: str, lo: float, hi: float, default: float | None
) -> float | None:
    """An optional finite number in [lo, hi]."""
    x = body.get(name)
    if x is None:
        return default
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        raise bad(f"'{name}' must be a number, got {_json_type(x)}", name)
    if not (math.isfinite(x) and lo <= x <= hi):
        raise bad(f"'{name}' must be between {lo} and {hi}, got {x}", name)
    return float(x)


def get_bool(body: Mapping, name: str, default: bool) -> bool:
    x = body.get(name)
    if x is None:
        return default
    if not isinstance(x, bool):
        raise bad(f"'{name}' must be true or false, got {_json_type(x)}", name)
    return x


def _stop(body: Mapping, limits: Limits) -> list[str]:
    x = body.get("stop")
    if x is None:
        return []
    stops = [x] if isinstance(x, str) else x
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("'stop' must be a string or an array of strings", "stop")
    if len(stops) > limits.max_stop:
        raise bad(f"'stop' may hold at most {limits.max_stop} sequences, got {len(stops)}", "stop")
    for s in stops:
        if not s:
            raise bad("'stop' sequences must not be empty", "stop")
        if len(s) > limits.max_stop_chars:
            raise bad(f"'stop' sequences may be at most {limits.max_stop_chars} characters", "stop")
    return stops


def _refuse(body: Mapping) -> None:
    """Parameters we do not implement: a clear 400 rather than silently ignoring them."""
    for name in ("presence_penalty", "frequency_penalty"):
        v = get_float(body, name, -2.0, 2.0, 0.0)
        if v != 0:
            raise bad(f"'{name}' is not supported by this server (only 0)", name)
    if body.get("logit_bias"):
        raise bad("'logit_bias' is not supported by this server", "logit_bias")
    for name in ("tools", "functions"):
        if body.get(name):
            raise bad(f"'{name}' (tool calling) is not supported by this server", name)
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise bad("'response_format' other than text is not supported", "response_format")
    if body.get("echo"):
        raise bad("'echo' is not supported by this server", "echo")
    if body.get("suffix"):
        raise bad("'suffix' is not supported by this server", "suffix")


def _common(body: Mapping, limits: Limits) -> dict[str, Any]:
    """The fields both routes share, checked."""
    _refuse(body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad(f"'model' must be a string, got {_json_type(model)}", "model")
    n = get_int(body, "n", 1, limits.n_max, 1)
    seed = get_int(body, "seed", 0, 2**62 - 1 - limits.n_max, None)
    top_k = get_int(body, "top_k", 1, 2**31 - 1, None)  # a vLLM extension; -1 is not "off" here
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    stream = get_bool(body, "stream", False)
    if stream_options and not stream:
        raise bad("'stream_options' is only allowed with stream=true", "stream_options")
    return {
        "model": model,
        "ignore_eos": get_bool(body, "ignore_eos", False),  # vLLM's extension, for benchmarks
        "n": n,
        "stream": stream,
        "include_usage": get_bool(stream_options or {}, "include_usage", False),
        "temperature": get_float(body, "temperature", 0.0, 2.0, 1.0),
        "top_p": get_float(body, "top_p", 1e-9, 1.0, None),
        "min_p": get_float(body, "min_p", 0.0, 1.0, None),
        "top_k": top_k,
        "seed": seed,
        "stop": _stop(body, limits),
    }


def _params(
    c: dict[str, Any], max_tokens: int | None, top: int, stop_ids: list[int]
) -> SamplingParams:
    try:
        return SamplingParams(
            temperature=c["temperature"],
            top_p=c["top_p"],
            top_k=c["top_k"],
            min_p=c["min_p"],
            max_new_tokens=max_tokens or 1,  # fitted to each prompt by `fit_max_tokens`
            seed=c["seed"],
            stop=c["stop"],
            stop_token_ids=[] if c["ignore_eos"] else stop_ids,
            top_logprobs=top,
        )
    except PellucidError as e:  # a combination the sampler refuses (the checks above catch most)
        raise bad(" ".join(str(e).split())) from None


# --- the two request kinds --------------------------------------------------------------------------

ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role


def _content(m: Mapping, i: int) -> str:
    """A message's text: a string, or an array of {"type": "text", "text": ...} parts."""
    c = m.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list) and c:
        parts = []
        for part in c:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise bad(f"messages[{i}].content: only text parts are supported", "messages")
            if not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content: a text part needs a string 'text'", "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(
        f"messages[{i}].content must be a string or an array of text parts, got {_json_type(c)}",
        "messages",
    )


def _messages(body: Mapping) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty array of messages", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object, got {_json_type(m)}", "messages")
        role = m.get("role")
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ("system", "user", "assistant", "tool"):
            raise bad(
                f"messages[{i}].role must be system, user, assistant or tool, got {role!r:.40}",
                "messages",
            )
        out.append({"role": role, "content": _content(m, i)})
    return out


def parse_chat(body: Mapping, limits: Limits, stop_ids: list[int]) -> GenRequest:
    """A /v1/chat/completions body -> GenRequest (messages still text)."""
    messages = _messages(body)
    c = _common(body, limits)
    max_tokens = get_int(body, "max_completion_tokens", 1, 2**62, None)
    if max_tokens is None:
        max_tokens = get_int(body, "max_tokens", 1, 2**62, None)
    want = get_bool(body, "logprobs", False)
    top = get_int(body, "top_logprobs", 0, limits.max_logprobs, None)
    if top and not want:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return GenRequest(
        kind="chat",
        model=c["model"],
        params=_params(c, max_tokens, top or 0, stop_ids),
        n=c["n"],
        stream=c["stream"],
        include_usage=c["include_usage"],
        logprobs=(top or 0) if want else None,
        max_tokens=max_tokens,
        messages=messages,
    )


def _prompts(body: Mapping, vocab_size: int) -> list[str | list[int]]:
    """`prompt`: a string, an array of strings, an array of token ids, or an array of those."""
    p = body.get("prompt")
    if isinstance(p, str):
        return [p]
    if isinstance(p, list) and p:
        if all(isinstance(x, str) for x in p):
            return list(p)
        if all(_is_int(x) for x in p):
            p = [p]
        if all(isinstance(x, list) and x and all(_is_int(t) for t in x) for x in p):
            for ids in p:
                bad_id = next((t for t in ids if not 0 <= t < vocab_size), None)
                if bad_id is not None:
                    raise bad(
                        f"'prompt' has token id {bad_id}, outside the vocabulary [0, {vocab_size})",
                        "prompt",
                    )
            return [list(ids) for ids in p]
    raise bad("'prompt' must be a string, an array of strings, or an array of token ids", "prompt")


def parse_completion(
    body: Mapping, limits: Limits, stop_ids: list[int], vocab_size: int
) -> GenRequest:
    """A /v1/completions body -> GenRequest (string prompts still text)."""
    prompts = _prompts(body, vocab_size)
    c = _common(body, limits)
    if get_int(body, "best_of", 1, limits.n_max, c["n"]) != c["n"]:
        raise bad("'best_of' other than n is not supported", "best_of")
    if len(prompts) * c["n"] > limits.n_max:
        raise bad(
            f"{len(prompts)} prompts x n={c['n']} is more than {limits.n_max} sequences", "prompt"
        )
    max_tokens = get_int(body, "max_tokens", 1, 2**62, None)
    top = get_int(body, "logprobs", 0, limits.max_logprobs, None)
    return GenRequest(
        kind="completion",
        model=c["model"],
        params=_params(c, max_tokens, top or 0, stop_ids),
        n=c["n"],
        stream=c["stream"],
        include_usage=c["include_usage"],
        logprobs=top,
        max_tokens=max_tokens,
        default_max_tokens=16,  # OpenAI's default for completions
        prompts=prompts,
    )


# --- prompts -> ids, and the context arithmetic -----------------------------------------------------


def fit_max_tokens(
    n_prompt: int, requested: int | None, n_ctx: int, what: str, default: int | None = None
) -> int:
    """How many tokens the reply may have: the request's max_tokens if it fits, else a 400.

    what: "messages" or "prompt", for the message. None requested: `default` clamped to the
    room left (all of it when default is None).
    """
    if n_prompt >= n_ctx:
        raise bad(
            f"This model's maximum context length is {n_ctx} tokens. However, your {what} "
            f"resulted in {n_prompt} tokens, which leaves no room for a reply. "
            f"Please reduce the length of the {what}.",
            what,
            "context_length_exceeded",
        )
    if requested is None:
        return min(n_ctx - n_prompt, default or n_ctx)
    if n_prompt + requested > n_ctx:
        raise bad(
            f"max_tokens is too large: {requested}. This model's maximum context length is "
            f"{n_ctx} tokens and your request has {n_prompt} input tokens "
            f"({requested} > {n_ctx} - {n_prompt})",
            "max_tokens",
            "context_length_exceeded",
        )
    return requested


def too_long(text: str, tokenizer: Tokenizer, n_ctx: int, what: str) -> None:
    """Refuse text that surely exceeds the context before tokenizing it: a token covers at most
    the longest piece of the vocabulary, so bytes / longest is a lower bound on its tokens."""
    longest = max(len(t) for t in tokenizer.vocab) if hasattr(tokenizer, "vocab") else 64
    at_least = len(text.encode("utf-8", "replace")) // max(longest, 1)
    if at_least >= n_ctx:
        raise bad(
            f"This model's maximum context length is {n_ctx} tokens. However, your {what} "
            f"resulted in at least {at_least} tokens. Please reduce the length of the {what}.",
            what,
            "context_length_exceeded",
        )


def encode_chat(
    template: ChatTemplate,
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, str]],
    n_ctx: int,
) -> list[int]:
    """The conversation's prompt ids, each message's text tokenized as plain text.

    The template is rendered once with a random placeholder per message; the text between
    placeholders is the template's own (special tokens allowed), each placeholder's place gets
    the message's ids (special tokens not allowed). If the template does more with a message
    than place it (trim it, repeat it), the split does not reproduce the real rendering: then
    the real rendering is used, which is safe only if no message holds special-token text.
    A rendering that surely exceeds n_ctx tokens is refused before tokenizing it.
    """
    marks = [f"\x00{secrets.token_hex(8)}\x00" for _ in messages]
    try:
        shaped = [{**m, "content": mark} for m, mark in zip(messages, marks, strict=True)]
        skeleton = template.render(shaped, add_generation_prompt=True)
        real = template.render(messages, add_generation_prompt=True)
    except PellucidError as e:
        raise bad(str(e), "messages") from None
    too_long(real, tokenizer, n_ctx, "messages")
    pieces, pos = [], 0
    for m, mark in zip(messages, marks, strict=True):
        at = skeleton.find(mark, pos)
        if at < 0:
            break
        pieces += [(skeleton[pos:at], True), (m["content"], False)]
        pos = at + len(mark)
    else:
        pieces.append((skeleton[pos:], True))
        if "".join(text for text, _ in pieces) == real and not any(
            mark in skeleton[pos:] for mark in marks
        ):
            ids: list[int] = []
            for text, is_template in pieces:
                ids += tokenizer.encode(text, allowed_special="all" if is_template else frozenset())
            return ids
    special = [s for s in tokenizer.special_tokens if any(s in m["content"] for m in messages)]
    if special:
        raise bad(
            f"a message holds special-token text {special[0]!r} that this model's chat template "
            "cannot keep as plain text",
            "messages",
        )
    return tokenizer.encode(real, allowed_special="all")


def choice_params(params: SamplingParams, max_new: int, j: int) -> SamplingParams:
    """Choice j of a prompt: its own token budget and seed + j (None stays random)."""
    seed = None if params.seed is None else params.seed + j
    return replace(params, max_new_tokens=max_new, seed=seed)
