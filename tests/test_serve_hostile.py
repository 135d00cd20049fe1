"""Hostile requests: none may freeze, exhaust or escape the server (issue: harden the server).

Each class of attack is sent in several forms, each asserting the error a client gets and that
a normal request sent at the same time is still answered. "Still answered" is checked with a
hang guard (a generous client timeout), never a speed threshold: speed under attack is measured
by benchmarks/serve_attack.py.
"""

from __future__ import annotations

import json
import resource
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import ollama
import openai
import pytest
from test_serve_util import LONG, metric, running, wait_until

from llmdesk.errors import LlmdeskError
from llmdesk.runtime.engine import Engine, Request, SamplingParams
from llmdesk.runtime.limits import InvalidRequest
from llmdesk.runtime.llama import LlamaModel
from llmdesk.runtime.model import Model

HI = [{"role": "user", "content": "Hello"}]
GUARD = 120.0  # seconds: a normal request that takes longer than this is hung, not slow


def normal_chat(url: str, model: str = "tiny.gguf") -> str:
    """A normal client's request; returns its answer (raises if it fails or hangs)."""
    r = httpx.post(url + "/v1/chat/completions", timeout=GUARD,
                   json={"model": model, "messages": HI, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def while_normal(url: str, attack):
    """Run `attack()` while a normal client chats; both must finish. Returns what attack returned."""
    with ThreadPoolExecutor(2) as pool:
        hostile = pool.submit(attack)
        normal = pool.submit(normal_chat, url)
        result = hostile.result(timeout=GUARD)
        normal.result(timeout=GUARD)
    return result


def post_raw(url: str, path: str, text: str) -> httpx.Response:
    """JSON as the attacker writes it (NaN and Infinity are not JSON, but Python's parser takes them)."""
    return httpx.post(url + path, content=text.encode(), headers={"content-type": "application/json"}, timeout=GUARD)


# ---------------------------------------------------------------------------------------------
# the bounds: one set for every face


@pytest.mark.parametrize("field,value", [
    ("temperature", "NaN"), ("temperature", "Infinity"), ("temperature", "-1"), ("temperature", "1e309"),
    ("top_p", "NaN"), ("top_p", "1.5"), ("min_p", "-0.1"), ("repeat_penalty", "NaN"), ("repeat_penalty", "0"),
    ("repeat_penalty", "Infinity"), ("presence_penalty", "NaN"), ("frequency_penalty", "-Infinity"),
    ("frequency_penalty", "3"), ("top_k", "-5"), ("repeat_last_n", "-2"),
])
def test_out_of_range_sampling_is_refused_the_same_on_both_apis(tiny_gguf, field, value):
    with running(tiny_gguf) as s:
        def attack():
            o = post_raw(s.url, "/v1/chat/completions",
                         f'{{"model": "tiny.gguf", "messages": {json.dumps(HI)}, "{field}": {value}}}')
            a = post_raw(s.url, "/api/chat", f'{{"model": "tiny.gguf", "messages": {json.dumps(HI)}, '
                                             f'"stream": false, "options": {{"{field}": {value}}}}}')
            return o, a
        o, a = while_normal(s.url, attack)
        assert o.status_code == 400 and o.json()["error"]["param"] == field, o.text
        assert field in o.json()["error"]["message"]
        assert a.status_code == 400 and f"options.{field}" in a.json()["error"], a.text


def test_the_python_api_has_the_same_bounds(tiny_gguf):
    with Model(tiny_gguf, ctx=256, threads=1) as m:
        for kw in ({"temperature": float("nan")}, {"repeat_penalty": float("inf")}, {"top_p": 2.0},
                   {"presence_penalty": -3.0}, {"repeat_last_n": -7}, {"stop": ["x"] * 17}, {"stop": ["y" * 300]},
                   {"time_limit": float("nan")}, {"logprobs": 21}):
            with pytest.raises(InvalidRequest):
                m.generate("Hello", max_tokens=2, **kw)
        assert isinstance(m.generate("Hello", max_tokens=2, temperature=2.5), str)  # the same range as Ollama's


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("window", [2**31 - 1, 10**9, 65536, -1])
def test_a_huge_penalty_window_is_capped_at_the_context(tiny_gguf, window):
    # llama.cpp allocates the window up front: 2**31 tokens was 8 GB from one 150-byte request
    with running(tiny_gguf) as s:
        before = _rss_mb()

        def attack():
            client = ollama.Client(host=s.url, timeout=GUARD)
            return client.chat(model="tiny.gguf", messages=HI, options={
                "repeat_last_n": window, "repeat_penalty": 1.3, "num_predict": 8, "temperature": 0})
        r = while_normal(s.url, attack)
        assert r.done_reason in ("stop", "length")
        # the process's peak stays far below what the window would have taken (8 GB at 2**31)
        assert _rss_mb() - before < 512
        o = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        r = o.chat.completions.create(model="tiny.gguf", messages=HI, max_tokens=4,
                                      extra_body={"repeat_last_n": window, "repeat_penalty": 1.3})
        assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("keep_alive", ["inf", "Infinity", "-inf", "nan", "1e400", 1e300, "999999999h"])
def test_keep_alive_must_be_finite(tiny_gguf, keep_alive):
    with running(tiny_gguf) as s:
        r = httpx.post(s.url + "/api/generate", timeout=GUARD,
                       json={"model": "tiny.gguf", "prompt": "Hi", "stream": False, "keep_alive": keep_alive})
        assert r.status_code == 400 and "keep_alive" in r.json()["error"], r.text
        # nothing was left in a state that breaks the listings
        assert httpx.get(s.url + "/api/ps").status_code == 200
        assert httpx.get(s.url + "/slots").status_code == 200
        ok = httpx.post(s.url + "/api/generate", timeout=GUARD,
                        json={"model": "tiny.gguf", "prompt": "Hi", "stream": False, "keep_alive": -1,
                              "options": {"num_predict": 2}})
        assert ok.status_code == 200
        assert httpx.get(s.url + "/api/ps").json()["models"][0]["expires_at"].startswith("2318")  # "never"
        assert httpx.get(s.url + "/slots").json()["models"][0]["expires_at"] is None


@pytest.mark.parametrize("num_ctx", [4096, 1 << 20, 2**31 - 1])
def test_num_ctx_beyond_the_trained_context_is_refused_without_a_reload(tiny_gguf, num_ctx):
    with running(tiny_gguf) as s:  # the tiny model was trained on 2048 tokens
        before = httpx.get(s.url + "/metrics").text.count("llmdesk_model_loads_total")
        r = while_normal(s.url, lambda: httpx.post(
            s.url + "/api/generate", timeout=GUARD,
            json={"model": "tiny.gguf", "prompt": "Hi", "stream": False, "options": {"num_ctx": num_ctx}}))
        assert r.status_code == 400 and "num_ctx" in r.json()["error"] and "2048" in r.json()["error"], r.text
        ps = httpx.get(s.url + "/api/ps").json()["models"]
        assert [m["context_length"] for m in ps] == [2048]  # still loaded as it was
        assert httpx.get(s.url + "/metrics").text.count("llmdesk_model_loads_total") == before


@pytest.mark.parametrize("stop", [["x"] * 17, ["y" * 257], ["a", 5], "just-a-string"])
def test_ollama_stop_lists_are_bounded(tiny_gguf, stop):
    with running(tiny_gguf) as s:
        r = while_normal(s.url, lambda: httpx.post(
            s.url + "/api/chat", timeout=GUARD,
            json={"model": "tiny.gguf", "messages": HI, "stream": False, "options": {"stop": stop}}))
        assert r.status_code == 400 and "stop" in r.json()["error"], r.text


# ---------------------------------------------------------------------------------------------
# time limits, cancellation inside a step, shutdown


def test_a_request_past_its_time_limit_ends(tiny_gguf):
    with running(tiny_gguf, request_timeout=0.3) as s:
        o = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=GUARD)
        r = o.chat.completions.create(model="tiny.gguf", messages=HI, temperature=0, **{"extra_body": LONG})
        # stopped by the limit, with what it had written: "length" is the APIs' word for a cut
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens > 0
        chunks = list(o.chat.completions.create(model="tiny.gguf", messages=HI, stream=True, extra_body=LONG))
        assert chunks[-1].choices[0].finish_reason == "length"
        # both were ended by the limit, not by the context filling up
        assert metric(s.url, "llmdesk_generations_total", finish_reason="time_limit") == 2


def _big_model(tmp_path):
    from llmdesk.formats.synth import SynthConfig, write_llama_gguf

    # big enough that one 2000-token decode takes a while on this CPU
    return write_llama_gguf(tmp_path / "wide.gguf", SynthConfig(n_layer=4, n_embd=512, n_head=8, n_head_kv=8,
                                                                 n_ff=1536, n_ctx_train=4096))


def test_cancel_aborts_a_long_prefill_inside_its_step(tmp_path):
    path = _big_model(tmp_path)
    lm = LlamaModel(path)
    eng = Engine(lm, n_ctx=4096, n_slots=2, n_batch=4096, n_threads=1)
    try:
        prompt = [(i * 7) % 200 + 10 for i in range(3000)]
        long = eng.submit(Request(prompt, max_tokens=4))
        wait_until(lambda: eng._decoding, timeout=60, interval=0.001)  # its one big decode has begun
        long.cancel()
        assert long.wait().finish_reason == "cancelled"
        assert eng.aborted_steps == 1  # the decode was cut short, not finished
        # the engine goes on, and the aborted slot left nothing in the cache
        short = eng.submit(Request([1, 2, 3, 4], max_tokens=3, sampling=SamplingParams(temperature=0)))
        assert short.wait().n_gen == 3
        import llama_cpp as C

        assert all(C.llama_memory_seq_pos_max(eng.mem, s.seq) < 100 for s in eng.slots)
    finally:
        eng.close()
        lm.close()


def test_a_slow_prefill_meets_its_time_limit_inside_the_step(tmp_path):
    path = _big_model(tmp_path)
    lm = LlamaModel(path)
    eng = Engine(lm, n_ctx=4096, n_slots=1, n_batch=4096, n_threads=1)
    try:
        prompt = [(i * 7) % 200 + 10 for i in range(3000)]
        r = eng.submit(Request(prompt, max_tokens=4, time_limit=0.05)).wait()
        assert r.finish_reason == "error" and "time limit" in r.error and r.n_gen == 0
        assert eng.aborted_steps >= 1
    finally:
        eng.close()
        lm.close()


def test_abort_all_ends_running_and_waiting_requests_with_the_reason(tiny_gguf):
    with Model(tiny_gguf, ctx=512, threads=1, slots=1) as m:
        running_ = m.engine.submit(Request([1, 2, 3], max_tokens=None, ignore_eos=True))
        waiting = m.engine.submit(Request([1, 2, 3], max_tokens=None, ignore_eos=True))
        wait_until(lambda: running_.result.n_gen > 0)
        m.engine.abort_all("the server is shutting down")
        for s in (running_, waiting):
            r = s.wait()
            assert r.finish_reason == "error" and r.error == "the server is shutting down"


# ---------------------------------------------------------------------------------------------
# fair sharing: embeddings queue like generations; a refused load evicts nothing


def test_embeddings_take_a_place_in_the_queue(tiny_gguf):
    with running(tiny_gguf, parallel=1, max_queue=0) as s:
        o = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=GUARD)
        stream = o.chat.completions.create(model="tiny.gguf", messages=HI, stream=True, extra_body=LONG)
        next(iter(stream))  # the one slot is taken
        with pytest.raises(openai.RateLimitError):
            o.embeddings.create(model="tiny.gguf", input="hello")
        with pytest.raises(ollama.ResponseError) as e:
            ollama.Client(host=s.url).embed(model="tiny.gguf", input="hello")
        assert e.value.status_code == 429
        stream.close()
        wait_until(lambda: httpx.get(s.url + "/slots").json()["models"][0]["in_flight"] == 0)
        assert len(o.embeddings.create(model="tiny.gguf", input="hello").data[0].embedding) == 64


