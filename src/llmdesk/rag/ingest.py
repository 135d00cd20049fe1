"""Adding documents to a collection, incrementally: `add`, `sync`, `remove`, `list_collections`.

    report = add(["~/notes", "paper.pdf"], "default", include=["*.md", "*.pdf"])
    report.added, report.updated, report.unchanged, report.errors

A file is read, hashed (sha256 of its bytes) and compared with the collection: the same hash is
skipped without being opened further; a new or changed file is extracted, chunked and embedded,
and its chunks replace the old ones in one transaction, so an interrupted add leaves each file
as it was or complete. Chunks of several files are embedded together (one `Model.embed` call,
which the Engine packs many texts per decode), then written file by file. A file that cannot be
read is one line in `report.errors`, and the rest of the batch goes on. `sync` removes the files
that disappeared and adds again what the collection's sources (the paths given to `add`) hold.

A collection keeps the embedding model it was built with (name, sha256, dimension); adding with
another model is refused (vectors of two models cannot be compared), `rebuild=True` re-embeds
the collection with the new one: into a new collection built aside (the old one is searched
meanwhile), which replaces the old one in one transaction when it is whole. An interrupted
rebuild leaves the old collection as it was; what it built is dropped at once, or, when its
process was killed, by the next `add` or `list_collections` (`clear_leftovers`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import part_owner, pid_alive, unique_part_path
from ..errors import LlmdeskError
from ..store import db, paths
from ..store.refs import looks_like_path
from . import index
from .chunk import DEFAULT_BUDGET, DEFAULT_OVERLAP, Chunk, chunk
from .extract import extract, supported
from .guard import injection_flags

EMBED_BATCH = 256  # chunks embedded per Model.embed call (across files)


@dataclass
class IngestReport:
    collection: str
    added: int = 0  # new files
    updated: int = 0  # changed files, their chunks replaced
    unchanged: int = 0  # same content hash: skipped
    removed: int = 0  # files gone from disk (sync) or from the collection
    chunks: int = 0  # chunks embedded and written
    skipped: int = 0  # files in folders of a kind llmdesk does not read
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, one line)
    seconds: float = 0.0

    @property
    def chunks_per_second(self) -> float:
        return self.chunks / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["errors"] = [{"path": p, "error": e} for p, e in self.errors]
        d["chunks_per_second"] = round(self.chunks_per_second, 1)
        return d


Event = dict[str, Any]  # {"event": "files", "total": n} | {"event": "file", "path", "status", "chunks"} | ...


# ---------------------------------------------------------------------------------------------
# the embedding model


class Embedder:
    """An embedding model and what identifies it: `ref` (how to open it again), sha256, dimension."""

    def __init__(self, model, ref: str):
        self.model = model
        self.ref = ref
        self.sha256 = model_sha256(Path(model.path))
        self.dim = int(model.llama.n_embd)
        self.n_ctx = int(model.n_ctx)

    def count(self, text: str) -> int:
        return len(self.model.embed_tokens(text, add_special=False))

    def embed(self, texts: list[str]) -> np.ndarray:
        """(n, dim) float32, L2-normalised."""
        return self.start(texts)()

    def start(self, texts: list[str]) -> Callable[[], np.ndarray]:
        """Start embedding `texts` on the model's Engine thread; the function returned waits for
        the vectors, (n, dim) float32, L2-normalised. Meanwhile the caller can do other work (a
        search its BM25 query: SQLite and llama.cpp both run without Python's lock)."""
        ids = [self.model.embed_tokens(t)[: self.n_ctx] or self.model.embed_tokens(" ") for t in texts]
        job = self.model.engine.embed(ids)
        return lambda: np.asarray(job.wait(), dtype=np.float32).reshape(len(texts), self.dim)


_sha_cache: dict[tuple, str] = {}


def model_sha256(path: Path) -> str:
    """A model file's sha256: from its name in the store (`sha256-<hex>.gguf`), else hashed once."""
    name = path.name
    if name.startswith("sha256-") and name.endswith(".gguf") and len(name) == 7 + 64 + 5:
        return name[7:-5]
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _sha_cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _sha_cache[key] = h.hexdigest()
    return _sha_cache[key]


_opened: dict[str, Any] = {}  # ref -> Model, loaded once per process


def open_model(ref: str):
    """The embedding model `ref`, loaded once per process."""
    if ref not in _opened:
        from .embedder import open_embedder

        _opened[ref] = open_embedder(ref)
    return _opened[ref]


def embedder_for(embedder, col: index.Collection | None, say: Callable[[str], None] | None = None) -> Embedder:
    """The Embedder to use: `embedder` (an Embedder, a Model or a reference), else the
    collection's own model, else the default; checked against the collection's model. An
    Embedder is a model its caller loaded and keeps (the server's, counted in its memory), with
    the reference a new collection records."""
    if isinstance(embedder, Embedder):
        e = embedder
    elif embedder is None or isinstance(embedder, str):
        ref = embedder or (col.model if col else None)
        if ref is None:  # the default: made at its first use (saying so), the store's after
            from .embedder import default_embedder

            ref = default_embedder(progress=say)
        elif looks_like_path(ref) and Path(ref).expanduser().exists():
            ref = str(Path(ref).expanduser().absolute())  # so that sync finds it from anywhere
        e = Embedder(open_model(ref), ref)
    else:
        e = Embedder(embedder, str(embedder.path))
    if col is not None:
        check_model(col, e)
    return e


def check_model(col: index.Collection, e: Embedder) -> None:
    if e.sha256 != col.model_sha256 or e.dim != col.dim:
        refuse(col, e.ref, e.sha256)


def refuse(col: index.Collection, ref: str, sha256: str) -> None:
    raise LlmdeskError(
        f"collection '{col.name}' was built with the embedding model {col.model} (sha256 {col.model_sha256[:12]}, "
        f"{col.dim} dimensions), not {ref} (sha256 {sha256[:12]}); vectors of two models cannot be mixed: add with "
        f"--rebuild to re-embed it, or `llmdesk docs rm {col.name}` and add again")


def check_ref(col: index.Collection, embedder) -> None:
    """Refuse another model before any work, without loading it (its file's sha256 is enough)."""
    if isinstance(embedder, str):
        from ..store.refs import resolve

        found = resolve(embedder)
        sha = found.entry.sha256 if found.entry is not None else model_sha256(found.path)
        if sha != col.model_sha256:
            refuse(col, embedder, sha)
    elif embedder is not None:
        check_model(col, embedder if isinstance(embedder, Embedder) else Embedder(embedder, str(embedder.path)))


# ---------------------------------------------------------------------------------------------
# which files


def _matches(rel: str, patterns: list[str]) -> bool:
    parts = rel.split("/")
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(parts[-1], p) or
               any(fnmatch.fnmatch(d, p) for d in parts[:-1]) for p in patterns)


