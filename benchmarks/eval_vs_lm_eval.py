"""`llmdesk eval run` against lm-evaluation-harness's transformers backend, same items, one run.

    .venv/bin/python benchmarks/eval_vs_lm_eval.py [--items 200] [--shots 5] [--peer-items N]
        [--dtype float32|bfloat16] [--batch 8] [--slots 8] [--type f16|bf16] [--threads N]
    .venv/bin/python benchmarks/eval_vs_lm_eval.py --per-token 256

The model is a TinyLlama-1.1B-shape Llama checkpoint (22 layers, 2048 wide, 32 heads, 4 KV heads,
5632 FFN, 32,000 vocabulary) with random weights, written with transformers: its answers are
meaningless, its speed is real. Its weights are rounded to values that f16 holds exactly before
they are saved, so the GGUF F16 that `llmdesk convert` makes of it holds the very same weights
as the checkpoint lm-eval loads. The tokenizer is a byte-level BPE trained on the task's own
text (no hub here). Everything is cached in ~/.cache/llmdesk-bench-models/eval-tinyllama/.

The task is MMLU's layout (the public cais/mmlu columns: question, subject, choices, answer),
one subject, questions of random words; `--shots` examples from its dev split, lm-eval's MMLU
prompt. llmdesk runs its built-in `mmlu` task on the GGUF F16; lm-eval runs the same prompt as a
task file (dataset_path json) on the checkpoint with its `hf` model. Both run in this process,
each with its model loaded before the clock starts, and are timed by the wall clock and by this
process's CPU time (all threads): on a machine shared with other work the wall clock swings, CPU
time much less. The chosen answer of every item is compared, and the log-likelihoods.

`--peer-items N` times lm-eval on the first N items only (it costs a full forward pass of the
few-shot prompt per question: on 2 cores about 10 s an item at fp32), and compares agreement on
those N; llmdesk always scores all `--items`.

Measured on this project's 2-vCPU VM (Xeon, AVX-512 without BF16/FP16 arithmetic), quiet:
llmdesk 200 items in 249 s = 0.802 items/s (2.41 CPU-s an item, 8 slots); lm-eval 32 items in
162 s = 0.198 items/s (9.62 CPU-s an item, fp32, batch 8): 4.1x (4.0x by CPU time). Again, loaded
by other work: 0.123 against 0.047 items/s, 2.6x by the wall clock, 4.2x by CPU time (2.66 against
11.17 CPU-s an item). The same choice on 32/32 items both times, log-likelihoods within 0.0053.
`--type bf16`, load average 1.5-3: 0.566 against 0.129 items/s, 4.4x (3.9x by CPU time), 32/32,
within 0.058.
The target was 5x: llmdesk computes 6.8x fewer tokens (71 against 482 a question), but llama.cpp
computes a token at 0.59-0.66 of torch fp32's speed here (`--per-token 256`: F16 34.5-37.4, BF16
38.3-41.0, torch 56.3-58.1 tokens per CPU-second, one thread); see docs/eval.md.

With llama.cpp built on MKL (`make mkl`; the first line says which build ran), BF16, loaded VM,
two runs: 0.526 against 0.101 and 0.594 against 0.123 items/s, 5.2x and 4.8x by the wall clock,
5.1x by CPU time both times (1.90 and 1.87 against 9.76 and 9.60 CPU-s an item), 32/32. Quiet: 1.122
against 0.181 items/s, 6.2x (6.1x by CPU time), 32/32.

`--per-token N` only measures that: one N-token forward pass per engine, one thread, by CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import time
from pathlib import Path

import score_throughput  # benchmarks/, beside this script

WORK = Path.home() / ".cache" / "llmdesk-bench-models" / "eval-tinyllama"
SUBJECT = "abstract_algebra"
# score_throughput.py's words, and a few of the subject's
WORDS = score_throughput.WORDS + "group ring field prime order element subgroup kernel".split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_rows(n: int, seed: int) -> list[dict]:
    """Rows in cais/mmlu's layout."""
    rng = random.Random(seed)
    return [{"question": sentence(rng, rng.randint(18, 40)).capitalize() + "?", "subject": SUBJECT,
             "choices": [sentence(rng, rng.randint(2, 8)) for _ in range(4)], "answer": rng.randrange(4)}
            for _ in range(n)]


def write_data(items: int) -> Path:
    d = WORK / f"mmlu-{items}"
    if not (d / "test.jsonl").is_file():
        d.mkdir(parents=True, exist_ok=True)
        for split, rows in (("dev", make_rows(5, 1)), ("test", make_rows(items, 2))):
            tmp = d / f"{split}.jsonl.part"
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            tmp.rename(d / f"{split}.jsonl")
    return d


