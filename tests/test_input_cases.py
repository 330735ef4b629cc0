"""Prompt and request input on every surface (issue 16 item 6; RELIABILITY A9, A11, A13).

The cases: empty, 1 MB, invalid UTF-8 bytes, lone surrogates, NUL and control characters, and a
prompt exactly at, and one past, the model's context. The surfaces: the CLI (`generate`, `chat`
reading stdin, `tokenizer encode`), the library (tokenizer -> Engine, and a Conversation) and the
server (`/v1/chat/completions`, `/v1/completions`, streamed and not). Each answers either with a
correct result or with one line naming the problem, never a traceback or a 500.

Where text cannot be a str (invalid UTF-8), it travels as bytes where that surface reads bytes:
stdin (`generate -`, `tokenizer encode -`, `chat`) and the HTTP body. argv cannot carry NUL, and
Linux caps one argument at 128 KB, so those two go through stdin (`-`). Undecodable argv bytes
reach Python as lone surrogates (surrogateescape), so "lone surrogates in argv" is the same case;
the slow tests at the end pass real bytes to a real process.
"""

import io
import json
import os
import subprocess
import sys
import time

import pytest
from fastapi.testclient import TestClient
from serve_util import make_app, sse_events, tiny_loaded
from test_resolve import TEMPLATE, tiny_model, tiny_tokenizer

from pellucid.cli import main
from pellucid.errors import PellucidError, TokenizerError
from pellucid.infer.conversation import Conversation
from pellucid.infer.engine import Engine
from pellucid.infer.sampling import SamplingParams
from pellucid.tokenizer.chat import ChatTemplate
from pellucid.weights.gguf import save_gguf

FFFD = "\ufffd"
MB = "the cat sat. " * 80_660  # ~1 MB of text (1,048,580 characters)
CONTROL = "a\x00b\x01c\x07d\x1b[31me\x7ff\r\x0b\x0c"  # NUL, BEL, an ANSI escape, DEL, CR, VT, FF
CTX_CLI, CTX_SERVER = 96, 128  # the tiny GGUF's context; the server's model's
GREEDY = {"temperature": 0.0, "max_new_tokens": 3}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.gguf"
    return save_gguf(tiny_model(), path, tokenizer=tiny_tokenizer(), chat_template=TEMPLATE)


def n_token_text(tok, n, overhead=0):
    """Text that encodes to exactly n tokens (n - overhead of them a chat message's content)."""
    text = "Z" * (n - overhead)  # 'Z' is not in the training text: one token per character
    assert len(tok.encode(text)) == n - overhead
    return text


