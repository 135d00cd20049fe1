"""The results store: every measurement llmdesk makes (bench, perplexity, KL divergence,
quantization sweeps, evaluations), kept in SQLite so runs can be compared over time."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from .db import now, transaction, using


def record(kind: str, *, model: str, metrics: dict[str, Any], settings: dict[str, Any] | None = None,
           model_sha256: str | None = None, data_sha256: str | None = None,
           conn: sqlite3.Connection | None = None) -> int:
    """Store one result; returns its id."""
    with using(conn) as db, transaction(db):
        cur = db.execute(
            "INSERT INTO results (time, kind, model, model_sha256, data_sha256, settings, metrics) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (now(), kind, model, model_sha256, data_sha256,
             json.dumps(settings or {}, sort_keys=True), json.dumps(metrics, sort_keys=True)),
        )
        return int(cur.lastrowid)


def query(kind: str | None = None, *, model_sha256: str | None = None, model: str | None = None,
          limit: int = 100, conn: sqlite3.Connection | None = None) -> list[dict[str, Any]]:
    """Results, newest first, optionally of one kind and one model (by hash or by name)."""
    where, args = [], []
    for col, val in (("kind", kind), ("model_sha256", model_sha256), ("model", model)):
        if val is not None:
            where.append(f"{col} = ?")
            args.append(val)
    sql = "SELECT * FROM results" + (" WHERE " + " AND ".join(where) if where else "")
    sql += " ORDER BY id DESC LIMIT ?"
    with using(conn) as db:
        rows = db.execute(sql, (*args, limit)).fetchall()
    return [{**dict(r), "settings": json.loads(r["settings"]), "metrics": json.loads(r["metrics"])} for r in rows]
