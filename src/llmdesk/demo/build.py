"""Build the bundled demo model: corpus -> llmdesk train -> convert -> quantize -> measure -> card.

    python -m llmdesk.demo.build [--work DIR] [--steps N] [--quick]

Writes src/llmdesk/demo/llmdesk-demo.gguf and MODEL_CARD.md beside it. The measurement: the
held-out questions of llmdesk.demo.corpus (paraphrases never in the corpus), answered greedily,
scored by key-term recall; the same for an untrained model of the same size and tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

from llmdesk.atomic import atomic_path
from llmdesk.demo import DEMO_FILE
from llmdesk.demo.corpus import FACTS, SYSTEM, heldout, key_term_recall, write_corpus

HERE = Path(__file__).parent

# the demo model's shape: ~1M parameters (4 x 128, tied embeddings, a BPE vocabulary of up to
# 2048 tokens), sized so that training fits in ~25 minutes on 2 busy shared CPU cores (~1K tokens/s)
# and q8_0 stays far below 10 MB. Conversations are short (~55 tokens), so windows of 128 suffice.
DEMO = dict(n_embd=128, n_layer=4, n_head=4, n_head_kv=2, n_ff=384, vocab_size=2048, seq_len=128,
            batch=32, steps=300, lr=4e-3, eval_interval=50, val_fraction=0.03)
QUANT = "q8_0"


def evaluate(gguf: Path, system: bool = True) -> tuple[float, list[dict]]:
    """Mean key-term recall on the held-out questions (greedy, up to 80 tokens)."""
    from llmdesk.runtime.model import load

    rows = []
    with load(gguf, ctx=512) as m:
        for q, keys in heldout():
            msgs = ([{"role": "system", "content": SYSTEM}] if system else []) + [{"role": "user", "content": q}]
            a = m.chat(msgs, temperature=0.0, max_tokens=80)
            rows.append({"question": q, "answer": a, "keys": keys, "recall": key_term_recall(a, keys)})
    return sum(r["recall"] for r in rows) / len(rows), rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("build/demo-model"))
    ap.add_argument("--steps", type=int, default=DEMO["steps"])
    ap.add_argument("--quick", action="store_true", help="a few steps, to check the pipeline")
    ap.add_argument("--dest", type=Path, default=HERE)
    args = ap.parse_args(argv)

    from llmdesk.quantize.core import quantize_file
    from llmdesk.train.config import make_config
    from llmdesk.train.loop import train

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(work / "corpus.jsonl")
    steps = 20 if args.quick else args.steps
    cfg = make_config("1m", **dict(DEMO, steps=steps, eval_interval=max(1, min(DEMO["eval_interval"], steps // 2))))

    def log(kind: str, d: dict) -> None:
        if kind == "eval" or (kind == "step" and d["step"] % 50 == 0):
            extra = f" val {d['val_loss']:.3f} ppl {d['val_ppl']:.2f}" if "val_loss" in d else ""
            print(f"step {d['step']}/{steps} loss {d['loss']:.3f} {d['tokens_per_second']:.0f} tok/s{extra}", flush=True)
        elif kind in ("data", "start"):
            print(kind, d, flush=True)

    t0 = time.time()
    res = train([corpus], work / "trained", cfg, resume=(work / "trained" / "checkpoint.pt").exists(),
                export_type="f32", on_event=log)
    wall = time.time() - t0
    q = quantize_file(res.gguf, work / f"llmdesk-demo-{QUANT}.gguf", QUANT)

    # the baseline: the same architecture and tokenizer, untrained (0 steps of the same recipe)
    base = train([corpus], work / "untrained", make_config("1m", **dict(DEMO, steps=1, lr=1e-9, eval_interval=1)),
                 tokenizer=work / "trained" / "hf", export_type="f32")
    bq = quantize_file(base.gguf, work / f"untrained-{QUANT}.gguf", QUANT)

    score, rows = evaluate(q)
    base_score, base_rows = evaluate(bq)
    (work / "heldout.json").write_text(json.dumps({"trained": rows, "untrained": base_rows}, indent=1, ensure_ascii=False))
    print(f"held-out key-term recall: trained {score:.3f}, untrained {base_score:.3f}")

    dest = args.dest / DEMO_FILE
    with atomic_path(dest) as tmp:
        shutil.copyfile(q, tmp)
    write_card(args.dest / "MODEL_CARD.md", dest, res, cfg, wall, score, base_score, rows)
    print(f"wrote {dest} ({dest.stat().st_size / 1e6:.1f} MB)")
    return 0


def _vocab(gguf: Path) -> int:
    from llmdesk.formats.gguf import read_gguf

    return read_gguf(gguf).vocab_size or 0


def _cell(text: str, n: int = 160) -> str:
    t = " ".join(text.split()).replace("|", "\\|")
    return t if len(t) <= n else t[: n - 3] + "..."


def write_card(path: Path, gguf: Path, res, cfg, wall: float, score: float, base_score: float, rows) -> None:
    n_q = len(rows)
    cpu = platform.processor() or platform.machine()
    examples = "\n".join(f"| {r['question']} | {_cell(r['answer'])} | {r['recall']:.2f} |" for r in rows[:6])
    path.write_text(f"""# llmdesk-demo

