"""Exposure and auth (RELIABILITY D3-D6): the key guards every route but /health and the static
pages, in constant time and case-sensitively; Host allowlist; CORS off by default; logs that a
request cannot forge; a 500 in OpenAI's shape with its traceback in the log."""

import logging
import re

import pytest
from fastapi.testclient import TestClient
from serve_util import KEY, make_app, tiny_loaded

from pellucid.errors import ConfigError
from pellucid.serve import guards

PUBLIC = {("GET", "/health"), ("GET", "/"), ("GET", "/explain"), ("GET", "/static/x")}


@pytest.fixture(scope="module")
def keyed():
    app, _ = make_app(tiny_loaded(), api_key=KEY, log_prompts=True)
    with TestClient(app, base_url="http://localhost") as client:
        yield app, client


def all_routes(routes, prefix=""):
    """(method, path) of every route, including those of included routers and mounts."""
    for r in routes:
        if hasattr(r, "original_router"):  # FastAPI's included router
            extra = getattr(getattr(r, "include_context", None), "prefix", "") or ""
            yield from all_routes(r.original_router.routes, prefix + extra)
        elif hasattr(r, "methods") and r.methods:
            path = re.sub(r"\{[^}]*\}", "x", prefix + r.path)
            for m in r.methods - {"HEAD"}:
                yield m, path
        elif hasattr(r, "routes"):  # a Mount
            yield from all_routes(r.routes, prefix + r.path)
        elif hasattr(r, "path"):  # a websocket route or a plain mount
            yield "WEBSOCKET", re.sub(r"\{[^}]*\}", "x", prefix + r.path)


BAD_AUTH = [
    {},
    {"Authorization": "Bearer wrong"},
    {"Authorization": f"Bearer {KEY.lower()}"},  # case-changed
    {"Authorization": f"Bearer {KEY.upper()}"},
    {"Authorization": f"Bearer  {KEY}"},  # extra space
    {"Authorization": f"Bearer {KEY} "},
    {"Authorization": f"bearer {KEY}"},
    {"Authorization": KEY},
    {"X-API-Key": KEY},
]


def test_every_route_but_health_and_static_pages_needs_the_key(keyed):
    app, client = keyed
    routes = sorted(set(all_routes(app.routes)))
    assert ("POST", "/v1/chat/completions") in routes and ("GET", "/metrics") in routes
    assert {path for m, path in routes if m == "WEBSOCKET"} == set()  # none today; see below
    checked = 0
    for method, path in routes:
        if (method, path) in PUBLIC:
            assert client.request(method, path).status_code != 401
            continue
        for headers in BAD_AUTH:
            r = client.request(method, path, headers=headers, json={})
            assert r.status_code == 401, (method, path, headers)
            assert r.json()["error"]["type"] == "authentication_error"
            assert KEY not in r.text
        r = client.request(method, path + f"?api_key={KEY}", json={})  # not from a query string
        assert r.status_code == 401
        ok = client.request(method, path, headers={"Authorization": f"Bearer {KEY}"}, json={})
        assert ok.status_code != 401, (method, path)
        checked += 1
    assert checked >= 5
    # paths that match no route are not an oracle for what exists: 401 before 404
    assert client.get("/nope").status_code == 401
    assert client.get("/v1/../metrics").status_code in (401, 404)


def test_the_key_is_compared_in_constant_time(monkeypatch):
    calls = []
    real = guards.hmac.compare_digest
    monkeypatch.setattr(
        guards.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b)
    )
    assert guards.authorized({b"authorization": b"Bearer x"}, "y") is False
    assert calls == [(b"Bearer x", b"Bearer y")]
    assert guards.authorized({b"authorization": "Bearer ü".encode()}, "ü") is True


