"""Load on `pellucid serve`: N concurrent streaming clients x 64 tokens, with random disconnects.

    python bench/serve_load.py                         # SmolLM2, --quant auto, 1, 8, 32 clients
    python bench/serve_load.py --clients 1,8 --requests 2 --quant fp32
    python bench/serve_load.py --json-out load.json --markdown

Starts `pellucid serve` on a free loopback port, warms it up, then for each N runs N clients at
once, each sending --requests streaming chat requests one after another (64 tokens, greedy,
`ignore_eos` so every request runs its full length). A request disconnects after a random number
of tokens with probability --disconnect. Per level it reports HTTP 5xx and error events, p50/p99
time to first token (TTFT) and inter-token latency (ITL), aggregate tokens/s (tokens received
by all clients / wall time), whether /health shows no active sequence within 2 s afterwards, and
the server's peak RSS while serving (VmHWM, reset after the warm-up so the model load's own peak
does not hide it). Then the single-client ratio: --pairs times, one streamed request of the
first prompt alternated with one `pellucid generate` run of it in the same --quant mode, the
median of each side (alternating makes the machine's drift hit both). llama.cpp's server
(`pip install -e '.[bench]'`: llama-cpp-python[server], built from source) then runs the same
load on the same GGUF, with --n_threads set to every core as torch uses them; it has no
`ignore_eos`, so its requests forbid the end-of-turn tokens with `logit_bias` instead (pellucid
refuses logit_bias), and both run every request to 64 tokens.

Goals (issue 11): 8 clients >= 3x the aggregate tokens/s of one client; one client >= 90% of
`pellucid generate`'s decode tokens/s; zero 5xx and active sequences back to 0 after the
32-client run with disconnects.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator

import httpx

# Each server's way of running every request to its full length (see the docstring).
PELLUCID_EXTRA = {"ignore_eos": True, "stream_options": {"include_usage": True}}
SMOLLM2_END_IDS = (0, 2)  # <|endoftext|>, <|im_end|> (the GGUF's tokenizer.ggml.tokens)
LLAMA_EXTRA = {"logit_bias": {str(i): -100.0 for i in SMOLLM2_END_IDS}}

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle stays upright.",
    "List some facts about the ocean.",
    "Describe a day in the life of a baker.",
    "What makes a good friend?",
    "Tell me about the history of the printing press.",
    "How do plants make food from sunlight?",
    "Give advice to someone learning to cook.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_pellucid(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    cmd = [
        sys.executable,
        "-m",
        "pellucid",
        "serve",
        "--port",
        "0",
        "--quant",
        args.quant,
        "--max-batch",
        str(args.max_batch),
        "--max-queue",
        "256",
    ]
    if args.model:
        cmd += ["--model", args.model]
    cmd += args.serve_arg
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    port = None
    for line in proc.stderr:
        m = re.search(r"on http://127\.0\.0\.1:(\d+) ", line)
        if m:
            port = int(m.group(1))
            break
    if port is None:
        raise SystemExit(f"pellucid serve did not start (exit {proc.wait()})")
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
    return proc, wait_up(f"http://127.0.0.1:{port}", "/health")


def wait_up(url: str, path: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + path, timeout=5).status_code == 200:
                return url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not come up")


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM), in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss(pid: int) -> None:
    """Start VmHWM again from the current RSS (Linux: 5 > clear_refs), so the peak is the
    serving one, not the model load's."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not allowed here: the peak then includes loading
        pass


async def sse_events(r: httpx.Response) -> AsyncIterator[dict | None]:
    """The JSON events of a streamed response as they arrive; None marks `data: [DONE]`."""
    async for line in r.aiter_lines():
        if line == "data: [DONE]":
            yield None
        elif line.startswith("data: {"):
            yield json.loads(line[len("data: ") :])


