"""`llmdesk bench serve URL`: load-test an OpenAI-compatible server.

For each concurrency level, `requests` streamed completions are sent with at most `concurrency`
in flight at once. Each prompt is about `prompt_tokens` tokens long (calibrated against the
server's own count on an untimed warm-up request) and starts with different words, so no request
is served from another's prompt cache; each asks for `max_tokens` tokens (`ignore_eos`, where
the server honours it, makes every answer that long). Reported per level:

    tokens/s     all generated tokens / the level's wall time (the server's aggregate throughput)
    TTFT         time to the first generated text, p50/p95/p99
    latency      time to the whole answer, p50/p95/p99
    errors       failed requests (HTTP errors, dropped connections), with a sample message

    results = run("http://127.0.0.1:8080", [1, 8], requests=16, prompt_tokens=128, max_tokens=64)
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field

from ..errors import LlmdeskError

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact river model engine token memory speed cache light "
         "garden music letter window market station paper story water energy system answer question reason "
         "village morning summer winter doctor teacher student friend family history science language").split()


@dataclass
class RequestResult:
    ok: bool
    latency_s: float
    ttft_s: float | None = None
    tokens: int = 0
    prompt_tokens: int | None = None
    error: str | None = None


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    ok: int
    errors: int
    wall_s: float
    tokens: int
    tokens_per_second: float
    requests_per_second: float
    prompt_tokens: float | None
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    ttft_p99_s: float | None
    latency_p50_s: float | None
    latency_p95_s: float | None
    latency_p99_s: float | None
    stream_tokens_per_second: float | None  # the median request's own decode speed
    error_samples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between closest ranks."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def base_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _prompt(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, n_words)))


async def _one(client, url: str, model: str, prompt: str, max_tokens: int) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0.8,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    t0 = time.perf_counter()
    ttft = None
    pieces = 0
    usage = None
    done = False
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode("utf-8", "replace")
                try:
                    err = json.loads(text)["error"]
                    text = err.get("message", text) if isinstance(err, dict) else str(err)
                except (ValueError, KeyError, TypeError):
                    pass
                return RequestResult(False, time.perf_counter() - t0, error=f"HTTP {r.status_code}: {text[:200]}")
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    msg = chunk["error"].get("message") if isinstance(chunk["error"], dict) else chunk["error"]
                    return RequestResult(False, time.perf_counter() - t0, error=f"stream error: {msg}")
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    if choice.get("text"):
                        if ttft is None:
                            ttft = time.perf_counter() - t0
                        pieces += 1
    except Exception as e:  # noqa: BLE001 - any failure of one request is a counted error
        return RequestResult(False, time.perf_counter() - t0, error=f"{type(e).__name__}: {e}"[:200])
    if not done:  # the server closed the stream before its end (interrupted, crashed)
        return RequestResult(False, time.perf_counter() - t0, error=f"the stream ended early, after {pieces} pieces")
    tokens = usage.get("completion_tokens", pieces) if usage else pieces
    return RequestResult(True, time.perf_counter() - t0, ttft, tokens, usage.get("prompt_tokens") if usage else None)


async def _level(url: str, model: str, concurrency: int, requests: int, n_words: int, max_tokens: int,
                 headers: dict, seed: int, progress=None) -> LevelResult:
    import httpx

    rng = random.Random(seed)
    prompts = [_prompt(rng, n_words) for _ in range(requests)]
    results: list[RequestResult] = []
    todo = iter(prompts)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(900.0, connect=30.0), limits=limits) as client:
        async def worker():
            for prompt in todo:
                results.append(await _one(client, url, model, prompt, max_tokens))
                if progress:
                    progress(len(results), requests)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, requests))))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in ok)
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    lats = [r.latency_s for r in ok]
    speeds = [(r.tokens - 1) / (r.latency_s - r.ttft_s) for r in ok
              if r.ttft_s is not None and r.tokens > 1 and r.latency_s > r.ttft_s]
    prompt_counts = [r.prompt_tokens for r in ok if r.prompt_tokens]
    samples = sorted({r.error for r in results if r.error})[:3]
    return LevelResult(
        concurrency=concurrency, requests=requests, ok=len(ok), errors=len(results) - len(ok), wall_s=wall,
        tokens=tokens, tokens_per_second=tokens / wall if wall > 0 else 0.0,
        requests_per_second=len(ok) / wall if wall > 0 else 0.0,
        prompt_tokens=sum(prompt_counts) / len(prompt_counts) if prompt_counts else None,
        ttft_p50_s=percentile(ttfts, 50), ttft_p95_s=percentile(ttfts, 95), ttft_p99_s=percentile(ttfts, 99),
        latency_p50_s=percentile(lats, 50), latency_p95_s=percentile(lats, 95), latency_p99_s=percentile(lats, 99),
        stream_tokens_per_second=percentile(speeds, 50), error_samples=samples)


def _headers(api_key: str | None) -> dict:
    key = api_key or os.environ.get("LLMDESK_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _first_model(url: str, headers: dict) -> str:
    import httpx

    try:
        r = httpx.get(url + "/v1/models", headers=headers, timeout=30)
    except httpx.HTTPError as e:
        raise LlmdeskError(f"cannot reach {url} ({type(e).__name__}: {e}); is the server running?") from None
    if r.status_code == 401:
        raise LlmdeskError(f"{url} wants an API key: set LLMDESK_API_KEY")
    try:
        models = [m["id"] for m in r.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise LlmdeskError(f"{url}/v1/models did not answer like an OpenAI-compatible server (HTTP {r.status_code})") from None
    if not models:
        raise LlmdeskError(f"{url} serves no models")
    return models[0]


def _calibrate(url: str, model: str, headers: dict, prompt_tokens: int) -> int:
    """Words per prompt for about `prompt_tokens` tokens, from the server's count of a warm-up
    prompt (which also loads the model, untimed)."""
    import httpx

    for probe in (32, 4):  # a short one too, for a server with a small context
        text = _prompt(random.Random(12345), probe)
        try:
            r = httpx.post(url + "/v1/completions", headers=headers, timeout=900,
                           json={"model": model, "prompt": text, "max_tokens": 1})
            counted = r.json()["usage"]["prompt_tokens"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            continue
        return max(1, round(probe * prompt_tokens / max(counted, 1)))
    return prompt_tokens  # no count: about a token per word


def _calibrate_words_for(llm, prompt_tokens: int) -> int:
    """The same calibration, with a llama-cpp-python `Llama`'s tokenizer (for in-process peers)."""
    text = _prompt(random.Random(12345), 32)
    counted = len(llm.tokenize(text.encode()))
    return max(1, round(32 * prompt_tokens / max(counted, 1)))