def make_checkpoint() -> Path:
    """The HF checkpoint (TinyLlama-1.1B shapes, random weights exact in f16) with its tokenizer."""
    ckpt = WORK / "hf"
    if (ckpt / "model.safetensors").is_file() or (ckpt / "model.safetensors.index.json").is_file():
        return ckpt
    import torch
    import transformers

    from llmdesk.train.tokenizer import save_hf_tokenizer, train_bpe

    rows = make_rows(2000, 3)
    texts = [r["question"] + " " + " ".join(r["choices"]) for r in rows]
    tok = train_bpe(texts, 2000, pre="llama-bpe")
    eos = tok.token_to_id("<|endoftext|>")
    cfg = transformers.LlamaConfig(  # TinyLlama/TinyLlama-1.1B-Chat-v1.0's config.json
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
        rope_theta=10000.0, bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())  # every weight exact in f16: the GGUF F16 holds the same model
    tmp = WORK / "hf.part"
    model.save_pretrained(tmp)
    save_hf_tokenizer(tok, tmp)
    (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    tmp.rename(ckpt)
    return ckpt


def make_gguf(ckpt: Path, out_type: str = "f16") -> Path:
    out = WORK / f"tinyllama-shape-{out_type}.gguf"
    if not out.is_file():
        from llmdesk.formats.convert import convert
        from llmdesk.runtime.llama import LlamaModel

        tmp = out.with_suffix(".part")
        convert(ckpt, tmp, out_type=out_type, name="tinyllama-shape", check_with=LlamaModel)
        tmp.rename(out)
    return out


# lm-eval's MMLU prompt (lm_eval/tasks/mmlu/default/_default_template_yaml), over local JSONL
LM_EVAL_TASK = """task: bench_mmlu
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
    dev: {dev}
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
description: "The following are multiple choice questions (with answers) about {subject}.\\n\\n"
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def run_lm_eval(ckpt: Path, data: Path, shots: int, limit: int, dtype: str, batch: int) -> dict:
    """lm-eval's `hf` model on the task, in this process (its model loaded and its task index
    built before the clock starts); returns seconds scoring and the choice per item."""
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = WORK / "lm-eval-tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "bench_mmlu.yaml").write_text(LM_EVAL_TASK.format(
        test=data / "test.jsonl", dev=data / "dev.jsonl", subject=SUBJECT.replace("_", " ")))
    lm = HFLM(pretrained=str(ckpt), dtype=dtype, batch_size=batch, device="cpu")
    manager = TaskManager(include_path=str(tasks))
    t0, c0 = time.perf_counter(), time.process_time()
    out = simple_evaluate(model=lm, tasks=["bench_mmlu"], num_fewshot=shots, limit=limit, task_manager=manager,
                          log_samples=True, bootstrap_iters=0)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    chosen, lls, tokens = {}, {}, 0
    for s in out["samples"]["bench_mmlu"]:
        # lm-eval's forward pass per question: context + continuation less its last token (its
        # logits cache answers the four one-token choices from one pass)
        context, continuation = s["arguments"][0]
        tokens += sum(len(x) for x in lm._encode_pair(context, continuation)) - 1
        ll = [float(r[0][0]) for r in s["resps"]]
        chosen[int(s["doc_id"])] = max(range(len(ll)), key=ll.__getitem__)
        lls[int(s["doc_id"])] = ll
    return {"seconds": seconds, "cpu": cpu, "chosen": chosen, "loglikelihoods": lls, "tokens": tokens}


def build() -> str:
    """Which matrix products llama.cpp runs on: ggml's own, or a BLAS library (`make mkl`)."""
    from llmdesk.runtime.llama import blas

    return f"llama.cpp on {blas()}" if blas() else "llama.cpp's own matrix products"


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return r.ru_utime + r.ru_stime


