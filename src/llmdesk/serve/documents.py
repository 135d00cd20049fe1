"""Your documents in the server: answers that cite a collection, and the collections over HTTP.

    POST   /v1/chat/completions  {"collection": "notes", "collection_k": 5, "collection_mode": "hybrid", ...}
    GET    /v1/collections                    the collections
    GET    /v1/collections/{name}             one collection, with its documents
    POST   /v1/collections/{name}/files       multipart/form-data, one `files` field per file (and
                                              `embedder`, a model in the store, for a new collection)
    POST   /v1/collections/{name}/search      {"query", "k", "mode"}: the passages that best answer it
    DELETE /v1/collections/{name}             the collection, and the files uploaded into it

A chat request that names a collection takes the path of `llmdesk ask` and `chat --docs`
(rag.answer): its last user message retrieves passages, which are quoted in that turn as
numbered data (never in the system prompt; flagged ones marked), as many as fit the context with
room for the answer. The answer streams as usual, and the response carries `sources` (the
passages shown, as [n] in the answer points at them) and `sources_dropped` (retrieved, left out to
fit the context): in the JSON answer, or in a last chunk (no choices) before `data: [DONE]`.

The collection's embedding model (to embed a question, or an upload's passages) is one of the
server's models (serve/models.py, `acquire_embedder`): counted against --max-memory, listed by
/api/ps and /v1/models, unloaded after keep_alive or to make room, and a 503 when it does not
fit. A search by words only ("bm25") needs no model.

Uploaded files are kept in $LLMDESK_HOME/uploads/COLLECTION/ (a collection reads its files again on
`llmdesk docs sync`) and named by their file name there. An upload is bounded by the server's
--max-body and MAX_FILES files. Each file is read (its kind, its text) before it is written, so a
bad file is one line in `errors` and the rest go in. Ingesting (extract, chunk, embed, write) runs
on a thread of its own, one upload or removal at a time and at most MAX_WAITING waiting: past that, 429.
"""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ..atomic import atomic_path
from ..errors import LlmdeskError
from ..rag import index, ingest
from ..rag.answer import frame, passage_dict, retrieve
from ..rag.embedder import default_embedder
from ..rag.extract import extract
from ..store import catalog, paths
from ..store.paths import redact
from ..store.refs import looks_like_path, resolve
from .chat import off_loop
from .errors import APIError
from .models import ModelManager

router = APIRouter()
MAX_FILES = 64  # files in one upload
MAX_K = 50  # passages one request may retrieve
MAX_WAITING = 4  # uploads and removals waiting for the one running; past that, 429
MAX_NAME = 200  # characters in an uploaded file's name

# its own thread: ingesting takes minutes on a large file, and one at a time is what the index and
# the embedding model can take anyway
_INGEST = ThreadPoolExecutor(1, thread_name_prefix="llmdesk-ingest")
_queued = 0  # uploads and removals running or waiting
# retrieval waits for the question's embedding, behind other work on the embedding model's
# Engine: longer than off_loop's bound for preparing a request may allow on a busy machine, so
# threads of its own
_SEARCH = ThreadPoolExecutor(2, thread_name_prefix="llmdesk-search")


async def _searched(models: ModelManager, name: str, query: str, k: int, mode: str) -> list:
    """The k passages of collection `name` for `query`, embedded (unless "bm25") by the
    collection's model held from the server's models."""
    loop = asyncio.get_running_loop()
    col = await loop.run_in_executor(_SEARCH, _require, name)
    if mode == "bm25":
        return await loop.run_in_executor(_SEARCH, lambda: retrieve(query, name, k=k, mode=mode))
    lease = await models.acquire_embedder(col.model, col.model_sha256, collection=name)
    try:
        return await loop.run_in_executor(_SEARCH, lambda: retrieve(query, name, k=k, mode=mode,
                                                                     embedder=lease.model))
    finally:
        lease.release()


def _shown(d: dict, collection: str) -> dict:
    """A passage's path for a client: an uploaded file by its name, any other as `~/...`."""
    p = Path(d["path"])
    try:
        d["path"] = p.relative_to(ingest.uploads_dir(collection)).as_posix()
    except ValueError:
        d["path"] = paths.display(p)
    return d


