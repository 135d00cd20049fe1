"""Tool (function) calling: tell the model about the tools, force a call with a grammar when the
request demands one, and find the calls in what the model wrote.

Models write tool calls in their family's format; the parser knows the common ones:

    <tool_call>{"name": "f", "arguments": {...}}</tool_call>      Hermes 2 Pro, Qwen 2.5/3, many fine-tunes
    <|python_tag|>{"name": "f", "parameters": {...}}             Llama 3.1+ (or the bare JSON object)
    [TOOL_CALLS] [{"name": "f", "arguments": {...}}]             Mistral (or the bare JSON array)
    <|tool_call|>[{"name": "f", "arguments": {...}}]             Granite 3
    <function=f>{...}</function>                                 Functionary v3.1, Llama 3.1's own option

Several calls in one answer are several calls (parallel tool calls). A model whose chat template
renders `tools` itself gets them that way, and its earlier calls and their results are written
the way that template expects (arguments as an object or as JSON text, one call per assistant
turn where it takes only one, Mistral's 9-character call ids, calls written into the text where
the template leaves them out): `template_habits` finds this out by rendering a probe
conversation once per template. Any other model gets a system message describing the tools and
the Hermes format. A forced call (`tool_choice` "required" or a named function) is constrained
by a llama.cpp grammar to the family's format.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import secrets
from dataclasses import dataclass

from .grammars import MAX_LIVE_PARSES, check_schema, schema_grammar
from .limits import InvalidRequest

MARKERS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "<|tool_call|>", "<function=")


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
    choice: str  # "auto" | "required" | "function" (forced: `forced` names it) | "none" (shown, not called)
    forced: str | None
    native: bool  # the model's chat template renders `tools` itself
    style: str  # "hermes" | "llama3" | "mistral" | "granite" | "functionary": the family's call format
    habits: "Habits | None" = None  # how a native template takes earlier calls (None: not native)

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    @property
    def must_call(self) -> bool:
        return self.choice in ("required", "function")


def tool_spec(tools: list | None, tool_choice, template) -> ToolSpec | None:
    """Check the request's `tools` / `tool_choice` (OpenAI's shapes; Ollama's are the same) and
    decide how this model will see them. None when no tools apply: none given, or choice "none" for
    a model whose template does not render tools (one that does still sees them, and the earlier
    calls in its own format, but is not asked for a call and its answer is not read for one)."""
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
        entry = {"name": name}  # the order of OpenAI's documentation and transformers' get_json_schema
        if isinstance(fn.get("description"), str):
            entry["description"] = fn["description"]
        entry["parameters"] = params
        clean.append({"type": "function", "function": entry})
    names = [t["function"]["name"] for t in clean]
    if len(set(names)) != len(names):
        raise InvalidRequest("tool names must be unique", "tools")

    forced = None
    if tool_choice is None or tool_choice == "auto":
        choice = "auto"
    elif tool_choice == "none":
        choice = "none"
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
    if choice == "none" and not native:
        return None
    style = family(source) if native else "hermes"
    return ToolSpec(clean, choice, forced, native, style, template_habits(template) if native else None)


def family(source: str) -> str:
    """The tool-call format a chat template's model writes, from the template's text."""
    if "[TOOL_CALLS]" in source:
        return "mistral"
    if "<|tool_call|>" in source:
        return "granite"
    if "<function=" in source:
        return "functionary"
    if "<tool_call>" not in source and ("<|python_tag|>" in source or "ipython" in source):
        return "llama3"
    return "hermes"


@dataclass(frozen=True)
class Habits:
    """How a chat template takes the calls of earlier turns."""

    arguments: str  # "object" | "text" (JSON text) | "none" (it does not write calls: they go in the content)
    one_call_per_turn: bool  # it refuses an assistant turn with several calls
    short_ids: bool  # call ids must be 9 letters or digits (Mistral)


_HABITS: dict[str, Habits] = {}
_PROBE_TOOL = {"type": "function", "function": {"name": "probe_tool", "description": "A probe.",
                                                  "parameters": {"type": "object", "properties": {
                                                      "probe_key": {"type": "string"}}}}}


def template_habits(template) -> Habits:
    """Render a probe conversation (a call, its result) through the template to see how it wants
    earlier calls written; once per template text."""
    key = template.source
    if key in _HABITS:
        return _HABITS[key]

    def render(arguments, n: int = 1, call_id: str = "a1b2c3d4e") -> str | None:
        calls = [{"id": call_id, "type": "function", "function": {"name": "probe_tool", "arguments": arguments}}] * n
        msgs = [{"role": "user", "content": "probe question"},
                {"role": "assistant", "content": "", "tool_calls": calls}]
        msgs += [{"role": "tool", "tool_call_id": call_id, "name": "probe_tool", "content": "probe result"}] * n
        try:
            return template.render(msgs, add_generation_prompt=True, tools=[_PROBE_TOOL])
        except Exception:  # the template refuses this shape (raise_exception, a type error)
            return None

    as_object = render({"probe_key": "probe_value"})
    as_text = render('{"probe_key": "probe_value"}')
    if as_object is not None and "probe_value" in as_object:
        arguments = "object"
    elif as_text is not None and "probe_value" in as_text:
        arguments = "text"
    else:
        arguments = "none"
    args = {"probe_key": "probe_value"} if arguments != "text" else '{"probe_key": "probe_value"}'
    one = arguments != "none" and render(args, 2) is None
    short = render(args, 1, "call_" + "0" * 24) is None
    if len(_HABITS) > 64:
        _HABITS.clear()
    _HABITS[key] = habits = Habits(arguments, one, short)
    return habits


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


def call_text(style: str, calls: list[dict]) -> str:
    """Calls (OpenAI's shape, arguments as objects) written as the family's model writes them."""
    items = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls]
    dump = lambda v: json.dumps(v, ensure_ascii=False)  # noqa: E731
    if style == "mistral":
        return "[TOOL_CALLS]" + dump(items)
    if style == "granite":
        return "<|tool_call|>" + dump(items)
    if style == "functionary":
        return "".join(f"<function={i['name']}>{dump(i['arguments'])}</function>" for i in items)
    if style == "llama3":
        return "<|python_tag|>" + "; ".join(dump({"name": i["name"], "parameters": i["arguments"]}) for i in items)
    return "\n".join("<tool_call>\n" + dump(i) + "\n</tool_call>" for i in items)


def short_id(call_id: str) -> str:
    """A call id as Mistral's templates take it: 9 letters or digits (the same id, the same result)."""
    if re.fullmatch(r"[A-Za-z0-9]{9}", call_id or ""):
        return call_id
    return hashlib.sha1((call_id or "").encode()).hexdigest()[:9]


def _for_template(messages: list[dict], spec: ToolSpec) -> list[dict]:
    """Earlier calls and results as a template that renders tools itself takes them (its Habits)."""
    h = spec.habits or Habits("object", False, False)
    out: list[dict] = []
    for m in messages:
        m = dict(m)
        calls = m.get("tool_calls")
        if h.short_ids and calls:
            calls = m["tool_calls"] = [{**c, "id": short_id(c.get("id", ""))} for c in calls]
        if h.short_ids and m.get("tool_call_id"):
            m["tool_call_id"] = short_id(m["tool_call_id"])
        if calls and h.arguments == "none":  # the template leaves calls out: they go in the text
            text = (m.get("content") or "").strip()
            m = {"role": "assistant", "content": (text + "\n" if text else "") + call_text(spec.style, calls)}
        elif calls and h.arguments == "text":
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.dumps(
                c["function"]["arguments"], ensure_ascii=False)}} for c in calls]
        if m.get("tool_calls") and h.one_call_per_turn and len(m["tool_calls"]) > 1:
            out += [{**m, "content": m.get("content") if i == 0 else "", "tool_calls": [c]}
                    for i, c in enumerate(m["tool_calls"])]
            continue
        out.append(m)
    return out


