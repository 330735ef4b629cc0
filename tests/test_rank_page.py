"""The ranking page (`/rank`) driven by a real headless Chromium (RELIABILITY D7 for the page):
a person's clicks, keys and drags become a saved ranking that then appears in the exported pairs,
and hostile model output on the page stays inert text."""

import pytest
from serve_util import tiny_loaded
from test_web_ui import DOM_AUDIT, PAYLOADS, LiveServer, browser  # noqa: F401 (a fixture)

from pellucid.align.oracle import get_oracle, make_prompts
from pellucid.align.rank import export_pairs, sample_into
from pellucid.align.store import Store
from pellucid.data.preferences import read_pairs
from pellucid.infer.sampling import SamplingParams
from pellucid.serve.app import create_app
from pellucid.serve.rank import RankState, mount_rank


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded(context_len=256)


def serve(loaded, store, model):
    app = create_app(loaded, model_name="tiny")
    mount_rank(app, RankState(store, model, "tiny", "ada"))
    return LiveServer(app)


@pytest.fixture
def page(browser):  # noqa: F811
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    pg = context.new_page()
    pg.errors, pg.urls = [], []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.on("console", lambda m: m.type == "error" and pg.errors.append(m.text))
    pg.on("request", lambda r: pg.urls.append(r.url))
    yield pg
    context.close()


def card(page, where, n):
    """The card of reply number n in '#order' or '#pool'."""
    return page.locator(f"{where} .card", has=page.locator(".num", has_text=f"#{n}"))


def test_a_ranking_made_in_the_browser_appears_in_the_exported_pairs(tmp_path, loaded, page):
    rows = make_prompts(get_oracle("words"), 2, seed=3)
    store = Store(tmp_path / "s.sqlite")
    params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=1)
    template = loaded.chat_template()
    model = sample_into(store, loaded.model, loaded.tokenizer, template, "tiny", rows, 3, params)
    server = serve(loaded, store, model)
    try:
        page.goto(server.url + "/rank")
        page.wait_for_selector("#pool .card >> nth=2")
        assert page.input_value("#ranker") == "ada"  # the server's default name
        assert page.text_content("#prompt") == rows[0].prompt
        replies = [r.text for r in store.responses(1, model)]
        assert (
            card(page, "#pool", 1).locator(".text").text_content() == replies[0] or replies[0] == ""
        )
        card(page, "#pool", 2).click()  # a click places reply 2 first
        page.keyboard.press("3")  # a key places reply 3 next ...
        page.keyboard.press("t")  # ... tied with reply 2
        assert page.is_disabled("#save")  # reply 1 is not placed yet
        box = page.locator("#order").bounding_box()  # drag reply 1 below the others
        page.drag_and_drop(
            "#pool .card", "#order", target_position={"x": 20, "y": box["height"] - 3}
        )
        places = page.locator("#order .place").all_text_contents()
        assert places == ["1.", "=", "2."]
        assert page.locator("#order .num").all_text_contents() == ["#2", "#3", "#1"]
        page.keyboard.press("Backspace")  # take reply 1 back, then place it again by key
        assert page.locator("#pool .card").count() == 1
        page.keyboard.press("1")
        page.keyboard.press("Enter")
        page.wait_for_selector("#status:has-text('saved')")
        assert page.text_content("#prompt") == rows[1].prompt
        page.keyboard.press("s")  # skip the second prompt: nothing left
        page.wait_for_selector("#done:visible")
        page.click("#undo")  # the skip is taken back
        page.wait_for_selector("#work:visible")
        assert page.text_content("#prompt") == rows[1].prompt
        assert page.text_content("#status").startswith("1 left")

        export_pairs(store, tmp_path / "pairs.jsonl")
        got = {(p.prompt, p.chosen, p.rejected) for p in read_pairs(tmp_path / "pairs.jsonl")}
        want = {
            (rows[0].prompt, better, replies[0])
            for better in (replies[1], replies[2])
            if better and replies[0] and better != replies[0]
        }
        assert got == want and want  # 2 and 3 over 1; their tie implies no pair
        assert not page.errors, page.errors
        assert all(u.startswith(server.url) for u in page.urls)  # nothing from elsewhere
    finally:
        server.close()
        store.close()


def test_hostile_model_output_on_the_ranking_page_stays_inert(tmp_path, loaded, page):
    store = Store(tmp_path / "s.sqlite")
    model = store.add_model("hostile", {})
    prompt = store.add_prompt("<script>window.__x=1</script> rank these")
    store.add_responses(prompt, model, PAYLOADS)  # as if the model had written them
    server = serve(loaded, store, model)
    try:
        response = page.goto(server.url + "/rank")
        assert "script-src 'self'" in response.headers["content-security-policy"]
        page.wait_for_selector(f"#pool .card >> nth={len(PAYLOADS) - 1}")
        assert page.text_content("#prompt") == "<script>window.__x=1</script> rank these"
        shown = page.locator("#pool .card .text").all_text_contents()
        assert shown == PAYLOADS  # every payload on screen, as the text it is
        for n in range(1, len(PAYLOADS) + 1):
            page.keyboard.press(str(n))
        page.hover("#order .card >> nth=0")
        assert page.evaluate(DOM_AUDIT) == {"bad": [], "x": "undefined", "scripts": 2}
        page.click("#save")
        page.wait_for_selector("#done:visible")
        assert page.evaluate("typeof window.__x") == "undefined"
        assert not page.errors, page.errors  # no CSP violation either: nothing tried to run
        export_pairs(store, tmp_path / "pairs.jsonl")
        pairs = read_pairs(tmp_path / "pairs.jsonl")
        assert len(pairs) == len(PAYLOADS) * (len(PAYLOADS) - 1) // 2
        assert {p.chosen for p in pairs} == set(PAYLOADS[:-1])  # verbatim through the store
    finally:
        server.close()
        store.close()
