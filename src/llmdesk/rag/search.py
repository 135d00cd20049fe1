"""Searching a collection: BM25 (FTS5), vectors (sqlite-vec KNN) or both fused by rank.

    hits = search("how do I rotate the API key?", "default", k=5)          # hybrid
    hits = search("ERR_4021", mode="bm25")                                  # exact words only
    hits[0].path, hits[0].headings, hits[0].page, hits[0].line_start, hits[0].text, hits[0].flags

- bm25: the query's words (stemmed; stop words left out; `os.path.join` or `max_tokens` as a
  phrase) OR-ed in an FTS5 query over chunk text and heading paths, ranked by BM25.
- vector: the query embedded by the collection's model, the k nearest chunks by cosine distance
  (`vec0 ... WHERE embedding MATCH ? AND k = ?`); exact numpy ranking over the stored vectors,
  with a notice, when sqlite-vec cannot load.
- hybrid (the default): both lists, 4k candidates each, fused by reciprocal rank
  (score = sum of 1 / (60 + rank), Cormack et al. 2009): a chunk found by both rises, and an
  exact name that the vectors miss is still found.

`rerank(query, hits) -> hits` is the hook for a re-ranker (a cross-encoder, say): it gets the
fused candidates (4k of them) and its order is kept, cut to k.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import LlmdeskError
from . import index

MODES = ("hybrid", "bm25", "vector")
RRF_K = 60  # reciprocal rank fusion's constant (Cormack, Clarke & Buettcher, SIGIR 2009)
CANDIDATES = 4  # each list gives k * CANDIDATES candidates to the fusion

_STOP = set("""a an and are as at be but by can do does for from has have how i if in into is it its of on or
so than that the their then there these this to was what when where which who why will with you your""".split())


@dataclass
class Hit:
    chunk_id: int
    text: str
    path: str
    headings: list[str]
    page: int | None
    line_start: int
    line_end: int
    char_start: int
    char_end: int
    score: float  # hybrid: the fused reciprocal-rank score; bm25: -BM25 (higher is better); vector: cosine
    flags: list[str] = field(default_factory=list)  # why the passage looks like instructions (rag.guard)

    @property
    def where(self) -> str:
        """`file.pdf > Heading > Sub, page 3, lines 10-14`: what a citation points at."""
        place = " > ".join([self.path, *self.headings])
        if self.page is not None:
            place += f", page {self.page}"
        lines = f"line {self.line_start}" if self.line_start == self.line_end else f"lines {self.line_start}-{self.line_end}"
        return f"{place}, {lines}"

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def fts_query(query: str) -> str:
    """An FTS5 query for free text: each word a term (a phrase if it holds punctuation), OR-ed."""
    terms, loose = [], []
    for word in query.split():
        toks = re.findall(r"[^\W_]+", word.lower())
        if not toks:
            continue
        term = '"' + " ".join(toks) + '"'
        (loose if len(toks) == 1 and toks[0] in _STOP else terms).append(term)
    terms = terms or loose
    return " OR ".join(dict.fromkeys(terms))


def search(query: str, collection: str = "default", *, k: int = 5, mode: str = "hybrid", embedder=None,
           rerank: Callable[[str, list[Hit]], list[Hit]] | None = None,
           on_notice: Callable[[str], None] | None = None) -> list[Hit]:
    """The k chunks of `collection` that best answer `query`. `embedder`: the collection's model,
    loaded (a Model) or by reference; None opens it (once per process)."""
    if mode not in MODES:
        raise LlmdeskError(f"unknown search mode '{mode}': use one of {', '.join(MODES)}")
    if not isinstance(k, int) or not 1 <= k <= 1000:
        raise LlmdeskError(f"k must be a whole number from 1 to 1000, not {k!r}")
    if not query or not query.strip():
        raise LlmdeskError("the search query is empty")
    n = k * CANDIDATES if mode == "hybrid" or rerank else k
    c = index.shared()
    col = index.require(c, collection, counts=False)
    ranked: list[list[tuple[int, float]]] = []
    if mode in ("bm25", "hybrid"):
        ranked.append(_bm25(c, col, query, n))
    if mode in ("vector", "hybrid"):
        from .ingest import embedder_for

        e = embedder_for(embedder, col)
        q = e.embed([query])[0]
        if not c.vec and on_notice is None:
            warnings.warn(index.vec_notice(), RuntimeWarning, stacklevel=2)
        elif not c.vec:
            on_notice(index.vec_notice())
        ranked.append(_vector(c, col, q, n))
    if len(ranked) == 1:
        scored = ranked[0][:n]
    else:
        fused: dict[int, float] = {}
        for lst in ranked:
            for rank, (cid, _s) in enumerate(lst, 1):
                fused[cid] = fused.get(cid, 0.0) + 1.0 / (RRF_K + rank)
        scored = sorted(fused.items(), key=lambda x: -x[1])[:n]
    hits = _hits(c, scored)
    if rerank is not None:
        hits = list(rerank(query, hits))
    return hits[:k]


def passages(collection: str = "default") -> list[Hit]:
    """Every chunk of `collection` as a Hit (score 0), document by document in order."""
    c = index.shared()
    col = index.require(c, collection, counts=False)
    ids = [r[0] for r in c.execute(
        "SELECT chunks.id FROM chunks JOIN documents ON documents.id = chunks.document_id "
        "WHERE chunks.collection_id = ? ORDER BY documents.path, chunks.seq", (col.id,))]
    out: list[Hit] = []
    for i in range(0, len(ids), 500):  # a bounded number of SQL variables per query
        out += _hits(c, [(cid, 0.0) for cid in ids[i: i + 500]])
    return out


def _bm25(c: index.Conn, col: index.Collection, query: str, n: int) -> list[tuple[int, float]]:
    q = fts_query(query)
    if not q:
        return []
    # headings weigh half as much as the text they head
    rows = c.execute("SELECT chunks_fts.rowid, bm25(chunks_fts, 1.0, 0.5) AS s FROM chunks_fts "
                     "JOIN chunks ON chunks.id = chunks_fts.rowid WHERE chunks_fts MATCH ? AND chunks.collection_id = ? "
                     "ORDER BY s LIMIT ?", (q, col.id, n)).fetchall()
    return [(r[0], -r[1]) for r in rows]


def _vector(c: index.Conn, col: index.Collection, q: np.ndarray, n: int) -> list[tuple[int, float]]:
    q = np.asarray(q, dtype=np.float32)
    if c.vec:
        index.ensure_vec(c, col)
        rows = c.execute(f"SELECT rowid, distance FROM vec_{col.id} WHERE embedding MATCH ? AND k = ? "
                         "ORDER BY distance", (q.tobytes(), n)).fetchall()
        return [(r[0], 1.0 - r[1]) for r in rows]
    rows = c.execute("SELECT id, embedding FROM chunks WHERE collection_id = ?", (col.id,)).fetchall()
    if not rows:
        return []
    ids = np.array([r[0] for r in rows])
    m = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), col.dim)
    sims = m @ q / (np.linalg.norm(m, axis=1) * (np.linalg.norm(q) or 1.0) + 1e-12)
    top = np.argsort(-sims, kind="stable")[:n]
    return [(int(ids[i]), float(sims[i])) for i in top]


def _hits(c: index.Conn, scored: list[tuple[int, float]]) -> list[Hit]:
    if not scored:
        return []
    ids = [cid for cid, _ in scored]
    rows = c.execute(
        "SELECT chunks.id, text, documents.path, headings, page, line_start, line_end, char_start, char_end, flags "
        f"FROM chunks JOIN documents ON documents.id = chunks.document_id WHERE chunks.id IN ({','.join('?' * len(ids))})",
        ids).fetchall()
    by_id = {r[0]: r for r in rows}
    out = []
    for cid, s in scored:
        r = by_id.get(cid)
        if r is not None:
            out.append(Hit(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5], r[6], r[7], r[8], float(s), json.loads(r[9])))
    return out
