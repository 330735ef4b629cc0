"""The web pages (`/` chat, `/explain`), driven by a real headless Chromium (RELIABILITY D7).

The chat tests run the pages against a small app that includes the real `pages.router` and a
scripted /v1/chat/completions: it streams exactly the chunks a test gives it, in OpenAI's SSE
format, and can hold the stream open until the test lets it go. That makes the streaming, the
stop button and the XSS payloads (split across chunks so that tags straddle them) deterministic.
The explain page runs the real producer on a tiny model.
"""

import asyncio
import dataclasses
import itertools
import json
import math
import random
import shutil
import sys
import threading
import urllib.parse
from pathlib import Path

import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.testclient import TestClient

from pellucid.explain.trace import explain
from pellucid.infer.engine import Engine
from pellucid.infer.sampling import SamplingParams
from pellucid.model.config import PRESETS
from pellucid.model.transformer import Transformer
from pellucid.serve import pages
from pellucid.serve.app import create_app
from pellucid.tokenizer.bpe import Tokenizer
from pellucid.weights.resolve import LoadedModel

TEXT = "the cat sat on the mat. the dog sat on the log. a cat and a dog."
CSP = "default-src 'self'; script-src 'self'; object-src 'none'; frame-ancestors 'none'"
PAYLOADS = [
    "<img src=x onerror=window.__x=1>",
    "<script>window.__x=1</script>",
    "[c](javascript:window.__x=1)",
    "<svg onload=window.__x=1>",
    '<iframe srcdoc="<script>parent.__x=1</script>">',
    '<a href="data:text/html,<script>window.__x=1</script>">d</a>',
    "```html\n<img src=x onerror=window.__x=1>\n```",
    "![remote](http://203.0.113.9/x.png) <object data=x></object>",
    "**<b onmouseover=window.__x=1>bold</b>** `<script>` [ok](https://example.com/)",
]


@pytest.fixture(scope="module")
def loaded():
    tok = Tokenizer.train([TEXT] * 4, 300, special_tokens=["<|endoftext|>"])
    torch.manual_seed(0)
    # the model's vocabulary is exactly the tokenizer's (277 here); context room for a chat
    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=tok.vocab_size, context_len=512)
    model = Transformer(cfg).eval()
    return LoadedModel(model, tok, None, Path("tiny"), "checkpoint")


class Scheduler:
    """run_exclusive as the app's scheduler offers it: fn on a worker thread, counted."""

    def __init__(self):
        self.calls = 0
        self.hold = None  # a threading.Event the next call waits for before it runs

    async def run_exclusive(self, fn):
        self.calls += 1
        hold, self.hold = self.hold, None
        while hold is not None and not hold.is_set():
            await asyncio.sleep(0.01)
        return await asyncio.to_thread(fn)


@dataclasses.dataclass
class Script:
    """What the fake /v1/chat/completions streams: (text, logprob, alternatives) per chunk."""

    chunks: list
    hold_after: int | None = None  # stop after this many chunks until `release` is set
    release: threading.Event = dataclasses.field(default_factory=threading.Event)
    ended: threading.Event = dataclasses.field(default_factory=threading.Event)
    finished: bool = False  # True when the stream ran to [DONE], False when it was cut


def sse_chunk(text, logprob=None, alts=(), finish=None):
    choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
    if logprob is not None:
        top = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in alts]
        entry = {"token": text, "logprob": logprob, "bytes": list(text.encode())}
        choice["logprobs"] = {"content": [entry | {"top_logprobs": top}]}
    body = {"id": "c1", "object": "chat.completion.chunk", "model": "tiny", "choices": [choice]}
    return f"data: {json.dumps(body)}\n\n"


