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

    .venv/bin/python benchmarks/dpo_proof.py [--sft-steps 30] [--dpo-steps 40] [--held-out 300]
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
    import torch
    import transformers

    from llmdesk.train.tokenizer import save_hf_tokenizer, train_bpe

    text = [f"{ASK}{w} {w} {w}. [{w.upper()}] " for w in WORDS] * 20 + ["The quick brown fox jumps over the lazy dog."] * 10
    tok = train_bpe(text, VOCAB)
    eos = tok.token_to_id("<|endoftext|>")
    cfg = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=False, initializer_range=0.1)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    save_hf_tokenizer(tok, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "bos_token_id": eos}))
    return folder


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
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args()

    from llmdesk.runtime.llama import LlamaModel
    from llmdesk.train.tune import TuneConfig, tune

    work = a.work or Path(tempfile.mkdtemp(prefix="dpo-proof-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["LLMDESK_HOME"] = str(work / "home")
    rng, seen = random.Random(0), set()
    base = build_base(work / "base")
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

    t0 = time.perf_counter()
    sft = tune(base, [jsonl(work / "sft.jsonl", sft_rows)], work / "sft",
               TuneConfig(method="full", steps=a.sft_steps, lr=a.sft_lr, batch=8, val_split=0.0),
               gguf="f32", name="proof-sft", check_with=LlamaModel)
    t_sft = time.perf_counter() - t0
    t0 = time.perf_counter()
    said = cli("synth", "answers", str(work / "prompts.jsonl"), "-o", str(work / "answers.jsonl"), "-m", "proof-sft:f32",
               "-k", str(a.k), "-t", str(a.temperature), "--max-tokens", "8", "--rank", grader,
               "--pairs", str(work / "pairs.jsonl"))
    print(said, end="")
    t_synth = time.perf_counter() - t0
    cands = [json.loads(x) for x in (work / "answers.jsonl").read_text().splitlines()]
    right = sum(c.strip().startswith(p["answer"]) for r, p in zip(cands, prompts) for c in r["candidates"])
    t0 = time.perf_counter()
    said = cli("tune", str(sft.merged), str(work / "pairs.jsonl"), "-o", str(work / "dpo"), "--method", "dpo",
               "--steps", str(a.dpo_steps), "--batch", "8", "--lr", str(a.lr), "--beta", str(a.beta),
               "--sft-weight", str(a.sft_weight), "--rank", "8", "--gguf", "f32", "--name", "proof-dpo")
    print(said, end="")
    t_dpo = time.perf_counter() - t0
    hist = json.loads((work / "dpo" / "metrics.json").read_text())["history"]
    said = cli("arena", "auto", "proof-sft:f32", "proof-dpo:f32", "--judge", f"grader:{grader}",
               "--questions", str(work / "heldout.jsonl"), "--max-tokens", "8")
    print(said, end="")
    board = json.loads(cli("arena", "leaderboard", "--source", "auto", "--anchor", "proof-sft:f32", "--json"))
    tuned = next(m for m in board["models"] if m["model"] == "proof-dpo:f32")

    def p_win(rating: float) -> float:  # the arena's Bradley-Terry, against the base at 1000
        return 1 / (1 + 10 ** ((1000 - rating) / 400))

    votes = [v for v in _votes(work)]
    right_held = {m: sum(1 for v in votes for side in "ab" if v[f"model_{side}"] == m
                         and v[f"answer_{side}"].strip().startswith(_answer(v["prompt"]))) for m in ("proof-sft:f32", "proof-dpo:f32")}
    print(f"\nwork folder: {work}")
    print(f"SFT: {a.sft_steps} steps in {t_sft:.0f} s; synth answers: {len(prompts)} prompts x {a.k} in {t_synth:.0f} s "
          f"({right / (len(prompts) * a.k):.3f} of the candidates right); DPO: {a.dpo_steps} steps in {t_dpo:.0f} s")
    for h in (hist[0], hist[len(hist) // 2], hist[-1]):
        print(f"  DPO step {h['step']}: loss {h['loss']:.4f} · reward margin {h.get('rewards/margins', float('nan')):.3f} · "
              f"log p chosen {h.get('logps/chosen', float('nan')):.2f} · rejected {h.get('logps/rejected', float('nan')):.2f}")
    n = len(votes)
    print(f"held out ({n} questions, greedy in llama.cpp): right {right_held['proof-sft:f32']} base, "
          f"{right_held['proof-dpo:f32']} tuned")
    w, t, l = tuned["wins"], tuned["ties"], tuned["losses"]
    print(f"arena auto (judge: the grader): tuned W/T/L {w}/{t}/{l}; win rate {(w + t / 2) / n:.3f} "
          f"(ties half), 95% CI {p_win(tuned['low']):.3f} to {p_win(tuned['high']):.3f}; "
          f"of decided battles {w / max(1, w + l):.3f}")
    print(f"rating {tuned['rating']:.0f} (base 1000), 95% CI {tuned['low']:.0f} to {tuned['high']:.0f}")
    return 0


def _votes(work: Path) -> list[dict]:
    from llmdesk.eval.arena import votes

    return votes(source="auto")


def _answer(prompt: str) -> str:
    return f"[{prompt.rsplit(' ', 1)[-1].upper()}]"


if __name__ == "__main__":
    sys.exit(main())