def _require(name: str, *, counts: bool = False) -> index.Collection:
    ingest.check_name(name)
    c = index.shared()
    col = index.get_collection(c, name, counts=counts)
    if col is None:
        names = [x.name for x in index.list_all(c)]
        have = f"the collections are: {', '.join(names)}" if names else "there are no collections yet"
        raise APIError(404, f"no collection named '{name}' ({have}); upload files into it with "
                            f"POST /v1/collections/{name}/files", code="collection_not_found", param="collection")
    return col


# ---------------------------------------------------------------------------------------------
# answers from a collection (/v1/chat/completions with "collection")


@dataclass
class Retrieved:
    """What a request's collection gave: the hits, then (once quoted) what the answer cites."""

    collection: str
    hits: list
    sources: list[dict] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)

    def fields(self) -> dict:
        return {"sources": self.sources, "sources_dropped": self.dropped}


def _question(messages: list[dict]) -> str:
    last = messages[-1]
    if last["role"] != "user":
        raise APIError(400, "'collection' answers the last message, which must be the user's question "
                            f"(it is a '{last['role']}' message)", param="messages")
    return last.get("content") or ""


async def retrieve_for(models: ModelManager, body, messages: list[dict]) -> Retrieved | None:
    """The passages of `body.collection` for the last user message (None: no collection named)."""
    if body.collection is None:
        return None
    question = _question(messages)
    return Retrieved(body.collection, await _searched(models, body.collection, question, body.collection_k,
                                                      body.collection_mode))


def quote(model, messages: list[dict], docs: Retrieved, max_tokens: int | None) -> list[dict]:
    """The conversation with the passages quoted in its last turn (rag.answer.frame): the
    request's system messages after the rule that frames passages, then its turns. Fills
    `docs.sources` and `docs.dropped`."""
    lead = 0
    while lead < len(messages) and messages[lead]["role"] == "system":
        lead += 1
    system = "\n\n".join(m["content"] for m in messages[:lead] if m.get("content")) or None
    msgs, quoted, dropped, _room = frame(model, _question(messages), docs.hits, messages[lead:-1],
                                         max_tokens=max_tokens, system=system)
    docs.sources = [_shown(passage_dict(h, n), docs.collection) for n, h in enumerate(quoted.passages, 1)]
    docs.dropped = [_shown(passage_dict(h), docs.collection) for h in dropped]
    return msgs


# ---------------------------------------------------------------------------------------------
# collections over HTTP


def _card(col: index.Collection) -> dict:
    d = col.to_dict()
    d["model"] = Path(col.model).name if looks_like_path(col.model) else col.model
    return {"object": "collection", **d}


@router.get("/v1/collections")
async def list_collections():
    cols = await off_loop(lambda: index.list_all(index.shared()))
    return {"object": "list", "data": [_card(c) for c in cols]}


@router.get("/v1/collections/{name}")
async def get_collection(name: str):
    def describe() -> dict:
        col = _require(name, counts=True)
        rows = index.shared().execute(
            "SELECT path, size, kind, added, (SELECT count(*) FROM chunks k WHERE k.document_id = d.id) "
            "FROM documents d WHERE collection_id = ? ORDER BY path", (col.id,)).fetchall()
        docs = [{"path": _shown({"path": r[0]}, name)["path"], "size": r[1], "kind": r[2], "added": r[3], "chunks": r[4]}
                for r in rows]
        return {**_card(col), "files": docs}

    return await off_loop(describe)


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    query: str = Field(min_length=1, max_length=10_000)
    k: int = Field(5, ge=1, le=MAX_K)
    mode: Literal["hybrid", "bm25", "vector"] = "hybrid"


@router.post("/v1/collections/{name}/search")
async def search_collection(name: str, body: SearchRequest, request: Request):
    hits = await _searched(request.app.state.llmdesk.models, name, body.query, body.k, body.mode)
    return {"object": "list", "data": [_shown(passage_dict(h, n), name) for n, h in enumerate(hits, 1)]}


def _check_queue() -> None:
    if _queued > MAX_WAITING:
        raise APIError(429, f"{_queued} uploads are being ingested or waiting; try again when they are done",
                       headers={"Retry-After": "5"})


async def _one_at_a_time(fn, *args):
    """`fn(*args)` on the ingest thread, after the uploads and removals before it."""
    global _queued
    _check_queue()
    _queued += 1
    try:
        return await asyncio.get_running_loop().run_in_executor(_INGEST, fn, *args)
    finally:
        _queued -= 1