def fake_app(loaded, api_key=None):
    app = FastAPI()
    app.include_router(pages.router)
    app.state.loaded, app.state.model_name = loaded, "tiny"
    app.state.scheduler, app.state.api_key = Scheduler(), api_key
    app.state.script, app.state.bodies = Script([]), []

    @app.middleware("http")
    async def auth(request: Request, call_next):  # as the real app: every non-page route
        public = request.url.path in ("/", "/explain") or request.url.path.startswith("/static/")
        if api_key and not public and request.headers.get("authorization") != f"Bearer {api_key}":
            err = {"message": "bad key", "type": "authentication_error", "param": None}
            return JSONResponse({"error": err | {"code": None}}, status_code=401)
        return await call_next(request)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "tiny", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        app.state.bodies.append(await request.json())
        script = app.state.script

        async def events():
            try:
                yield (
                    "data: " + json.dumps({"choices": [{"delta": {"role": "assistant"}}]}) + "\n\n"
                )
                for i, (text, lp, alts) in enumerate(script.chunks):
                    if text is None:  # the server fails mid-stream: the connection just ends
                        raise RuntimeError("scripted failure")
                    if i == script.hold_after:
                        while not script.release.is_set():
                            await asyncio.sleep(0.01)
                    yield sse_chunk(text, lp, alts)
                yield sse_chunk("", finish="stop") + "data: [DONE]\n\n"
                script.finished = True
            finally:
                script.ended.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


class LiveServer:
    """uvicorn on 127.0.0.1, port 0, in a background thread."""

    def __init__(self, app):
        import uvicorn

        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        self.server, self.app_state = uvicorn.Server(config), app.state
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                break
            threading.Event().wait(0.01)
        assert self.server.started, "uvicorn did not start"
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def live(loaded):
    server = LiveServer(fake_app(loaded))
    yield server
    server.close()


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    if not chromium:
        pytest.skip("Debian's chromium is not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--headless"])
        yield b
        b.close()


@pytest.fixture
def page(browser, live):
    """A fresh page whose JS errors (CSP violations included) and off-host requests are kept."""
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    pg = context.new_page()
    pg.errors, pg.foreign = [], []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.on("console", lambda m: m.type == "error" and pg.errors.append(m.text))
    pg.on("request", lambda r: r.url.startswith(live.url) or pg.foreign.append(r.url))
    yield pg
    context.close()


def js_pct(p):  # what the page shows for a probability (common.js pct), written out separately
    return f"{p * 100:.0f}%"


def send(page, text):
    page.fill("#input", text)
    page.click("#send")


# --- chat ------------------------------------------------------------------------------------


def test_chat_streams_a_reply_and_keeps_the_conversation(page, live):
    words = ["Hello", " there", ",", " cat", "!"]
    live.app_state.script = Script([(w, math.log(0.5), [(w, math.log(0.5))]) for w in words], 2)
    page.goto(live.url + "/")
    page.wait_for_selector("#model:has-text('tiny')")
    page.fill("#system", "Be brief.")
    for control, value in (("#temperature", "0.3"), ("#top-p", "0.5")):
        page.eval_on_selector(
            control, f"e => {{ e.value = '{value}'; e.dispatchEvent(new Event('input')) }}"
        )
    page.fill("#max-tokens", "40")
    send(page, "hi")
    # the first two chunks are on the page while the server still holds the rest: streamed
    reply = page.locator(".msg.assistant .body").last
    # (no wait_for_function: its string predicates are eval'd, which the page's CSP forbids)
    page.wait_for_selector(".msg.assistant .tok:nth-child(2)")
    assert reply.inner_text() == "Hello there"
    assert page.is_enabled("#stop") and not page.is_enabled("#send")
    live.app_state.script.release.set()
    page.wait_for_selector(".msg.assistant .foot")
    assert reply.inner_text() == "".join(words)
    assert "5 tokens" in page.inner_text(".msg.assistant .foot")
    body = live.app_state.bodies[-1]
    assert body["stream"] is True and body["logprobs"] is True and body["top_logprobs"] == 5
    assert body["temperature"] == 0.3 and body["model"] == "tiny"
    assert body["top_p"] == 0.5 and body["max_tokens"] == 40
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    live.app_state.script = Script([("Yes", -0.1, [])])
    send(page, "again?")
    page.wait_for_selector("#messages > .msg:nth-child(4) .foot")
    assert live.app_state.bodies[-1]["messages"][1:] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello there, cat!"},
        {"role": "user", "content": "again?"},
    ]
    assert not page.errors, page.errors


