"""Counters and histograms for `/metrics`, in Prometheus' text format (version 0.0.4).

prometheus_client keeps the series (thread-safe: Engine threads record finished generations, the
event loop records HTTP requests). `render` writes the exposition text from the client's samples
itself, so the lines stay llmdesk's: integral values without ".0", `le="1"` rather than "1.0",
a histogram's `_sum` before its `_count`, no `_created` series. Gauges (queue depth, busy slots)
are read from the live objects when `/metrics` is scraped and handed to `render`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# seconds, from a cached follow-up turn on a small model to a long prompt on a big one
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """Series declared by name (`counter`, `histogram`) and recorded with labels (`inc`, `observe`).

    A series' label names are those of its first record (every caller of one series passes the
    same ones); prometheus_client rejects a record with other names."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._registry = CollectorRegistry(auto_describe=False)
        self._declared: dict[str, tuple[str, str, tuple[float, ...]]] = {}  # name -> (kind, help, buckets)
        self._series: dict[str, Counter | Histogram] = {}

    def counter(self, name: str, help: str) -> None:
        self._declared[name] = ("counter", help, ())

    def histogram(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self._declared[name] = ("histogram", help, tuple(buckets))

    def _child(self, name: str, labels: dict[str, str]) -> Counter | Histogram:
        metric = self._series.get(name)
        if metric is None:
            with self._lock:
                metric = self._series.get(name)
                if metric is None:
                    kind, help, buckets = self._declared[name]
                    names = sorted(labels)
                    if kind == "counter":
                        metric = Counter(name, help, names, registry=self._registry)
                    else:
                        metric = Histogram(name, help, names, registry=self._registry, buckets=buckets)
                    self._series[name] = metric
        return metric.labels(**{k: str(v) for k, v in labels.items()}) if labels else metric

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        self._child(name, labels).inc(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        self._child(name, labels).observe(value)

    def value(self, name: str, **labels: str) -> float:
        """A counter's current value (for tests and /slots)."""
        values = {k: str(v) for k, v in labels.items()}
        v = self._registry.get_sample_value(name, values)
        if v is None and not name.endswith("_total"):  # the client's sample name for counter NAME
            v = self._registry.get_sample_value(name + "_total", values)
        return 0.0 if v is None else v

    def render(self, gauges: Iterable[tuple[str, str, dict[str, str], float]] = ()) -> str:
        """The exposition text. `gauges`: (name, help, labels, value), read by the caller now."""
        out: list[str] = []
        for name, (kind, help, _) in self._declared.items():
            out.append(f"# HELP {name} {help}")
            out.append(f"# TYPE {name} {kind}")
            metric = self._series.get(name)
            if metric is None:
                continue
            # one group of lines per label set: buckets, then _sum and _count
            groups: dict[tuple[tuple[str, str], ...], dict[str, list[str]]] = {}
            for family in metric.collect():
                for s in family.samples:
                    suffix = s.name[len(family.name):]
                    if suffix == "_created":
                        continue
                    labels = {k: v for k, v in s.labels.items() if k != "le"}
                    lines = groups.setdefault(tuple(labels.items()), {"_bucket": [], "_sum": [], "_count": []})
                    if suffix == "_bucket":
                        le = (("le", _num(float(s.labels["le"]))),)
                        lines["_bucket"].append(f"{name}_bucket{_labels(tuple(labels.items()) + le)} {_num(s.value)}")
                    elif kind == "counter":  # the client names a counter's sample NAME_total
                        lines["_sum"].append(f"{name}{_labels(tuple(labels.items()))} {_num(s.value)}")
                    else:
                        lines[suffix].append(f"{name}{suffix}{_labels(tuple(labels.items()))} {_num(s.value)}")
            for lines in groups.values():
                out += lines["_bucket"] + lines["_sum"] + lines["_count"]
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


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
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
