"""Remote models (openai:URL#MODEL, named endpoints) against a real `llmdesk serve` on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import math
import socket
import subprocess
import threading

import httpx
import pytest
from conftest import llmdesk_exe
from test_serve_util import LONG, metric, running, start_server, wait_until

import llmdesk
from llmdesk.errors import LlmdeskError, ModelNotFound
from llmdesk.runtime.remote import RemoteModel
from llmdesk.store import refs

LLMDESK = llmdesk_exe()
HI = [{"role": "user", "content": "Hello, how are you today?"}]
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 9}},
          "required": ["city", "days"], "additionalProperties": False}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                   "required": ["city"]}}}
KEY = "remote-test-key-1234"


@pytest.fixture(scope="module")
def server(tiny_gguf):
    with running(tiny_gguf, parallel=2, ctx=1024) as s:
        yield s


@pytest.fixture
def remote(server):
    with llmdesk.load(f"openai:{server.url}/v1#tiny.gguf") as m:
        yield m


def cli(*args, home):
    env = {k: v for k, v in __import__("os").environ.items() if k != "LLMDESK_MODEL"}
    env["LLMDESK_HOME"] = str(home)
    return subprocess.run([LLMDESK, *map(str, args)], capture_output=True, text=True, env=env, timeout=120,
                          stdin=subprocess.DEVNULL)


def one_error_line(p) -> str:
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1, p.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in p.stderr, p.stderr
    return lines[0]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def write_endpoints(home, text: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "endpoints.toml").write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# the Model calls


def test_load_generate_stream_complete(remote, server):
    assert isinstance(remote, RemoteModel)
    assert remote.name == f"openai:{server.url}/v1#tiny.gguf" and remote.model == "tiny.gguf"
    assert remote.n_ctx is None  # llmdesk serve does not list context lengths
    kw = dict(max_tokens=8, temperature=0, ignore_eos=True)
    text = remote.generate("The quick brown fox", **kw)
    assert text and "".join(remote.stream("The quick brown fox", **kw)) == text
    c = remote.complete("The quick brown fox", logprobs=2, **kw)
    assert c.text == text and c.finish_reason == "length"
    assert c.completion_tokens == 8 and c.prompt_tokens > 0 and c.total_s >= c.ttft_s > 0
    assert len(c.logprobs) == 8 and all(lp.logprob <= 0 and lp.top for lp in c.logprobs)
    assert "".join(lp.text for lp in c.logprobs) == text
    assert c.to_dict()["completion_tokens"] == 8


def test_chat_and_chat_stream(remote):
    kw = dict(max_tokens=6, temperature=0, ignore_eos=True)
    text = remote.chat(HI, **kw)
    assert text and "".join(remote.chat_stream(HI, **kw)) == text
    s = remote.chat_start(HI, **kw)  # what `llmdesk run` drives
    pieces = [ev.text for ev in s]
    c = remote.finish(s)
    assert "".join(pieces) == c.text == text and c.completion_tokens == 6
    # a stream abandoned half way closes its connection: the server's slot is freed
    it = remote.chat_stream(HI, max_tokens=200, ignore_eos=True)
    next(it)
    it.close()
    assert remote.chat(HI, **kw) == text


def test_the_model_reference_without_a_model_takes_the_first_listed(server, tiny_gguf):
    with llmdesk.load(f"openai:{server.url}/v1") as m:
        assert m.model == "tiny.gguf" and m.name.endswith("/v1#tiny.gguf")
    with llmdesk.load(f"openai:{server.url}/v1#tiny") as m:  # an alias the server knows, though not listed
        assert m.model == "tiny" and m.generate("Hi", max_tokens=2, temperature=0, ignore_eos=True)
    with pytest.raises(ModelNotFound) as e:
        llmdesk.load(f"openai:{server.url}/v1#nope")
    assert str(e.value) == (f"model 'nope' not found at {server.url}/v1: GET {server.url}/v1/models lists "
                            "tiny.gguf")


def test_respond_json_schema(remote):
    seen = []
    reply = remote.respond([{"role": "user", "content": "Weather as JSON"}], max_tokens=200, seed=1,
                           on_text=seen.append,
                           response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}})
    assert reply.finish_reason == "stop" and "".join(seen) == reply.text
    data = reply.json()
    assert set(data) == {"city", "days"} and data["city"] in ("Paris", "Rome", "Oslo") and 1 <= data["days"] <= 9
    assert reply.prompt_tokens > 0 and reply.completion_tokens > 0 and reply.total_s > 0


def test_respond_pydantic(remote):
    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        city: str = Field(max_length=10)
        days: int = Field(ge=1, le=9)

    reply = remote.respond([{"role": "user", "content": "Weather as JSON"}], max_tokens=200, seed=1,
                           response_format=Weather)
    assert isinstance(reply.parsed, Weather) and reply.parsed.model_dump() == reply.json()


def test_respond_tool_calls_and_the_conversation_goes_on(remote):
    question = [{"role": "user", "content": "Weather in Paris?"}]
    reply = remote.respond(question, tools=[WEATHER_TOOL], max_tokens=200, seed=1,
                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert reply.finish_reason == "tool_calls" and reply.text == ""
    [call] = reply.tool_calls
    assert call.name == "get_weather" and call.arguments["city"] in ("Paris", "Rome") and call.id.startswith("call_")
    # the reply as a message (arguments as an object) and the tool's result go back
    follow = remote.respond(question + [reply.message(), {"role": "tool", "tool_call_id": call.id, "content": "21 C"}],
                            tools=[WEATHER_TOOL], max_tokens=4)
    assert follow.finish_reason in ("stop", "length", "tool_calls")


def test_respond_sampling_keywords_reach_the_server(remote):
    a = remote.respond(HI, max_tokens=6, temperature=1.0, top_k=5, min_p=0.1, repeat_penalty=1.3, seed=7)
    b = remote.respond(HI, max_tokens=6, temperature=1.0, top_k=5, min_p=0.1, repeat_penalty=1.3, seed=7)
    assert a.text == b.text  # the seed reached the server
    with pytest.raises(LlmdeskError) as e:  # the server's bounds, passed on as one line
        remote.respond(HI, max_tokens=2, top_p=7.0)
    assert str(e.value).startswith("the endpoint refused the request (400: ") and "top_p" in str(e.value)
    with pytest.raises(LlmdeskError, match="grammar cannot be sent"):
        remote.generate("Hi", grammar='root ::= "a"')
    with pytest.raises(TypeError):
        remote.generate("Hi", temprature=0)


def test_embed(remote):
    vectors = remote.embed(["Hello, world!", "The KV cache"])
    assert len(vectors) == 2 and len(vectors[0]) == 64 and vectors[0] != vectors[1]
    assert all(math.isclose(math.hypot(*v), 1.0, rel_tol=1e-4) for v in vectors)
    [one] = remote.embed("Hello, world!")  # alone rather than in a batch: the same up to rounding
    assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(one, vectors[0]))


# ---------------------------------------------------------------------------------------------
# keys and named endpoints


def test_api_key_from_an_environment_variable(tiny_gguf, user_dir, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)  # every logger, httpx's too: the key must be in none of it
    with running(tiny_gguf, parallel=1, ctx=512, api_key=KEY) as s:
        write_endpoints(user_dir, f'[endpoints.mine]\nurl = "{s.url}/v1"\nkey_env = "TEST_REMOTE_KEY"\n'
                                  'model = "tiny.gguf"\n')
        monkeypatch.delenv("TEST_REMOTE_KEY", raising=False)
        with pytest.raises(LlmdeskError) as e:
            llmdesk.load("openai:mine")
        assert str(e.value).startswith("TEST_REMOTE_KEY is not set: endpoint 'mine' in ")

        monkeypatch.setenv("TEST_REMOTE_KEY", KEY)
        with llmdesk.load("openai:mine") as m:
            assert m.name == "openai:mine#tiny.gguf" and m.generate("Hi", max_tokens=3, ignore_eos=True)
            assert KEY not in repr(m) and KEY not in repr(m.ref) and KEY not in str(vars(m))

        wrong = "wrong-key-" + "x" * 12
        monkeypatch.setenv("TEST_REMOTE_KEY", wrong)
        with pytest.raises(LlmdeskError) as e:
            llmdesk.load("openai:mine")
        msg = str(e.value)
        assert msg.startswith("the endpoint answered 401") and msg.endswith("set TEST_REMOTE_KEY to a valid key")
        assert wrong not in msg and "\n" not in msg

        with pytest.raises(LlmdeskError) as e:  # a URL reference carries no key: say where one goes
            llmdesk.load(f"openai:{s.url}/v1#tiny.gguf")
        assert "401" in str(e.value) and "key_env" in str(e.value) and "endpoints.toml" in str(e.value)
    assert caplog.records and not any(KEY in r.getMessage() or wrong in r.getMessage() for r in caplog.records)


def test_named_endpoints(server, user_dir):
    write_endpoints(user_dir, f'[endpoints.local]\nurl = "{server.url}/v1/"\n\n'
                              f'[endpoints.with-model]\nurl = "{server.url}/v1"\nmodel = "tiny"\n')
    ref = refs.resolve("openai:local", allow_remote=True)
    assert (ref.kind, ref.base_url, ref.model, ref.endpoint, ref.key_env) == (
        "remote", f"{server.url}/v1", None, "local", None)
    with llmdesk.load("openai:local") as m:
        assert m.name == "openai:local#tiny.gguf"
    with llmdesk.load("openai:with-model") as m:
        assert m.model == "tiny"
    with llmdesk.load(refs.resolve("openai:with-model#tiny.gguf", allow_remote=True)) as m:  # '#' wins
        assert m.model == "tiny.gguf"
    with pytest.raises(LlmdeskError) as e:
        refs.resolve("openai:other", allow_remote=True)
    assert "no endpoint named 'other' in " in str(e.value) and "(it has local, with-model)" in str(e.value)


@pytest.mark.parametrize("text, expected", [
    ('[endpoints.a]\nurl = "http://h/v1"\napi_key = "sk-SECRET"\n', "has 'api_key': keys are not kept in this file"),
    ('[endpoints.a]\nmodel = "m"\n', "[endpoints.a] has no url"),
    ('[endpoints.a]\nurl = "ftp://h/v1"\n', "[endpoints.a].url must start with http:// or https://"),
    ('[endpoints.a]\nurl = "http://h/v1"\nkey_env = "MY KEY"\n', "key_env must be the name of an environment variable"),
    ('[endpoints.a]\nurl = "http://h/v1"\nmodle = "m"\n', "unknown setting 'modle'"),
    ('[endpoints.a]\nurl = 8000\n', "[endpoints.a].url must be a string"),
    ('[endpoint.a]\nurl = "http://h/v1"\n', "unknown table or key 'endpoint'"),
    ('[endpoints.a\nurl = "http://h/v1"\n', "is not valid TOML"),
])
def test_bad_endpoints_files(user_dir, text, expected):
    write_endpoints(user_dir, text)
    with pytest.raises(LlmdeskError) as e:
        refs.resolve("openai:a", allow_remote=True)
    msg = str(e.value)
    assert expected in msg and "endpoints.toml" in msg and "\n" not in msg and "SECRET" not in msg


@pytest.mark.parametrize("ref, expected", [
    ("openai:", "names no endpoint"),
    ("openai:http://127.0.0.1:8080/v1#", "nothing after '#'"),
    ("openai:ftp://127.0.0.1/v1#m", "must start with http:// or https://, not ftp://"),
    ("openai:127.0.0.1:8080/v1#m", "neither an http(s) URL nor an endpoint name (a URL starts with http://"),
    ("openai:http://user:sk-SECRET@127.0.0.1/v1#m", "carries credentials before '@'"),
    ("openai:http://127.0.0.1:8080/v1?key=1#m", "has a query string"),
    ("openai:http://127.0.0.1:99999/v1#m", "is not a valid URL"),
    ("openai:http:///v1#m", "has no host"),
    ("openai:http://127.0.0.1/v1#a b", "has a space"),
    ("openai:nowhere", "no endpoint named 'nowhere' ("),
])
def test_bad_reference_forms(ref, expected):
    with pytest.raises(LlmdeskError) as e:
        refs.resolve(ref, allow_remote=True)
    msg = str(e.value)
    assert expected in msg and "\n" not in msg and "SECRET" not in msg


def test_commands_that_need_a_file_refuse_remote_references(tmp_path):
    with pytest.raises(LlmdeskError, match="is a model behind an HTTP API; this needs a local model"):
        refs.resolve("openai:http://127.0.0.1:8080/v1#m")
    line = one_error_line(cli("show", "openai:http://127.0.0.1:8080/v1#m", home=tmp_path))
    assert "needs a local model" in line


def test_local_references_keep_their_kinds(tiny_gguf, user_dir):
    from llmdesk.store import catalog

    ref = refs.resolve(str(tiny_gguf))
    assert (ref.kind, ref.name, ref.path, ref.entry, ref.is_remote) == ("file", "tiny.gguf", tiny_gguf, None, False)
    catalog.add_file(tiny_gguf, "tiny", "latest", progress=False)
    ref = refs.resolve("tiny")
    assert ref.kind == "store" and ref.name == "tiny:latest" and ref.entry.path == ref.path


# ---------------------------------------------------------------------------------------------
# failures: retries, dead endpoints


def test_busy_endpoint_is_retried_then_answers(tiny_gguf):
    """parallel=1 and no queue: while a long answer runs every other request gets 429 with
    Retry-After. A client that may not retry says so in one line; one that may waits and retries."""
    with running(tiny_gguf, parallel=1, max_queue=0, ctx=4096) as s:
        ref = refs.resolve(f"openai:{s.url}/v1#tiny.gguf", allow_remote=True)
        eager, patient = RemoteModel(ref, max_retries=0), RemoteModel(ref)
        taken = threading.Event()

        def hold():  # the long answer, until the patient client has been refused once
            body = {"model": "tiny.gguf", "messages": HI, "stream": True, **LONG}
            with httpx.Client(timeout=60) as c, c.stream("POST", s.url + "/v1/chat/completions", json=body) as r:
                lines = r.iter_lines()  # kept: a dropped generator would close the response
                next(lines)
                taken.set()
                wait_until(lambda: metric(s.url, "llmdesk_rejected_total", reason="queue_full") >= 2, timeout=60)
            # the connection closes here: the server cancels the answer and the slot is free

        t = threading.Thread(target=hold, daemon=True)
        t.start()
        assert taken.wait(60)
        with pytest.raises(LlmdeskError) as e:
            eager.generate("Hi", max_tokens=2)
        assert str(e.value).startswith("the endpoint is busy (429: ") and "\n" not in str(e.value)
        c = patient.complete("Hi", max_tokens=3, ignore_eos=True)  # refused, waits Retry-After, retried
        t.join(60)
        assert c.completion_tokens == 3
        assert metric(s.url, "llmdesk_rejected_total", reason="queue_full") == 2
        eager.close()
        patient.close()


def test_a_server_that_goes_away_is_retried_then_named(tiny_gguf):
    server = start_server(tiny_gguf, parallel=1, ctx=512)
    try:
        m = RemoteModel(f"openai:{server.url}/v1#tiny.gguf", max_retries=2)
        assert m.generate("Hi", max_tokens=2, ignore_eos=True)
    finally:
        server.stop()
    with pytest.raises(LlmdeskError) as e:  # refused three times (two retries), then one line
        m.generate("Hi", max_tokens=2)
    assert str(e.value).startswith(f"cannot reach {server.url}/v1 (connection refused); is the server running?; "
                                   "tried 3 times in ")
    m.close()


def test_run_against_a_server_and_a_dead_endpoint(server, remote, tmp_path):
    """The issue's check: `llmdesk run -m openai:URL#NAME "hi"` works, a dead endpoint is one line."""
    p = cli("run", "-m", f"openai:{server.url}/v1#tiny.gguf", "-t", "0", "-n", "6", "hi", home=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == remote.chat([{"role": "user", "content": "hi"}], max_tokens=6, temperature=0).strip()
    p = cli("run", "-m", f"openai:{server.url}/v1#tiny.gguf", "-t", "0", "-n", "4", "--json", "--no-log", "hi",
            home=tmp_path)
    d = json.loads(p.stdout)
    assert d["model"] == f"openai:{server.url}/v1#tiny.gguf" and d["prompt_tokens"] > 0
    port = closed_port()
    line = one_error_line(cli("run", "-m", f"openai:http://127.0.0.1:{port}/v1#x", "hi", home=tmp_path))
    assert line == f"error: cannot reach http://127.0.0.1:{port}/v1 (connection refused); is the server running?"
    line = one_error_line(cli("run", "-m", f"openai:{server.url}/v1#nope", "hi", home=tmp_path))
    assert line.startswith("error: model 'nope' not found at ")
    line = one_error_line(cli("run", "-m", "openai:http://127.0.0.1:8080/v1#", "hi", home=tmp_path))
    assert "nothing after '#'" in line
