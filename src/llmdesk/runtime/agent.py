"""The agent loop: the model calls tools, the calls run, their results go back, until it answers.

    result = run_agent(model, [{"role": "user", "content": "Weather in Oslo?"}],
                       {"get_weather": get_weather}, confirm=lambda call: True)
    result.text, result.runs, result.messages, result.max_steps_reached

`model.chat(messages, tools=[get_weather])` is this loop. Any model with `respond` (local or
remote) can drive it. What goes wrong with a call does not stop the loop; it goes back to the
model as the call's result, as a person at a terminal would read it:
- a call the model wrote but that cannot be read (bad JSON), names no tool it was given, or
  whose arguments do not match the tool's schema (a missing argument, a string for an integer),
- a tool that raises, or runs longer than `tool_timeout` seconds (it is left behind in its
  thread; the loop goes on without its result; an MCP server's tool keeps the timeout of the
  server's config),
- a call the user declines ("declined").
Several calls in one turn (parallel tool calls) run side by side, each with its own timeout;
their results go back in the order the model wrote them. After `max_steps` rounds of calls the
model is asked once more with tools off, so the loop always ends with an answer, and
`max_steps_reached` says it was cut short.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import toolcalls
from .functions import function_tool

MAX_RESULT_CHARS = 16_000  # a tool's result as the model sees it (a huge result would fill the context)
TOOL_TIMEOUT = 60.0  # seconds one call may run (the MCP client's default per call too)


@dataclass
class ToolRun:
    name: str
    arguments: dict
    result: str
    ok: bool  # False: the call was malformed, the tool raised or timed out, or the call was declined


@dataclass
class AgentResult:
    """What the loop ends with: the final answer and how it got there."""

    text: str  # the final answer
    reply: Any  # the last conversation.Reply (usage, finish reason, ...)
    messages: list[dict]  # the conversation, with every call and result appended
    runs: list[ToolRun] = field(default_factory=list)  # every call, in order
    steps: int = 0  # rounds in which the model called tools
    max_steps_reached: bool = False  # the model still wanted tools after max_steps rounds

    def __str__(self) -> str:
        return self.text


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


def _start(fn: Callable, arguments: dict) -> tuple[threading.Thread, list]:
    """A call running in a daemon thread (one that never ends cannot keep the process alive)."""
    out: list = []
    thread = threading.Thread(target=lambda: out.append(call_tool(fn, arguments)), daemon=True,
                              name=f"tool {getattr(fn, '__name__', 'call')}")
    thread.start()
    return thread, out


def check_arguments(arguments: dict, schema: dict) -> str | None:
    """Why `arguments` do not match the tool's parameter schema, in one line (None: they do)."""
    import jsonschema

    try:
        jsonschema.validate(arguments, schema)
    except jsonschema.ValidationError as e:
        where = ".".join(str(p) for p in e.absolute_path)
        return f"argument {where!r}: {e.message}" if where else e.message
    except jsonschema.SchemaError:  # the tool's own schema is at fault: let the call say what it makes of it
        return None
    return None


def as_functions(tools) -> dict[str, Callable]:
    """`tools` as the loop takes them: Python functions (named by their own names), MCP tools, or a
    dict {name: function}; each one described now, so a function that cannot be a tool fails
    before the model runs."""
    from ..errors import LlmdeskError

    if isinstance(tools, dict):
        items = list(tools.items())
    elif isinstance(tools, (list, tuple)):
        items = [((getattr(f, "tool", None) or {}).get("function", {}).get("name") or getattr(f, "__name__", None), f)
                 for f in tools]
    else:
        raise LlmdeskError(f"tools must be a list of Python functions (or a dict of them by name), not "
                           f"{type(tools).__name__}")
    out: dict[str, Callable] = {}
    for name, f in items:
        if not callable(f):
            raise LlmdeskError(f"tools: {f!r} is not a function; give Python functions")
        if name in out:
            raise LlmdeskError(f"tools: two functions are named {name!r}; pass a dict {{name: function}} to tell "
                               "them apart")
        if getattr(f, "tool", None) is None:
            function_tool(f, name)
        out[name] = f
    return out