def per_token(ckpt: Path, types: list[str], n: int, rounds: int = 2) -> None:
    """Each engine's speed on one forward pass of n tokens, one thread, in tokens per CPU-second:
    llama.cpp (one llama_decode, llama.cpp's defaults: flash attention, f16 KV cache) on each GGUF
    type, and torch fp32 (transformers, the model lm-eval loads). The first pass is a warm-up."""
    import torch
    import transformers

    from llmdesk.runtime.llama import Batch, LlamaModel, clear_memory, decode, free_context, new_context

    rng = random.Random(0)
    ids = [rng.randrange(100, 1900) for _ in range(n)]
    for t in types:
        llama = LlamaModel(make_gguf(ckpt, t))
        ctx = new_context(llama, n_ctx=max(256, 2 * n), n_batch=n, n_threads=1)
        b = Batch(n)
        for r in range(rounds + 1):
            b.clear()
            for i, tok in enumerate(ids):
                b.add(tok, i, 0, i == n - 1)
            c0 = cpu_seconds()
            if decode(ctx, b) != 0:
                raise SystemExit("llama_decode failed")
            took = cpu_seconds() - c0
            clear_memory(ctx)
            if r:
                print(f"llama.cpp {t.upper():>4} ({build()}): {n} tokens in {took:.2f} CPU-s = {n / took:.1f} tokens per CPU-second")
        b.free()
        free_context(ctx)
        llama.close()
    torch.set_num_threads(1)
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        for r in range(rounds + 1):
            c0 = cpu_seconds()
            model(x)
            took = cpu_seconds() - c0
            if r:
                print(f"torch fp32    : {n} tokens in {took:.2f} CPU-s = {n / took:.1f} tokens per CPU-second")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--peer-items", type=int, default=None, help="lm-eval on the first N items only")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=8, help="lm-eval's --batch_size")
    ap.add_argument("--slots", type=int, default=8, help="llmdesk's slots (llmdesk eval run --slots)")
    ap.add_argument("--type", default="f16", choices=["f16", "bf16"], help="llmdesk's GGUF")
    ap.add_argument("--threads", type=int, default=None, help="llmdesk's threads (default: llama.cpp's, all cores)")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--per-token", type=int, metavar="N", default=0,
                    help="only each engine's tokens per CPU-second on one N-token pass, one thread (F16, BF16, torch)")
    a = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    ckpt = make_checkpoint()
    if a.per_token:
        per_token(ckpt, ["f16", "bf16"], a.per_token)
        return
    gguf = make_gguf(ckpt, a.type)
    data = write_data(a.items)
    mine = run_llmdesk(gguf, data, a.shots, a.items, a.slots, a.threads)
    print(f"llmdesk  : {a.items} items in {mine['seconds']:.1f} s = {a.items / mine['seconds']:.3f} items/s, "
          f"{mine['cpu'] / a.items:.2f} CPU-s an item (GGUF {a.type.upper()}, {a.slots} slots, unified KV cache, {build()})")
    decode_s = mine["decode_ms"] / 1000
    print(f"  where  : {mine['tokens_computed'] / a.items:.1f} tokens computed an item ({mine['tokens_computed']} in "
          f"{mine['decodes']} llama_decode calls, the few-shot prefix once); {decode_s:.1f} s in llama_decode "
          f"({100 * decode_s / mine['seconds']:.0f}% of the run) = {mine['tokens_computed'] / decode_s:.1f} tokens/s",
          flush=True)
    if a.skip_peer:
        return
    n_peer = a.peer_items or a.items
    peer = run_lm_eval(ckpt, data, a.shots, n_peer, a.dtype, a.batch)
    print(f"lm-eval  : {n_peer} items in {peer['seconds']:.1f} s = {n_peer / peer['seconds']:.3f} items/s, "
          f"{peer['cpu'] / n_peer:.2f} CPU-s an item (transformers {a.dtype}, batch {a.batch})")
    print(f"  where  : {peer['tokens'] / n_peer:.1f} tokens computed an item (the whole 5-shot prompt, once for "
          f"its four one-token choices) = {peer['tokens'] / peer['seconds']:.1f} tokens/s")
    same = sum(mine["chosen"][i] == c for i, c in peer["chosen"].items())
    diffs = [abs(x - y) for i, ll in peer["loglikelihoods"].items() for x, y in zip(ll, mine["loglikelihoods"][i])]
    print(f"speed    : {(a.items / mine['seconds']) / (n_peer / peer['seconds']):.1f}x lm-eval's items/s "
          f"(wall clock), {(peer['cpu'] / n_peer) / (mine['cpu'] / a.items):.1f}x by CPU time an item")
    # each side's log-likelihoods per item, to compare another run (another GGUF type) with
    (WORK / f"last-run-{a.type}.json").write_text(json.dumps({"llmdesk": mine["loglikelihoods"],
                                                              "lm_eval": peer["loglikelihoods"]}))
    print(f"agreement: same choice on {same}/{len(peer['chosen'])} items ({100 * same / len(peer['chosen']):.1f}%); "
          f"loglikelihoods differ by {max(diffs):.4f} at most, {sum(diffs) / len(diffs):.4f} on average")


def run_llmdesk(gguf: Path, data: Path, shots: int, items: int, slots: int, threads: int | None = None) -> dict:
    """llmdesk's built-in mmlu task on the GGUF, as `llmdesk eval run` runs it; returns seconds
    scoring (the model loaded first, results computed afresh) and the choice per item."""
    from llmdesk.eval.harness import evaluate, open_model
    from llmdesk.eval.tasks import load_task

    model, ident = open_model(str(gguf), slots=slots, threads=threads)
    try:
        task = load_task(f"mmlu_{SUBJECT}", data=data)
        t0, c0 = time.perf_counter(), time.process_time()
        r = evaluate(model, task, limit=items, shots=shots, identity=ident, fresh=True)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        stats = {"engine_seq_copies": model.engine.seq_copies, **r.stats}
    finally:
        model.close()
    lls = {i: x["ll"] for i, x in r.items.items()}
    chosen = {i: max(range(len(ll)), key=ll.__getitem__) for i, ll in lls.items()}
    return {"seconds": seconds, "cpu": cpu, "chosen": chosen, "loglikelihoods": lls, "acc": r.metrics["acc"].value,
            **stats}


if __name__ == "__main__":
    main()