async def one_request(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    prompt: str,
    tokens: int,
    cut: int | None,
    extra: dict,
) -> dict:
    """Stream one chat request; cut: disconnect after this many content chunks (None: never)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        **extra,
    }
    out = {"status": None, "error": False, "cut": cut is not None, "times": [], "usage": None}
    start = time.perf_counter()
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        out["status"] = r.status_code
        if r.status_code != 200:
            await r.aread()
            return out
        async for event in sse_events(r):
            if event is None:
                break
            if "error" in event:
                out["error"] = True
                break
            if event.get("usage"):
                out["usage"] = event["usage"]["completion_tokens"]
            if any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                out["times"].append(time.perf_counter() - start)
                if cut is not None and len(out["times"]) >= cut:
                    break  # leaving the block closes the connection mid-stream
    return out


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


async def run_level(
    url: str,
    model: str,
    n: int,
    args: argparse.Namespace,
    rng: random.Random,
    extra: dict,
) -> dict:
    plans = [
        [
            (
                PROMPTS[(c + k) % len(PROMPTS)],
                rng.randint(1, args.tokens - 8) if rng.random() < args.disconnect else None,
            )
            for k in range(args.requests)
        ]
        for c in range(n)
    ]
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def user(plan: list) -> list[dict]:
            return [
                await one_request(client, url, model, p, args.tokens, cut, extra) for p, cut in plan
            ]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(user(p) for p in plans)) for r in rs]
        wall = time.perf_counter() - start
    ttft = [r["times"][0] for r in results if r["times"]]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:], strict=False)]
    tokens = sum(r["usage"] or len(r["times"]) for r in results)
    decode = [
        (len(r["times"]) - 1) / (r["times"][-1] - r["times"][0])
        for r in results
        if not r["cut"] and len(r["times"]) > 1
    ]
    return {
        "clients": n,
        "requests": len(results),
        "disconnected": sum(r["cut"] for r in results),
        "status_5xx": sum(1 for r in results if r["status"] and r["status"] >= 500),
        "status_other": sum(1 for r in results if r["status"] not in (200,) and r["status"] < 500),
        "error_events": sum(r["error"] for r in results),
        # streams that ended early though nobody cut them: a server that drops requests
        "short": sum(
            1
            for r in results
            if not r["cut"] and r["status"] == 200 and (r["usage"] or len(r["times"])) < args.tokens
        ),
        "ttft_p50_ms": 1000 * pct(ttft, 50),
        "ttft_p99_ms": 1000 * pct(ttft, 99),
        "itl_p50_ms": 1000 * pct(itl, 50),
        "itl_p99_ms": 1000 * pct(itl, 99),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "per_request_decode_tokens_per_s": statistics.median(decode) if decode else float("nan"),
    }


def back_to_idle(url: str, timeout: float = 2.0) -> bool | None:
    """Whether /health shows no live sequence and no queue within `timeout`; None when the
    server has no such /health (llama-cpp-python's)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(url + "/health", timeout=5)
        h = r.json() if r.status_code == 200 else {}
        if "sequences_active" not in h:
            return None
        if h["sequences_active"] == 0 and h["queue_length"] == 0:
            return True
        time.sleep(0.05)
    return False


def generate_once(args: argparse.Namespace) -> float:
    """`pellucid generate --json`'s decode tokens/s on PROMPTS[0], same mode and length."""
    # no logprobs, as the API requests ask for none
    cmd = [sys.executable, "-m", "pellucid", "generate", PROMPTS[0], "--chat", "--json",
           "--max-new-tokens", str(args.tokens), "--temperature", "0",
           "--top-logprobs", "0", "--quant", args.quant]  # fmt: skip
    if args.model:
        cmd += ["--model", args.model]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out)["timing"]["decode_tokens_per_s"]


def paired_one_client(url: str, model: str, args: argparse.Namespace) -> dict:
    """One client against `pellucid generate`, alternated --pairs times on the same prompt and
    length: a server request, then a `generate` process (the server idle meanwhile). Both sides
    take the median of their runs at the same moments, so drift and noise hit them alike."""
    served, generated = [], []
    single = argparse.Namespace(**{**vars(args), "requests": 1, "disconnect": 0})
    for _ in range(args.pairs):
        level = asyncio.run(run_level(url, model, 1, single, random.Random(0), PELLUCID_EXTRA))
        served.append(level["per_request_decode_tokens_per_s"])
        generated.append(generate_once(args))
    one, gen = statistics.median(served), statistics.median(generated)
    return {"served": served, "generated": generated, "one_client": one, "generate": gen}


