"""The ranking store: prompts, the responses sampled for them, and people's (or oracles') rankings,
in one SQLite file.

    store = Store("prefs.sqlite")
    model = store.add_model("smollm2-135m-instruct", {"temperature": 1.0, "seed": 0})
    prompt = store.add_prompt("Name a colour.")
    ids = store.add_responses(prompt, model, ["Red.", "Blue is a colour.", "Hm."])
    store.save_ranking(prompt, model, "ada", {ids[1]: 0, ids[0]: 1, ids[2]: 1})   # a tie at 1
    store.undo("ada")                                                         # took it back

What makes it safe to stop at any moment (RELIABILITY B11, D8):
- Every write is ONE transaction, opened with `BEGIN IMMEDIATE` (the write lock is taken up
  front, so two writers never deadlock half-way) and committed before the call returns; with
  `synchronous=FULL` a returned call is on disk. A killed process leaves each ranking wholly
  there or wholly absent.
- WAL mode (readers never block the writer) and `busy_timeout` (a writer waits for the lock
  instead of failing with "database is locked"), set on every connection, as is
  `foreign_keys=ON` (SQLite leaves it off by default).
- The schema checks itself: CHECKs on every field, FOREIGN KEYs with ON DELETE CASCADE (deleting
  a prompt takes its responses and rankings with it, never leaving orphans), and composite keys
  so that a ranking can only rank responses sampled for its own prompt by its own model.
  `PRAGMA user_version` holds the schema version; a file from another version is refused.
- SQL text is constant: every value goes in through `?` parameters (a test scans for that).

A ranking gives each response it covers a rank, 0 = best; equal ranks are a tie. A skip is a
ranking with no ranks (the person saw the prompt and passed). Who ranked is a person's name, or
`oracle:NAME` for a program standing in for one (its stated preference kept in `note`), or
`import:FILE` for pairs read from a file; `kind` says which, and a CHECK ties it to the prefix.
Undo deletes the ranker's latest ranking and logs that it did, in the same transaction.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pellucid.errors import DataError

SCHEMA_VERSION = 1  # PRAGMA user_version; SCHEMA below sets it (SQL text holds no variables)
MAX_TEXT_BYTES = 4 << 20  # a prompt or response larger than this is refused (A7: 10 MB is);
# the CHECKs below spell it out as 4194304 (4 << 20)
# How long a writer waits for the others' transactions before failing. SQLite's busy handler is
# not a queue (a waiter sleeps and retries; a writer that just committed often wins again), and a
# commit waits for fsync (~7 ms here), so under many flat-out writers one can wait seconds: it
# should wait, not fail with "database is locked" (B11). A person's save is one commit.
BUSY_TIMEOUT_S = 30.0
KINDS = ("person", "oracle", "import")

SCHEMA = """
CREATE TABLE models (
    id INTEGER PRIMARY KEY,
    spec TEXT NOT NULL CHECK (spec <> ''),
    sampling TEXT NOT NULL CHECK (json_valid(sampling)),
    created_at TEXT NOT NULL CHECK (created_at GLOB '[0-9][0-9][0-9][0-9]-*'),
    UNIQUE (spec, sampling)
);
CREATE TABLE prompts (
    id INTEGER PRIMARY KEY,
    text TEXT NOT NULL UNIQUE CHECK (text <> '' AND length(CAST(text AS BLOB)) <= 4194304),
    answer TEXT CHECK (answer IS NULL OR length(CAST(answer AS BLOB)) <= 4194304),
    created_at TEXT NOT NULL CHECK (created_at GLOB '[0-9][0-9][0-9][0-9]-*')
);
CREATE TABLE responses (
    id INTEGER PRIMARY KEY,
    prompt_id INTEGER NOT NULL REFERENCES prompts (id) ON DELETE CASCADE,
    model_id INTEGER NOT NULL REFERENCES models (id) ON DELETE CASCADE,
    idx INTEGER NOT NULL CHECK (idx >= 0),
    text TEXT NOT NULL CHECK (length(CAST(text AS BLOB)) <= 4194304),
    created_at TEXT NOT NULL CHECK (created_at GLOB '[0-9][0-9][0-9][0-9]-*'),
    UNIQUE (prompt_id, model_id, idx),
    UNIQUE (id, prompt_id, model_id)
);
CREATE TABLE rankings (
    id INTEGER PRIMARY KEY,
    prompt_id INTEGER NOT NULL REFERENCES prompts (id) ON DELETE CASCADE,
    model_id INTEGER NOT NULL REFERENCES models (id) ON DELETE CASCADE,
    ranker TEXT NOT NULL CHECK (ranker <> '' AND length(ranker) <= 200),
    kind TEXT NOT NULL CHECK (kind IN ('person', 'oracle', 'import')),
    skipped INTEGER NOT NULL CHECK (skipped IN (0, 1)),
    note TEXT,
    created_at TEXT NOT NULL CHECK (created_at GLOB '[0-9][0-9][0-9][0-9]-*'),
    CHECK ((kind = 'oracle') = (substr(ranker, 1, 7) = 'oracle:')),
    CHECK ((kind = 'import') = (substr(ranker, 1, 7) = 'import:')),
    UNIQUE (id, prompt_id, model_id)
);
CREATE TABLE ranks (
    ranking_id INTEGER NOT NULL,
    response_id INTEGER NOT NULL,
    prompt_id INTEGER NOT NULL,
    model_id INTEGER NOT NULL,
    rank INTEGER NOT NULL CHECK (rank >= 0),
    PRIMARY KEY (ranking_id, response_id),
    FOREIGN KEY (ranking_id, prompt_id, model_id)
        REFERENCES rankings (id, prompt_id, model_id) ON DELETE CASCADE,
    FOREIGN KEY (response_id, prompt_id, model_id)
        REFERENCES responses (id, prompt_id, model_id) ON DELETE CASCADE
);
CREATE TABLE actions (
    id INTEGER PRIMARY KEY,
    action TEXT NOT NULL CHECK (action IN ('undo')),
    ranker TEXT NOT NULL CHECK (ranker <> ''),
    ranking_id INTEGER NOT NULL,
    created_at TEXT NOT NULL CHECK (created_at GLOB '[0-9][0-9][0-9][0-9]-*')
);
CREATE INDEX rankings_by_ranker ON rankings (ranker, id);
CREATE INDEX ranks_by_response ON ranks (response_id);
CREATE INDEX responses_by_model ON responses (model_id);
PRAGMA user_version = 1;
"""


@dataclass(frozen=True)
class Prompt:
    id: int
    text: str
    answer: str | None


@dataclass(frozen=True)
class Response:
    id: int
    text: str


@dataclass(frozen=True)
class Ranking:
    """One saved, non-skipped ranking with what it ranked: responses[i] has ranks[i]."""

    id: int
    prompt: str
    responses: list[str]
    ranks: list[int]
    ranker: str
    kind: str


def now() -> str:
    """The time of a write, UTC, ISO 8601 to the millisecond."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def check_text(value: object, what: str, *, empty_ok: bool = True) -> str:
    """A string the store can hold verbatim (any Unicode, NUL included, up to MAX_TEXT_BYTES of
    UTF-8), or a DataError naming `what`."""
    if not isinstance(value, str):
        raise DataError(f"{what} must be a string, got {type(value).__name__}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as e:  # a lone surrogate: UTF-8 cannot hold it, nor can SQLite
        raise DataError(f"{what} is not valid Unicode (a lone surrogate at {e.start})") from None
    if size > MAX_TEXT_BYTES:
        raise DataError(f"{what} is {size:,} bytes; the store holds at most {MAX_TEXT_BYTES:,}")
    if not empty_ok and not value:
        raise DataError(f"{what} is empty")
    return value


def ranker_kind(ranker: str) -> str:
    """'oracle' for `oracle:NAME`, 'import' for `import:FILE`, else 'person' (checked)."""
    check_text(ranker, "the ranker's name", empty_ok=False)
    if len(ranker) > 200 or not ranker.strip() or any(ord(c) < 32 or c == "\x7f" for c in ranker):
        raise DataError(f"ranker name {ranker[:40]!r} must be 1-200 characters, none a control")
    return next((k for k in KINDS[1:] if ranker.startswith(k + ":")), "person")


def dense_ranks(ranks: Sequence[int]) -> list[int]:
    """Ranks renumbered 0, 1, 2, ... in order, ties kept: [0, 0, 2, 5] -> [0, 0, 1, 2]."""
    order = {r: i for i, r in enumerate(sorted(set(ranks)))}
    return [order[r] for r in ranks]


class Store:
    """One SQLite ranking store. Safe to share between threads (each call holds a lock) and to
    open from several processes at once (SQLite's own locking, WAL mode)."""

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        """Open (with create, make) the store at `path`; DataError for a file that is not one."""
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise DataError(f"{self.path}: no such ranking store (make one with `pellucid rank`)")
        self._lock = threading.Lock()
        try:
            # isolation_level=None: no implicit transactions; each write opens its own below.
            self.db = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT_S,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as e:  # e.g. its folder does not exist
            raise DataError(f"{self.path}: cannot open it ({e})") from None
        try:
            self._setup()
        except BaseException as e:
            self.db.close()
            if isinstance(e, sqlite3.DatabaseError):
                raise DataError(f"{self.path}: not a usable ranking store ({e})") from None
            raise

    def _setup(self) -> None:
        """The connection's settings (SQLite keeps none of these but WAL), then the schema."""
        self.db.execute("PRAGMA busy_timeout = 30000")  # = BUSY_TIMEOUT_S, in ms
        self.db.execute("PRAGMA foreign_keys = ON")
        self.db.execute("PRAGMA synchronous = FULL")
        if self.db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            self.db.execute("PRAGMA journal_mode = WAL")
        self._migrate()

    def _migrate(self) -> None:
        with self._write() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = db.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'")
            if version == 0 and tables.fetchone()[0] == 0:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
            elif version != SCHEMA_VERSION:
                raise DataError(
                    f"{self.path}: schema version {version}, but this pellucid reads version "
                    f"{SCHEMA_VERSION} (a ranking store made by another version, or another file)"
                )

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error."""
        with self._lock:
            try:
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    yield self.db
                    self.db.execute("COMMIT")
                finally:
                    if self.db.in_transaction:  # an error, or an interrupt: nothing of it stays
                        self.db.execute("ROLLBACK")
            except sqlite3.IntegrityError as e:
                raise DataError(
                    f"{self.path}: the store's schema refused the write ({e})"
                ) from None
            except sqlite3.OperationalError as e:  # e.g. still locked after BUSY_TIMEOUT_S
                raise DataError(f"{self.path}: {e}") from None

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            return self.db.execute(sql, args).fetchall()

    # --- what was sampled ----------------------------------------------------------------------

    def add_model(self, spec: str, sampling: Mapping[str, Any]) -> int:
        """The id of (model spec, sampling settings), added if new."""
        check_text(spec, "the model spec", empty_ok=False)
        settings = json.dumps(dict(sampling), sort_keys=True)
        with self._write() as db:
            db.execute(
                "INSERT OR IGNORE INTO models (spec, sampling, created_at) VALUES (?, ?, ?)",
                (spec, settings, now()),
            )
            sql = "SELECT id FROM models WHERE spec = ? AND sampling = ?"
            return db.execute(sql, (spec, settings)).fetchone()[0]

    def add_prompt(self, text: str, answer: str | None = None) -> int:
        """The id of a prompt (by its text), added if new; a known prompt keeps its answer."""
        check_text(text, "the prompt", empty_ok=False)
        if answer is not None:
            check_text(answer, "the answer")
        with self._write() as db:
            return self._prompt_id(db, text, answer)

    def _prompt_id(self, db: sqlite3.Connection, text: str, answer: str | None) -> int:
        db.execute(
            "INSERT OR IGNORE INTO prompts (text, answer, created_at) VALUES (?, ?, ?)",
            (text, answer, now()),
        )
        return db.execute("SELECT id FROM prompts WHERE text = ?", (text,)).fetchone()[0]

    def prompt(self, prompt_id: int) -> Prompt:
        rows = self._read("SELECT id, text, answer FROM prompts WHERE id = ?", (prompt_id,))
        if not rows:
            raise DataError(f"no prompt with id {prompt_id} in {self.path}")
        return Prompt(*rows[0])

    def add_responses(self, prompt_id: int, model_id: int, texts: Sequence[str]) -> list[int]:
        """Store one sample set (texts in order) for a prompt and model, in one transaction."""
        for i, t in enumerate(texts):
            check_text(t, f"response {i}")
        with self._write() as db:
            return [self._response_id(db, prompt_id, model_id, t) for t in texts]

    def _response_id(self, db: sqlite3.Connection, prompt_id: int, model_id: int, text: str) -> int:
        sql = "SELECT coalesce(max(idx) + 1, 0) FROM responses WHERE prompt_id = ? AND model_id = ?"
        idx = db.execute(sql, (prompt_id, model_id)).fetchone()[0]
        cur = db.execute(
            "INSERT INTO responses (prompt_id, model_id, idx, text, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (prompt_id, model_id, idx, text, now()),
        )
        return cur.lastrowid

    def responses(self, prompt_id: int, model_id: int) -> list[Response]:
        sql = "SELECT id, text FROM responses WHERE prompt_id = ? AND model_id = ? ORDER BY idx"
        return [Response(*r) for r in self._read(sql, (prompt_id, model_id))]

    # --- rankings ------------------------------------------------------------------------------

    def save_ranking(
        self,
        prompt_id: int,
        model_id: int,
        ranker: str,
        ranks: Mapping[int, int] | None,
        note: str | None = None,
    ) -> int:
        """Save one ranking (committed when this returns) and return its id.

        ranks: response id -> rank (0 = best, equal = tie) for two or more responses of this
        prompt and model; None records a skip. Ranks are stored renumbered densely.
        """
        kind = ranker_kind(ranker)
        if ranks is not None:
            check_ranks(ranks)
        with self._write() as db:
            return self._insert_ranking(db, prompt_id, model_id, ranker, kind, ranks, note)

    def _insert_ranking(
        self,
        db: sqlite3.Connection,
        prompt_id: int,
        model_id: int,
        ranker: str,
        kind: str,
        ranks: Mapping[int, int] | None,
        note: str | None,
    ) -> int:
        sql = "SELECT (SELECT 1 FROM prompts WHERE id = ?), (SELECT 1 FROM models WHERE id = ?)"
        has_prompt, has_model = db.execute(sql, (prompt_id, model_id)).fetchone()
        if not (has_prompt and has_model):
            what = f"prompt {prompt_id}" if not has_prompt else f"model {model_id}"
            raise DataError(f"{self.path} has no {what}")
        cur = db.execute(
            "INSERT INTO rankings (prompt_id, model_id, ranker, kind, skipped, note, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (prompt_id, model_id, ranker, kind, int(ranks is None), note, now()),
        )
        ranking_id = cur.lastrowid
        if ranks is not None:
            ids = list(ranks)
            rows = [
                (ranking_id, rid, prompt_id, model_id, r)
                for rid, r in zip(ids, dense_ranks([ranks[i] for i in ids]), strict=True)
            ]
            try:
                db.executemany(
                    "INSERT INTO ranks (ranking_id, response_id, prompt_id, model_id, rank) "
                    "VALUES (?, ?, ?, ?, ?)",
                    rows,
                )
            except sqlite3.IntegrityError:  # the composite foreign key: not this set's response
                raise DataError(
                    f"the ranking names responses {sorted(ids)[:8]} but not all of them were "
                    f"sampled for prompt {prompt_id} by model {model_id}"
                ) from None
        return ranking_id

    def undo(self, ranker: str) -> int | None:
        """Delete `ranker`'s latest ranking (a skip counts) and log it; its id, or None."""
        with self._write() as db:
            sql = "SELECT id FROM rankings WHERE ranker = ? ORDER BY id DESC LIMIT 1"
            row = db.execute(sql, (ranker,)).fetchone()
            if row is None:
                return None
            db.execute("DELETE FROM rankings WHERE id = ?", (row[0],))
            db.execute(
                "INSERT INTO actions (action, ranker, ranking_id, created_at) VALUES (?, ?, ?, ?)",
                ("undo", ranker, row[0], now()),
            )
            return row[0]

    def next_prompt(self, ranker: str, model_id: int) -> tuple[Prompt | None, int]:
        """The first prompt with responses from `model_id` that `ranker` has not yet ranked or
        skipped for that model, and how many such prompts are left (itself included)."""
        sql = (
            "SELECT p.id, p.text, p.answer FROM prompts p WHERE EXISTS "
            "(SELECT 1 FROM responses r WHERE r.prompt_id = p.id AND r.model_id = ?) "
            "AND NOT EXISTS (SELECT 1 FROM rankings k WHERE k.prompt_id = p.id "
            "AND k.model_id = ? AND k.ranker = ?) ORDER BY p.id"
        )
        rows = self._read(sql, (model_id, model_id, ranker))
        return (Prompt(*rows[0]) if rows else None), len(rows)

    def rankings(self, ranker: str | None = None) -> Iterator[Ranking]:
        """Every non-skipped ranking (of `ranker` only, if given), oldest first."""
        sql = (
            "SELECT k.id, p.text, r.text, x.rank, k.ranker, k.kind FROM rankings k "
            "JOIN prompts p ON p.id = k.prompt_id JOIN ranks x ON x.ranking_id = k.id "
            "JOIN responses r ON r.id = x.response_id "
            "WHERE k.skipped = 0 AND (? IS NULL OR k.ranker = ?) ORDER BY k.id, r.idx"
        )
        current: Ranking | None = None
        for rid, prompt, text, rank, who, kind in self._read(sql, (ranker, ranker)):
            if current is None or current.id != rid:
                if current is not None:
                    yield current
                current = Ranking(rid, prompt, [], [], who, kind)
            current.responses.append(text)
            current.ranks.append(rank)
        if current is not None:
            yield current

    def import_rankings(
        self, items: Sequence[tuple[str, str, list[str], list[int]]], ranker: str, source: str
    ) -> int:
        """Add rankings (where, prompt, responses, ranks) all at once, in one transaction: a bad
        item raises DataError starting with its `where` (e.g. "pairs.jsonl:7") and nothing is
        stored. The responses hang off a 'model' named `import:SOURCE`. Returns the count."""
        kind = ranker_kind(ranker)
        with self._write() as db:
            model_id = self._import_model(db, source)
            for where, prompt, texts, ranks in items:
                try:
                    check_text(prompt, "the prompt", empty_ok=False)
                    for t in texts:
                        check_text(t, "a response")
                    pid = self._prompt_id(db, prompt, None)
                    ids = [self._import_response(db, pid, model_id, t) for t in texts]
                    if len(set(ids)) != len(ids):
                        raise DataError("the same response is ranked twice")
                    by_id = dict(zip(ids, ranks, strict=True))
                    check_ranks(by_id)
                    self._insert_ranking(db, pid, model_id, ranker, kind, by_id, None)
                except (DataError, sqlite3.IntegrityError) as e:
                    raise DataError(f"{where}: {e} (nothing was imported)") from None
            return len(items)

    def _import_model(self, db: sqlite3.Connection, source: str) -> int:
        """Imported responses hang off a 'model' named after their file."""
        spec = f"import:{source}"
        db.execute(
            "INSERT OR IGNORE INTO models (spec, sampling, created_at) VALUES (?, '{}', ?)",
            (spec, now()),
        )
        sql = "SELECT id FROM models WHERE spec = ? AND sampling = '{}'"
        return db.execute(sql, (spec,)).fetchone()[0]

    def _import_response(self, db: sqlite3.Connection, pid: int, model_id: int, text: str) -> int:
        """An imported response text is stored once per prompt (pairs repeat their texts)."""
        sql = "SELECT id FROM responses WHERE prompt_id = ? AND model_id = ? AND text = ?"
        row = db.execute(sql, (pid, model_id, text)).fetchone()
        return row[0] if row else self._response_id(db, pid, model_id, text)

    def counts(self) -> dict[str, int]:
        """Rows per table (for status lines and tests)."""
        sql = (
            "SELECT (SELECT count(*) FROM models), (SELECT count(*) FROM prompts), "
            "(SELECT count(*) FROM responses), (SELECT count(*) FROM rankings), "
            "(SELECT count(*) FROM ranks), (SELECT count(*) FROM actions)"
        )
        tables = ("models", "prompts", "responses", "rankings", "ranks", "actions")
        return dict(zip(tables, self._read(sql)[0], strict=True))

    def integrity(self) -> str:
        """PRAGMA integrity_check's verdict ('ok') plus any foreign key violation."""
        verdict = self._read("PRAGMA integrity_check")[0][0]
        broken = self._read("PRAGMA foreign_key_check")
        return verdict if not broken else f"{verdict}; foreign key violations: {broken[:5]}"


def check_ranks(ranks: Mapping[int, int]) -> None:
    """Two or more responses, each rank an integer >= 0."""
    if len(ranks) < 2:
        raise DataError(f"a ranking needs at least two responses, got {len(ranks)}")
    for r in ranks.values():
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise DataError(f"a rank must be an integer >= 0, got {r!r}")
