"""Tool (function) calling: tell the model about the tools, force a call with a grammar when the
request demands one, and find the calls in what the model wrote.

Models write tool calls in their family's format; the parser knows the common ones:

    <tool_call>{"name": "f", "arguments": {...}}</tool_call>      Hermes, Qwen 2.5/3, many fine-tunes
    <|python_tag|>{"name": "f", "parameters": {...}}             Llama 3.1+ (or the bare JSON object)
    [TOOL_CALLS] [{"name": "f", "arguments": {...}}]             Mistral (or the bare JSON array)

A model whose chat template renders `tools` itself gets them that way; any other model gets a
system message describing the tools and the Hermes format, which is also the format a forced
call (`tool_choice` "required" or a named function) is constrained to by a llama.cpp grammar.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
from dataclasses import dataclass

from .grammars import MAX_LIVE_PARSES, check_schema, schema_grammar
from .limits import InvalidRequest

MARKERS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>")


@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str = ""

    def __post_init__(self):
        if not self.id:
            self.id = "call_" + secrets.token_hex(12)

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclass
class ToolSpec:
    tools: list[dict]  # [{"type": "function", "function": {"name", "description", "parameters"}}]
    choice: str  # "auto" | "required" | "function" (forced: `forced` names it)
    forced: str | None
    native: bool  # the model's chat template renders `tools` itself
    style: str  # "hermes" | "llama3" | "mistral": the format a forced call is written in

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    @property
    def must_call(self) -> bool:
        return self.choice in ("required", "function")


def tool_spec(tools: list | None, tool_choice, template) -> ToolSpec | None:
    """Check the request's `tools` / `tool_choice` (OpenAI's shapes; Ollama's are the same) and
    decide how this model will see them. None when no tools apply (none given, or choice "none")."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise InvalidRequest("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(tools, list) or len(tools) > 128:
        raise InvalidRequest("'tools' must be a list of at most 128 tools", "tools")
    clean = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise InvalidRequest(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}", f"tools[{i}]")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise InvalidRequest(f"tools[{i}].function.name must be 1 to 64 letters, digits, '_', '.' or '-'",
                           f"tools[{i}].function.name")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise InvalidRequest(f"tools[{i}].function.parameters must be a JSON schema object",
                           f"tools[{i}].function.parameters")
        check_schema(params, f"tools[{i}].function.parameters")
        entry = {"name": name, "parameters": params}
        if isinstance(fn.get("description"), str):
            entry["description"] = fn["description"]
        clean.append({"type": "function", "function": entry})
    names = [t["function"]["name"] for t in clean]
    if len(set(names)) != len(names):
        raise InvalidRequest("tool names must be unique", "tools")

    forced = None
    if tool_choice is None or tool_choice == "auto":
        choice = "auto"
    elif tool_choice == "none":
        return None
    elif tool_choice == "required":
        choice = "required"
    elif isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        forced = tool_choice["function"].get("name")
        if forced not in names:
            raise InvalidRequest(f"tool_choice names the function {forced!r}, which is not in 'tools'",
                           "tool_choice")
        choice = "function"
    else:
        raise InvalidRequest("'tool_choice' must be \"none\", \"auto\", \"required\" or "
                            "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
    source = template.source
    native = "tools" in source
    if native and "[TOOL_CALLS]" in source:
        style = "mistral"
    elif native and "<tool_call>" not in source and ("<|python_tag|>" in source or "ipython" in source):
        style = "llama3"
    else:
        style = "hermes"
    return ToolSpec(clean, choice, forced, native, style)


# ---------------------------------------------------------------------------------------------
# the prompt


def system_text(spec: ToolSpec) -> str:
    """The tool instructions for a model whose template does not render tools."""
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in spec.tools)
    must = " You must call one of them." if spec.must_call else ""
    return (
        "You can call functions. Their signatures, as JSON schemas, are:\n<tools>\n" + lines + "\n</tools>\n"
        "To call a function, write for each call\n<tool_call>\n"
        '{"name": "<function name>", "arguments": <the arguments as a JSON object>}\n</tool_call>\n'
        "and nothing else; the results come back in <tool_response></tool_response> blocks." + must
    )


