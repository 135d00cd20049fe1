"""Counters, gauges and histograms for `/metrics`, in Prometheus' text format (version 0.0.4).

Small and dependency-free: a dict of series under one lock. Engine threads record finished
generations; the event loop records HTTP requests; gauges (queue depth, busy slots) are read
from the live objects when `/metrics` is scraped.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# seconds, from a cached follow-up turn on a small model to a long prompt on a big one
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

Labels = tuple[tuple[str, str], ...]


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v


class Metrics:
    """name -> help/type, and (name, labels) -> value or histogram."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}
        self._values: dict[str, dict[Labels, float]] = {}
        self._hists: dict[str, dict[Labels, _Histogram]] = {}
        self._buckets: dict[str, tuple[float, ...]] = {}

    def counter(self, name: str, help: str) -> None:
        self._help[name] = ("counter", help)
        self._values.setdefault(name, {})

    def histogram(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self._help[name] = ("histogram", help)
        self._hists.setdefault(name, {})
        self._buckets[name] = buckets

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._values[name]
            series[key] = series.get(key, 0.0) + value

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._hists[name]
            h = series.get(key)
            if h is None:
                h = series[key] = _Histogram(self._buckets[name])
            h.observe(value)

    def value(self, name: str, **labels: str) -> float:
        """A counter's current value (for tests and /slots)."""
        with self._lock:
            return self._values.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    def render(self, gauges: Iterable[tuple[str, str, dict[str, str], float]] = ()) -> str:
        """The exposition text. `gauges`: (name, help, labels, value), read by the caller now."""
        out: list[str] = []
        with self._lock:
            for name, (kind, help) in self._help.items():
                out.append(f"# HELP {name} {help}")
                out.append(f"# TYPE {name} {kind}")
                if kind == "counter":
                    for labels, v in self._values[name].items():
                        out.append(f"{name}{_labels(labels)} {_num(v)}")
                else:
                    for labels, h in self._hists[name].items():
                        cumulative = 0
                        for le, c in zip((*h.buckets, math.inf), h.counts):
                            cumulative += c
                            out.append(f"{name}_bucket{_labels(labels + (('le', _num(le)),))} {cumulative}")
                        out.append(f"{name}_sum{_labels(labels)} {_num(h.sum)}")
                        out.append(f"{name}_count{_labels(labels)} {cumulative}")
        seen: set[str] = set()
        for name, help, labels, v in gauges:
            if name not in seen:
                seen.add(name)
                out.append(f"# HELP {name} {help}")
                out.append(f"# TYPE {name} gauge")
            out.append(f"{name}{_labels(tuple(sorted(labels.items())))} {_num(v)}")
        return "\n".join(out) + "\n"


def _num(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    if float(v).is_integer():
        return str(int(v))
    return repr(float(v))


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    esc = lambda s: str(s).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')  # noqa: E731
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in labels) + "}"


def server_metrics() -> Metrics:
    """The series `llmdesk serve` keeps."""
    m = Metrics()
    m.counter("llmdesk_http_requests_total", "HTTP requests answered, by route and status.")
    m.histogram("llmdesk_http_request_duration_seconds", "Time from request to the end of the response.",
                DURATION_BUCKETS)
    m.counter("llmdesk_generations_total", "Generations finished, by model and finish reason.")
    m.counter("llmdesk_prompt_tokens_total", "Prompt tokens of finished generations.")
    m.counter("llmdesk_prompt_cached_tokens_total", "Prompt tokens reused from the KV cache (not recomputed).")
    m.counter("llmdesk_generated_tokens_total", "Tokens generated.")
    m.counter("llmdesk_rejected_total", "Requests refused before generating, by reason.")
    m.counter("llmdesk_model_loads_total", "Model loads.")
    m.counter("llmdesk_model_unloads_total", "Model unloads, by reason.")
    m.histogram("llmdesk_time_to_first_token_seconds", "Time to first token, queueing included.", TTFT_BUCKETS)
    m.histogram("llmdesk_tokens_per_second", "Generation speed of each request (after its first token).",
                TPS_BUCKETS)
    return m
