"""The generation loop: sequences join, step together through one batched forward, and leave.

This is the only decode loop in pellucid. Its core is step-wise, for continuous batching:

    handle = engine.add(prompt_ids, params)   # admit one sequence; its KV memory is reserved
    steps = engine.step()                     # one token for every live sequence
    engine.cancel(handle)                     # drop one at once (a client went away)

One `step()`:
    prefill  every sequence added since the last step is placed in the next free row of the KV
             pool (kv_pool.py) and its prompt is run there (right-padded together with the
             others that joined; a Session's cached prefix is copied in, not recomputed). Its
             last logits give its first token.
    decode   every other live sequence feeds the token it got at the previous step through ONE
             forward (B_live, 1) over the pool's rows 0 .. B_live-1; row b's token takes
             position cached[b], so each row continues from its own length.
    choose   each row's next token from its logits, with its own SamplingParams (rows with the
             same sampling chain share one call to the functions of sampling.py) and its own
             torch.Generator, seeded from params.seed when it was added.
    finish   a sequence that ends (stop token or string, max_new_tokens, context) is removed at
             once and its KV memory goes back to the pool; its Step says why.

Speculative decoding (`Engine(model, tok, draft=LookupDrafter(), draft_k=4)`, speculative.py):
the decode forward feeds each row's last token AND a drafter's guesses for the next ones, and
the logits of every position choose tokens in order (one Step each) while they equal the guesses:
up to draft_k + 1 Steps per sequence per step, the same tokens as without a drafter.

`generate(prompts, params)` (and `complete`, chat's Conversation, explain, the CLI) is this core
driven to the end: it adds the prompts (prompt i seeded params.seed + i; those that do not fit the
pool wait until memory frees), steps, and relabels each Step with its prompt's index. A server
calls add/step/cancel itself, from one worker thread.

What a Step reports as `logprob` and `top` is the model's own distribution, log_softmax of the raw
logits, before the repetition penalty, the filters and temperature (vLLM's default "raw"
logprobs): the number perplexity is made of, the same whatever the sampling settings, and
alternatives that top-k/top-p removed still show with what the model gave them. Text deltas and
stop strings: sequence.py.

    engine = Engine(model, tokenizer)
    for steps in engine.generate([ids_a, ids_b], SamplingParams(temperature=0)):
        for step in steps:
            print(step.row, step.text)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from time import perf_counter
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from pellucid.errors import ConfigError, PellucidError
from pellucid.infer.decode import FastDecoder, choose, hidden_states, last_logits, runner_for
from pellucid.infer.kv_pool import KVPool, default_budget
from pellucid.infer.sampling import SamplingParams, seen_mask
from pellucid.infer.sequence import Completion, RowText, Step, Timing, common_prefix, split_stop
from pellucid.model.kv_cache import KVCache
from pellucid.tokenizer.stream import StreamDecoder

if TYPE_CHECKING:
    from pellucid.infer.speculative import Drafter
    from pellucid.tokenizer.bpe import Tokenizer

__all__ = ["Completion", "Engine", "Session", "Step", "Timing", "common_prefix", "split_stop"]


@dataclass
class Session:
    """A conversation's KV cache and the ids whose K/V it holds, reused across turns.

    Pass the same Session to every `generate`/`add` of one chat (one prompt each time, the whole
    conversation so far): the longest common prefix of what it holds and the new prompt is copied
    into the sequence's row of the pool and only the rest is prefilled. When the sequence ends its
    K/V are copied back, into a cache of the next power of two tokens that holds them: it grows
    with the conversation, it is not the whole context up front. Between turns this memory
    belongs to the Session, not to the engine's pool.
    """

    cache: KVCache | None = None
    ids: list[int] = field(default_factory=list)  # tokens in the cache, in order


class _Seq:
    """One admitted sequence: its parameters, random stream, text state and place in the cache."""

    __slots__ = ("cached", "gen", "handle", "ids", "params", "seen", "session", "text", "use_cache")

    def __init__(
        self,
        handle: int,
        prompt: list[int],
        params: SamplingParams,
        gen: torch.Generator,
        text: RowText,
        seen: Tensor | None,
        session: Session | None,
        use_cache: bool,
    ) -> None:
        self.handle, self.params, self.gen, self.text = handle, params, gen, text
        self.ids = list(prompt)  # prompt + every token chosen so far
        self.seen = seen  # (V,) bool, tokens in ids, for the repetition penalty (None: off)
        self.session, self.use_cache = session, use_cache
        self.cached = 0  # tokens whose K/V are in the pool's row (all but the last chosen one)


class Engine:
    """Generates from a model: greedy or sampled, continuously batched, streamed.

    model: a Transformer, or anything with its `cfg`, `forward_hidden(ids, *, cache)` and
    `logits(hidden)`. The engine only ever reads the output head at each row's last position.
    kv_budget_bytes: the KV pool's memory budget; None: 8 full-context rows (at least 256 MiB),
    at most a quarter of the device's memory (kv_pool.default_budget).
    draft: a Drafter (speculative.py) for speculative decoding, guessing up to draft_k tokens
    per sequence per step; None: plain decoding.

    Single-threaded by contract: add, step and cancel (and generate) must be called from one
    thread (a server's one worker thread); nothing here takes a lock.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer | None = None,
        *,
        kv_budget_bytes: int | None = None,
        draft: Drafter | None = None,
        draft_k: int = 4,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        if isinstance(draft_k, bool) or not isinstance(draft_k, int) or draft_k < 1:
            raise ConfigError(f"draft_k must be an integer >= 1, got {draft_k!r}")
        self.draft, self.draft_k = draft, draft_k
        self.cfg = model.cfg
        first = next(model.parameters())
        self.device = first.device
        self.dtype = first.dtype if first.is_floating_point() else torch.float32
        if kv_budget_bytes is None:
            kv_budget_bytes = default_budget(self.cfg, self.dtype, self.device)
        if isinstance(kv_budget_bytes, bool) or not isinstance(kv_budget_bytes, int):
            raise ConfigError(f"kv_budget_bytes must be an integer, got {kv_budget_bytes!r}")
        if kv_budget_bytes < 1:
            raise ConfigError(f"kv_budget_bytes must be positive, got {kv_budget_bytes}")
        self.pool = KVPool(self.cfg, kv_budget_bytes, self.device, self.dtype)
        self._seqs: dict[int, _Seq] = {}  # live sequences by handle
        self._pending: list[_Seq] = []  # added since the last step, not yet prefilled
        self._next_handle = 0
        self.last_step = Timing()  # where the latest step() spent its time
        self._fast = FastDecoder.build(model)  # decode steps as numba kernels, if it applies

    # --- the step-wise core ------------------------------------------------------------------------

    @property
    def n_live(self) -> int:
        """Sequences admitted and not finished (nor cancelled)."""
        return len(self._seqs)

    @property
    def kv_bytes_used(self) -> int:
        """Bytes of KV memory the pool holds now (0 when nothing is live)."""
        return self.pool.nbytes

    @property
    def kv_bytes_budget(self) -> int:
        return self.pool.budget

    def can_admit(self, n_tokens: int) -> bool:
        """Could a sequence reserving n_tokens (prompt + max_new_tokens) join now?"""
        return self.pool.fits(min(n_tokens, self.cfg.context_len))

    def add(
        self,
        prompt: list[int],
        params: SamplingParams,
        *,
        session: Session | None = None,
        use_cache: bool = True,
    ) -> int:
        """Admit one sequence; returns its handle (unique per Engine). It is prefilled at the next
        step. Raises a one-line PellucidError for a bad prompt or params (as generate does), and
        CapacityError when the pool cannot reserve len(prompt) + max_new_tokens tokens (within the
        context) right now. use_cache=False recomputes the whole sequence at every step and takes
        no pool memory (for tests and benchmarks)."""
        self._check(prompt, params, "the prompt")
        return self._admit(prompt, params, session, use_cache, params.seed)

    def step(self) -> list[Step]:
        """One engine step: prefill every sequence added since the last step (its first token) and
        one batched decode forward for all the others. Returns one Step per live sequence,
        Step.row its handle; a Step with finish_reason set means that sequence is finished and
        removed, its KV memory back in the pool. The model is in eval mode during the step. If
        the step raises (NaN logits, an interrupt), every live sequence is cancelled."""
        if not self._seqs:
            self.last_step = Timing()
            return []
        was_training = self.model.training
        if was_training:  # eval mode: no dropout; the caller's mode comes back after the step
            self.model.train(False)
        try:
            return self._step()
        except BaseException:  # e.g. NaN logits, Ctrl-C: no sequence can go on half-stepped
            for handle in list(self._seqs):
                self.cancel(handle)
            raise
        finally:
            if was_training:
                self.model.train(True)

    def cancel(self, handle: int) -> None:
        """Remove a live sequence at once, freeing its KV memory (a Session keeps what its
        sequence had cached); unknown or finished handles are ignored."""
        seq = self._seqs.get(handle)
        if seq is not None:
            self._remove(seq)

    # --- the whole-batch API, on top of the core ---------------------------------------------------

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        *,
        use_cache: bool = True,
        session: Session | None = None,
        timing: Timing | None = None,
    ) -> Iterator[list[Step]]:
        """Generate for every prompt; yields, per step, one Step per prompt still live (in prompt
        order, Step.row the prompt's index).

        prompts: token id lists, any lengths (each shorter than the model's context).
        use_cache=False recomputes every whole sequence at each step (for tests and benchmarks).
        session: reuse a conversation's cache (one prompt only). timing: filled in as it runs.
        Bad input raises here, before the first step. The engine must be idle (no sequences
        added with `add` still live): generate drives its steps itself.
        """
        if not prompts:
            raise ConfigError("generate needs at least one prompt")
        for i, p in enumerate(prompts):
            self._check(p, params, f"prompt {i}")
        if session is not None and (len(prompts) != 1 or not use_cache):
            raise ConfigError("a Session takes exactly one prompt and needs the KV cache")
        if self._seqs:
            raise ConfigError(
                f"generate runs the engine's steps itself, but {len(self._seqs)} sequences added "
                "with add() are live: step them to the end or cancel them first"
            )
        return self._generate(prompts, params, use_cache, session, timing or Timing())

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
        for batch in self.generate([prompt_ids], params, session=session, timing=timing):
            for step in batch:  # one, or with a drafter up to draft_k + 1
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

    def _generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        use_cache: bool,
        session: Session | None,
        timing: Timing,
    ) -> Iterator[list[Step]]:
        waiting = list(enumerate(prompts))[::-1]  # popped from the end: prompt 0 first
        index: dict[int, int] = {}  # handle -> prompt index, for the live ones
        try:
            while waiting or index:
                # Admit what fits; the first one always tries (CapacityError if it never fits).
                while waiting and (
                    not index
                    or not use_cache
                    or self.can_admit(len(waiting[-1][1]) + params.max_new_tokens)
                ):
                    i, prompt = waiting.pop()
                    seed = None if params.seed is None else params.seed + i
                    index[self._admit(prompt, params, session, use_cache, seed)] = i
                mine = []
                for step in self.step():
                    done = step.finish_reason is not None
                    i = index.pop(step.row, None) if done else index.get(step.row)
                    if i is not None:
                        step.row = i
                        mine.append(step)
                for name in ("prefill_tokens", "prefill_s", "decode_tokens", "decode_s"):
                    setattr(timing, name, getattr(timing, name) + getattr(self.last_step, name))
                yield sorted(mine, key=lambda s: s.row)
        finally:  # the consumer stopped early (or an error): free what is still live
            for handle in list(index):
                self.cancel(handle)

    # --- admission and removal ---------------------------------------------------------------------

    def _check(self, prompt: list[int], params: SamplingParams, name: str) -> None:
        """One-line errors for what cannot be generated from (before anything is reserved)."""
        ctx, V = self.cfg.context_len, self.cfg.vocab_size
        if not isinstance(params, SamplingParams):
            raise ConfigError(
                f"sampling params must be a SamplingParams, got {type(params).__name__}"
            )
        if not isinstance(prompt, (list, tuple)):
            raise PellucidError(f"{name} must be a list of token ids, got {type(prompt).__name__}")
        if not prompt:
            raise PellucidError(f"{name} is empty: give at least one token")
        if len(prompt) >= ctx:
            raise PellucidError(
                f"{name} is {len(prompt)} tokens but the model's context is {ctx} tokens "
                f"(prompt + output must fit, so at most {ctx - 1} for the prompt)"
            )
        bad = next((t for t in prompt if not (type(t) is int and 0 <= t < V)), None)
        if bad is not None:
            raise PellucidError(f"{name} has token id {bad!r}, outside the vocabulary [0, {V})")
        if params.stop and self.tokenizer is None:
            raise ConfigError("sampling stop strings need an Engine with a tokenizer")

    def _admit(
        self,
        prompt: list[int],
        params: SamplingParams,
        session: Session | None,
        use_cache: bool,
        seed: int | None,
    ) -> int:
        if session is not None:
            if not use_cache:
                raise ConfigError("a Session needs the KV cache")
            if any(s.session is session for s in self._seqs.values()):
                raise ConfigError("this Session is in use by a live sequence")
        handle = self._next_handle
        if use_cache:  # CapacityError here leaves nothing behind
            self.pool.reserve(
                handle, min(len(prompt) + params.max_new_tokens, self.cfg.context_len)
            )
        self._next_handle += 1
        seen = None
        if params.repetition_penalty != 1.0:
            seen = seen_mask([prompt], self.cfg.vocab_size, self.device)[0]
        decoder = StreamDecoder(self.tokenizer) if self.tokenizer is not None else None
        text = RowText(handle, len(prompt), decoder)
        seq = _Seq(handle, prompt, params, _generator(seed), text, seen, session, use_cache)
        self._seqs[handle] = seq
        self._pending.append(seq)
        return handle

    def _remove(self, seq: _Seq) -> None:
        """Forget a sequence; a Session gets back the K/V its row holds."""
        del self._seqs[seq.handle]
        if self.draft is not None:
            self.draft.forget(seq.handle)
        if seq in self._pending:
            self._pending.remove(seq)
        if not seq.use_cache:
            return
        session = seq.session
        if session is not None and seq.handle in self.pool.rows:
            row = self.pool.rows.index(seq.handle)
            session.cache = self.pool.save(row, seq.cached, session.cache)
            session.ids = seq.ids[: seq.cached]
        self.pool.release(seq.handle)
        if not self.pool.k and self._fast is not None:  # the pool freed its buffers
            self._fast.forget()

    # --- one step ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def _step(self) -> list[Step]:
        timing, clock = Timing(), perf_counter()
        pending, self._pending = self._pending, []
        # Decode: the prefilled rows (pool rows 0 .. n-1) and the uncached sequences that have
        # a token to feed. Prefill: the new ones. `rows` and `parts` list them in one order.
        rows = [self._seqs[h] for h in self.pool.rows]
        parts, steps = [], []
        if rows and self.draft is not None:
            steps = self._speculate(rows)
            timing.decode_tokens, rows = len(steps), []
        elif rows:
            cache = self.pool.view(0, len(rows), [s.cached for s in rows])
            parts.append(self._logits([[s.ids[-1]] for s in rows], cache))
            for s in rows:
                s.cached += 1
            timing.decode_tokens = len(rows)
        uncached = [s for s in self._seqs.values() if not s.use_cache]
        if uncached:  # the whole sequence again, new or not: one forward without a cache
            parts.append(self._logits([s.ids for s in uncached]))
            fresh = sum(len(s.ids) for s in uncached if s.text.n_new == 0)
            timing.prefill_tokens += fresh
            timing.decode_tokens += sum(1 for s in uncached if s.text.n_new > 0)
            rows += uncached
        timing.decode_s = perf_counter() - clock
        new = [s for s in pending if s.use_cache]
        if new:
            clock = perf_counter()
            parts.append(self._prefill(new, timing))
            rows += new
            timing.prefill_s = perf_counter() - clock
        clock = perf_counter()
        if parts:  # (not when every row was decoded with drafts: those are chosen already)
            logits = parts[0] if len(parts) == 1 else torch.cat(parts)  # (B, V)
            ids, logprobs, tops = choose(
                [s.params for s in rows], [s.seen for s in rows], [s.gen for s in rows], logits
            )
            for b, s in enumerate(rows):
                step = s.text.step(ids[b], logprobs[b], tops[b], s.params, self.cfg.context_len)
                s.ids.append(ids[b])
                steps.append(step)
                if step.finish_reason is not None:
                    self._remove(s)
        chose = perf_counter() - clock
        if timing.decode_tokens:
            timing.decode_s += chose
        else:
            timing.prefill_s += chose + timing.decode_s
            timing.decode_s = 0.0
        self.last_step = timing
        return steps

    def _speculate(self, rows: list[_Seq]) -> list[Step]:
        """Decode the pool's rows with drafts: ONE forward of each row's last token and its guesses
        (B, 1 + k), then per row, in order, the token chosen at each position (as plain decoding
        would) until one differs from the guess: it is kept and ends the row's step. The row's
        cache length is then its accepted tokens; the K/V of rejected guesses lie past it."""
        ctx = self.cfg.context_len
        # Padded rows write 1 + max(k) positions after each row's length: all inside the buffer.
        room = self.pool.shape[1] - max(s.cached for s in rows) - 1
        drafts = []
        for s in rows:
            # Guess no token past max_new_tokens or the context: the last kept one is chosen.
            left = min(s.params.max_new_tokens - s.text.n_new, ctx - len(s.ids)) - 1
            k = min(self.draft_k, left, room)
            drafts.append(self.draft.propose(s.handle, s.ids, k)[:k] if k > 0 else [])
        fed = [[s.ids[-1], *d] for s, d in zip(rows, drafts, strict=True)]
        cache = self.pool.view(0, len(rows), [s.cached for s in rows])
        runner = runner_for(self.model, self._fast, fed, cache)
        hidden = hidden_states(runner, fed, self.device, cache)  # (B, 1 + max k, C)
        steps = []
        for s, d, h in zip(rows, drafts, hidden, strict=True):
            for j in range(len(d) + 1):  # the output head only for the positions reached
                z = self.model.logits(h[j : j + 1])  # (1, V)
                (t,), (lp,), (top,) = choose([s.params], [s.seen], [s.gen], z)
                step = s.text.step(t, lp, top, s.params, ctx)
                s.ids.append(t)
                s.cached = len(s.ids) - 1  # the fed tokens before t: all kept
                steps.append(step)
                if step.finish_reason is not None:
                    self._remove(s)
                    break
                if j == len(d) or t != d[j]:
                    break
        return steps

    def _prefill(self, seqs: list[_Seq], timing: Timing) -> Tensor:
        """Place new sequences in the next rows and run their prompts there; (N, V) logits."""
        start, lengths, todo = len(self.pool.rows), [], []
        for s in seqs:
            row = self.pool.place(s.handle)
            s.cached = self._reuse(s, row)
            lengths.append(s.cached)
            todo.append(s.ids[s.cached :])
        timing.prefill_tokens += sum(map(len, todo))
        logits = self._logits(todo, self.pool.view(start, start + len(seqs), lengths))
        for s in seqs:  # only now: an interrupted prefill leaves a Session nothing half-written
            s.cached = len(s.ids)
        return logits

    def _logits(self, rows: list[list[int]], cache: KVCache | None = None) -> Tensor:
        """Each row's last logits (B, V): decode (a few tokens per row) on the FastDecoder if
        there is one, prefill and uncached runs on the model."""
        return last_logits(
            runner_for(self.model, self._fast, rows, cache), rows, self.device, cache
        )

    def _reuse(self, seq: _Seq, row: int) -> int:
        """Copy the prefix a Session's cache shares with the prompt into `row`; its length."""
        session = seq.session
        if session is None or session.cache is None:
            return 0
        held = session.ids[: int(session.cache.lengths[0])]
        # Keep at least one prompt token to run: its logits predict the first new token.
        n = min(common_prefix(held, seq.ids), len(seq.ids) - 1)
        if n:
            self.pool.load(row, session.cache, n)
        return n


def _generator(seed: int | None) -> torch.Generator:
    """A sequence's own random stream, so its tokens ignore the rest of the batch."""
    g = torch.Generator()
    if seed is None:
        g.seed()  # a fresh nondeterministic seed
    else:
        g.manual_seed(seed)
    return g
