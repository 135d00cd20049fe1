"""The conversation layer (runtime/conversation.py), Python functions as tools, and `llmdesk chat`
on top of them: the same path the server's chat routes take. The agent loop: test_agent.py."""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Literal, Optional, TypedDict

import pytest
from test_cli_run import cli, one_error_line

from llmdesk.errors import LlmdeskError
from llmdesk.runtime import conversation
from llmdesk.runtime.engine import ContextOverflow
from llmdesk.runtime.limits import InvalidRequest
from llmdesk.runtime.model import Model
from llmdesk.runtime.functions import function_tool, load_functions


@pytest.fixture(scope="module")
def model(tiny_gguf):
    with Model(tiny_gguf, ctx=1024, threads=1) as m:
        yield m


LONG_CHAT = [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok " * 50}] * 6


# ---------------------------------------------------------------------------------------------
# the conversation layer


def test_context_policy_is_explicit_and_reported(model):
    msgs = LONG_CHAT + [{"role": "user", "content": "the last question"}]
    with pytest.raises(ContextOverflow, match="truncat"):
        model.respond(msgs, max_tokens=4)
    r = model.respond([{"role": "system", "content": "Be brief."}] + msgs, max_tokens=4, truncate=True)
    assert r.messages_dropped > 0 and r.truncated_tokens > 0
    assert r.prompt_tokens < model.n_ctx
    # the system prompt and the last question are kept: the prompt is what was left, rendered
    turn = conversation.prepare(model, conversation.normalize_messages([{"role": "system", "content": "Be brief."}]
                                                                       + msgs), truncate=True, max_tokens=4)
    text = model.detokenize(turn.prompt.tokens, special=True)
    assert "Be brief." in text and "the last question" in text
    assert turn.prompt.messages_dropped == r.messages_dropped


def test_json_schema_output_is_enforced(model):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 1,
                                                                                 "maximum": 3}},
              "required": ["ok", "n"], "additionalProperties": False}
    for seed in range(3):
        r = model.respond([{"role": "user", "content": "hi"}], max_tokens=64, seed=seed,
                          response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
        data = r.json()
        assert set(data) == {"ok", "n"} and isinstance(data["ok"], bool) and data["n"] in (1, 2, 3)


def test_a_pydantic_model_gives_a_validated_object(model):
    from typing import Literal

    from pydantic import BaseModel, Field

    class Forecast(BaseModel):
        city: Literal["Paris", "Rome"]
        days: int = Field(ge=1, le=5)

    for seed in range(2):
        r = model.respond([{"role": "user", "content": "A forecast"}], max_tokens=64, seed=seed, response_format=Forecast)
        assert isinstance(r.parsed, Forecast) and r.parsed == Forecast.model_validate_json(r.text)
    with pytest.raises(LlmdeskError, match=r"does not validate as Forecast: .*\(the answer was cut off: raise max_tokens\)"):
        model.respond([{"role": "user", "content": "A forecast"}], max_tokens=3, response_format=Forecast)


def test_bounds_are_the_library_s(model):
    with pytest.raises(InvalidRequest) as e:
        model.respond([{"role": "user", "content": "hi"}], temperature=float("nan"))
    assert e.value.param == "temperature"
    with pytest.raises(InvalidRequest) as e:
        model.respond([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    assert e.value.param == "messages[0].content[0]"
    with pytest.raises(InvalidRequest):
        model.respond([{"role": "user", "content": "hi"}], response_format={"type": "xml"})


def test_forced_tool_call_comes_back_parsed(model):
    tools = [function_tool(add)]
    r = model.respond([{"role": "user", "content": "add"}], tools=tools, tool_choice="required", max_tokens=200,
                      temperature=0)
    assert r.finish_reason == "tool_calls" and r.tool_calls[0].name == "add"
    assert set(r.tool_calls[0].arguments) == {"a", "b"}
    msg = r.message()
    assert msg["tool_calls"][0]["function"]["arguments"] == r.tool_calls[0].arguments


def test_streamed_text_equals_the_reply(model):
    seen = []
    r = model.respond([{"role": "user", "content": "hi"}], max_tokens=16, seed=3, on_text=seen.append)
    assert "".join(seen) == r.text


# ---------------------------------------------------------------------------------------------
# functions as tools


class Unit(enum.Enum):
    C = "celsius"
    F = "fahrenheit"


@dataclasses.dataclass
class Place:
    city: str
    country: str = "FR"


class Window(TypedDict):
    start: str
    days: int


def add(a: int, b: int) -> int:
    """Add two numbers.

    Args:
        a: the first number
        b: the second number
    """
    return a + b


def weather(place: Place, unit: Unit = Unit.C, when: Optional[Window] = None, detail: Literal["short", "long"] = "short",
            tags: list[str] | None = None) -> dict:
    """The weather somewhere.

    :param place: where
    :param unit: the temperature scale
    """
    return {}


def test_function_schemas_from_hints_and_docstrings():
    t = function_tool(add)["function"]
    assert t["name"] == "add" and t["description"] == "Add two numbers."
    assert t["parameters"] == {"type": "object", "required": ["a", "b"], "properties": {
        "a": {"type": "integer", "description": "the first number"},
        "b": {"type": "integer", "description": "the second number"}}}
    w = function_tool(weather)["function"]["parameters"]
    assert w["required"] == ["place"]
    assert w["properties"]["place"] == {"type": "object", "properties": {"city": {"type": "string"},
                                                                        "country": {"type": "string"}},
                                        "required": ["city"], "description": "where"}
    assert w["properties"]["unit"]["enum"] == ["celsius", "fahrenheit"]
    assert w["properties"]["detail"] == {"enum": ["short", "long"], "default": "short"}
    assert w["properties"]["when"]["anyOf"][1] == {"type": "null"}
    assert w["properties"]["tags"]["anyOf"][0] == {"type": "array", "items": {"type": "string"}}
    # every schema a function gives is one the grammar converter accepts
    from llmdesk.runtime.grammars import schema_grammar

    schema_grammar(w)

    def bad(*args):
        pass

    with pytest.raises(LlmdeskError, match=r"\*args"):
        function_tool(bad)


def test_load_functions_takes_the_files_own_public_functions(tmp_path):
    f = tmp_path / "mytools.py"
    f.write_text("from os.path import join\n\ndef shout(text: str) -> str:\n    '''Loud.'''\n    return text.upper()\n\n"
                 "def _hidden():\n    pass\n")
    assert list(load_functions(f)) == ["shout"]
    (tmp_path / "broken.py").write_text("def f(:\n")
    with pytest.raises(LlmdeskError, match="failed to load"):
        load_functions(tmp_path / "broken.py")
    with pytest.raises(LlmdeskError, match="no such file"):
        load_functions(tmp_path / "missing.py")


# ---------------------------------------------------------------------------------------------
# llmdesk chat on the same path


def test_chat_keeps_going_past_the_context(tiny_gguf, tmp_path):
    script = "\n".join(["word " * 150] * 6 + ["/bye"]) + "\n"
    p = cli("chat", "-m", tiny_gguf, "--ctx", "512", "-n", "8", stdin=script, home=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "outgrew the context of 512 tokens" in p.stderr
    assert "error" not in p.stderr


def test_chat_json_schema_answers(tiny_gguf, tmp_path):
    schema = tmp_path / "answer.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                                  "additionalProperties": False}))
    p = cli("chat", "-m", tiny_gguf, "-n", "64", "--schema", schema, stdin="hello\nagain\n/bye\n", home=tmp_path)
    assert p.returncode == 0, p.stderr
    # input()'s ">>> " prompt goes to stdout too
    answers = [json.loads(line.replace(">>> ", "")) for line in p.stdout.splitlines() if line.replace(">>> ", "").strip()]
    assert len(answers) == 2 and all(set(a) == {"ok"} for a in answers)
    p = cli("chat", "-m", tiny_gguf, "-n", "64", "--json", stdin="hello\n/bye\n", home=tmp_path)
    # any JSON object (the tiny model's strings run on; a schema is what bounds them)
    assert p.returncode == 0 and p.stdout.replace(">>> ", "").lstrip().startswith("{")


def test_chat_tools_load_and_bad_inputs_are_one_line(tiny_gguf, tmp_path):
    tools = tmp_path / "t.py"
    tools.write_text("def add(a: int, b: int) -> int:\n    '''Add.'''\n    return a + b\n")
    p = cli("chat", "-m", tiny_gguf, "-n", "4", "--tool", tools, stdin="/bye\n", home=tmp_path)
    assert p.returncode == 0 and "tools: add" in p.stderr, p.stderr
    (tmp_path / "bad.json").write_text("{nope")
    assert "not JSON" in one_error_line(cli("chat", "-m", tiny_gguf, "--schema", tmp_path / "bad.json",
                                            stdin="", home=tmp_path))
    assert "no such file" in one_error_line(cli("chat", "-m", tiny_gguf, "--tool", tmp_path / "none.py",
                                                stdin="", home=tmp_path))
    (tmp_path / "weird.py").write_text("def f(x: object) -> None:\n    pass\n")
    assert "cannot be described as JSON" in one_error_line(cli("chat", "-m", tiny_gguf, "--tool",
                                                               tmp_path / "weird.py", stdin="", home=tmp_path))


def test_run_takes_a_schema_through_the_same_path(tiny_gguf, tmp_path):
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"n": {"enum": [1, 2, 3]}}, "required": ["n"],
                                  "additionalProperties": False}))
    p = cli("run", "-m", tiny_gguf, "-n", "64", "--schema", schema, "pick", home=tmp_path)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["n"] in (1, 2, 3)
    p = cli("run", "-m", tiny_gguf, "-n", "64", "--schema", schema, "--json", "pick", home=tmp_path)
    assert json.loads(json.loads(p.stdout)["text"])["n"] in (1, 2, 3)
    assert "--format" in one_error_line(cli("run", "-m", tiny_gguf, "--format", "yaml", "x", home=tmp_path))


def test_truncating_a_huge_conversation_renders_it_a_few_times(model, monkeypatch):
    msgs = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"}] * 1000
    renders = []
    real = model.chat_tokens
    monkeypatch.setattr(model, "chat_tokens", lambda ms, **kw: renders.append(len(ms)) or real(ms, **kw))
    turn = conversation.prepare(model, conversation.normalize_messages(msgs + [{"role": "user", "content": "q"}]),
                                truncate=True, max_tokens=4)
    assert len(turn.prompt.tokens) < model.n_ctx and turn.prompt.messages_dropped > 1900
    assert len(renders) <= 14  # bisection over 1001 places to start: not one render per message
    # the kept part starts on a user turn, right after the dropped ones
    kept = conversation.normalize_messages(msgs + [{"role": "user", "content": "q"}])[turn.prompt.messages_dropped:]
    assert kept[0]["role"] == "user"
    with pytest.raises(InvalidRequest, match="limit is 4096"):
        conversation.normalize_messages([{"role": "user", "content": "x"}] * 4097)
