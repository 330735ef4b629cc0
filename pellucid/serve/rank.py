"""The ranking page at `/rank` and its API, mounted on the serve app by `pellucid rank`.

    GET  /rank                  the page (static/rank.html + rank.js; same CSP as the other pages)
    GET  /v1/rank/next?ranker=  the next prompt this ranker has not ranked, with its K replies
    POST /v1/rank               {"ranker", "prompt_id", "order": [[id, ...], ...]}  best first,
                                ids in one inner list tie; or {"ranker", "prompt_id", "skip": true}
    POST /v1/rank/undo          {"ranker"}: delete that ranker's latest ranking

Each POST is one committed transaction of the store (align/store.py) before it answers, so
closing the tab, or killing the server, loses nothing that the page reported saved. The replies
come back as JSON strings and the page puts them into the DOM as text only (never as HTML), under
the Content-Security-Policy of pages.py: a `<script>` a model wrote stays a string on screen.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from pellucid.align.rank import ranks_from_groups
from pellucid.align.store import Store, ranker_kind
from pellucid.errors import DataError
from pellucid.serve.pages import SECURITY_HEADERS, _file
from pellucid.serve.schemas import bad, parse_body

router = APIRouter()
T = TypeVar("T")


@dataclass
class RankState:
    """What the routes rank: the replies `model_id` gave, stored in `store`."""

    store: Store
    model_id: int
    model: str  # the model spec, shown on the page
    ranker: str  # the default ranker's name (the page lets a person change it)


def mount_rank(app: FastAPI, state: RankState) -> None:
    """Serve the ranking page and its API on `app` (the serve app of create_app, whose handler
    answers an APIError in OpenAI's shape). The store's DataErrors (a ranking it refuses) are
    the client's fault: 400 (`_store`)."""
    app.state.rank = state
    app.include_router(router)


async def _store(fn: Callable[..., T], *args: Any) -> T:
    """A store call, off the event loop (a commit waits for the disk); a DataError (a ranking
    the store refuses) becomes a 400 naming what was wrong."""
    try:
        return await asyncio.to_thread(fn, *args)
    except DataError as e:
        raise bad(str(e)) from None


def _ok(body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body, headers=SECURITY_HEADERS)


def _int(body: dict[str, Any], name: str) -> int:
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"'{name}' must be an integer", name)
    return value


def _ranker(value: object, default: str) -> str:
    """A person's name (the default when none is given); `oracle:` and `import:` are reserved
    for the programs and files they label, so a page cannot pass a person off as an oracle."""
    ranker = value or default
    if not isinstance(ranker, str):
        raise bad("'ranker' must be a string (your name)", "ranker")
    try:
        kind = ranker_kind(ranker)
    except DataError as e:
        raise bad(str(e), "ranker") from None
    if kind != "person":
        raise bad(f"ranker names starting with '{kind}:' are reserved", "ranker")
    return ranker


def _order(body: dict[str, Any]) -> list[list[int]]:
    order = body.get("order")
    if not isinstance(order, list) or not all(
        isinstance(g, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in g)
        for g in order
    ):
        raise bad("'order' must be a list of lists of reply ids (best first)", "order")
    return order


@router.get("/rank", include_in_schema=False)
def rank_page() -> Response:
    return _file("rank.html")


@router.get("/v1/rank/next")
async def next_prompt(request: Request, ranker: str | None = None) -> Response:
    """The next prompt to rank, its replies, how many are left; {"prompt": null} when done."""
    state: RankState = request.app.state.rank
    name = _ranker(ranker, state.ranker)
    prompt, left = await _store(state.store.next_prompt, name, state.model_id)
    body: dict[str, Any] = {"model": state.model, "ranker": name, "remaining": left}
    if prompt is None:
        return _ok(body | {"prompt": None, "responses": []})
    replies = await _store(state.store.responses, prompt.id, state.model_id)
    body["prompt"] = {"id": prompt.id, "text": prompt.text}
    body["responses"] = [{"id": r.id, "text": r.text} for r in replies]
    return _ok(body)


@router.post("/v1/rank")
async def save(request: Request) -> Response:
    """Save one ranking (or a skip) and answer with its id once it is committed."""
    state: RankState = request.app.state.rank
    body = parse_body(await request.body())
    ranker, prompt_id = _ranker(body.get("ranker"), state.ranker), _int(body, "prompt_id")
    try:
        ranks = None if body.get("skip") is True else ranks_from_groups(_order(body))
    except DataError as e:  # a reply placed twice
        raise bad(str(e), "order") from None
    ranking_id = await _store(state.store.save_ranking, prompt_id, state.model_id, ranker, ranks)
    return _ok({"ranking_id": ranking_id, "skipped": ranks is None})


@router.post("/v1/rank/undo")
async def undo(request: Request) -> Response:
    """Take back the ranker's latest ranking; {"undone": its id, or null if there was none}."""
    state: RankState = request.app.state.rank
    ranker = _ranker(parse_body(await request.body()).get("ranker"), state.ranker)
    return _ok({"undone": await _store(state.store.undo, ranker)})
