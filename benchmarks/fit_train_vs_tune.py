"""`llmdesk fit --train` against the peak memory of real `llmdesk tune` runs on this machine.

    .venv/bin/python benchmarks/fit_train_vs_tune.py [--models DIR] [--json OUT.json] [--quick]

For each point of a grid (model x method x LoRA rank x sequence length x batch), runs the real
`tune` (llmdesk.train.tune, the path `llmdesk tune` takes) in a fresh Python process for a few
optimizer steps on rows exactly --seq-len tokens long, reads that process's peak RSS
(`VmHWM`: everything, the interpreter and torch included; nothing is subtracted) and
compares it with `fit.training.estimate_training` for the same model and settings, which
estimates the same thing (the whole process's peak on this CPU, in fp32 as tune trains here).

The models are random-weight Hugging Face folders with real widths and vocabularies, saved in
bf16 as published checkpoints are (cached in --models): SmolLM2-135M's shape at 4 of its 30
layers (43M parameters, a 49,152-token vocabulary) and Qwen2.5-0.5B's shape at 2 of its 24 layers
(166M parameters, 151,936 tokens: the logits dominate). Their tokenizer is a small byte-level
BPE; the embedding and output layers keep the real vocabulary.

QLoRA is not in the grid: it needs bitsandbytes and a CUDA GPU, and tune refuses it on a CPU.
Memory, not time: the numbers do not depend on how busy the cores are (the runs are slow on a
shared machine; a few minutes per point there).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# (name, fit preset, layers kept)
MODELS = {"smollm2-135m-L4": ("smollm2-135m", 4), "qwen2.5-0.5b-L2": ("qwen2.5-0.5b", 2),
          "smollm2-135m": ("smollm2-135m", 30)}
WORDS = ("the quick brown fox jumps over a lazy dog while the model learns memory tokens layers and "
         "weights from rows of text").split()


@dataclass
class Point:
    model: str
    method: str  # lora | full
    seq_len: int
    batch: int = 1
    rank: int = 16
    steps: int = 3


GRID = [
    Point("smollm2-135m-L4", "lora", 128, rank=8),
    Point("smollm2-135m-L4", "lora", 512, rank=8),
    Point("smollm2-135m-L4", "lora", 1024, rank=8),
    Point("smollm2-135m-L4", "lora", 512, batch=2, rank=8),
    Point("smollm2-135m-L4", "lora", 512, rank=64),
    Point("smollm2-135m-L4", "full", 128),
    Point("smollm2-135m-L4", "full", 512),
    Point("smollm2-135m-L4", "full", 1024, batch=2),
    Point("qwen2.5-0.5b-L2", "lora", 128, rank=64),
    Point("qwen2.5-0.5b-L2", "lora", 512, rank=8),
    Point("qwen2.5-0.5b-L2", "full", 128),
    Point("smollm2-135m", "lora", 256, batch=2, rank=16, steps=2),
]
QUICK = [Point("smollm2-135m-L4", "lora", 128, rank=8, steps=2), Point("smollm2-135m-L4", "lora", 512, rank=8, steps=2)]


def build_model(name: str, folder: Path) -> Path:
    """A random-weight HF folder with `name`'s shape (bf16 weights, a small BPE tokenizer) and a
    data file of long plain-text rows (tune cuts them to --seq-len with --truncate)."""
    out = folder / name
    if (out / "config.json").is_file():
        return out
    import torch
    import transformers

    from llmdesk.fit.presets import get_preset
    from llmdesk.train.tokenizer import save_hf_tokenizer, train_bpe

    preset, layers = MODELS[name]
    s = get_preset(preset)
    rng = random.Random(0)
    tok = train_bpe([" ".join(rng.choice(WORDS) for _ in range(50)) for _ in range(200)], 400)
    eos = tok.token_to_id("<|endoftext|>")
    qwen = s.arch == "qwen2"
    cfg = (transformers.Qwen2Config if qwen else transformers.LlamaConfig)(
        vocab_size=s.n_vocab, hidden_size=s.n_embd, intermediate_size=s.n_ff, num_hidden_layers=layers,
        num_attention_heads=s.n_head, num_key_value_heads=s.n_head_kv, max_position_embeddings=8192,
        tie_word_embeddings=s.tied_embeddings, bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(0)
    model = (transformers.Qwen2ForCausalLM if qwen else transformers.LlamaForCausalLM)(cfg).to(torch.bfloat16)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".{name}."))
    model.save_pretrained(tmp)
    save_hf_tokenizer(tok, tmp)
    rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(3000))} for _ in range(64)]
    (tmp / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, out)
    return out


def child(spec: dict) -> None:
    """One tune run in this (fresh) process; prints its peak RSS, and the peak so far at each of
    tune's events (to tell which phase reached it)."""

    def peak() -> int:
        # VmHWM: this process image's high-water mark. Not ru_maxrss, which Linux carries over
        # fork and exec from the parent (this script's parent holds torch and a model).
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    from llmdesk.train.tune import TuneConfig, tune

    marks: list[tuple[str, int]] = [("imports", peak())]

    def on_event(kind: str, data: dict) -> None:
        marks.append((f"{kind}:{data.get('text') or data.get('step') or ''}", peak()))

    cfg = TuneConfig(method=spec["method"], rank=spec["rank"], seq_len=spec["seq_len"], batch=spec["batch"],
                     steps=spec["steps"], truncate=True, val_split=0.0, train_on="all")
    r = tune(spec["base"], [spec["data"]], spec["out"], cfg, on_event=on_event)
    marks.append(("end", peak()))
    print(json.dumps({"peak_rss_bytes": peak(), "trainable_params": r.trainable_params,
                      "total_params": r.total_params, "marks": marks}))


