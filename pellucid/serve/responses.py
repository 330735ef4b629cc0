"""Engine Steps -> OpenAI's JSON: whole responses, stream chunks, logprobs and usage.

Shapes follow the OpenAI API reference (and what the `openai` client parses):

    chat          {"object": "chat.completion", "choices": [{"index", "message": {"role",
                  "content"}, "logprobs": {"content": [{"token", "logprob", "bytes",
                  "top_logprobs": [...]}]} | null, "finish_reason"}], "usage": {...}}
    chat chunk    {"object": "chat.completion.chunk", "choices": [{"index", "delta", "logprobs",
                  "finish_reason"}]}; the first delta of a choice carries the role, the last one
                  is empty with the finish_reason; with include_usage every chunk has "usage":
                  null and one last chunk has no choices and the usage
    completion    {"object": "text_completion", "choices": [{"index", "text", "logprobs":
                  {"tokens", "token_logprobs", "top_logprobs", "text_offset"} | null,
                  "finish_reason"}]}; its chunks have the same shape, one piece of text each

A stop token is generated and counted in usage.completion_tokens, but it is not text: its
logprob entry is left out, as OpenAI leaves out the end-of-turn token.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pellucid.infer.engine import Step
    from pellucid.tokenizer.bpe import Tokenizer


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def sse(obj: dict[str, Any] | str) -> str:
    """One server-sent event: `data: <json>` and a blank line."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n"


@dataclass
class ChoiceState:
    """One choice as it is generated: text so far, logprob entries, how it ended."""

    text: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # chat entries, one per token
    tokens: int = 0  # generated tokens, a stop token included
    finish_reason: str | None = None
    chars: int = 0  # characters of text so far (completions' text_offset)


class Formatter:
    """Builds one request's OpenAI objects from its Steps (stream chunks or the whole reply)."""

    def __init__(
        self,
        kind: str,
        model: str,
        tokenizer: Tokenizer,
        *,
        n_choices: int,
        prompt_tokens: int,
        logprobs: int | None,
        stop_ids: list[int],
        include_usage: bool = False,
    ) -> None:
        self.kind, self.model, self.tokenizer = kind, model, tokenizer
        self.id, self.created = new_id(kind), int(time.time())
        self.logprobs, self.stop_ids = logprobs, set(stop_ids)
        self.prompt_tokens, self.include_usage = prompt_tokens, include_usage
        self.choices = [ChoiceState() for _ in range(n_choices)]

    # --- per token --------------------------------------------------------------------------------

    def _token(self, id: int) -> tuple[str, list[int]]:
        raw = self.tokenizer.token_bytes(id)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def _entry(self, step: Step) -> dict[str, Any]:
        """Chat's logprob entry for one token, with its top alternatives."""
        text, raw = self._token(step.id)
        top = []
        for i, lp in step.top[: self.logprobs or 0]:
            t, b = self._token(i)
            top.append({"token": t, "logprob": lp, "bytes": b})
        return {"token": text, "logprob": step.logprob, "bytes": raw, "top_logprobs": top}

    def add(self, j: int, step: Step) -> tuple[str, list[dict[str, Any]]]:
        """Account one Step of choice j; returns its text and its logprob entries (0 or 1)."""
        c = self.choices[j]
        c.tokens += 1
        c.text.append(step.text)
        c.finish_reason = step.finish_reason or c.finish_reason
        entries = []
        if self.logprobs is not None and step.id not in self.stop_ids:
            entries = [self._entry(step)]
            c.logprobs += entries
        return step.text, entries

    # --- whole responses --------------------------------------------------------------------------

    def usage(self) -> dict[str, int]:
        done = sum(c.tokens for c in self.choices)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": done,
            "total_tokens": self.prompt_tokens + done,
        }

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def response(self) -> dict[str, Any]:
        """The non-streaming reply, after every choice finished."""
        if self.kind == "chat":
            choices = [
                {
                    "index": j,
                    "message": {"role": "assistant", "content": "".join(c.text)},
                    "logprobs": None if self.logprobs is None else {"content": c.logprobs},
                    "finish_reason": c.finish_reason or "length",
                }
                for j, c in enumerate(self.choices)
            ]
            return {**self._head("chat.completion"), "choices": choices, "usage": self.usage()}
        choices = [
            {
                "index": j,
                "text": "".join(c.text),
                "logprobs": self._completion_logprobs(c.logprobs, 0),
                "finish_reason": c.finish_reason or "length",
            }
            for j, c in enumerate(self.choices)
        ]
        return {**self._head("text_completion"), "choices": choices, "usage": self.usage()}

    def _completion_logprobs(self, entries: list[dict[str, Any]], start: int) -> dict | None:
        """Completions' legacy shape from chat-style entries; offsets count characters from
        `start` (the choice's text emitted before these tokens)."""
        if self.logprobs is None:
            return None
        offsets, at = [], start
        for e in entries:
            offsets.append(at)
            at += len(e["token"])
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [
                {t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries
            ],
            "text_offset": offsets,
        }

    # --- stream chunks ----------------------------------------------------------------------------

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        chunk = {**self._head(obj), "choices": choices}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def first_chunks(self) -> list[dict[str, Any]]:
        """Chat opens each choice with a delta carrying the role (completions: nothing)."""
        if self.kind != "chat":
            return []
        return [
            self._chunk(
                [
                    {
                        "index": j,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
            for j in range(len(self.choices))
        ]

    def step_chunks(self, j: int, step: Step) -> list[dict[str, Any]]:
        """The chunks one Step of choice j makes: its text (if any, or a logprob), then a
        finishing chunk if it ended the choice."""
        start = self.choices[j].chars
        text, entries = self.add(j, step)
        self.choices[j].chars += len(text)
        out = []
        if text or entries:
            if self.kind == "chat":
                lp = {"content": entries} if self.logprobs is not None else None
                choice = {"index": j, "delta": {"content": text}, "logprobs": lp}
            else:
                lp = self._completion_logprobs(entries, start)
                choice = {"index": j, "text": text, "logprobs": lp}
            out.append(self._chunk([{**choice, "finish_reason": None}]))
        if step.finish_reason is not None:
            end = {"delta": {}} if self.kind == "chat" else {"text": ""}
            out.append(
                self._chunk(
                    [{"index": j, **end, "logprobs": None, "finish_reason": step.finish_reason}]
                )
            )
        return out

    def usage_chunk(self) -> dict[str, Any]:
        """stream_options.include_usage: the last chunk, no choices, the usage."""
        return {**self._chunk([]), "usage": self.usage()}