def test_hovering_a_token_shows_its_probability_and_alternatives(page, live):
    alts = [(" mat", math.log(0.25)), (" hat", math.log(0.6)), (" log", math.log(0.1))]
    live.app_state.script = Script([("The", -0.01, []), (" mat", math.log(0.25), alts)])
    page.goto(live.url + "/")
    send(page, "where?")
    page.wait_for_selector(".msg.assistant .foot")
    assert page.is_hidden("#tip")
    page.hover(".msg.assistant .tok >> nth=1")
    tip = page.locator("#tip")
    assert tip.is_visible()
    text = tip.inner_text()
    assert "␣mat" in text and js_pct(0.25) in text
    assert "␣hat" in text and js_pct(0.6) in text and "␣log" in text
    assert page.locator("#tip tr.chosen").inner_text().startswith("␣mat")
    # a token the model found unlikely is shaded, a sure one is not
    classes = page.eval_on_selector_all(".msg.assistant .tok", "ts => ts.map(t => t.className)")
    assert classes == ["tok p1", "tok p3"]
    page.mouse.move(5, 5)
    assert page.is_hidden("#tip")


def test_a_long_reply_keeps_its_end_in_view(page, live):
    live.app_state.script = Script([(f"line {i}\n", -0.1, []) for i in range(120)])
    page.goto(live.url + "/")
    send(page, "long")
    page.wait_for_selector(".msg.assistant .foot")
    gap = page.eval_on_selector("#messages", "m => m.scrollHeight - m.scrollTop - m.clientHeight")
    height = page.eval_on_selector("#messages", "m => [m.scrollHeight, m.clientHeight]")
    assert height[0] > 2 * height[1] and gap < 60  # it overflowed, and the view followed it


def test_stop_button_aborts_the_stream(page, live):
    live.app_state.script = Script([("one", -0.1, []), (" two", -0.1, [])], hold_after=1)
    page.goto(live.url + "/")
    send(page, "count")
    page.wait_for_selector(".msg.assistant .tok")
    page.click("#stop")
    assert live.app_state.script.ended.wait(10), "the server's stream was not cancelled"
    assert not live.app_state.script.finished
    page.wait_for_selector(".msg.assistant .foot:has-text('stopped')")
    assert page.is_enabled("#send")


def test_a_stream_that_breaks_off_shows_an_error_and_frees_the_page(page, live):
    live.app_state.script = Script([("half", -0.1, []), (None, 0, [])])
    page.goto(live.url + "/")
    send(page, "go")
    page.wait_for_selector(".msg.assistant .error")
    assert page.inner_text(".msg.assistant .tok") == "half"  # what came is kept
    assert page.is_enabled("#send") and page.is_disabled("#stop")
    page.errors.clear()  # Chromium logs the cut-off response itself


def hostile_chunks(seed=0):
    """The payloads cut into 1-4 character chunks, so tags and attributes straddle chunks."""
    rng, text = random.Random(seed), "\n\n".join(PAYLOADS)
    cuts, i = [], 0
    while i < len(text):
        n = rng.randint(1, 4)
        cuts.append(text[i : i + n])
        i += n
    alts = [("<img src=x onerror=window.__x=1>", -1.0), ("<script>", -2.0)]
    return text, [(c, -0.5, alts) for c in cuts]


DOM_AUDIT = """() => {
  const bad = [];
  for (const e of document.querySelectorAll('iframe, object, embed, img, svg, frame')) bad.push(e.outerHTML);
  for (const s of document.querySelectorAll('script'))
    if (!/^\\/static\\/[a-z]+\\.js$/.test(s.getAttribute('src') || '')) bad.push(s.outerHTML);
  for (const e of document.querySelectorAll('*'))
    for (const a of e.attributes) if (a.name.startsWith('on')) bad.push(e.tagName + ' ' + a.name);
  for (const a of document.querySelectorAll('[href], [src], [srcdoc], [action]')) {
    const url = a.getAttribute('href') || a.getAttribute('src') || a.getAttribute('action') || '';
    if (a.hasAttribute('srcdoc') || /^\\s*(javascript|data|vbscript):/i.test(url)) bad.push(a.outerHTML);
  }
  return {bad, x: typeof window.__x, scripts: document.scripts.length};
}"""