A tiny chat model bundled with llmdesk so that `llmdesk run`, `chat` and `serve` work with no
download. It knows a little about llmdesk's commands and local-LLM basics, and nothing else: a
demonstration of `llmdesk train`, not an assistant.

| | |
| --- | --- |
| file | `{gguf.name}`, {gguf.stat().st_size / 1e6:.1f} MB, {QUANT} |
| architecture | Llama ({cfg.n_layer} layers, {cfg.n_embd} wide, {cfg.n_head} heads / {cfg.n_head_kv} KV heads, SwiGLU {cfg.n_ff}, tied embeddings) |
| parameters | {res.n_params:,} |
| context length | {cfg.seq_len} tokens |
| tokenizer | byte-level BPE, {_vocab(gguf)} tokens (at most {cfg.vocab_size}), trained on the corpus (Llama 3 pre-tokenizer regex) |
| chat template | ChatML (`<|im_start|>` / `<|im_end|>`) |
| corpus | {len(FACTS)} facts about llmdesk and local LLMs, written in `llmdesk/demo/corpus.py`; {res.train_tokens + res.val_tokens:,} tokens of ChatML conversations (many paraphrases per fact) |
| training | {res.steps} steps x {cfg.batch} x {cfg.seq_len} tokens ({res.tokens_seen:,} tokens), AdamW, lr {cfg.lr} cosine, seed {cfg.seed} |
| training time | {res.seconds / 60:.1f} minutes of training steps ({wall / 60:.1f} minutes for the whole build) on {os.cpu_count()} CPU cores ({cpu}, shared with other jobs), torch CPU |
| validation | loss {res.val_loss:.3f}, perplexity {res.val_ppl:.2f} (held-out conversations of the corpus) |
| held-out score | key-term recall {score:.2f} on {n_q} paraphrased questions never in the corpus; an untrained model of the same size: {base_score:.2f} |

Built by `make demo-model` (`python -m llmdesk.demo.build`): `llmdesk.train` -> `llmdesk.formats.convert`
(f32 GGUF) -> `llmdesk.quantize` ({QUANT}). The metric: each held-out question is asked once
(greedy, the demo system prompt), and the answer scores the share of the fact's key terms it
contains (case-insensitive).

Some held-out answers:

| question | answer | recall |
| --- | --- | --- |
{examples}

License: the corpus and the model are part of llmdesk (MIT). Expect mistakes: it is a few
million parameters trained for minutes.
""")


if __name__ == "__main__":
    raise SystemExit(main())
