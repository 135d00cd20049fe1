"""Does DPO on grader-ranked pairs make a model win against its base? Measured on this machine.

A small Llama (random weights, real architecture, a BPE tokenizer with the ChatML template) is
taught a task a little with `llmdesk tune` (60 steps of SFT on all weights): asked for "the last
word in capitals between brackets" of three words ("... stone tiger apple" -> "[APPLE]"), it is
right about a quarter of the time, greedy. Then, as a user would, with the CLI on the exported GGUF:

    llmdesk synth answers prompts.jsonl -m proof-sft:f32 -k K --rank python:grader.py:correct --pairs pairs.jsonl
    llmdesk tune SFT/merged pairs.jsonl --method dpo --gguf f32 --name proof-dpo
    llmdesk arena auto proof-sft:f32 proof-dpo:f32 --judge grader:python:grader.py:correct --questions heldout.jsonl
    llmdesk arena leaderboard --source auto --anchor proof-sft:f32 --json

The held-out questions are word triples that neither the SFT rows nor the DPO prompts hold. The
tuned model's win rate against the base (a tie half a win each way, as the arena counts it) is
reported with the arena's 95% bootstrap interval, turned from ratings into win probabilities.
`--control` also tunes on the chosen answers alone (plain SFT, `llmdesk tune`) and lets that model
battle too: what the rejected answers add. docs/rewards.md has the figures.

    .venv/bin/python benchmarks/dpo_proof.py [--work DIR] [--sft-weight 1] [--control]
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

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "ocean",
         "grass", "honey", "maple", "robin", "sugar", "tulip", "wagon", "zebra"]
ASK = "Reply with the last word in capitals between brackets: "
VOCAB = 600  # enough merges for each word and its capitals to be a token or two
GRADER = '''def correct(prompts, completions, answer, **kw):
    """1 when the completion begins with the reference (the last word in capitals between brackets)."""
    def text(c):
        return c if isinstance(c, str) else c[-1]["content"]
    return [1.0 if text(c).strip().startswith(a) else 0.0 for c, a in zip(completions, answer)]
'''


def build_base(folder: Path) -> Path:
    from llmdesk.train.tokenizer import tiny_chat_llama

    text = [f"{ASK}{w} {w} {w}. [{w.upper()}] " for w in WORDS] * 20 + ["The quick brown fox jumps over the lazy dog."] * 10
    return tiny_chat_llama(folder, text, vocab_size=VOCAB)


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def triples(rng: random.Random, n: int, avoid: set) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    while len(out) < n:
        t = tuple(rng.choice(WORDS) for _ in range(3))
        if t not in avoid:
            avoid.add(t)
            out.append(t)
    return out


def cli(*args: str) -> str:
    exe = str(Path(sys.executable).with_name("llmdesk"))
    print("$ llmdesk " + " ".join(args), flush=True)
    r = subprocess.run([exe, *args], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"llmdesk {args[0]} failed:\n{r.stderr}")
    return r.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sft-steps", type=int, default=60)
    ap.add_argument("--sft-lr", type=float, default=3e-3)
    ap.add_argument("--sft-rows", type=int, default=400)
    ap.add_argument("--prompts", type=int, default=128, help="DPO prompts (each answered -k times)")
    ap.add_argument("-k", type=int, default=8, help="candidates per prompt")
    ap.add_argument("--temperature", type=float, default=0.7, help="the candidates' sampling temperature")
    ap.add_argument("--dpo-steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--sft-weight", type=float, default=1.0,
                    help="the chosen answers' own loss beside DPO's (RPO); 0: plain DPO, which lowered the chosen "
                         "answers with the rejected ones here and did not win")
    ap.add_argument("--held-out", type=int, default=300, help="arena questions (triples never trained on)")
    ap.add_argument("--control", action="store_true",
                    help="also SFT on the chosen answers alone (tune --method lora, the same steps) and let it battle too")
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args()

    from llmdesk.runtime.llama import LlamaModel
    from llmdesk.train.tune import TuneConfig, tune

    work = a.work or Path(tempfile.mkdtemp(prefix="dpo-proof-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["LLMDESK_HOME"] = str(work / "home")
    rng, seen = random.Random(0), set()
    base = work / "base" if (work / "base" / "config.json").is_file() else build_base(work / "base")
    sft_rows = [{"messages": [{"role": "user", "content": ASK + " ".join(t)},
                              {"role": "assistant", "content": f"[{t[-1].upper()}]"}]}
                for t in triples(rng, a.sft_rows, seen)]
    prompts = [{"prompt": ASK + " ".join(t), "answer": f"[{t[-1].upper()}]"} for t in triples(rng, a.prompts, seen)]
    held = [{"id": i, "question": ASK + " ".join(t), "answer": f"[{t[-1].upper()}]"}
            for i, t in enumerate(triples(rng, a.held_out, seen))]
    jsonl(work / "prompts.jsonl", prompts)
    jsonl(work / "heldout.jsonl", held)
    (work / "grader.py").write_text(GRADER)
    grader = f"python:{work / 'grader.py'}:correct"

    # each stage is skipped when its output is there: a run cut short continues with the same --work
    t0 = time.perf_counter()
    if not (work / "sft" / "merged").is_dir():
        tune(base, [jsonl(work / "sft.jsonl", sft_rows)], work / "sft",
             TuneConfig(method="full", steps=a.sft_steps, lr=a.sft_lr, batch=8, val_split=0.0),
             gguf="f32", name="proof-sft", check_with=LlamaModel)
    t_sft = time.perf_counter() - t0
    t0 = time.perf_counter()
    if not (work / "pairs.jsonl").is_file():
        print(cli("synth", "answers", str(work / "prompts.jsonl"), "-o", str(work / "answers.jsonl"), "-m",
                  "proof-sft:f32", "-k", str(a.k), "-t", str(a.temperature), "--max-tokens", "8", "--rank", grader,
                  "--pairs", str(work / "pairs.jsonl")), end="")
    t_synth = time.perf_counter() - t0
    cands = [json.loads(x) for x in (work / "answers.jsonl").read_text().splitlines()]
    right = sum(c.strip().startswith(p["answer"]) for r, p in zip(cands, prompts) for c in r["candidates"])
    pairs = [json.loads(x) for x in (work / "pairs.jsonl").read_text().splitlines()]
    t0 = time.perf_counter()
    if not (work / "dpo" / "model-f32.gguf").is_file():
        print(cli("tune", str(work / "sft" / "merged"), str(work / "pairs.jsonl"), "-o", str(work / "dpo"), "--method",
                  "dpo", "--steps", str(a.dpo_steps), "--batch", "8", "--lr", str(a.lr), "--beta", str(a.beta),
                  "--sft-weight", str(a.sft_weight), "--rank", "8", "--gguf", "f32", "--name", "proof-dpo"), end="")
    t_dpo = time.perf_counter() - t0
    models = ["proof-sft:f32", "proof-dpo:f32"]
    if a.control:  # the chosen answers alone, as SFT rows: what the preference adds beyond them
        rows = [{"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["chosen"]}]}
                for p in pairs]
        if not (work / "chosen" / "model-f32.gguf").is_file():
            print(cli("tune", str(work / "sft" / "merged"), str(jsonl(work / "chosen.jsonl", rows)), "-o",
                      str(work / "chosen"), "--steps", str(a.dpo_steps), "--batch", "8", "--lr", str(a.lr), "--rank", "8",
                      "--dropout", "0", "--val-split", "0", "--gguf", "f32", "--name", "proof-chosen"), end="")
        models.append("proof-chosen:f32")
    hist = json.loads((work / "dpo" / "metrics.json").read_text())["history"]
    print(cli("arena", "auto", *models, "--judge", f"grader:{grader}", "--questions", str(work / "heldout.jsonl"),
              "--max-tokens", "8"), end="")
    board = json.loads(cli("arena", "leaderboard", "--source", "auto", "--anchor", "proof-sft:f32", "--json"))

    def p_win(rating: float) -> float:  # the arena's Bradley-Terry, against the base at 1000
        return 1 / (1 + 10 ** ((1000 - rating) / 400))

    votes = _votes(work)
    print(f"\nwork folder: {work}")
    took = lambda t: f"in {t:.0f} s" if t > 1 else "(done before)"  # noqa: E731
    print(f"SFT: {a.sft_steps} steps {took(t_sft)}; synth answers: {len(prompts)} prompts x {a.k} {took(t_synth)} "
          f"({right / (len(prompts) * a.k):.3f} of the candidates right, {len(pairs)} pairs); "
          f"DPO: {a.dpo_steps} steps {took(t_dpo)}")
    for h in (hist[0], hist[len(hist) // 2], hist[-1]):
        print(f"  DPO step {h['step']}: loss {h['loss']:.4f} · reward margin {h.get('rewards/margins', float('nan')):.3f} · "
              f"log p chosen {h.get('logps/chosen', float('nan')):.2f} · rejected {h.get('logps/rejected', float('nan')):.2f}")
    answers = {(v["prompt"], v[f"model_{s}"]): v[f"answer_{s}"] for v in votes for s in "ab"}
    print(f"held out ({len(held)} questions, greedy in llama.cpp), right: " + ", ".join(
        f"{m} {sum(ans.strip().startswith(_answer(q)) for (q, mm), ans in answers.items() if mm == m)}" for m in models))
    for m, other in [(m, "proof-sft:f32") for m in models[1:]] + [tuple(models[:0:-1])] * a.control:
        vs = [v for v in votes if {v["model_a"], v["model_b"]} == {m, other}]
        won = [v[f"model_{v['winner']}"] for v in vs if v["winner"] in ("a", "b")]
        w, l = won.count(m), won.count(other)
        t = len(vs) - w - l
        r = next(x for x in board["models"] if x["model"] == m)
        ci = (f", 95% CI {p_win(r['low']):.3f} to {p_win(r['high']):.3f}" if other == "proof-sft:f32" else "")
        print(f"arena auto, {m} against {other} (judge: the grader): W/T/L {w}/{t}/{l}; win rate "
              f"{(w + t / 2) / len(vs):.3f} (ties half){ci}; of decided battles {w / max(1, w + l):.3f}"
              + (f"; rating {r['rating']:.0f} ({r['low']:.0f} to {r['high']:.0f})" if ci else ""))
    return 0


def _votes(work: Path) -> list[dict]:
    from llmdesk.eval.arena import votes

    return votes(source="auto")


def _answer(prompt: str) -> str:
    return f"[{prompt.rsplit(' ', 1)[-1].upper()}]"


if __name__ == "__main__":
    sys.exit(main())
