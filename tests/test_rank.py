"""Collecting rankings (align/rank.py, serve/rank.py, cli/rank.py): seeded sampling through the
Engine, the oracle standing in for a person, the page's API, the terminal, export and import of
preference pairs (bad JSONL reported by line; A7's import half)."""

import json
import shutil
import threading
from dataclasses import replace

import pytest
from fastapi.testclient import TestClient
from serve_util import tiny_loaded
from test_resolve import CFG, TEMPLATE, tiny_model, tiny_tokenizer

from pellucid.align.oracle import get_oracle, make_prompts
from pellucid.align.pairs import sample_responses
from pellucid.align.rank import (
    export_pairs,
    import_pairs,
    parse_order,
    rank_with_oracle,
    ranks_from_groups,
    sample_into,
)
from pellucid.align.store import Store
from pellucid.cli import main
from pellucid.cli.rank import inert
from pellucid.data.preferences import read_pairs, write_prompts
from pellucid.errors import DataError
from pellucid.infer.sampling import SamplingParams
from pellucid.serve.app import create_app
from pellucid.serve.rank import RankState, mount_rank
from pellucid.weights.gguf import save_gguf

PARAMS = SamplingParams(temperature=1.0, max_new_tokens=8, seed=7)


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded(context_len=256)


@pytest.fixture(scope="module")
def rows():
    return make_prompts(get_oracle("words"), 3, seed=0)


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, loaded, rows):
    """A store file with 4 replies to each row sampled once (sampling is the slow part); tests
    get a copy."""
    path = tmp_path_factory.mktemp("sampled") / "s.sqlite"
    with Store(path) as store:
        model = sample(loaded, store, rows, k=4)
    return path, model


@pytest.fixture
def copy(sampled, tmp_path):
    """A fresh Store on a copy of the sampled one, and its model id."""
    path = tmp_path / "copy.sqlite"
    shutil.copy(sampled[0], path)  # closed, so the WAL is folded back into the file
    with Store(path) as store:
        yield store, sampled[1]


def sample(loaded, store, rows, k=3, params=PARAMS, batch_prompts=8):
    return sample_into(
        store,
        loaded.model,
        loaded.tokenizer,
        loaded.chat_template(),
        "tiny",
        rows,
        k,
        params,
        batch_prompts=batch_prompts,
    )


def all_replies(store, model):
    out = []
    for i in range(1, store.counts()["prompts"] + 1):
        out.append([r.text for r in store.responses(i, model)])
    return out


def test_parse_order_reads_places_and_ties():
    assert parse_order("2 1=3 4", 4) == [1, 0, 1, 2]
    assert parse_order("3>1>2", 3) == [1, 2, 0]
    assert parse_order("1=2=3", 3) == [0, 0, 0]
    for text, message in [
        ("1 2", "missing: 3"),
        ("1 1 2 3", "1 appears twice"),
        ("1 2 x", "'x' is not a reply number"),
        ("1 2 9", "reply numbers go from 1 to 3"),
        ("", "missing: 1 2 3"),
    ]:
        with pytest.raises(DataError, match=message):
            parse_order(text, 3)
    assert ranks_from_groups([["b"], ["a", "c"]]) == {"b": 0, "a": 1, "c": 1}


def test_sampling_is_seeded_per_prompt_and_a_resumed_run_samples_nothing_twice(
    tmp_path, loaded, rows, copy
):
    whole_store, whole_model = copy
    whole = all_replies(whole_store, whole_model)
    settings = json.loads(whole_store.db.execute("SELECT sampling FROM models").fetchone()[0])
    assert settings["k"] == 4 and settings["seed"] == 7 and settings["temperature"] == 1.0
    assert all(len(r) == 4 for r in whole) and len({t for r in whole for t in r}) > 8
    # the same replies as align/pairs.sample_responses draws for the same prompts and seed
    assert (
        sample_responses(loaded.model, loaded.tokenizer, loaded.chat_template(), rows, 4, PARAMS)
        == whole
    )
    with Store(tmp_path / "two.sqlite") as two:  # stopped after one prompt, then run again
        sample(loaded, two, rows[:1], k=4)
        before = two.counts()["responses"]
        model = sample(loaded, two, rows, k=4, batch_prompts=1)  # and batched otherwise
        assert two.counts()["responses"] == before + 2 * 4  # only the two new prompts
        assert all_replies(two, model) == whole  # replies depend on the seed, not the run
        other = sample(loaded, two, rows[:1], k=4, params=replace(PARAMS, seed=8))
        assert other != model and all_replies(two, other)[0] != whole[0]
        with pytest.raises(DataError, match="--k must be at least 2"):
            sample(loaded, two, rows, k=1)


