"""The default embedding model through llmdesk (llama.cpp) against sentence-transformers (PyTorch),
same weights, same passages, same threads, in one run.

    .venv/bin/python benchmarks/embed_vs_sentence_transformers.py [--passages 128] [-t 2] [--rounds 4]
        [--model all-minilm-l6-v2:f16]

Passages are cut from this repository's docs (20 to 110 words each, a fixed seed). Every side
embeds all of them per round (llmdesk: one `Model.embed` call; sentence-transformers: `encode`,
batch 32, normalised); rounds rotate which side goes first and follow an untimed warm-up. llmdesk
runs three ways: as it embeds (each step the faster way lately, measured), always side by side
(an encoder's texts split over contexts of one thread: `engine.embed_side_by_side = True`) and
always one context of every thread (`False`, what llama.cpp does by itself).

Reports tokens/s (wall clock) and tokens per CPU-second (this process, all threads) of each side
(the model's word pieces, [CLS] and [SEP] included), the ratios (medians over rounds), and how
close the vectors are: the minimum cosine over the passages whose token ids agree and that fit in
sentence-transformers' 256-token cut (the others differ on purpose: see docs/convert.md,
"Embedding models").
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def passages(n: int, seed: int = 0) -> list[str]:
    words = " ".join((ROOT / "docs" / f).read_text(encoding="utf-8") for f in ("architecture.md", "serve.md")).split()
    rng = np.random.default_rng(seed)
    return [" ".join(words[i:i + k]) for i, k in zip(rng.integers(0, len(words) - 120, n), rng.integers(20, 110, n))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passages", type=int, default=128)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--model", default=None, help="an embedding GGUF or NAME:TAG (default: the default embedder)")
    args = ap.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer

    from llmdesk.rag.embedder import default_embedder, open_embedder, package_zip

    torch.set_num_threads(args.threads)
    texts = passages(args.passages)
    ref = args.model or default_embedder(progress=print)
    one, split = open_embedder(ref, threads=args.threads), open_embedder(ref, threads=args.threads)
    one.engine.embed_side_by_side, split.engine.embed_side_by_side = False, True  # before their first text
    texts = [t for t in texts if len(one.embed_tokens(t)) <= one.n_ctx]  # a passage of code can outgrow the context
    with tempfile.TemporaryDirectory() as tmp, open_embedder(ref, threads=args.threads) as m, one, split:
        with zipfile.ZipFile(package_zip()) as z:
            z.extractall(tmp)
        st = SentenceTransformer(tmp, device="cpu")
        tok = Tokenizer.from_file(str(Path(tmp) / "tokenizer.json"))
        tok.no_padding()
        tok.no_truncation()
        ids = [m.embed_tokens(t) for t in texts]
        n_tok = sum(len(x) for x in ids)
        agree = np.array([len(x) <= 256 and x == tok.encode(t).ids for x, t in zip(ids, texts)])
        m.embed(texts[:8])  # warm-up
        st.encode(texts[:8])

        def run_llmdesk():
            return np.array(m.embed(texts))

        def run_one_context():
            return np.array(one.embed(texts))

        def run_side_by_side():
            return np.array(split.embed(texts))

        def run_st():
            return st.encode(texts, batch_size=32, normalize_embeddings=True)

        one.embed(texts[:8])
        split.embed(texts[:8])
        sides = [("llmdesk", run_llmdesk), ("llmdesk, one context", run_one_context),
                 ("llmdesk, side by side", run_side_by_side), ("sentence-transformers", run_st)]
        times: dict[str, list[float]] = {name: [] for name, _ in sides}
        cpu: dict[str, list[float]] = {name: [] for name, _ in sides}
        vecs = {}
        for r in range(args.rounds):
            for name, fn in sides[r % len(sides):] + sides[:r % len(sides)]:
                t0, c0 = time.perf_counter(), time.process_time()
                vecs[name] = fn()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    cos = (vecs["llmdesk"] * vecs["sentence-transformers"]).sum(1)
    print(f"{ref}: {len(texts)} passages, {n_tok} tokens, {args.threads} threads, {args.rounds} rounds")
    for name, ts in times.items():
        print(f"  {name:24s} {n_tok / statistics.median(ts):7.0f} tokens/s  {n_tok / statistics.median(cpu[name]):7.0f} "
              "tokens/CPU-s  (rounds, tokens/s: " + ", ".join(f"{n_tok / t:.0f}" for t in ts) + ")")
    st_w, st_c = statistics.median(times["sentence-transformers"]), statistics.median(cpu["sentence-transformers"])
    for name in ("llmdesk", "llmdesk, one context", "llmdesk, side by side"):
        print(f"  {name} / sentence-transformers speed: {st_w / statistics.median(times[name]):.2f}x by the wall clock, "
              f"{st_c / statistics.median(cpu[name]):.2f}x by CPU time")
    print(f"  vectors: min cos {cos[agree].min():.6f} over the {int(agree.sum())} passages whose tokens agree "
          f"and fit in 256; min cos {cos.min():.4f} over all")


if __name__ == "__main__":
    main()
