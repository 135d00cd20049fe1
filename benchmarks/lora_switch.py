"""What switching LoRA adapters on one llama.cpp context costs, against keeping a context per set.

    .venv/bin/python benchmarks/lora_switch.py [--model BASE.gguf | --layers 8 --width 1024] [--rank 16]
        [--switches 50] [--threads 1] [--prompt 128] [--json out.json]
    .venv/bin/python benchmarks/lora_switch.py --serve [--parallel 4] [--requests 32] [--max-tokens 64]
        [--rounds 3] [...]

llama.cpp applies adapters to a whole context (`llama_set_adapters_lora`): every sequence in it
decodes with the same set. An Engine that serves requests with different adapters either switches
the set between steps on one context, or keeps one context per set over the same loaded weights.
This measures both sides on one base:

  load       llama_adapter_lora_init per adapter (read once; the A/B tensors stay in memory)
  set        one llama_set_adapters_lora call (alternating A, B, none)
  step       one-token decode without adapters, with the set unchanged, and right after a
             switch (the context builds its compute graph again when the set changed)
  prefill    a --prompt token prefill: what a switch costs on top when the KV cells of a prompt
             were computed under another set (they are invalid under the new one and must be
             computed again)
  context    a second context: time to create it, its KV cache and compute buffer (what a context
             per adapter set costs in memory instead)

The base is a synthetic f16 Llama (--layers 8, --width 1024, 32k vocabulary: ~150M parameters)
unless --model names one; the adapters are random LoRAs of --rank on q/k/v/o/gate/up/down, written by
llmdesk's own writer (formats/lora_gguf.py) from PEFT-format folders. Warm-up calls are not timed;
each figure is the median of --switches calls.

--serve measures what per-request adapters cost a server under load: `llmdesk serve` (in this
process, real HTTP on 127.0.0.1) with the base and the two adapters (`--lora a=... --lora b=...`),
--parallel slots, and --parallel clients each sending --requests / --parallel completions of
--max-tokens tokens (ignore_eos, different prompts: no prompt cache) to one model name. The
mixes: every client on the base; every client on base+a (one set); half on base+a, half on
base+b (two sets); a quarter each on base, base+a, base+b, base+a+b (four sets). Each figure is
generated tokens / wall time, the median of --rounds rounds, the mixes taking turns within a
round so the machine's drift falls on all of them; the Engine's decodes and adapter switches per
step are counted too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from llmdesk.formats.gguf import read_gguf
from llmdesk.formats.lora_gguf import write_lora_gguf
from llmdesk.formats.synth import SynthConfig, write_llama_gguf
from llmdesk.runtime import llama as rl

PEFT_NAMES = {  # GGUF tensor -> the PEFT module under model.layers.N
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def random_adapter(base: Path, out_dir: Path, rank: int, seed: int) -> Path:
    """A PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) for `base`, random A and B."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for t in read_gguf(base).tensors:
        parts = t.name.split(".")  # blk.N.attn_q.weight
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in PEFT_NAMES:
            n_in, n_out = t.shape
            key = f"base_model.model.model.layers.{parts[1]}.{PEFT_NAMES[parts[2]]}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((n_out, rank)) * 0.01).astype(np.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    (out_dir / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted(PEFT_NAMES.values())}))
    return out_dir


