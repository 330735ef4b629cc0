"""What stands in front of every route: Host allowlist, API key, body size, and the 500 catcher.

Plain ASGI middlewares, so they cover every route the app has or will have (a route added later
cannot forget its auth check; tests/test_serve_security.py iterates app.routes to hold that):

    HostGuard    400 unless the Host header is an allowed name (localhost, 127.0.0.1, [::1] and
                 the configured ones): a DNS-rebinding page cannot reach a local server through
                 its own domain (Ollama CVE-2024-28224)
    Guard        401 without `Authorization: Bearer <key>` (compared with hmac.compare_digest; the
                 allowlist is /health and the static UI pages), 413 for a body over the limit
                 (from Content-Length before reading, else as soon as the count passes it), and
                 any exception a route lets escape becomes a logged traceback and OpenAI's 500

Errors are OpenAI's JSON shape. CORS (Starlette's middleware, only when origins are configured)
sits between the two, so a browser's preflight is answered before the key is asked for.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Iterable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("pellucid")

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
# Reachable without the key: the health probe, and the UI's static pages (which then ask for it).
PUBLIC_PATHS = ("/health",)
PUBLIC_PAGES = ("/", "/explain", "/favicon.ico")
PUBLIC_PREFIXES = ("/static/",)


def safe(text: object, limit: int = 200) -> str:
    """A value fit for one log line: control characters (CR, LF, ...) escaped, length capped, so
    text from a request cannot forge a log line (CWE-117)."""
    s = str(text)
    out = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in s[:limit])
    return out + ("..." if len(s) > limit else "")


def error_json(status: int, message: str, type: str, code: str | None = None) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": type, "param": None, "code": code}}
    ).encode()


async def send_error(
    send: Send,
    status: int,
    message: str,
    type: str,
    code: str | None = None,
    headers: Iterable = (),
) -> None:
    body = error_json(status, message, type, code)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": raw + list(headers)})
    await send({"type": "http.response.body", "body": body})


def host_name(host: str) -> str:
    """The name part of a Host header: 'localhost:8000' -> 'localhost', '[::1]:80' -> '[::1]'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class HostGuard:
    """Refuse requests whose Host header names a host not on the allowlist ("*": any)."""

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str]) -> None:
        self.app = app
        self.allowed = {h.lower() for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or "*" in self.allowed:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        host = host_name(headers.get(b"host", b"").decode("latin-1"))
        if host in self.allowed:
            return await self.app(scope, receive, send)
        log.warning("refused Host header %s", safe(host))
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        await send_error(send, 400, "invalid Host header", "invalid_request_error", "invalid_host")


class _TooLarge(Exception):
    pass


def is_public(method: str, path: str) -> bool:
    """Routes open without the key: /health, and GET of the UI pages and static files."""
    if path in PUBLIC_PATHS:
        return True
    return method in ("GET", "HEAD") and (path in PUBLIC_PAGES or path.startswith(PUBLIC_PREFIXES))


def authorized(headers: dict[bytes, bytes], api_key: str) -> bool:
    """`Authorization: Bearer <key>`, exactly (case-sensitive key), in constant time."""
    got = headers.get(b"authorization", b"")
    return hmac.compare_digest(got, b"Bearer " + api_key.encode("utf-8"))


class Guard:
    """API key, body size limit, and OpenAI-shaped 500s for whatever escapes a route."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        method, path = scope.get("method", "GET"), scope.get("path", "")
        needs_key = self.api_key is not None and not is_public(method, path)
        if needs_key and not authorized(headers, self.api_key):
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            return await send_error(
                send,
                401,
                "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                "authentication_error",
                "invalid_api_key",
                [(b"www-authenticate", b"Bearer")],
            )
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return await self._too_large(send)
        await self._call(scope, receive, send)

    async def _too_large(self, send: Send) -> None:
        await send_error(
            send,
            413,
            f"the request body is larger than this server's limit of {self.max_body_bytes} bytes",
            "invalid_request_error",
            "request_too_large",
        )

    async def _call(self, scope: Scope, receive: Receive, send: Send) -> None:
        seen, started = 0, False

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:  # a chunked body with no Content-Length
                    raise _TooLarge
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _TooLarge:
            if not started:
                await self._too_large(send)
        except Exception as e:
            log.exception(
                "internal error on %s %s: %s", scope.get("method"), safe(scope.get("path")), safe(e)
            )
            if not started:
                await send_error(
                    send, 500, "internal server error (logged on the server)", "server_error"
                )


def check_cors(origins: Iterable[str], allow_credentials: bool) -> list[str]:
    """The CORS origins, refusing '*' together with credentials (any site could then act with
    the user's cookies); '*' alone is allowed but still only with the API key."""
    origins = [o.strip() for o in origins if o.strip()]
    if "*" in origins and allow_credentials:
        from pellucid.errors import ConfigError

        raise ConfigError("--cors-origin '*' cannot be combined with credentials")
    return origins


def cors_kwargs(origins: list[str], allow_credentials: bool) -> dict[str, Any]:
    return {
        "allow_origins": origins,
        "allow_credentials": allow_credentials,
        "allow_methods": ["GET", "POST", "OPTIONS"],
        "allow_headers": ["Authorization", "Content-Type"],
    }
