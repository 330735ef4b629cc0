"""A multi-turn chat over the engine: template rendering, KV-cache reuse and fitting the context.

    chat = Conversation(engine, template, system="Be brief.")
    turn = chat.say("What is the capital of France?", params, on_text=print)
    turn.completion.text, turn.dropped

Each turn renders the whole conversation with the model's chat template, but the model is not
shown it all again: the ids the KV cache already holds (the previous prompt and the reply as it
was generated, token for token) are kept, and only the text the template adds after them is
tokenized and prefilled. Re-tokenizing the reply's text instead could split it differently from
how it was generated, and every token after the first difference would be prefilled again.

When prompt + room for a reply no longer fits the model's context, the oldest messages (never the
system prompt) are dropped until it does, and the turn reports what was dropped; the cache then
starts over from the first changed token (positions shift, so nothing after it can be reused).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from pellucid.errors import PellucidError
from pellucid.infer.engine import Completion, Engine, Session
from pellucid.infer.sampling import SamplingParams

if TYPE_CHECKING:
    from pellucid.tokenizer.bpe import Tokenizer
    from pellucid.tokenizer.chat import ChatTemplate

# Tokens that end an assistant turn in the common templates (ChatML, Llama 3, Gemma, Phi-3).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def stop_token_ids(tokenizer: Tokenizer) -> list[int]:
    """EOS and every end-of-turn special token the vocabulary has, as llama.cpp's "EOG" set."""
    ids = {tokenizer.special_tokens[t] for t in END_OF_TURN if t in tokenizer.special_tokens}
    if tokenizer.eos_id is not None:
        ids.add(tokenizer.eos_id)
    return sorted(ids)


@dataclass
class Turn:
    """One exchange: the reply, and the messages dropped to make the prompt fit."""

    completion: Completion
    prompt_tokens: int  # the whole rendered conversation, in tokens
    dropped: list[dict[str, str]] = field(default_factory=list)


class Responder(Protocol):
    """What `pellucid chat` talks to: a Conversation over the engine, or a program with no
    weights at all (history/eliza.py). `say` streams the reply through on_text."""

    def say(
        self,
        text: str,
        params: SamplingParams,
        on_text: Callable[[str], None] | None = None,
        on_drop: Callable[[list[dict[str, str]]], None] | None = None,
    ) -> Turn: ...

    def reset(self) -> None: ...


class Conversation:
    """The messages of one chat, and the KV cache (a Session) that holds them (a Responder)."""

    def __init__(self, engine: Engine, template: ChatTemplate, system: str | None = None) -> None:
        if engine.tokenizer is None:
            raise PellucidError("chat needs a model with a tokenizer")
        self.engine, self.template, self.system = engine, template, system
        self.tokenizer: Tokenizer = engine.tokenizer
        self.reset()

    def reset(self) -> None:
        """Forget every message but the system prompt, and the cache with them."""
        self.messages: list[dict[str, str]] = []
        if self.system:
            self.messages.append({"role": "system", "content": self.system})
        self.session = Session()
        self._seen_text, self._seen_ids = "", []  # what the cache stands for, as text and ids

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, allowed_special="all")

    def prompt(self) -> tuple[str, list[int]]:
        """The conversation rendered for the assistant's next reply: (text, ids).

        The ids continue those the model has already seen when the new text extends that text.
        """
        text = self.template.render(self.messages, add_generation_prompt=True)
        if self._seen_ids and text.startswith(self._seen_text):
            return text, self._seen_ids + self._encode(text[len(self._seen_text) :])
        return text, self._encode(text)

    def _fit(self, reserve: int) -> tuple[str, list[int], list[dict[str, str]]]:
        """Drop the oldest messages until prompt + reserve tokens fit the context.

        A new message that cannot fit even alone (after the system prompt) is refused first,
        so it never costs the history.
        """
        ctx = self.engine.cfg.context_len
        first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
        alone = self.template.render(self.messages[:first] + self.messages[-1:])
        n = len(self._encode(alone))
        if n + reserve > ctx:
            self.messages.pop()
            raise PellucidError(
                f"the message is too long: as a prompt it is {n} tokens, and with room for "
                f"{reserve} reply tokens it does not fit the model's context of {ctx}"
            )
        dropped: list[dict[str, str]] = []
        while True:
            text, ids = self.prompt()
            if len(ids) + reserve <= ctx or len(self.messages) - first <= 1:
                return text, ids, dropped
            dropped.append(self.messages.pop(first))
            # Keep user/assistant alternation: a conversation may not open with a reply.
            while len(self.messages) - first > 1 and self.messages[first]["role"] != "user":
                dropped.append(self.messages.pop(first))

    def say(
        self,
        text: str,
        params: SamplingParams,
        on_text: Callable[[str], None] | None = None,
        on_drop: Callable[[list[dict[str, str]]], None] | None = None,
    ) -> Turn:
        """Add a user message, stream the assistant's reply, and keep it in the conversation.

        The reply may use at most max_new_tokens, and at least min(max_new_tokens, context/4)
        tokens are always left free for it. on_drop hears, before the reply starts, which
        messages were dropped to make room (only when some were).
        """
        reserve = min(params.max_new_tokens, self.engine.cfg.context_len // 4)
        self.messages.append({"role": "user", "content": text})
        prompt_text, ids, dropped = self._fit(reserve)
        if dropped and on_drop is not None:
            on_drop(dropped)
        try:
            done = self.engine.complete(ids, params, session=self.session, on_text=on_text)
        except BaseException:  # e.g. Ctrl-C mid-reply: withdraw the message, keep the rest
            self.messages.pop()
            raise
        self.messages.append({"role": "assistant", "content": done.text})
        # The model has now seen the prompt and its reply token for token (a final stop token
        # included); the next turn's text must extend exactly this to reuse the cache.
        self._seen_ids = ids + done.ids
        self._seen_text = prompt_text + self.tokenizer.decode(done.ids)
        return Turn(done, len(ids), dropped)