def median_ms(fn, n: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def serve_load(base: Path, adapters: list[Path], args) -> dict:
    """Throughput of one server under the four mixes of adapter sets (see the module's doc)."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from llmdesk.serve import BackgroundServer, ServeConfig, create_app
    from llmdesk.serve.config import parse_lora

    cfg = ServeConfig(models=[str(base)], parallel=args.parallel, ctx=args.prompt + args.max_tokens + 16,
                      threads=args.threads, lora=parse_lora([f"a={adapters[0]}", f"b={adapters[1]}"]))
    server = BackgroundServer(create_app(cfg)).start()
    name = base.name
    engine = server.config.app.state.llmdesk.models.loaded[name].model.engine
    mixes = {"base": [name], "one set (base+a)": [f"{name}+a"], "two sets": [f"{name}+a", f"{name}+b"],
             "four sets": [name, f"{name}+a", f"{name}+b", f"{name}+a+b"]}
    words = "time year way day thing world life hand part child eye place work week case point number group".split()
    rng = np.random.default_rng(0)

    def prompt() -> str:  # about --prompt tokens, new words each time: nothing comes from the prompt cache
        return " ".join(rng.choice(words, args.prompt // 2))

    def client(model: str, n: int) -> int:
        with httpx.Client(base_url=server.url, timeout=600) as c:
            tokens = 0
            for _ in range(n):
                r = c.post("/v1/completions", json={"model": model, "prompt": prompt(), "max_tokens": args.max_tokens,
                                                     "ignore_eos": True, "temperature": 0.8})
                r.raise_for_status()
                tokens += r.json()["usage"]["completion_tokens"]
            return tokens

    def one(mix: list[str]) -> dict:
        steps, switches = engine.steps, engine.lora_switches
        per_client = max(1, args.requests // args.parallel)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.parallel) as pool:
            tokens = sum(pool.map(lambda i: client(mix[i % len(mix)], per_client), range(args.parallel)))
        wall = time.perf_counter() - t0
        return {"tokens_per_second": tokens / wall, "decodes": engine.steps - steps,
                "switches": engine.lora_switches - switches, "tokens": tokens}

    try:
        one(mixes["four sets"])  # warm-up, untimed
        runs: dict[str, list[dict]] = {k: [] for k in mixes}
        for _ in range(args.rounds):
            for key, mix in mixes.items():
                runs[key].append(one(mix))
    finally:
        server.stop()
    out = {}
    single = statistics.median(r["tokens_per_second"] for r in runs["one set (base+a)"])
    for key, rs in runs.items():
        tps = statistics.median(r["tokens_per_second"] for r in rs)
        out[key] = {"tokens_per_second": round(tps, 1), "vs_one_set": round(tps / single, 3),
                    "decodes_per_token": round(statistics.median(r["decodes"] / r["tokens"] for r in rs), 3),
                    "switches_per_token": round(statistics.median(r["switches"] / r["tokens"] for r in rs), 3)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="the base GGUF (default: a synthetic f16 Llama)")
    ap.add_argument("--layers", type=int, default=8, help="layers of the synthetic base")
    ap.add_argument("--width", type=int, default=1024, help="n_embd of the synthetic base (n_ff 2.75x, 64-wide heads)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--switches", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens for the prefill figure")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--serve", action="store_true", help="measure a server's throughput under mixed adapter sets")
    ap.add_argument("--parallel", type=int, default=4, help="--serve: slots, and clients sending at once")
    ap.add_argument("--requests", type=int, default=32, help="--serve: requests per mix and round")
    ap.add_argument("--max-tokens", type=int, default=64, help="--serve: tokens per answer")
    ap.add_argument("--rounds", type=int, default=3, help="--serve: rounds (each mix once per round)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="lora-switch-"))
    base = args.model
    if base is None:
        w = args.width
        base = write_llama_gguf(tmp / "base.gguf", SynthConfig(name="synth", n_layer=args.layers, n_embd=w,
                                                               n_head=w // 64, n_head_kv=max(1, w // 256),
                                                               n_ff=w * 11 // 4, n_vocab=32000, dtype="f16"))
    adapters = [write_lora_gguf(random_adapter(base, tmp / f"peft-{i}", args.rank, i), base, tmp / f"lora-{i}.gguf")
                for i in range(2)]
    if args.serve:
        result = {"base": str(args.model) if args.model else f"synthetic f16 llama, {args.layers} layers x {args.width}",
                  "rank": args.rank, "threads": args.threads, "parallel": args.parallel, "prompt": args.prompt,
                  "max_tokens": args.max_tokens, "requests": args.requests, "rounds": args.rounds,
                  "mixes": serve_load(Path(base), adapters, args)}
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return

    model = rl.LlamaModel(base)
    t0 = time.perf_counter()
    a = rl.LoraAdapter(model, adapters[0])
    load_ms = 1e3 * (time.perf_counter() - t0)
    b = rl.LoraAdapter(model, adapters[1])
    n_ctx = max(512, args.prompt + 64)
    ctx = rl.new_context(model, n_ctx=n_ctx, n_batch=max(512, args.prompt), n_threads=args.threads,
                         flash_attn=False)
    batch = rl.Batch(max(512, args.prompt))
    prompt = list(np.random.default_rng(0).integers(10, model.n_vocab, args.prompt))

    def decode(tokens: list[int], pos0: int = 0) -> None:
        batch.clear()
        for i, tok in enumerate(tokens):
            batch.add(int(tok), pos0 + i, 0, i == len(tokens) - 1)
        rc = rl.decode(ctx, batch)
        assert rc == 0, rc

    sets = [[(a, 1.0)], [(b, 1.0)], []]
    state = {"i": 0}

    def switch() -> None:
        state["i"] += 1
        rl.set_adapters(ctx, sets[state["i"] % 3])

    def step() -> None:  # one token at the prompt's end, the cells after it dropped again
        decode([prompt[-1]], args.prompt - 1)
        rl.C.llama_memory_seq_rm(rl.C.llama_get_memory(ctx), 0, args.prompt - 1, -1)

    rl.set_adapters(ctx, sets[0])
    decode(prompt[:-1])  # the prompt's cells, under adapter A
    set_ms = median_ms(switch, args.switches)
    rl.set_adapters(ctx, sets[0])
    same_ms = median_ms(step, args.switches)
    rl.set_adapters(ctx, [])
    plain_ms = median_ms(step, args.switches)  # what the adapter itself costs per step, against this

    def switch_then_step() -> None:
        switch()
        step()

    switched_ms = median_ms(switch_then_step, args.switches)

    # the switch's own cost, paired: a step on the set it was on, then a step right after a
    # switch, alternately, so the machine's drift cancels out of each difference
    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    diffs = []
    for _ in range(args.switches):
        diffs.append(timed(switch_then_step) - timed(step))
    switch_cost_ms = 1e3 * statistics.median(diffs)

    def prefill() -> None:
        rl.clear_memory(ctx)
        decode(prompt)

    prefill_ms = median_ms(prefill, max(3, args.switches // 10), warmup=1)

    import psutil

    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    t0 = time.perf_counter()
    ctx2 = rl.new_context(model, n_ctx=n_ctx, n_batch=max(512, args.prompt), n_threads=args.threads,
                          flash_attn=False)
    rl.set_adapters(ctx2, sets[1])
    ctx_ms = 1e3 * (time.perf_counter() - t0)
    # fill it once, so its compute buffer and KV pages are touched
    batch.clear()
    for i, tok in enumerate(prompt):
        batch.add(int(tok), i, 0, i == len(prompt) - 1)
    assert rl.decode(ctx2, batch) == 0
    ctx_rss = proc.memory_info().rss - rss0
    info = read_gguf(base)
    kv_cells_bytes = 2 * (info.block_count or 0) * n_ctx * ((info.head_count_kv or 0) *
                                                          ((info.embedding_length or 0) // (info.head_count or 1))) * 2
    result = {
        "base": str(args.model) if args.model else f"synthetic f16 llama, {args.layers} layers x {args.width}",
        "params": info.parameter_count,
        "rank": args.rank, "adapter_bytes": adapters[0].stat().st_size, "threads": args.threads,
        "adapter_load_ms": round(load_ms, 2),
        "set_adapters_ms": round(set_ms, 4),
        "step_without_adapter_ms": round(plain_ms, 2),
        "step_same_set_ms": round(same_ms, 2),
        "step_after_switch_ms": round(switched_ms, 2),
        "switch_cost_ms": round(switch_cost_ms, 2),
        "prefill_ms": round(prefill_ms, 1), "prefill_tokens": args.prompt,
        "second_context_ms": round(ctx_ms, 1), "second_context_rss_mb": round(ctx_rss / 2**20, 1),
        "second_context_kv_mb_f16": round(kv_cells_bytes / 2**20, 1), "n_ctx": n_ctx,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    rl.free_context(ctx2)
    rl.free_context(ctx)
    batch.free()
    a.close()
    b.close()
    model.close()


if __name__ == "__main__":
    main()
