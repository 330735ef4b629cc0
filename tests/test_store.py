"""The SQLite ranking store (align/store.py): crash safety and concurrency (RELIABILITY B11), SQL
injection and schema integrity (D8), and the store's half of preference-data validation (A7)."""

import ast
import os
import random
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pellucid.align.store import MAX_TEXT_BYTES, SCHEMA_VERSION, Store, dense_ranks
from pellucid.errors import DataError

PKG = Path(__file__).resolve().parents[1] / "pellucid"
K = 4  # replies per prompt in these tests


def make(path, n_prompts=3, k=K):
    """A store with n_prompts prompts of k replies each; returns (store, model id, prompt ids,
    reply ids per prompt)."""
    store = Store(path)
    model = store.add_model("tiny", {"temperature": 1.0, "seed": 0})
    prompts = [store.add_prompt(f"prompt {i}") for i in range(n_prompts)]
    replies = [
        store.add_responses(p, model, [f"reply {j} to {p}" for j in range(k)]) for p in prompts
    ]
    return store, model, prompts, replies


def test_a_ranking_round_trips_with_ties_dense_ranks_and_who_when(tmp_path):
    store, model, prompts, replies = make(tmp_path / "s.sqlite")
    r = replies[0]
    ranking = store.save_ranking(prompts[0], model, "ada", {r[2]: 0, r[0]: 3, r[1]: 3, r[3]: 7})
    (got,) = store.rankings()
    assert got.id == ranking and got.ranker == "ada" and got.kind == "person"
    assert got.responses == [f"reply {j} to {prompts[0]}" for j in range(K)]
    assert got.ranks == [1, 1, 0, 2]  # renumbered densely, the tie kept
    when = store.db.execute("SELECT created_at FROM rankings").fetchone()[0]
    assert when.startswith(time.strftime("%Y-", time.gmtime())) and when.endswith("+00:00")
    oracle = store.save_ranking(
        prompts[1], model, "oracle:words", dict.fromkeys(replies[1], 0), "3 words"
    )
    kinds = store.db.execute("SELECT kind, note FROM rankings WHERE id = ?", (oracle,)).fetchone()
    assert kinds == ("oracle", "3 words")
    assert dense_ranks([5, 5, 0, 9]) == [1, 1, 0, 2]


def test_next_prompt_skip_and_undo_walk_the_queue(tmp_path):
    store, model, prompts, replies = make(tmp_path / "s.sqlite")
    assert store.next_prompt("ada", model) == (store.prompt(prompts[0]), 3)
    store.save_ranking(prompts[0], model, "ada", dict(zip(replies[0], range(K), strict=True)))
    store.save_ranking(prompts[1], model, "ada", None)  # a skip also moves on
    assert store.next_prompt("ada", model)[0].id == prompts[2]
    assert store.next_prompt("bob", model)[1] == 3  # each ranker has their own queue
    assert store.undo("ada") is not None  # takes back the skip: prompt 1 comes again
    assert store.next_prompt("ada", model) == (store.prompt(prompts[1]), 2)
    assert len(list(store.rankings("ada"))) == 1
    log = store.db.execute("SELECT action, ranker FROM actions").fetchall()
    assert log == [("undo", "ada")]  # the undo itself is recorded
    assert store.undo("bob") is None


def test_every_connection_has_wal_busy_timeout_foreign_keys_and_the_version(tmp_path):
    path = tmp_path / "s.sqlite"
    make(path)[0].close()
    for _ in range(2):  # a fresh store, then an existing one
        store = Store(path)

        def pragma(name, db=store.db):
            return db.execute(f"PRAGMA {name}").fetchone()[0]

        assert pragma("journal_mode") == "wal" and pragma("foreign_keys") == 1
        assert pragma("busy_timeout") == 30000 and pragma("user_version") == SCHEMA_VERSION
        assert pragma("synchronous") == 2  # FULL: a returned commit is on disk
        store.close()


def test_a_foreign_or_newer_file_is_refused_in_one_line(tmp_path):
    path = tmp_path / "s.sqlite"
    make(path)[0].close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(DataError, match="schema version 99, but this pellucid reads version 1"):
        Store(path)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(DataError, match="not a usable ranking store") as e:
        Store(junk)
    assert "\n" not in str(e.value)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(DataError, match="schema version 0"):
        Store(other)
    with pytest.raises(DataError, match="no such ranking store"):
        Store(tmp_path / "missing.sqlite", create=False)
    with pytest.raises(DataError, match="cannot open it"):
        Store(tmp_path / "no" / "folder" / "s.sqlite")


HOSTILE = [
    "'); DROP TABLE rankings;--",
    "%",
    "_",
    "a\x00b\x00",
    "\x00",
    "emoji 👩‍👩‍👧 and 🏳️‍🌈",
    '" OR 1=1 --',
    "x" * (1 << 20),  # 1 MB
]