def run_all(
    url: str, model: str, args: argparse.Namespace, pid: int | None, extra: dict
) -> list[dict]:
    rng = random.Random(args.seed)  # the same plan (prompts, disconnects) for every server
    # Warm-up, alone and batched: the first forwards of each shape are slower (allocations, the
    # kernels' first calls); they are not what a running server costs.
    warm = argparse.Namespace(**{**vars(args), "requests": 1, "disconnect": 0, "tokens": 16})
    for n in (1, 4):
        asyncio.run(run_level(url, model, n, warm, random.Random(0), extra))
    if pid:
        reset_peak_rss(pid)
    levels = []
    for n in args.clients:
        level = asyncio.run(run_level(url, model, n, args, rng, extra))
        level["idle_after"] = back_to_idle(url)
        level["peak_rss_mb"] = peak_rss_mb(pid) if pid else float("nan")
        levels.append(level)
        print(json.dumps(level), flush=True)
    return levels


def llama_cpp_levels(args: argparse.Namespace) -> list[dict] | str:
    if importlib.util.find_spec("llama_cpp") is None:
        return "skipped: llama_cpp (llama-cpp-python[server]) is not installed"
    from pellucid.weights.gguf import smollm2_gguf_path

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(smollm2_gguf_path()),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "2048",
            "--n_threads",
            str(os.cpu_count()),  # its default is half the cores; torch uses them all
            "--n_threads_batch",
            str(os.cpu_count()),
            "--logits_all",
            "False",  # its default computes the output head at every prompt position
            # Its default cancels the running request whenever a new one arrives: under 8 clients
            # 23 of 24 streams then ended after a token or none, and its tokens/s meant nothing.
            "--interrupt_requests",
            "False",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = wait_up(f"http://127.0.0.1:{port}", "/v1/models")
        return run_all(url, "smollm2", args, proc.pid, LLAMA_EXTRA)
    finally:
        proc.terminate()
        proc.wait(30)


