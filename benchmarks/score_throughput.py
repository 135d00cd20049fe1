"""Multiple-choice scoring throughput: one pair at a time against the Engine's batched scoring.

N questions, each with 4 choices, all after one few-shot prefix (lm-evaluation-harness's shape:
acc = argmax over a question's choices of the summed log-probability of the choice). Four ways:

  one at a time   each (context, continuation) pair its own job, the whole context computed
                  every time (Engine.reuse_prefix = False): what a loop without a prompt cache does
  prefix reuse    each pair its own job, one slot: the few-shot prefix and the question stay in
                  the slot's KV cache, only what differs is computed
  batched         all pairs in one job over --slots slots: a question's context is computed once
                  and copied to the slots of its other choices (llama_memory_seq_cp), several
                  pairs share each llama_decode
  batched, unified  the same with Engine(kv_unified=True): the slots share one cache, a copied
                  context is shared, and any mix of slots fits one ubatch

The model has random weights and TinyLlama-1.1B's shapes (make it with `llmdesk make-model
--preset tinyllama-1.1b --type q4_k_m -o tl.gguf`); its scores are meaningless, its speed is
real. The same log-probabilities come out of all three (checked, within flash attention's f16
rounding). The first pass of each way is a warm-up, not timed.

    python benchmarks/score_throughput.py tl.gguf --items 8 --threads 1

On a 2-core shared VM, 1 thread, TinyLlama-1.1B shapes at Q4_K_M, 8 questions (32 pairs, a
312-token prefix): 0.11 pairs/s one at a time, 0.96 with prefix reuse (8.7x), 0.83 batched over
4 slots (7.5x), 0.92 batched with a unified cache (8.4x); see docs/scoring.md.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np

from llmdesk.runtime.engine import Engine, ScoreRequest
from llmdesk.runtime.llama import LlamaModel

WORDS = ("the of and to in is was for on are with as by at from that this be or an which it not have one "
         "all were they their there more can had has would about what when will some into other time if "
         "than only its two like then first been who now people may over after most made also did many "
         "before must through back years where much your way well down should because each just those "
         "how too little state good very make world still own see men work long get here between both "
         "life being under never day same another know while last might us great old year off come since "
         "against go came right used take three").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_items(llama: LlamaModel, n_items: int, n_shots: int, seed: int) -> tuple[list[int], list[ScoreRequest]]:
    rng = random.Random(seed)
    shots = "".join(f"Question: {sentence(rng, 14)}?\nAnswer: {sentence(rng, 4)}.\n\n" for _ in range(n_shots))
    prefix = llama.tokenize(shots)
    requests = []
    for _ in range(n_items):
        context = prefix + llama.tokenize(f"Question: {sentence(rng, 14)}?\nAnswer:", add_special=False)
        for _ in range(4):
            requests.append(ScoreRequest(context, llama.tokenize(" " + sentence(rng, 3) + ".", add_special=False)))
    return prefix, requests


def run(llama: LlamaModel, requests: list[ScoreRequest], warmup: ScoreRequest, *, slots: int, reuse: bool,
        together: bool, n_ctx: int, threads: int, unified: bool = False) -> tuple[float, list, int, int]:
    """(seconds, results, llama_decode calls, tokens computed) of the timed pass."""
    with Engine(llama, n_ctx=n_ctx, n_slots=slots, n_threads=threads, kv_unified=unified) as eng:
        eng.reuse_prefix = reuse
        eng.score([warmup] * slots).wait()  # not timed; shares no prefix with the items
        steps0 = eng.steps
        t0 = time.perf_counter()
        if together:
            results = eng.score(requests).wait()
        else:
            results = [eng.score([r]).wait()[0] for r in requests]
        took = time.perf_counter() - t0
        computed = sum(len(r.context) + len(r.continuation) - 1 - res.n_cached for r, res in zip(requests, results))
        return took, results, eng.steps - steps0, computed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a GGUF (e.g. random weights with TinyLlama-1.1B's shapes)")
    ap.add_argument("--items", type=int, default=8, help="questions, 4 choices each")
    ap.add_argument("--shots", type=int, default=5, help="few-shot examples in the shared prefix")
    ap.add_argument("--slots", type=int, default=4, help="slots for the batched way")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=1024, help="context per slot")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    llama = LlamaModel(args.model)
    prefix, requests = make_items(llama, args.items, args.shots, args.seed)
    warm = llama.tokenize("Warm up: " + sentence(random.Random(-1), 200))[: len(requests[0].context) // 2]
    warmup = ScoreRequest(warm, requests[0].continuation)
    n_pairs = len(requests)
    ways = [("one at a time", dict(slots=1, reuse=False, together=False)),
            ("prefix reuse", dict(slots=1, reuse=True, together=False)),
            (f"batched, {args.slots} slots", dict(slots=args.slots, reuse=True, together=True)),
            ("batched, unified", dict(slots=args.slots, reuse=True, together=True, unified=True))]
    rows, ref = [], None
    for name, kw in ways:
        took, results, steps, computed = run(llama, requests, warmup, n_ctx=args.ctx, threads=args.threads, **kw)
        lp = np.array([r.logprob for r in results])
        if ref is None:
            ref = lp
        rows.append({"way": name, "seconds": took, "pairs_per_second": n_pairs / took, "llama_decode_calls": steps,
                     "tokens_computed": computed, "max_abs_logprob_diff": float(np.abs(lp - ref).max()),
                     "same_answers": bool(all(np.argmax(lp[i:i + 4]) == np.argmax(ref[i:i + 4])
                                              for i in range(0, n_pairs, 4)))})
    llama.close()
    base = rows[0]["pairs_per_second"]
    for r in rows:
        r["speedup"] = r["pairs_per_second"] / base
    info = {"model": args.model, "items": args.items, "pairs": n_pairs, "prefix_tokens": len(prefix),
            "context_tokens": len(requests[0].context), "threads": args.threads, "ways": rows}
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"{args.items} questions x 4 choices = {n_pairs} pairs; few-shot prefix {len(prefix)} tokens, "
          f"context {len(requests[0].context)} tokens; {args.threads} thread(s)")
    print(f"{'way':<20} {'pairs/s':>8} {'speedup':>8} {'decodes':>8} {'tokens':>8} {'max |dlogp|':>12}")
    for r in rows:
        print(f"{r['way']:<20} {r['pairs_per_second']:>8.2f} {r['speedup']:>7.1f}x {r['llama_decode_calls']:>8} "
              f"{r['tokens_computed']:>8} {r['max_abs_logprob_diff']:>12.2g}")


if __name__ == "__main__":
    main()
