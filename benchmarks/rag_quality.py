"""Retrieval quality of `llmdesk docs search` on the Python library reference: bm25, vector, hybrid.

    .venv/bin/python benchmarks/rag_quality.py [--files 0] [--queries 300] [--seed 14] [--threads N]

The corpus and the queries are benchmarks/rag_corpus.py's: the library reference of Debian's
python3-doc as Markdown (`--files` pages sampled, 0 = all 317), and as queries the summaries of
the functions' own docstrings (`inspect.getdoc`), each with one relevant passage, the function's
entry in the manual. A hit is relevant when it comes from that page and its character span
overlaps the entry's.

The pages are added with `llmdesk.rag.ingest.add` to the collection `pydoc` in
~/.cache/llmdesk-bench-docs/home (LLMDESK_HOME; unchanged pages are skipped on a second run,
the default embedding model is converted there once), then every query is searched in the three
modes with `llmdesk.rag.search.search(k=10)`. Reported: recall@5 (the share of queries whose
relevant entry is among the first 5 hits) and MRR@10 (the mean of 1/rank of the first relevant
hit, 0 past rank 10), per mode, with a 95% bootstrap interval of hybrid's lead over the better of
the other two (paired, over queries), and what other reciprocal-rank fusions of the same two
lists would score.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import rag_corpus  # benchmarks/, beside this script

HOME = rag_corpus.CACHE / "home"
MODES = ("bm25", "vector", "hybrid")


def bootstrap_lead(a: list[float], b: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of mean(a) - mean(b), resampling the queries (paired)."""
    rng = random.Random(seed)
    d = [x - y for x, y in zip(a, b)]
    means = sorted(sum(d[rng.randrange(len(d))] for _ in d) / len(d) for _ in range(n))
    return means[int(0.025 * n)], means[int(0.975 * n) - 1]


def fuse(bm25: list, vector: list, c: int, w_bm25: float, w_vector: float) -> list:
    """Hits of both lists by weighted reciprocal rank: sum of w / (c + rank)."""
    score: dict[int, list] = {}
    for hits, w in ((bm25, w_bm25), (vector, w_vector)):
        for rank, h in enumerate(hits, 1):
            score.setdefault(h.chunk_id, [0.0, h])[0] += w / (c + rank)
    return [h for _, h in sorted(score.values(), key=lambda x: -x[0])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=0, help="pages of the manual to sample (0: all)")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--split", choices=("test", "dev"), default="test",
                    help="dev: pages outside the held-out sample the reported figures come from (rag_corpus.HELD_OUT)")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: llama.cpp's)")
    ap.add_argument("--collection", default="pydoc")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    os.environ["LLMDESK_HOME"] = str(HOME)
    from llmdesk.rag import ingest, search

    corpus, pool, manifest = rag_corpus.prepare()
    pages, queries = rag_corpus.select(corpus, pool, args.files, args.queries, args.seed, args.split)
    model = rag_corpus.embed_model(args.threads)
    name = f"{args.collection}-f{args.files}-s{args.seed}" + ("-dev" if args.split == "dev" else "")
    have = {c.name for c in ingest.list_collections()}
    t = time.perf_counter()
    report = ingest.add([str(p) for p in pages], name, embedder=model)
    if report.errors:
        sys.exit(f"error: {report.errors[0][1]}")
    col = next(c for c in ingest.list_collections() if c.name == name)
    chars = sum(len(p.read_text(encoding="utf-8")) for p in pages)
    print(f"corpus: {len(pages)} pages of {manifest['source']} ({chars:,} characters), collection '{name}' "
          f"{'reused' if name in have and not report.added else 'built'}: {report.added} pages added, "
          f"{report.unchanged} unchanged, {report.chunks} chunks embedded in {time.perf_counter() - t:.1f} s",
          flush=True)

    ranks: dict[str, list[int | None]] = {m: [] for m in MODES}
    seconds: dict[str, float] = {m: 0.0 for m in MODES}
    lists: list[tuple[list, list]] = []  # each query's bm25 and vector top 20, for the fusion variants
    for q in queries:
        got = {}
        for m in MODES:
            t = time.perf_counter()
            got[m] = search.search(q["query"], name, k=10 if m == "hybrid" else 20, mode=m, embedder=model)
            seconds[m] += time.perf_counter() - t
            ranks[m].append(rag_corpus.first_relevant(q, got[m][:10]))
        lists.append((got["bm25"], got["vector"]))
    result = {"command": " ".join(["benchmarks/rag_quality.py", *sys.argv[1:]]), "pages": len(pages),
              "characters": chars, "chunks": getattr(col, "chunks", None) or report.chunks, "queries": len(queries),
              "embedding_model": model.name, "modes": {}}
    print(f"{len(queries)} queries (docstring summaries of functions documented in these pages)\n")
    print(f"{'mode':<8} {'recall@5':>9} {'MRR@10':>8} {'ms/query':>9}")
    for m in MODES:
        s = rag_corpus.scores(ranks[m])
        s["ms_per_query"] = 1000 * seconds[m] / len(queries)
        result["modes"][m] = s
        print(f"{m:<8} {s['recall@5']:>9.3f} {s['mrr@10']:>8.3f} {s['ms_per_query']:>9.1f}")

    def per_query(m: str, metric: str) -> list[float]:
        if metric == "recall@5":
            return [1.0 if r is not None and r <= 5 else 0.0 for r in ranks[m]]
        return [1 / r if r is not None and r <= 10 else 0.0 for r in ranks[m]]

    print()
    for metric in ("recall@5", "mrr@10"):
        best = max(("bm25", "vector"), key=lambda m: result["modes"][m][metric])
        lo, hi = bootstrap_lead(per_query("hybrid", metric), per_query(best, metric))
        lead = result["modes"]["hybrid"][metric] - result["modes"][best][metric]
        result[f"hybrid_lead_{metric}"] = {"over": best, "lead": lead, "ci95": [lo, hi]}
        print(f"hybrid - {best} on {metric}: {lead:+.3f} (95% interval {lo:+.3f} to {hi:+.3f})")
    # reciprocal rank fusion of the same two lists (top 20 of each), other constants and weights
    print("\nfusion variants over the bm25 and vector top 20 (score = sum of w / (c + rank)):")
    result["fusion_variants"] = []
    for c, wb, wv in ((60, 1, 1), (10, 1, 1), (60, 2, 1)):
        fr = [rag_corpus.first_relevant(q, fuse(b, v, c, wb, wv)[:10]) for q, (b, v) in zip(queries, lists)]
        sc = rag_corpus.scores(fr)
        result["fusion_variants"].append({"c": c, "w_bm25": wb, "w_vector": wv, **sc})
        print(f"  c={c:<3} bm25:vector {wb}:{wv}  recall@5 {sc['recall@5']:.3f}  MRR@10 {sc['mrr@10']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