def test_chat_is_not_starved_by_embeddings(tmp_path):
    path = _big_model(tmp_path)  # slow enough per embedding that a flood lasts
    with running(path, parallel=2, max_queue=32) as s:
        text = "word " * 700  # ~1400 tokens

        def embed_flood():
            with ThreadPoolExecutor(8) as pool:
                return list(pool.map(lambda _: httpx.post(s.url + "/v1/embeddings", timeout=GUARD,
                                                          json={"model": "wide.gguf", "input": [text] * 4}),
                                     range(8)))
        with ThreadPoolExecutor(2) as pool:
            flood = pool.submit(embed_flood)
            wait_until(lambda: httpx.get(s.url + "/slots").json()["models"][0]["in_flight"] >= 4, interval=0.01)
            answer = normal_chat(s.url, "wide.gguf")
            # the chat was answered while embeddings were still queued: they interleave
            still_busy = httpx.get(s.url + "/slots").json()["models"][0]["in_flight"] > 0
            codes = [r.status_code for r in flood.result(timeout=GUARD)]
        assert isinstance(answer, str) and still_busy
        assert codes == [200] * 8


def test_token_id_embeddings_are_used_as_given(tiny_gguf):
    with running(tiny_gguf) as s, Model(tiny_gguf, ctx=512, threads=1) as m:
        ids = m.tokenize("The quick brown fox jumps")
        o = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=GUARD)
        r = o.embeddings.create(model="tiny.gguf", input=ids)
        assert r.usage.prompt_tokens == len(ids)
        assert r.data[0].embedding == pytest.approx(m.embed([ids])[0], abs=1e-5)
        # ids no text tokenizes to (a BOS in the middle, repeated specials) are embedded as sent
        odd = [ids[0]] * 3 + ids
        r2 = o.embeddings.create(model="tiny.gguf", input=[odd])
        assert r2.usage.prompt_tokens == len(odd)
        with pytest.raises(openai.BadRequestError):
            o.embeddings.create(model="tiny.gguf", input=[[10**9]])