def chat(model, messages: list[dict], tools, **kw) -> AgentResult:
    """`model.chat(messages, tools=[...], ...)`, for a local and a remote model alike."""
    if kw.get("tool_choice") is None:
        kw["tool_choice"] = "auto"
    return run_agent(model, messages, as_functions(tools), **kw)


def run_agent(model, messages: list[dict], functions: dict[str, Callable], *, confirm=None, on_run=None,
              max_steps: int = 8, tool_choice="auto", tool_timeout: float | None = TOOL_TIMEOUT,
              **kw) -> AgentResult:
    """Run the conversation to an answer, calling `functions` ({name: callable}) as the model asks.

    `confirm(call) -> bool` is asked before each call (None: every call runs); `on_run(ToolRun)`
    hears each result; `tool_choice` ("auto", "required", {"function": {"name": ...}}) applies to
    every round but the last; `tool_timeout`: seconds a call may run (None: no limit); the rest
    (`on_text`, sampling, `truncate`, ...) goes to `model.respond`."""
    if max_steps < 1:
        from ..errors import LlmdeskError

        raise LlmdeskError(f"max_steps must be at least 1, not {max_steps}")
    # a tool from elsewhere (an MCP server's) carries its own description, with the server's schema
    tools = [getattr(f, "tool", None) or function_tool(f, name) for name, f in functions.items()]
    schemas = {t["function"]["name"]: t["function"].get("parameters") or {} for t in tools}
    msgs = list(messages)
    runs: list[ToolRun] = []
    for step in range(max_steps):
        reply = model.respond(msgs, tools=tools, tool_choice=tool_choice, **kw)
        calls, bad = reply.tool_calls, {}
        if not calls and kw.get("response_format") is None:  # calls the parser could not take: the model
            # hears why, and tries again (an answer under a JSON schema is never read as a call)
            text, calls, bad = toolcalls.malformed(reply.text, list(functions))
            if calls:
                reply.text = text
            if reply.finish_reason == "length":  # a call cut off is not the model's mistake: say so
                bad = {k: v + "; the answer was cut off at its token limit (max_tokens)" for k, v in bad.items()}
        msgs.append(_message(reply.text, calls))
        if not calls:
            return AgentResult(reply.text, reply, msgs, runs, step)
        results = _run_calls(calls, bad, functions, schemas, confirm, tool_timeout)
        for call, (text, ok) in zip(calls, results):
            run = ToolRun(call.name, call.arguments, text, ok)
            runs.append(run)
            if on_run is not None:
                on_run(run)
            msgs.append({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": text})
    reply = model.respond(msgs, tools=tools, tool_choice="none", **kw)
    msgs.append(reply.message())
    return AgentResult(reply.text, reply, msgs, runs, max_steps, max_steps_reached=True)


def _message(text: str, calls: list) -> dict:
    msg: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                             for c in calls]
    return msg


def _run_calls(calls, bad: dict, functions, schemas, confirm, timeout) -> list[tuple[str, bool]]:
    """The results of one turn's calls, in order: the ones allowed run side by side."""
    results: list[tuple[str, bool] | None] = [None] * len(calls)
    running = []
    for i, call in enumerate(calls):
        fn = functions.get(call.name)
        if call.id in bad:
            results[i] = (f"error: {bad[call.id]}", False)
        elif fn is None:
            have = ", ".join(functions) or "none"
            results[i] = (f"error: there is no tool named {call.name!r} (the tools are: {have})", False)
        elif (why := check_arguments(call.arguments, schemas.get(call.name) or {})) is not None:
            results[i] = (f"error: {call.name} was called with wrong arguments: {why}", False)
        elif confirm is not None and not confirm(call):
            results[i] = ("declined: the user did not allow this call", False)
        else:
            # a tool from elsewhere (an MCP server's) keeps the timeout its own config gives it
            limit = timeout if getattr(fn, "tool", None) is None else None
            running.append((i, limit, *_start(fn, call.arguments)))
    t0 = time.monotonic()
    for i, limit, thread, out in running:
        thread.join(None if limit is None else max(0.0, t0 + limit - time.monotonic()))
        if out:
            results[i] = out[0]
        else:
            results[i] = (f"error: {calls[i].name} did not finish within {limit:g} s and was left running; "
                          "its result is lost", False)
    return results  # type: ignore[return-value]
