"""Does GRPO make a model better at a checkable behaviour? Measured on this machine, end to end.

A small Llama (random weights, real architecture, a BPE tokenizer with the ChatML template) is
taught a task a little with `llmdesk tune` (SFT, a few steps: it gets the format right about half
the time), then sharpened with GRPO (`train.rewards.run`) against a grader that checks the answer
starts with the reference ("[APPLE]" for "apple"). Both models are exported to GGUF and registered
in the store, then measured the way a user would: `llmdesk eval run --chat` on a task file whose
items the training never saw, greedy decoding in llama.cpp, and `llmdesk eval compare` for the
paired difference and its standard error.

    .venv/bin/python benchmarks/grpo_proof.py [--sft-steps 30] [--grpo-steps 24] [--items 64]

Prints the held-out reward that GRPO measured before and after (in transformers, sampling at the
training temperature) and the two models' exact match on the eval task (llama.cpp, greedy).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "ocean"]
ASK = "Reply with the word in capitals between brackets: "
GRADER = '''def starts_with_answer(prompts, completions, answer, **kw):
    """1 when the completion begins with the reference (the word in capitals between brackets)."""
    def text(c):
        return c if isinstance(c, str) else c[-1]["content"]
    return [1.0 if text(c).strip().startswith(a) else 0.0 for c, a in zip(completions, answer)]
'''
TASK = """name: brackets
kind: generate
data:
  files: {test: brackets.jsonl}
  columns: [word, answer]
text: "Reply with the word in capitals between brackets: {{word}}"
target: "{{answer}}"
until: ["\\n", "<|im_end|>", "<|endoftext|>"]
max_tokens: 8
answer:
  extract: {strict: {regex: "^\\\\s*(\\\\[[A-Z]+\\\\])"}}
metrics: [exact_match]
"""


def build_base(folder: Path) -> Path:
    from llmdesk.train.tokenizer import tiny_chat_llama

    text = [f"{ASK}{w}. [{w.upper()}] " for w in WORDS] * 20 + ["The quick brown fox jumps over the lazy dog."] * 10
    return tiny_chat_llama(folder, text, vocab_size=320)


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sft-steps", type=int, default=30)
    ap.add_argument("--grpo-steps", type=int, default=48)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--temperature", type=float, default=0.3, help="GRPO's sampling temperature")
    ap.add_argument("--format-weight", type=float, default=0.0,
                    help="weight of a format-only grader beside the answer grader (a format reward alone is "
                         "gamed: the model learns to write any capitalised word in brackets)")
    ap.add_argument("--items", type=int, default=64, help="eval items (words drawn with another seed)")
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args()

    from llmdesk.eval.graders import parse_graders
    from llmdesk.quantize.workflow import quantize_model  # noqa: F401  (the f32 export needs no quantizer)
    from llmdesk.runtime.llama import LlamaModel
    from llmdesk.train.rewards import RewardConfig, run
    from llmdesk.train.tune import TuneConfig, tune

    work = a.work or Path(tempfile.mkdtemp(prefix="grpo-proof-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("LLMDESK_HOME", str(work / "home"))
    rng = random.Random(0)
    base = build_base(work / "base")
    sft_rows = [{"messages": [{"role": "user", "content": ASK + w}, {"role": "assistant", "content": f"[{w.upper()}]"}]}
                for w in (rng.choice(WORDS) for _ in range(200))]
    prompts = [{"prompt": ASK + w, "answer": f"[{w.upper()}]"} for w in (rng.choice(WORDS) for _ in range(64))]
    erng = random.Random(12345)
    eval_rows = [{"word": w, "answer": f"[{w.upper()}]"} for w in (erng.choice(WORDS) for _ in range(a.items))]
    jsonl(work / "brackets.jsonl", eval_rows)
    (work / "brackets.yaml").write_text(TASK)
    (work / "grader.py").write_text(GRADER)

    t0 = time.perf_counter()
    sft = tune(base, [jsonl(work / "sft.jsonl", sft_rows)], work / "sft",
               TuneConfig(steps=a.sft_steps, lr=1e-2, rank=8, batch=8, dropout=0.0, val_split=0.0),
               gguf="f32", name="proof-sft", check_with=LlamaModel)
    t_sft = time.perf_counter() - t0
    specs, w = [f"python:{work / 'grader.py'}:starts_with_answer"], [1.0]
    if a.format_weight:  # the format (a capitalised word between brackets, first)
        specs, w = specs + [r"regex:^\s*\[[A-Z]+\]"], w + [a.format_weight]
    graders, weights = parse_graders(specs, w)
    t0 = time.perf_counter()
    g = run("grpo", sft.merged, jsonl(work / "prompts.jsonl", prompts), work / "grpo",
            RewardConfig(method="grpo", steps=a.grpo_steps, batch=16, num_generations=8, max_completion_tokens=8,
                         lr=a.lr, temperature=a.temperature, val_split=0.25),
            graders=graders, weights=weights, gguf="f32", name="proof-grpo", check_with=LlamaModel,
            on_event=lambda k, d: print(f"  grpo step {d['step']}: reward {d.get('reward', float('nan')):.3f}",
                                        flush=True) if k == "step" and "reward" in d else None)
    t_grpo = time.perf_counter() - t0
    exe = str(Path(sys.executable).with_name("llmdesk"))
    r = subprocess.run([exe, "eval", "run", "proof-sft:f32", "proof-grpo:f32", "--task", str(work / "brackets.yaml"),
                        "--chat", "--json"], capture_output=True, text=True)
    if r.returncode:
        print(r.stderr, file=sys.stderr)
        return 1
    res = {x["model"]: x["metrics"]["exact_match"] for x in json.loads(r.stdout)}
    cmp = subprocess.run([exe, "eval", "compare", "proof-sft:f32", "proof-grpo:f32", "--task", str(work / "brackets.yaml")],
                         capture_output=True, text=True)
    print(f"\nwork folder: {work}")
    print(f"SFT: {a.sft_steps} steps in {t_sft:.0f} s; GRPO: {a.grpo_steps} steps in {t_grpo:.0f} s")
    print(f"held-out reward (transformers, sampled at {a.temperature}, {g.val_rows} prompts x 8): "
          f"{g.reward_before:.3f} before GRPO -> {g.reward_after:.3f} after")
    for name, m in res.items():
        print(f"llmdesk eval run --chat (llama.cpp, greedy, {a.items} items): {name} exact_match "
              f"{m['value']:.3f} +- {m['stderr']:.3f}")
    print(cmp.stdout or cmp.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