def served_context(url: str, model: str, headers: dict) -> int | None:
    """Tokens per request the server holds `model` with, from the Ollama API's /api/ps (llmdesk
    serve and Ollama say it); None when the server does not."""
    import httpx

    try:
        r = httpx.get(url + "/api/ps", headers=headers, timeout=30)
        for m in r.json().get("models") or []:
            if model in (m.get("name"), m.get("model")) and isinstance(m.get("context_length"), int):
                return m["context_length"]
    except (httpx.HTTPError, ValueError, AttributeError, TypeError):
        pass
    return None


def run(url: str, concurrency: list[int], requests: int, prompt_tokens: int, max_tokens: int,
        api_key: str | None = None, model: str | None = None, progress=None,
        warn=None) -> list[LevelResult]:
    """Load-test the server at `url`; one LevelResult per concurrency level. `warn(text)` hears
    of settings the server cannot serve (a prompt and answer longer than its context)."""
    if requests < 1 or max_tokens < 1 or prompt_tokens < 1 or not concurrency or min(concurrency) < 1:
        raise LlmdeskError("requests, prompt tokens, max tokens and every concurrency must be at least 1")
    url = base_url(url)
    headers = _headers(api_key)
    model = model or _first_model(url, headers)
    n_words = _calibrate(url, model, headers, prompt_tokens)  # (which also loads the model)
    ctx = served_context(url, model, headers)
    if warn and ctx is not None and prompt_tokens >= ctx:
        warn(f"{model} is served with {ctx} tokens per request: prompts of ~{prompt_tokens} tokens will mostly "
             f"be refused; lower --prompt-tokens")
    elif warn and ctx is not None and prompt_tokens + max_tokens > ctx:
        warn(f"{model} is served with {ctx} tokens per request: answers will stop short of --max-tokens "
             f"{max_tokens} after a ~{prompt_tokens}-token prompt")
    out = []
    for i, c in enumerate(concurrency):
        report = (lambda done, total, c=c: progress(c, done, total)) if progress else None
        out.append(asyncio.run(_level(url, model, c, requests, n_words, max_tokens, headers, seed=1000 + i,
                                      progress=report)))
    return out


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


def main(url: str, concurrency: list[int], requests: int, prompt_tokens: int, max_tokens: int, json_out: bool,
         api_key: str | None = None, *, model: str | None = None) -> int:
    """The command: run the levels, print a table (or JSON); 0 when some requests succeeded."""
    from rich.console import Console
    from rich.table import Table

    out = Console(highlight=False, soft_wrap=True)
    if not out.is_terminal:  # piped into a file: the whole table, not squeezed to 80 columns
        out.width = 160
    err = Console(stderr=True, highlight=False)
    with err.status("warming up ...", spinner="dots") as status:
        def progress(c: int, done: int, total: int) -> None:
            status.update(f"concurrency {c}: {done}/{total} requests")

        results = run(url, concurrency, requests, prompt_tokens, max_tokens, api_key=api_key, model=model,
                      progress=progress, warn=lambda text: err.print(f"warning: {text}", markup=False))
    if json_out:
        out.print(json.dumps([r.to_dict() for r in results], indent=1), markup=False)
    else:
        t = Table(title=f"{base_url(url)} · {requests} requests per level · ~{prompt_tokens} prompt tokens · "
                        f"{max_tokens} max tokens · times in ms")
        for col in ("concurrency", "ok", "errors", "tokens/s", "req/s", "per stream tok/s", "TTFT p50", "p95", "p99",
                    "latency p50", "p95", "p99"):
            t.add_column(col, justify="right")
        for r in results:
            t.add_row(str(r.concurrency), str(r.ok), str(r.errors), f"{r.tokens_per_second:.1f}",
                      f"{r.requests_per_second:.2f}",
                      "-" if r.stream_tokens_per_second is None else f"{r.stream_tokens_per_second:.1f}",
                      _ms(r.ttft_p50_s), _ms(r.ttft_p95_s), _ms(r.ttft_p99_s),
                      _ms(r.latency_p50_s), _ms(r.latency_p95_s), _ms(r.latency_p99_s))
        out.print(t)
        for r in results:
            for e in r.error_samples:
                err.print(f"concurrency {r.concurrency}: {e}", markup=False)
    if not any(r.ok for r in results):
        first = next((e for r in results for e in r.error_samples), "no answer")
        raise LlmdeskError(f"every request failed: {first}")
    return 0
