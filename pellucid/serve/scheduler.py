"""Continuous batching: one worker thread owns the Engine; requests join and leave between steps.

The event loop never runs the model. A request becomes a Ticket (its sequences: one per prompt
and choice) in a bounded queue; the worker thread, between two engine steps,

    1. applies cancellations (a client went away: its sequences leave the batch, KV freed),
    2. runs exclusive jobs (`run_exclusive`: e.g. an explain trace, which uses the model alone),
    3. ends tickets past their time limit,
    4. admits queued tickets while the batch has room (max_batch sequences, and the engine's KV
       pool can reserve prompt + max_tokens for each; the queue's head goes first, so a big
       request is not starved by small ones behind it),
    5. runs one `engine.step()`: prefill of the newcomers and one batched decode of the rest,

and hands each ticket its Steps through `loop.call_soon_threadsafe` onto the ticket's asyncio
queue. The only lock guards the queue and the cancel list for a few instructions; nothing
serialises requests. The Engine is single-threaded by contract, and only this thread calls it.

    scheduler = Scheduler(engine, max_batch=8, max_queue=64)
    ticket = scheduler.submit([(prompt_ids, params)])     # APIError 429 when the queue is full
    async for event in ticket.events(): ...               # Event("steps" | "error" | "done")
    scheduler.cancel(ticket)                              # from the event loop, at any time
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from itertools import count
from typing import Any, Protocol

from pellucid.errors import CapacityError, PellucidError
from pellucid.infer.engine import Step
from pellucid.infer.sampling import SamplingParams
from pellucid.serve.schemas import APIError

log = logging.getLogger("pellucid")


class StepEngine(Protocol):
    """What the scheduler needs of infer.engine.Engine (a test may wrap one)."""

    @property
    def n_live(self) -> int: ...
    def can_admit(self, n_tokens: int) -> bool: ...
    def add(self, prompt: list[int], params: SamplingParams) -> int: ...
    def step(self) -> list[Step]: ...
    def cancel(self, handle: int) -> None: ...


@dataclass
class Event:
    """What a ticket hears from the worker."""

    kind: str  # "steps": new tokens; "error": the request failed; "done": every choice finished
    steps: list[tuple[int, Step]] = field(default_factory=list)  # (choice index, step)
    error: APIError | None = None


@dataclass
class Metrics:
    """Counters and gauges for /metrics and /health (written by the worker, read anywhere)."""

    requests_total: int = 0  # tickets accepted into the queue
    requests_active: int = 0  # tickets with sequences in the engine
    requests_rejected_total: int = 0  # refused because the queue was full
    requests_cancelled_total: int = 0  # the client went away before the end
    requests_failed_total: int = 0  # ended by an error (engine failure, time limit, capacity)
    requests_timed_out_total: int = 0
    prompt_tokens_total: int = 0
    tokens_generated_total: int = 0
    steps_total: int = 0


class Ticket:
    """One request in the scheduler: its sequences and the asyncio queue its events arrive on."""

    def __init__(
        self,
        rid: int,
        seqs: list[tuple[list[int], SamplingParams]],
        loop: asyncio.AbstractEventLoop,
        deadline: float,
    ) -> None:
        self.id, self.seqs, self.loop, self.deadline = rid, seqs, loop, deadline
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.handles: dict[int, int] = {}  # engine handle -> choice index (worker thread only)
        self.live = 0  # choices still generating (worker thread only)
        self.state = "queued"  # -> "running" -> "done"
        self.cancelled = False

    def post(self, event: Event) -> None:
        """From the worker thread: put an event on the ticket's queue, in the loop's thread."""
        with suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def events(self) -> AsyncIterator[Event]:
        """Every event until "done" or "error" (inclusive)."""
        while True:
            event = await self.queue.get()
            yield event
            if event.kind != "steps":
                return


class Scheduler:
    """The worker thread that owns the engine, and the queue in front of it.

    max_batch: most sequences decoded together. max_queue: most tickets waiting to be admitted
    (beyond it: 429 at once). request_timeout_s: a ticket's time limit, queueing included.
    """

    def __init__(
        self,
        engine: StepEngine,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        request_timeout_s: float = 600.0,
    ) -> None:
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.request_timeout_s = request_timeout_s
        self.metrics = Metrics()
        self._cond = threading.Condition()  # guards the four collections below
        self._waiting: deque[Ticket] = deque()
        self._cancels: list[Ticket] = []
        self._jobs: deque[tuple[Callable[[], Any], asyncio.Future, asyncio.AbstractEventLoop]] = (
            deque()
        )
        self._running: dict[int, Ticket] = {}  # engine handle -> ticket (worker thread only)
        self._ids = count(1)
        self._thread: threading.Thread | None = None
        self._closing = False

    # --- the event loop's side ---------------------------------------------------------------------

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def sequences_active(self) -> int:
        return self.engine.n_live

    @property
    def alive(self) -> bool:
        """False once the worker thread has stopped (closed, or died of a bug): nothing runs."""
        return not self._closing and (self._thread is None or self._thread.is_alive())

    def start(self) -> None:
        """Start the worker thread (idempotent; `submit` starts it too)."""
        with self._cond:
            if self._thread is None and not self._closing:
                self._thread = threading.Thread(target=self._work, name="pellucid-engine")
                self._thread.daemon = True  # never keeps a dying process alive
                self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking requests, fail whatever is left (503), and join the worker thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, seqs: list[tuple[list[int], SamplingParams]]) -> Ticket:
        """Queue one request's sequences; call from the event loop. 429 when the queue is full,
        503 when the server is shutting down."""
        self.start()
        loop = asyncio.get_running_loop()
        with self._cond:
            if self._closing:
                raise APIError(503, "the server is shutting down", type="server_error")
            if len(self._waiting) >= self.max_queue:
                self.metrics.requests_rejected_total += 1
                raise APIError(
                    429,
                    f"the server is busy: {len(self._waiting)} requests are already waiting; "
                    "retry shortly",
                    type="rate_limit_error",
                    code="queue_full",
                    headers={"Retry-After": "1"},
                )
            ticket = Ticket(next(self._ids), seqs, loop, time.monotonic() + self.request_timeout_s)
            self._waiting.append(ticket)
            self.metrics.requests_total += 1
            self._cond.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The client went away: drop the ticket's sequences before the next step."""
        with self._cond:
            if ticket.state != "done" and not ticket.cancelled:
                ticket.cancelled = True
                self._cancels.append(ticket)
                self._cond.notify()

    async def run_exclusive(self, fn: Callable[[], Any]) -> Any:
        """Run fn() on the worker thread between two steps (the model is free then); returns its
        result or raises its exception."""
        self.start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        with self._cond:
            if self._closing:
                raise APIError(503, "the server is shutting down", type="server_error")
            self._jobs.append((fn, future, loop))
            self._cond.notify()
        return await future

    # --- the worker thread -------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (
                        self._closing
                        or self._cancels
                        or self._jobs
                        or self._waiting
                        or self.engine.n_live
                    ):
                        self._cond.wait(1.0)
                    if self._closing:
                        break
                    cancels, self._cancels = self._cancels, []
                    jobs = list(self._jobs)
                    self._jobs.clear()
                for ticket in cancels:
                    if self._drop(ticket):
                        self.metrics.requests_cancelled_total += 1
                for job in jobs:
                    _run_job(*job)
                self._expire()
                self._admit()
                if self.engine.n_live:
                    self._step()
        finally:
            self._shutdown()

    def _drop(self, ticket: Ticket, error: APIError | None = None) -> bool:
        """Remove a ticket from the queue or the batch (its KV memory freed at once); False if
        it had already finished."""
        if ticket.state == "done":
            return False
        with self._cond:
            if ticket.state == "queued" and ticket in self._waiting:
                self._waiting.remove(ticket)
        if ticket.state == "running":
            self.metrics.requests_active -= 1
        for handle in ticket.handles:
            self.engine.cancel(handle)
            self._running.pop(handle, None)
        ticket.handles.clear()
        ticket.state = "done"
        if error is not None:
            self.metrics.requests_failed_total += 1
            ticket.post(Event("error", error=error))
        return True

    def _expire(self) -> None:
        now = time.monotonic()
        with self._cond:
            late = [t for t in self._waiting if t.deadline <= now]
        late += [t for t in set(self._running.values()) if t.deadline <= now]
        for ticket in late:
            self.metrics.requests_timed_out_total += 1
            limit = f"{self.request_timeout_s:g} s"
            self._drop(
                ticket, APIError(504, f"the request took longer than {limit}", type="timeout")
            )

    def _admit(self) -> None:
        """Move queued tickets into the engine while the batch and the KV pool have room."""
        while True:
            with self._cond:
                if not self._waiting:
                    return
                ticket = self._waiting[0]
            busy = self.engine.n_live > 0
            need = [len(p) + params.max_new_tokens for p, params in ticket.seqs]
            if busy and (
                self.engine.n_live + len(need) > self.max_batch
                or not all(self.engine.can_admit(n) for n in need)
            ):
                return  # wait for sequences to finish; an idle engine always tries the head
            with self._cond:
                self._waiting.popleft()
            self._add(ticket, busy)
            if ticket.state == "queued":  # it did not fit after all: back to the head, wait
                with self._cond:
                    self._waiting.appendleft(ticket)
                return

    def _add(self, ticket: Ticket, busy: bool) -> None:
        try:
            for j, (prompt, params) in enumerate(ticket.seqs):
                ticket.handles[self.engine.add(prompt, params)] = j
        except CapacityError as e:
            for handle in ticket.handles:
                self.engine.cancel(handle)
            ticket.handles.clear()
            if not busy:  # it does not fit even alone: a retry cannot help, so 400, not 503
                ticket.state = "running"  # (so _drop's accounting matches)
                self.metrics.requests_active += 1
                why = str(e).split(";")[0]  # (not the pool-full message's "retry" advice)
                message = (
                    "the request does not fit this server's KV-cache memory even alone "
                    f"(--kv-budget-mb); lower max_tokens or n: {why}"
                )
                self._drop(ticket, APIError(400, message, param="max_tokens", code="kv_budget"))
            return
        except PellucidError as e:  # the engine's own checks (the schema checks should catch all)
            ticket.state = "running"
            self.metrics.requests_active += 1
            self._drop(ticket, APIError(400, " ".join(str(e).split())))
            return
        ticket.state, ticket.live = "running", len(ticket.seqs)
        self.metrics.requests_active += 1
        self.metrics.prompt_tokens_total += sum(len(p) for p, _ in ticket.seqs)
        for handle in ticket.handles:
            self._running[handle] = ticket

    def _step(self) -> None:
        try:
            steps = self.engine.step()
        except Exception as e:  # the engine cancelled every live sequence; tell their clients
            failed = sorted({t.id for t in self._running.values()})
            log.exception("engine step failed; failing requests %s", failed)  # B9: by id, once
            message = " ".join(str(e).split()) if isinstance(e, PellucidError) else "internal error"
            for ticket in set(self._running.values()):
                ticket.handles.clear()  # already cancelled by the engine
                self._drop(
                    ticket, APIError(500, f"generation failed: {message}", type="server_error")
                )
            self._running.clear()
            return
        self.metrics.steps_total += 1
        self.metrics.tokens_generated_total += len(steps)
        out: dict[Ticket, list[tuple[int, Step]]] = {}
        for step in steps:
            ticket = self._running.get(step.row)
            if ticket is None:  # cancelled in this very step's window: nobody to tell
                continue
            out.setdefault(ticket, []).append((ticket.handles[step.row], step))
            if step.finish_reason is not None:
                del self._running[step.row]
                del ticket.handles[step.row]
                ticket.live -= 1
        for ticket, items in out.items():
            ticket.post(Event("steps", items))
            if ticket.live == 0:
                ticket.state = "done"
                self.metrics.requests_active -= 1
                ticket.post(Event("done"))

    def _shutdown(self) -> None:
        """Fail every ticket still queued or running, and every job not yet run."""
        with self._cond:
            self._closing = True
            left = list(self._waiting) + list(set(self._running.values()))
            jobs = list(self._jobs)
            self._jobs.clear()
        for ticket in left:
            self._drop(ticket, APIError(503, "the server is shutting down", type="server_error"))
        for _, future, loop in jobs:
            _settle(loop, future, None, APIError(503, "the server is shutting down"))


def _run_job(
    fn: Callable[[], Any], future: asyncio.Future, loop: asyncio.AbstractEventLoop
) -> None:
    try:
        result, error = fn(), None
    except Exception as e:
        result, error = None, e
    _settle(loop, future, result, error)


def _settle(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future,
    result: Any,
    error: BaseException | None,
) -> None:
    def done() -> None:
        if future.done():  # the awaiting request was cancelled meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    with suppress(RuntimeError):  # the loop is closed
        loop.call_soon_threadsafe(done)
