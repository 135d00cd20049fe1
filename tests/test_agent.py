"""Tools in the Python API: `model.chat(messages, tools=[...])` runs the agent loop (runtime/agent.py)
on a real model that really calls them (grammar-forced calls on the tiny model: its random
weights write nothing useful unforced), locally and through a real `llmdesk serve` on loopback,
and `llmdesk chat --max-steps`."""

from __future__ import annotations

import threading
from typing import Literal

import pytest
from test_cli_run import cli
from test_serve_util import running
from test_toolcall_families import FAMILIES, TEMPLATES, Written

import llmdesk
from llmdesk.errors import LlmdeskError
from llmdesk.runtime.agent import AgentResult, run_agent
from llmdesk.runtime.model import Model

GO = [{"role": "user", "content": "Add some numbers."}]


@pytest.fixture(scope="module")
def model(tiny_gguf):
    with Model(tiny_gguf, ctx=1024, threads=1) as m:
        yield m


def add(a: int, b: int) -> int:
    """Add two numbers.

    Args:
        a: the first number
        b: the second number
    """
    return a + b


def shout(word: Literal["hi", "bye"]) -> str:
    """Say a word loudly."""
    return word.upper() + "!"


def test_chat_with_tools_runs_the_calls_and_returns_the_answer(model):
    r = model.chat(GO, tools=[add], tool_choice="required", max_steps=2, max_tokens=200, temperature=0)
    assert isinstance(r, AgentResult) and str(r) == r.text
    # the model called add in each of the 2 rounds it was made to; the calls really ran
    assert len(r.runs) == 2 and all(run.name == "add" and run.ok for run in r.runs)
    for run in r.runs:
        assert run.result == str(run.arguments["a"] + run.arguments["b"])
    # then it had to answer without tools: the result says the loop was cut short
    assert r.max_steps_reached and r.steps == 2
    assert r.messages[-1] == {"role": "assistant", "content": r.text}
    assert [m["content"] for m in r.messages if m["role"] == "tool"] == [run.result for run in r.runs]


def test_a_named_tool_is_the_one_called(model):
    seen = []
    r = model.chat(GO, tools=[add, shout], tool_choice={"type": "function", "function": {"name": "shout"}},
                   max_steps=1, on_run=seen.append, max_tokens=100, temperature=0)
    assert [run.name for run in r.runs] == ["shout"] and seen == r.runs
    assert r.runs[0].result in ("HI!", "BYE!")


def test_a_tool_that_raises_or_hangs_becomes_a_result_and_the_loop_goes_on(model):
    release = threading.Event()
    calls = []

    def stuck(a: int) -> str:
        """Never returns on the first call."""
        calls.append(a)
        if len(calls) == 1:
            release.wait()
        raise ValueError("no luck")

    try:
        r = model.chat(GO, tools=[stuck], tool_choice="required", max_steps=2, tool_timeout=0.5, max_tokens=100,
                       temperature=0)
    finally:
        release.set()
    assert [run.ok for run in r.runs] == [False, False]
    assert r.runs[0].result == "error: stuck did not finish within 0.5 s and was left running; its result is lost"
    assert r.runs[1].result == "error: ValueError: no luck"
    assert r.max_steps_reached and r.text == r.messages[-1]["content"]


def test_a_declined_call_does_not_run(model):
    ran = []

    def plus(a: int, b: int) -> None:
        ran.append(1)

    r = model.chat(GO, tools={"add": plus}, tool_choice="required", max_steps=1, confirm=lambda call: False,
                   max_tokens=200, temperature=0)
    assert not ran and [run.result for run in r.runs] == ["declined: the user did not allow this call"]


def test_without_tools_chat_is_text_as_before(model):
    kw = dict(max_tokens=12, temperature=0)
    text = model.chat(GO, **kw)
    assert isinstance(text, str) and text == model.complete(model.chat_tokens(GO), **model._chat_kw(kw)).text


def test_bad_tool_arguments_are_one_line(model):
    with pytest.raises(LlmdeskError, match="cannot be a tool"):
        model.chat(GO, tools=[lambda x: x])
    with pytest.raises(LlmdeskError, match="tools must be a list of Python functions"):
        model.chat(GO, tools=add)
    with pytest.raises(LlmdeskError, match="two functions are named 'add'"):
        model.chat(GO, tools=[add, add])
    with pytest.raises(LlmdeskError, match="max_steps must be at least 1"):
        model.chat(GO, tools=[add], max_steps=0)
    with pytest.raises(LlmdeskError, match="go with tools="):
        model.chat(GO, tool_choice="required")


def test_parallel_calls_run_side_by_side(tiny_gguf):
    """Two calls written in one turn (Qwen 2.5's format) run at the same time: each waits for the other."""
    both = threading.Barrier(2, timeout=30)

    def meet(city: str) -> str:
        """Wait for the other call."""
        both.wait()
        return f"met in {city}"

    calls = ('<tool_call>\n{"name": "meet", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "meet", "arguments": {"city": "Lima"}}\n</tool_call>')
    with Model(tiny_gguf, ctx=2048, threads=1, template=str(TEMPLATES / FAMILIES["qwen2.5"].template)) as m:
        r = run_agent(Written(m, [calls, "Both met."]), GO, {"meet": meet})
    assert [run.result for run in r.runs] == ["met in Oslo", "met in Lima"] and r.text == "Both met."


def test_remote_model_chat_runs_the_same_loop(tiny_gguf):
    with running(tiny_gguf, ctx=1024) as server, llmdesk.load(f"openai:{server.url}/v1#tiny.gguf") as remote:
        r = remote.chat(GO, tools=[shout], tool_choice="required", max_steps=1, max_tokens=100, temperature=0)
        assert [run.name for run in r.runs] == ["shout"] and r.runs[0].result in ("HI!", "BYE!")
        assert r.max_steps_reached and isinstance(r.text, str)
        assert isinstance(remote.chat(GO, max_tokens=4), str)


def test_chat_max_steps_on_the_command_line(tiny_gguf, tmp_path):
    tools = tmp_path / "t.py"
    tools.write_text("def add(a: int, b: int) -> int:\n    '''Add.'''\n    return a + b\n")
    p = cli("chat", "-m", tiny_gguf, "-n", "100", "--temperature", "0", "--tool", tools, "--yes",
            "--tool-choice", "required", "--max-steps", "1", stdin="go\n/bye\n", home=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("add -> ") == 1
    assert "still calling tools after 1 rounds; it answered without them: raise --max-steps" in p.stderr
    assert "--max-steps" in cli("chat", "--help", home=tmp_path).stdout
