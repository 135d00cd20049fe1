"""MCP tools the server runs itself: `llmdesk serve --mcp CONFIG.json`.

The servers of the config are started once, when the app is made (tools/mcp_client.py; one line
in the log for each that cannot start, and the server starts anyway). A request asks for their
tools in `tools`, in the shape of the MCP tool of OpenAI's Responses API (which LM Studio takes
too):

    "tools": [{"type": "mcp", "server_label": "calc"}]                             its tools
    "tools": [{"type": "mcp", "server_label": "calc", "allowed_tools": ["add"]}]   some of them

and the server then runs the agent loop itself (runtime/agent.py, the loop `model.chat(...,
tools=[...])` and `llmdesk chat` run): the model calls, the calls run, their results go back,
until it answers or `max_steps` rounds were made. The answer is the final one, and each call
made on the way is in `mcp_calls` (OpenAI's `mcp_call` items: server_label, name, arguments,
output or error), streamed as it happens when the request streams. Function tools (`"type":
"function"`) keep their meaning: the server returns the model's calls for the client to run.

No one is there to confirm a call, so a tool runs only if it is allowed: by `--yes` (every tool
of the config), `--allow-tool SERVER` or `--allow-tool SERVER/TOOL`, or the server entry's
`"alwaysAllow": [TOOL, ...]` (Cline's key). The other tools are never offered to the model.

Every round is a generation like any other request's: a place in the model's queue, the
request's LoRA adapters, the metrics. The loop runs in a worker thread (the tool calls block);
each round is handed to the event loop and its text comes back as it is generated. A tool's
result reaches the model under a header that says it is untrusted data, with what the
documents' injection guard (rag/guard.py) flags in it. A call that does not answer within the
server's `tool_timeout_sec` (60 s by default), and a server that dies, are error results for
the model; the request still ends with an answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import APIRouter, Request

from ..runtime import conversation
from ..runtime.agent import ToolRun, run_agent
from .errors import APIError
from .scheduler import ClientGone, start, wait_for_disconnect

log = logging.getLogger("llmdesk.serve")
router = APIRouter()

MAX_STEPS = 32  # the most rounds of calls a request may ask for (`max_steps`, 8 by default)
# the loops of requests running at once: a loop waits on its tool calls, so it has a thread
_LOOPS = ThreadPoolExecutor(16, thread_name_prefix="llmdesk-agent")


class ServerTools:
    """The MCP servers of `--mcp`, started, and the rule for which of their tools may run."""

    def __init__(self, servers: list, *, allow: list[str] = (), yes: bool = False):
        from ..rag.guard import injection_flags
        from ..tools.mcp_client import MCPTools

        self.configs = {s.name: s for s in servers}
        self.allow, self.yes = set(allow), yes
        self.mcp = MCPTools(servers, on_problem=log.warning, guard=injection_flags)

    def close(self) -> None:
        self.mcp.close()

    def allows(self, tool) -> bool:
        """May the server run this MCP tool unasked?"""
        cfg = self.configs[tool.server]
        return (self.yes or cfg.name in self.allow or f"{cfg.name}/{tool.remote_name}" in self.allow
                or tool.always_allowed)

    def running(self) -> dict[str, list]:
        """Each server still running, with its tools (allowed or not)."""
        out: dict[str, list] = {}
        for t in self.mcp.functions().values():
            out.setdefault(t.server, []).append(t)
        return out

    def listing(self) -> list[dict]:
        """For GET /v1/mcp/servers: every server of the config, and the tools requests may use."""
        running = self.running()
        return [{"server_label": name, "running": name in running,
                 "tools": [{"name": t.remote_name, "description": t.tool["function"].get("description", "")}
                           for t in running.get(name, []) if self.allows(t)],
                 "not_allowed": [t.remote_name for t in running.get(name, []) if not self.allows(t)]}
                for name in self.configs]

    def choose(self, entries: list[dict]) -> dict:
        """The tools a request's MCP entries name, by the name the model sees (APIError when an
        entry names no server of the config, one that is not running, or tools it may not run)."""
        running = self.running()
        chosen: dict = {}
        for i, e in enumerate(entries):
            if e.get("server_url") is not None:
                raise APIError(400, f"tools[{i}]: this server runs only the MCP servers of its --mcp config; "
                                    "it does not connect to a 'server_url' a request gives", param=f"tools[{i}]")
            label = e.get("server_label")
            if label not in self.configs:
                raise APIError(400, f"tools[{i}].server_label: no MCP server named {label!r} on this server "
                                    f"(its servers: {', '.join(self.configs)})", param=f"tools[{i}].server_label")
            if label not in running:
                raise APIError(503, f"the MCP server {label!r} is not running (it could not start or it stopped; "
                                    "the server's log says why): restart llmdesk serve, or leave it out",
                               param=f"tools[{i}].server_label")
            names = e.get("allowed_tools")
            if isinstance(names, dict):  # OpenAI's filter object
                names = names.get("tool_names")
            if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
                raise APIError(400, f"tools[{i}].allowed_tools must be a list of tool names",
                               param=f"tools[{i}].allowed_tools")
            mine = {t.remote_name: t for t in running[label] if self.allows(t)}
            for n in names or []:
                if n not in mine:
                    raise APIError(400, f"tools[{i}].allowed_tools: the MCP server {label!r} has no tool {n!r} this "
                                        f"server may run (it may run: {', '.join(mine) or 'none'})",
                                   param=f"tools[{i}].allowed_tools")
            if not mine:
                raise APIError(400, f"the MCP server {label!r} has no tool this server may run: allow them with "
                                    f"--allow-tool {label} (or SERVER/TOOL), --yes, or \"alwaysAllow\" in the config",
                               param=f"tools[{i}].server_label")
            chosen.update({t.name: t for n, t in mine.items() if names is None or n in names})
        # the model sees a tool's own name, and SERVER__TOOL only where the chosen servers share one
        counts: dict[str, int] = {}
        for t in chosen.values():
            counts[t.remote_name] = counts.get(t.remote_name, 0) + 1
        return {(name := re.sub(r"[^A-Za-z0-9_.\-]", "_", t.remote_name)[:64] if counts[t.remote_name] == 1
                 else t.name): _Named(t, name) for t in chosen.values()}


class _Named:
    """An MCP tool under the name this request's model sees it by."""

    def __init__(self, tool, name: str):
        self.mcp_tool, self.name, self.server, self.remote_name = tool, name, tool.server, tool.remote_name
        self.tool = {"type": "function", "function": {**tool.tool["function"], "name": name}}

    def __call__(self, **arguments) -> str:
        return self.mcp_tool(**arguments)


