"""Normal clients against `llmdesk serve`, without and then with attackers, side by side.

    .venv/bin/python benchmarks/serve_attack.py                     # the bundled demo model, 2 x 60 s
    .venv/bin/python benchmarks/serve_attack.py -m model.gguf --seconds 180 --clients 2 --attackers 4

The server runs as `make run` runs it (`llmdesk serve`, a child process). Phase 1: `--clients`
normal chat clients, each sending short requests one after another, for `--seconds`. Phase 2: the
same clients while `--attackers` clients send the hostile set of issue 10 in a loop: grammar
blow-ups (nested repetition in `pattern`, through response_format, Ollama's format and a forced
tool call), a schema with 900 optional properties, a 2**31-token penalty window, NaN and Infinity
settings, keep_alive "inf", num_ctx 1M, oversized stop lists, embedding floods, token-id
embeddings, pull with traversal in the revision, slowly sent headers and bodies, and bursts of
idle connections.

Reported: normal requests' p50/p95 latency in both phases and their ratio (target: p95 within
2x), normal requests that failed or hung (target: none), whether the server stayed up and kept
answering /health (target: yes), and the server's peak RSS (VmHWM): after loading, after the
normal phase and after the attacks, beside `llmdesk fit`'s estimate of the loaded model (the
server's /api/ps `size`). The estimate covers the model only, not Python and the web stack, so
the memory target (+10%) is read as: attacks add at most 10% to the peak of the same server
under normal load, and that peak is the process's own size plus the estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
HI = [{"role": "user", "content": "Hello"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------------------------------------
# the hostile set: each is a function of (url, model) that sends one attack and returns a label


def _json(url, path, body, timeout=30.0):
    r = httpx.post(url + path, json=body, timeout=timeout)
    return r.status_code


def _raw(url, path, text, timeout=30.0):
    r = httpx.post(url + path, content=text.encode(), headers={"content-type": "application/json"}, timeout=timeout)
    return r.status_code


def grammar_pattern(url, model):
    n = random.choice([40, 60, 200, 1000])
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": f"^([a-z]*){{0,{n}}}$"}},
              "required": ["a"]}
    way = random.choice(["openai", "ollama", "tool"])
    if way == "openai":
        return _json(url, "/v1/chat/completions", {"model": model, "messages": HI, "max_tokens": 8, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
    if way == "ollama":
        return _json(url, "/api/chat", {"model": model, "messages": HI, "stream": False, "format": schema,
                                        "options": {"num_predict": 8}})
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    return _json(url, "/v1/chat/completions", {"model": model, "messages": HI, "max_tokens": 8, "tools": [tool],
                                               "tool_choice": "required"})


def many_optional_properties(url, model):
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(900)}}
    return _json(url, "/v1/chat/completions", {"model": model, "messages": HI, "max_tokens": 4, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})


def penalty_window(url, model):
    return _json(url, "/api/chat", {"model": model, "messages": HI, "stream": False, "options": {
        "repeat_last_n": 2**31 - 1, "repeat_penalty": 1.2, "num_predict": 8}})


def nan_settings(url, model):
    key = random.choice(["temperature", "repeat_penalty", "presence_penalty", "top_p"])
    val = random.choice(["NaN", "Infinity", "-Infinity"])
    return _raw(url, "/api/chat", f'{{"model": "{model}", "messages": {json.dumps(HI)}, "stream": false, '
                                  f'"options": {{"{key}": {val}}}}}')


def keep_alive_inf(url, model):
    return _json(url, "/api/generate", {"model": model, "prompt": "x", "stream": False, "keep_alive": "inf"})


def huge_num_ctx(url, model):
    return _json(url, "/api/generate", {"model": model, "prompt": "x", "stream": False,
                                        "options": {"num_ctx": 1 << 20}})


def long_stops(url, model):
    return _json(url, "/api/chat", {"model": model, "messages": HI, "stream": False,
                                    "options": {"stop": ["x" * 10000] * 1000}})


def embedding_flood(url, model):
    return _json(url, "/v1/embeddings", {"model": model, "input": ["word " * 100] * 16}, timeout=120)


def token_embeddings(url, model):
    return _json(url, "/v1/embeddings", {"model": model, "input": [[1] * 64, [2] * 64]})


def pull_traversal(url, model):
    return _json(url, "/api/pull", {"model": "hf:a/b/m.gguf@../../../../tmp", "stream": False})


def slow_headers(url, model):
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    try:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        for _ in range(30):  # one header byte a second, never finished
            time.sleep(1)
            s.sendall(b"X")
    except OSError:
        return "cut"
    finally:
        s.close()
    return "held"


def slow_body(url, model):
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    try:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000\r\n\r\n{")
        s.settimeout(60)
        data = s.recv(100)
        return "cut" if not data or b"408" in data else data[:20].decode("latin-1")
    except OSError:
        return "cut"
    finally:
        s.close()


def idle_connections(url, model):
    host, port = url.removeprefix("http://").split(":")
    socks = []
    try:
        for _ in range(200):
            socks.append(socket.create_connection((host, int(port))))
        time.sleep(5)
    except OSError:
        pass
    finally:
        for s in socks:
            s.close()
    return "burst"


ATTACKS = [grammar_pattern, many_optional_properties, penalty_window, nan_settings, keep_alive_inf, huge_num_ctx,
           long_stops, embedding_flood, token_embeddings, pull_traversal, slow_headers, slow_body, idle_connections]


# ---------------------------------------------------------------------------------------------


def normal_client(url, model, stop: threading.Event, out: list, failures: list, max_tokens: int):
    client = httpx.Client(timeout=120)
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            r = client.post(url + "/v1/chat/completions", json={"model": model, "messages": HI,
                                                                "max_tokens": max_tokens, "temperature": 0})
            if r.status_code == 200:
                out.append(time.perf_counter() - t0)
            else:
                failures.append(f"HTTP {r.status_code}: {r.text[:100]}")
        except httpx.HTTPError as e:
            failures.append(f"{type(e).__name__}: {e}")


def attacker(url, model, stop: threading.Event, counts: dict, errors: list):
    rnd = random.Random(threading.get_ident())
    while not stop.is_set():
        attack = rnd.choice(ATTACKS)
        try:
            result = attack(url, model)
        except httpx.HTTPError as e:
            result = type(e).__name__
        except Exception as e:  # a bug in the attack itself: show it, go on
            errors.append(f"{attack.__name__}: {type(e).__name__}: {e}")
            result = "bug"
        key = f"{attack.__name__} -> {result}"
        counts[key] = counts.get(key, 0) + 1


def phase(url, model, seconds, clients, attackers, max_tokens):
    stop = threading.Event()
    lat, fail, counts, errors = [], [], {}, []
    health_fail = [0]

    def health():
        while not stop.is_set():
            try:
                httpx.get(url + "/health", timeout=10).raise_for_status()
            except httpx.HTTPError:
                health_fail[0] += 1
            time.sleep(1)

    threads = [threading.Thread(target=normal_client, args=(url, model, stop, lat, fail, max_tokens))
               for _ in range(clients)]
    threads += [threading.Thread(target=attacker, args=(url, model, stop, counts, errors)) for _ in range(attackers)]
    threads.append(threading.Thread(target=health))
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    hung = 0
    for t in threads:
        t.join(timeout=180)
        hung += t.is_alive()
    return lat, fail, counts, errors, health_fail[0], hung


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", help="a .gguf or store name (default: the bundled demo model)")
    ap.add_argument("--seconds", type=float, default=60.0, help="length of each phase")
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--attackers", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads for the server")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(Path(sys.executable).parent / "llmdesk"), "serve", "--port", str(port), "--parallel", "2"]
    if args.model:
        cmd += ["-m", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "LLMDESK_LOG": "warning"}
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(url + "/health", timeout=2).raise_for_status()
                break
            except httpx.HTTPError:
                if server.poll() is not None or time.monotonic() > deadline:
                    print("the server did not start:", server.stderr.read()[-2000:], file=sys.stderr)
                    return 1
                time.sleep(0.2)
        ps = httpx.get(url + "/api/ps").json()["models"]
        model = ps[0]["name"]
        estimate = ps[0]["size"]
        print(f"server pid {server.pid} serving {model}; fit's estimate of the loaded model {estimate / 1e6:.1f} MB",
              file=sys.stderr)
        print(f"phase 1: {args.clients} normal clients, {args.seconds:.0f} s", file=sys.stderr)
        rss_loaded = peak_rss(server.pid)
        base = phase(url, model, args.seconds, args.clients, 0, args.max_tokens)
        rss_base = peak_rss(server.pid)
        print(f"phase 2: the same with {args.attackers} attackers, {args.seconds:.0f} s", file=sys.stderr)
        att = phase(url, model, args.seconds, args.clients, args.attackers, args.max_tokens)
        alive = server.poll() is None
        rss = peak_rss(server.pid) if alive else 0
        answering = False
        if alive:
            try:
                answering = httpx.post(url + "/v1/chat/completions", timeout=60, json={
                    "model": model, "messages": HI, "max_tokens": 2}).status_code == 200
            except httpx.HTTPError:
                pass
    finally:
        t0 = time.monotonic()
        server.terminate()
        try:
            server.wait(timeout=30)
            stop_s = time.monotonic() - t0
        except subprocess.TimeoutExpired:
            server.kill()
            stop_s = float("inf")

    b_lat, b_fail, _, _, b_health, b_hung = base
    a_lat, a_fail, counts, errors, a_health, a_hung = att
    report = {
        "model": model, "seconds_per_phase": args.seconds, "clients": args.clients, "attackers": args.attackers,
        "baseline": {"n": len(b_lat), "p50_s": pct(b_lat, 0.5), "p95_s": pct(b_lat, 0.95), "failed": len(b_fail),
                     "health_failures": b_health, "hung_threads": b_hung},
        "attacked": {"n": len(a_lat), "p50_s": pct(a_lat, 0.5), "p95_s": pct(a_lat, 0.95), "failed": len(a_fail),
                     "health_failures": a_health, "hung_threads": a_hung, "attacks_sent": sum(counts.values())},
        "p95_ratio": pct(a_lat, 0.95) / pct(b_lat, 0.95) if b_lat and a_lat else float("nan"),
        "p50_ratio": pct(a_lat, 0.5) / pct(b_lat, 0.5) if b_lat and a_lat else float("nan"),
        "server_alive": alive, "answering_after": answering, "stop_seconds_after_sigterm": stop_s,
        "peak_rss_bytes": {"loaded": rss_loaded, "baseline": rss_base, "attacked": rss},
        "estimate_bytes": estimate, "rss_attacked_over_baseline": rss / rss_base if rss_base else None,
        "attack_outcomes": dict(sorted(counts.items())), "failures": (b_fail + a_fail)[:10], "attack_bugs": errors[:10],
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"\nnormal requests ({args.clients} clients, {args.max_tokens} tokens each), {model}")
    print(f"{'':12} {'n':>6} {'p50 s':>8} {'p95 s':>8} {'failed':>7}")
    for name, r in (("baseline", report["baseline"]), ("attacked", report["attacked"])):
        print(f"{name:12} {r['n']:>6} {r['p50_s']:>8.3f} {r['p95_s']:>8.3f} {r['failed']:>7}")
    print(f"p95 attacked / baseline: {report['p95_ratio']:.2f}x (target <= 2x); p50: {report['p50_ratio']:.2f}x")
    print(f"attacks sent: {report['attacked']['attacks_sent']}; /health failures: {a_health}; hung threads: {a_hung}")
    print(f"server alive: {alive}; answering after: {answering}; stopped {stop_s:.1f} s after SIGTERM")
    # the estimate is the model's memory; the process also holds Python, the web stack and buffers,
    # so the peak under attack is compared with the peak of the same server under normal load
    print(f"peak RSS: {rss_loaded / 1e6:.1f} MB loaded, {rss_base / 1e6:.1f} MB after normal load, "
          f"{rss / 1e6:.1f} MB after attacks: {(rss / rss_base if rss_base else 0):.2f}x (target <= 1.10x); "
          f"fit's estimate of the model {estimate / 1e6:.1f} MB")
    print("outcomes:")
    for k, v in report["attack_outcomes"].items():
        print(f"  {v:5d}  {k}")
    for f in report["failures"]:
        print("  failure:", f)
    for e in report["attack_bugs"]:
        print("  attack bug:", e)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
