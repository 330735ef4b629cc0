"""`pellucid serve` as a process: safe exposure defaults (RELIABILITY D4), --port 0, and a graceful
SIGTERM (B10), on a tiny random model saved as GGUF."""

import argparse
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

import httpx
import psutil
import pytest
from serve_util import sse_events
from test_resolve import CFG, TEMPLATE, tiny_model, tiny_tokenizer

from pellucid.cli import main
from pellucid.cli.serve import check_exposure, is_loopback, served_name
from pellucid.errors import ConfigError
from pellucid.weights.gguf import save_gguf


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    cfg = replace(CFG, context_len=1024)
    path = tmp_path_factory.mktemp("serve") / "tiny.gguf"
    return save_gguf(tiny_model(cfg), path, tokenizer=tiny_tokenizer(), chat_template=TEMPLATE)


def serve_args(**kw):
    base = {
        "host": "127.0.0.1",
        "port": 8000,
        "api_key": None,
        "insecure_no_auth": False,
        "allowed_host": [],
        "max_batch": 8,
        "max_queue": 64,
        "request_timeout": 600.0,
        "shutdown_timeout": 5.0,
    }
    return argparse.Namespace(**{**base, **kw})


def test_a_non_loopback_bind_without_a_key_refuses_to_start(gguf_path, capsys):
    code = main(["serve", "--model", str(gguf_path), "--host", "0.0.0.0", "--port", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "refusing to listen on 0.0.0.0 without --api-key" in err and err.count("\n") == 1


def test_insecure_no_auth_warns_loudly_and_a_key_allows_the_bind(capsys):
    hosts = check_exposure(serve_args(host="0.0.0.0", insecure_no_auth=True))
    assert "WARNING" in capsys.readouterr().err and hosts == ["*"]
    assert check_exposure(serve_args(host="10.1.2.3", api_key="k")) == ["10.1.2.3"]
    assert check_exposure(serve_args(host="0.0.0.0", api_key="k", allowed_host=["a.b"])) == ["a.b"]
    assert check_exposure(serve_args()) == []
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.com")
    assert served_name(None) == "smollm2-135m-instruct" and served_name("a/b/tiny.gguf") == "tiny"


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("max_batch", 0),
        ("max_queue", 0),
        ("request_timeout", 0.0),
        ("request_timeout", math.nan),
        ("shutdown_timeout", -1.0),
        ("shutdown_timeout", math.nan),
        ("port", 70000),
    ],
)
def test_bad_serve_flags_are_one_line_errors_naming_the_flag(flag, value):
    with pytest.raises(ConfigError, match="--" + flag.replace("_", "-")):
        check_exposure(serve_args(**{flag: value}))


def start(gguf_path, *extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pellucid",
            "serve",
            "--model",
            str(gguf_path),
            "--port",
            "0",
            "--quant",
            "fp32",
            *extra,
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    # (a first start compiles the decode kernels before it announces the port: ~50 s on 2 cores)
    deadline = time.monotonic() + 300
    for line in proc.stderr:  # the line that names the port it got
        m = re.search(r"on http://127\.0\.0\.1:(\d+) ", line)
        if m:
            port = int(m.group(1))
            break
        assert time.monotonic() < deadline
    else:
        raise AssertionError(f"no port line; exit {proc.wait()}")
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, port, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)


def wait_for_refusal(url: str, timeout: float = 5.0) -> None:
    """Poll with new connections until the server refuses them or answers 503."""
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    deadline = time.monotonic() + timeout
    while True:
        try:
            with httpx.Client(timeout=2) as fresh:  # a new connection each time
                if fresh.post(url + "/v1/chat/completions", json=body).status_code == 503:
                    return
        except httpx.TransportError:
            return
        assert time.monotonic() < deadline, "new requests were still served after SIGTERM"
        time.sleep(0.05)


def finish_reasons(body: str) -> list:
    """The finish_reason of every whole chunk of an SSE body (a cut-off last one is skipped)."""
    chunks = sse_events(body, complete=False)
    return [c.get("finish_reason") for chunk in chunks for c in chunk.get("choices", [])]


def long_streams(
    url: str, n: int, results: list, max_tokens: int | None = 400
) -> list[threading.Thread]:
    """n streaming chat requests of max_tokens tokens (None: the rest of the context), started in
    threads; (status, body) into results."""

    def one() -> None:
        body = {
            "messages": [{"role": "user", "content": "Paris"}],
            "ignore_eos": True,
            "stream": True,
        }
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
                results.append((r.status_code, "".join(r.iter_text())))
        except httpx.TransportError as e:  # cut off mid-stream (a shutdown with no grace)
            results.append((None, str(e)))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while httpx.get(url + "/health").json()["requests_active"] < n:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return threads


