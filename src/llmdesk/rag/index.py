"""The document index: one SQLite file, `$LLMDESK_HOME/docs.db`, with FTS5 and sqlite-vec.

    collections  name, the embedding model (name, sha256, dimension), chunking settings
    sources      what was added (paths and globs), so `docs sync` can look again
    documents    one row per file: path, content sha256, size
    chunks       text, heading path, page, line and char span, injection flags, the vector (float32)
    chunks_fts   FTS5 over chunks (text, headings), BM25; porter stemming
    vec_<id>     one sqlite-vec `vec0` table per collection (its model's dimension), cosine, rowid = chunk id

The database is opened with `sqlean` (a build of the sqlite3 module that may load extensions;
the stdlib one here may not) and migrated like llmdesk.db (store/db.py), with its own list.
The vectors are kept in `chunks.embedding` as well: if sqlite-vec cannot load, search reads them
and ranks exactly with numpy (with a notice), and a `vec0` table written meanwhile is rebuilt
from them when the extension is back (`collections.vec_ok`).

A rebuild writes its new collection aside, under a name no user can give (a leading '.'), and
`replace_collection` puts it in the old one's place in one transaction; such collections are
never listed.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import LlmdeskError
from ..store import db, paths

MIGRATIONS: list[db.Migration] = []


def migration(fn: db.Migration) -> db.Migration:
    MIGRATIONS.append(fn)
    return fn


def db_path() -> Path:
    return paths.home() / "docs.db"


_vec_error: str | None = None  # why sqlite-vec did not load, once it failed


def connect(path: str | Path | None = None):
    """Open (creating and migrating) the document index. `conn.vec` says whether sqlite-vec loaded."""
    global _vec_error
    import sqlean

    path = db_path() if path is None else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlean.connect(str(path), timeout=db.BUSY_TIMEOUT_S)
    try:
        conn.row_factory = sqlean.Row
        conn.execute(f"PRAGMA busy_timeout = {int(db.BUSY_TIMEOUT_S * 1000)}")
        db.use_wal(conn)
        conn.execute("PRAGMA synchronous = NORMAL")  # WAL: durable at checkpoints, never corrupt
        conn.execute("PRAGMA foreign_keys = ON")
        db.migrate(conn, MIGRATIONS)
    except sqlean.DatabaseError as e:
        conn.close()
        if "locked" in str(e):
            raise LlmdeskError(f"the document index {paths.display(path)} is busy (another llmdesk is writing "
                               "to it); try again") from None
        raise LlmdeskError(f"cannot open the document index {paths.display(path)}: {e}; move it away to start "
                           "afresh (then add your documents again)") from None
    vec = False
    if _vec_error is None:
        try:
            import sqlite_vec

            conn.enable_load_extension(True)
            sqlite_vec.load(conn)
            conn.enable_load_extension(False)
            vec = True
        except (ImportError, AttributeError, sqlean.Error, OSError) as e:
            _vec_error = f"{type(e).__name__}: {e}"
    return Conn(conn, vec)


_local = threading.local()


def shared() -> "Conn":
    """This thread's open connection to the index (opened on first use, kept for the next
    query): a search then pays for no connect, migration check or extension load."""
    path = db_path()
    held = getattr(_local, "conns", None)
    if held is None:
        held = _local.conns = {}
    c = held.get(str(path))
    if c is None or not path.exists() or c.vec != (_vec_error is None):
        if c is not None:
            c.close()
        c = held[str(path)] = connect(path)
    return c


class Conn:
    """A connection to the index and whether sqlite-vec is loaded in it."""

    def __init__(self, conn, vec: bool):
        self.db = conn
        self.vec = vec

    def execute(self, *a):
        return self.db.execute(*a)

    def executemany(self, *a):
        return self.db.executemany(*a)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Conn":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def vec_notice() -> str:
    return (f"sqlite-vec could not be loaded ({_vec_error}); vector search ranks every chunk exactly with numpy "
            "(slower on large collections); `pip install sqlite-vec sqlean-py` brings it back")


# ---------------------------------------------------------------------------------------------
# collections


@dataclass
class Collection:
    id: int
    name: str
    model: str  # the embedding model's name, as the user gave it
    model_sha256: str
    dim: int
    chunk_tokens: int
    overlap: int
    created: str
    updated: str
    vec_ok: bool
    documents: int = 0
    chunks: int = 0

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("id", "vec_ok")}


LISTED = "name NOT LIKE '.%'"  # a collection being built aside (a rebuild's) is not the user's yet


def get_collection(c: Conn, name: str, *, counts: bool = True) -> Collection | None:
    if not counts:
        row = c.execute("SELECT * FROM collections WHERE name = ?", (name,)).fetchone()
        return _collection(row) if row else None
    row = c.execute(
        "SELECT *, (SELECT count(*) FROM documents d WHERE d.collection_id = collections.id) AS documents, "
        "(SELECT count(*) FROM chunks k WHERE k.collection_id = collections.id) AS chunks "
        "FROM collections WHERE name = ?", (name,)).fetchone()
    return _collection(row) if row else None


def require(c: Conn, name: str, *, counts: bool = True) -> Collection:
    col = get_collection(c, name, counts=counts)
    if col is None:
        names = [r[0] for r in c.execute(f"SELECT name FROM collections WHERE {LISTED} ORDER BY name")]
        have = f"the collections are: {', '.join(names)}" if names else "there are no collections yet"
        raise LlmdeskError(f"no collection named '{name}' ({have}); create it with `llmdesk docs add PATH "
                           f"--collection {name}`")
    return col


def list_all(c: Conn) -> list[Collection]:
    rows = c.execute(
        "SELECT *, (SELECT count(*) FROM documents d WHERE d.collection_id = collections.id) AS documents, "
        "(SELECT count(*) FROM chunks k WHERE k.collection_id = collections.id) AS chunks "
        f"FROM collections WHERE {LISTED} ORDER BY name").fetchall()
    return [_collection(r) for r in rows]


def _collection(row) -> Collection:
    keys = row.keys()
    return Collection(row["id"], row["name"], row["model"], row["model_sha256"], row["dim"], row["chunk_tokens"],
                      row["overlap"], row["created"], row["updated"], bool(row["vec_ok"]),
                      row["documents"] if "documents" in keys else 0, row["chunks"] if "chunks" in keys else 0)


def create_collection(c: Conn, name: str, model: str, sha256: str, dim: int, chunk_tokens: int,
                      overlap: int) -> Collection:
    with db.transaction(c.db):
        t = db.now()
        cid = c.execute("INSERT INTO collections (name, model, model_sha256, dim, chunk_tokens, overlap, created, "
                        "updated, vec_ok) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (name, model, sha256, dim, chunk_tokens, overlap, t, t, int(c.vec))).lastrowid
        if c.vec:
            c.execute(f"DROP TABLE IF EXISTS vec_{cid}")
            c.execute(f"CREATE VIRTUAL TABLE vec_{cid} USING vec0(embedding float[{int(dim)}] distance_metric=cosine)")
    return require(c, name)


def drop_collection(c: Conn, col: Collection) -> None:
    """Remove a collection and everything in it, in one transaction."""
    with db.transaction(c.db):
        c.execute("DELETE FROM chunks WHERE collection_id = ?", (col.id,))
        c.execute("DELETE FROM documents WHERE collection_id = ?", (col.id,))
        c.execute("DELETE FROM sources WHERE collection_id = ?", (col.id,))
        c.execute("DELETE FROM collections WHERE id = ?", (col.id,))
        _drop_vec(c, col.id)


def replace_collection(c: Conn, old: Collection, new: Collection) -> None:
    """`new` (built aside) takes `old`'s place and name, in one transaction: a reader sees the
    one or the other, whole."""
    with db.transaction(c.db):
        drop_collection(c, old)
        c.execute("UPDATE collections SET name = ? WHERE id = ?", (old.name, new.id))


def _drop_vec(c: Conn, cid: int) -> None:
    # without sqlite-vec a vec0 table cannot be dropped; it is left, unused (ids are never reused),
    # and dropped by the next drop or rebuild made with the extension
    if c.vec:
        c.execute(f"DROP TABLE IF EXISTS vec_{int(cid)}")


def ensure_vec(c: Conn, col: Collection) -> None:
    """With sqlite-vec loaded, make the collection's vec0 table hold every chunk's vector again
    if chunks were written while it was not (vec_ok = 0)."""
    if not c.vec or col.vec_ok:
        return
    with db.transaction(c.db):
        c.execute(f"DROP TABLE IF EXISTS vec_{col.id}")
        c.execute(f"CREATE VIRTUAL TABLE vec_{col.id} USING vec0(embedding float[{col.dim}] distance_metric=cosine)")
        c.execute(f"INSERT INTO vec_{col.id} (rowid, embedding) SELECT id, embedding FROM chunks "
                  "WHERE collection_id = ?", (col.id,))
        c.execute("UPDATE collections SET vec_ok = 1 WHERE id = ?", (col.id,))
    col.vec_ok = True


def touch(c: Conn, col: Collection) -> None:
    c.execute("UPDATE collections SET updated = ?, vec_ok = vec_ok AND ? WHERE id = ?", (db.now(), int(c.vec), col.id))


# ---------------------------------------------------------------------------------------------
# documents and chunks (called inside the caller's transaction)


def delete_document(c: Conn, col: Collection, doc_id: int) -> None:
    if c.vec:
        c.execute(f"DELETE FROM vec_{col.id} WHERE rowid IN (SELECT id FROM chunks WHERE document_id = ?)", (doc_id,))
    c.execute("DELETE FROM chunks WHERE document_id = ?", (doc_id,))
    c.execute("DELETE FROM documents WHERE id = ?", (doc_id,))


def insert_document(c: Conn, col: Collection, path: str, sha256: str, size: int, kind: str,
                    rows: list[tuple]) -> int:
    """rows: (seq, text, headings, page, line_start, line_end, char_start, char_end, flags, embedding bytes)."""
    doc_id = c.execute("INSERT INTO documents (collection_id, path, sha256, size, kind, added) VALUES (?, ?, ?, ?, ?, ?)",
                       (col.id, path, sha256, size, kind, db.now())).lastrowid
    first = None
    cur = c.db.cursor()
    for r in rows:
        cur.execute("INSERT INTO chunks (collection_id, document_id, seq, text, headings, page, line_start, line_end, "
                    "char_start, char_end, flags, embedding) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (col.id, doc_id, r[0], r[1], json.dumps(r[2]), r[3], r[4], r[5], r[6], r[7], json.dumps(r[8]),
                     r[9]))
        if first is None:
            first = cur.lastrowid
    if c.vec and rows:
        c.execute(f"INSERT INTO vec_{col.id} (rowid, embedding) SELECT id, embedding FROM chunks "
                  "WHERE document_id = ?", (doc_id,))
    return doc_id


# ---------------------------------------------------------------------------------------------
# Migrations. Append only.


@migration
def m001_documents(d: sqlite3.Connection) -> None:
    d.execute("""
        CREATE TABLE collections (
            id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: vec_<id> names its vectors
            name TEXT NOT NULL UNIQUE,
            model TEXT NOT NULL,            -- the embedding model, as named when the collection was made
            model_sha256 TEXT NOT NULL,     -- its file's content: another file is another model
            dim INTEGER NOT NULL,
            chunk_tokens INTEGER NOT NULL,
            overlap INTEGER NOT NULL,
            created TEXT NOT NULL,
            updated TEXT NOT NULL,
            vec_ok INTEGER NOT NULL DEFAULT 1  -- 0: chunks were written without sqlite-vec; vec_<id> is stale
        )""")
    d.execute("""
        CREATE TABLE sources (
            collection_id INTEGER NOT NULL REFERENCES collections (id),
            path TEXT NOT NULL,             -- absolute
            include TEXT NOT NULL DEFAULT '[]',  -- JSON lists of globs
            exclude TEXT NOT NULL DEFAULT '[]',
            PRIMARY KEY (collection_id, path)
        )""")
    d.execute("""
        CREATE TABLE documents (
            id INTEGER PRIMARY KEY,
            collection_id INTEGER NOT NULL REFERENCES collections (id),
            path TEXT NOT NULL,             -- absolute
            sha256 TEXT NOT NULL,
            size INTEGER NOT NULL,
            kind TEXT NOT NULL,
            added TEXT NOT NULL,
            UNIQUE (collection_id, path)
        )""")
    d.execute("""
        CREATE TABLE chunks (
            id INTEGER PRIMARY KEY,
            collection_id INTEGER NOT NULL,
            document_id INTEGER NOT NULL REFERENCES documents (id),
            seq INTEGER NOT NULL,           -- its place in the document
            text TEXT NOT NULL,
            headings TEXT NOT NULL,         -- JSON list, outermost first
            page INTEGER,
            line_start INTEGER NOT NULL,
            line_end INTEGER NOT NULL,
            char_start INTEGER NOT NULL,
            char_end INTEGER NOT NULL,
            flags TEXT NOT NULL DEFAULT '[]',  -- JSON list: why the passage looks like instructions (rag.guard)
            embedding BLOB NOT NULL         -- float32, L2-normalised
        )""")
    d.execute("CREATE INDEX chunks_document ON chunks (document_id)")
    d.execute("CREATE INDEX chunks_collection ON chunks (collection_id)")
    d.execute("CREATE VIRTUAL TABLE chunks_fts USING fts5(text, headings, content='chunks', content_rowid='id', "
              "tokenize='porter unicode61 remove_diacritics 2')")
    d.execute("""CREATE TRIGGER chunks_ai AFTER INSERT ON chunks BEGIN
            INSERT INTO chunks_fts (rowid, text, headings) VALUES (new.id, new.text, new.headings);
        END""")
    d.execute("""CREATE TRIGGER chunks_ad AFTER DELETE ON chunks BEGIN
            INSERT INTO chunks_fts (chunks_fts, rowid, text, headings) VALUES ('delete', old.id, old.text, old.headings);
        END""")