def one_line_error(err):
    """The single 'pellucid: error: ...' line, and no traceback."""
    lines = [x for x in err.splitlines() if x.startswith("pellucid: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def stdin_bytes(monkeypatch, data, errors="strict"):
    """A real-looking stdin: bytes under a text layer (strict, as most UTF-8 locales set it)."""
    stream = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors=errors)
    monkeypatch.setattr("sys.stdin", stream)


# --- the library: tokenizer -> Engine, and a Conversation ---------------------------------------


def test_engine_empty_prompt_is_one_line_naming_it(tok):
    engine = Engine(tiny_model(), tok)
    with pytest.raises(PellucidError, match="empty") as e:
        engine.complete(tok.encode(""), SamplingParams(**GREEDY))
    assert "\n" not in str(e.value)


def test_engine_1mb_prompt_is_refused_quickly_naming_the_numbers(tok):
    engine = Engine(tiny_model(), tok)
    t = time.perf_counter()
    ids = tok.encode(MB)
    with pytest.raises(PellucidError) as e:
        engine.complete(ids, SamplingParams(**GREEDY))
    assert f"{len(ids)} tokens" in str(e.value) and f"context is {CTX_CLI}" in str(e.value)
    assert time.perf_counter() - t < 30  # ~2 s idle; encoding 1 MB is most of it
    with pytest.raises(PellucidError, match="too long"):  # a Conversation says it in its words
        Conversation(engine, ChatTemplate(TEMPLATE)).say(MB, SamplingParams(**GREEDY))
    assert engine.kv_bytes_used == 0  # nothing reserved for a refused prompt


def test_engine_bytes_are_refused_naming_the_type(tok):
    with pytest.raises(TokenizerError, match="can only encode str, not bytes"):
        tok.encode(b"a\xff\xfeb")


@pytest.mark.parametrize("text", ["x\ud800y", "\udfff\ud800", "a\udcff\udcfeb"])
def test_engine_lone_surrogates_become_u_fffd_and_generate(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    assert FFFD in tok.decode(ids)
    engine = Engine(tiny_model(), tok)
    done = engine.complete(ids, SamplingParams(**GREEDY))
    assert len(done.ids) == 3 and done.finish_reason == "length"
    turn = Conversation(engine, ChatTemplate(TEMPLATE)).say(text, SamplingParams(**GREEDY))
    assert FFFD in tok.decode(turn.completion.prompt_ids) and turn.completion.ids


def test_engine_nul_and_control_characters_round_trip_and_generate(tok):
    ids = tok.encode(CONTROL)
    assert tok.decode(ids) == CONTROL  # every byte kept, none special
    assert not set(ids) & set(tok.special_tokens.values())
    engine = Engine(tiny_model(), tok)
    assert len(engine.complete(ids, SamplingParams(**GREEDY)).ids) == 3
    turn = Conversation(engine, ChatTemplate(TEMPLATE)).say(CONTROL, SamplingParams(**GREEDY))
    assert len(turn.completion.ids) >= 1


@pytest.mark.parametrize("n", [CTX_CLI - 1, CTX_CLI, CTX_CLI + 1])
def test_engine_prompt_at_and_past_the_context(tok, n):
    engine = Engine(tiny_model(), tok)
    ids = tok.encode(n_token_text(tok, n))
    params = SamplingParams(temperature=0.0, max_new_tokens=50)
    if n < CTX_CLI:  # exactly fills the context with its one reply token
        done = engine.complete(ids, params)
        assert len(done.ids) == 1 and done.finish_reason == "length"
        return
    with pytest.raises(PellucidError) as e:
        engine.complete(ids, params)
    assert str(e.value) == (
        f"prompt 0 is {n} tokens but the model's context is {CTX_CLI} tokens "
        f"(prompt + output must fit, so at most {CTX_CLI - 1} for the prompt)"
    )
    assert engine.kv_bytes_used == 0


# --- the CLI: generate -------------------------------------------------------------------------


def generate(capsys, gguf_file, prompt, *extra):
    args = ["generate", prompt, "--model", str(gguf_file), "--temperature", "0", *extra]
    code = main([*args, "--max-new-tokens", "3", "--json"])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_generate_empty_prompt_is_one_line(capsys, gguf_file):
    code, _, err = generate(capsys, gguf_file, "")
    assert code == 2 and "empty" in one_line_error(err)


def test_generate_1mb_prompt_from_stdin_is_one_line_naming_the_context(
    monkeypatch, capsys, gguf_file, tok
):
    stdin_bytes(monkeypatch, MB.encode())
    code, _, err = generate(capsys, gguf_file, "-")
    line = one_line_error(err)
    assert code == 2 and f"{len(tok.encode(MB))} tokens" in line and "context is 96" in line


@pytest.mark.parametrize("how", ["argv", "stdin"])
def test_generate_invalid_utf8_becomes_u_fffd(monkeypatch, capsys, gguf_file, tok, how):
    raw = b"a\xff\xfeb"
    if how == "stdin":
        stdin_bytes(monkeypatch, raw)
    prompt = "-" if how == "stdin" else raw.decode("utf-8", "surrogateescape")  # as argv gives it
    code, got, err = generate(capsys, gguf_file, prompt)
    assert code == 0, err
    assert got["prompt_ids"] == tok.encode("a\ufffd\ufffdb") and len(got["ids"]) == 3
    if how == "stdin":
        stdin_bytes(monkeypatch, raw)
    code, got, _ = generate(capsys, gguf_file, prompt, "--chat")  # and as a chat message
    assert code == 0 and FFFD in tok.decode(got["prompt_ids"])


def test_generate_lone_surrogates_in_argv_become_u_fffd(capsys, gguf_file, tok):
    code, got, err = generate(capsys, gguf_file, "x\ud800y\udfff")
    assert code == 0, err
    assert got["prompt_ids"] == tok.encode("x\ufffdy\ufffd")


def test_generate_nul_and_control_characters(monkeypatch, capsys, gguf_file, tok):
    stdin_bytes(monkeypatch, CONTROL.encode())  # argv cannot hold a NUL: stdin can
    code, got, err = generate(capsys, gguf_file, "-")
    assert code == 0, err
    assert got["prompt_ids"] == tok.encode(CONTROL) and tok.decode(got["prompt_ids"]) == CONTROL
    code, got, _ = generate(capsys, gguf_file, CONTROL.replace("\x00", ""))  # the rest via argv
    assert code == 0 and got["prompt_ids"] == tok.encode(CONTROL.replace("\x00", ""))


def test_system_prompts_in_argv_with_lone_surrogates_become_u_fffd(
    monkeypatch, capsys, gguf_file, tok
):
    code, got, err = generate(capsys, gguf_file, "hi", "--chat", "--system", "s\udcff\ud800")
    assert code == 0, err
    assert "s\ufffd\ufffd" in tok.decode(got["prompt_ids"])
    stdin_bytes(monkeypatch, b"hi\n")
    code = main(["chat", "--model", str(gguf_file), "--system", "s\udcff", "--max-new-tokens", "2"])
    assert code == 0 and "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("n", [CTX_CLI - 1, CTX_CLI, CTX_CLI + 1])
def test_generate_prompt_at_and_past_the_context(capsys, gguf_file, tok, n):
    code, got, err = generate(capsys, gguf_file, n_token_text(tok, n))
    if n < CTX_CLI:
        assert code == 0 and len(got["ids"]) == 1 and got["finish_reason"] == "length"
    else:
        line = one_line_error(err)
        assert code == 2 and f"is {n} tokens but the model's context is {CTX_CLI}" in line


# --- the CLI: chat reading stdin ----------------------------------------------------------------


def chat(monkeypatch, capsys, gguf_file, data, errors="strict"):
    """`pellucid chat` on stdin bytes (max 6 new tokens); (exit code, replies, stderr lines)."""
    stdin_bytes(monkeypatch, data, errors)
    code = main(["chat", "--model", str(gguf_file), "--max-new-tokens", "6", "--stats"])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def turns(err_lines):
    return [x for x in err_lines if x.startswith("[prompt ")]


def test_chat_empty_lines_are_skipped_with_a_hint(monkeypatch, capsys, gguf_file):
    code, _, err = chat(monkeypatch, capsys, gguf_file, b"\n   \nhi\n")
    assert code == 0 and len(turns(err)) == 1
    assert err.count("type a message; /reset starts over, /exit quits") == 2


def test_chat_1mb_line_is_one_line_and_the_chat_goes_on(monkeypatch, capsys, gguf_file):
    code, _, err = chat(monkeypatch, capsys, gguf_file, MB.encode() + b"\nhi\n")
    assert code == 0 and len(turns(err)) == 1  # "hi" still answered
    (line,) = [x for x in err if x.startswith("pellucid: ")]
    assert line.startswith("pellucid: the message is too long") and len(line) < 200


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])  # a UTF-8 locale; C/POSIX
def test_chat_invalid_utf8_becomes_u_fffd_and_the_chat_goes_on(
    monkeypatch, capsys, gguf_file, errors
):
    # Under a strict stdin this used to end the chat: UnicodeDecodeError, exit 1.
    code, _, err = chat(monkeypatch, capsys, gguf_file, b"hi\xff\xfe there\nsecond\n", errors)
    assert code == 0, err
    assert len(turns(err)) == 2 and not [x for x in err if "error" in x]