def test_the_key_never_reaches_logs_or_metrics_and_crlf_cannot_forge_a_line(keyed, caplog):
    _, client = keyed
    auth = {"Authorization": f"Bearer {KEY}"}
    caplog.set_level(logging.INFO, logger="pellucid")
    evil = "hi\r\nINFO forged line\nmore"
    r = client.post(
        "/v1/chat/completions",
        headers=auth,
        json={"messages": [{"role": "user", "content": evil}], "max_tokens": 2},
    )
    assert r.status_code == 200
    client.post("/v1/chat/completions", headers={"Authorization": "Bearer " + KEY[:-1]}, json={})
    client.get("/health", headers={"Host": "evil.example\r\nforged"})
    metrics = client.get("/metrics", headers=auth).text
    assert KEY not in metrics and KEY not in caplog.text
    lines = [rec.getMessage() for rec in caplog.records]
    assert any("forged line" in m for m in lines)  # --log-prompts logged it ...
    assert not any("\n" in m or "\r" in m for m in lines)  # ... on one line, escaped


def test_prompts_are_not_logged_unless_asked(caplog):
    app, _ = make_app(tiny_loaded())
    caplog.set_level(logging.INFO, logger="pellucid")
    with TestClient(app, base_url="http://localhost") as client:
        body = {"messages": [{"role": "user", "content": "my secret plan"}], "max_tokens": 2}
        assert client.post("/v1/chat/completions", json=body).status_code == 200
    assert "secret" not in caplog.text and "request" in caplog.text


# --- D6: Host header allowlist ----------------------------------------------------------------------


def test_foreign_host_headers_are_refused():
    app, _ = make_app(tiny_loaded(), allowed_hosts=("pellucid.internal",))
    with TestClient(app, base_url="http://localhost") as client:
        for host in ["attacker.example", "127.0.0.1.nip.io", "localhost.evil", ""]:
            r = client.get("/health", headers={"Host": host})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"
        for host in [
            "localhost:8000",
            "127.0.0.1:1234",
            "[::1]:80",
            "LOCALHOST",
            "pellucid.internal",
        ]:
            assert client.get("/health", headers={"Host": host}).status_code == 200, host


# --- D5: CORS ---------------------------------------------------------------------------------------


def preflight(client, origin):
    return client.options(
        "/v1/chat/completions",
        headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
    )


def test_no_cors_by_default_and_configured_origins_echoed_exactly():
    app, _ = make_app(tiny_loaded())
    with TestClient(app, base_url="http://localhost") as client:
        for origin in ["http://evil.example", "null"]:
            assert "access-control-allow-origin" not in preflight(client, origin).headers
            r = client.get("/health", headers={"Origin": origin})
            assert "access-control-allow-origin" not in r.headers
    app, _ = make_app(tiny_loaded(), api_key=KEY, cors_origins=["http://ui.example"])
    with TestClient(app, base_url="http://localhost") as client:
        r = preflight(client, "http://ui.example")  # answered before the key is asked for
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "http://ui.example"
        assert "access-control-allow-origin" not in preflight(client, "http://evil.example").headers
        assert "access-control-allow-credentials" not in r.headers


def test_wildcard_cors_with_credentials_is_a_startup_error():
    with pytest.raises(ConfigError, match="credentials"):
        guards.check_cors(["*"], allow_credentials=True)


# --- 500s -------------------------------------------------------------------------------------------


def test_an_unexpected_exception_is_a_logged_openai_500(caplog, monkeypatch):
    app, _ = make_app(tiny_loaded())
    api = app.state.api

    def broken(req):
        raise KeyError("boom")

    monkeypatch.setattr(api, "sequences", broken)
    with TestClient(app, base_url="http://localhost", raise_server_exceptions=False) as client:
        r = client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}
        )
        assert r.status_code == 500
        assert r.json()["error"]["type"] == "server_error" and "boom" not in r.text
        assert "Traceback" in caplog.text and "KeyError" in caplog.text
        assert client.get("/health").status_code == 200


def test_app_state_exposes_what_the_pages_use(keyed):
    app, _ = keyed
    s = app.state
    assert s.model_name == "tiny" and s.api_key == KEY
    assert s.loaded.tokenizer is not None and callable(s.scheduler.run_exclusive)


def test_run_exclusive_runs_between_steps_on_the_worker_thread(keyed):
    import asyncio
    import threading

    app, _ = keyed
    sched = app.state.scheduler

    async def go():
        return await sched.run_exclusive(lambda: threading.current_thread().name)

    assert asyncio.run(go()) == "pellucid-engine"

    async def fails():
        return await sched.run_exclusive(lambda: 1 / 0)

    with pytest.raises(ZeroDivisionError):
        asyncio.run(fails())
