"""Helpers for the serve tests: a tiny chat model as a LoadedModel, an engine wrapper that slows
or breaks steps and records what it was given, and a live uvicorn server on a loopback port."""

import contextlib
import json
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

import uvicorn
from test_resolve import CFG, TEMPLATE, tiny_model, tiny_tokenizer

from pellucid.infer.engine import Engine
from pellucid.serve.app import create_app
from pellucid.tokenizer.chat import ChatTemplate
from pellucid.weights.resolve import LoadedModel

KEY = "sk-test-Secret1"


def tiny_loaded(context_len=None):
    cfg = CFG if context_len is None else replace(CFG, context_len=context_len)
    return LoadedModel(
        tiny_model(cfg), tiny_tokenizer(), ChatTemplate(TEMPLATE), Path("tiny"), "gguf"
    )


class WrappedEngine:
    """A real Engine, with an optional pause before every step, a step that raises on demand,
    and a record of every prompt added (to inspect the ids the engine receives)."""

    def __init__(self, engine, delay=0.0):
        self.engine, self.delay = engine, delay
        self.prompts, self.handles = [], []
        self.fail_at_step = None  # raise inside the step with this index (0-based)
        self.steps = 0

    def add(self, prompt, params, **kw):
        self.prompts.append(list(prompt))
        handle = self.engine.add(prompt, params, **kw)
        self.handles.append(handle)
        return handle

    def step(self):
        if self.delay:
            time.sleep(self.delay)
        i, self.steps = self.steps, self.steps + 1
        if self.fail_at_step is not None and i == self.fail_at_step:
            for h in self.handles:  # as a failed engine step does: everything cancelled
                self.engine.cancel(h)
            raise RuntimeError("injected engine failure")
        return self.engine.step()

    def __getattr__(self, name):
        return getattr(self.engine, name)


def make_app(loaded, delay=0.0, kv_budget_bytes=None, **kw):
    engine = WrappedEngine(
        Engine(loaded.model, loaded.tokenizer, kv_budget_bytes=kv_budget_bytes), delay
    )
    kw.setdefault("model_name", "tiny")
    return create_app(loaded, engine=engine, **kw), engine


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a background thread."""

    def __init__(self, app, sndbuf=None):
        self.sock = socket.create_server(("127.0.0.1", 0))
        if sndbuf:  # accepted connections inherit it (and lose the kernel's autotuning)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(20)
        self.sock.close()


def wait_for(predicate, timeout=5.0, what="condition"):
    """Poll `predicate` until it is true; fail after `timeout` seconds (never a blind sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def sse_events(text: str, *, complete: bool = True) -> list[dict]:
    """The JSON objects of an SSE body's `data:` events, in order.

    complete: the body must end with `data: [DONE]` and every event parse; else (a stream cut off
    on purpose) the [DONE] may be missing and a last event broken off mid-JSON is left out.
    """
    events = [e[len("data: ") :] for e in text.split("\n\n") if e.startswith("data: ")]
    if complete:
        assert events and events[-1] == "[DONE]", text[-300:]
        return [json.loads(e) for e in events[:-1]]
    out = []
    for e in events:
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(e))
    return [e for e in out if isinstance(e, dict)]
