"""The SQLite database in the user directory: model catalog, logs, settings (and later results).

Schema changes are numbered, append-only migration functions (the simonw/llm way): each runs once,
in its own transaction, and its name is recorded in the `migrations` table. To change the schema,
add a new function at the end; never edit or reorder one that has shipped.

    conn = connect()              # opens llmdesk.db in the user dir and migrates it
    with transaction(conn): ...   # BEGIN IMMEDIATE ... COMMIT (or ROLLBACK on error)
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from ..errors import LlmdeskError
from . import paths

# How long a writer waits for another process's write lock before giving up.
BUSY_TIMEOUT_S = 10.0

Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: list[Migration] = []


def migration(fn: Migration) -> Migration:
    """Register `fn` as the next migration. Name it `mNNN_what_it_does`."""
    MIGRATIONS.append(fn)
    return fn


def now() -> str:
    """The time stored in the database: UTC, ISO 8601, seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def connect(path: str | Path | None = None) -> sqlite3.Connection:
    """Open (creating if needed) and migrate the database; rows come back as `sqlite3.Row`.

    WAL lets readers and one writer work at the same time (a chat logging while `llmdesk logs`
    reads); the busy timeout makes a second writer wait instead of failing at once.
    """
    path = paths.db_path() if path is None else path
    if str(path) != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S)
    try:
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        use_wal(conn)
        conn.execute("PRAGMA foreign_keys = ON")
        migrate(conn)
    except sqlite3.DatabaseError as e:
        conn.close()
        where = paths.display(Path(path))
        if "locked" in str(e):
            raise LlmdeskError(f"the database {where} is busy (another llmdesk is writing to it); try again") from None
        raise LlmdeskError(
            f"cannot open the database {where}: {e}; "
            "move it away (or set LLMDESK_HOME to another directory) to start afresh"
        ) from None
    return conn


def use_wal(conn) -> None:
    """Switch the database to WAL. The switch takes an exclusive lock and SQLite does not wait
    for it with the busy handler, so a fresh database opened by several processes at once
    would fail here: retry until the busy timeout instead."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except Exception as e:  # sqlite3's or another binding's (sqlean) OperationalError
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


@contextmanager
def using(conn: sqlite3.Connection | None = None) -> Iterator[sqlite3.Connection]:
    """`conn` if given (left open), else a fresh connection closed afterwards."""
    if conn is not None:
        yield conn
        return
    conn = connect()
    try:
        yield conn
    finally:
        conn.close()


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One atomic unit of writes. Takes the write lock at once (BEGIN IMMEDIATE), so a
    read-then-write inside cannot race another process; nests as a savepoint."""
    if conn.in_transaction:
        conn.execute("SAVEPOINT llmdesk_tx")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK TO llmdesk_tx")
            conn.execute("RELEASE llmdesk_tx")
            raise
        conn.execute("RELEASE llmdesk_tx")
        return
    try:
        # inside the try: a Ctrl-C that lands just after BEGIN still rolls it back
        conn.execute("BEGIN IMMEDIATE")
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.rollback()
        raise
    conn.commit()


def migrate(conn: sqlite3.Connection, migrations: list[Migration] | None = None) -> list[str]:
    """Apply the migrations this database has not seen yet (`migrations`: another database's
    list, such as the document index's); returns their names."""
    conn.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied TEXT NOT NULL)")
    conn.commit()
    done = {row[0] for row in conn.execute("SELECT name FROM migrations")}
    applied = []
    for fn in MIGRATIONS if migrations is None else migrations:
        if fn.__name__ in done:
            continue
        with transaction(conn):
            # another process may have applied it while we waited for the lock
            if conn.execute("SELECT 1 FROM migrations WHERE name = ?", (fn.__name__,)).fetchone():
                continue
            fn(conn)
            conn.execute("INSERT INTO migrations (name, applied) VALUES (?, ?)", (fn.__name__, now()))
        applied.append(fn.__name__)
    return applied


# ---------------------------------------------------------------------------------------------
# Migrations. Append only.


@migration
def m001_models(db: sqlite3.Connection) -> None:
    # `path` is relative to the user dir when the file lives there, so the dir can be moved
    db.execute(
        """
        CREATE TABLE models (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            tag TEXT NOT NULL,
            path TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            size INTEGER NOT NULL,
            architecture TEXT,
            parameters INTEGER,
            file_type TEXT,
            context_length INTEGER,
            source TEXT,
            added TEXT NOT NULL,
            UNIQUE (name, tag)
        )
        """
    )
    db.execute("CREATE INDEX models_sha256 ON models (sha256)")
    db.execute("CREATE INDEX models_source ON models (source)")


@migration
def m002_logs(db: sqlite3.Connection) -> None:
    db.execute(
        """
        CREATE TABLE logs (
            id INTEGER PRIMARY KEY,
            time TEXT NOT NULL,
            model TEXT,
            system TEXT,
            prompt TEXT,
            response TEXT,
            options TEXT,           -- JSON object: sampling settings and the like
            tokens_in INTEGER,
            tokens_out INTEGER,
            duration_s REAL,
            tokens_per_second REAL
        )
        """
    )