def gather(path: Path, include: list[str], exclude: list[str], report: IngestReport,
           on_event: Callable[[Event], None] | None = None) -> list[Path]:
    """The files under `path` (itself, if a file) that `include` and `exclude` select; folders
    are walked recursively, hidden ones (`.git`) and files of kinds llmdesk does not read are
    passed over (counted in report.skipped)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        msg = f"{path}: no such file or folder"
        report.errors.append((str(path), msg))
        _emit(on_event, event="file", path=str(path), status="error", chunks=0, error=msg)
        return []
    out = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            f = Path(root) / name
            rel = f.relative_to(path).as_posix()
            if (include and not _matches(rel, include)) or (exclude and _matches(rel, exclude)):
                continue
            if not supported(f):
                report.skipped += 1
                continue
            out.append(f)
    return out


# ---------------------------------------------------------------------------------------------
# add, sync, remove


def add(paths: Iterable[str | os.PathLike], collection: str = "default", *, include: list[str] | None = None,
        exclude: list[str] | None = None, embedder=None, on_event: Callable[[Event], None] | None = None,
        rebuild: bool = False, chunk_tokens: int | None = None, overlap: int | None = None) -> IngestReport:
    """Add files and folders to `collection` (made if new). `embedder`: a loaded Model or a
    model reference; None is the collection's own model, or the default for a new collection.
    `rebuild`: embed everything the collection holds (and `paths`) again, into a new collection
    that replaces it only when whole; until then the old one is searched."""
    report = IngestReport(collection)
    t0 = time.perf_counter()
    include, exclude = list(include or []), list(exclude or [])
    check_name(collection)
    with index.connect() as c:
        clear_leftovers(c)
        col = index.get_collection(c, collection)
        rebuild = rebuild and col is not None
        e = None  # loaded when a file needs embedding
        if rebuild:
            e = embedder_for(embedder, None, _sayer(on_event))
        elif col is not None:
            check_ref(col, embedder)
        files: list[Path] = []
        sources: list[tuple[str, list[str], list[str]]] = []
        for p in paths:
            path = Path(p).expanduser().absolute()
            found = gather(path, include, exclude, report, on_event)
            if path.is_dir() or (path.is_file() and supported(path)):  # what `sync` can read again
                sources.append((str(path), include, exclude))
            files.extend(found)
        old = prior = None
        if rebuild:
            old, prior = col, _documents(c, col)
            files = [Path(p) for p in prior if Path(p).exists()] + files
            # built aside under a temporary name that says whose it is (`.NAME-HEX.PID.part`, never a
            # collection's name): a process killed meanwhile leaves it to `clear_leftovers`
            col = index.create_collection(c, unique_part_path("", collection).name, e.ref, e.sha256, e.dim,
                                          chunk_tokens or DEFAULT_BUDGET,
                                          DEFAULT_OVERLAP if overlap is None else overlap)
        state = _State(c, collection, col, e, embedder, report, on_event, chunk_tokens, overlap)
        try:
            state.ingest(list(dict.fromkeys(files)))
            if old is not None:
                _replace(c, old, prior, state.col, sources)
        except BaseException:
            if old is not None:  # the old collection stays as it was; the new one goes, if not in its place yet
                if c.db.in_transaction:  # cut off between BEGIN and its try: the drop must not nest in it
                    c.db.rollback()
                aside = index.get_collection(c, col.name, counts=False)
                if aside is not None:
                    index.drop_collection(c, aside)
            raise
        finally:
            if old is None and state.col is not None:
                _write_sources(c, state.col, sources)
            report.seconds = time.perf_counter() - t0
    return report


def _documents(c: index.Conn, col: index.Collection) -> dict[str, str]:
    return dict(c.execute("SELECT path, sha256 FROM documents WHERE collection_id = ?", (col.id,)).fetchall())


def _write_sources(c: index.Conn, col: index.Collection, sources: list[tuple[str, list[str], list[str]]]) -> None:
    with db.transaction(c.db):
        for src, inc, exc in sources:
            c.execute("INSERT OR REPLACE INTO sources (collection_id, path, include, exclude) VALUES (?, ?, ?, ?)",
                      (col.id, src, json.dumps(inc), json.dumps(exc)))


def _replace(c: index.Conn, old: index.Collection, prior: dict[str, str], new: index.Collection,
             sources: list[tuple[str, list[str], list[str]]]) -> None:
    """A rebuild's last step: `new` takes `old`'s name, with its sources and the new ones, in one
    transaction; refused if `old` changed since the rebuild read it (its new files would be lost)."""
    with db.transaction(c.db):
        now = index.get_collection(c, old.name, counts=False)
        if now is None or now.id != old.id or _documents(c, now) != prior:
            raise LlmdeskError(f"collection '{old.name}' changed while it was being rebuilt (another llmdesk "
                               "added to it or removed it), so it was left as it is: run the rebuild again")
        c.execute("INSERT INTO sources (collection_id, path, include, exclude) SELECT ?, path, include, exclude "
                  "FROM sources WHERE collection_id = ?", (new.id, old.id))
        _write_sources(c, new, sources)
        index.replace_collection(c, old, new)


def clear_leftovers(c: index.Conn) -> None:
    """Drop the collections that rebuilds left half-built when their process was killed."""
    for (name,) in c.execute("SELECT name FROM collections WHERE NOT " + index.LISTED).fetchall():
        pid = part_owner(name)
        col = index.get_collection(c, name, counts=False)
        if pid is not None and not pid_alive(pid) and col is not None:
            index.drop_collection(c, col)


def sync(collection: str = "default", *, embedder=None,
         on_event: Callable[[Event], None] | None = None) -> IngestReport:
    """Bring `collection` in line with the disk: files gone are removed, changed files re-embedded,
    new files in its folders added."""
    report = IngestReport(collection)
    t0 = time.perf_counter()
    with index.connect() as c:
        col = index.require(c, collection)
        for doc_id, path in c.execute("SELECT id, path FROM documents WHERE collection_id = ?", (col.id,)).fetchall():
            if not Path(path).is_file():
                with db.transaction(c.db):
                    index.delete_document(c, col, doc_id)
                    index.touch(c, col)
                report.removed += 1
                _emit(on_event, event="file", path=path, status="removed", chunks=0)
        files: list[Path] = []
        for row in c.execute("SELECT path, include, exclude FROM sources WHERE collection_id = ?", (col.id,)).fetchall():
            p = Path(row["path"])
            if p.is_dir() or (p.is_file() and supported(p)):
                files.extend(gather(p, json.loads(row["include"]), json.loads(row["exclude"]), report, on_event))
        state = _State(c, collection, col, None, embedder, report, on_event, None, None)
        state.ingest(list(dict.fromkeys(files)))
    report.seconds = time.perf_counter() - t0
    return report


def uploads_dir(collection: str) -> Path:
    """Where the server keeps the files uploaded into `collection` (its own copies)."""
    return paths.home() / "uploads" / collection


def remove(collection: str) -> index.Collection:
    """Delete a collection and everything in it, with the copies of files uploaded into it (the
    user's own files are never touched); returns what it was."""
    with index.connect() as c:
        col = index.require(c, collection)
        index.drop_collection(c, col)
    shutil.rmtree(uploads_dir(collection), ignore_errors=True)
    return col


def list_collections() -> list[index.Collection]:
    with index.connect() as c:
        clear_leftovers(c)
        return index.list_all(c)


def check_name(name: str) -> None:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name or ""):
        raise LlmdeskError(f"'{name}' cannot name a collection: use letters, digits, '.', '_' and '-' "
                           "(at most 64, starting with a letter or digit)")


