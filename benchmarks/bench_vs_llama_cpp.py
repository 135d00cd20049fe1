"""llmdesk's Engine against llama.cpp driven directly, same file, threads and batch, in one run.

    .venv/bin/python benchmarks/bench_vs_llama_cpp.py [MODEL.gguf] [-t 1] [-b 512] [-n 128] [-p 512]
        [--rounds 8] [--preset tinyllama-1.1b --type q4_k_m]

Without MODEL, a random-weight model of a real shape is made with `llmdesk make-model` (cached in
~/.cache/llmdesk-bench-models). Both sides share one loaded model (the same mmapped weights) and
each has its own context with the same parameters (n_ctx, n_batch, n_ubatch, threads, flash
attention auto, one sequence). Rounds alternate which side goes first, so machine noise (other
jobs, turbo, thermal) falls on both; each round has an untimed warm-up.

Generation is timed the same way on both sides: from the first sampled token to the last, with
greedy sampling through a llama.cpp sampler chain (what llama.cpp's `simple` example does); a
third column times bare `llama_decode` calls without sampling (what llama-bench's tg does).
Prompt processing: n_prompt random tokens into an empty sequence, until the first token.

By default the direct side drives the Engine's own llama.cpp context while the Engine is idle
(`--own-context` gives it a context of its own): two contexts have their KV and compute buffers at
different addresses, which alone can move decode speed by a few percent, and that is not what is
being compared.

Two clocks: wall time (what a user sees) and this process's CPU time (time.process_time) over
the whole request. On a machine shared with other jobs the wall clock swings by tens of percent
from second to second; with one thread, CPU time is what each side really costs and barely moves.

Target: llmdesk's generation speed >= 97% of direct llama.cpp. Ratios are of medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import llama_cpp as C
import numpy as np

from llmdesk.bench.core import EngineBench
from llmdesk.runtime.llama import LlamaModel, new_context


class Direct:
    """llama.cpp through llama-cpp-python's low-level API, nothing else in the loop."""

    def __init__(self, llama: LlamaModel, *, n_ctx: int, threads: int, batch: int, seed: int = 1, ctx=None):
        # the same parameters as the Engine's context (runtime/llama.py new_context), or the
        # Engine's own context (`ctx`) while the Engine is idle
        self.own = ctx is None
        self.ctx = new_context(llama, n_ctx=n_ctx, n_seq=1, n_batch=batch, n_threads=threads) if ctx is None else ctx
        self.mem = C.llama_get_memory(self.ctx)
        self.batch = C.llama_batch_init(batch, 0, 1)
        self.n_batch = batch
        self.n_vocab = llama.n_vocab
        self.rng = np.random.default_rng(seed)
        self.chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
        C.llama_sampler_chain_add(self.chain, C.llama_sampler_init_greedy())

    def _decode(self, toks: list[int], pos0: int, want_last: bool) -> None:
        b = self.batch
        for i, t in enumerate(toks):
            b.token[i] = t
            b.pos[i] = pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = want_last and i == len(toks) - 1
        b.n_tokens = len(toks)
        rc = C.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc})")

    def pp(self, n: int) -> float:
        C.llama_memory_clear(self.mem, True)
        toks = self.rng.integers(0, self.n_vocab, size=n).tolist()
        t0 = time.perf_counter()
        for i in range(0, n, self.n_batch):
            chunk = toks[i:i + self.n_batch]
            self._decode(chunk, i, i + len(chunk) >= n)
        C.llama_sampler_sample(self.chain, self.ctx, -1)
        return n / (time.perf_counter() - t0)

    def tg(self, n: int, sample: bool = True) -> tuple[float, float]:
        """(tokens/s by the wall clock from the first token, tokens/s by CPU time of the whole request)."""
        C.llama_memory_clear(self.mem, True)
        c0 = time.process_time()
        tok = int(self.rng.integers(0, self.n_vocab))
        self._decode([tok], 0, True)
        tok = C.llama_sampler_sample(self.chain, self.ctx, -1)
        t0 = time.perf_counter()
        for pos in range(1, n + 1):
            self._decode([tok], pos, True)
            if sample:
                tok = C.llama_sampler_sample(self.chain, self.ctx, -1)
        t1 = time.perf_counter()
        return n / (t1 - t0), (n + 1) / (time.process_time() - c0)

    def close(self) -> None:
        C.llama_sampler_free(self.chain)
        C.llama_batch_free(self.batch)
        if self.own:
            C.llama_free(self.ctx)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", type=Path)
    ap.add_argument("--preset", default="tinyllama-1.1b")
    ap.add_argument("--type", default="q4_k_m")
    ap.add_argument("--models", type=Path, default=Path.home() / ".cache" / "llmdesk-bench-models")
    ap.add_argument("-t", "--threads", type=int, default=1)
    ap.add_argument("-b", "--batch", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--own-context", action="store_true", help="give the direct side a context of its own")
    a = ap.parse_args()

    path = a.model
    if path is None:
        from llmdesk.bench.make_model import make_model

        a.models.mkdir(parents=True, exist_ok=True)
        path = a.models / f"{a.preset}-{a.type.lower()}.gguf"
        if not path.exists():
            print(f"making {path} ...", file=sys.stderr, flush=True)
            make_model(a.preset, a.type, path)
    llama = LlamaModel(path)
    n_ctx = max(a.n_prompt, a.n_gen) + 256
    eng = EngineBench(llama, n_ctx=n_ctx, threads=a.threads, batch=a.batch)
    direct = Direct(llama, n_ctx=n_ctx, threads=a.threads, batch=a.batch,
                    ctx=None if a.own_context else eng.engine.ctx)

    def engine_forget() -> None:
        # the direct side cleared the shared KV cache: the Engine's slot must not count on it
        for slot in eng.engine.slots:
            slot.cache = []
    res: dict[str, list[float]] = {k: [] for k in (
        "llmdesk tg", "direct tg", "direct tg (no sampling)", "llmdesk tg, CPU time", "direct tg, CPU time",
        "llmdesk pp", "direct pp")}

    def engine_tg(n: int) -> tuple[float, float]:
        c0 = time.process_time()
        tps = eng.tg(n)
        return tps, (n + 1) / (time.process_time() - c0)

    try:
        # warm-up, untimed
        eng.pp(32), eng.tg(8), direct.pp(32), direct.tg(8)
        engine_forget()
        for r in range(a.rounds):
            order = [("llmdesk", eng), ("direct", direct)]
            if r % 2:
                order.reverse()
            for name, side in order:
                wall, cpu = engine_tg(a.n_gen) if name == "llmdesk" else side.tg(a.n_gen)
                res[f"{name} tg"].append(wall)
                res[f"{name} tg, CPU time"].append(cpu)
                if name == "direct":
                    res["direct tg (no sampling)"].append(side.tg(a.n_gen, sample=False)[0])
                    engine_forget()
            for name, side in order:
                if a.n_prompt:
                    res[f"{name} pp"].append(side.pp(a.n_prompt) if name == "direct" else side.pp(a.n_prompt)[0])
                    engine_forget()
            print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in res.items() if v),
                  file=sys.stderr, flush=True)
    finally:
        eng.close()
        direct.close()
        llama.close()

    res = {k: v for k, v in res.items() if v}
    med = {k: statistics.median(v) for k, v in res.items()}
    sd = {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in res.items()}
    print(f"model: {path.name} ({path.stat().st_size / 2**30:.2f} GiB), threads {a.threads}, batch {a.batch}, "
          f"tg{a.n_gen}, pp{a.n_prompt}, {a.rounds} alternating rounds, "
          f"{'separate contexts' if a.own_context else 'one shared context'}")
    print("| measurement | median tokens/s | stddev |")
    print("| --- | ---: | ---: |")
    for k in res:
        print(f"| {k} | {med[k]:.2f} | {sd[k]:.2f} |")
    # per-round ratios (each pair ran back to back) are less exposed to slow drifts than medians
    per_round = [x / y for x, y in zip(res["llmdesk tg"], res["direct tg"])]
    print()
    print(f"generation: llmdesk / direct = {med['llmdesk tg'] / med['direct tg']:.3f} "
          f"(median of per-round ratios {statistics.median(per_round):.3f}; "
          f"vs bare llama_decode without sampling {med['llmdesk tg'] / med['direct tg (no sampling)']:.3f})")
    print(f"generation by CPU time: llmdesk / direct = "
          f"{med['llmdesk tg, CPU time'] / med['direct tg, CPU time']:.3f}")
    if a.n_prompt:
        print(f"prompt processing: llmdesk / direct = {med['llmdesk pp'] / med['direct pp']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
