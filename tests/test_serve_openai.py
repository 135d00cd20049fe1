"""The OpenAI API, driven by the official `openai` client over real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest
from test_serve_util import running

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
        "sunny": {"type": "boolean"},
        "days": {"type": "integer", "minimum": 1, "maximum": 9},
    },
    "required": ["city", "sunny", "days"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                                         "unit": {"type": "string", "enum": ["C", "F"]}},
                       "required": ["city", "unit"]},
    },
}
HI = [{"role": "user", "content": "Hello, how are you today?"}]


@pytest.fixture(scope="module")
def server(tiny_gguf):
    with running(tiny_gguf, parallel=4, ctx=1024) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny.gguf"]
    assert client.models.retrieve("tiny.gguf").id == "tiny.gguf"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_non_streamed_and_streamed_agree(client):
    kw = dict(model="tiny.gguf", messages=HI, max_tokens=12, temperature=0)
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == "tiny.gguf"
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5 and 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # the same conversation again: its prompt is already in a slot's KV cache
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens - 1


def test_sampling_n_seed_stop_and_limits(client):
    kw = dict(model="tiny.gguf", messages=HI, max_completion_tokens=16, temperature=1.0, seed=7)
    a = client.chat.completions.create(**kw, n=3)
    b = client.chat.completions.create(**kw, n=3)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1, "each choice gets its own seed"
    # a stop string cuts the answer right before it
    full = client.chat.completions.create(model="tiny.gguf", messages=HI, max_tokens=30, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].message.content
    stop = full[len(full) // 2: len(full) // 2 + 2]
    cut = client.chat.completions.create(model="tiny.gguf", messages=HI, max_tokens=30, temperature=0, stop=[stop],
                                         extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == full[: full.index(stop)]
    # penalties and the llama.cpp extensions are accepted
    r = client.chat.completions.create(model="tiny.gguf", messages=HI, max_tokens=4, presence_penalty=1.0,
                                       frequency_penalty=0.5, top_p=0.9, extra_body={"top_k": 5, "min_p": 0.1})
    assert r.choices[0].finish_reason in ("stop", "length")


def test_max_tokens_is_capped_by_the_context(client):
    r = client.chat.completions.create(model="tiny.gguf", messages=HI, max_tokens=10**9,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens + r.usage.completion_tokens <= 1024


def test_logprobs(client):
    r = client.chat.completions.create(model="tiny.gguf", messages=HI, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)  # greedy: the best one was taken
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token
    assert "".join(t.token for t in content).startswith(r.choices[0].message.content[:1])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny.gguf", messages=HI, max_tokens=2, top_logprobs=3)


def test_legacy_completions(client):
    r = client.completions.create(model="tiny.gguf", prompt="The quick brown fox", max_tokens=8, temperature=0,
                                  logprobs=2)
    c = r.choices[0]
    assert r.object == "text_completion" and c.finish_reason in ("stop", "length")
    assert len(c.logprobs.tokens) == r.usage.completion_tokens and len(c.logprobs.top_logprobs[0]) == 2
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model="tiny.gguf", prompt="The quick brown fox", max_tokens=8, temperature=0, stream=True) if ch.choices)
    assert streamed == c.text
    echo = client.completions.create(model="tiny.gguf", prompt="The quick brown fox", max_tokens=8, temperature=0,
                                     echo=True)
    assert echo.choices[0].text == "The quick brown fox" + c.text
    two = client.completions.create(model="tiny.gguf", prompt=["Hello", "The KV cache"], max_tokens=3, n=2, seed=1)
    assert [ch.index for ch in two.choices] == [0, 1, 2, 3]
    default = client.completions.create(model="tiny.gguf", prompt="Hello", extra_body={"ignore_eos": True})
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens for this endpoint


def test_json_schema_is_enforced(client):
    for seed in range(3):
        r = client.chat.completions.create(
            model="tiny.gguf", messages=[{"role": "user", "content": "Weather as JSON"}], max_tokens=200, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}})
        assert r.choices[0].finish_reason == "stop"
        data = json.loads(r.choices[0].message.content)
        assert set(data) == {"city", "sunny", "days"}
        assert data["city"] in ("Paris", "Rome", "Oslo") and isinstance(data["sunny"], bool)
        assert isinstance(data["days"], int) and 1 <= data["days"] <= 9


def test_json_object_answers_are_json(client):
    r = client.chat.completions.create(model="tiny.gguf", messages=HI, max_tokens=300, seed=3, temperature=0.5,
                                       response_format={"type": "json_object"})
    text = r.choices[0].message.content
    assert text.lstrip().startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_forced_tool_call(client):
    for stream in (False, True):
        kw = dict(model="tiny.gguf", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER_TOOL],
                  tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=200, seed=1)
        if not stream:
            r = client.chat.completions.create(**kw)
            choice = r.choices[0]
            assert choice.finish_reason == "tool_calls"
            calls = choice.message.tool_calls
        else:
            chunks = list(client.chat.completions.create(**kw, stream=True))
            deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
            assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
            calls = deltas
        assert len(calls) == 1 and calls[0].id.startswith("call_")
        assert calls[0].function.name == "get_weather"
        args = json.loads(calls[0].function.arguments)
        assert args["city"] in ("Paris", "Rome") and args["unit"] in ("C", "F")
    # the conversation goes on with the tool's result
    call = calls[0]
    r = client.chat.completions.create(model="tiny.gguf", max_tokens=5, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "21 C, sunny"}], tools=[WEATHER_TOOL])
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny.gguf", messages=HI, tools=[WEATHER_TOOL],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    # "required": one of the tools, whichever the model picks
    flag = {"type": "function", "function": {"name": "set_flag", "parameters": {
        "type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"]}}}
    r = client.chat.completions.create(model="tiny.gguf", messages=HI, tools=[WEATHER_TOOL, flag],
                                       tool_choice="required", max_tokens=200, seed=4)
    [call] = r.choices[0].message.tool_calls
    assert call.function.name in ("get_weather", "set_flag") and isinstance(json.loads(call.function.arguments), dict)


def test_embeddings(client):
    r = client.embeddings.create(model="tiny.gguf", input=["Hello, world!", "The KV cache"])  # base64 by default
    assert [d.index for d in r.data] == [0, 1] and r.usage.prompt_tokens > 2
    v = r.data[0].embedding
    assert len(v) == 64 and math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-4)
    f = client.embeddings.create(model="tiny.gguf", input="Hello, world!", encoding_format="float").data[0].embedding
    assert f == pytest.approx(v, abs=1e-6)
    short = client.embeddings.create(model="tiny.gguf", input="Hello", dimensions=16).data[0].embedding
    assert len(short) == 16 and math.isclose(sum(x * x for x in short), 1.0, rel_tol=1e-4)


def test_errors_are_openai_errors(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=HI)
    assert e.value.code == "model_not_found"
    long = [{"role": "user", "content": "word " * 3000}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny.gguf", messages=long, max_tokens=4)
    assert e.value.code == "context_length_exceeded" and "truncate" in e.value.message
    # an explicit truncation is done, and said
    history = [m for i in range(40) for m in ({"role": "user", "content": f"question {i} " + "word " * 30},
                                              {"role": "assistant", "content": "answer"})] + HI
    raw = client.chat.completions.with_raw_response.create(model="tiny.gguf", messages=history, max_tokens=4,
                                                           extra_body={"truncate": True})
    body = raw.parse()
    assert int(raw.headers["x-llmdesk-truncated-tokens"]) > 0
    assert body.model_extra["truncated_prompt_tokens"] == int(raw.headers["x-llmdesk-truncated-tokens"])
    assert body.usage.prompt_tokens < 1024
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny.gguf", "messages": HI, "n": "2"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
