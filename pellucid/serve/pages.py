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

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from pellucid.errors import PellucidError
from pellucid.explain.trace import explain
from pellucid.infer.sampling import SamplingParams
from pellucid.serve.schemas import APIError, bad, get_float, get_int, parse_body

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
FIELDS = ("prompt", "temperature", "top_k", "top_p", "min_p", "seed", "steps")

router = APIRouter()


def _file(name: str) -> Response:
    if name not in FILES:
        return _error(APIError(404, f"no such file: {name[:64]!r}", type="not_found_error"))
    headers = SECURITY_HEADERS | {"Cache-Control": "no-cache"}
    return FileResponse(STATIC / name, media_type=FILES[name], headers=headers)


def _error(e: APIError) -> JSONResponse:
    """An error in OpenAI's shape (schemas.APIError), with the page headers."""
    return JSONResponse(e.body(), status_code=e.status, headers=SECURITY_HEADERS | e.headers)


@router.get("/", include_in_schema=False)
def chat_page() -> Response:
    return _file("index.html")


@router.get("/explain", include_in_schema=False)
def explain_page() -> Response:
    return _file("explain.html")


@router.get("/static/{name}", include_in_schema=False)
def static_file(name: str) -> Response:
    return _file(name)


def explain_params(body: dict[str, Any]) -> tuple[str, SamplingParams, int]:
    """A /v1/explain body -> (prompt, sampling params, steps); APIError 400 naming the field.

    The fields are checked with the API's own validators (schemas.get_int / get_float) and then by
    SamplingParams itself, so the rules are the ones /v1/chat/completions applies.
    """
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise bad(f"unknown field '{unknown[0]}' (known: {', '.join(FIELDS)})", unknown[0])
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise bad("'prompt' must be a non-empty string", "prompt")
    steps = get_int(body, "steps", 0, MAX_STEPS, 0)
    params = SamplingParams(
        temperature=get_float(body, "temperature", 0.0, 100.0, 0.0),
        top_k=get_int(body, "top_k", 1, 1 << 30, None),
        top_p=get_float(body, "top_p", 0.0, 1.0, None),
        min_p=get_float(body, "min_p", 0.0, 1.0, None),
        seed=get_int(body, "seed", 0, 2**62 - 1, None),
    )
    return prompt, params, steps


def _param_of(message: str) -> str | None:
    """The field a validation message names (for OpenAI's `param`), if any."""
    for name in FIELDS:
        if name in message:
            return name
    return None


@router.post("/v1/explain")
async def explain_route(request: Request) -> Response:
    """The explain data (docs/explain.md) for the next token after `prompt`."""
    state = request.app.state
    try:
        prompt, params, steps = explain_params(parse_body(await request.body()))
        model, tokenizer = state.loaded.model, state.loaded.tokenizer
        data = await state.scheduler.run_exclusive(
            lambda: explain(model, tokenizer, prompt, params, steps=steps)
        )
    except APIError as e:
        return _error(e)
    except PellucidError as e:  # SamplingParams' checks, or a prompt over explain's limit
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        return _error(bad(message, _param_of(message)))
    return JSONResponse(data, headers=SECURITY_HEADERS)
