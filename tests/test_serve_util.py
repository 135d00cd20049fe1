"""Helpers for the server tests (no tests here): a real server on 127.0.0.1 in a thread."""

from __future__ import annotations

import time
from contextlib import contextmanager

import httpx
from prometheus_client.parser import text_string_to_metric_families

from llmdesk.serve import BackgroundServer, ServeConfig, create_app


def start_server(model_path, **kw) -> BackgroundServer:
    """A server for `model_path` on a free port. One llama.cpp thread: on a busy 2-core machine
    that is steadier than two threads spinning against other processes."""
    kw.setdefault("parallel", 2)
    kw.setdefault("ctx", 2048)
    kw.setdefault("threads", 1)
    models = kw.pop("models", [str(model_path)] if model_path else [])
    return BackgroundServer(create_app(ServeConfig(models=models, **kw))).start()


@contextmanager
def running(model_path, **kw):
    server = start_server(model_path, **kw)
    try:
        yield server
    finally:
        server.stop()


def wait_until(check, timeout: float = 30.0, interval: float = 0.05):
    """Poll `check()` until it returns something truthy; that value, or AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout} s: {check}")
        time.sleep(interval)


def headers(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


def busy_slots(url: str, key: str | None = None) -> int:
    data = httpx.get(url + "/slots", headers=headers(key)).json()
    return sum(m["busy"] + m["waiting"] for m in data["models"])


def metric(url: str, name: str, key: str | None = None, **labels) -> float:
    """The sum of the samples `name` whose labels include `labels`, read from /metrics with
    prometheus_client's parser (a page it cannot parse fails the test). `name` is a sample's name
    as the page writes it (`llmdesk_rejected_total`, `..._bucket`); a name that no family on the
    page can hold fails too, rather than reading as 0."""
    r = httpx.get(url + "/metrics", headers=headers(key))
    assert r.status_code == 200, f"/metrics answered {r.status_code}: {r.text[:200]}"
    families = list(text_string_to_metric_families(r.text))
    names = {f.name + suffix for f in families for suffix in ("", "_total", "_bucket", "_sum", "_count")}
    assert name in names, f"no metric family on /metrics holds {name!r}; the families: {sorted(f.name for f in families)}"
    return sum((s.value for f in families for s in f.samples
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())), 0.0)


LONG = {"max_tokens": 100000, "ignore_eos": True}  # runs until the context is full: cancelled by the tests