def test_hostile_model_output_and_user_text_stay_inert(page, live):
    text, chunks = hostile_chunks()
    live.app_state.script = Script(chunks)
    page.goto(live.url + "/")
    send(page, "\n".join(PAYLOADS))
    page.wait_for_selector(".msg.assistant .foot")
    assert page.inner_text(".msg.user .body") == "\n".join(PAYLOADS)  # shown, as text
    assert page.locator(".msg.assistant .body").first.text_content() == text
    page.hover(".msg.assistant .tok >> nth=3")  # the tooltip shows hostile alternatives as text
    assert "<img␣src=x␣onerror=window.__x=1>" in page.inner_text("#tip")
    page.click(".msg.assistant .foot button")  # the Markdown view of the same text
    md = page.locator(".msg.assistant .markdown")
    assert md.is_visible()
    assert md.locator("pre code").first.text_content() == "<img src=x onerror=window.__x=1>"
    links = md.locator("a").evaluate_all("as => as.map(a => a.href)")
    assert links == ["http://203.0.113.9/x.png", "https://example.com/"]  # shown, not loaded
    assert "[c](javascript:window.__x=1)" in md.text_content()
    audit = page.evaluate(DOM_AUDIT)
    assert audit == {"bad": [], "x": "undefined", "scripts": 3}
    assert not page.foreign, page.foreign  # nothing fetched from anywhere else
    assert not page.errors, page.errors  # and no CSP violation: the page never needed one


def test_page_asks_for_the_key_when_the_server_wants_one(browser, loaded):
    server = LiveServer(fake_app(loaded, api_key="s3cret"))
    try:
        server.app_state.script = Script([("ok", -0.2, [])])
        context = browser.new_context()
        page = context.new_page()
        page.goto(server.url + "/")
        page.wait_for_selector("#keyform:visible")  # /v1/models answered 401
        page.fill("#key", "s3cret")
        page.click("#keyform button")
        page.wait_for_selector("#model:has-text('tiny')")
        send(page, "hello")
        page.wait_for_selector(".msg.assistant .foot")
        assert page.inner_text(".msg.assistant .body") == "ok"
        assert page.evaluate("sessionStorage.getItem('pellucid-api-key')") == "s3cret"
        context.close()
    finally:
        server.close()


# --- explain ---------------------------------------------------------------------------------


def canvas_pixels(page):
    return page.eval_on_selector("#heatmap", "c => c.toDataURL()")