def _sayer(on_event) -> Callable[[str], None]:
    return lambda message: _emit(on_event, event="note", message=message)


def _emit(on_event, **ev) -> None:
    if on_event is not None:
        on_event(ev)


@dataclass
class _Pending:
    path: Path
    sha256: str
    size: int
    kind: str
    old_id: int | None
    chunks: list[Chunk]
    flags: list[list[str]]


class _State:
    """One add or sync: files in, pending chunks embedded in batches, files written one by one."""

    def __init__(self, c, name, col, e, embedder, report, on_event, chunk_tokens, overlap):
        self.c, self.name, self.col, self.e, self.embedder = c, name, col, e, embedder
        self.report, self.on_event = report, on_event
        self.chunk_tokens = chunk_tokens or (col.chunk_tokens if col else DEFAULT_BUDGET)
        self.overlap = overlap if overlap is not None else (col.overlap if col else DEFAULT_OVERLAP)
        self.pending: list[_Pending] = []

    def ingest(self, files: list[Path]) -> None:
        c, r = self.c, self.report
        _emit(self.on_event, event="files", total=len(files))
        known = {}
        if self.col is not None:
            known = {p: (i, s) for i, p, s in c.execute("SELECT id, path, sha256 FROM documents WHERE collection_id = ?",
                                                         (self.col.id,))}
            index.ensure_vec(c, self.col)
        for path in files:
            try:
                data = path.read_bytes()
            except OSError as e:
                self._error(path, f"{path}: cannot read it ({e.strerror or e})")
                continue
            sha = hashlib.sha256(data).hexdigest()
            old = known.get(str(path))
            if old is not None and old[1] == sha:
                r.unchanged += 1
                _emit(self.on_event, event="file", path=str(path), status="unchanged", chunks=0)
                continue
            try:
                doc = extract(path, data)
            except LlmdeskError as err:
                self._error(path, str(err))
                continue
            e = self._embedder()  # a model that cannot be opened stops the whole add
            chunks = chunk(doc, count_tokens=e.count, budget=min(self.chunk_tokens, e.n_ctx - 2), overlap=self.overlap)
            flags = [injection_flags(ch.text + ("\n<!-- " + ch.hidden.replace("-->", "- ->") + " -->"
                                                if ch.hidden else "")) for ch in chunks]
            self.pending.append(_Pending(path, sha, len(data), doc.kind, old[0] if old else None, chunks, flags))
            if sum(len(p.chunks) for p in self.pending) >= EMBED_BATCH:
                self.flush()
        self.flush()

    def _embedder(self) -> Embedder:
        if self.e is None:
            self.e = embedder_for(self.embedder, self.col, _sayer(self.on_event))
        return self.e

    def _error(self, path: Path, msg: str) -> None:
        self.report.errors.append((str(path), msg))
        _emit(self.on_event, event="file", path=str(path), status="error", chunks=0, error=msg)

    def flush(self) -> None:
        if not self.pending:
            return
        e = self._embedder()
        texts = [ch.embed_text for p in self.pending for ch in p.chunks]
        vectors = e.embed(texts)
        _emit(self.on_event, event="embedded", chunks=len(texts))
        if self.col is None:
            self.col = index.get_collection(self.c, self.name) or index.create_collection(
                self.c, self.name, e.ref, e.sha256, e.dim, self.chunk_tokens, self.overlap)
            check_model(self.col, e)
        i = 0
        for p in self.pending:
            rows = []
            for seq, (ch, fl) in enumerate(zip(p.chunks, p.flags)):
                rows.append((seq, ch.text, ch.headings, ch.page, ch.line_start, ch.line_end, ch.char_start,
                             ch.char_end, fl, vectors[i].tobytes()))
                i += 1
            with db.transaction(self.c.db):  # one file: all of it or none
                if p.old_id is not None:
                    index.delete_document(self.c, self.col, p.old_id)
                index.insert_document(self.c, self.col, str(p.path), p.sha256, p.size, p.kind, rows)
                index.touch(self.c, self.col)
            if p.old_id is None:
                self.report.added += 1
            else:
                self.report.updated += 1
            self.report.chunks += len(rows)
            _emit(self.on_event, event="file", path=str(p.path), status="updated" if p.old_id else "added",
                  chunks=len(rows))
        self.pending = []
