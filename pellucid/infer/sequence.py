"""One sequence's results and text: Step, Timing, Completion, and the stop-string/UTF-8 rules.

The engine (engine.py) computes tokens; this module turns each sequence's tokens into text deltas
and finish reasons. Text is decoded per sequence by a StreamDecoder (whole characters only) and
held back while it could be the start of a stop string, so no part of a stop string is ever
emitted and the streamed deltas join to exactly the final text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pellucid.infer.sampling import SamplingParams
from pellucid.tokenizer.stream import StreamDecoder


@dataclass
class Step:
    """One generated token of one sequence."""

    row: int  # Engine.step: the sequence's handle; Engine.generate: the prompt's index
    id: int  # the token, a stop token included
    logprob: float  # log p_model(id | context): log_softmax of the raw logits
    text: str  # UTF-8-safe text delta (whole characters); may be "" while text is held back
    top: list[tuple[int, float]]  # the top_logprobs most likely (id, logprob), best first
    finish_reason: str | None = None  # "stop" (token or string), "length" (max tokens, context)


@dataclass
class Timing:
    """Where a generate call (or one Engine.step) spent its time; the consumer's time between
    steps is not counted. In a step that both prefills and decodes, choosing the tokens counts
    as decode time."""

    prefill_tokens: int = 0  # prompt tokens run through the model (not those reused)
    prefill_s: float = 0.0  # the prefill forward and the first token's choice
    decode_tokens: int = 0  # tokens produced by decode forwards, all rows together
    decode_s: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class Completion:
    """The result of `Engine.complete`: one prompt, everything generated for it."""

    prompt_ids: list[int]
    ids: list[int]  # generated tokens (a final stop token included; its text is not)
    text: str  # == "".join(step.text for step in steps)
    steps: list[Step]
    finish_reason: str
    timing: Timing

    def to_dict(self) -> dict:
        """As plain JSON-able data (what `generate --json` prints): ids, text, every step with
        its top alternatives, and the timing."""
        t = self.timing
        return {
            "prompt_ids": self.prompt_ids,
            "ids": self.ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "steps": [
                {
                    "id": s.id,
                    "text": s.text,
                    "logprob": s.logprob,
                    "top": [{"id": i, "logprob": lp} for i, lp in s.top],
                }
                for s in self.steps
            ],
            "timing": {
                "prefill_tokens": t.prefill_tokens,
                "prefill_tokens_per_s": t.prefill_tokens_per_s,
                "decode_tokens": t.decode_tokens,
                "decode_tokens_per_s": t.decode_tokens_per_s,
            },
        }


def split_stop(text: str, stops: Sequence[str]) -> tuple[str, str, bool]:
    """Split pending text into (emit now, hold back, stopped).

    If a stop string occurs, emit what precedes the earliest one and stop. Otherwise hold back the
    longest tail of `text` that is a proper prefix of some stop string (it may yet become one);
    no occurrence can then start inside the emitted part.

    >>> split_stop("Hello, wor", ["world"])
    ('Hello, ', 'wor', False)
    >>> split_stop("say world!", ["world"])
    ('say ', '', True)
    """
    cuts = [i for s in stops if (i := text.find(s)) >= 0]
    if cuts:
        return text[: min(cuts)], "", True
    hold = max(
        (k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])),
        default=0,
    )
    return text[: len(text) - hold], text[len(text) - hold :], False


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = 0
    for x, y in zip(a, b, strict=False):  # stops at the shorter one
        if x != y:
            break
        n += 1
    return n


class RowText:
    """Python-side state of one sequence: its token count, text decoder and stop-string hold-back."""

    __slots__ = ("decoder", "held", "index", "n_new", "prompt_len")

    def __init__(self, index: int, prompt_len: int, decoder: StreamDecoder | None) -> None:
        self.index, self.prompt_len, self.decoder = index, prompt_len, decoder
        self.n_new, self.held = 0, ""

    def step(
        self,
        id: int,
        logprob: float,
        top: list[tuple[int, float]],
        params: SamplingParams,
        context_len: int,
    ) -> Step:
        """Account for one new token; decide whether the row is finished and what text to emit."""
        self.n_new += 1
        if id in params.stop_token_ids:
            text, _ = self._flush(params.stop)  # the stop token's own text is not emitted
            return Step(self.index, id, logprob, text, top, "stop")
        text, stopped = "", False
        if self.decoder is not None:
            text, self.held, stopped = split_stop(self.held + self.decoder.push(id), params.stop)
        if stopped:
            return Step(self.index, id, logprob, text, top, "stop")
        # Prompt + output never exceed the context, so a finished row's ids always fit a model.
        if self.n_new >= params.max_new_tokens or self.prompt_len + self.n_new >= context_len:
            rest, stopped = self._flush(params.stop)
            return Step(self.index, id, logprob, text + rest, top, "stop" if stopped else "length")
        return Step(self.index, id, logprob, text, top)

    def _flush(self, stops: Sequence[str]) -> tuple[str, bool]:
        """The held-back text and the decoder's last bytes, up to a stop string if one is there."""
        if self.decoder is None:
            return "", False
        pending, self.held = self.held + self.decoder.flush(), ""
        text, held, stopped = split_stop(pending, stops)
        return (text if stopped else text + held), stopped  # a partial stop at the end is text
