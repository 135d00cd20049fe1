"""Operations and safety: keys, CORS, body limits, the bounded queue, disconnects, metrics, the
access log, memory checks, and hostile requests while others are being served."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import ollama
import openai
import pytest
from conftest import llmdesk_exe
from test_serve_util import LONG, busy_slots, metric, running, wait_until

from llmdesk.errors import LlmdeskError
from llmdesk.formats.synth import SynthConfig, write_llama_gguf
from llmdesk.serve import ServeConfig, create_app
from llmdesk.serve.config import parse_duration, parse_size
from llmdesk.serve.errors import APIError

HI = [{"role": "user", "content": "Hello"}]
KEY = "s3cret-key-for-tests"


def test_config_checks():
    with pytest.raises(LlmdeskError, match="--api-key"):
        ServeConfig(host="0.0.0.0").check()
    ServeConfig(host="0.0.0.0", api_key=KEY).check()
    ServeConfig(host="0.0.0.0", insecure=True).check()
    with pytest.raises(LlmdeskError, match="at least 8"):
        ServeConfig(api_key="short").check()
    assert parse_duration("5m") == 300 and parse_duration("1h30m") == 5400 and parse_duration("-1") == -1
    assert parse_duration(0) == 0 and parse_duration("90s") == 90 and parse_duration("1.5m") == 90
    with pytest.raises(LlmdeskError):
        parse_duration("soon")
    assert parse_size("8MiB", "x") == 8 * 1024 * 1024 and parse_size("2GB", "x") == 2 * 10**9


def test_api_key_cors_and_host(tiny_gguf):
    with running(tiny_gguf, api_key=KEY) as s:
        assert httpx.get(s.url + "/health").json() == {"status": "ok"}
        assert httpx.get(s.url + "/").status_code == 200  # the web chat's page itself; it asks for the key
        for method, path in (("GET", "/v1/models"), ("GET", "/api/tags"), ("GET", "/metrics"), ("GET", "/slots"),
                             ("POST", "/v1/chat/completions"), ("POST", "/api/chat"), ("DELETE", "/api/delete")):
            r = httpx.request(method, s.url + path, json={})
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"] == "Bearer"
        r = httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer wrong-key-xxxxx"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert "error" in httpx.get(s.url + "/api/tags").json()  # Ollama's error shape on Ollama routes
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0)
        assert good.chat.completions.create(model="tiny.gguf", messages=HI, max_tokens=2).choices
        assert ollama.Client(host=s.url, headers={"Authorization": f"Bearer {KEY}"}).list().models
        # no CORS unless asked: a browser page elsewhere gets no permission
        r = httpx.options(s.url + "/v1/models", headers={"Origin": "http://evil.example",
                                                         "Access-Control-Request-Method": "GET"})
        assert "access-control-allow-origin" not in r.headers
        # a local server answers only to local names (no DNS rebinding)
        r = httpx.get(s.url + "/health", headers={"Host": "evil.example:8080"})
        assert r.status_code == 403
        # JSON must be declared: a cross-site form post (text/plain) cannot drive the server
        r = httpx.post(s.url + "/api/generate", content=b'{"model": "tiny.gguf", "prompt": "hi"}',
                       headers={"content-type": "text/plain", "Authorization": f"Bearer {KEY}"})
        assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]
    with running(tiny_gguf, cors_origins=["http://app.example"]) as s:
        r = httpx.options(s.url + "/v1/chat/completions", headers={
            "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        r = httpx.get(s.url + "/v1/models", headers={"Origin": "http://app.example"})
        assert r.headers["access-control-allow-origin"] == "http://app.example"


def test_body_limit(tiny_gguf):
    with running(tiny_gguf, max_body_bytes=4096) as s:
        big = {"model": "tiny.gguf", "messages": [{"role": "user", "content": "x" * 10000}]}
        r = httpx.post(s.url + "/v1/chat/completions", json=big)
        assert r.status_code == 413 and "4096" in r.json()["error"]["message"]

        def chunks():  # no Content-Length: the limit is counted while reading
            for _ in range(10):
                yield b" " * 1000
        r = httpx.post(s.url + "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        r = httpx.post(s.url + "/api/chat", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "limit" in r.json()["error"]
        assert httpx.post(s.url + "/v1/chat/completions", json={"model": "tiny.gguf", "messages": HI,
                                                                "max_tokens": 1}).status_code == 200


def test_queue_full_gets_429_and_disconnect_frees_the_slot(tiny_gguf):
    with running(tiny_gguf, parallel=1, max_queue=1, ctx=4096) as s:
        body = {"model": "tiny.gguf", "messages": HI, "stream": True, **LONG}
        with httpx.Client(timeout=60) as c1, httpx.Client(timeout=60) as c2:
            with c1.stream("POST", s.url + "/v1/chat/completions", json=body) as first:
                lines = first.iter_lines()
                assert next(lines).startswith("data:")  # it runs: the slot is taken
                with c2.stream("POST", s.url + "/v1/chat/completions", json=body) as second:  # it waits
                    wait_until(lambda: httpx.get(s.url + "/slots").json()["models"][0]["waiting"] == 1)
                    r = httpx.post(s.url + "/v1/chat/completions", json=body)
                    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
                    assert int(r.headers["retry-after"]) >= 1
                    with pytest.raises(openai.RateLimitError):
                        openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
                            model="tiny.gguf", messages=HI)
                    assert second.status_code == 200
                # the waiting client left before it got a slot; the first one leaves mid-answer
            assert metric(s.url, "llmdesk_rejected_total", reason="queue_full") == 2
        # both closed their connections: both generations are cancelled, the slot is free at once
        wait_until(lambda: busy_slots(s.url) == 0, timeout=20)
        wait_until(lambda: metric(s.url, "llmdesk_generations_total", finish_reason="cancelled") == 2, timeout=20)
        assert httpx.get(s.url + "/slots").json()["models"][0]["in_flight"] == 0
        # and the server goes on serving
        r = httpx.post(s.url + "/v1/chat/completions", json={"model": "tiny.gguf", "messages": HI, "max_tokens": 3})
        assert r.status_code == 200


def test_non_streamed_client_that_gives_up_frees_its_slot(tiny_gguf):
    with running(tiny_gguf, parallel=1, ctx=4096) as s:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/completions", json={"model": "tiny.gguf", "prompt": "hi", **LONG}, timeout=1.5)
        wait_until(lambda: metric(s.url, "llmdesk_generations_total", finish_reason="cancelled") == 1, timeout=20)
        assert busy_slots(s.url) == 0


def test_metrics_and_access_log(tiny_gguf, caplog):
    caplog.set_level(logging.INFO, logger="llmdesk.access")
    with running(tiny_gguf) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(model="tiny.gguf", messages=HI, max_tokens=5, extra_body={"ignore_eos": True})
        httpx.get(s.url + "/v1/nothing-here")
        text = httpx.get(s.url + "/metrics")
        assert text.headers["content-type"].startswith("text/plain; version=0.0.4")
        lines = text.text.splitlines()
        for line in lines:  # every line is a comment or `name{labels} value`
            assert line.startswith("# ") or re.fullmatch(r'[a-z_]+(\{[^}]*\})? [-+0-9.eInf]+', line), line
        assert metric(s.url, "llmdesk_generated_tokens_total", model="tiny.gguf") == 5
        assert metric(s.url, "llmdesk_prompt_tokens_total", model="tiny.gguf") == r.usage.prompt_tokens
        assert metric(s.url, "llmdesk_http_requests_total", route="/v1/chat/completions", status="200") == 1
        assert metric(s.url, "llmdesk_http_requests_total", status="404") == 1
        assert metric(s.url, "llmdesk_time_to_first_token_seconds_count", model="tiny.gguf") == 1
        assert metric(s.url, "llmdesk_time_to_first_token_seconds_bucket", model="tiny.gguf", le="+Inf") == 1
        assert metric(s.url, "llmdesk_tokens_per_second_count") == 1
        assert metric(s.url, "llmdesk_slots_total", model="tiny.gguf") == 2
        assert metric(s.url, "llmdesk_slots_busy", model="tiny.gguf") == 0
        assert metric(s.url, "llmdesk_queue_depth", model="tiny.gguf") == 0
    logged = [r.getMessage() for r in caplog.records if r.name == "llmdesk.access"]
    chat = [m for m in logged if "POST /v1/chat/completions" in m]
    assert len(chat) == 1 and " 200 " in chat[0] and "model=tiny.gguf" in chat[0] and "gen=5" in chat[0]
    assert any('"GET /v1/nothing-here HTTP/1.1" 404' in m for m in logged)
    assert len([m for m in logged if "GET /metrics" in m]) >= 1


def test_keep_alive_unloads_idle_models(tiny_gguf):
    with running(tiny_gguf, keep_alive=3) as s:
        assert [m["model"] for m in httpx.get(s.url + "/slots").json()["models"]] == ["tiny.gguf"]
        wait_until(lambda: httpx.get(s.url + "/api/ps").json()["models"] == [], timeout=20)
        # loaded again on the next request, and unloaded again after it
        r = httpx.post(s.url + "/api/generate", json={"model": "tiny.gguf", "prompt": "hi", "stream": False,
                                                      "options": {"num_predict": 2}})
        assert r.status_code == 200
        wait_until(lambda: httpx.get(s.url + "/api/ps").json()["models"] == [], timeout=20)
        assert metric(s.url, "llmdesk_model_unloads_total", reason="keep_alive") == 2


def test_a_model_that_would_not_fit_is_refused(tiny_gguf, tmp_path):
    big = write_llama_gguf(tmp_path / "big.gguf", SynthConfig(n_layer=4, n_embd=256, n_head=4, n_ff=512))
    # at 2 x 4096 tokens llmdesk fit gives the tiny model about 27 MB with its buffers and
    # embeddings context, the big one 66 MB: room for either, not for both at once
    with running(None, models=[str(tiny_gguf), str(big)], max_memory=80_000_000, ctx=4096) as s:
        with pytest.raises(LlmdeskError, match="would not fit"):  # also refused before a server starts
            create_app(ServeConfig(models=[str(big)], max_memory=1_000_000, threads=1))
        with httpx.Client(timeout=60) as c, c.stream("POST", s.url + "/v1/chat/completions", json={
                "model": "tiny.gguf", "messages": HI, "stream": True, **LONG}) as busy:
            lines = busy.iter_lines()  # (dropping this iterator would close the connection)
            next(lines)
            r = httpx.post(s.url + "/v1/chat/completions", json={"model": "big.gguf", "messages": HI})
            assert r.status_code == 503 and r.json()["error"]["code"] == "insufficient_memory"
            assert "would not fit" in r.json()["error"]["message"] and "tiny.gguf" in r.json()["error"]["message"]
        # once the tiny model is idle it is unloaded to make room
        wait_until(lambda: busy_slots(s.url) == 0)
        r = httpx.post(s.url + "/v1/chat/completions", json={"model": "big.gguf", "messages": HI, "max_tokens": 2})
        assert r.status_code == 200
        assert [m["model"] for m in httpx.get(s.url + "/api/ps").json()["models"]] == ["big.gguf"]
        assert metric(s.url, "llmdesk_model_unloads_total", reason="memory") == 1


HOSTILE = [
    # (what, method, path, kwargs, expected status)
    ("bad json", "POST", "/v1/chat/completions", {"content": b"{nope", "headers": {"content-type": "application/json"}}, 400),
    ("not an object", "POST", "/v1/chat/completions", {"json": [1, 2, 3]}, 400),
    ("wrong type", "POST", "/v1/chat/completions", {"json": {"model": "tiny.gguf", "messages": "hi"}}, 400),
    ("string number", "POST", "/v1/chat/completions", {"json": {"model": "tiny.gguf", "messages": HI, "max_tokens": "9"}}, 400),
    ("huge n", "POST", "/v1/chat/completions", {"json": {"model": "tiny.gguf", "messages": HI, "n": 100000}}, 400),
    ("negative max_tokens", "POST", "/v1/completions", {"json": {"model": "tiny.gguf", "prompt": "x", "max_tokens": -5}}, 400),
    ("nan temperature", "POST", "/v1/chat/completions", {"content": b'{"model": "tiny.gguf", "messages": [], "temperature": NaN}',
                                                          "headers": {"content-type": "application/json"}}, 400),
    ("unknown model", "POST", "/v1/chat/completions", {"json": {"model": "../../etc/passwd", "messages": HI}}, 404),
    ("path as model", "POST", "/api/generate", {"json": {"model": "/etc/passwd", "prompt": "hi"}}, 404),
    ("bad role", "POST", "/v1/chat/completions", {"json": {"model": "tiny.gguf", "messages": [{"role": "root", "content": "x"}]}}, 400),
    ("image part", "POST", "/v1/chat/completions", {"json": {"model": "tiny.gguf", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}}, 400),
    ("giant body", "POST", "/v1/chat/completions", {"content": b"[" * (9 * 1024 * 1024), "headers": {"content-type": "application/json"}}, 413),
    ("deep nesting", "POST", "/v1/chat/completions", {"content": b"[" * 100000 + b"]" * 100000, "headers": {"content-type": "application/json"}}, 400),
    ("too many stops", "POST", "/v1/chat/completions", {"json": {"model": "tiny.gguf", "messages": HI, "stop": ["a"] * 100}}, 400),
    ("schema bomb", "POST", "/v1/chat/completions", {"json": {"model": "tiny.gguf", "messages": HI, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "maxLength": 10**9}}}}}, 400),
    ("pattern bomb", "POST", "/api/chat", {"json": {"model": "tiny.gguf", "messages": HI, "format": {
        "type": "string", "pattern": "a{999999999}"}}}, 400),
    ("remote ref", "POST", "/api/chat", {"json": {"model": "tiny.gguf", "messages": HI, "format": {"$ref": "http://x/s.json"}}}, 400),
    ("bad tool", "POST", "/v1/chat/completions", {"json": {"model": "tiny.gguf", "messages": HI, "tools": [{"type": "function"}]}}, 400),
    ("logit_bias", "POST", "/v1/chat/completions", {"json": {"model": "tiny.gguf", "messages": HI, "logit_bias": {"1": 5}}}, 400),
    ("bad token ids", "POST", "/v1/completions", {"json": {"model": "tiny.gguf", "prompt": [10**9]}}, 400),
    ("bad keep_alive", "POST", "/api/generate", {"json": {"model": "tiny.gguf", "prompt": "hi", "keep_alive": "forever"}}, 400),
    ("negative num_predict", "POST", "/api/generate", {"json": {"model": "tiny.gguf", "prompt": "hi", "options": {"num_predict": -9}}}, 400),
    ("too long prompt", "POST", "/v1/completions", {"json": {"model": "tiny.gguf", "prompt": "word " * 5000}}, 400),
    ("wrong method", "GET", "/v1/chat/completions", {}, 405),
    ("no route", "POST", "/v1/assistants", {"json": {}}, 404),
]


def test_hostile_requests_get_proper_errors_while_others_are_served(tiny_gguf):
    with running(tiny_gguf, parallel=2, ctx=1024) as s:
        stop = threading.Event()
        served = []

        def good_traffic():
            c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
            while not stop.is_set():
                r = c.chat.completions.create(model="tiny.gguf", messages=HI, max_tokens=8)
                served.append(r.choices[0].finish_reason)

        def hostile(case):
            what, method, path, kw, status = case
            try:
                r = httpx.request(method, s.url + path, timeout=60, **kw)
            except httpx.HTTPError as e:  # the server may close a connection it refused to read
                return what, type(e).__name__, None
            return what, r.status_code, r

        with ThreadPoolExecutor(8) as pool:
            traffic = [pool.submit(good_traffic) for _ in range(2)]
            wait_until(lambda: len(served) >= 2)
            results = list(pool.map(hostile, HOSTILE * 2))
            n_before = len(served)
            wait_until(lambda: len(served) >= n_before + 2)
            stop.set()
            for t in traffic:
                t.result()
        for (what, status, r), case in zip(results, HOSTILE * 2):
            assert status == case[4], (what, status, r.text if r is not None else "")
            body = r.json()
            if case[2].startswith("/api/"):
                assert isinstance(body["error"], str) and body["error"], what
            else:
                assert body["error"]["message"] and body["error"]["type"], what
        assert all(f in ("stop", "length") for f in served)
        assert busy_slots(s.url) == 0
        # malformed HTTP itself is refused by the HTTP parser
        import socket

        with socket.create_connection(("127.0.0.1", s.port)) as sock:
            sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n{}")
            assert sock.recv(100).startswith(b"HTTP/1.1 400")


def test_error_shapes_unit():
    e = APIError(429, "busy", code="queue_full", headers={"Retry-After": "3"})
    assert e.type == "rate_limit_error" and e.headers["Retry-After"] == "3"
    assert json.loads(json.dumps({"x": e.message})) == {"x": "busy"}


@pytest.mark.slow
def test_cli_serve_end_to_end(tiny_gguf, tmp_path):
    """`llmdesk serve` as a user runs it: prints the URLs, answers, stops on Ctrl-C."""
    import os
    import signal
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([llmdesk_exe(), "serve", "-m", str(tiny_gguf), "--port",
                             str(port), "--parallel", "2", "--ctx", "512", "--threads", "1"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "LLMDESK_HOME": str(tmp_path)})
    try:
        banner = ""
        while "Ctrl-C" not in banner:
            line = proc.stderr.readline()
            assert line, banner
            banner += line
        assert f"web chat:    http://127.0.0.1:{port}/" in banner
        wait_until(lambda: _ok(f"http://127.0.0.1:{port}/health"), timeout=30)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                       json={"model": "tiny.gguf", "messages": HI, "max_tokens": 3})
        assert r.status_code == 200
        deadline = time.monotonic() + 10
        access = ""
        while "POST /v1/chat/completions" not in access and time.monotonic() < deadline:
            access += proc.stderr.readline()
        assert '"POST /v1/chat/completions HTTP/1.1" 200' in access
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    refused = subprocess.run([llmdesk_exe(), "serve", "-m", str(tiny_gguf), "--host",
                              "0.0.0.0"], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "LLMDESK_HOME": str(tmp_path)})
    assert refused.returncode == 1 and "--api-key" in refused.stderr and "Traceback" not in refused.stderr


def _ok(url: str) -> bool:
    try:
        return httpx.get(url).status_code == 200
    except httpx.HTTPError:
        return False


def test_log_prompts_only_when_asked(tiny_gguf):
    from llmdesk.store.logs import recent

    body = {"model": "tiny.gguf", "messages": [{"role": "system", "content": "Be brief."}, *HI], "max_tokens": 3}
    with running(tiny_gguf) as s:
        assert httpx.post(s.url + "/v1/chat/completions", json=body).status_code == 200
    assert recent() == []
    with running(tiny_gguf, log_prompts=True) as s:
        assert httpx.post(s.url + "/v1/chat/completions", json=body).status_code == 200
        with httpx.stream("POST", s.url + "/api/chat", json={"model": "tiny.gguf", "messages": HI,
                                                            "options": {"num_predict": 2}}) as r:
            r.read()
    rows = recent()
    assert [(r["prompt"], r["model"]) for r in rows] == [("Hello", "tiny.gguf")] * 2
    assert rows[1]["system"] == "Be brief." and rows[1]["tokens_out"] >= 1


def test_gpu_layers_reach_the_loaded_model(tiny_gguf):
    """--gpu-layers goes to llama.cpp's loader for every model the server loads (this build has no
    GPU backend, so the layers stay on the CPU and the RAM check still applies)."""
    import asyncio

    app = create_app(ServeConfig(models=[str(tiny_gguf)], gpu_layers=999, threads=1, ctx=256))
    manager = app.state.llmdesk.models
    try:
        [lm] = manager.loaded.values()
        assert lm.model.llama.n_gpu_layers == 999
    finally:
        asyncio.run(manager.close())