def mcp_entries(tools) -> list[dict] | None:
    """The MCP servers a request's `tools` names (None: it names none). A request gives one kind
    of tools: MCP servers (the server runs their tools) or functions (the client runs them)."""
    if not isinstance(tools, list):
        return None
    mcp = [t for t in tools if isinstance(t, dict) and t.get("type") == "mcp"]
    if not mcp:
        return None
    if len(mcp) != len(tools):
        raise APIError(400, "'tools' mixes MCP servers (whose tools this server runs) with function tools (which "
                            "the client runs); send one kind per request", param="tools")
    return mcp


def chosen_tools(request, entries: list[dict]) -> dict:
    tools = getattr(request.app.state, "mcp_tools", None)
    if tools is None:
        raise APIError(400, "this server runs no MCP servers: start it with --mcp CONFIG.json, or send function "
                            "tools (\"type\": \"function\"), which the client runs", param="tools")
    return tools.choose(entries)


def call_item(run: ToolRun, tool) -> dict:
    """One call as the response reports it (the shape of OpenAI's `mcp_call` output item)."""
    return {"type": "mcp_call", "id": f"mcp_{secrets.token_hex(8)}",
            "server_label": getattr(tool, "server", None), "name": getattr(tool, "remote_name", run.name),
            "arguments": json.dumps(run.arguments, ensure_ascii=False),
            "output": run.result if run.ok else None, "error": None if run.ok else run.result}


class _LeaseModel:
    """The lease's model as the agent loop drives it from its thread: each `respond` is one round,
    generated through the server's scheduler on the event loop, its text handed on as it comes."""

    def __init__(self, turn: "AgentTurn", first: conversation.Turn, settings: dict):
        self.t, self.first, self.settings = turn, first, settings
        self.results: list = []  # the Engine result of every round
        self.task: asyncio.Task | None = None  # the round being generated

    def respond(self, messages: list[dict], *, tools=None, tool_choice=None, **_ignored):
        if self.t.stopped:
            raise ClientGone()
        prepared, self.first = self.first, None  # the first round was prepared before the answer began
        if prepared is None:
            left = max(1e-3, self.t.deadline - time.monotonic())
            prepared = conversation.prepare(self.t.lease.model, conversation.normalize_messages(messages), tools=tools,
                                            tool_choice=tool_choice, time_limit=left, **self.settings)
        r = asyncio.run_coroutine_threadsafe(self._round(prepared), self.t.loop).result()
        self.results.append(r)
        return prepared.reply(r)

    async def _round(self, turn: conversation.Turn):
        self.task = asyncio.current_task()
        gens = start(self.t.lease, turn.requests, self.t.metrics)
        filt = turn.stream_filter()
        async for _, ev in gens.events():
            if ev is None:
                break
            text = filt.feed(ev.text) if filt else ev.text
            if text:
                self.t.queue.put_nowait(("text", text))
        if filt:
            tail, _ = filt.finish()
            if tail:
                self.t.queue.put_nowait(("text", tail))
        return gens.results[0]