def prepare_messages(messages: list[dict], spec: ToolSpec | None) -> list[dict]:
    """Messages as the template should see them. Without native tool support, earlier tool calls
    become Hermes text, tool results become <tool_response> user turns, and the tool
    instructions go into the system message."""
    if spec is not None and spec.native:
        return messages
    out: list[dict] = []
    for m in messages:
        if m.get("tool_calls"):
            calls = "\n".join(
                "<tool_call>\n" + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                                             ensure_ascii=False) + "\n</tool_call>"
                for c in m["tool_calls"])
            text = (m.get("content") or "").strip()
            out.append({"role": "assistant", "content": (text + "\n" if text else "") + calls})
        elif m["role"] == "tool":
            block = "<tool_response>\n" + (m.get("content") or "") + "\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    for m in out:
        m.pop("_tool_results", None)
    if spec is not None:
        text = system_text(spec)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def grammar(spec: ToolSpec) -> str | None:
    """A grammar that makes the model write exactly one call, when the request demands a call."""
    if not spec.must_call:
        return None
    key = "parameters" if spec.style == "llama3" else "arguments"
    options = []
    for t in spec.tools:
        fn = t["function"]
        if spec.forced and fn["name"] != spec.forced:
            continue
        params = copy.deepcopy(fn["parameters"])
        if params.get("type", "object") == "object":
            params.setdefault("type", "object")
            params.setdefault("additionalProperties", False)  # a call with made-up arguments is no use
        options.append({"type": "object", "properties": {"name": {"const": fn["name"]}, key: params},
                        "required": ["name", key], "additionalProperties": False})
    if len(options) > MAX_LIVE_PARSES:  # each one a parse the grammar sampler follows until the name is written
        raise InvalidRequest(f"tool_choice 'required' with {len(options)} tools keeps them all possible until a "
                       f"name is written, which makes every token slow (the limit is {MAX_LIVE_PARSES}); name "
                       f"one function in tool_choice or pass fewer tools", "tool_choice")
    schema = options[0] if len(options) == 1 else {"oneOf": options}
    call = schema_grammar(schema, root="tool-call", where="tools")
    if spec.style == "mistral":
        head, tail = r'"[TOOL_CALLS]" " "? "["', r'"]"'
    elif spec.style == "llama3":
        head, tail = None, None
    else:
        head, tail = r'"<tool_call>\n"', r'"\n</tool_call>"'
    root = f"root ::= {head} tool-call {tail}" if head else "root ::= tool-call"
    return root + "\n" + call


# ---------------------------------------------------------------------------------------------
# the answer


def _json_values(text: str) -> list:
    """The JSON values written one after another in `text` (separated by whitespace, ',' or ';')."""
    dec = json.JSONDecoder()
    out, i = [], 0
    while True:
        while i < len(text) and text[i] in " \t\r\n,;":
            i += 1
        if i >= len(text):
            return out
        try:
            value, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return out
        out.append(value)


def _calls_from(value, names: list[str]) -> list[ToolCall] | None:
    """ToolCalls from a decoded {"name", "arguments"|"parameters"} object or a list of them."""
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        if not isinstance(args, dict) or (names and item["name"] not in names):
            return None
        calls.append(ToolCall(item["name"], args))
    return calls or None


def parse(text: str, names: list[str]) -> tuple[str, list[ToolCall]]:
    """(the text that is not a tool call, the calls) from a model's answer."""
    calls: list[ToolCall] = []
    rest = text
    blocks = list(re.finditer(r"<tool_call>(.*?)(?:</tool_call>|\Z)", text, re.S))
    if blocks:
        for m in blocks:
            found = [c for v in _json_values(m.group(1)) for c in (_calls_from(v, names) or [])]
            if found:
                calls += found
                rest = rest.replace(m.group(0), "", 1)
        return rest.strip(), calls
    for marker in ("[TOOL_CALLS]", "<|python_tag|>"):
        idx = text.find(marker)
        if idx >= 0:
            body = text[idx + len(marker):]
            # newer Mistral tokenizers: [TOOL_CALLS]name[ARGS]{...}
            m = re.match(r"\s*([A-Za-z0-9_.\-]+)\[ARGS\](.*)", body, re.S)
            if m:
                values = [{"name": m.group(1), "arguments": v} for v in _json_values(m.group(2))[:1]]
            else:
                values = _json_values(body)
            found = [c for v in values for c in (_calls_from(v, names) or [])]
            if found:
                return text[:idx].strip(), found
    stripped = text.strip()
    if stripped[:1] in ("{", "["):
        values = _json_values(stripped)
        found = [c for v in values for c in (_calls_from(v, names) or [])]
        if found and len(found) >= len(values):
            return "", found
    return text, []


class StreamFilter:
    """Splits a streamed answer into text to show now and tool calls found at the end.

    Text is passed on as it comes, except anything that may be the start of a tool call: from a
    marker on (or a JSON value at the very start) everything is held and parsed when the answer
    ends; what turns out not to be a call is released as text then. A forced call holds all."""

    def __init__(self, spec: ToolSpec):
        self.names = spec.names
        self.capturing = spec.must_call
        self.pending = ""
        self.captured = ""
        self.started = False  # some text was passed on

    def feed(self, text: str) -> str:
        if self.capturing:
            self.captured += text
            return ""
        self.pending += text
        if not self.started:
            head = self.pending.lstrip()
            if not head:
                return ""
            if head[0] in "{[":
                self.capturing, self.captured, self.pending = True, self.pending, ""
                return ""
        hits = [(self.pending.find(m), m) for m in MARKERS if m in self.pending]
        if hits:
            idx = min(hits)[0]
            out, self.captured, self.pending = self.pending[:idx], self.pending[idx:], ""
            self.capturing = True
        else:
            hold = 0
            for m in MARKERS:
                for k in range(min(len(m) - 1, len(self.pending)), hold, -1):
                    if self.pending.endswith(m[:k]):
                        hold = k
                        break
            out = self.pending[: len(self.pending) - hold]
            self.pending = self.pending[len(out):]
        if out:
            self.started = True
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(text still to show, the tool calls)."""
        tail = self.pending
        if not self.captured:
            return tail, []
        rest, calls = parse(self.captured, self.names)
        if not calls:
            return tail + self.captured, []
        return tail + (rest if rest.strip() else ""), calls