def level_rows(server: str, levels: list[dict]) -> list[str]:
    """One table row per client count."""
    idle = {True: "yes", False: "NO", None: "n/a"}
    return [
        f"| {server} | {lv['clients']} | {lv['requests']} ({lv['disconnected']}) | "
        f"{lv['status_5xx']} + {lv['error_events']} | "
        f"{lv['ttft_p50_ms']:.0f} / {lv['ttft_p99_ms']:.0f} | "
        f"{lv['itl_p50_ms']:.1f} / {lv['itl_p99_ms']:.1f} | {lv['tokens_per_s']:.1f} | "
        f"{idle[lv['idle_after']]} | {lv['peak_rss_mb']:.0f} |"
        for lv in levels
    ]


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def markdown(
    levels: list[dict], paired: dict | None, llama: list[dict] | str, args: argparse.Namespace
) -> str:
    """The bench/RESULTS.md section: the table and each goal of issue 11, met or not."""
    cpu = subprocess.run(
        "lscpu | grep 'Model name'", shell=True, capture_output=True, text=True
    ).stdout.strip()
    rows = [
        "| server | clients | requests (cut) | 5xx + error events | TTFT p50 / p99 ms "
        "| ITL p50 / p99 ms | tokens/s | idle after | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
        *level_rows("pellucid", levels),
        *([] if isinstance(llama, str) else level_rows("llama.cpp", llama)),
    ]
    lines = [f"{cpu}; load average at start {args.load_at_start}.", "", *rows, ""]
    by_n = {lv["clients"]: lv for lv in levels}
    if 1 in by_n and 8 in by_n:
        ratio = by_n[8]["tokens_per_s"] / by_n[1]["tokens_per_s"]
        lines.append(
            f"- 8 clients vs 1: {ratio:.2f}x aggregate tokens/s (goal >= 3x: {verdict(ratio >= 3)})"
        )
    if isinstance(llama, str):
        lines.append(
            f"- llama.cpp's server: {llama} (goal 8 clients >= 1x llama.cpp: not measured)"
        )
    else:
        theirs = {lv["clients"]: lv for lv in llama}
        for n in sorted(set(by_n) & set(theirs)):
            r = by_n[n]["tokens_per_s"] / theirs[n]["tokens_per_s"]
            goal = f" (goal >= 1x: {verdict(r >= 1)})" if n == 8 else ""
            lines.append(
                f"- {n} clients, pellucid vs llama.cpp's server: {r:.2f}x aggregate tokens/s{goal}"
            )
    if paired:
        one, gen = paired["one_client"], paired["generate"]
        r = one / gen
        lines.append(
            f"- one client {one:.1f} decode tokens/s vs `pellucid generate` {gen:.1f} (same "
            f"--quant {args.quant}; medians of {args.pairs} alternated runs each): {r:.0%} "
            f"(goal >= 90%: {verdict(r >= 0.9)})"
        )
    for name, server in (
        ("pellucid", levels),
        ("llama.cpp", [] if isinstance(llama, str) else llama),
    ):
        for lv in server:
            if lv["short"]:
                lines.append(
                    f"- {name}, {lv['clients']} clients: {lv['short']} uncut streams ended before "
                    f"{args.tokens} tokens: that level's tokens/s is not comparable"
                )
    last = levels[-1]
    ok = last["status_5xx"] == 0 and last["error_events"] == 0 and last["idle_after"]
    lines.append(
        f"- {last['clients']} clients with disconnects: {last['status_5xx']} 5xx, "
        f"{last['error_events']} error events, active sequences back to 0: "
        f"{'yes' if last['idle_after'] else 'no'} (goal: {verdict(ok)})"
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model spec (default: pellucid's SmolLM2)")
    ap.add_argument("--quant", default="auto", choices=["auto", "fp32", "q8", "q4"])
    ap.add_argument("--clients", default="1,8,32", help="comma-separated client counts")
    ap.add_argument(
        "--requests", type=int, default=3, help="requests per client, one after another"
    )
    ap.add_argument("--tokens", type=int, default=64, help="max_tokens per request")
    ap.add_argument("--disconnect", type=float, default=0.1, help="fraction of requests cut short")
    ap.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        help="one more argument for `pellucid serve` (repeatable): --serve-arg=--kv-budget-mb=512",
    )
    ap.add_argument("--url", help="an already running server (skips starting one; no RSS)")
    ap.add_argument(
        "--no-llama-cpp",
        action="store_true",
        help="skip llama.cpp's server (on a busy machine its spinning threads take hours)",
    )
    ap.add_argument(
        "--pairs",
        type=int,
        default=7,
        help="one-client requests alternated with `pellucid generate` runs (0: none)",
    )
    ap.add_argument("--json-out", help="write every figure as JSON here")
    ap.add_argument("--markdown", action="store_true", help="print a bench/RESULTS.md section")
    args = ap.parse_args()
    args.clients = [int(x) for x in args.clients.split(",")]
    args.load_at_start = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    proc = None
    if args.url:
        url, pid = args.url, None
    else:
        proc, url = start_pellucid(args)
        pid = proc.pid
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        levels = run_all(url, model, args, pid, PELLUCID_EXTRA)
        paired = paired_one_client(url, model, args) if args.pairs else None
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    if paired:
        print(f"one client vs pellucid generate, alternated: {json.dumps(paired)}", flush=True)
    llama = "skipped (--no-llama-cpp)" if args.no_llama_cpp else llama_cpp_levels(args)
    if isinstance(llama, str):
        print(f"llama.cpp server: {llama}", flush=True)
    result = {
        "levels": levels,
        "one_client_vs_generate": paired,
        "llama_cpp": llama,
        "args": dict(vars(args).items()),
    }
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    if args.markdown:
        print(markdown(levels, paired, llama, args))


if __name__ == "__main__":
    main()