def test_explain_page_shows_heatmap_lens_and_probability_bars(page, live, loaded):
    page.goto(live.url + "/explain")
    page.wait_for_selector("#result:visible")
    n_layer, n_head = loaded.model.cfg.n_layer, loaded.model.cfg.n_head
    assert page.locator("#layer option").count() == n_layer
    assert page.locator("#head option").count() == n_head
    data = explain(loaded.model, loaded.tokenizer, "The cat sat on the")
    assert page.locator("#tokens .chip").count() == len(data["tokens"])
    assert page.locator("#lens tr").count() == n_layer + 1  # embeddings, then each layer
    assert (
        page.locator("#lens th").last.inner_text()
        == f"the model's guess after layer {n_layer} (its answer)"
    )
    size = page.eval_on_selector("#heatmap", "c => [c.width, c.height]")
    assert min(size) > 50
    first = canvas_pixels(page)
    page.select_option("#head", "1")
    second = canvas_pixels(page)
    page.select_option("#layer", "0")
    third = canvas_pixels(page)
    assert len({first, second, third}) == 3  # each choice redraws a different matrix
    page.locator("#tokens .chip").nth(1).click()  # the second word's row
    title = page.inner_text("#looks-title")
    assert "layer 1, head 2" in title and data["tokens"][1]["text"].strip() in title
    assert page.locator("#looks tr").count() == 2  # word 2 can only look at words 1 and 2
    # sampling settings re-ask the server: the filters show up as probability-bar panels
    page.fill("#top-k", "5")
    page.fill("#temperature", "0.8")
    page.press("#temperature", "Tab")
    # each change re-asks; wait for the answer to the last one (top-k's alone can come first)
    page.wait_for_selector(".stage h3:has-text('Temperature 0.8')")
    page.wait_for_selector(".stage:has-text('top-k')")
    assert page.locator(".stage").count() == 3
    titles = page.locator(".stage h3").all_inner_texts()
    assert [t.split(".")[0] for t in titles] == ["1", "2", "3"]
    assert "5 most likely" in titles[1] and "Temperature 0.8" in titles[2]
    widths = page.eval_on_selector_all(
        ".stage .fill", "fs => fs.map(f => parseFloat(f.style.width))"
    )
    assert widths and all(0 <= w <= 100 for w in widths) and max(widths) > 0
    assert page.inner_text(".stage >> nth=1").count("%") == 5  # top-k keeps exactly 5
    assert not page.errors, page.errors


def test_explain_page_keeps_the_newest_answer_when_an_older_one_arrives_late(page, live):
    page.goto(live.url + "/explain")
    page.wait_for_selector("#result:visible")
    scheduler, hold = live.app_state.scheduler, threading.Event()
    scheduler.hold, calls = hold, scheduler.calls
    page.fill("#temperature", "0.5")
    page.press("#temperature", "Tab")  # this request waits on the server...
    for _ in range(1000):
        if scheduler.calls > calls:
            break
        threading.Event().wait(0.01)
    page.fill("#temperature", "0.9")
    page.press("#temperature", "Tab")  # ...while a newer one is answered
    page.wait_for_selector(".stage h3:has-text('Temperature 0.9')")
    assert page.is_disabled("#run")  # the older one is still out
    hold.set()
    page.wait_for_selector("#run:enabled")
    assert "Temperature 0.9" in page.inner_text("#stages")


def test_explain_page_shows_the_servers_error_in_words(page, live):
    page.goto(live.url + "/explain?prompt=" + "the%20cat%20" * 80)
    page.wait_for_selector("#status.error")
    assert "up to 128 tokens" in page.inner_text("#status")
    assert page.is_hidden("#result") and page.is_enabled("#run")
    page.errors.clear()  # Chromium logs the 400 response itself


def js_visible(text):  # what the pages show for a token (common.js visible), written out again
    text = text.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5")
    return "".join(f"\\x{ord(c):02x}" if ord(c) < 32 or ord(c) == 127 else c for c in text)


def test_hostile_model_output_on_the_explain_page_stays_inert(page, live, monkeypatch):
    """Every token text the producer returns (prompt chips, nearest embeddings, attention rows,
    logit lens, sampling stages, the chosen token) replaced by a payload: all shown as text."""
    payloads, served = itertools.cycle(PAYLOADS), []

    def hostile(value):
        if isinstance(value, dict):
            return {
                k: next(payloads) if k == "text" and isinstance(v, str) else hostile(v)
                for k, v in value.items()
            }
        return [hostile(v) for v in value] if isinstance(value, list) else value

    def explain_hostile(*args, **kw):
        served.append(hostile(explain(*args, **kw)))
        return served[-1]

    monkeypatch.setattr(pages, "explain", explain_hostile)
    prompt = "<script>window.__x=1</script><img src=x onerror=window.__x=1>"
    page.goto(live.url + "/explain?prompt=" + urllib.parse.quote(prompt))
    page.wait_for_selector("#result:visible")
    chips = page.locator("#tokens .chip").all_text_contents()
    assert chips == [js_visible(t["text"]) for t in served[-1]["tokens"]]
    assert any("<script>" in c or "onerror" in c for c in chips)  # payloads on screen, as text
    page.select_option("#head", "1")
    page.locator("#tokens .chip").nth(1).click()  # the attention row of a hostile token
    page.fill("#top-k", "5")
    page.press("#top-k", "Tab")  # a second answer: the sampling stages, hostile too
    page.wait_for_selector(".stage:has-text('top-k')")
    chosen = served[-1]["next_token"]["chosen"]["text"]
    assert js_visible(chosen) in page.inner_text("#chosen")
    assert page.evaluate(DOM_AUDIT) == {"bad": [], "x": "undefined", "scripts": 2}
    assert not page.foreign, page.foreign  # nothing fetched from anywhere else
    assert not page.errors, page.errors  # no CSP violation: nothing ever tried to run


