"""Where the server's threads run and how the worker wakes the event loop (serve/scheduler.py):
the event loop and the engine's worker each kept to a CPU of their own (pin_threads, the CLI's
default), and one event-loop wake-up per step for every ticket."""

import os
import threading

import httpx
import pytest
from serve_util import LiveServer, make_app, tiny_loaded, wait_for

from pellucid.infer.sequence import Step
from pellucid.serve.scheduler import Event, Scheduler, Ticket, cpu_plan, post_all

can_pin = hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2
needs_two_cpus = pytest.mark.skipif(not can_pin, reason="needs sched_setaffinity and 2+ CPUs")


def test_cpu_plan_gives_the_worker_the_first_cpu_and_the_loop_the_last():
    assert cpu_plan({0, 1}) == (0, 1)
    assert cpu_plan({7, 2, 5}) == (2, 7)
    assert cpu_plan({3}) is None  # one CPU: nothing to separate


class FakeLoop:
    """Records call_soon_threadsafe calls (each one is a wake-up of a real loop)."""

    def __init__(self):
        self.calls = []

    def call_soon_threadsafe(self, fn, *args):
        self.calls.append((fn, args))


def test_a_steps_events_wake_each_event_loop_once():
    loop, other = FakeLoop(), FakeLoop()
    tickets = [Ticket(i, [], loop, 0.0) for i in range(3)] + [Ticket(3, [], other, 0.0)]
    step = Step(row=0, id=5, logprob=-0.1, text="a", top=[])
    events = [(t, Event("steps", [(0, step)])) for t in tickets] + [(tickets[0], Event("done"))]
    post_all(events)
    assert len(loop.calls) == 1 and len(other.calls) == 1  # not one per ticket or event
    for fake in (loop, other):
        fn, args = fake.calls[0]
        fn(*args)
    got = [[t.queue.get_nowait().kind for _ in range(t.queue.qsize())] for t in tickets]
    assert got == [["steps", "done"], ["steps"], ["steps"], ["steps"]]


def affinity(tid):
    return os.sched_getaffinity(tid)


@needs_two_cpus
def test_pinned_server_runs_the_event_loop_and_the_worker_on_cpus_of_their_own():
    first, last = cpu_plan(os.sched_getaffinity(0))
    app, _ = make_app(tiny_loaded(), pin_threads=True)
    earlier = {t.ident for t in threading.enumerate()}  # (other tests' threads: not this loop's)
    with LiveServer(app) as server:
        loop_tid = server.thread.native_id
        r = httpx.post(
            server.url + "/v1/completions",
            json={"model": "tiny", "prompt": "hello", "max_tokens": 4},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        worker = app.state.scheduler._thread
        wait_for(lambda: affinity(worker.native_id) == {first}, what="the worker pinned")
        assert affinity(loop_tid) == {last}
        # threads the event loop starts later (asyncio.to_thread's) share its CPU, not the worker's
        helpers = {
            t.native_id
            for t in threading.enumerate()
            if t.name.startswith("asyncio_") and t.ident not in earlier
        }
        assert helpers and all(affinity(tid) == {last} for tid in helpers)


@needs_two_cpus
def test_close_gives_the_event_loop_thread_its_cpus_back():
    class Idle:  # an engine with nothing to run: the worker only waits
        n_live = 0

    before = os.sched_getaffinity(0)
    scheduler = Scheduler(Idle(), pin_threads=True)
    try:
        scheduler.start()  # this thread plays the event loop's
        assert os.sched_getaffinity(0) == {max(before)}
        assert affinity(scheduler._thread.native_id) == before  # not pinned before a step
        scheduler.close()
        assert os.sched_getaffinity(0) == before and not scheduler._thread.is_alive()
    finally:
        scheduler.close()
        os.sched_setaffinity(0, before)  # whatever happened, the next tests run as before


def test_without_pinning_no_thread_is_restricted():
    class Idle:
        n_live = 0

    before = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    scheduler = Scheduler(Idle())
    scheduler.start()
    try:
        if before is not None:
            assert os.sched_getaffinity(0) == before
            assert affinity(scheduler._thread.native_id) == before
    finally:
        scheduler.close()