def test_hostile_text_is_stored_and_returned_verbatim_and_tables_stay(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    model = store.add_model("'; DROP TABLE models;--", {"stop": ["%", "_"]})
    for i, text in enumerate(HOSTILE):
        prompt = store.add_prompt(text + str(i), answer=text)
        ids = store.add_responses(prompt, model, [text, text + "!", ""])
        assert [r.text for r in store.responses(prompt, model)] == [text, text + "!", ""]
        assert store.prompt(prompt).text == text + str(i) and store.prompt(prompt).answer == text
        who = text.replace("\x00", "")[:100] or "nul"
        store.save_ranking(prompt, model, who, {ids[0]: 0, ids[1]: 1})
    got = list(store.rankings())
    assert [g.prompt for g in got] == [t + str(i) for i, t in enumerate(HOSTILE)]
    assert [g.responses[:2] for g in got] == [[t, t + "!"] for t in HOSTILE]
    # the ranker names are literals, never patterns: '%' and '_' match only themselves
    assert [g.ranker for g in store.rankings("%")] == ["%"]
    assert store.undo("_") is not None and store.undo("_") is None
    assert store.counts()["rankings"] == len(HOSTILE) - 1
    tables = {r[0] for r in store.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"models", "prompts", "responses", "rankings", "ranks", "actions"}
    assert store.integrity() == "ok"


def test_text_the_store_cannot_hold_is_refused_naming_it(tmp_path):
    store, model, prompts, _ = make(tmp_path / "s.sqlite")
    with pytest.raises(DataError, match="response 1 is 10,485,760 bytes; the store holds at most"):
        store.add_responses(prompts[0], model, ["ok", "x" * (10 << 20)])
    with pytest.raises(DataError, match="lone surrogate"):
        store.add_prompt("bad \ud800")
    with pytest.raises(DataError, match="the prompt is empty"):
        store.add_prompt("")
    assert store.counts()["responses"] == 3 * K  # nothing of the refused sets went in
    assert MAX_TEXT_BYTES == 4 << 20


def test_the_schema_refuses_inconsistent_rows_itself(tmp_path):
    store, model, prompts, replies = make(tmp_path / "s.sqlite")
    ranking = store.save_ranking(prompts[0], model, "ada", {replies[0][0]: 0, replies[0][1]: 1})
    db = store.db
    now = "2026-01-01T00:00:00+00:00"
    bad = [  # each statement breaks one constraint
        (
            "INSERT INTO rankings (prompt_id, model_id, ranker, kind, skipped, created_at) "
            "VALUES (?, ?, 'ada', 'oracle', 0, ?)",
            (prompts[0], model, now),
        ),
        (
            "INSERT INTO rankings (prompt_id, model_id, ranker, kind, skipped, created_at) "
            "VALUES (?, ?, 'oracle:x', 'person', 0, ?)",
            (prompts[0], model, now),
        ),
        (
            "INSERT INTO rankings (prompt_id, model_id, ranker, kind, skipped, created_at) "
            "VALUES (?, ?, 'ada', 'person', 2, ?)",
            (prompts[0], model, now),
        ),
        (
            "INSERT INTO rankings (prompt_id, model_id, ranker, kind, skipped, created_at) "
            "VALUES (999, ?, 'ada', 'person', 0, ?)",
            (model, now),
        ),
        ("INSERT INTO ranks VALUES (?, ?, ?, ?, -1)", (ranking, replies[0][2], prompts[0], model)),
        # a reply of ANOTHER prompt in this ranking: the composite foreign key refuses it
        ("INSERT INTO ranks VALUES (?, ?, ?, ?, 0)", (ranking, replies[1][0], prompts[0], model)),
        ("INSERT INTO ranks VALUES (?, ?, ?, ?, 0)", (ranking, replies[1][0], prompts[1], model)),
        ("INSERT INTO models (spec, sampling, created_at) VALUES ('m', '{not json', ?)", (now,)),
        ("INSERT INTO prompts (text, created_at) VALUES ('p', 'yesterday')", ()),
    ]
    for sql, args in bad:
        with pytest.raises(sqlite3.IntegrityError):
            db.execute(sql, args)
    with pytest.raises(DataError, match="not all of them were sampled for prompt"):
        store.save_ranking(prompts[0], model, "ada", {replies[0][0]: 0, replies[1][0]: 1})
    with pytest.raises(DataError, match="has no prompt 999"):
        store.save_ranking(999, model, "ada", None)
    with pytest.raises(DataError, match="at least two responses"):
        store.save_ranking(prompts[0], model, "ada", {replies[0][0]: 0})
    with pytest.raises(DataError, match="integer >= 0"):
        store.save_ranking(prompts[0], model, "ada", {replies[0][0]: 0, replies[0][1]: -2})
    assert store.counts()["rankings"] == 1 and store.counts()["ranks"] == 2


def test_deleting_a_prompt_cascades_and_leaves_no_orphans(tmp_path):
    store, model, prompts, replies = make(tmp_path / "s.sqlite")
    for p, r in zip(prompts, replies, strict=True):
        store.save_ranking(p, model, "ada", dict(zip(r, range(K), strict=True)))
    store.db.execute("DELETE FROM prompts WHERE id = ?", (prompts[1],))
    counts = store.counts()
    assert counts["rankings"] == 2 and counts["ranks"] == 2 * K and counts["responses"] == 2 * K
    assert store.integrity() == "ok"  # integrity_check and foreign_key_check both clean


def test_import_is_all_or_nothing_with_the_row_named(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    good = [(f"f:{i}", "q", ["a", f"b{i}"], [0, 1]) for i in range(1, 4)]
    assert store.import_rankings(good, "import:f", "f") == 3
    before = store.counts()
    for bad_item, message in [
        (("f:3", "q", ["a", "a"], [0, 1]), "f:3: the same response is ranked twice"),
        (("f:3", "", ["a", "b"], [0, 1]), "f:3: the prompt is empty"),
        (("f:3", "q", ["a", "x" * (10 << 20)], [0, 1]), "f:3: a response is 10,485,760 bytes"),
        (("f:3", "q", ["a", "\udfff"], [0, 1]), "f:3: a response is not valid Unicode"),
    ]:
        with pytest.raises(DataError, match=message) as e:
            store.import_rankings([good[0], good[1], bad_item], "import:f", "f")
        assert "nothing was imported" in str(e.value)
        assert store.counts() == before
    # the same reply text in several pairs of one prompt is stored once
    assert store.counts()["responses"] == 4


def test_static_scan_finds_only_parameterised_sql():
    """Every execute()'s SQL in the package is a literal (or a name bound only to literals):
    values can reach SQLite only as `?` parameters, never as part of the SQL text (D8)."""
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        source = path.read_text()
        if "sqlite3" in source:
            offenders += [f"{path.name}:{line}" for line in unparameterised(source)]
    assert not offenders, offenders
    assert any("sqlite3" in p.read_text() for p in PKG.rglob("*.py"))  # the scan saw the store
    # and the scan bites: each of these builds SQL text from a value
    for snippet in [
        'def f(db, x):\n    db.execute(f"SELECT * FROM t WHERE a = {x}")',
        'def f(db, x):\n    db.execute("SELECT * FROM t WHERE a = %s" % x)',
        'def f(db, x):\n    sql = "SELECT " + x\n    db.execute(sql)',
        'def f(db, x):\n    db.executemany("INSERT INTO t VALUES ({})".format(x), [])',
        'def f(db, x):\n    sql = "SELECT 1"\n    sql = x\n    db.execute(sql)',
        'def f(self, x):\n    self._read("SELECT * FROM t WHERE a = " + x)',
        "def g(db, sql):\n    db.execute(sql)",
    ]:
        assert unparameterised(snippet), snippet


SINKS = ("execute", "executemany", "executescript", "_read")  # (store._read passes SQL on)


def unparameterised(source):
    """Line numbers of calls that run SQL (SINKS) whose SQL text is not constant. Inside a sink
    of our own (`_read`), its SQL parameter is allowed: each call of it is checked instead."""
    tree = ast.parse(source)
    constants = {  # module-level NAME = "literal"
        t.id
        for node in tree.body
        if isinstance(node, ast.Assign) and is_str(node.value)
        for t in node.targets
        if isinstance(t, ast.Name)
    }
    bad = []
    for func in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
        for call in ast.walk(func):
            if not (
                isinstance(call, ast.Call)
                and isinstance(call.func, ast.Attribute)
                and call.func.attr in SINKS
                and call.args
            ):
                continue
            sql = call.args[0]
            if is_str(sql) or (
                isinstance(sql, ast.Name) and bound_to_literals(func, sql.id, constants)
            ):
                continue
            params = [a.arg for a in func.args.args]
            if func.name in SINKS and isinstance(sql, ast.Name) and sql.id in params:
                continue
            bad.append(call.lineno)
    return bad


def is_str(node):
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def bound_to_literals(func, name, constants):
    """Every binding of `name` in `func` is a string literal, or a loop over a module-level
    literal's .split(...); with no binding in func, a module-level literal."""
    bindings = 0
    for node in ast.walk(func):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            bindings += 1
            if not is_str(node.value):
                return False
        if (
            isinstance(node, ast.For)
            and isinstance(node.target, ast.Name)
            and node.target.id == name
        ):
            bindings += 1
            it = node.iter
            if not (
                isinstance(it, ast.Call)
                and isinstance(it.func, ast.Attribute)
                and it.func.attr == "split"
                and isinstance(it.func.value, ast.Name)
                and it.func.value.id in constants
            ):
                return False
    return bindings > 0 or name in constants


# --- crash and concurrency (B11) ---------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys, time
    from pellucid.align.store import Store
    store = Store(sys.argv[1])
    model = store.add_model("tiny", {"t": 1})
    k = int(sys.argv[2])
    print("ready", flush=True)
    deadline = time.monotonic() + float(sys.argv[5])
    for i in range(int(sys.argv[3])):
        if time.monotonic() > deadline:
            break
        prompt = store.add_prompt(f"prompt {sys.argv[4]}-{i}")
        ids = store.add_responses(prompt, model, [f"reply {j}" for j in range(k)])
        ranking = store.save_ranking(prompt, model, sys.argv[4], {r: j for j, r in enumerate(ids)})
        print(ranking, flush=True)  # acknowledged: the commit has returned
    """
)


def writer(path, name, n, k=K, seconds=1e9):
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(k), str(n), name, str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_kill_9_mid_ranking_loses_no_committed_ranking(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "s.sqlite"
    acknowledged = set()
    for trial in range(10):
        proc = writer(path, f"w{trial}", 1000)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.02, 0.4))
        proc.kill()  # SIGKILL: no cleanup, no atexit, mid-transaction at any statement
        out, _ = proc.communicate()
        acknowledged |= {int(x) for x in out.split()}
        with Store(path) as store:
            assert store.integrity() == "ok"
            ranks = dict(store.db.execute("SELECT ranking_id, count(*) FROM ranks GROUP BY 1"))
            skips = store.db.execute("SELECT count(*) FROM rankings WHERE skipped = 1").fetchone()
            ids = {r[0] for r in store.db.execute("SELECT id FROM rankings")}
        assert acknowledged <= ids  # every committed ranking is there ...
        assert set(ranks.values()) == {K} and set(ranks) == ids and skips == (0,)  # ... whole
    assert len(acknowledged) > 10  # the writers got somewhere before each kill


def test_concurrent_writers_never_see_database_is_locked(tmp_path):
    """8 threads and 2 processes write rankings as fast as they can while a reader reads."""
    path = tmp_path / "s.sqlite"
    Store(path).close()
    seconds, errors, acked = float(os.environ.get("PELLUCID_B11_SECONDS", 3)), [], []
    stop, reading, reads = threading.Event(), threading.Event(), []

    def thread_writer(name):
        with Store(path) as store:
            model = store.add_model("tiny", {"t": 1})
            n = 0
            while not stop.is_set():
                try:
                    prompt = store.add_prompt(f"{name} {n}")
                    ids = store.add_responses(prompt, model, ["a", "b"])
                    store.save_ranking(prompt, model, name, {ids[0]: 0, ids[1]: 1})
                    n += 1
                except Exception as e:
                    errors.append(repr(e))
            acked.append(n)

    def reader():  # the page's API, reading while everyone writes
        from fastapi import FastAPI
        from fastapi.testclient import TestClient

        from pellucid.serve.rank import RankState, mount_rank

        with Store(path) as store:
            app = FastAPI()
            mount_rank(app, RankState(store, 1, "tiny", "t0"))
            with TestClient(app) as client:
                while not stop.is_set():
                    res = client.get("/v1/rank/next?ranker=reader")
                    if res.status_code != 200:
                        errors.append(res.text)
                    reads.append(res.json()["remaining"])
                    reading.set()

    procs = [writer(path, f"p{i}", 10**6, k=2, seconds=seconds) for i in range(2)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    threads = [threading.Thread(target=thread_writer, args=(f"t{i}",)) for i in range(8)]
    threads.append(threading.Thread(target=reader))
    for t in threads:
        t.start()
    assert reading.wait(60)  # the reader is up (a loaded machine starts threads slowly)
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads) and len(acked) == 8
    proc_acked = 0
    for p in procs:  # they stop by themselves after `seconds`
        # (read through the text buffer that readline() filled: communicate(timeout=...)
        # would read the pipe underneath it and lose what was buffered)
        proc_acked += len(p.stdout.read().split())
        assert p.wait(60) == 0  # a "database is locked" would have been a traceback
    assert errors == []
    with Store(path) as store:
        total = store.counts()["rankings"]
        assert store.integrity() == "ok"
    assert total == sum(acked) + proc_acked  # every acknowledged write, and nothing else
    assert sum(acked) > 0 and proc_acked > 0  # both threads and processes got to write
    assert len(reads) > 1 and reads == sorted(reads)  # the page saw the queue grow, never shrink
