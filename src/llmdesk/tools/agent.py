"""The agent loop: the model calls tools, the calls run, their results go back, until it answers.

    reply, messages = run_agent(model, [{"role": "user", "content": "Weather in Oslo?"}],
                                {"get_weather": get_weather}, confirm=lambda call: True)

Any model with `respond` (local or remote) can drive it. A tool that raises does not stop the
loop: the error goes back to the model as the tool's result, as a person at a terminal would
read it. A call the user declines goes back as "declined". After `max_steps` rounds of calls
the model is asked once more with tools off, so the loop always ends with an answer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from .functions import function_tool

MAX_RESULT_CHARS = 16_000  # a tool's result as the model sees it (a huge result would fill the context)


@dataclass
class ToolRun:
    name: str
    arguments: dict
    result: str
    ok: bool  # False: the tool raised, or the call was declined


def _as_text(value) -> str:
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            text = str(value)
    return text if len(text) <= MAX_RESULT_CHARS else text[:MAX_RESULT_CHARS] + " ...(cut)"


def call_tool(fn: Callable, arguments: dict) -> tuple[str, bool]:
    """Run one call: (the result as text, whether it succeeded). Errors become text, not crashes."""
    try:
        return _as_text(fn(**arguments)), True
    except KeyboardInterrupt:
        raise
    except Exception as e:
        return f"error: {type(e).__name__}: {e}", False


def run_agent(model, messages: list[dict], functions: dict[str, Callable], *, confirm=None, on_run=None,
              max_steps: int = 8, tool_choice="auto", **kw):
    """(the final Reply, the conversation with every call and result appended).

    `confirm(call) -> bool` is asked before each call (None: every call runs); `on_run(ToolRun)`
    hears each result; `tool_choice` ("auto", "required", {"function": {"name": ...}}) applies to
    every round but the last; the rest (`on_text`, sampling, `truncate`, ...) goes to
    `model.respond`."""
    # a tool from elsewhere (an MCP server's) carries its own description, with the server's schema
    tools = [getattr(f, "tool", None) or function_tool(f, name) for name, f in functions.items()]
    msgs = list(messages)
    for _ in range(max_steps):
        reply = model.respond(msgs, tools=tools, tool_choice=tool_choice, **kw)
        msgs.append(reply.message())
        if not reply.tool_calls:
            return reply, msgs
        for call in reply.tool_calls:
            fn = functions.get(call.name)
            if fn is None:
                text, ok = f"error: there is no tool named {call.name!r}", False
            elif confirm is not None and not confirm(call):
                text, ok = "declined: the user did not allow this call", False
            else:
                text, ok = call_tool(fn, call.arguments)
            if on_run is not None:
                on_run(ToolRun(call.name, call.arguments, text, ok))
            msgs.append({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": text})
    reply = model.respond(msgs, tools=tools, tool_choice="none", **kw)
    msgs.append(reply.message())
    return reply, msgs
