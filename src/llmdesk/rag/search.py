"""Searching a collection: BM25 (FTS5), vectors (sqlite-vec KNN) or both, their scores fused.

    hits = search("how do I rotate the API key?", "default", k=5)          # hybrid
    hits = search("ERR_4021", mode="bm25")                                  # exact words only
    hits[0].path, hits[0].headings, hits[0].page, hits[0].line_start, hits[0].text, hits[0].flags

- bm25: the query's words (stemmed; stop words left out; `os.path.join` or `max_tokens` as a
  phrase) OR-ed in an FTS5 query over chunk text and heading paths, ranked by BM25.
- vector: the query embedded by the collection's model, the k nearest chunks by cosine distance
  (`vec0 ... WHERE embedding MATCH ? AND k = ?`); exact numpy ranking over the stored vectors,
  with a notice, when sqlite-vec cannot load.
- hybrid (the default): both lists, 4k candidates each, every candidate scored both ways
  (a chunk one list did not return gets its BM25, 0 if it has none of the query's words, and its
  cosine), then fused by a convex combination of the two scores, each scaled from its
  theoretical minimum (BM25 0, cosine -1) to the best candidate's score:

      score = (1 - w) * bm25 / max bm25  +  w * (1 + cos) / (1 + max cos)

  (Bruch, Gai & Ingber, "An Analysis of Fusion Functions for Hybrid Retrieval", ACM TOIS 2023:
  their TM2C2). Unlike reciprocal rank fusion it keeps how far ahead a list's best is: a chunk
  whose words match far better than the next one's stays first though the vectors rank it
  8th, and a chunk the two lists both rank second or third does not pass it on agreement alone.

  The vectors' weight w follows how much of the query BM25 actually matched: `matched` is the
  share of the query's IDF (FTS5's own, per word or phrase, over the whole index) held by the
  words that BM25's best candidate contains, and

      w = 1 - (1 - VECTOR_WEIGHT) * matched ** MATCH_POWER

  A query whose best BM25 candidate holds all its words keeps BM25's lead (w = VECTOR_WEIGHT);
  one whose meaningful words are absent from it (BM25 found only its common words somewhere)
  leans on the vectors (w near 1; no BM25 candidate at all: the vectors alone). A single w could
  not serve both: the cosines of the top candidates differ by a few hundredths, so any BM25 share
  decides the order, which is right where BM25 matched the query and wrong where it did not.
  Both constants were chosen on pages and queries apart from the ones reported
  (docs/documents-bench.md).

`rerank(query, hits) -> hits` is the hook for a re-ranker (a cross-encoder, say): it gets the
fused candidates (4k of them) and its order is kept, cut to k.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import LlmdeskError
from . import index

MODES = ("hybrid", "bm25", "vector")
VECTOR_WEIGHT = 0.5  # w, the cosine's share of the hybrid score, when BM25's best holds every word of the query
MATCH_POWER = 1.5  # how fast w grows towards 1 as BM25's best matches less of the query (0: w is VECTOR_WEIGHT)
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
    score: float  # hybrid: the fused score (0 to 1); bm25: BM25 (higher is better); vector: cosine
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
    if mode != "bm25":  # the query is embedded on the Engine's thread while BM25 runs here
        from .ingest import embedder_for

        embedding = embedder_for(embedder, col).start([query])
    if mode != "vector":  # hybrid: every chunk's BM25 (all of them are computed to rank anyway)
        bm25 = _bm25(c, col, query, n if mode == "bm25" else -1)
    if mode != "bm25":
        q = embedding()[0]
        if not c.vec and on_notice is None:
            warnings.warn(index.vec_notice(), RuntimeWarning, stacklevel=2)
        elif not c.vec:
            on_notice(index.vec_notice())
        vector = _vector(c, col, q, n)
    if mode == "bm25":
        scored = bm25
    elif mode == "vector":
        scored = vector
    else:
        every, cos = dict(bm25), dict(vector)
        candidates = [cid for cid, _ in bm25[:n]] + [cid for cid, _ in vector]
        cos.update(_cosine_of(c, q, [cid for cid in candidates if cid not in cos]))
        matched = _matched(c, query, bm25[0][0]) if bm25 and MATCH_POWER else 0.0
        scored = fuse({cid: every.get(cid, 0.0) for cid in candidates}, cos, vector_weight(matched))[:n]
    hits = _hits(c, scored)
    if rerank is not None:
        hits = list(rerank(query, hits))
    return hits[:k]


def fuse(bm25: dict[int, float], cosine: dict[int, float], vector_weight: float | None = None) -> list[tuple[int, float]]:
    """Candidates {chunk id: score} of the two lists, each scored both ways (a chunk with no BM25
    score has none of the query's words: 0), as (chunk id, fused score), best first: the convex
    combination of BM25 / its best and (1 + cos) / (1 + its best); see the module's doc."""
    w = VECTOR_WEIGHT if vector_weight is None else vector_weight
    top_b = max(bm25.values(), default=0.0) or 1.0  # no candidate has a word of the query: BM25 adds 0 to all
    top_v = (1.0 + max(cosine.values(), default=0.0)) or 1.0
    fused = {cid: (1 - w) * bm25.get(cid, 0.0) / top_b + w * (1.0 + cos) / top_v for cid, cos in cosine.items()}
    return sorted(fused.items(), key=lambda x: (-x[1], x[0]))


def vector_weight(matched: float) -> float:
    """w for a query whose best BM25 candidate holds `matched` (0 to 1) of its IDF; see the module's doc."""
    return 1.0 - (1.0 - VECTOR_WEIGHT) * matched ** MATCH_POWER


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
    """The n best chunks by BM25 (n = -1: every chunk with a word of the query), best first."""
    q = fts_query(query)
    if not q:
        return []
    # headings weigh half as much as the text they head
    rows = c.execute("SELECT chunks_fts.rowid, bm25(chunks_fts, 1.0, 0.5) AS s FROM chunks_fts "
                     "JOIN chunks ON chunks.id = chunks_fts.rowid WHERE chunks_fts MATCH ? AND chunks.collection_id = ? "
                     "ORDER BY s LIMIT ?", (q, col.id, n)).fetchall()
    return [(r[0], -r[1]) for r in rows]


def _matched(c: index.Conn, query: str, top: int) -> float:
    """The share of the query's IDF held by the terms (words or phrases of `fts_query`) that chunk
    `top` contains. IDF as FTS5's bm25() computes it (sqlite's fts5_aux.c): log((N - n + 0.5) /
    (n + 0.5)), at least 1e-6, n the chunks holding the term and N all chunks, over the whole index."""
    terms = fts_query(query).split(" OR ")
    rows = c.execute("SELECT count(*) FROM chunks").fetchone()[0]  # = the FTS index's rows (kept in step)
    whole = held = 0.0
    for term in terms:
        n, mine = c.execute("SELECT count(*), coalesce(sum(rowid = ?), 0) FROM chunks_fts WHERE chunks_fts MATCH ?",
                            (top, term)).fetchone()
        idf = max(math.log((rows - n + 0.5) / (n + 0.5)), 1e-6)
        whole += idf
        held += idf if mine else 0.0
    return held / whole if whole else 0.0


def _cosine_of(c: index.Conn, q: np.ndarray, ids: list[int]) -> dict[int, float]:
    """The cosine between the query's vector and the given chunks' (stored L2-normalised)."""
    if not ids:
        return {}
    q = np.asarray(q, dtype=np.float32)
    q = q / (np.linalg.norm(q) or 1.0)
    rows = c.execute(f"SELECT id, embedding FROM chunks WHERE id IN ({','.join('?' * len(ids))})", ids).fetchall()
    return {r[0]: float(np.frombuffer(r[1], dtype=np.float32) @ q) for r in rows}


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