@pytest.mark.slow
def test_sigterm_with_no_grace_cuts_in_flight_requests_and_exits_fast(gguf_path):
    proc, _, url = start(gguf_path, "--shutdown-timeout", "0")
    try:
        results = []
        # The whole context (~1,000 tokens): since the served engine runs at generate's speed,
        # a 400-token stream could end between both being active and the signal (a CI flake).
        threads = long_streams(url, 2, results, max_tokens=None)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(10)
        assert time.monotonic() - t0 < 4 and code in (0, -signal.SIGTERM)  # B10, T=0
        for t in threads:
            t.join(10)
        assert len(results) == 2
        # Cut, not finished: the stream breaks off, or (when the scheduler's shutdown reaches it
        # first) ends with a 503 error event and [DONE]; no choice ever gets a finish_reason.
        for _, body in results:
            assert not any(finish_reasons(body)), body[-300:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_port_0_loopback_only_and_sigterm_lets_in_flight_requests_finish(gguf_path):
    proc, _, url = start(gguf_path)
    try:
        listening = [
            c.laddr
            for c in psutil.Process(proc.pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        ]
        assert listening and all(a.ip == "127.0.0.1" for a in listening)  # D4: loopback only
        results = []
        threads = long_streams(url, 4, results)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # B10: while the four finish, a new request finds the door closed (or a 503)
        wait_for_refusal(url)
        assert len(results) < 4  # (it was refused before the in-flight ones were done)
        for t in threads:
            t.join(30)
        code = proc.wait(15)
        assert time.monotonic() - t0 < 10 and code in (0, -signal.SIGTERM)
        assert len(results) == 4
        for status, text in results:  # B10: in-flight requests completed
            assert status == 200
            chunks = sse_events(text)  # (which must end with [DONE])
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        with pytest.raises(httpx.TransportError):  # and the port is closed
            httpx.get(url + "/health", timeout=2)
        assert not psutil.pid_exists(proc.pid) or proc.poll() is not None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_loads_the_model_in_a_thread_that_ends_before_serving(gguf_path, monkeypatch):
    """A thread that ran OpenMP work keeps its thread pool, and a second pool beside the engine
    worker's made one served stream decode 3x slower than `pellucid generate` (45 vs 137
    tokens/s): the main thread must not load the model (or run any of it) itself."""
    import uvicorn

    import pellucid.cli.serve as cli_serve

    loaders = []
    real_load = cli_serve.load
    monkeypatch.setattr(
        cli_serve,
        "load",
        lambda args: loaders.append(threading.current_thread()) or real_load(args),
    )
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: None)
    assert main(["serve", "--model", str(gguf_path), "--port", "0"]) == 0
    assert len(loaders) == 1
    assert loaders[0] is not threading.main_thread() and not loaders[0].is_alive()


def test_serve_warms_the_engine_up_before_it_listens(gguf_path, monkeypatch, capsys):
    """A first start after an install compiles the decode kernels (~50 s on 2 cores): that must
    happen before the port is announced, not in the first request's time."""
    import uvicorn

    import pellucid.cli.serve as cli_serve

    order = []
    real = cli_serve.warm_up
    monkeypatch.setattr(cli_serve, "warm_up", lambda engine: order.append("warm") or real(engine))
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: order.append("listen"))
    assert main(["serve", "--model", str(gguf_path), "--port", "0"]) == 0
    assert order == ["warm", "listen"]
    err = capsys.readouterr().err
    assert err.index("preparing the decode kernels") < err.index("on http://")


def test_warm_up_runs_a_prefill_and_a_decode_step_and_leaves_the_engine_idle():
    from serve_util import tiny_loaded

    from pellucid.cli.serve import warm_up
    from pellucid.infer.engine import Engine

    engine = Engine(tiny_loaded().model)
    warm_up(engine)
    assert engine.last_step.decode_tokens == 1  # its last step decoded (the first prefilled)
    assert engine.n_live == 0 and engine.kv_bytes_used == 0


def test_a_failed_load_is_the_same_one_line_error_from_the_loading_thread(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    assert main(["serve", "--model", str(bad), "--port", "0"]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "bad.gguf" in err


def test_the_ranking_page_listens_on_loopback_only(tmp_path, monkeypatch):
    """`pellucid rank` serves the page with no key, so it must never leave 127.0.0.1: it binds
    there and has no --host flag to say otherwise (issue 16 item 8)."""
    import uvicorn
    from serve_util import tiny_loaded

    import pellucid.cli.serve as cli_serve
    from pellucid.align.store import Store
    from pellucid.cli.rank import serve_page

    hosts, real_bind = [], cli_serve.bind
    monkeypatch.setattr(
        cli_serve, "bind", lambda host, port: hosts.append(host) or real_bind(host, port)
    )
    served = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: served.extend(sockets))
    store = Store(tmp_path / "s.sqlite")
    try:
        model = store.add_model("tiny", {})
        assert (
            serve_page(
                argparse.Namespace(model="tiny", port=0), tiny_loaded(), store, model, "tiny", "ada"
            )
            == 0
        )
    finally:
        store.close()
    assert hosts == ["127.0.0.1"] and served[0].getsockname()[0] == "127.0.0.1"
    served[0].close()
    with pytest.raises(SystemExit):
        main(["rank", "--prompts", "p.jsonl", "--db", "d.sqlite", "--host", "0.0.0.0"])
