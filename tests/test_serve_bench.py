"""`llmdesk bench serve URL`: the load generator, against a real server."""

from __future__ import annotations

import json

import pytest
from test_serve_util import running

from llmdesk.bench import load
from llmdesk.cli.main import main
from llmdesk.errors import LlmdeskError


def test_bench_serve_reports_each_level(tiny_gguf, capsys):
    with running(tiny_gguf, parallel=2, ctx=512) as s:
        code = main(["bench", "serve", s.url + "/v1", "--concurrency", "1,2", "--requests", "4",
                     "--prompt-tokens", "32", "--max-tokens", "8", "--json"])
        assert code == 0
        rows = json.loads(capsys.readouterr().out)
        assert [r["concurrency"] for r in rows] == [1, 2]
        for r in rows:
            assert r["ok"] == 4 and r["errors"] == 0 and r["tokens"] == 4 * 8
            assert r["tokens_per_second"] > 0 and r["ttft_p50_s"] <= r["latency_p50_s"] <= r["latency_p99_s"]
            assert 16 <= r["prompt_tokens"] <= 64  # calibrated on the server's own count
        # the table, for people
        assert main(["bench", "serve", s.url, "-c", "2", "--requests", "2", "--max-tokens", "4"]) == 0
        table = capsys.readouterr().out
        assert "tokens/s" in table and "TTFT" in table


def test_bench_serve_counts_errors(tiny_gguf):
    with running(tiny_gguf, parallel=1, max_queue=0, ctx=2048, api_key="bench-key-123") as s:
        with pytest.raises(LlmdeskError, match="API key"):
            load.run(s.url, [1], requests=1, prompt_tokens=8, max_tokens=4)
        [r] = load.run(s.url, [3], requests=6, prompt_tokens=8, max_tokens=300, api_key="bench-key-123")
        assert r.ok >= 1 and r.errors >= 1 and r.ok + r.errors == 6
        assert any("HTTP 429" in e for e in r.error_samples)
    with pytest.raises(LlmdeskError, match="cannot reach"):
        load.run(s.url, [1], requests=1, prompt_tokens=8, max_tokens=4)


def test_percentile():
    assert load.percentile([], 50) is None
    assert load.percentile([3, 1, 2], 50) == 2
    assert load.percentile([0, 10], 95) == pytest.approx(9.5)
    assert load.base_url("127.0.0.1:8080/v1/") == "http://127.0.0.1:8080"


def test_a_stream_cut_short_is_an_error():
    """A server that closes a stream before `data: [DONE]` (as llama_cpp.server does to a
    request it interrupts) must not count as a successful request."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"data": [{"id": "m"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(b'data: {"choices": [{"index": 0, "text": "hi"}]}\n\n')
            self.close_connection = True

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        [r] = load.run(f"http://127.0.0.1:{srv.server_address[1]}", [2], requests=2, prompt_tokens=4, max_tokens=4)
    finally:
        srv.shutdown()
    assert r.ok == 0 and r.errors == 2
    assert "ended early" in r.error_samples[0]


def test_settings_the_server_cannot_serve_are_warned_about(tiny_gguf):
    with running(tiny_gguf, parallel=1, ctx=64) as s:
        said = []
        [r] = load.run(s.url, [1], requests=2, prompt_tokens=80, max_tokens=4, warn=said.append)
        assert said and "64 tokens per request" in said[0] and "--prompt-tokens" in said[0]
        assert r.errors == 2 and "HTTP 400" in r.error_samples[0]
        said.clear()
        [r] = load.run(s.url, [1], requests=2, prompt_tokens=16, max_tokens=100, warn=said.append)
        assert said and "stop short of --max-tokens 100" in said[0] and r.ok == 2
        said.clear()
        load.run(s.url, [1], requests=1, prompt_tokens=16, max_tokens=8, warn=said.append)
        assert said == []