def prepare_messages(messages: list[dict], spec: ToolSpec | None) -> list[dict]:
    """Messages as the template should see them. Without native tool support, earlier tool calls
    become Hermes text, tool results become <tool_response> user turns, and the tool
    instructions go into the system message."""
    if spec is not None and spec.native:
        return _for_template(messages, spec)
    out: list[dict] = []
    for m in messages:
        if m.get("tool_calls"):
            text = (m.get("content") or "").strip()
            out.append({"role": "assistant", "content": (text + "\n" if text else "") + call_text("hermes", m["tool_calls"])})
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
    if spec.style == "functionary" and len(options) == 1:  # <function=NAME>{arguments}</function>
        schema = options[0]["properties"][key]
    call = schema_grammar(schema, root="tool-call", where="tools")
    if spec.style == "mistral":
        head, tail = r'"[TOOL_CALLS]" " "? "["', r'"]"'
    elif spec.style == "granite":
        head, tail = r'"<|tool_call|>" "["', r'"]"'
    elif spec.style == "functionary" and len(options) == 1:
        head, tail = '"<function=' + options[0]["properties"]["name"]["const"] + '>"', r'"</function>"'
    elif spec.style in ("llama3", "functionary"):  # the bare JSON object both read
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


BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.S)
FUNCTION = re.compile(r"<function=([A-Za-z0-9_.\-]+)>(.*?)(?:</function>|\Z)", re.S)


