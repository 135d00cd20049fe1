"""A log of every prompt and response, in the database, searchable, and easy to switch off.

    log_turn(model="tiny:latest", prompt="hi", response="hello", tokens_out=3, duration_s=0.1)
    recent(5)                       # newest first
    recent(query="quantization")    # full-text search (FTS5) over prompt, response and system
    set_logging(False)              # log_turn() does nothing until set_logging(True)
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from . import db

_SETTING = "logging"


def logging_enabled(*, conn: sqlite3.Connection | None = None) -> bool:
    """On unless the user switched it off (`llmdesk logs off`)."""
    with db.using(conn) as c:
        row = c.execute("SELECT value FROM settings WHERE key = ?", (_SETTING,)).fetchone()
    return row is None or row["value"] != "off"


def set_logging(on: bool, *, conn: sqlite3.Connection | None = None) -> None:
    with db.using(conn) as c, db.transaction(c):
        c.execute(
            "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (_SETTING, "on" if on else "off"),
        )


def log_turn(
    *,
    model: str,
    prompt: str,
    response: str,
    system: str | None = None,
    options: dict[str, Any] | None = None,
    tokens_in: int = 0,
    tokens_out: int = 0,
    duration_s: float = 0.0,
    conn: sqlite3.Connection | None = None,
) -> int | None:
    """Record one prompt and its response; returns the log id, or None when logging is off."""
    with db.using(conn) as c:
        if not logging_enabled(conn=c):
            return None
        tps = tokens_out / duration_s if duration_s > 0 else None
        with db.transaction(c):
            cur = c.execute(
                """
                INSERT INTO logs (time, model, system, prompt, response, options,
                                  tokens_in, tokens_out, duration_s, tokens_per_second)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                """,
                (
                    db.now(),
                    model,
                    system,
                    prompt,
                    response,
                    json.dumps(options or {}, default=str),
                    tokens_in,
                    tokens_out,
                    duration_s,
                    tps,
                ),
            )
        return cur.lastrowid


def recent(n: int = 20, query: str | None = None, *, conn: sqlite3.Connection | None = None) -> list[dict]:
    """The last `n` turns, newest first; with `query`, only turns whose prompt, response or
    system prompt contain all of its words (FTS5, prefix and case insensitive per word)."""
    match = fts_query(query) if query else None
    with db.using(conn) as c:
        if match:
            rows = c.execute(
                """
                SELECT logs.* FROM logs JOIN logs_fts ON logs_fts.rowid = logs.id
                WHERE logs_fts MATCH ? ORDER BY logs.id DESC LIMIT ?
                """,
                (match, n),
            ).fetchall()
        else:
            rows = c.execute("SELECT * FROM logs ORDER BY id DESC LIMIT ?", (n,)).fetchall()
    out = []
    for r in rows:
        d = dict(r)
        d["options"] = json.loads(d["options"]) if d["options"] else {}
        out.append(d)
    return out


def fts_query(text: str) -> str | None:
    """Turn what a user typed into a safe FTS5 query: each word becomes a quoted string (so
    `AND`, `NEAR`, `*` and quotes are plain text), matched as a prefix, all words required."""
    words = text.replace("\x00", " ").split()  # SQLite would stop reading the query at a NUL
    if not words:
        return None
    return " ".join('"' + w.replace('"', '""') + '"*' for w in words)