@migration
def m003_logs_fts(db: sqlite3.Connection) -> None:
    # an external-content FTS5 index over logs, kept in step by triggers
    db.execute(
        "CREATE VIRTUAL TABLE logs_fts USING fts5(prompt, response, system, content='logs', content_rowid='id')"
    )
    # (one statement at a time: executescript() would commit in the middle of the migration)
    for trigger in (
        """CREATE TRIGGER logs_ai AFTER INSERT ON logs BEGIN
            INSERT INTO logs_fts (rowid, prompt, response, system)
            VALUES (new.id, new.prompt, new.response, new.system);
        END""",
        """CREATE TRIGGER logs_ad AFTER DELETE ON logs BEGIN
            INSERT INTO logs_fts (logs_fts, rowid, prompt, response, system)
            VALUES ('delete', old.id, old.prompt, old.response, old.system);
        END""",
        """CREATE TRIGGER logs_au AFTER UPDATE ON logs BEGIN
            INSERT INTO logs_fts (logs_fts, rowid, prompt, response, system)
            VALUES ('delete', old.id, old.prompt, old.response, old.system);
            INSERT INTO logs_fts (rowid, prompt, response, system)
            VALUES (new.id, new.prompt, new.response, new.system);
        END""",
    ):
        db.execute(trigger)


@migration
def m004_settings(db: sqlite3.Connection) -> None:
    db.execute("CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT)")


@migration
def m005_results(db: sqlite3.Connection) -> None:
    # one table for every measurement (bench runs, perplexity, KL divergence, quantization
    # sweeps, evaluations): what was measured is `kind`, the knobs are `settings`, the numbers
    # are `metrics`; model and data are identified by content hash so renames don't matter
    db.execute(
        """
        CREATE TABLE results (
            id INTEGER PRIMARY KEY,
            time TEXT NOT NULL,
            kind TEXT NOT NULL,
            model TEXT NOT NULL,
            model_sha256 TEXT,
            data_sha256 TEXT,
            settings TEXT NOT NULL DEFAULT '{}',
            metrics TEXT NOT NULL DEFAULT '{}'
        )
        """
    )
    db.execute("CREATE INDEX results_kind_model ON results (kind, model_sha256, time)")


@migration
def m006_eval_items(db: sqlite3.Connection) -> None:
    # per-item results of `llmdesk eval run`, so an interrupted or failed run resumes where it
    # stopped: `run_key` hashes the model's sha256, the task's hash and the settings that change
    # the scores; `result` is JSON (log-likelihoods, the choice taken, the extracted answer)
    db.execute(
        """
        CREATE TABLE eval_items (
            run_key TEXT NOT NULL,
            item INTEGER NOT NULL,
            time TEXT NOT NULL,
            result TEXT NOT NULL,
            PRIMARY KEY (run_key, item)
        )
        """
    )


@migration
def m007_judgments(db: sqlite3.Connection) -> None:
    # `llmdesk eval judge`: one row per verdict. `kind` single (a 1-10 grade of answer_a) or
    # pairwise (winner a, b or tie, both orders asked); `raw` is the judge's text as given and
    # `parsed` 0 when no verdict could be read from it (recorded as malformed, never guessed)
    db.execute(
        """
        CREATE TABLE judgments (
            id INTEGER PRIMARY KEY,
            time TEXT NOT NULL,
            run TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('single', 'pairwise')),
            judge TEXT NOT NULL,
            question_id TEXT NOT NULL,
            question TEXT NOT NULL,
            model_a TEXT NOT NULL,
            model_b TEXT,
            answer_a TEXT,
            answer_b TEXT,
            score REAL,
            winner TEXT CHECK (winner IN ('a', 'b', 'tie')),
            parsed INTEGER NOT NULL,
            raw TEXT NOT NULL,
            details TEXT NOT NULL DEFAULT '{}'
        )
        """
    )
    db.execute("CREATE INDEX judgments_run ON judgments (run, question_id)")


@migration
def m008_arena_votes(db: sqlite3.Connection) -> None:
    # arena battles: a person in the web chat or a judge (`arena auto`) saw two anonymous
    # answers to one prompt and voted; the leaderboard fits Bradley-Terry ratings to these rows
    db.execute(
        """
        CREATE TABLE arena_votes (
            id INTEGER PRIMARY KEY,
            time TEXT NOT NULL,
            prompt TEXT NOT NULL,
            model_a TEXT NOT NULL,
            model_b TEXT NOT NULL,
            answer_a TEXT NOT NULL DEFAULT '',
            answer_b TEXT NOT NULL DEFAULT '',
            winner TEXT NOT NULL CHECK (winner IN ('a', 'b', 'tie', 'both_bad')),
            source TEXT NOT NULL,
            judge TEXT,
            details TEXT NOT NULL DEFAULT '{}'
        )
        """
    )
    db.execute("CREATE INDEX arena_votes_models ON arena_votes (model_a, model_b)")