def test_a_refused_load_unloads_nothing(tiny_gguf, tmp_path):
    import dataclasses
    import shutil

    from llmdesk.serve import BackgroundServer, ServeConfig, create_app

    other = tmp_path / "other.gguf"
    shutil.copy(tiny_gguf, other)
    app = create_app(ServeConfig(models=[str(tiny_gguf), str(other)], parallel=1, ctx=512, threads=1))
    manager = app.state.llmdesk.models
    est = manager.loaded["tiny.gguf"].estimate.total
    manager.config.max_memory = 3 * est  # room for the loaded model and a bit more...
    huge = manager.sources["other.gguf"]
    prepare = manager._prepare

    def needs_more(src, n_ctx):  # ...but the other model needs ten times that
        info, n, e = prepare(src, n_ctx)
        return (info, n, dataclasses.replace(e, other=e.other + 10 * est)) if src is huge else (info, n, e)
    manager._prepare = needs_more
    with BackgroundServer(app) as s:
        r = httpx.post(s.url + "/v1/chat/completions", timeout=GUARD,
                       json={"model": "other.gguf", "messages": HI, "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "insufficient_memory"
        assert list(manager.loaded) == ["tiny.gguf"]  # the idle model is still loaded
        normal_chat(s.url)


# ---------------------------------------------------------------------------------------------
# escaping: paths


def test_pull_refuses_traversal_in_every_part(tiny_gguf):
    with running(tiny_gguf) as s:
        for ref in ("hf:a/b/m.gguf@../../..", "hf:a/b/m.gguf@..%2F..%2F..", "hf:a/b/../../m.gguf",
                    "hf:a/b//etc/m.gguf", "hf:../b/m.gguf", "hf:a/b/m.gguf@refs/../../x"):
            r = httpx.post(s.url + "/api/pull", json={"model": ref, "stream": False}, timeout=GUARD)
            assert r.status_code == 400, (ref, r.text)


def test_errors_show_store_names_not_paths(tiny_gguf, tmp_path, user_dir):
    bad = tmp_path / "secret-dir" / "broken.gguf"
    bad.parent.mkdir()
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with running(tiny_gguf, models=[str(tiny_gguf), str(bad)], preload=True) as s:
        for path, body in (("/v1/chat/completions", {"model": "broken.gguf", "messages": HI}),
                           ("/api/chat", {"model": "broken.gguf", "messages": HI, "stream": False}),
                           ("/api/show", {"model": "broken.gguf"}),
                           ("/api/show", {"model": "tiny.gguf"})):
            r = httpx.post(s.url + path, json=body, timeout=GUARD)
            assert str(tmp_path) not in r.text and str(user_dir) not in r.text, (path, r.text)


def test_engine_rejects_requests_outside_its_bounds_before_any_work(tiny_gguf):
    lm = LlamaModel(tiny_gguf)
    eng = Engine(lm, n_ctx=256, n_threads=1)
    try:
        for req in (Request([1, 2], sampling=SamplingParams(temperature=float("nan"))),
                    Request([1, 2], sampling=SamplingParams(repeat_last_n=-5)),
                    Request([1, 10**9]), Request([1, 2], stop=["s"] * 100), Request([1, 2], time_limit=-1.0)):
            with pytest.raises(LlmdeskError):
                eng.submit(req)
        assert eng.steps == 0 and not eng.waiting
        # a window past the context is the context: bounded, and it runs
        r = eng.submit(Request([1, 2, 3], max_tokens=3, sampling=SamplingParams(
            repeat_penalty=1.5, repeat_last_n=2**31 - 1))).wait()
        assert r.n_gen == 3
    finally:
        eng.close()
        lm.close()


def test_many_hostile_requests_at_once_leave_the_server_answering(tiny_gguf):
    bad_bodies = [
        '{"model": "tiny.gguf", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
        '{"model": "tiny.gguf", "messages": [{"role": "user", "content": "x"}], "stream": false, '
        '"options": {"repeat_last_n": 2147483647, "repeat_penalty": 1.2, "num_predict": 4}}',
        '{"model": "tiny.gguf", "prompt": "x", "stream": false, "keep_alive": "inf"}',
        '{"model": "tiny.gguf", "prompt": "x", "stream": false, "options": {"num_ctx": 1048576}}',
    ]
    paths = ["/v1/chat/completions", "/api/chat", "/api/generate", "/api/generate"]
    with running(tiny_gguf) as s:
        def attack():
            with ThreadPoolExecutor(4) as pool:
                return list(pool.map(lambda pb: post_raw(s.url, *pb), list(zip(paths, bad_bodies)) * 5))
        results = while_normal(s.url, attack)
        assert [r.status_code for r in results[:4]] == [400, 200, 400, 400]
        assert threading.active_count() < 100


# ---------------------------------------------------------------------------------------------
# grammars that would explode: refused by every face before any token


BLOWUPS = ["^([a-z]*){0,1000}$", "^([a-z]*){0,60}$", "^(a+)+$", "^((a|b)*c?){0,20}$", "^(a|aa|aaa){0,500}$",
           "^[a-z]*[a-z]*[a-z]*[a-z]*$"]


@pytest.mark.parametrize("pattern", BLOWUPS)
def test_grammar_blowups_are_refused_on_every_face(tiny_gguf, pattern):
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": pattern}}, "required": ["a"]}
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    with running(tiny_gguf) as s:
        def attack():
            return [
                httpx.post(s.url + "/v1/chat/completions", timeout=GUARD, json={
                    "model": "tiny.gguf", "messages": HI, "max_tokens": 8,
                    "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}),
                httpx.post(s.url + "/api/chat", timeout=GUARD, json={
                    "model": "tiny.gguf", "messages": HI, "stream": False, "format": schema}),
                httpx.post(s.url + "/v1/chat/completions", timeout=GUARD, json={
                    "model": "tiny.gguf", "messages": HI, "max_tokens": 8, "tools": [tool], "tool_choice": "required"}),
            ]
        o, a, t = while_normal(s.url, attack)
        assert o.status_code == 400 and "pattern" in o.json()["error"]["message"], o.text
        assert a.status_code == 400 and "pattern" in a.json()["error"], a.text
        assert t.status_code == 400 and "pattern" in t.json()["error"]["message"], t.text


def test_a_schema_with_900_optional_properties_never_blocks_the_loop(tiny_gguf):
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(900)}}
    body = {"model": "tiny.gguf", "messages": HI, "max_tokens": 4,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    with running(tiny_gguf) as s:
        with ThreadPoolExecutor(8) as pool:
            heavy = [pool.submit(httpx.post, s.url + "/v1/chat/completions", json=body, timeout=GUARD) for _ in range(8)]
            assert httpx.get(s.url + "/health", timeout=GUARD).json() == {"status": "ok"}
            normal_chat(s.url)
            codes = {f.result().status_code for f in heavy}
        assert codes == {400}
