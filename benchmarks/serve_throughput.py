"""llmdesk serve against itself and llama-cpp-python's server, side by side in one run.

    python benchmarks/serve_throughput.py                        # builds a TinyLlama-1.1B-shaped Q4_K_M
    python benchmarks/serve_throughput.py --model my.gguf --threads 8 --json results.json

Measures, on the same GGUF with the same threads:
  1. aggregate generation throughput of `--streams` concurrent streamed requests against
     `llmdesk serve --parallel 8`, `llmdesk serve --parallel 1`, and `python -m llama_cpp.server`
     (skipped, and said so, when its extra dependencies are not installed);
  2. time to first token of the first turn of a ~1,000-token conversation, and of its follow-up
     turn (whose prefix is already in the KV cache), on `llmdesk serve`.

Each server runs as its own process, started and stopped here; warm-up requests are not timed.
The model has random weights (`llmdesk make-model`): its answers are gibberish, its speed is
that of the real model. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from llmdesk.bench import load

CACHE = Path(os.environ.get("LLMDESK_BENCH_DIR", "/tmp/llmdesk-bench"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_file(args) -> Path:
    if args.model:
        return Path(args.model)
    path = CACHE / "tinyllama-1.1b-q4_k_m.gguf"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        print(f"writing {path} (llmdesk make-model, a few minutes) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "llmdesk.cli.main", "make-model", "--preset", "tinyllama-1.1b",
                        "--type", "q4_k_m", "-o", str(path)], check=True)
    return path


class Server:
    """A server process on a free port, stopped on exit."""

    def __init__(self, name: str, argv: list[str], port: int, ready_path: str):
        self.name, self.argv, self.port, self.ready_path = name, argv, port, ready_path
        self.url = f"http://127.0.0.1:{port}"
        CACHE.mkdir(parents=True, exist_ok=True)  # the servers' logs go here, with --model too
        self.log = open(CACHE / f"{name.replace(' ', '_').replace('/', '_')}.log", "w")

    def __enter__(self):
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {self.log.name}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} did not start")

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def llmdesk_server(path: Path, parallel: int, args) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "llmdesk.cli.main", "serve", "-m", str(path), "--port", str(port),
            "--parallel", str(parallel), "--ctx", str(args.ctx), "--threads", str(args.threads), "--keep-alive", "-1"]
    return Server(f"llmdesk --parallel {parallel}", argv, port, "/health")


def llama_cpp_server(path: Path, args) -> Server | str:
    missing = [m for m in ("sse_starlette", "starlette_context", "pydantic_settings")
               if subprocess.run([sys.executable, "-c", f"import {m}"], capture_output=True).returncode]
    if missing:
        return f"not installed: llama_cpp.server needs {', '.join(missing)} (pip install 'llama-cpp-python[server]')"
    port = free_port()
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--port", str(port), "--host", "127.0.0.1",
            "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads), "--n_ctx", str(args.ctx),
            "--model_alias", path.name,
            # by default a new request interrupts the stream in progress; queue them instead
            "--interrupt_requests", "False"]
    return Server("llama_cpp.server", argv, port, "/v1/models")


def decode_bound(path: Path, args, reps: int = 8) -> dict:
    """What batching can give on this machine at all: llama_decode of one token for each of
    1 and `streams` sequences, straight on llama.cpp (best of `reps`). A server's aggregate
    throughput with N streams cannot beat N x (time of a 1-token step) / (time of an N-token step)."""
    import llama_cpp as C

    from llmdesk.runtime.llama import LlamaModel, new_context

    model = LlamaModel(path)
    ctx = new_context(model, n_ctx=args.streams * 256, n_seq=args.streams, n_batch=512, n_threads=args.threads)
    batch = C.llama_batch_init(512, 0, 1)
    pos = [0] * args.streams
    out = {}
    try:
        for n in (1, args.streams):
            best = float("inf")
            for _ in range(reps):
                for i in range(n):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = 100 + i, pos[i], 1
                    batch.seq_id[i][0], batch.logits[i] = i, True
                    pos[i] += 1
                batch.n_tokens = n
                t = time.perf_counter()
                assert C.llama_decode(ctx, batch) == 0
                best = min(best, time.perf_counter() - t)
            out[n] = best
    finally:
        C.llama_batch_free(batch)
        C.llama_free(ctx)
        model.close()
    bound = args.streams * out[1] / out[args.streams]
    print(f"  llama_decode: 1 token {out[1] * 1000:.0f} ms, {args.streams} tokens {out[args.streams] * 1000:.0f} ms "
          f"-> batching can give at most {bound:.2f}x here", file=sys.stderr)
    return {"step_1_s": out[1], f"step_{args.streams}_s": out[args.streams], "max_batching_gain": bound}


def llama_cpp_serial(path: Path, args) -> dict:
    """Without llama_cpp.server's extra packages: the path its server takes, measured in-process.
    Its server runs one request at a time under a global lock through `Llama.create_completion`;
    here the same requests go through `Llama.create_completion` one after another, with no HTTP
    in the way (so this is, if anything, faster than its server)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=args.ctx, n_threads=args.threads, n_threads_batch=args.threads,
                verbose=False)
    rng = load.random.Random(1000)
    words = load._calibrate_words_for(llm, args.prompt_tokens)
    prompts = [load._prompt(rng, words) for _ in range(args.requests)]
    llm.create_completion("warm up", max_tokens=2)
    t0 = time.perf_counter()
    tokens = 0
    ttfts = []
    for prompt in prompts:
        t = time.perf_counter()
        first = None
        for chunk in llm.create_completion(prompt, max_tokens=args.max_tokens, temperature=0.8, stream=True):
            if first is None:
                first = time.perf_counter() - t
            tokens += 1
        ttfts.append(first)
    wall = time.perf_counter() - t0
    row = {"server": "llama-cpp-python Llama, serial (its server's path, no HTTP)", "tokens": tokens,
           "wall_s": wall, "tokens_per_second": tokens / wall, "ttft_p50_s": statistics.median(ttfts)}
    print(f"  {row['server']:28s} {row['tokens_per_second']:7.1f} tokens/s aggregate", file=sys.stderr)
    return row


