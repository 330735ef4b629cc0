"""`pellucid serve`: the OpenAI-compatible API and the web pages, on uvicorn.

Safe by default (RELIABILITY D4-D6): it listens on 127.0.0.1 only; a non-loopback --host needs
--api-key (or --insecure-no-auth, said loudly); Host headers are checked against an allowlist;
no CORS unless --cors-origin names origins; prompts are not logged unless --log-prompts.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from pellucid.cli.common import add_model, add_quant, load
from pellucid.errors import ConfigError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from pellucid.infer.engine import Engine

WILDCARD_HOSTS = ("0.0.0.0", "::", "")
T = TypeVar("T")


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API and web UI")
    add_model(p)
    add_quant(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one, printed)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("PELLUCID_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $PELLUCID_API_KEY)",
    )
    p.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="allow a non-loopback --host without --api-key (anyone who can reach it can use it)",
    )
    p.add_argument("--served-model-name", help="the model id clients send (default: from --model)")
    p.add_argument("--max-batch", type=int, default=8, help="most sequences decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="most requests waiting (then 429)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=5.0,
        help="on SIGTERM, seconds in-flight requests may take to finish (then they are cut)",
    )
    p.add_argument("--max-body-bytes", type=int, default=8 << 20, help="request body limit (413)")
    p.add_argument("--kv-budget-mb", type=int, help="KV-cache pool memory (default: the engine's)")
    p.add_argument(
        "--cors-origin", action="append", default=[], help="allow this browser origin (repeatable)"
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        help="accept this Host header name besides localhost (repeatable; '*': any)",
    )
    p.add_argument("--log-prompts", action="store_true", help="log prompt text (off by default)")
    p.set_defaults(handler=cmd_serve)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a name: only "localhost" counts as loopback
        return False


def served_name(spec: str | None) -> str:
    """The model id clients use: the registry name, or the file/folder name of a path."""
    from pellucid.weights.resolve import DEFAULT_MODEL

    name = Path((spec or DEFAULT_MODEL).rstrip("/\\")).name
    return name.removesuffix(".gguf") or "model"


def check_exposure(args: argparse.Namespace) -> list[str]:
    """Refuse an unauthenticated non-loopback bind; return the Host names to accept."""
    for name, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if not args.request_timeout > 0:  # (NaN fails both comparisons too)
        raise ConfigError(f"--request-timeout must be > 0 seconds, got {args.request_timeout}")
    if not args.shutdown_timeout >= 0:
        raise ConfigError(f"--shutdown-timeout must be >= 0 seconds, got {args.shutdown_timeout}")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    hosts = list(args.allowed_host)
    if is_loopback(args.host):
        return hosts
    if not args.api_key and not args.insecure_no_auth:
        raise ConfigError(
            f"refusing to listen on {args.host} without --api-key: anyone who can reach it could "
            "use the model (pass --api-key KEY, or --insecure-no-auth to accept that)"
        )
    if not args.api_key:
        print(
            f"pellucid serve: WARNING: listening on {args.host} with NO API key "
            "(--insecure-no-auth): anyone who can reach this port can use the model",
            file=sys.stderr,
            flush=True,
        )
    if not hosts:  # reached by address or by names we cannot know: accept any Host
        hosts = ["*"] if args.host in WILDCARD_HOSTS else [args.host]
    return hosts


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (so --port 0 can report the port it got)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host.strip("[]"), port), family=family, backlog=2048)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def in_passing_thread(fn: Callable[[], T]) -> T:
    """fn() run in a new thread that ends with it; its result, or its exception re-raised.

    Why: OpenMP (torch's and the numba kernels' thread pools) keeps a pool for every thread
    that ever ran a parallel region, until that thread exits. Loading a model in the main thread
    leaves it one, and with two pools alive (the main thread's and the engine's worker's)
    libgomp counts more threads than cores and stops spinning between parallel regions: every
    one of the decode step's ~150 kernel launches then waits for a sleeping thread to wake, and
    one stream served at 45 tokens/s where `pellucid generate` ran at 137 (bench/RESULTS.md).
    Loading here leaves the worker the only thread with a pool.
    """
    out: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # handed to the caller's thread
            errors.append(e)

    thread = threading.Thread(target=run, name="pellucid-load", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return out[0]


def warm_up(engine: Engine) -> None:
    """One short greedy generation (a one-token prompt, two new tokens), so that the decode
    kernels are compiled (a machine's first run: about a minute) or loaded from numba's cache
    now, not in the first request's time. Leaves no sequence live and the pool empty."""
    from pellucid.infer.sampling import SamplingParams

    engine.complete([0], SamplingParams(max_new_tokens=2, temperature=0.0))


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from pellucid.infer.quant import prefer_256_bit_vectors
    from pellucid.serve.app import create_app

    prefer_256_bit_vectors()  # before any kernel is declared: the server batches
    hosts = check_exposure(args)
    budget = None if args.kv_budget_mb is None else args.kv_budget_mb << 20
    name = args.served_model_name or served_name(args.model)

    def build() -> FastAPI:
        app = create_app(
            load(args),
            model_name=name,
            api_key=args.api_key or None,
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            request_timeout_s=args.request_timeout,
            cors_origins=args.cors_origin,
            allowed_hosts=hosts,
            max_body_bytes=args.max_body_bytes,
            log_prompts=args.log_prompts,
            kv_budget_bytes=budget,
        )
        # Before listening: else the first request after an install waits ~50 s for them.
        print(
            "pellucid serve: preparing the decode kernels (compiled on a machine's first start: "
            "about a minute)",
            file=sys.stderr,
            flush=True,
        )
        warm_up(app.state.engine)
        return app

    app = in_passing_thread(build)
    sock = bind(args.host, args.port)
    port = sock.getsockname()[1]
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"pellucid serve: {name} on http://{shown}:{port} "
        f"({'API key required' if args.api_key else 'no API key'}; Ctrl-C stops)",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=args.shutdown_timeout)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
