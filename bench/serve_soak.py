"""Soak `pellucid serve`: thousands of streaming requests with random disconnects (issue 16 item 7).

    python bench/serve_soak.py                                   # 2,000 requests, 32 clients, tiny
    python bench/serve_soak.py --model smollm2-135m-instruct     # the real small model
    python bench/serve_soak.py --requests 200 --clients 16 --json-out soak.json

Starts `pellucid serve` on a free loopback port (a random 2-layer model written to a temporary
GGUF unless --model names one), sends a warm-up round (one request per client, all at once),
records the server's resident memory (VmRSS), open files and threads, then lets --clients
concurrent clients send --requests streaming chat requests between them, one after another per
client. A request disconnects after a random number of chunks with probability --disconnect,
and with probability --invalid it is malformed (negative temperature) and must get a 400.
Afterwards it waits up to 2 s for `/metrics` to show no request, sequence, queued ticket or KV
memory left. Pass criteria (exit 1 otherwise): zero 5xx and zero error events, every valid
request that was not cut ends with `[DONE]` and a finish_reason, every invalid one a 400, the
server back to idle, and RSS at the end within 10% of RSS after the warm-up (the sampled peak is
reported too). The same run at CI size is tests/test_serve_soak.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from serve_load import PROMPTS, sse_events, start_pellucid

TINY_TEXT = " ".join(PROMPTS) * 4


def tiny_gguf(folder: Path) -> str:
    """A random 2-layer chat model (ChatML template, BPE trained on the prompts) as a GGUF."""
    import dataclasses

    import torch

    from pellucid.model.config import PRESETS
    from pellucid.model.transformer import Transformer
    from pellucid.tokenizer.bpe import Tokenizer
    from pellucid.tokenizer.chat import CHATML
    from pellucid.weights.gguf import save_gguf

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer.train([TINY_TEXT], 400, special_tokens=specials)
    tok = Tokenizer(tok.vocab, tok.merges, tok.special_tokens, tok.pattern, eos_id=2)
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=tok.vocab_size, context_len=256)
    path = save_gguf(
        Transformer(cfg).eval(), folder / "tiny.gguf", tokenizer=tok, chat_template=CHATML
    )
    return str(path)


def server_state(pid: int, url: str) -> dict:
    """The server process's RSS (MiB), open files and threads, and its /metrics gauges."""
    proc = psutil.Process(pid)
    m = httpx.get(url + "/metrics", timeout=10).json()
    return {
        "rss_mb": proc.memory_info().rss / 2**20,
        "fds": proc.num_fds(),
        "threads": proc.num_threads(),
        **{
            k: m[k]
            for k in ("requests_active", "sequences_active", "queue_length", "kv_bytes_used")
        },
    }


def is_idle(state: dict) -> bool:
    keys = ("requests_active", "sequences_active", "queue_length", "kv_bytes_used")
    return not any(state[k] for k in keys)


async def one(
    client: httpx.AsyncClient, url: str, rng: random.Random, args: argparse.Namespace
) -> dict:
    """One request: streamed, maybe cut after a few chunks, maybe malformed on purpose."""
    invalid = rng.random() < args.invalid
    cut = rng.randint(1, 6) if not invalid and rng.random() < args.disconnect else None
    body = {
        "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
        "max_tokens": rng.randint(4, args.max_tokens),
        "temperature": -1.0 if invalid else rng.choice([0.0, 0.8]),
        "stream": True,
    }
    out = {
        "status": None,
        "invalid": invalid,
        "cut": cut is not None,
        "done": False,
        "error": False,
    }
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        out["status"] = r.status_code
        if r.status_code != 200:
            await r.aread()
            return out
        chunks, finish = 0, None
        async for event in sse_events(r):
            if event is None:
                out["done"] = finish is not None
                break
            if "error" in event:
                out["error"] = True
                break
            for choice in event.get("choices", []):
                finish = choice.get("finish_reason") or finish
            chunks += 1
            if cut is not None and chunks >= cut:
                break  # leaving the block closes the connection mid-stream
    return out


async def soak(url: str, pid: int, args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    limits = httpx.Limits(
        max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4
    )
    samples: list[float] = []
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        warm = await asyncio.gather(
            *(one(client, url, random.Random(i), args) for i in range(args.clients))
        )
        await asyncio.sleep(0.5)
        start = await asyncio.to_thread(server_state, pid, url)
        left = [args.requests]
        results: list[dict] = []

        async def user(seed: int) -> None:
            r = random.Random(seed)
            while left[0] > 0:
                left[0] -= 1
                results.append(await one(client, url, r, args))
                if len(results) % 100 == 0:
                    samples.append(psutil.Process(pid).memory_info().rss / 2**20)

        t = time.perf_counter()
        await asyncio.gather(*(user(rng.random()) for _ in range(args.clients)))
        wall = time.perf_counter() - t
    deadline, end = time.monotonic() + 2.0, None
    while time.monotonic() < deadline:
        end = await asyncio.to_thread(server_state, pid, url)
        if is_idle(end):
            break
        await asyncio.sleep(0.05)
    valid = [r for r in results if not r["invalid"]]
    counts = {
        "requests": len(results),
        "warmup_requests": len(warm),
        "clients": args.clients,
        "wall_s": round(wall, 1),
        "requests_per_s": round(len(results) / wall, 1),
        "disconnected": sum(r["cut"] for r in results),
        "invalid_sent": len(results) - len(valid),
        "status_5xx": sum(1 for r in results + warm if (r["status"] or 0) >= 500),
        "invalid_not_400": sum(1 for r in results if r["invalid"] and r["status"] != 400),
        "valid_not_200": sum(1 for r in valid if r["status"] != 200),
        "error_events": sum(r["error"] for r in results),
        "unfinished": sum(
            1 for r in valid if r["status"] == 200 and not r["cut"] and not r["done"]
        ),
        "idle_after": bool(end and is_idle(end)),
        "rss_start_mb": round(start["rss_mb"], 1),
        "rss_end_mb": round(end["rss_mb"], 1) if end else None,
        "rss_peak_sampled_mb": round(max(samples, default=start["rss_mb"]), 1),
        "fds": [start["fds"], end["fds"] if end else None],
        "threads": [start["threads"], end["threads"] if end else None],
        "end_gauges": {
            k: end[k]
            for k in ("requests_active", "sequences_active", "queue_length", "kv_bytes_used")
        }
        if end
        else None,
    }
    growth = (counts["rss_end_mb"] or 0) / counts["rss_start_mb"] - 1
    counts["rss_growth_pct"] = round(100 * growth, 1)
    counts["ok"] = bool(
        counts["idle_after"]
        and not any(
            counts[k]
            for k in (
                "status_5xx",
                "invalid_not_400",
                "valid_not_200",
                "error_events",
                "unfinished",
            )
        )
        and abs(growth) <= 0.10
    )
    return counts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model spec to serve (default: a random tiny model)")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32, help="each request asks 4..this many")
    p.add_argument("--disconnect", type=float, default=0.1, help="share of requests cut mid-stream")
    p.add_argument("--invalid", type=float, default=0.05, help="share of malformed requests")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--quant", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", help="write the figures here as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            args.model = tiny_gguf(Path(tmp))
        proc, url = start_pellucid(args)
        try:
            figures = asyncio.run(soak(url, proc.pid, args))
        finally:
            proc.terminate()
            proc.wait(30)
    figures["model"] = Path(args.model).name
    print(json.dumps(figures, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