def test_chat_nul_and_control_characters(monkeypatch, capsys, gguf_file):
    code, _, err = chat(monkeypatch, capsys, gguf_file, CONTROL.encode() + b"\n")
    assert code == 0 and len(turns(err)) == 1


def test_chat_message_at_and_one_past_the_context(monkeypatch, capsys, gguf_file, tok):
    template = ChatTemplate(TEMPLATE)
    overhead = len(template.encode(tok, [{"role": "user", "content": ""}]))
    reply_room = 6  # --max-new-tokens 6 (under a quarter of the context)
    fits = n_token_text(tok, CTX_CLI - reply_room, overhead)
    assert len(template.encode(tok, [{"role": "user", "content": fits}])) == CTX_CLI - reply_room
    code, _, err = chat(monkeypatch, capsys, gguf_file, f"{fits}\n/reset\n{fits}Z\n".encode())
    assert code == 0 and len(turns(err)) == 1
    (line,) = [x for x in err if x.startswith("pellucid: ")]
    assert f"it is {CTX_CLI - reply_room + 1} tokens" in line and f"context of {CTX_CLI}" in line


# --- the CLI: tokenizer encode ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(path)
    return path


def encode(capsys, tok_file, text):
    assert main(["tokenizer", "encode", text, "--tokenizer", str(tok_file), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_encode_empty_text(capsys, tok_file):
    assert encode(capsys, tok_file, "") == {"ids": [], "tokens": [], "text": [], "bytes": []}


def test_encode_1mb_from_stdin(monkeypatch, capsys, tok_file, tok):
    stdin_bytes(monkeypatch, MB.encode())
    assert encode(capsys, tok_file, "-")["ids"] == tok.encode(MB)


@pytest.mark.parametrize("how", ["argv", "stdin"])
def test_encode_invalid_utf8_becomes_u_fffd(monkeypatch, capsys, tok_file, tok, how):
    raw = b"a\xff\xfeb"
    if how == "stdin":
        stdin_bytes(monkeypatch, raw)
    text = "-" if how == "stdin" else raw.decode("utf-8", "surrogateescape")
    assert encode(capsys, tok_file, text)["ids"] == tok.encode("a\ufffd\ufffdb")


def test_encode_nul_and_control_characters(monkeypatch, capsys, tok_file, tok):
    stdin_bytes(monkeypatch, CONTROL.encode())
    got = encode(capsys, tok_file, "-")
    assert got["ids"] == tok.encode(CONTROL) and "".join(got["text"]) == CONTROL
    # (lone surrogates in argv: test_tokenizer_cli.py::test_encode_argv_with_a_lone_surrogate_...)


# --- the server -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served():
    loaded = tiny_loaded(context_len=CTX_SERVER)
    app, engine = make_app(loaded)
    with TestClient(app, base_url="http://localhost") as client:
        yield client, engine, loaded


ROUTES = ["chat", "completions", "chat-stream"]


def post(client, route, content_json, **extra):
    """POST one text (given as raw JSON bytes of a string) to a route; the response."""
    fields = b"".join(
        b', "%s": %s' % (k.encode(), json.dumps(v).encode()) for k, v in extra.items()
    )
    if route == "completions":
        body = b'{"prompt": ' + content_json + fields + b"}"
        return client.post("/v1/completions", content=body)
    body = b'{"messages": [{"role": "user", "content": ' + content_json + b"}]" + fields
    if route == "chat-stream":
        body += b', "stream": true'
    return client.post("/v1/chat/completions", content=body + b"}")


def reply_ok(r, route):
    """The response is a 200 with some generated text; returns that text."""
    assert r.status_code == 200, r.text
    if route == "chat-stream":
        events = sse_events(r.text)
        assert all("error" not in e for e in events)
        chunks = [e["choices"] for e in events]
        return "".join(c[0]["delta"].get("content") or "" for c in chunks if c)
    choice = r.json()["choices"][0]
    return choice["message"]["content"] if route == "chat" else choice["text"]


def error_of(r, status=400):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and "\n" not in err["message"]
    return err


def healthy(client):
    return client.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize("route", ROUTES)
def test_server_empty_text(served, route):
    client, _, _ = served
    r = post(client, route, b'""', max_tokens=3)
    if route == "completions":  # a completion needs a prompt; a chat message may be empty
        err = error_of(r)
        assert err["param"] == "prompt" and "empty" in err["message"]
    else:
        reply_ok(r, route)


@pytest.mark.parametrize("route", ROUTES)
def test_server_1mb_text_is_a_quick_context_error(served, route):
    client, engine, _ = served
    t = time.perf_counter()
    err = error_of(post(client, route, json.dumps(MB).encode(), max_tokens=3))
    assert err["code"] == "context_length_exceeded" and f"{CTX_SERVER} tokens" in err["message"]
    assert time.perf_counter() - t < 10  # ~1 s idle
    assert engine.kv_bytes_used == 0 and healthy(client)


@pytest.mark.parametrize("route", ROUTES)
def test_server_invalid_utf8_in_the_body_is_400_naming_it(served, route):
    client, _, _ = served
    err = error_of(post(client, route, b'"a\xff\xfeb"', max_tokens=3))
    assert "not valid JSON" in err["message"] and "utf-8" in err["message"]
    assert healthy(client)


@pytest.mark.parametrize("route", ROUTES)
def test_server_lone_surrogates_become_u_fffd(served, route):
    client, engine, loaded = served
    reply_ok(post(client, route, b'"x\\ud800y\\udfff\\ud800"', max_tokens=3), route)
    assert "x\ufffdy\ufffd\ufffd" in loaded.tokenizer.decode(engine.prompts[-1])


@pytest.mark.parametrize("route", ROUTES)
def test_server_nul_and_control_characters(served, route):
    client, engine, loaded = served
    reply_ok(post(client, route, json.dumps(CONTROL).encode(), max_tokens=3), route)
    assert CONTROL in loaded.tokenizer.decode(engine.prompts[-1])  # every byte reached the model
    # unescaped control characters are not JSON: a 400 that says so
    err = error_of(post(client, route, b'"a\x01b"', max_tokens=3))
    assert "Invalid control character" in err["message"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("n", [CTX_SERVER - 1, CTX_SERVER, CTX_SERVER + 1])
def test_server_prompt_at_and_past_the_context(served, route, n):
    client, _, loaded = served
    tok = loaded.tokenizer
    overhead = 0
    if route != "completions":  # the rendered chat prompt is what must fit
        overhead = len(loaded.chat_template().encode(tok, [{"role": "user", "content": ""}]))
    text = n_token_text(tok, n, overhead)
    r = post(client, route, json.dumps(text).encode())  # no max_tokens: what is left
    if n < CTX_SERVER:
        reply_ok(r, route)
        if route != "chat-stream":
            usage = r.json()["usage"]
            assert usage["prompt_tokens"] == n and usage["completion_tokens"] == 1
        return
    err = error_of(r)
    assert err["code"] == "context_length_exceeded"
    assert f"{CTX_SERVER} tokens" in err["message"] and f"{n} tokens" in err["message"]


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        (
            "/v1/chat/completions",
            b'{"model": "\\ud800", "messages": [{"role": "user", "content": "x"}]}',
            404,
        ),
        ("/v1/completions", b'{"model": "m\\udfff", "prompt": "x"}', 404),
        ("/v1/explain", b'{"prompt": "x", "\\ud800": 1}', 400),
    ],
)
def test_lone_surrogates_echoed_in_an_error_are_a_4xx_not_a_500(served, path, body, status):
    # These used to be 500s: the error message quoted the name, and JSON could not encode it.
    client, _, _ = served
    err = error_of(client.post(path, content=body), status)
    assert FFFD in err["message"]
    assert healthy(client)


def test_explain_route_and_cli_take_every_input_case(served, capsys, gguf_file):
    """/v1/explain (the explain page's API) and `pellucid explain --json` on the same cases.
    A lone surrogate used to reach the JSON encoder through the echoed prompt: a 500."""
    client, _, _ = served
    for raw, status in [
        (b'""', 400),
        (json.dumps(MB).encode(), 400),
        (b'"a\xffb"', 400),
        (b'"x\\ud800y"', 200),
        (json.dumps(CONTROL).encode(), 200),
    ]:
        r = client.post("/v1/explain", content=b'{"prompt": ' + raw + b"}")
        assert r.status_code == status, (raw[:20], r.text)
        if status == 400:
            assert "\n" not in error_of(r)["message"]
    assert r.json()["prompt"] == CONTROL
    r = client.post("/v1/explain", content=b'{"prompt": "x\\ud800y"}')
    assert r.json()["prompt"] == "x\ufffdy" and r.json()["tokens"]
    assert main(["explain", "x\ud800y", "--model", str(gguf_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt"] == "x\ufffdy"


# --- real bytes through a real process (slow: a Python start each) -------------------------------


def run_cli(args, stdin=b"", env_extra=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **(env_extra or {})}
    argv = [os.fsencode(sys.executable), b"-m", b"pellucid", *args]
    return subprocess.run(argv, input=stdin, capture_output=True, env=env, timeout=300)


@pytest.mark.slow
def test_real_argv_and_stdin_bytes(gguf_file, tok_file, tok):
    model = ["--model", str(gguf_file)]
    model = [os.fsencode(a) for a in model]
    flags = [b"--temperature", b"0", b"--max-new-tokens", b"3", b"--json"]
    r = run_cli([b"generate", b"a\xff\xfeb", *model, *flags])  # invalid UTF-8 in argv
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["prompt_ids"] == tok.encode("a\ufffd\ufffdb")
    r = run_cli(
        [b"tokenizer", b"encode", b"-", b"--tokenizer", os.fsencode(tok_file), b"--json"],
        stdin=CONTROL.encode() + b"\xff",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ids"] == tok.encode(CONTROL + FFFD)
    # chat under a strict UTF-8 stdin (most UTF-8 locales): invalid bytes, NUL, then on
    stdin = b"hi\xff there\n" + CONTROL.encode() + b"\nlast\n"
    r = run_cli(
        [b"chat", *model, b"--max-new-tokens", b"3", b"--stats"],
        stdin,
        {"PYTHONIOENCODING": "utf-8:strict"},
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr.count(b"[prompt ") == 3 and b"Traceback" not in r.stderr
