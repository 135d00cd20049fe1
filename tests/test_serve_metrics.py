"""`/metrics` read by a Prometheus parser (prometheus_client's), and against docs/serve.md: the
whole page parses, every sample belongs to the family its `# TYPE` line declares, histograms are
cumulative and end at their count, and every metric the docs name is on the page with the type and
the labels the docs give it."""

from __future__ import annotations

import math
import re
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_serve_util import metric, running

DOCS = Path(__file__).resolve().parents[1] / "docs" / "serve.md"

# the type docs/serve.md's "Operations" gives each metric it names ("... histograms", "the gauges
# ..."); "model loads and unloads" are named there in words only
TYPES = {
    "llmdesk_http_requests_total": "counter",
    "llmdesk_http_request_duration_seconds": "histogram",
    "llmdesk_generations_total": "counter",
    "llmdesk_prompt_tokens_total": "counter",
    "llmdesk_prompt_cached_tokens_total": "counter",
    "llmdesk_generated_tokens_total": "counter",
    "llmdesk_time_to_first_token_seconds": "histogram",
    "llmdesk_tokens_per_second": "histogram",
    "llmdesk_rejected_total": "counter",
    "llmdesk_slots_total": "gauge",
    "llmdesk_slots_busy": "gauge",
    "llmdesk_queue_depth": "gauge",
    "llmdesk_models_loaded": "gauge",
    "llmdesk_model_memory_bytes": "gauge",
}
IN_WORDS = {"llmdesk_model_loads_total": "counter", "llmdesk_model_unloads_total": "counter"}


def documented() -> dict[str, set[str]]:
    """The metrics the `GET /metrics` item of docs/serve.md names: name -> the labels it lists."""
    text = DOCS.read_text()
    item = re.search(r"^- `GET /metrics`:(.*?)(?=^- |^#|\Z)", text, re.M | re.S)
    assert item, f"{DOCS} has no `GET /metrics` item"
    return {name: set(filter(None, labels.split(","))) for name, labels in
            re.findall(r"`(llmdesk_[a-z_]+)(?:\{([a-z_,]*)\})?`", item.group(1))}


def test_metrics_page_parses_and_has_what_the_docs_name(tiny_gguf):
    docs = documented()
    assert set(docs) == set(TYPES), "docs/serve.md names other metrics than this test knows: update TYPES"
    with running(tiny_gguf) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        c.chat.completions.create(model="tiny.gguf", messages=[{"role": "user", "content": "Hello"}],
                                  max_tokens=5, extra_body={"ignore_eos": True})
        r = httpx.get(s.url + "/metrics")
        # a series name the page does not have fails, rather than reading as 0
        with pytest.raises(AssertionError, match="no metric family"):
            metric(s.url, "llmdesk_no_such_thing_total")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = list(text_string_to_metric_families(r.text))  # raises on any line it cannot read

    # a sample that does not belong to the family declared before it starts an untyped family
    assert [f.name for f in families if f.type == "unknown"] == []
    names = [f.name for f in families]
    assert len(names) == len(set(names)), f"a family declared twice: {names}"
    # the name a family goes by on the page: the parser drops a counter's `_total`
    page = {f.name + ("_total" if f.type == "counter" else ""): f for f in families}
    for name, kind in {**TYPES, **IN_WORDS}.items():
        assert name in page, f"{name} is named in docs/serve.md but not on /metrics: {sorted(page)}"
        assert page[name].type == kind, f"{name} is a {page[name].type}, the docs say {kind}"
    for name, labels in docs.items():
        if labels:  # the labels the docs list are on every sample of the family
            samples = page[name].samples
            assert all(labels <= set(s.labels) for s in samples), (name, labels, samples)

    for f in families:
        suffixes = {"counter": {"_total"}, "gauge": {""}, "histogram": {"_bucket", "_sum", "_count"}}[f.type]
        assert {s.name[len(f.name):] for s in f.samples} <= suffixes, f.name
        if f.type == "counter":
            assert all(s.value >= 0 for s in f.samples), f.name
        if f.type == "histogram":
            check_histogram(f)

    # the page counts what happened: one chat request, five tokens
    assert page["llmdesk_generated_tokens_total"].samples[0].value == 5
    assert [s.labels["finish_reason"] for s in page["llmdesk_generations_total"].samples] == ["length"]
    assert {(s.labels["route"], s.labels["status"]) for s in page["llmdesk_http_requests_total"].samples} \
        == {("/v1/chat/completions", "200")}
    assert page["llmdesk_models_loaded"].samples[0].value == 1
    assert [s.value for s in page["llmdesk_time_to_first_token_seconds"].samples
            if s.name.endswith("_count")] == [1]


def check_histogram(f) -> None:
    """Per label set: buckets in increasing `le` ending at +Inf, counts never falling, the +Inf
    bucket equal to `_count`, and a `_sum`."""
    series: dict[tuple, dict] = {}
    for s in f.samples:
        key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
        one = series.setdefault(key, {"buckets": []})
        if s.name.endswith("_bucket"):
            one["buckets"].append((float(s.labels["le"]), s.value))
        else:
            one[s.name[len(f.name):]] = s.value
    for key, one in series.items():
        les = [le for le, _ in one["buckets"]]
        counts = [c for _, c in one["buckets"]]
        assert les == sorted(les) and les[-1] == math.inf, (f.name, key, les)
        assert counts == sorted(counts), (f.name, key, counts)
        assert counts[-1] == one["_count"] and "_sum" in one, (f.name, key, one)
