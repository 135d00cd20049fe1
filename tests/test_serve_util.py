"""Helpers for the server tests (no tests here): a real server on 127.0.0.1 in a thread."""

from __future__ import annotations

import re
import time
from contextlib import contextmanager

import httpx

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
    """The sum of the series `name` whose labels include `labels`, read from /metrics."""
    text = httpx.get(url + "/metrics", headers=headers(key)).text
    total = 0.0
    for line in text.splitlines():
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(4))
    return total


LONG = {"max_tokens": 100000, "ignore_eos": True}  # runs until the context is full: cancelled by the tests