def test_screenshots_for_a_person(page, live, tmp_path):
    """Not an assert on looks: writes the two pages as PNGs (for a person to judge) when
    PELLUCID_SCREENSHOTS names a folder."""
    import os

    out = os.environ.get("PELLUCID_SCREENSHOTS")
    if not out:
        pytest.skip("set PELLUCID_SCREENSHOTS=DIR to write screenshots")
    alts = [(" mat", math.log(0.4)), (" hat", math.log(0.3)), (" log", math.log(0.1))]
    words = [
        ("The", 0.9),
        (" cat", 0.3),
        (" sat", 0.6),
        (" on", 0.95),
        (" the", 0.8),
        (" mat", 0.15),
    ]
    live.app_state.script = Script([(w, math.log(p), alts) for w, p in words])
    page.goto(live.url + "/")
    send(page, "Where did the cat sit?")
    page.wait_for_selector(".msg.assistant .foot")
    page.hover(".msg.assistant .tok >> nth=5")
    page.screenshot(path=f"{out}/chat.png")
    page.goto(live.url + "/explain")
    page.fill("#steps", "3")
    page.press("#steps", "Tab")
    page.wait_for_selector("#steps-section:visible")
    page.screenshot(path=f"{out}/explain.png", full_page=True)


# --- the routes, without a browser -------------------------------------------------------------


@pytest.fixture(scope="module")
def client(loaded):
    return TestClient(fake_app(loaded))


@pytest.mark.parametrize("path", ["/", "/explain", "/static/chat.js", "/static/style.css"])
def test_pages_carry_the_security_headers(client, path):
    r = client.get(path)
    assert r.status_code == 200
    assert r.headers["content-security-policy"].startswith(CSP)
    assert r.headers["x-content-type-options"] == "nosniff"


def test_static_files_come_only_from_the_allowlist(client):
    """D2: a traversal attempt answers 404 and opens no file at all (an audit hook watches)."""
    assert client.get("/static/chat.js").status_code == 200  # FastAPI reads the route's source once
    opened, recording = [], [True]

    def hook(event, args):
        if event == "open" and recording[0]:
            opened.append(str(args[0]))

    sys.addaudithook(hook)  # audit hooks cannot be removed: `recording` turns this one off
    names = ["../pages.py", "..%2Fpages.py", "%2e%2e%2fpages.py", "pages.py", "x%00.js"]
    names += [
        "..\\pages.py",
        "\uff0e\uff0e\uff0fpages.py",
        "a" * 300,
        "%2Fetc%2Fpasswd",
        "chat.js%2F..%2F..%2Fpages.py",
    ]
    try:
        for name in names:
            assert client.get("/static/" + name).status_code == 404, name
    finally:
        recording[0] = False
    assert not [p for p in opened if "pages.py" in p or "passwd" in p], opened
    assert client.get("/static/explain.js").headers["content-type"].startswith("text/javascript")


