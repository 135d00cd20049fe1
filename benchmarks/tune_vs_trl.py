"""`llmdesk tune` against TRL's `SFTTrainer` + peft, same model, same data, same LoRA, one run.

    .venv/bin/python benchmarks/tune_vs_trl.py [--shape small|tinyllama] [--steps 16] [--rounds 2]
        [--batch 8] [--rows 400] [--threads 2] [--trl-no-checkpointing]

The model is a Llama with random weights written with transformers: `small` (6 layers, 512 wide,
8 heads, 4 KV heads, 1536 FFN, TinyLlama's 32,000 vocabulary; 52M parameters) or `tinyllama`
(TinyLlama-1.1B's config.json: 22 layers, 2048 wide, 32 heads, 4 KV heads, 5632 FFN). Its
tokenizer is a byte-level BPE trained on the data's words, with the ChatML template; the model's
vocabulary stays at 32,000 (the output head costs what a real one does). Everything is cached in
~/.cache/llmdesk-bench-models/tune-<shape>/.

The data are chats whose lengths vary like real chat data: a row's length is drawn log-normal
(median 180 tokens, sigma 0.9, clipped to 20..1000: a long tail of long answers; measured after
tokenizing, 400 rows: median 171, p90 594, 31 to 945), one to three turns, text from a fixed
random bigram chain over 200 words (so the loss can fall: LoRA learns the chain). 40 more rows
are held out and never trained.

Both sides get the same LoRA (rank 16, alpha 32, dropout 0.05, all linear layers), learning rate
(2e-4), sequence length (1024), batch (8 rows a step, no accumulation), steps, seed and torch
threads, and train on every token (TRL's default for chat data; llmdesk's `--train-on all`).
Otherwise each keeps its defaults: TRL's `SFTConfig()` (rows drawn at random and padded to the
longest, gradient checkpointing on, linear decay) with bf16 off (the CPU) and per-step logging;
llmdesk's `TuneConfig()` (length-grouped micro-batches, cosine decay after 5% warm-up). Neither
saves checkpoints or evaluates during the timed part. `--trl-no-checkpointing` turns TRL's
gradient checkpointing off (its fastest setting here short of packing, which changes the data).

The two alternate, in one process: round 1 llmdesk then TRL, round 2 TRL then llmdesk, and so on;
each run trains from the same base with its model loaded and data tokenized before the clock
starts. Useful tokens are the non-padding tokens through the model (llmdesk's `tokens_seen`, TRL's
`num_tokens`). Both the wall clock and this process's CPU time (all threads) are reported: on a
machine shared with other work the wall clock swings, CPU time much less. The loss curves cannot
be compared step by step (the two draw different rows each step): the script prints both
smoothed over windows of steps, and the loss of each trained adapter on the held-out rows,
computed by the same code.

Measured on this project's 2-vCPU VM, shared with other work (`--steps 3 --rounds 2`): llmdesk
4.60 CPU-ms a useful token, TRL (defaults) 15.95: 3.47x by CPU time, 2.62x by the wall clock
(53 against 20 useful tokens/s; the load swung the wall clock tenfold between rounds). Against
TRL without gradient checkpointing (`--steps 3 --rounds 2 --trl-no-checkpointing`): 3.70 against
11.59 CPU-ms, 3.13x (3.97x wall clock); in one round of 4 steps under heavier load, 2.31x. Held-out loss after 3 steps 10.379 (llmdesk) and 10.401
(TRL), from 10.49. docs/tune.md ("Speed") has the output and where the difference comes from.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

CACHE = Path.home() / ".cache" / "llmdesk-bench-models"
SHAPES = {
    # a shape that trains in minutes on a 2-core CPU, TinyLlama's vocabulary
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=4),
    # TinyLlama/TinyLlama-1.1B-Chat-v1.0's config.json
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4),
}
LORA = dict(rank=16, alpha=32.0, dropout=0.05)
LR = 2e-4
SEQ_LEN = 1024


# ---------------------------------------------------------------------------------------------
# the data


def bigram_chain(seed: int, n_words: int = 200, fanout: int = 4) -> tuple[list[str], dict[str, list[str]]]:
    rng = random.Random(seed)
    syll = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "pe", "da", "fu", "go", "hi", "ja", "zu"]
    words = sorted({"".join(rng.choice(syll) for _ in range(rng.randint(1, 3))) for _ in range(n_words * 3)})[:n_words]
    return words, {w: rng.sample(words, fanout) for w in words}


def text(rng: random.Random, chain: tuple[list[str], dict[str, list[str]]], n: int) -> str:
    words, nxt = chain
    w = rng.choice(words)
    out = [w]
    for _ in range(n - 1):
        w = rng.choice(nxt[w])
        out.append(w)
    return " ".join(out)


def make_rows(n: int, seed: int) -> list[dict]:
    """Chats of 1-3 turns; a row's token length ~ log-normal(median 180, sigma 0.9) in 20..1024.
    (Words here are ~1.1 tokens each and each message adds ~5 tokens of template; the lengths
    are measured after tokenizing, and printed.)"""
    rng = random.Random(seed)
    chain = bigram_chain(0)
    rows = []
    for _ in range(n):
        target = min(1000, max(20, int(rng.lognormvariate(math.log(180), 0.9))))
        turns = min(3, 1 + int(target > 200) + int(target > 500))
        words = max(4, int((target - 10 * turns) / 1.1))
        msgs = []
        for t in range(turns):
            share = words // turns
            q = max(2, share // 4)
            msgs += [{"role": "user", "content": text(rng, chain, q)},
                     {"role": "assistant", "content": text(rng, chain, max(2, share - q))}]
        rows.append({"messages": msgs})
    return rows


def make_base(shape: str) -> tuple[Path, Path, Path]:
    """(the HF checkpoint, the training rows, the held-out rows), written once."""
    work = CACHE / f"tune-{shape}"
    ckpt, train_file, val_file = work / "hf", work / "train.jsonl", work / "heldout.jsonl"
    if (ckpt / "config.json").is_file() and val_file.is_file():
        return ckpt, train_file, val_file
    import torch
    import transformers

    from llmdesk.train.tokenizer import save_hf_tokenizer, train_bpe

    work.mkdir(parents=True, exist_ok=True)
    rows = make_rows(440, 1)
    corpus = [m["content"] for r in make_rows(600, 99) for m in r["messages"]]
    tok = train_bpe(corpus, 600)
    eos = tok.token_to_id("<|endoftext|>")
    cfg = transformers.LlamaConfig(vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
                                   rope_theta=10000.0, bos_token_id=eos, eos_token_id=eos,
                                   tie_word_embeddings=False, **SHAPES[shape])
    torch.manual_seed(0)
    tmp = work / "hf.part"
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp)
    save_hf_tokenizer(tok, tmp)
    (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "bos_token_id": eos}))
    tmp.rename(ckpt)
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows[:400]))
    val_file.write_text("".join(json.dumps(r) + "\n" for r in rows[400:]))
    return ckpt, train_file, val_file


# ---------------------------------------------------------------------------------------------
# the two sides


def run_llmdesk(ckpt: Path, train_file: Path, steps: int, batch: int, seed: int, out: Path) -> dict:
    from llmdesk.train.tune import TuneConfig, tune

    clock: dict = {}

    def on_event(kind: str, d: dict) -> None:
        if kind == "start":  # the model is loaded and the data tokenized: the clock starts
            clock["t0"], clock["c0"] = time.perf_counter(), time.process_time()
        elif kind == "step" and d["step"] == steps:
            clock["t1"], clock["c1"] = time.perf_counter(), time.process_time()

    cfg = TuneConfig(steps=steps, batch=batch, grad_accum=1, lr=LR, seq_len=SEQ_LEN, train_on="all",
                     val_split=0, seed=seed, rank=LORA["rank"], alpha=LORA["alpha"], dropout=LORA["dropout"])
    res = tune(ckpt, [train_file], out, cfg, on_event=on_event)
    return {"tokens": res.tokens_seen, "seconds": clock["t1"] - clock["t0"], "cpu": clock["c1"] - clock["c0"],
            "losses": [h["loss"] for h in res.history], "adapter": res.adapter}


def run_trl(ckpt: Path, train_file: Path, steps: int, batch: int, seed: int, out: Path,
            checkpointing: bool) -> dict:
    import datasets
    import peft
    import transformers
    from trl import SFTConfig, SFTTrainer

    clock: dict = {}

    class Clock(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock["t0"], clock["c0"] = time.perf_counter(), time.process_time()

        def on_train_end(self, args, state, control, **kw):
            clock["t1"], clock["c1"] = time.perf_counter(), time.process_time()

    rows = [json.loads(line) for line in train_file.read_text().splitlines()]
    args = SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch,
                     gradient_accumulation_steps=1, learning_rate=LR, max_length=SEQ_LEN, seed=seed,
                     bf16=False, use_cpu=True, logging_steps=1, save_strategy="no", report_to="none",
                     gradient_checkpointing=checkpointing, disable_tqdm=True)
    lora = peft.LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                           target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=str(ckpt), args=args, train_dataset=datasets.Dataset.from_list(rows),
                         peft_config=lora, callbacks=[Clock()])
    trainer.train()
    trainer.save_model(str(out / "adapter"))
    logs = [h for h in trainer.state.log_history if "loss" in h]
    tokens = int(max(h.get("num_tokens", 0) for h in trainer.state.log_history))
    return {"tokens": tokens, "seconds": clock["t1"] - clock["t0"], "cpu": clock["c1"] - clock["c0"],
            "losses": [h["loss"] for h in logs], "adapter": out / "adapter"}


# ---------------------------------------------------------------------------------------------
# the same yardstick for both: loss on the held-out rows, every token


def heldout_loss(ckpt: Path, adapter: Path, val_file: Path) -> float:
    import peft
    import torch
    import transformers

    from llmdesk.train import sft_data

    tok = transformers.AutoTokenizer.from_pretrained(str(ckpt))
    rows = sft_data.read_rows([val_file])
    exs = sft_data.build_dataset(rows, tok, seq_len=SEQ_LEN, train_on="all").examples
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(str(ckpt)),
                                           str(adapter)).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for e in exs:
            ids = torch.tensor([e.input_ids])
            logits = model(input_ids=ids).logits[0, :-1]
            labels = torch.tensor(e.labels[1:])
            total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    return total / count


def smoothed(losses: list[float], windows: int = 4) -> list[float]:
    losses = [x for x in losses if not math.isnan(x)]
    n = max(1, len(losses) // windows)
    return [statistics.fmean(losses[i: i + n]) for i in range(0, n * windows, n) if losses[i: i + n]]


def token_lengths(ckpt: Path, train_file: Path) -> list[int]:
    import transformers

    from llmdesk.train import sft_data

    tok = transformers.AutoTokenizer.from_pretrained(str(ckpt))
    return sorted(len(e.input_ids) for e in sft_data.build_dataset(
        sft_data.read_rows([train_file]), tok, seq_len=SEQ_LEN, train_on="all").examples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="small", choices=sorted(SHAPES))
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2, help="runs of each side, alternating")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="torch threads, both sides")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trl-no-checkpointing", action="store_true", help="TRL without gradient checkpointing")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    a = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(a.threads)
    ckpt, train_file, val_file = make_base(a.shape)
    lens = token_lengths(ckpt, train_file)
    q = lambda f: lens[min(len(lens) - 1, int(f * len(lens)))]  # noqa: E731
    print(f"model: {a.shape} ({ckpt}); data: {len(lens)} training rows, tokens a row min {lens[0]} / median "
          f"{q(0.5)} / p90 {q(0.9)} / max {lens[-1]}; {a.steps} steps of {a.batch} rows, {a.threads} threads",
          flush=True)
    runs: dict[str, list[dict]] = {"llmdesk": [], "trl": []}
    with tempfile.TemporaryDirectory(prefix="tune-vs-trl-") as tmp:
        for r in range(a.rounds):
            order = ["llmdesk", "trl"] if r % 2 == 0 else ["trl", "llmdesk"]
            for side in order:
                out = Path(tmp) / f"{side}-{r}"
                if side == "llmdesk":
                    x = run_llmdesk(ckpt, train_file, a.steps, a.batch, a.seed, out)
                else:
                    x = run_trl(ckpt, train_file, a.steps, a.batch, a.seed, out, not a.trl_no_checkpointing)
                x["heldout"] = heldout_loss(ckpt, x.pop("adapter"), val_file)
                runs[side].append(x)
                print(f"round {r + 1} {side:8s}: {x['tokens']:,} useful tokens in {x['seconds']:.1f} s = "
                      f"{x['tokens'] / x['seconds']:,.0f} tokens/s, {1e3 * x['cpu'] / x['tokens']:.2f} CPU-ms a "
                      f"token; held-out loss {x['heldout']:.4f}", flush=True)
    tot = {s: {k: sum(x[k] for x in v) for k in ("tokens", "seconds", "cpu")} for s, v in runs.items()}
    tps = {s: t["tokens"] / t["seconds"] for s, t in tot.items()}
    cpt = {s: t["cpu"] / t["tokens"] for s, t in tot.items()}
    trl_name = "TRL SFTTrainer" + (" (no gradient checkpointing)" if a.trl_no_checkpointing else " (defaults)")
    print(f"\nllmdesk tune  : {tps['llmdesk']:,.0f} useful tokens/s, {1e3 * cpt['llmdesk']:.2f} CPU-ms a token")
    print(f"{trl_name}: {tps['trl']:,.0f} useful tokens/s, {1e3 * cpt['trl']:.2f} CPU-ms a token")
    print(f"speed         : {tps['llmdesk'] / tps['trl']:.2f}x TRL's useful tokens/s (wall clock), "
          f"{cpt['trl'] / cpt['llmdesk']:.2f}x by CPU time a token")
    for s in runs:
        curves = [" ".join(f"{v:.3f}" for v in smoothed(x["losses"])) for x in runs[s]]
        held = [x["heldout"] for x in runs[s]]
        print(f"loss {s:8s}: training loss by quarter of the run {' | '.join(curves)}; held-out "
              f"{' '.join(f'{h:.4f}' for h in held)}")
    if a.json:
        a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "runs": runs,
                                      "tokens_per_second": tps, "cpu_seconds_per_token": cpt}, indent=1))


if __name__ == "__main__":
    main()
