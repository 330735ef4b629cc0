"""`pellucid serve` as a process: safe exposure defaults (RELIABILITY D4), --port 0, and a graceful
SIGTERM (B10), on a tiny random model saved as GGUF."""

import argparse
import json
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
from test_resolve import CFG, TEMPLATE, tiny_model, tiny_tokenizer

from pellucid.cli import main
from pellucid.cli.serve import check_exposure, is_loopback, served_name
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
    deadline = time.monotonic() + 60
    for line in proc.stderr:  # the first line names the port it got
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

        def one():
            body = {
                "messages": [{"role": "user", "content": "Paris"}],
                "max_tokens": 400,
                "ignore_eos": True,
                "stream": True,
            }
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
                results.append((r.status_code, "".join(r.iter_text())))

        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health").json()["requests_active"] < 4:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        code = proc.wait(15)
        assert time.monotonic() - t0 < 10 and code in (0, -signal.SIGTERM)
        assert len(results) == 4
        for status, text in results:  # B10: in-flight requests completed
            assert status == 200 and text.rstrip().endswith("data: [DONE]")
            chunks = [json.loads(x[6:]) for x in text.split("\n\n") if x.startswith("data: {")]
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        with pytest.raises(httpx.TransportError):  # and the port is closed
            httpx.get(url + "/health", timeout=2)
        assert not psutil.pid_exists(proc.pid) or proc.poll() is not None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
