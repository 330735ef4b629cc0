"""The generation loop: prefill and decode over a KV cache, for ragged batches of prompts.

This is the only generation loop in pellucid: the CLI, chat, the server, explain and PPO rollouts
all call `Engine.generate`. One call runs, for B prompts of different lengths:

    prefill  right-pad the prompts to (B, L_max), one forward that fills a KVCache of B rows, then
             set each row's cached length to its own prompt length (the padding is never seen)
    decode   pick one token per live row from its last logits, stream it, then feed all live
             rows' tokens through ONE forward (B_live, 1); row b's token takes position
             cache.lengths[b]. Finished rows leave the batch (cache.keep_rows).

What a Step reports as `logprob` and `top` is the model's own distribution, log_softmax of the raw
logits, before the repetition penalty, the filters and temperature (vLLM's default "raw"
logprobs): the number perplexity is made of, the same whatever the sampling settings, and
alternatives that top-k/top-p removed still show with what the model gave them.

Text is decoded per row by a StreamDecoder (whole characters only) and held back while it could
be the start of a stop string, so no part of a stop string is ever emitted and the streamed
deltas join to exactly the final text.

    engine = Engine(model, tokenizer)
    for steps in engine.generate([ids_a, ids_b], SamplingParams(temperature=0)):
        for step in steps:
            print(step.row, step.text)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from time import perf_counter
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from pellucid.errors import ConfigError, PellucidError
from pellucid.infer.sampling import SamplingParams, probabilities, process_logits, sample, seen_mask
from pellucid.model.kv_cache import KVCache
from pellucid.tokenizer.stream import StreamDecoder

if TYPE_CHECKING:
    from pellucid.tokenizer.bpe import Tokenizer


@dataclass
class Step:
    """One generated token of one row."""

    row: int  # index of the prompt in `prompts`
    id: int  # the token, a stop token included
    logprob: float  # log p_model(id | context): log_softmax of the raw logits
    text: str  # UTF-8-safe text delta (whole characters); may be "" while text is held back
    top: list[tuple[int, float]]  # the top_logprobs most likely (id, logprob), best first
    finish_reason: str | None = None  # "stop" (token or string), "length" (max tokens, context)


@dataclass
class Session:
    """A conversation's KV cache and the ids whose K/V it holds, reused across turns.

    Pass the same Session to every `generate` call of one chat (one prompt per call, the whole
    conversation so far): the cache keeps the longest common prefix of what it holds and the new
    prompt, and only the rest is prefilled.
    """

    cache: KVCache | None = None
    ids: list[int] = field(default_factory=list)  # tokens in the cache, in order


@dataclass
class Timing:
    """Where a generate call spent its time (the consumer's time between steps not counted)."""

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


class _Row:
    """Python-side state of one row: its counters, text decoder and stop-string hold-back."""

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


@dataclass
class _State:
    """The tensors of one generate call, for the rows still live."""

    logits: Tensor  # (B, V) next-token logits
    cache: KVCache | None  # None: recompute whole sequences (use_cache=False)
    seqs: list[list[int]]  # every row's ids (the uncached path extends them at each step)
    seen: Tensor | None  # (B, V) bool tokens present per row, for the repetition penalty
    prefilled: int  # tokens the prefill ran through the model


class Engine:
    """Generates from a model: greedy or sampled, batched, streamed, with or without a cache.

    model: a Transformer, or anything with its `cfg`, `forward_hidden(ids, *, cache)` and
    `logits(hidden)`. The engine only ever reads the output head at each row's last position.
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.cfg = model.cfg
        first = next(model.parameters())
        self.device = first.device
        self.dtype = first.dtype if first.is_floating_point() else torch.float32

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        *,
        use_cache: bool = True,
        session: Session | None = None,
        timing: Timing | None = None,
    ) -> Iterator[list[Step]]:
        """Generate for every prompt; yields, per decode step, one Step per row still live.

        prompts: token id lists, any lengths (each shorter than the model's context).
        use_cache=False recomputes every whole sequence at each step (for tests and benchmarks).
        session: reuse a conversation's cache (one prompt only). timing: filled in as it runs.
        Bad input raises here, before the first step.
        """
        self._check(prompts, params, use_cache, session)
        return self._run(prompts, params, use_cache, session, timing or Timing())

    def complete(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        session: Session | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Completion:
        """Generate for one prompt and collect the result; on_text receives each text delta."""
        timing, steps = Timing(), []
        for (step,) in self.generate([prompt_ids], params, session=session, timing=timing):
            steps.append(step)
            if on_text is not None and step.text:
                on_text(step.text)
        return Completion(
            prompt_ids=list(prompt_ids),
            ids=[s.id for s in steps],
            text="".join(s.text for s in steps),
            steps=steps,
            finish_reason=steps[-1].finish_reason or "length",
            timing=timing,
        )

    def _check(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        use_cache: bool,
        session: Session | None,
    ) -> None:
        ctx, V = self.cfg.context_len, self.cfg.vocab_size
        if not prompts:
            raise ConfigError("generate needs at least one prompt")
        for i, p in enumerate(prompts):
            if not p:
                raise PellucidError(f"prompt {i} is empty: give at least one token")
            if len(p) >= ctx:
                raise PellucidError(
                    f"prompt {i} is {len(p)} tokens but the model's context is {ctx} tokens "
                    f"(prompt + output must fit, so at most {ctx - 1} for the prompt)"
                )
            if not all(0 <= t < V for t in p):
                bad = next(t for t in p if not 0 <= t < V)
                raise PellucidError(
                    f"prompt {i} has token id {bad}, outside the vocabulary [0, {V})"
                )
        if params.stop and self.tokenizer is None:
            raise ConfigError("sampling stop strings need an Engine with a tokenizer")
        if session is not None and (len(prompts) != 1 or not use_cache):
            raise ConfigError("a Session takes exactly one prompt and needs the KV cache")

    def _run(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        use_cache: bool,
        session: Session | None,
        timing: Timing,
    ) -> Iterator[list[Step]]:
        rows = [_Row(i, len(p), self._decoder()) for i, p in enumerate(prompts)]
        gens = [_generator(params.seed, i) for i in range(len(prompts))]
        ctx = self.cfg.context_len
        was_training = self.model.training
        self.model.train(False)  # eval mode: no dropout; the caller's mode comes back at the end
        try:
            clock = perf_counter()
            state = self._prefill(prompts, params, use_cache, session)
            timing.prefill_tokens += state.prefilled
            first = True
            while True:
                ids, logprobs, tops = self._choose(state, params, gens)
                steps = [
                    row.step(ids[b], logprobs[b], tops[b], params, ctx)
                    for b, row in enumerate(rows)
                ]
                spent = perf_counter() - clock
                if first:
                    timing.prefill_s += spent
                else:
                    timing.decode_s += spent
                    timing.decode_tokens += len(steps)
                yield steps
                clock, first = perf_counter(), False
                live = [b for b, s in enumerate(steps) if s.finish_reason is None]
                if not live:
                    return
                if len(live) < len(rows):
                    rows, gens = [rows[b] for b in live], [gens[b] for b in live]
                self._feed(state, live, [ids[b] for b in live], session)
        finally:
            self.model.train(was_training)

    def _decoder(self) -> StreamDecoder | None:
        return StreamDecoder(self.tokenizer) if self.tokenizer is not None else None

    @torch.inference_mode()
    def _prefill(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        use_cache: bool,
        session: Session | None,
    ) -> _State:
        """Run the prompts through the model; returns the state holding their last logits."""
        seqs = [list(p) for p in prompts]
        seen = None
        if params.repetition_penalty != 1.0:
            seen = seen_mask(seqs, self.cfg.vocab_size, self.device)
        n_tokens = sum(map(len, seqs))
        if not use_cache:
            return _State(self._last_logits(seqs), None, seqs, seen, n_tokens)
        if session is not None:
            return self._prefill_session(seqs[0], session, seen)
        lengths = torch.tensor([len(p) for p in seqs], device=self.device)  # (B,)
        max_len = min(self.cfg.context_len, int(lengths.max()) + params.max_new_tokens)
        cache = KVCache(self.cfg, len(seqs), max_len, device=self.device, dtype=self.dtype)
        logits = self._last_logits(seqs, cache)
        cache.advance(lengths)  # each row's true length: its padding will be overwritten
        return _State(logits, cache, seqs, seen, n_tokens)

    def _prefill_session(self, prompt: list[int], session: Session, seen: Tensor | None) -> _State:
        """Prefill only what the session's cache does not already hold."""
        cache = session.cache
        if cache is None:
            cache = KVCache(self.cfg, 1, self.cfg.context_len, device=self.device, dtype=self.dtype)
        held = session.ids[: int(cache.lengths[0])]
        # Keep at least one prompt token to run: its logits predict the first new token.
        n = min(common_prefix(held, prompt), len(prompt) - 1)
        cache.truncate(n)
        logits = self._last_logits([prompt[n:]], cache)
        cache.advance(len(prompt) - n)
        session.cache, session.ids = cache, list(prompt)
        return _State(logits, cache, [list(prompt)], seen, len(prompt) - n)

    @torch.inference_mode()
    def _choose(
        self, state: _State, params: SamplingParams, gens: list[torch.Generator]
    ) -> tuple[list[int], list[float], list[list[tuple[int, float]]]]:
        """Pick each row's next token; returns ids, their logprobs and the top alternatives."""
        if bool(state.logits.isnan().any()):  # no distribution to sample from: say so, by name
            raise PellucidError(
                "the model produced NaN logits (non-finite weights or an overflow); "
                "no token can be chosen"
            )
        logprobs = torch.log_softmax(state.logits.float(), dim=-1)  # (B, V) the model's own
        logits = process_logits(state.logits, params, state.seen)
        if params.temperature == 0:
            ids = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        else:
            ids = sample(probabilities(logits, params.temperature), gens)
        if state.seen is not None:
            state.seen.scatter_(1, ids, True)
        chosen = logprobs.gather(1, ids)[:, 0].tolist()
        tops: list[list[tuple[int, float]]] = [[] for _ in range(ids.shape[0])]
        k = min(params.top_logprobs, logprobs.shape[-1])
        if k:
            values, top_ids = torch.topk(logprobs, k, dim=-1)  # (B, k)
            tops = [
                list(zip(i, v, strict=True))
                for i, v in zip(top_ids.tolist(), values.tolist(), strict=True)
            ]
        return ids[:, 0].tolist(), chosen, tops

    @torch.inference_mode()
    def _feed(
        self, state: _State, live: list[int], ids: list[int], session: Session | None
    ) -> None:
        """Drop finished rows, then run the live rows' new tokens: state.logits for the next."""
        if len(live) < len(state.seqs):
            keep = torch.tensor(live, device=self.device)
            state.seqs = [state.seqs[b] for b in live]
            state.seen = state.seen[keep] if state.seen is not None else None
            if state.cache is not None:
                state.cache.keep_rows(keep)
        if state.cache is None:
            for seq, t in zip(state.seqs, ids, strict=True):
                seq.append(t)
            state.logits = self._last_logits(state.seqs)
            return
        state.logits = self._last_logits([[t] for t in ids], state.cache)
        state.cache.advance(1)
        if session is not None:
            session.ids.append(ids[0])

    def _last_logits(self, seqs: list[list[int]], cache: KVCache | None = None) -> Tensor:
        """Run the rows' tokens (right-padded with 0) and return the logits (B, V) of each row's
        last real token. Causal attention keeps the padding unseen by the real tokens, and only
        B hidden states go through the output head (not B x T of them)."""
        T = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (T - len(s)) for s in seqs], device=self.device)  # (B, T)
        hidden = self.model.forward_hidden(ids, cache=cache)  # (B, T, C)
        last = torch.tensor([len(s) - 1 for s in seqs], device=self.device)  # (B,)
        return self.model.logits(hidden[torch.arange(len(seqs), device=self.device), last])


def _generator(seed: int | None, row: int) -> torch.Generator:
    """Row `row`'s random stream: seed + row, so a row's tokens ignore the rest of the batch."""
    g = torch.Generator()
    if seed is None:
        g.seed()  # a fresh nondeterministic seed
    else:
        g.manual_seed(seed + row)
    return g
