"""Retrieval quality of `llmdesk docs search` on the Python library reference: bm25, vector, hybrid.

    .venv/bin/python benchmarks/rag_quality.py [--files 0] [--queries 300] [--seed 14] [--threads N]
                                               [--split test|dev] [--style docstring|no-names|unshared] [--home DIR]

The corpus and the queries are benchmarks/rag_corpus.py's: the library reference of Debian's
python3-doc as Markdown (`--files` pages sampled, 0 = all 317), and as queries the summaries of
the functions' own docstrings (`inspect.getdoc`), each with one relevant passage, the function's
entry in the manual. A hit is relevant when it comes from that page and its character span
overlaps the entry's. `--split dev` samples only pages outside the ones the reported figures
come from (hybrid's weights were chosen there); `--style` rewords the queries
(`rag_corpus.reword`: without the API's names, or without any word of the entry, where the
vectors are the better list).

The pages are added with `llmdesk.rag.ingest.add` to the collection `pydoc-f<files>-s<seed>[-dev]`
in ~/.cache/llmdesk-bench-docs/home (LLMDESK_HOME, or `--home`; unchanged pages are skipped on a second run,
the default embedding model is converted there once), then every query is searched in the three
modes with `llmdesk.rag.search.search(k=10)`. Reported: recall@5 (the share of queries whose
relevant entry is among the first 5 hits) and MRR@10 (the mean of 1/rank of the first relevant
hit, 0 past rank 10) and ms per query, per mode, with a 95% bootstrap interval of hybrid's lead
over the better of the other two (paired, over queries); which list finds what; and, over the
same lists, the fusions search.py used before (reciprocal rank; scores with a fixed vector weight)
and hybrid with other constants.
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
# hybrid's constants (search.VECTOR_WEIGHT, search.MATCH_POWER); power 0 is a fixed vector weight, and no
# FTS5 statistics read. BEFORE: search.py's until the weight followed how much of the query BM25 matched,
# timed beside the three modes; SETTINGS: others, compared on the same queries
BEFORE = (0.6, 0.0)
SETTINGS = ((0.8, 0.0), (0.5, 1.0), (0.5, 1.5), (0.5, 2.0), (0.4, 1.5), (0.6, 1.5))
STYLE_SAYS = {"docstring": "docstring summaries of functions documented in these pages",
              "no-names": "the same without the words of the function's name and signature",
              "unshared": "the same without any word of the function's entry in the manual"}


def bootstrap_lead(a: list[float], b: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of mean(a) - mean(b), resampling the queries (paired)."""
    rng = random.Random(seed)
    d = [x - y for x, y in zip(a, b)]
    means = sorted(sum(d[rng.randrange(len(d))] for _ in d) / len(d) for _ in range(n))
    return means[int(0.025 * n)], means[int(0.975 * n) - 1]


