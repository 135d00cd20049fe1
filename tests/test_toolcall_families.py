"""Tool calls in the formats of six model families, through those models' own chat templates.

The templates in tests/chat_templates/ are the models' own, as llama.cpp's repository carries
them (models/templates/): Qwen 2.5, Hermes 2 Pro, Llama 3.1, Mistral Nemo, Functionary v3.1,
Granite 3.3. Each test runs the agent loop (runtime/agent.py) over the real conversation layer:
every round is rendered and tokenized through the family's template on a real llama.cpp model
(the tiny one, loaded with that template), and the answer is read back by the real parser. Only
the answer's text is given, written as the family's model writes its calls: random weights do
not write them (the forced calls of test_agent.py are the tiny model's own).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from llmdesk.runtime import conversation
from llmdesk.runtime.agent import run_agent
from llmdesk.runtime.engine import Result, sampling_params
from llmdesk.runtime.functions import function_tool
from llmdesk.runtime.model import Model

TEMPLATES = Path(__file__).parent / "chat_templates"


@dataclass
class Family:
    template: str
    # what the model writes: two calls in one turn, then the same call three ways wrong
    two_calls: str
    bad_json: str
    unknown_tool: str
    wrong_types: str
    # what the prompt after the calls must hold, in the family's format
    tools_seen: list[str]
    calls_seen: list[str]
    results_seen: list[str]


FAMILIES = {
    "qwen2.5": Family(
        "Qwen-Qwen2.5-7B-Instruct.jinja",
        two_calls='<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
                  '<tool_call>\n{"name": "get_time", "arguments": {"city": "Lima"}}\n</tool_call>',
        bad_json='<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"\n</tool_call>',
        unknown_tool='<tool_call>\n{"name": "get_forecast", "arguments": {"city": "Oslo"}}\n</tool_call>',
        wrong_types='<tool_call>\n{"name": "get_weather", "arguments": {"city": 5}}\n</tool_call>',
        tools_seen=['<tools>\n{"type": "function", "function": {"name": "get_weather", "description": "The weather '
                    'in a city now.", "parameters": {"type": "object"'],
        calls_seen=['<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
                    '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"city": "Lima"}}\n</tool_call>'
                    '<|im_end|>'],
        results_seen=['<|im_start|>user\n<tool_response>\n12 C in Oslo\n</tool_response>\n<tool_response>\n'
                      '9:00 in Lima\n</tool_response><|im_end|>'],
    ),
    "hermes-2-pro": Family(
        "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja",
        two_calls='<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
                  '<tool_call>\n{"name": "get_time", "arguments": {"city": "Lima"}}\n</tool_call>',
        bad_json='<tool_call>\n{"name": "get_weather", "arguments": {"city": Oslo}}\n</tool_call>',
        unknown_tool='<tool_call>\n{"name": "get_forecast", "arguments": {"city": "Oslo"}}\n</tool_call>',
        wrong_types='<tool_call>\n{"name": "get_weather", "arguments": {"town": "Oslo"}}\n</tool_call>',
        tools_seen=['You are a function calling AI model.', '<tools> {"type": "function", "function": {"name": '
                    '"get_weather"'],
        calls_seen=['<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
                    '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"city": "Lima"}}\n</tool_call>'
                    '<|im_end|>'],
        results_seen=['<|im_start|>tool\n<tool_response>\n12 C in Oslo\n</tool_response>\n<tool_response>\n'
                      '9:00 in Lima\n</tool_response><|im_end|>'],
    ),
    "llama3.1": Family(
        "meta-llama-Llama-3.1-8B-Instruct.jinja",
        # Llama 3.1 writes a custom tool's call as bare JSON with "parameters"; several: ";" between
        two_calls='{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
                  '{"name": "get_time", "parameters": {"city": "Lima"}}',
        bad_json='{"name": "get_weather", "parameters": {"city": "Oslo"',
        unknown_tool='<|python_tag|>{"name": "get_forecast", "parameters": {"city": "Oslo"}}',
        wrong_types='{"name": "get_weather", "parameters": {"city": ["Oslo"]}}',
        tools_seen=['Given the following functions, please respond with a JSON for a function call',
                    '"name": "get_weather",'],
        # the template takes one call per assistant turn: two calls are two turns
        calls_seen=['<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": '
                    '{"city": "Oslo"}}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n{"name": '
                    '"get_time", "parameters": {"city": "Lima"}}<|eot_id|>'],
        results_seen=['<|start_header_id|>ipython<|end_header_id|>\n\n"12 C in Oslo"<|eot_id|>'
                      '<|start_header_id|>ipython<|end_header_id|>\n\n"9:00 in Lima"<|eot_id|>'],
    ),
    "mistral-nemo": Family(
        "mistralai-Mistral-Nemo-Instruct-2407.jinja",
        two_calls='[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}, '
                  '{"name": "get_time", "arguments": {"city": "Lima"}}]',
        bad_json='[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}',
        unknown_tool='[TOOL_CALLS][{"name": "get_forecast", "arguments": {"city": "Oslo"}}]',
        wrong_types='[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": null}}]',
        tools_seen=['[AVAILABLE_TOOLS][{"type": "function", "function": {"name": "get_weather"'],
        calls_seen=['[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}, "id": "',
                    '{"name": "get_time", "arguments": {"city": "Lima"}, "id": "'],
        results_seen=['[TOOL_RESULTS]{"content": 12 C in Oslo, "call_id": "',
                      '[TOOL_RESULTS]{"content": 9:00 in Lima, "call_id": "'],
    ),
    "functionary-v3.1": Family(
        "meetkai-functionary-medium-v3.1.jinja",
        two_calls='<function=get_weather>{"city": "Oslo"}</function><function=get_time>{"city": "Lima"}</function>',
        bad_json='<function=get_weather>{"city": "Oslo",}</function>',
        unknown_tool='<function=get_forecast>{"city": "Oslo"}</function>',
        wrong_types='<function=get_weather>{"city": true}</function>',
        tools_seen=["Use the function 'get_weather' to 'The weather in a city now.'",
                    "Use the function 'get_time' to 'The time in a city now.'"],
        calls_seen=['<|start_header_id|>assistant<|end_header_id|>\n\n<function=get_weather>{"city": "Oslo"}'
                    '</function><function=get_time>{"city": "Lima"}</function><|eom_id|>'],
        results_seen=['<|start_header_id|>ipython<|end_header_id|>\n\n12 C in Oslo<|eot_id|>'
                      '<|start_header_id|>ipython<|end_header_id|>\n\n9:00 in Lima<|eot_id|>'],
    ),
    "granite-3.3": Family(
        "ibm-granite-granite-3.3-2B-Instruct.jinja",
        two_calls='<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Oslo"}}, '
                  '{"name": "get_time", "arguments": {"city": "Lima"}}]',
        bad_json='<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Oslo"}]',
        unknown_tool='<|tool_call|>[{"name": "get_forecast", "arguments": {"city": "Oslo"}}]',
        wrong_types='<|tool_call|>[{"name": "get_weather", "arguments": {"city": 5.5}}]',
        tools_seen=['<|start_of_role|>available_tools<|end_of_role|>[\n    {\n        "type": "function",'],
        # the template leaves calls out of assistant turns: they are written into the text, as the model wrote them
        calls_seen=['<|start_of_role|>assistant<|end_of_role|><|tool_call|>[{"name": "get_weather", "arguments": '
                    '{"city": "Oslo"}}, {"name": "get_time", "arguments": {"city": "Lima"}}]<|end_of_text|>'],
        results_seen=['<|start_of_role|>tool<|end_of_role|>12 C in Oslo<|end_of_text|>\n'
                      '<|start_of_role|>tool<|end_of_role|>9:00 in Lima<|end_of_text|>'],
    ),
}


class Written:
    """A real model (the tiny one with the family's template) whose answers are given as text: each
    round goes through the conversation layer (checks, template, tokenizer, context) and each
    answer through the real parser; the prompts are kept as the model would have read them."""

    def __init__(self, model: Model, answers: list[str]):
        self.model, self.answers, self.prompts, self.choices = model, list(answers), [], []

    def respond(self, messages, *, tools=None, tool_choice=None, **kw):
        turn = conversation.prepare(self.model, conversation.normalize_messages(messages), tools=tools,
                                    tool_choice=tool_choice, max_tokens=64)
        self.prompts.append(self.model.detokenize(turn.prompt.tokens, special=True))
        self.choices.append(tool_choice)
        return turn.reply(Result(finish_reason="stop", text=self.answers.pop(0)))


def get_weather(city: str) -> str:
    """The weather in a city now.

    Args:
        city: the city's name
    """
    RAN.append(("get_weather", city))
    return {"Oslo": "12 C in Oslo"}.get(city, "unknown city")


def get_time(city: str) -> str:
    """The time in a city now."""
    RAN.append(("get_time", city))
    return f"9:00 in {city}"


RAN: list = []
TOOLS = {"get_weather": get_weather, "get_time": get_time}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tiny_gguf):
    fam = FAMILIES[request.param]
    with Model(tiny_gguf, ctx=4096, threads=1, template=str(TEMPLATES / fam.template)) as m:
        yield fam, m


def test_calls_and_results_reach_the_prompt_in_the_family_format(family):
    fam, model = family
    RAN.clear()
    written = Written(model, [fam.two_calls, "It is 12 C in Oslo and 9:00 in Lima."])
    r = run_agent(written, [{"role": "user", "content": "Weather in Oslo, time in Lima?"}], TOOLS)
    assert r.text == "It is 12 C in Oslo and 9:00 in Lima." and not r.max_steps_reached and r.steps == 1
    # both calls of the one turn ran, and their results went back in the order they were written
    assert RAN == [("get_weather", "Oslo"), ("get_time", "Lima")]
    assert [(x.name, x.arguments, x.result, x.ok) for x in r.runs] == [
        ("get_weather", {"city": "Oslo"}, "12 C in Oslo", True), ("get_time", {"city": "Lima"}, "9:00 in Lima", True)]
    first, second = written.prompts
    for seen in fam.tools_seen:
        assert seen in first and seen in second
    for seen in fam.calls_seen + fam.results_seen:
        assert seen in second, seen


def test_mistral_call_ids_are_its_nine_characters_and_pair_calls_with_results(tiny_gguf):
    fam = FAMILIES["mistral-nemo"]
    with Model(tiny_gguf, ctx=4096, threads=1, template=str(TEMPLATES / fam.template)) as m:
        written = Written(m, [fam.two_calls, "Done."])
        run_agent(written, [{"role": "user", "content": "Weather in Oslo, time in Lima?"}], TOOLS)
    import re

    prompt = written.prompts[1]
    ids = re.findall(r'"id": "([A-Za-z0-9]+)"', prompt)
    results = re.findall(r'"call_id": "([A-Za-z0-9]+)"', prompt)
    assert len(ids) == 2 and len(set(ids)) == 2 and all(len(i) == 9 for i in ids)
    assert results == ids


def test_malformed_calls_go_back_to_the_model_and_the_loop_stops_at_max_steps(family):
    fam, model = family
    RAN.clear()
    written = Written(model, [fam.bad_json, fam.unknown_tool, fam.wrong_types, "I could not get the weather."])
    r = run_agent(written, [{"role": "user", "content": "Weather in Oslo?"}], TOOLS, max_steps=3)
    assert RAN == []  # nothing malformed ever reached a tool
    assert r.max_steps_reached and r.steps == 3 and r.text == "I could not get the weather."
    assert written.choices == ["auto", "auto", "auto", "none"]  # the last round has tools off
    said = [x.result for x in r.runs]
    assert len(said) == 3 and not any(x.ok for x in r.runs)
    assert said[0].startswith("error: the call could not be read as JSON (")
    assert said[1].startswith("error: there is no tool named 'get_forecast' (the tools are: get_weather, get_time)")
    assert said[2].startswith("error: get_weather was called with wrong arguments: ")
    # each error reached the model: it is in the prompt of the next round
    for i, text in enumerate(said):  # (Llama 3.1's template writes a result as a JSON string)
        assert text in written.prompts[i + 1] or json.dumps(text) in written.prompts[i + 1]
    # the last round still shows the tools, in the family's own way, with every earlier call
    for seen in fam.tools_seen:
        assert seen in written.prompts[-1]
    # and the conversation holds each call with its result, as the model wrote it
    tool_msgs = [m for m in r.messages if m["role"] == "tool"]
    calls = [c for m in r.messages if m.get("tool_calls") for c in m["tool_calls"]]
    assert [m["tool_call_id"] for m in tool_msgs] == [c["id"] for c in calls]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_forecast", "get_weather"]


def pick(city: Literal["Oslo", "Lima"]) -> str:
    """Pick a city."""
    return city


def hour(h: Literal[9, 12]) -> str:
    """Pick an hour."""
    return str(h)


FORCED_HEADS = {"qwen2.5": "<tool_call>\n{", "hermes-2-pro": "<tool_call>\n{", "llama3.1": '{"name"',
                "mistral-nemo": "[TOOL_CALLS]", "functionary-v3.1": "<function=pick>{",
                "granite-3.3": "<|tool_call|>["}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "pick"}}])
def test_a_forced_call_is_written_in_the_family_format_and_read_back(family, choice):
    """The real model, made to call by a grammar, writes the call as the family's model would."""
    fam, model = family
    tools = [function_tool(pick), function_tool(hour)] if choice == "required" else [function_tool(pick)]
    turn = conversation.prepare(model, conversation.normalize_messages([{"role": "user", "content": "Pick one."}]),
                                tools=tools, tool_choice=choice, max_tokens=120,
                                sampling=sampling_params(temperature=0))
    raw = model.engine.submit(turn.requests[0]).wait()
    head = FORCED_HEADS[next(k for k, f in FAMILIES.items() if f is fam)]
    if choice == "required" and head.startswith("<function="):  # several tools: the bare JSON object it also reads
        head = '{"name"'
    assert "".join(raw.text.split()).startswith("".join(head.split())), raw.text
    reply = turn.reply(raw)
    assert reply.finish_reason == "tool_calls" and len(reply.tool_calls) == 1 and not reply.text
    call = reply.tool_calls[0]
    assert call.arguments in ({"city": "Oslo"}, {"city": "Lima"}) if call.name == "pick" else call.arguments in (
        {"h": 9}, {"h": 12})