def measure(point: Point, base: Path, home: Path) -> dict:
    spec = {**asdict(point), "base": str(base), "data": str(base / "data.jsonl"),
            "out": tempfile.mkdtemp(dir=home, prefix="tune-")}
    env = {**os.environ, "LLMDESK_HOME": str(home), "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                       env=env)
    if r.returncode != 0:
        raise SystemExit(f"tune failed for {point}:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def estimate(point: Point, base: Path):
    from llmdesk.fit.presets import resolve_shape
    from llmdesk.fit.training import estimate_training

    return estimate_training(resolve_shape(str(base)).shape, point.method, seq_len=point.seq_len,
                             batch=point.batch, lora_rank=point.rank)


def markdown(rows: list[dict]) -> str:
    MiB = 1 << 20
    out = ["| model | method | rank | seq | batch | measured peak RSS (MiB) | estimate (MiB) | error | estimated peak at |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        p = r["point"]
        out.append(f"| {p['model']} | {p['method']} | {p['rank'] if p['method'] != 'full' else '-'} | {p['seq_len']} | "
                   f"{p['batch']} | {r['measured_bytes'] / MiB:,.0f} | {r['estimated_bytes'] / MiB:,.0f} | "
                   f"{100 * r['error']:+.1f}% | {r['peak_at']} |")
    s = summary(rows)
    out += ["", f"{s['n']} configurations: median absolute error {100 * s['median_abs_error']:.1f}%, "
                f"worst {100 * s['max_abs_error']:.1f}%."]
    return "\n".join(out)


def summary(rows: list[dict]) -> dict:
    errs = [abs(r["error"]) for r in rows]
    return {"n": len(rows), "median_abs_error": statistics.median(errs), "max_abs_error": max(errs)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=Path, default=Path.home() / ".cache" / "llmdesk-bench-models")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    ap.add_argument("--quick", action="store_true", help="two small points only")
    ap.add_argument("--again", action="store_true",
                    help="measure again (measured peaks are kept in DIR/tune-peaks.json, the estimates are always new)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(json.loads(a.child))
        return 0
    a.models.mkdir(parents=True, exist_ok=True)
    cache_file = a.models / "tune-peaks.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() and not a.again else {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="fit-train-") as home:
        for point in QUICK if a.quick else GRID:
            t0 = time.perf_counter()
            base = build_model(point.model, a.models)
            key = json.dumps(asdict(point), sort_keys=True)
            if key not in cache:
                cache[key] = measure(point, base, Path(home))
                cache_file.write_text(json.dumps(cache, indent=1))
            m = cache[key]
            e = estimate(point, base)
            err = (e.total_bytes - m["peak_rss_bytes"]) / m["peak_rss_bytes"]
            rows.append({"point": asdict(point), "measured_bytes": m["peak_rss_bytes"], "estimated_bytes": e.total_bytes,
                         "error": err, "peak_at": e.peak_at, "measured": m, "estimate": e.to_dict()})
            print(f"{point}: measured {m['peak_rss_bytes'] / 2**20:,.0f} MiB, estimated {e.total_bytes / 2**20:,.0f} "
                  f"MiB ({100 * err:+.1f}%) [{time.perf_counter() - t0:.0f} s] marks "
                  + " ".join(f"{k}={v / 2**20:.0f}" for k, v in m["marks"]), file=sys.stderr, flush=True)
    print(markdown(rows))
    if a.json:
        a.json.write_text(json.dumps({"summary": summary(rows), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
