"""The server soak at CI size (issue 16 item 7): bench/serve_soak.py's own load, in-process.

200 streaming requests from 16 concurrent clients on the tiny model, 10% cut mid-stream and 5%
malformed: zero 5xx and error events, every invalid request a 400, every other one finished with
[DONE], the engine back to no request, sequence, queued ticket or KV memory, and resident memory
within 10% of its value after the warm-up. The full run (2,000 requests, 32 clients, a separate
server process) is `python bench/serve_soak.py`, its figures in bench/RESULTS.md.
"""

import asyncio
import os
import sys
from pathlib import Path

import pytest
from serve_util import LiveServer, make_app, tiny_loaded

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
import serve_soak  # a bench script, importable for its soak loop


@pytest.mark.slow
def test_soak_200_requests_16_clients_no_5xx_back_to_idle_rss_flat():
    app, engine = make_app(tiny_loaded(context_len=256), max_batch=8, max_queue=64)
    args = serve_soak.parse_args(["--requests", "200", "--clients", "16", "--max-tokens", "24"])
    with LiveServer(app) as server:
        figures = asyncio.run(serve_soak.soak(server.url, os.getpid(), args))
    assert (
        figures["requests"] == 200 and figures["disconnected"] > 0 and figures["invalid_sent"] > 0
    )
    for key in ("status_5xx", "invalid_not_400", "valid_not_200", "error_events", "unfinished"):
        assert figures[key] == 0, figures
    assert figures["idle_after"] and engine.kv_bytes_used == 0, figures
    assert abs(figures["rss_growth_pct"]) <= 10, figures
    assert figures["ok"]