class AgentTurn:
    """One request's agent loop over MCP tools: `events()` yields ("text", str) and ("call",
    dict) as they happen, then ("done", AgentResult). It holds the lease until the loop's thread
    has ended (a tool call may outlast the request); `stop()` ends it early."""

    def __init__(self, st, lease, messages: list[dict], functions: dict, *, first: conversation.Turn,
                 settings: dict, tool_choice, max_steps: int):
        self.lease, self.metrics = lease, st.metrics
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.deadline = time.monotonic() + st.config.request_timeout
        self.stopped = False
        self.model = _LeaseModel(self, first, settings)
        self.calls: list[dict] = []

        def heard(run: ToolRun) -> None:  # in the loop's thread
            self.loop.call_soon_threadsafe(self.queue.put_nowait, ("call", call_item(run, functions.get(run.name))))

        def work():
            return run_agent(self.model, messages, functions, on_run=heard, tool_choice=tool_choice,
                             max_steps=max_steps)

        self.future = self.loop.run_in_executor(_LOOPS, work)
        self.future.add_done_callback(self._ended)

    def _ended(self, future) -> None:
        self.lease.release()
        if not future.cancelled():
            future.exception()  # retrieved here; events() raises it to whoever is listening
        self.queue.put_nowait(("end", None))

    async def events(self):
        while True:
            kind, value = await self.queue.get()
            if kind == "end":
                break
            if kind == "call":
                self.calls.append(value)
            yield kind, value
        yield "done", self.future.result()

    def stop(self) -> None:
        """Stop generating (on the event loop): the loop's thread ends at its next round."""
        if self.future.done():
            return
        self.stopped = True
        if self.model.task is not None:
            self.model.task.cancel()

    @property
    def last(self):
        """The last round's Engine result."""
        return self.model.results[-1]

    def usage(self) -> dict:
        """Tokens over every round."""
        p = sum(r.n_prompt for r in self.model.results)
        g = sum(r.n_gen for r in self.model.results)
        c = sum(r.n_cached for r in self.model.results)
        return {"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g,
                "prompt_tokens_details": {"cached_tokens": c}}

    async def finish(self, request) -> Any:
        """Every event, for an answer that is not streamed: the AgentResult (ClientGone if the
        client leaves first)."""
        async def run():
            async for kind, value in self.events():
                if kind == "done":
                    return value

        work = asyncio.ensure_future(run())
        watch = asyncio.ensure_future(wait_for_disconnect(request.receive))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            gone = not work.done()
            if gone:
                self.stop()
                work.cancel()
        if gone:
            raise ClientGone()
        return work.result()


async def start_turn(request, st, lease, messages: list[dict], functions: dict, *, tool_choice, max_steps: int,
                     settings: dict) -> AgentTurn:
    """Prepare the first round (a request that cannot be answered fails here, before any answer
    begins) and start the loop. The turn owns the lease from here on."""
    from .chat import off_loop

    if not 1 <= max_steps <= MAX_STEPS:
        raise APIError(400, f"'max_steps' must be between 1 and {MAX_STEPS}, got {max_steps}", param="max_steps")
    tools = [t.tool for t in functions.values()]
    first = await off_loop(conversation.prepare, lease.model, messages, tools=tools, tool_choice=tool_choice,
                           time_limit=st.config.request_timeout, **settings)
    return AgentTurn(st, lease, messages, functions, first=first, settings=settings, tool_choice=tool_choice,
                     max_steps=max_steps)


@router.get("/v1/mcp/servers")
async def list_servers(request: Request):
    """The MCP servers of --mcp: whether each runs, the tools requests may ask for, and the ones
    not allowed (the web chat offers the tools from this)."""
    tools = request.app.state.mcp_tools
    return {"object": "list", "data": tools.listing() if tools is not None else []}
