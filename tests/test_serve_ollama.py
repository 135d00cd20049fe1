"""The Ollama API, driven by the official `ollama` client over real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import math

import httpx
import ollama
import pytest
from test_serve_util import running, wait_until

from llmdesk.store import catalog

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                           "score": {"type": "integer", "minimum": 0, "maximum": 5}},
          "required": ["answer", "score"], "additionalProperties": False}
TOOL = {"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                         "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                                                        "b": {"type": "integer"}},
                                                        "required": ["a", "b"]}}}


@pytest.fixture(scope="module")
def server(tiny_gguf):
    with running(tiny_gguf, parallel=2, ctx=1024) as s:
        yield s


@pytest.fixture
def client(server):
    return ollama.Client(host=server.url, timeout=120)


def test_generate(client):
    opts = {"num_predict": 10, "temperature": 0}
    r = client.generate(model="tiny.gguf", prompt="Hello", options=opts)
    assert r.done and r.done_reason in ("stop", "length") and r.model == "tiny.gguf"
    assert 0 < r.eval_count <= 10 and r.prompt_eval_count > 0 and r.total_duration > 0
    assert r.context and len(r.context) == r.prompt_eval_count + r.eval_count
    parts = list(client.generate(model="tiny.gguf", prompt="Hello", options=opts, stream=True))
    assert [p.done for p in parts][-1] is True and not any(p.done for p in parts[:-1])
    assert "".join(p.response for p in parts) == r.response
    assert parts[-1].eval_count == r.eval_count
    raw = client.generate(model="tiny", prompt="The quick brown fox", raw=True, options={"num_predict": 4, "seed": 3})
    assert raw.eval_count <= 4
    # :latest names the same model, as in Ollama
    assert client.generate(model="tiny.gguf:latest", prompt="Hi", options={"num_predict": 1}).done


def test_chat(client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How are you?"}]
    opts = {"num_predict": 12, "temperature": 0.9, "seed": 42, "top_k": 20, "top_p": 0.9, "repeat_penalty": 1.1}
    a = client.chat(model="tiny.gguf", messages=msgs, options=opts)
    b = client.chat(model="tiny.gguf", messages=msgs, options=opts, stream=True)
    parts = list(b)
    assert a.message.role == "assistant" and a.done_reason in ("stop", "length")
    assert "".join(p.message.content for p in parts) == a.message.content
    assert parts[-1].done and parts[-1].eval_count == a.eval_count
    full = client.chat(model="tiny.gguf", messages=msgs, options={"num_predict": 30, "temperature": 0}).message.content
    stop = full[10:12]
    cut = client.chat(model="tiny.gguf", messages=msgs, options={"num_predict": 30, "temperature": 0, "stop": [stop]})
    assert cut.message.content == full[: full.index(stop)]


def test_structured_output_and_tools(client):
    r = client.chat(model="tiny.gguf", messages=[{"role": "user", "content": "yes or no?"}], format=SCHEMA,
                    options={"num_predict": 100, "seed": 5})
    data = json.loads(r.message.content)
    assert data["answer"] in ("yes", "no") and 0 <= data["score"] <= 5
    r = client.generate(model="tiny.gguf", prompt="JSON please", format="json", options={"num_predict": 200, "seed": 1})
    assert r.response.lstrip().startswith("{")
    # tools in "auto" mode: whatever the random model writes, the answer is well formed
    r = client.chat(model="tiny.gguf", messages=[{"role": "user", "content": "1+2?"}], tools=[TOOL],
                    options={"num_predict": 20})
    assert r.message.role == "assistant" and r.done
    # an earlier call and its result, in Ollama's shapes, are accepted
    r = client.chat(model="tiny.gguf", options={"num_predict": 3}, messages=[
        {"role": "user", "content": "1+2?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
        {"role": "tool", "content": "3", "tool_name": "add"}], tools=[TOOL])
    assert r.done


def test_embed(client):
    r = client.embed(model="tiny.gguf", input=["Hello", "world"])
    assert len(r.embeddings) == 2 and len(r.embeddings[0]) == 64
    assert math.isclose(sum(x * x for x in r.embeddings[0]), 1.0, rel_tol=1e-4) and r.prompt_eval_count >= 2
    cut = client.embed(model="tiny.gguf", input="Hello", dimensions=8)
    assert len(cut.embeddings[0]) == 8
    legacy = client.embeddings(model="tiny.gguf", prompt="Hello")
    assert len(legacy.embedding) == 64
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model="tiny.gguf", input="word " * 2000)
    assert e.value.status_code == 400 and "truncate" in e.value.error
    t = client.embed(model="tiny.gguf", input="word " * 2000, truncate=True)
    assert len(t.embeddings) == 1 and t.prompt_eval_count <= 1024


def test_tags_show_ps_version(client, server):
    tags = client.list()
    assert [m.model for m in tags.models] == ["tiny.gguf"]
    d = tags.models[0].details
    assert d.format == "gguf" and d.family == "llama" and d.quantization_level == "F32"
    show = client.show("tiny.gguf")
    assert "im_start" in show.template and show.modelinfo["general.architecture"] == "llama"
    assert show.modelinfo["tokenizer.ggml.tokens"] is None  # the vocabulary only with verbose
    assert "completion" in show.capabilities
    ps = client.ps()
    assert [m.model for m in ps.models] == ["tiny.gguf"] and ps.models[0].size > 0
    assert httpx.get(server.url + "/api/version").json()["version"]


def test_errors(client, server):
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404 and "not found" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="tiny.gguf", prompt="hi", options={"temperature": "hot"})
    assert e.value.status_code == 400 and "temperature" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="tiny.gguf", prompt="word " * 3000)
    assert e.value.status_code == 400 and "context" in e.value.error
    r = httpx.post(server.url + "/api/generate", json={"model": "tiny.gguf", "prompt": "hi", "stream": False,
                                                       "options": {"num_predict": 2, "mirostat": 2}})
    assert r.status_code == 200 and r.headers["x-llmdesk-ignored-options"] == "mirostat"
    r = httpx.post(server.url + "/api/generate", content=b'{"model": "tiny.gguf", "prompt": ',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]


def test_keep_alive_load_and_unload(tiny_gguf):
    with running(tiny_gguf, keep_alive=300, preload=False) as s:
        c = ollama.Client(host=s.url)
        assert c.ps().models == []
        r = c.generate(model="tiny.gguf", prompt="")  # Ollama's "load it" request
        assert r.done_reason == "load" and [m.model for m in c.ps().models] == ["tiny.gguf"]
        r = c.generate(model="tiny.gguf", prompt="", keep_alive=0)
        assert r.done_reason == "unload" and c.ps().models == []
        c.chat(model="tiny.gguf", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 2},
               keep_alive="1s")
        wait_until(lambda: c.ps().models == [], timeout=30)
        # num_ctx: a request that needs a bigger context reloads the idle model with it
        c.generate(model="tiny.gguf", prompt="hi", options={"num_predict": 1, "num_ctx": 1536})
        assert c.ps().models[0].context_length == 1536


def test_pull_and_delete(tiny_gguf, fake_hub, tmp_path):
    fake_hub.add("someone/tiny-GGUF", "tiny-q8_0.gguf", tiny_gguf.read_bytes())
    with running(None, preload=False) as s:
        c = ollama.Client(host=s.url)
        with pytest.raises(ollama.ResponseError) as e:
            c.pull("llama3.2")
        assert e.value.status_code == 400 and "hf:" in e.value.error
        parts = list(c.pull("hf:someone/tiny-GGUF/tiny-q8_0.gguf", stream=True))
        assert parts[-1].status == "success"
        assert [m.ref for m in catalog.list_models()] == ["tiny:q8_0"]
        assert [m.model for m in c.list().models] == ["tiny:q8_0"]
        r = c.generate(model="tiny:q8_0", prompt="Hello", options={"num_predict": 2})
        assert r.done and r.model == "tiny:q8_0"
        assert c.delete("tiny:q8_0").status == "success"
        assert catalog.list_models() == [] and c.ps().models == []
        with pytest.raises(ollama.ResponseError) as e:
            c.delete("tiny:q8_0")
        assert e.value.status_code == 404
