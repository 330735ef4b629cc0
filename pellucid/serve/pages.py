"""The browser pages: the chat UI at `/`, the explain page at `/explain`, and `POST /v1/explain`.

The pages are plain files in `static/` (HTML, CSS and JS, no build step, nothing fetched from
elsewhere). Every response here carries a Content-Security-Policy that allows scripts only from
this server's own files, so even if model text ever reached the DOM as HTML, an inline
`<script>` or `onerror=` in it would not run. The pages themselves never insert model text as
HTML: they build elements and set `textContent`.

`/v1/explain` returns exactly the JSON `pellucid explain --json` prints: the one producer,
`pellucid.explain.trace.explain`, run on the engine's worker thread between decode steps
(`scheduler.run_exclusive`), so it never runs a forward pass on the model at the same time as the
batched decode does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from pellucid.errors import ConfigError, PellucidError
from pellucid.explain.trace import explain
from pellucid.infer.sampling import SamplingParams

STATIC = Path(__file__).parent / "static"
# The files the pages may load: a fixed allowlist read once, so a request can only name one of
# these (no path is ever built from the URL, so '..' or an encoded slash cannot escape, D2).
_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}
FILES = {p.name: _TYPES[p.suffix] for p in STATIC.iterdir() if p.suffix in _TYPES}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; object-src 'none'; frame-ancestors 'none'; "
        "base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
MAX_STEPS = 32  # generated steps one /v1/explain request may ask for (each is a decode step)

router = APIRouter()


def _file(name: str) -> Response:
    if name not in FILES:
        return _error(404, f"no such file: {name[:64]!r}", "name", "invalid_request_error")
    headers = SECURITY_HEADERS | {"Cache-Control": "no-cache"}
    return FileResponse(STATIC / name, media_type=FILES[name], headers=headers)


def _error(status: int, message: str, param: str | None, kind: str) -> JSONResponse:
    """An error in OpenAI's shape, with the page headers."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=SECURITY_HEADERS)


@router.get("/", include_in_schema=False)
def chat_page() -> Response:
    return _file("index.html")


@router.get("/explain", include_in_schema=False)
def explain_page() -> Response:
    return _file("explain.html")


@router.get("/static/{name}", include_in_schema=False)
def static_file(name: str) -> Response:
    return _file(name)


def explain_params(body: Any) -> tuple[str, SamplingParams, int]:
    """A /v1/explain body -> (prompt, sampling params, steps), or PellucidError naming the field.

    Checked by hand rather than by a pydantic model so that "0.5" is not silently a float and the
    message names the field the way the rest of the API's 400s do.
    """
    if not isinstance(body, dict):
        raise ConfigError("the body must be a JSON object")
    known = {"prompt", "temperature", "top_k", "top_p", "min_p", "seed", "steps"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise ConfigError(f"unknown field '{unknown[0]}' (known: {', '.join(sorted(known))})")
    prompt, steps = body.get("prompt"), body.get("steps", 0)
    if not isinstance(prompt, str) or not prompt:
        raise ConfigError("prompt must be a non-empty string")
    if not (isinstance(steps, int) and not isinstance(steps, bool) and 0 <= steps <= MAX_STEPS):
        raise ConfigError(f"steps must be an integer in [0, {MAX_STEPS}], got {steps!r}")
    temperature = body.get("temperature", 0.0)
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        temperature = float(temperature)  # SamplingParams checks the range
    if isinstance(temperature, float) and math.isinf(temperature):
        raise ConfigError("temperature must be finite")
    fields = {k: body.get(k) for k in ("top_k", "top_p", "min_p", "seed")}
    return prompt, SamplingParams(temperature=temperature, **fields), steps


def _param_of(message: str) -> str | None:
    """The field a validation message names (for OpenAI's `param`), if any."""
    for name in ("prompt", "temperature", "top_k", "top_p", "min_p", "seed", "steps"):
        if name in message:
            return name
    return None


@router.post("/v1/explain")
async def explain_route(request: Request) -> Response:
    """The explain data (docs/explain.md) for the next token after `prompt`."""
    try:
        body = json.loads(await request.body() or b"null")
    except (ValueError, UnicodeDecodeError):
        return _error(400, "the body is not valid JSON", None, "invalid_request_error")
    state = request.app.state
    try:
        prompt, params, steps = explain_params(body)
        model, tokenizer = state.loaded.model, state.loaded.tokenizer
        if tokenizer is None:
            raise PellucidError(f"model '{state.model_name}' has no tokenizer")
        data = await state.scheduler.run_exclusive(
            lambda: explain(model, tokenizer, prompt, params, steps=steps)
        )
    except PellucidError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return _error(400, msg, _param_of(msg), "invalid_request_error")
    return JSONResponse(data, headers=SECURITY_HEADERS)
