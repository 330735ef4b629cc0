"""The OpenAI-compatible HTTP API over the one Engine: FastAPI routes, streaming, disconnects.

    app = create_app(loaded, model_name="smollm2-135m-instruct", api_key="sk-...")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: POST /v1/chat/completions and /v1/completions (streamed as server-sent events or not),
GET /v1/models, GET /health (no key), GET /metrics, and the web pages (pages.py). A request is
read (size-limited by guards.Guard), validated into prompt ids and SamplingParams (schemas.py,
every failure a 4xx in OpenAI's shape; tokenization runs off the event loop), queued for the
Scheduler's worker thread, and its Steps come back as OpenAI objects (responses.py).

A client that goes away is noticed by a task listening for the ASGI `http.disconnect` (while the
request waits in the queue, while it is generated, streamed or not): its sequences are cancelled
before the next engine step, which frees their slots and KV memory. A streaming client that stops
reading is cut off after `send_timeout_s` (B8), so its buffer cannot grow without bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import Receive, Scope, Send

from pellucid.errors import PellucidError
from pellucid.infer.conversation import stop_token_ids
from pellucid.infer.engine import Engine
from pellucid.serve.guards import LOOPBACK_HOSTS, Guard, HostGuard, check_cors, cors_kwargs, safe
from pellucid.serve.responses import Formatter, sse
from pellucid.serve.scheduler import Event, Scheduler, Ticket
from pellucid.serve.schemas import (
    APIError,
    GenRequest,
    Limits,
    bad,
    choice_params,
    encode_chat,
    fit_max_tokens,
    parse_body,
    parse_chat,
    parse_completion,
    too_long,
)

if TYPE_CHECKING:
    from pellucid.weights.resolve import LoadedModel

log = logging.getLogger("pellucid")


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class EventStream(Response):
    """Server-sent events from an async iterator of strings, with a send timeout: a client that
    does not read for `send_timeout_s` is dropped (`on_close` runs whatever happens)."""

    media_type = "text/event-stream"

    def __init__(
        self, chunks: AsyncIterator[str], on_close: Callable[[], None], send_timeout_s: float
    ) -> None:
        super().__init__(
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
            media_type=self.media_type,
        )
        self.chunks, self.on_close, self.send_timeout_s = chunks, on_close, send_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            async for chunk in self.chunks:
                message = {"type": "http.response.body", "body": chunk.encode(), "more_body": True}
                await asyncio.wait_for(send(message), self.send_timeout_s)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (TimeoutError, asyncio.TimeoutError):
            log.warning(
                "dropped a streaming client that stopped reading (%gs)", self.send_timeout_s
            )
        finally:
            self.on_close()


def create_app(
    loaded: LoadedModel,
    *,
    model_name: str,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    request_timeout_s: float = 600.0,
    send_timeout_s: float = 30.0,
    cors_origins: tuple[str, ...] | list[str] = (),
    allowed_hosts: tuple[str, ...] | list[str] = (),
    max_body_bytes: int = 8 << 20,
    log_prompts: bool = False,
    limits: Limits | None = None,
    engine: Any = None,
    kv_budget_bytes: int | None = None,
) -> FastAPI:
    """The API app for one loaded model.

    api_key: None serves without a key (the CLI allows that only on loopback). allowed_hosts:
    Host header names accepted besides localhost / 127.0.0.1 / [::1] ("*": any). cors_origins:
    none by default (no cross-origin browser access). engine: a prebuilt Engine (tests wrap one);
    by default one over loaded.model with kv_budget_bytes of KV pool.
    """
    if loaded.tokenizer is None:
        from pellucid.errors import ConfigError

        raise ConfigError("serve needs a model with a tokenizer")
    if engine is None:
        engine = Engine(loaded.model, loaded.tokenizer, kv_budget_bytes=kv_budget_bytes)
    scheduler = Scheduler(
        engine, max_batch=max_batch, max_queue=max_queue, request_timeout_s=request_timeout_s
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.close)

    app = FastAPI(
        title="pellucid", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    app.state.loaded, app.state.model_name, app.state.api_key = loaded, model_name, api_key
    app.state.scheduler, app.state.engine = scheduler, engine
    api = _API(loaded, model_name, scheduler, limits or Limits(), send_timeout_s, log_prompts)
    app.state.api = api

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(APIError(e.status_code, str(e.detail), type=kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(bad(f"invalid request: {safe(e.errors(), 300)}"))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await api.generate(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await api.generate(request, "completion")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [api.model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:
        api.check_model(model)
        return api.model_card()

    @app.get("/health")
    async def health() -> Response:
        alive = scheduler.alive
        body = {
            "status": "ok" if alive else "unavailable: the engine worker has stopped",
            "model": model_name,
            "sequences_active": scheduler.sequences_active,
            "requests_active": scheduler.metrics.requests_active,
            "queue_length": scheduler.queue_length,
        }
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics() -> dict:
        return {
            **asdict(scheduler.metrics),
            "sequences_active": scheduler.sequences_active,
            "queue_length": scheduler.queue_length,
            "kv_bytes_used": getattr(engine, "kv_bytes_used", 0),
            "kv_bytes_budget": getattr(engine, "kv_bytes_budget", 0),
        }

    _include_pages(app)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    origins = check_cors(cors_origins, allow_credentials=False)
    if origins:
        app.add_middleware(CORSMiddleware, **cors_kwargs(origins, allow_credentials=False))
    app.add_middleware(HostGuard, allowed_hosts=[*LOOPBACK_HOSTS, *allowed_hosts])
    return app


def _include_pages(app: FastAPI) -> None:
    """The web UI (pages.py, built separately) when it is there."""
    try:
        from pellucid.serve.pages import router as pages_router
    except ImportError:  # the API works without the pages
        return
    app.include_router(pages_router)


class _API:
    """The generation routes' logic, shared by chat and completions."""

    def __init__(
        self,
        loaded: LoadedModel,
        model_name: str,
        scheduler: Scheduler,
        limits: Limits,
        send_timeout_s: float,
        log_prompts: bool,
    ) -> None:
        self.loaded, self.model_name, self.scheduler, self.limits = (
            loaded,
            model_name,
            scheduler,
            limits,
        )
        self.tokenizer = loaded.tokenizer
        self.template = loaded.chat_template()
        self.stop_ids = stop_token_ids(self.tokenizer)
        self.n_ctx = loaded.model.cfg.context_len
        self.vocab_size = loaded.model.cfg.vocab_size
        self.send_timeout_s, self.log_prompts = send_timeout_s, log_prompts
        self.created = int(time.time())

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "pellucid",
            "max_model_len": self.n_ctx,
        }

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(
                404,
                f"The model '{name[:100]}' does not exist; this server serves '{self.model_name}'",
                param="model",
                code="model_not_found",
            )

    def sequences(self, req: GenRequest) -> tuple[list[tuple[list[int], Any]], int]:
        """The request's (prompt ids, params) per choice, prompt-major, and its prompt tokens.
        Runs in a worker thread: tokenizing a long prompt must not stall the event loop."""
        if req.kind == "chat":
            prompts = [encode_chat(self.template, self.tokenizer, req.messages, self.n_ctx)]
            what = "messages"
        else:
            prompts, what = [], "prompt"
            for p in req.prompts:
                if isinstance(p, str):
                    too_long(p, self.tokenizer, self.n_ctx, what)
                    p = self.tokenizer.encode(p)  # special-token text stays plain text
                prompts.append(p)
        seqs = []
        for ids in prompts:
            if not ids:
                raise bad(f"the {what} is empty: give at least one token", what)
            room = fit_max_tokens(
                len(ids), req.max_tokens, self.n_ctx, what, req.default_max_tokens
            )
            seqs += [(ids, choice_params(req.params, room, j)) for j in range(req.n)]
        return seqs, sum(map(len, prompts))

    async def generate(self, request: Request, kind: str) -> Response:
        started = time.perf_counter()
        body = parse_body(await request.body())
        if kind == "chat":
            req = parse_chat(body, self.limits, self.stop_ids)
        else:
            req = parse_completion(body, self.limits, self.stop_ids, self.vocab_size)
        self.check_model(req.model)
        try:
            seqs, prompt_tokens = await asyncio.to_thread(self.sequences, req)
        except PellucidError as e:  # the tokenizer's or template's own one-line errors
            raise bad(" ".join(str(e).split())) from None
        ticket = self.scheduler.submit(seqs)
        fmt = Formatter(
            kind,
            self.model_name,
            self.tokenizer,
            n_choices=len(seqs),
            prompt_tokens=prompt_tokens,
            logprobs=req.logprobs,
            stop_ids=self.stop_ids,
            include_usage=req.include_usage,
        )
        if self.log_prompts:
            log.info("request %d prompt: %s", ticket.id, safe(req.messages or req.prompts, 2000))
        watcher = asyncio.create_task(self._watch(request, ticket))
        done = False

        def close() -> None:
            watcher.cancel()
            if not done:
                self.scheduler.cancel(ticket)
            log.info(
                "request %d %s: %d prompt + %d completion tokens in %.2fs%s",
                ticket.id,
                kind,
                prompt_tokens,
                fmt.usage()["completion_tokens"],
                time.perf_counter() - started,
                "" if done else " (ended early)",
            )

        try:
            first = await ticket.queue.get()  # the first tokens (after queueing and prefill)
        except BaseException:
            close()
            raise
        if first.kind != "steps":
            close()
            if first.error is not None:
                return error_response(first.error)
            return Response(status_code=499)  # the client is gone; nobody reads this

        async def events() -> AsyncIterator[Event]:
            nonlocal done
            yield first
            async for event in ticket.events():
                yield event
            done = True

        if req.stream:
            return EventStream(self._chunks(fmt, events()), close, self.send_timeout_s)
        try:
            async for event in events():
                if event.kind == "error":
                    return error_response(event.error)
                if event.kind == "cancelled":
                    return Response(status_code=499)
                for j, step in event.steps:
                    fmt.add(j, step)
            done = True
            return JSONResponse(fmt.response())
        finally:
            close()

    async def _chunks(self, fmt: Formatter, events: AsyncIterator[Event]) -> AsyncIterator[str]:
        for chunk in fmt.first_chunks():
            yield sse(chunk)
        async for event in events:
            if event.kind == "cancelled":
                return
            if event.kind == "error":  # mid-stream (B9): an error event, then the end marker
                yield sse(event.error.body())
                break
            for j, step in event.steps:
                for chunk in fmt.step_chunks(j, step):
                    yield sse(chunk)
        else:
            if fmt.include_usage:
                yield sse(fmt.usage_chunk())
        yield sse("[DONE]")

    async def _watch(self, request: Request, ticket: Ticket) -> None:
        """Wait for the client to go away; then cancel its ticket and wake its reader."""
        with suppress(asyncio.CancelledError):
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    break
            if ticket.state != "done":
                self.scheduler.cancel(ticket)
                ticket.queue.put_nowait(Event("cancelled"))