def test_explain_route_returns_the_producers_json(client, loaded):
    body = {"prompt": "the cat", "temperature": 0.7, "top_k": 20, "top_p": 0.9, "seed": 3}
    before = client.app.state.scheduler.calls
    r = client.post("/v1/explain", json=body | {"steps": 2})
    assert r.status_code == 200
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, seed=3)
    assert r.json() == json.loads(
        json.dumps(explain(loaded.model, loaded.tokenizer, "the cat", params, steps=2))
    )
    assert client.app.state.scheduler.calls == before + 1  # ran through run_exclusive


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": 0}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "a", "temperature": -1}, "temperature"),
        ({"prompt": "a", "temperature": "hot"}, "temperature"),
        ({"prompt": "a", "top_k": 0}, "top_k"),
        ({"prompt": "a", "top_p": 2}, "top_p"),
        ({"prompt": "a", "steps": 10_000}, "steps"),
        ({"prompt": "a", "steps": True}, "steps"),
        ({"prompt": "a", "layers": 3}, None),
        ({"prompt": "the cat " * 100}, None),  # over the explain prompt limit
        ([1, 2], None),
    ],
)
def test_explain_route_rejects_bad_input_with_a_400(client, body, param):
    r = client.post("/v1/explain", json=body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and "\n" not in err["message"]
    if param:
        assert err["param"] == param


def test_explain_route_rejects_a_body_that_is_not_json(client):
    r = client.post("/v1/explain", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("the request body is not valid JSON")


# --- the pages on the real app (serve.app.create_app), a tiny model, an API key ----------------


class SlowEngine(Engine):
    """The real engine, 20 ms slower per step, so a test can press Stop mid-reply."""

    def step(self):
        threading.Event().wait(0.02)
        return super().step()


@pytest.fixture(scope="module")
def real(loaded):
    engine = SlowEngine(loaded.model, loaded.tokenizer)
    server = LiveServer(create_app(loaded, model_name="tiny", api_key="k3y", engine=engine))
    yield server
    server.close()


def health(server):
    import httpx

    return httpx.get(server.url + "/health").json()


def test_real_app_chat_streams_hover_and_stop(browser, real):
    context = browser.new_context()
    page = context.new_page()
    page.goto(real.url + "/")
    page.fill("#key", "k3y")  # /v1/models answered 401: the page asks for the key
    page.click("#keyform button")
    page.wait_for_selector("#model:has-text('tiny')")
    page.fill("#max-tokens", "6")
    page.eval_on_selector(
        "#temperature", "e => { e.value = '0' }"
    )  # greedy: the same reply each run
    send(page, "the cat")
    page.wait_for_selector(".msg.assistant .foot")
    foot = page.inner_text(".msg.assistant .foot")
    assert "6 tokens" in foot and "stopped at max tokens" in foot, foot
    page.hover(".msg.assistant .tok >> nth=0")
    rows = page.eval_on_selector_all("#tip .alts", "ts => ts.map(t => t.rows.length)")
    assert rows and all(n == 5 for n in rows)  # top_logprobs: 5 (per token under the mouse)
    assert "%" in page.inner_text("#tip .tip-head")
    page.fill("#max-tokens", "300")  # prompt + 300 fit the context of 512
    send(page, "and the dog")
    page.wait_for_selector("#messages > .msg:nth-child(4) .tok:nth-child(3)")
    assert health(real)["sequences_active"] == 1
    page.click("#stop")
    page.wait_for_selector(".msg.assistant .foot:has-text('stopped') >> nth=0")
    for _ in range(500):  # the server notices the closed connection and frees the sequence
        if health(real)["sequences_active"] == 0:
            break
        threading.Event().wait(0.01)
    assert health(real)["sequences_active"] == 0
    context.close()


def test_real_app_explain_page_and_headers(browser, real, loaded):
    import httpx

    for path in ("/", "/explain", "/static/explain.js"):
        r = httpx.get(real.url + path)
        assert r.status_code == 200 and r.headers["content-security-policy"].startswith(CSP)
    assert httpx.post(real.url + "/v1/explain", json={"prompt": "a"}).status_code == 401
    context = browser.new_context()
    page = context.new_page()
    page.goto(real.url + "/explain")
    page.fill("#key", "k3y")
    page.click("#keyform button")
    page.wait_for_selector("#result:visible")
    assert page.locator("#layer option").count() == loaded.model.cfg.n_layer
    assert page.locator(".stage").count() == 2  # softmax, then temperature 0
    context.close()