def _file_name(raw: str) -> str:
    """An uploaded file's name, as it will be kept: no folders, nothing hidden or odd."""
    name = raw.replace("\\", "/").rsplit("/", 1)[-1].strip()
    if not name or name in (".", "..") or name.startswith(".") or len(name) > MAX_NAME \
            or re.search(r"[\x00-\x1f\x7f]", name):
        raise LlmdeskError(f"{raw[:MAX_NAME]!r} cannot name an uploaded file: give it a plain file name "
                           f"(at most {MAX_NAME} characters, not starting with '.')")
    return name


def _embedding_model(collection: str, embedder: str | None) -> tuple[str, str]:
    """(reference, sha256) of the embedding model an upload into `collection` uses: the
    collection's own (another `embedder` is refused), else `embedder`, else the default
    (converted and added to the store at its first use)."""
    col = index.get_collection(index.shared(), collection, counts=False)
    if col is not None:
        if embedder is not None:
            ingest.check_ref(col, embedder)
        return col.model, col.model_sha256
    ref = embedder or default_embedder()
    return ref, resolve(ref).entry.sha256


def _ingest(collection: str, uploads: list[tuple[str, bytes]], embedder) -> dict:
    """Write the uploads that read as documents to the collection's folder, and add them with
    `embedder` (a model the server holds, and the reference a new collection records)."""
    folder = ingest.uploads_dir(collection)
    errors: list[dict] = []
    saved: dict[Path, str] = {}  # where each went -> its name as sent
    made: list[Path] = []  # files this upload created (removed again if they do not go in)
    for raw, data in uploads:
        try:
            name = _file_name(raw)
            extract(Path(name), data)  # its kind and its text; a bad file is never written
        except LlmdeskError as e:
            errors.append({"file": raw, "error": redact(str(e))})
            continue
        dest = folder / name
        folder.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            made.append(dest)
        with atomic_path(dest) as tmp:
            tmp.write_bytes(data)
        saved[dest] = raw
    report = ingest.IngestReport(collection)
    try:
        if saved:
            report = ingest.add(list(saved), collection, embedder=ingest.Embedder(*embedder))
    except BaseException:
        for p in made:
            p.unlink(missing_ok=True)
        raise
    for path, message in report.errors:
        p = Path(path)
        errors.append({"file": saved.get(p, p.name), "error": redact(message.replace(path, p.name))})
        if p in made:
            p.unlink(missing_ok=True)
    return {"object": "collection.upload", **report.to_dict(), "errors": errors}


@router.post("/v1/collections/{name}/files")
async def upload_files(name: str, request: Request):
    ingest.check_name(name)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(400, "send the files as multipart/form-data, one 'files' field per file", param="files")
    _check_queue()  # before the body is read
    form = await request.form(max_files=MAX_FILES, max_fields=4, max_part_size=4096)
    try:
        files = [f for f in form.getlist("files") if not isinstance(f, str)]
        if not files:
            raise APIError(400, "no files: send each file as a 'files' field of a multipart/form-data body",
                           param="files")
        embedder = form.get("embedder") or None
        if embedder is not None:
            if not isinstance(embedder, str) or looks_like_path(embedder) \
                    or catalog.get(*catalog.parse_name(embedder)) is None:
                raise APIError(400, f"'embedder' must name an embedding model in this server's store (NAME or "
                                    f"NAME:TAG, see `llmdesk list`), not {str(embedder)[:100]!r}", param="embedder")
        uploads = [(f.filename or "", await f.read()) for f in files]
    finally:
        await form.close()
    _check_queue()
    ref, sha256 = await asyncio.to_thread(_embedding_model, name, embedder)
    lease = await request.app.state.llmdesk.models.acquire_embedder(ref, sha256, collection=name)
    try:  # held while the upload waits and is ingested: the model is not unloaded meanwhile
        return await _one_at_a_time(_ingest, name, uploads, (lease.model, ref))
    finally:
        lease.release()


@router.delete("/v1/collections/{name}")
async def delete_collection(name: str):
    await off_loop(_require, name)

    col = await _one_at_a_time(ingest.remove, name)
    return {"object": "collection.deleted", "name": col.name, "deleted": True, "documents": col.documents,
            "chunks": col.chunks}