def test_the_oracle_ranks_every_prompt_and_its_pairs_agree_with_its_scores(tmp_path, rows, copy):
    store, model = copy
    oracle = get_oracle("words")
    assert rank_with_oracle(store, model, oracle) == len(rows)
    assert rank_with_oracle(store, model, oracle) == 0  # nothing left for it
    who = store.db.execute("SELECT DISTINCT ranker, kind, note FROM rankings").fetchall()
    assert who == [("oracle:words", "oracle", oracle.description)]
    counts = export_pairs(store, tmp_path / "pairs.jsonl")
    pairs = read_pairs(tmp_path / "pairs.jsonl")
    assert counts["rankings"] == len(rows) and counts["pairs"] == len(pairs) > 0
    answer = {r.prompt: r for r in rows}
    for p in pairs:  # each pair is one the oracle's own scores imply
        row = answer[p.prompt]
        assert oracle.score(p.prompt, p.chosen, row.answer) > oracle.score(
            p.prompt, p.rejected, row.answer
        )
    # and a round trip through a pairs file gives the same pairs back
    with Store(tmp_path / "b.sqlite") as b:
        assert import_pairs(b, tmp_path / "pairs.jsonl") == len(pairs)
        export_pairs(b, tmp_path / "b.jsonl")
        assert {r[0] for r in b.db.execute("SELECT ranker FROM rankings")} == {"import:pairs.jsonl"}
        assert b.db.execute("SELECT DISTINCT kind FROM rankings").fetchall() == [("import",)]
    assert (tmp_path / "pairs.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


def test_export_leaves_out_pairs_with_an_empty_reply_and_counts_them(tmp_path):
    with Store(tmp_path / "s.sqlite") as store:
        model = store.add_model("m", {})
        prompt = store.add_prompt("p")
        ids = store.add_responses(prompt, model, ["good", "", "ok", "ok"])
        store.save_ranking(prompt, model, "ada", {ids[0]: 0, ids[1]: 2, ids[2]: 1, ids[3]: 0})
        counts = export_pairs(store, tmp_path / "pairs.jsonl")
    got = [(p.chosen, p.rejected) for p in read_pairs(tmp_path / "pairs.jsonl")]
    # "ok" (#4) over "ok" (#3) is no preference at all: the same text on both sides
    assert sorted(got) == [("good", "ok")]
    assert counts == {"rankings": 1, "pairs": 1, "left_out_empty": 2}  # ("good", ""), ("ok", "")


BAD_LINES = [  # (bad line, what the one-line error must say about line 3)
    ("{not json", "pairs.jsonl:3: not valid JSON"),
    ('{"prompt": "p", "chosen": "a", "rejected": "a"}', "pairs.jsonl:3: fields 'chosen' and"),
    ('{"prompt": "p", "chosen": "a"}', "pairs.jsonl:3: field 'rejected'"),
    ('{"prompt": "p", "chosen": "", "rejected": "a"}', "pairs.jsonl:3: field 'chosen' is empty"),
    ('{"prompt": "p", "chosen": 5, "rejected": "a"}', "pairs.jsonl:3: field 'chosen' must be"),
    ('["p", "a", "b"]', "pairs.jsonl:3: expected a JSON object"),
    ('{"prompt": "p", "chosen": "\\ud800", "rejected": "a"}', "pairs.jsonl:3: a response is not"),
    (json.dumps({"prompt": "p", "chosen": "x" * (10 << 20), "rejected": "a"}), "pairs.jsonl:3: a"),
]


@pytest.mark.parametrize("bad,message", BAD_LINES)
def test_bad_pairs_jsonl_is_reported_by_line_and_nothing_is_imported(
    tmp_path, capsys, bad, message
):
    good = [json.dumps({"prompt": "p", "chosen": f"good {i}", "rejected": "bad"}) for i in range(3)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join([good[0], good[1], bad, good[2]]) + "\n")
    db = tmp_path / "s.sqlite"
    assert main(["prefs", "import", "--db", str(db), str(good_file(tmp_path))]) == 0
    assert main(["prefs", "import", "--db", str(db), str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("pellucid: error:")
    with Store(db) as store:
        assert store.counts()["rankings"] == 1  # only the earlier good file's pair


def good_file(tmp_path):
    path = tmp_path / "good.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "yes", "rejected": "no"}) + "\n")
    return path


# --- the page's API -----------------------------------------------------------------------------


@pytest.fixture
def api(loaded, copy):
    store, model = copy
    app = create_app(loaded, model_name="tiny")
    mount_rank(app, RankState(store, model, "tiny", "ada"))
    with TestClient(app, base_url="http://localhost") as client:
        yield client, store, model


def test_the_api_serves_next_saves_skips_and_undoes(api):
    client, store, model = api
    first = client.get("/v1/rank/next").json()
    assert first["ranker"] == "ada" and first["remaining"] == 3 and first["model"] == "tiny"
    ids = [r["id"] for r in first["responses"]]
    assert [r["text"] for r in first["responses"]] == [
        r.text for r in store.responses(first["prompt"]["id"], model)
    ]
    body = {"prompt_id": first["prompt"]["id"], "order": [[ids[2]], [ids[0], ids[1]]]}
    saved = client.post("/v1/rank", json=body)
    assert saved.status_code == 200 and saved.json()["skipped"] is False
    (ranking,) = store.rankings("ada")
    assert ranking.ranks == [1, 1, 0]
    second = client.get("/v1/rank/next").json()
    assert second["remaining"] == 2 and second["prompt"]["id"] != first["prompt"]["id"]
    for _ in range(2):
        pid = client.get("/v1/rank/next").json()["prompt"]["id"]
        assert client.post("/v1/rank", json={"prompt_id": pid, "skip": True}).json()["skipped"]
    assert client.get("/v1/rank/next").json() == {
        "model": "tiny",
        "ranker": "ada",
        "remaining": 0,
        "prompt": None,
        "responses": [],
    }
    assert client.get("/v1/rank/next?ranker=bob").json()["remaining"] == 3
    assert client.post("/v1/rank/undo", json={}).json()["undone"] is not None
    assert client.get("/v1/rank/next").json()["remaining"] == 1
    page = client.get("/rank")
    assert (
        page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    )


def test_the_api_refuses_bad_rankings_with_a_400_naming_the_problem(api):
    client, store, model = api
    first = client.get("/v1/rank/next").json()
    pid, ids = first["prompt"]["id"], [r["id"] for r in first["responses"]]
    other = store.responses(pid + 1, model)[0].id
    for body, message in [
        ({"prompt_id": pid, "order": [[ids[0]], [ids[0]]]}, "appears twice"),
        ({"prompt_id": pid, "order": [[ids[0]], [other]]}, "not all of them were sampled"),
        ({"prompt_id": 999, "skip": True}, "has no prompt 999"),
        ({"prompt_id": pid, "order": [[ids[0]]]}, "at least two responses"),
        ({"prompt_id": pid, "order": "1 2"}, "'order' must be a list"),
        ({"prompt_id": "1", "skip": True}, "'prompt_id' must be an integer"),
        ({"prompt_id": pid, "skip": True, "ranker": "oracle:me"}, "'oracle:' are reserved"),
        ({"prompt_id": pid, "skip": True, "ranker": "a\nb"}, "none a control"),
        ({"prompt_id": pid, "order": [[], ids]}, "group 1 of the order is empty"),
    ]:
        res = client.post("/v1/rank", json=body)
        assert res.status_code == 400, body
        assert message in res.json()["error"]["message"]
    assert client.post("/v1/rank", content=b"[1]").status_code == 400
    huge = {"prompt_id": pid, "order": [ids], "pad": "x" * (10 << 20)}
    assert client.post("/v1/rank", json=huge).status_code == 413  # the server's body limit
    assert client.get("/v1/rank/next?ranker=import:x").status_code == 400
    assert store.counts()["rankings"] == 0


# --- the command line ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, rows):
    folder = tmp_path_factory.mktemp("rank")
    model = save_gguf(
        tiny_model(replace(CFG, context_len=256)),
        folder / "tiny.gguf",
        tokenizer=tiny_tokenizer(),
        chat_template=TEMPLATE,
    )
    write_prompts(folder / "prompts.jsonl", rows[:2])
    return folder, model


def rank_argv(folder, model, db, *extra):
    return [
        "rank",
        "--model",
        str(model),
        "--quant",
        "fp32",
        "--prompts",
        str(folder / "prompts.jsonl"),
        "--db",
        str(db),
        "--k",
        "3",
        "--max-new-tokens",
        "8",
        *extra,
    ]


def test_rank_loads_and_samples_in_a_thread_that_ends_before_the_page_is_served(
    tmp_path, cli_files, monkeypatch
):
    """The main thread must not run the model: the OpenMP pool it would keep beside the serve
    worker's made the page's chat decode at a third of the speed (cli/serve.py)."""
    import uvicorn

    import pellucid.cli.rank as cli_rank

    folder, model = cli_files
    runs, real_load = [], cli_rank.load
    monkeypatch.setattr(
        cli_rank, "load", lambda args: runs.append(threading.current_thread()) or real_load(args)
    )
    served = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: served.append(sockets))
    assert main(rank_argv(folder, model, tmp_path / "p.sqlite", "--port", "0")) == 0
    assert len(runs) == 1 and len(served) == 1
    assert runs[0] is not threading.main_thread() and not runs[0].is_alive()
    with Store(tmp_path / "p.sqlite") as store:  # the replies were sampled and saved
        assert store.counts()["responses"] == 2 * 3


def test_rank_with_an_oracle_then_export_from_the_command_line(tmp_path, cli_files, capsys):
    folder, model = cli_files
    db = tmp_path / "p.sqlite"
    assert main(rank_argv(folder, model, db, "--oracle", "words")) == 0
    assert "oracle:words ranked 2 prompts" in capsys.readouterr().out
    out = tmp_path / "pairs.jsonl"
    assert main(["prefs", "export", "--db", str(db), "--out", str(out), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["rankings"] == 2 and counts["pairs"] == len(read_pairs(out))
    assert main(["prefs", "export", "--db", str(tmp_path / "no.sqlite"), "--out", str(out)]) == 2
    assert "no such ranking store" in capsys.readouterr().err
    assert main(rank_argv(folder, model, db, "--oracle", "wrds")) == 2
    assert "did you mean 'words'" in capsys.readouterr().err


def test_rank_in_the_terminal_saves_skips_undoes_and_shows_model_text_inert(
    tmp_path, cli_files, capsys, monkeypatch
):
    folder, model = cli_files
    db = tmp_path / "p.sqlite"
    typed = iter(["s", "u", "2 1=3", "1 1 2", "3 2 1"])

    def read(prompt=""):
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", read)
    assert main(rank_argv(folder, model, db, "--terminal", "--ranker", "ada")) == 0
    out = capsys.readouterr().out
    assert "appears twice" in out and "took back your last ranking" in out
    assert "nothing left to rank as ada" in out
    with Store(db) as store:
        got = list(store.rankings())
        assert [(g.ranker, g.ranks) for g in got] == [("ada", [1, 0, 1]), ("ada", [2, 1, 0])]
        assert store.counts()["rankings"] == 2  # the skip was undone
    assert inert("ok\x1b[2J\x07 done\n\tnext") == "ok\\x1b[2J\\x07 done\n\tnext"
    assert main(rank_argv(folder, model, db, "--terminal", "--ranker", "oracle:x")) == 2
