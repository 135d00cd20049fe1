"""The arena: battles between two anonymous models on one prompt, the votes they produce (from a
person in the web chat's Arena mode, or a judge model in `llmdesk arena auto`), Bradley-Terry
ratings with bootstrap intervals, and preference pairs for preference tuning.

    record_vote("2+2?", "qwen:q4", "qwen:q8", "b", source="web")
    votes(source="web")            # oldest first, as dicts
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from ..errors import LlmdeskError
from ..store.db import now, transaction, using

WINNERS = ("a", "b", "tie", "both_bad")
SOURCES = ("web", "auto")


# ---------------------------------------------------------------------------------------------
# The vote store (table arena_votes, migration m008)


def record_vote(prompt: str, model_a: str, model_b: str, winner: str, *, answer_a: str = "", answer_b: str = "",
                source: str = "web", judge: str | None = None, details: dict | None = None,
                conn: sqlite3.Connection | None = None) -> int:
    """Store one battle's outcome; returns the vote's id. `winner` is a, b, tie or both_bad."""
    if winner not in WINNERS:
        raise LlmdeskError(f"arena vote: winner {winner!r} is not one of {', '.join(WINNERS)}")
    if not model_a or not model_b:
        raise LlmdeskError("arena vote: both models must be named (model_a and model_b)")
    if model_a == model_b:
        raise LlmdeskError(f"arena vote: a model cannot battle itself ({model_a!r} on both sides)")
    if not source:
        raise LlmdeskError("arena vote: the source must be named (web, auto, ...)")
    with using(conn) as db, transaction(db):
        cur = db.execute(
            "INSERT INTO arena_votes (time, prompt, model_a, model_b, answer_a, answer_b, winner, source, judge, details)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (now(), prompt, model_a, model_b, answer_a, answer_b, winner, source, judge,
             json.dumps(details or {}, sort_keys=True)),
        )
        return int(cur.lastrowid)


def votes(*, source: str | None = None, limit: int | None = None,
          conn: sqlite3.Connection | None = None) -> list[dict[str, Any]]:
    """Every vote (or those of one source), oldest first; with `limit`, the newest `limit` of them."""
    sql, args = "SELECT * FROM arena_votes", []
    if source is not None:
        sql += " WHERE source = ?"
        args.append(source)
    if limit is not None:
        sql = f"SELECT * FROM ({sql} ORDER BY id DESC LIMIT ?) ORDER BY id"
        args.append(int(limit))
    else:
        sql += " ORDER BY id"
    with using(conn) as db:
        rows = db.execute(sql, args).fetchall()
    return [{**dict(r), "details": json.loads(r["details"] or "{}")} for r in rows]