def throughput(server: Server, args) -> dict:
    [r] = load.run(server.url, [args.streams], requests=args.requests, prompt_tokens=args.prompt_tokens,
                   max_tokens=args.max_tokens)
    row = {"server": server.name, **r.to_dict()}
    print(f"  {server.name:28s} {r.tokens_per_second:7.1f} tokens/s aggregate, "
          f"{(r.stream_tokens_per_second or 0):6.1f} per stream, TTFT p50 {(r.ttft_p50_s or 0):6.2f} s, "
          f"errors {r.errors}", file=sys.stderr)
    return row


def _stream_ttft(url: str, model: str, messages: list[dict], max_tokens: int) -> tuple[float, str, dict]:
    """(client-side time to first token, the answer, the server's timings) of one streamed chat."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True, "temperature": 0.7,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    t0 = time.perf_counter()
    ttft, text, timings = None, "", {}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=900) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            chunk = json.loads(line[5:])
            timings = chunk.get("timings") or timings
            for c in chunk.get("choices") or []:
                piece = (c.get("delta") or {}).get("content")
                if piece:
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    text += piece
    return ttft, text, timings


def follow_up_ttft(server: Server, args) -> dict:
    """A ~1,000-token conversation: TTFT of its first turn, then of the next turn."""
    model = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
    words = load.WORDS
    # earlier turns that add up to about --conversation-tokens tokens, by this model's tokenizer
    n_words = load._calibrate(server.url, model, {}, args.conversation_tokens)
    firsts, follows, rows = [], [], []
    for rep in range(args.reps):
        history = [{"role": "system", "content": f"Conversation {rep}. You answer questions about the text."}]
        for turn in range(4):
            chunk = " ".join(words[(rep * 7 + turn * 13 + i) % len(words)] for i in range(n_words // 4))
            history += [{"role": "user", "content": f"Part {turn}: {chunk}"},
                        {"role": "assistant", "content": f"Noted part {turn}."}]
        history.append({"role": "user", "content": "Summarise all parts."})
        _, answer, tm1 = _stream_ttft(server.url, model, history, args.answer_tokens)
        history += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And in one word?"}]
        _, _, tm2 = _stream_ttft(server.url, model, history, args.answer_tokens)
        # the server's own time to first token (queue + prompt): a random-weight model's first
        # tokens may be pieces of characters that show no text yet, which would blur a client clock
        t1, t2 = tm1["prompt_ms"] / 1000, tm2["prompt_ms"] / 1000
        firsts.append(t1)
        follows.append(t2)
        rows.append({"first_ttft_s": t1, "follow_up_ttft_s": t2, "first_prompt_tokens": tm1.get("prompt_n", 0) + tm1.get("cached_n", 0),
                     "first_cached": tm1.get("cached_n"), "follow_up_prompt_tokens": tm2.get("prompt_n", 0) + tm2.get("cached_n", 0),
                     "follow_up_cached": tm2.get("cached_n")})
        print(f"  conversation {rep}: first turn {rows[-1]['first_prompt_tokens']} tokens, TTFT {t1:.2f} s; "
              f"follow-up {rows[-1]['follow_up_prompt_tokens']} tokens ({tm2.get('cached_n')} cached), TTFT {t2:.3f} s",
              file=sys.stderr)
    first, follow = statistics.median(firsts), statistics.median(follows)
    return {"server": server.name, "first_ttft_s": first, "follow_up_ttft_s": follow, "ratio": first / follow,
            "runs": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="GGUF file (default: a TinyLlama-1.1B-shaped Q4_K_M made with llmdesk make-model)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--ctx", type=int, default=1024, help="context per request (llmdesk: per slot)")
    ap.add_argument("--streams", type=int, default=8, help="concurrent streams")
    ap.add_argument("--requests", type=int, default=8, help="requests per server and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--conversation-tokens", type=int, default=1000, help="tokens of history before the first timed turn")
    ap.add_argument("--answer-tokens", type=int, default=24)
    ap.add_argument("--reps", type=int, default=3, help="conversations for the follow-up TTFT")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    path = model_file(args)
    print(f"model {path} ({path.stat().st_size / 1e9:.2f} GB), {args.threads} threads, {args.streams} streams x "
          f"{args.requests} requests, {args.prompt_tokens} prompt + {args.max_tokens} generated tokens each",
          file=sys.stderr)
    results: dict = {"model": str(path), "threads": args.threads, "streams": args.streams, "requests": args.requests,
                     "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "throughput": []}
    if not args.skip_throughput:
        print("decode batch scaling on this machine:", file=sys.stderr)
        results["decode_bound"] = decode_bound(path, args)
        # the rounds interleave the servers, so a change in the machine's load hits them alike
        for rnd in range(args.rounds):
            print(f"throughput, round {rnd + 1} of {args.rounds}:", file=sys.stderr)
            for parallel in (8, 1):
                with llmdesk_server(path, parallel, args) as s:
                    results["throughput"].append({"round": rnd, **throughput(s, args)})
            peer = llama_cpp_server(path, args)
            if isinstance(peer, str):
                print(f"  llama_cpp.server: skipped ({peer}); measuring its path in-process instead", file=sys.stderr)
                results["llama_cpp_server_skipped"] = peer
                results["throughput"].append({"round": rnd, **llama_cpp_serial(path, args)})
            else:
                with peer as s:
                    results["throughput"].append({"round": rnd, **throughput(s, args)})
    print("follow-up turn of a ~1,000-token conversation:", file=sys.stderr)
    args.ctx = max(args.ctx, 2048)
    with llmdesk_server(path, 1, args) as s:
        results["follow_up"] = follow_up_ttft(s, args)

    print("\nresults (median over rounds)", file=sys.stderr)

    def tps(prefix: str) -> float | None:
        xs = [r["tokens_per_second"] for r in results["throughput"] if r["server"].startswith(prefix)]
        return statistics.median(xs) if xs else None

    p8, p1 = tps("llmdesk --parallel 8"), tps("llmdesk --parallel 1")
    peer = tps("llama_cpp.server") or tps("llama-cpp-python")
    if p8 and p1:
        results["ratio_parallel8_vs_parallel1"] = p8 / p1
        print(f"  --parallel 8 vs --parallel 1:      {p8 / p1:.2f}x aggregate tokens/s ({p8:.1f} vs {p1:.1f})",
              file=sys.stderr)
    if "decode_bound" in results:
        print(f"  (llama_decode allows at most {results['decode_bound']['max_batching_gain']:.2f}x from batching "
              f"{args.streams} streams on this machine)", file=sys.stderr)
    if p8 and peer:
        results["ratio_parallel8_vs_llama_cpp"] = p8 / peer
        print(f"  --parallel 8 vs llama-cpp-python:  {p8 / peer:.2f}x ({p8:.1f} vs {peer:.1f})", file=sys.stderr)
    fu = results["follow_up"]
    print(f"  follow-up turn TTFT:               {fu['ratio']:.1f}x faster ({fu['first_ttft_s']:.2f} s -> "
          f"{fu['follow_up_ttft_s']:.3f} s)", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k.startswith("ratio")} | {"follow_up_ratio": fu["ratio"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
