"""The size-quality picture of docs/quantize.md, reproducibly: train two tiny models that share a
tokenizer, then sweep them over quantization types.

    python benchmarks/quantize_sweep.py [--work DIR] [--steps 150] [--types Q8_0,...] [--threads 1]

Writes DIR/sweep.md, DIR/sweep.png and DIR/sweep.json (the same data). Needs the training extra.
Takes ~10 minutes on 2 shared CPU cores. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("build/quantize-sweep"))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--types", default="Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q3_K_M,Q2_K")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    from llmdesk.demo.corpus import conversations, write_corpus
    from llmdesk.quantize.sweep import sweep
    from llmdesk.train.config import TrainConfig
    from llmdesk.train.loop import render_chatml, train

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(work / "corpus.jsonl", seed=0, per_fact=8)
    text = "".join(render_chatml(m) for m in conversations(seed=1, per_fact=2))  # held-out paraphrases
    (work / "eval.txt").write_text(text)
    # rows of 256 so that the K-quants apply (llama.cpp falls back for other widths)
    shape = dict(n_embd=256, n_head=4, n_head_kv=2, n_ff=512, vocab_size=512, seq_len=64, batch=8,
                 steps=args.steps, lr=3e-3, eval_interval=50, preset="bench")
    big = work / "big"
    if not (big / "model.gguf").exists():
        train([corpus], big, TrainConfig(n_layer=2, **shape))
    small = work / "small"
    if not (small / "model.gguf").exists():
        train([corpus], small, TrainConfig(n_layer=1, **shape), tokenizer=big / "hf")
    res = sweep([big / "model.gguf", small / "model.gguf"], args.types.split(","), text, ctx=64,
                threads=args.threads, say=print)
    (work / "sweep.md").write_text(res.markdown() + "\n")
    res.plot(work / "sweep.png")
    (work / "sweep.json").write_text(json.dumps(res.to_dict(), indent=2) + "\n")
    print(res.markdown())
    print(f"wrote {work / 'sweep.md'}, {work / 'sweep.png'}, {work / 'sweep.json'}")


if __name__ == "__main__":
    main()