def rrf(bm25: list, vector: list, c: int = 60) -> list:
    """Hits of both lists by reciprocal rank: sum of 1 / (c + rank) (Cormack et al. 2009)."""
    score: dict[int, list] = {}
    for hits in (bm25, vector):
        for rank, h in enumerate(hits, 1):
            score.setdefault(h.chunk_id, [0.0, h])[0] += 1 / (c + rank)
    return [h for _, h in sorted(score.values(), key=lambda x: -x[0])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=0, help="pages of the manual to sample (0: all)")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--split", choices=("test", "dev"), default="test",
                    help="dev: pages outside the held-out sample the reported figures come from (rag_corpus.HELD_OUT)")
    ap.add_argument("--style", choices=rag_corpus.STYLES, default="docstring",
                    help="the queries' style (rag_corpus.reword): docstring summaries as they are, without the "
                         "API's names, or without any word of the relevant entry")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: llama.cpp's)")
    ap.add_argument("--collection", default="pydoc")
    ap.add_argument("--home", type=Path, default=HOME, help=f"LLMDESK_HOME of the collections (default: {HOME})")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    os.environ["LLMDESK_HOME"] = str(args.home)
    from llmdesk.rag import ingest, search

    corpus, pool, manifest = rag_corpus.prepare()
    pages, queries = rag_corpus.select(corpus, pool, args.files, args.queries, args.seed, args.split, args.style)
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

    chosen = (search.VECTOR_WEIGHT, search.MATCH_POWER)
    timed = {**{m: (m, chosen) for m in MODES}, "hybrid before": ("hybrid", BEFORE)}
    ranks: dict[str, list[int | None]] = {m: [] for m in timed}
    seconds: dict[str, float] = {m: 0.0 for m in timed}
    top1: dict[str, list[int | None]] = {m: [] for m in timed}
    for q in queries:
        for label, (m, constants) in timed.items():
            search.VECTOR_WEIGHT, search.MATCH_POWER = constants
            t = time.perf_counter()
            hits = search.search(q["query"], name, k=10, mode=m, embedder=model)
            seconds[label] += time.perf_counter() - t
            ranks[label].append(rag_corpus.first_relevant(q, hits))
            top1[label].append(hits[0].chunk_id if hits else None)
    search.VECTOR_WEIGHT, search.MATCH_POWER = chosen
    # the fusions before, for reference: reciprocal rank over the top 40 of each list (what
    # search(k=10) fused), and hybrid with other constants
    rrf_ranks = []
    for q in queries:
        b, v = (search.search(q["query"], name, k=40, mode=m, embedder=model) for m in ("bm25", "vector"))
        rrf_ranks.append(rag_corpus.first_relevant(q, rrf(b, v)[:10]))
    by_setting = {}
    for w, p in SETTINGS:
        search.VECTOR_WEIGHT, search.MATCH_POWER = w, p
        by_setting[w, p] = [rag_corpus.first_relevant(q, search.search(q["query"], name, k=10, embedder=model))
                            for q in queries]
    search.VECTOR_WEIGHT, search.MATCH_POWER = chosen

    result = {"command": " ".join(["benchmarks/rag_quality.py", *sys.argv[1:]]), "split": args.split,
              "style": args.style, "pages": len(pages), "characters": chars,
              "chunks": getattr(col, "chunks", None) or report.chunks, "queries": len(queries),
              "embedding_model": model.name, "vector_weight": chosen[0],
              "match_power": chosen[1], "modes": {}}
    print(f"{len(queries)} queries ({args.style} style: {STYLE_SAYS[args.style]}), {args.split} split\n")
    print(f"{'mode':<13} {'recall@5':>9} {'MRR@10':>8} {'ms/query':>9}")
    for m in timed:
        s = rag_corpus.scores(ranks[m])
        s["ms_per_query"] = 1000 * seconds[m] / len(queries)
        result["modes"][m] = s
        print(f"{m:<13} {s['recall@5']:>9.3f} {s['mrr@10']:>8.3f} {s['ms_per_query']:>9.1f}")
    print(f"(hybrid before: a fixed vector weight {BEFORE[0]}, search.py's until the weight followed how much of "
          "the query BM25 matched)")

    def per_query(r: list[int | None], metric: str) -> list[float]:
        if metric == "recall@5":
            return [1.0 if x is not None and x <= 5 else 0.0 for x in r]
        return [1 / x if x is not None and x <= 10 else 0.0 for x in r]

    print()
    for metric in ("recall@5", "mrr@10"):
        best = max(("bm25", "vector"), key=lambda m: result["modes"][m][metric])
        lo, hi = bootstrap_lead(per_query(ranks["hybrid"], metric), per_query(ranks[best], metric))
        lead = result["modes"]["hybrid"][metric] - result["modes"][best][metric]
        result[f"hybrid_lead_{metric}"] = {"over": best, "lead": lead, "ci95": [lo, hi]}
        print(f"hybrid - {best} on {metric}: {lead:+.3f} (95% interval {lo:+.3f} to {hi:+.3f})")
    for metric in ("recall@5", "mrr@10"):
        lo, hi = bootstrap_lead(per_query(ranks["hybrid"], metric), per_query(ranks["hybrid before"], metric))
        lead = result["modes"]["hybrid"][metric] - result["modes"]["hybrid before"][metric]
        result[f"hybrid_over_before_{metric}"] = {"lead": lead, "ci95": [lo, hi]}
        print(f"hybrid - hybrid before on {metric}: {lead:+.3f} (95% interval {lo:+.3f} to {hi:+.3f})")
    in5 = {m: {i for i, r in enumerate(ranks[m]) if r is not None and r <= 5} for m in MODES}
    both = len(in5["bm25"] & in5["vector"])
    differs = sum(1 for a, b in zip(top1["hybrid"], top1["bm25"]) if a != b)
    result["top5_sets"] = {"both": both, "bm25_only": len(in5["bm25"] - in5["vector"]),
                           "vector_only": len(in5["vector"] - in5["bm25"]),
                           "hybrid_not_bm25": len(in5["hybrid"] - in5["bm25"]),
                           "bm25_not_hybrid": len(in5["bm25"] - in5["hybrid"]), "top1_differs_from_bm25": differs}
    print(f"entry in the top 5: of both lists {both}, of bm25's only {len(in5['bm25'] - in5['vector'])}, of the "
          f"vectors' only {len(in5['vector'] - in5['bm25'])}; hybrid finds {len(in5['hybrid'] - in5['bm25'])} that "
          f"bm25 does not and misses {len(in5['bm25'] - in5['hybrid'])} that bm25 finds; its first hit is not "
          f"bm25's for {differs} of {len(queries)} queries")

    print("\nother fusions of the same two lists:")
    sc = rag_corpus.scores(rrf_ranks)
    result["rrf_c60"] = sc
    print(f"  reciprocal rank, 1/(60 + rank), top 40 each (the first fusion)   recall@5 {sc['recall@5']:.3f}  "
          f"MRR@10 {sc['mrr@10']:.3f}")
    result["by_setting"] = {}
    for (w, p), r in by_setting.items():
        sc = rag_corpus.scores(r)
        result["by_setting"][f"w{w}-p{p}"] = sc
        what = (f"score fusion, fixed vector weight {w:.1f}" if p == 0 else
                f"score fusion, w = 1 - {1 - w:.1f} * matched ** {p:g}" + (" (search.py)" if (w, p) == chosen else ""))
        print(f"  {what:<64} recall@5 {sc['recall@5']:.3f}  MRR@10 {sc['mrr@10']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