def parse(text: str, names: list[str]) -> tuple[str, list[ToolCall]]:
    """(the text that is not a tool call, the calls) from a model's answer."""
    calls: list[ToolCall] = []
    rest = text
    blocks = list(BLOCK.finditer(text))
    if blocks:
        for m in blocks:
            found = [c for v in _json_values(m.group(1)) for c in (_calls_from(v, names) or [])]
            if found:
                calls += found
                rest = rest.replace(m.group(0), "", 1)
        return rest.strip(), calls
    functions = list(FUNCTION.finditer(text))
    if functions:
        for m in functions:
            found = [c for v in _json_values(m.group(2))[:1]
                     for c in (_calls_from({"name": m.group(1), "arguments": v}, names) or [])]
            if found:
                calls += found
                rest = rest.replace(m.group(0), "", 1)
        return rest.strip(), calls
    for marker in ("[TOOL_CALLS]", "<|tool_call|>", "<|python_tag|>"):
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


def malformed(text: str, names: list[str]) -> tuple[str, list[ToolCall], dict[str, str]]:
    """The calls in an answer that `parse` could not take, for the agent loop to tell the model
    about: (the rest of the text, the calls as written, {call id: what is wrong} for the ones that
    cannot be read). A call naming a tool that is not in `names` comes back as written (the loop
    says there is no such tool)."""
    regions: list[tuple[str, str | None, str]] = []  # (the text taken, the name written before it, the JSON)
    regions += [(m.group(0), None, m.group(1)) for m in BLOCK.finditer(text)]
    regions += [(m.group(0), m.group(1), m.group(2)) for m in FUNCTION.finditer(text)]
    if not regions:
        for marker in ("[TOOL_CALLS]", "<|tool_call|>", "<|python_tag|>"):
            if marker in text:
                regions.append((text[text.find(marker):], None, text[text.find(marker) + len(marker):]))
                break
    if not regions and text.strip()[:1] in "{[" and re.search(r'"(?:arguments|parameters)"\s*:', text):
        regions.append((text, None, text))
    calls: list[ToolCall] = []
    bad: dict[str, str] = {}
    rest = text
    for whole, name, body in regions:
        rest = rest.replace(whole, "", 1)
        values, error = _json_values_or_error(body)
        if name is not None:
            values = [{"name": name, "arguments": v} for v in values[:1]]
        items = [x for v in values for x in (v if isinstance(v, list) else [v])]
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                call = ToolCall(name or "unknown", {})
                bad[call.id] = 'a call must be a JSON object {"name": ..., "arguments": {...}}'
                calls.append(call)
                continue
            args = item.get("arguments", item.get("parameters", {}))
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    pass
            call = ToolCall(item["name"], args if isinstance(args, dict) else {})
            if not isinstance(args, dict):
                bad[call.id] = f"the arguments of {item['name']} must be a JSON object, not {_short(args)}"
            calls.append(call)
        if error:
            call = ToolCall(name or _name_in(body) or "unknown", {})
            bad[call.id] = f"the call could not be read as JSON ({error}): {_short(body.strip())}"
            calls.append(call)
    return rest.strip(), calls, bad


def _json_values_or_error(text: str) -> tuple[list, str | None]:
    """The JSON values in `text` (as _json_values) and, when something else is left, why it is not JSON."""
    values = _json_values(text)
    dec, i = json.JSONDecoder(), 0
    for _ in values:  # find where the readable values end
        while text[i] in " \t\r\n,;":
            i += 1
        i = dec.raw_decode(text, i)[1]
    tail = text[i:].strip(" \t\r\n,;")
    if not tail:
        return values, None
    try:
        dec.raw_decode(tail)
    except json.JSONDecodeError as e:
        return values, f"{e.msg}, character {e.pos + 1}"
    return values, "text after the call"


def _name_in(text: str) -> str | None:
    m = re.search(r'"name"\s*:\s*"([A-Za-z0-9_.\-]{1,64})"', text)
    return m.group(1) if m else None


def _short(value, limit: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + "..."


class StreamFilter:
    """Splits a streamed answer into text to show now and tool calls found at the end.

    Text is passed on as it comes, except anything that may be the start of a tool call: from a
    marker on (or a JSON value at the very start) everything is held and parsed when the answer
    ends; what turns out not to be a call is released as text then. A forced call holds all."""

    def __init__(self, spec: ToolSpec):
        self.names = spec.names
        self.off = spec.choice == "none"  # no call is read from the answer: all of it is text
        self.capturing = spec.must_call
        self.pending = ""
        self.captured = ""
        self.started = False  # some text was passed on

    def feed(self, text: str) -> str:
        if self.off:
            return text
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
