"""The conversation layer: messages in, a reply out, the same for every face.

    turn = prepare(model, messages, tools=[...], response_format={"type": "json_object"},
                   sampling=sampling_params(temperature=0), max_tokens=256, truncate=True)
    streams = [model.engine.submit(r) for r in turn.requests]     # the server uses its own queue
    reply = turn.reply(streams[0].wait(), events)                   # text, tool calls, usage, ...

    reply = respond(model, messages, tools=[...])                   # the same, in one call

`prepare` does what every face needs between a conversation and the Engine: it checks the
messages (OpenAI's and Ollama's shapes), decides how this model sees the tools (its template's
own way, or a system message), renders and tokenizes the conversation with the model's chat
template, fits it into the context, turns `response_format` or a forced tool call into a
grammar, and builds the Engine requests with checked sampling settings. `Turn.reply` reads the
answer back: tool calls parsed in the model family's format, the finish reason, the usage.

The context policy is explicit and reported. A conversation that does not fit is an error
(`ContextOverflow`) unless the caller asks to truncate; then the oldest turns after the system
prompt are dropped (a user turn is always kept first), and `Prompt.truncated_tokens` and
`messages_dropped` say how much went. Never silently. The server asks for it only when a request
sends `"truncate": true`; `llmdesk chat` always does, and says so.

Errors are library errors (`InvalidRequest` naming the field, `ContextOverflow`); the server
maps them to HTTP errors, the CLI to one line.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from . import grammars, limits
from . import toolcalls as tools_mod
from .engine import ContextOverflow, Request, Result, SamplingParams, TokenEvent, sampling_params  # noqa: F401
from .grammar_probe import check_grammar_cost
from .limits import InvalidRequest
from .model import TokenLogprob
from .toolcalls import ToolCall, ToolSpec

if TYPE_CHECKING:  # pragma: no cover
    from .model import Model

ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


# ---------------------------------------------------------------------------------------------
# messages


def text_of(content, where: str) -> str:
    """A message's content as text: a string, or OpenAI's list of parts ({"type": "text", ...})."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for i, part in enumerate(content):
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                out.append(part["text"])
            elif isinstance(part, dict) and part.get("type") in ("image_url", "input_image", "input_audio", "file"):
                raise InvalidRequest(f"{where}[{i}] is {part['type']}: this server's models read text only",
                                     f"{where}[{i}]")
            else:
                raise InvalidRequest(f"{where}[{i}] must be {{\"type\": \"text\", \"text\": ...}}", f"{where}[{i}]")
        return "".join(out)
    raise InvalidRequest(f"{where} must be a string or a list of content parts", where)


def _arguments(value, where: str) -> dict:
    """Tool call arguments: OpenAI sends a JSON string, Ollama an object."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            parsed = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError:
            raise InvalidRequest(f"{where} must be a JSON object (as a string)", where) from None
        if isinstance(parsed, dict):
            return parsed
    raise InvalidRequest(f"{where} must be a JSON object", where)


MAX_MESSAGES = 4096  # a conversation longer than this is a mistake or an attack, not a chat


def normalize_messages(messages, *, images_field: bool = False) -> list[dict]:
    """OpenAI or Ollama messages -> [{"role", "content", ["tool_calls", "tool_call_id", "name"]}]
    with text content, `developer` as `system`, and tool call arguments as objects."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list", "messages")
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequest(f"'messages' holds {len(messages)} messages; the limit is {MAX_MESSAGES}", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequest(f"{where} must be an object", where)
        role = m.get("role")
        if role not in ROLES:
            raise InvalidRequest(f"{where}.role must be one of system, user, assistant, tool; got {role!r}",
                                 f"{where}.role")
        if images_field and m.get("images"):
            raise InvalidRequest(f"{where}.images: this server's models read text only", f"{where}.images")
        msg = {"role": {"developer": "system", "function": "tool"}.get(role, role),
               "content": text_of(m.get("content"), f"{where}.content")}
        calls = m.get("tool_calls")
        if calls:
            if role != "assistant" or not isinstance(calls, list):
                raise InvalidRequest(f"{where}.tool_calls must be a list, on an assistant message",
                                     f"{where}.tool_calls")
            norm = []
            for j, c in enumerate(calls):
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise InvalidRequest(f"{where}.tool_calls[{j}] must have a function with a name",
                                         f"{where}.tool_calls[{j}]")
                norm.append({"id": c.get("id") or f"call_{i}_{j}", "type": "function",
                             "function": {"name": fn["name"],
                                          "arguments": _arguments(fn.get("arguments", {}),
                                                                  f"{where}.tool_calls[{j}].function.arguments")}})
            msg["tool_calls"] = norm
        for key in ("tool_call_id", "name", "tool_name"):
            if isinstance(m.get(key), str):
                msg["name" if key == "tool_name" else key] = m[key]
        out.append(msg)
    return out


# ---------------------------------------------------------------------------------------------
# the prompt and the context


@dataclass
class Prompt:
    tokens: list[int]
    truncated_tokens: int = 0  # dropped to fit, when the caller asked for truncation
    messages_dropped: int = 0


def too_long(n: int, limit: int, param: str = "messages") -> ContextOverflow:
    return ContextOverflow(f"the prompt has {n} tokens, but the context holds {limit} (and needs room for the "
                           "answer); shorten it, use a larger context (--ctx), or ask for truncation "
                           "(\"truncate\": true) to drop the oldest part explicitly", param)


def chat_prompt(model: "Model", messages: list[dict], *, spec: ToolSpec | None, limit: int,
                truncate: bool) -> Prompt:
    """Render and tokenize a conversation for `model`; it must leave room for at least one token
    in `limit` (the context). With `truncate`, the oldest turns after the system prompt go first."""
    msgs = tools_mod.prepare_messages(messages, spec)
    tools = spec.tools if spec is not None and spec.native else None
    tokens = model.chat_tokens(msgs, tools=tools)
    if len(tokens) < limit:
        return Prompt(tokens)
    if not truncate:
        raise too_long(len(tokens), limit)
    full = len(tokens)
    head = [m for m in msgs[:1] if m["role"] == "system"]
    body = msgs[len(head):]
    if not body:  # a system prompt alone, too long: nothing to leave out
        raise too_long(len(tokens), limit)
    # where the kept part may start: a user turn (the last message is always kept)
    starts = [i for i in range(1, len(body)) if body[i]["role"] == "user"] + [len(body) - 1]
    # the fewest dropped that fit, by bisection: a few renders, not one per message
    lo, hi = 0, len(starts) - 1
    fits = None
    while lo <= hi:
        mid = (lo + hi) // 2
        candidate = model.chat_tokens(head + body[starts[mid]:], tools=tools)
        if len(candidate) < limit:
            fits, hi = (starts[mid], candidate), mid - 1
        else:
            lo = mid + 1
    dropped, tokens = fits if fits is not None else (starts[-1], model.chat_tokens(head + body[-1:], tools=tools))
    if len(tokens) >= limit:
        raise ContextOverflow(f"even the last message alone has {len(tokens)} tokens, more than the context "
                              f"({limit}) holds, so truncation cannot help; shorten it, or use a larger --ctx",
                              "messages")
    return Prompt(tokens, truncated_tokens=full - len(tokens), messages_dropped=dropped)


def text_prompt(model: "Model", prompt, *, limit: int, truncate: bool, reserve: int = 1) -> Prompt:
    """A raw prompt: text or token ids. With `truncate`, the oldest tokens are dropped."""
    if isinstance(prompt, str):
        tokens = model.tokenize(prompt, add_special=True, parse_special=True)
    elif isinstance(prompt, list) and all(type(t) is int for t in prompt):
        n_vocab = model.llama.n_vocab
        if any(not 0 <= t < n_vocab for t in prompt):
            raise InvalidRequest(f"token ids in 'prompt' must be between 0 and {n_vocab - 1}", "prompt")
        tokens = list(prompt)
    else:
        raise InvalidRequest("'prompt' must be a string, a list of strings, or token ids", "prompt")
    if not tokens:
        raise InvalidRequest("the prompt is empty", "prompt")
    if len(tokens) < limit:
        return Prompt(tokens)
    if not truncate:
        raise too_long(len(tokens), limit, "prompt")
    keep = max(1, limit - max(reserve, 1))
    return Prompt(tokens[-keep:], truncated_tokens=len(tokens) - keep)


def cap_max_tokens(requested: int | None, n_prompt: int, limit: int) -> int:
    """What may be generated: the request's max_tokens, never past the end of the context."""
    room = max(0, limit - n_prompt)
    return room if requested is None else min(requested, room)


# ---------------------------------------------------------------------------------------------
# sampling and requests


def requests_for(tokens: list[int], sampling: SamplingParams, *, n: int = 1, max_tokens: int | None,
                 stop: list[str], logprobs: int | None = None, ignore_eos: bool = False,
                 time_limit: float | None = None) -> list[Request]:
    """The Engine requests for `n` choices of one prompt (seeds seed, seed+1, ... when seeded)."""
    out = []
    for i in range(n):
        sp = dataclasses.replace(sampling, seed=None if sampling.seed is None else sampling.seed + i)
        out.append(Request(list(tokens), max_tokens=max_tokens, sampling=sp, stop=list(stop),
                           logprobs=logprobs, ignore_eos=ignore_eos, time_limit=time_limit))
    return out


def with_template_stops(stop: list[str], model: "Model") -> list[str]:
    return stop + [s for s in model.template.stop_strings if s not in stop]


def finish_reason(r: Result) -> str:
    """The APIs' finish reasons: a request stopped by its time limit reads as "length" (cut short
    by a limit), the closest both APIs have."""
    return "length" if r.finish_reason == "time_limit" else r.finish_reason


# ---------------------------------------------------------------------------------------------
# a turn: prepared, then read back


@dataclass
class Reply:
    """A model's answer to a conversation."""

    text: str  # what the model said, tool calls taken out
    finish_reason: str  # "stop" | "length" | "tool_calls" | "time_limit" | "cancelled"
    tool_calls: list[ToolCall] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    truncated_tokens: int = 0  # of the conversation, dropped to fit the context
    messages_dropped: int = 0
    ttft_s: float = 0.0
    tokens_per_second: float = 0.0
    total_s: float = 0.0
    logprobs: list[TokenLogprob] | None = None
    parsed: Any = None  # with a Pydantic model as the response format: the validated object

    def json(self) -> Any:
        """The answer parsed as JSON (for a reply written under a JSON schema or JSON mode)."""
        try:
            return json.loads(self.text)
        except json.JSONDecodeError as e:
            from ..errors import LlmdeskError

            raise LlmdeskError(f"the answer is not JSON ({e.msg} at character {e.pos}); "
                               f"ask for JSON output with a schema or JSON mode") from None

    def message(self) -> dict:
        """The answer as an assistant message, to append to the conversation."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.text}
        if self.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}} for c in self.tool_calls]
        return msg


@dataclass
class Turn:
    """A prepared turn: the prompt, how the tools are seen, and the Engine requests to submit."""

    prompt: Prompt
    spec: ToolSpec | None
    requests: list[Request]
    max_tokens: int

    def stream_filter(self) -> "tools_mod.StreamFilter | None":
        """For streamed text: passes text on, holds back what may be a tool call."""
        return tools_mod.StreamFilter(self.spec) if self.spec else None

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        return tools_mod.parse(text, self.spec.names) if self.spec and self.spec.choice != "none" else (text, [])

    def reply(self, r: Result, events: list[TokenEvent] | None = None, model: "Model | None" = None) -> Reply:
        """The Reply for an Engine result (`events` and `model` give the logprobs, if asked for)."""
        if r.finish_reason == "error":
            from ..errors import LlmdeskError

            raise LlmdeskError(f"generation failed: {r.error}")
        content, calls = self.parse(r.text)
        lps = None
        if events is not None and model is not None and any(ev.logprob is not None for ev in events):
            piece = lambda t: model.llama.piece(t, special=True).decode("utf-8", "replace")  # noqa: E731
            lps = [TokenLogprob(ev.token, piece(ev.token), ev.logprob, [(piece(t), p) for t, p in ev.top_logprobs or []])
                   for ev in events if ev.logprob is not None]
        return Reply(text=content, finish_reason="tool_calls" if calls else r.finish_reason, tool_calls=calls,
                     prompt_tokens=r.n_prompt, completion_tokens=r.n_gen, cached_tokens=r.n_cached,
                     truncated_tokens=self.prompt.truncated_tokens, messages_dropped=self.prompt.messages_dropped,
                     ttft_s=r.ttft_s, tokens_per_second=r.tokens_per_second, total_s=r.ttft_s + r.decode_s,
                     logprobs=lps)


def prepare(model: "Model", messages: list[dict], *, tools: list | None = None, tool_choice=None,
            response_format=None, grammar: str | None = None, sampling: SamplingParams | None = None, n: int = 1,
            max_tokens: int | None = None, stop=None, logprobs: int | None = None, truncate: bool = False,
            ignore_eos: bool = False, time_limit: float | None = None, context: int | None = None,
            template_stops: bool = True) -> Turn:
    """Everything between a conversation and the Engine (see the module's docstring).

    `messages` as normalize_messages returns them; `tools`/`tool_choice` in OpenAI's shapes;
    `response_format` OpenAI's ({"type": "json_object" | "json_schema", ...}) or `grammar` given
    directly; `context`: the context budget in tokens (default: the model's). Slow to call from
    an event loop (tokenizing, grammar conversion): the server runs it in a thread."""
    sampling = sampling or sampling_params()
    limit = min(context or model.n_ctx, model.n_ctx)
    spec = tools_mod.tool_spec(tools, tool_choice, model.template)
    tool_grammar = tools_mod.grammar(spec) if spec else None
    fmt_grammar = grammar if grammar is not None else grammars.response_format_grammar(response_format)
    if tool_grammar and fmt_grammar:
        raise InvalidRequest("'response_format' cannot be combined with a required tool call", "response_format")
    if tool_grammar or fmt_grammar:
        # the schema checks bound a grammar's cost on 32k vocabularies of short tokens; this
        # measures it on the model's own vocabulary (a few sampling steps, cached per grammar)
        check_grammar_cost(model.llama, tool_grammar or fmt_grammar)
    prompt = chat_prompt(model, messages, spec=spec, limit=limit, truncate=truncate)
    budget = cap_max_tokens(max_tokens, len(prompt.tokens), limit)
    stops = limits.check_stop(stop)
    if template_stops:
        stops = with_template_stops(stops, model)
    reqs = requests_for(prompt.tokens, dataclasses.replace(sampling, grammar=tool_grammar or fmt_grammar), n=n,
                        max_tokens=budget, stop=stops, logprobs=logprobs, ignore_eos=ignore_eos,
                        time_limit=time_limit)
    return Turn(prompt, spec, reqs, budget)


def respond(model: "Model", messages: list[dict], *, on_text=None, **kw) -> Reply:
    """Prepare a turn, run it on the model's Engine and read the reply (the first choice).
    `on_text(str)` is called with text as it is generated (tool calls held back)."""
    turn = prepare(model, normalize_messages(messages), **kw)
    stream = model.engine.submit(turn.requests[0])
    filt = turn.stream_filter()
    events = []
    try:
        for ev in stream:
            events.append(ev)
            if on_text is not None:
                text = filt.feed(ev.text) if filt else ev.text
                if text:
                    on_text(text)
    finally:
        stream.cancel()  # when the caller's on_text raised (Ctrl-C): the slot is freed
    stream.done.wait()
    if on_text is not None and filt is not None:
        tail, _ = filt.finish()
        if tail:
            on_text(tail)
    return turn.reply(stream.result, events, model)


def respond_many(model, conversations: list[list[dict]], *, seeds: list[int | None] | None = None,
                 response_format=None, **kw) -> list[str]:
    """The answers to several conversations. On a local model all are submitted before any is
    read, so the Engine runs them side by side in its slots; a remote model is asked one after
    another. `seeds`: one per conversation (else `seed` for all); `kw`: max_tokens, stop,
    time_limit and the sampling settings."""
    seed = kw.pop("seed", None)
    seeds = list(seeds) if seeds is not None else [seed] * len(conversations)
    engine = getattr(model, "engine", None)
    if engine is None:
        return [model.respond(c, response_format=response_format, seed=s, **kw).text
                for c, s in zip(conversations, seeds)]
    from .engine import sampling_params

    sampling_kw = {k: kw.pop(k) for k in list(kw) if k not in ("max_tokens", "stop", "time_limit")}
    kw.setdefault("max_tokens", 512)
    turns, streams = [], []
    try:
        for c, s in zip(conversations, seeds):
            turn = prepare(model, normalize_messages(c), response_format=response_format,
                           sampling=sampling_params(seed=s, **sampling_kw), **kw)
            turns.append(turn)
            streams.append(model.engine.submit(turn.requests[0]))
        out = []
        for turn, st in zip(turns, streams):
            events = list(st)
            st.done.wait()
            out.append(turn.reply(st.result, events, model).text)
        return out
    finally:
        for st in streams:
            st.cancel()


def structured_format(fmt) -> tuple[Any, Callable[[str], Any] | None]:
    """OpenAI's `response_format` for what a Python caller gives: a Pydantic model class becomes
    its JSON schema (the grammar holds the answer to it) and a parser that validates the answer
    into an instance; anything else is passed on as it is."""
    if isinstance(fmt, type) and hasattr(fmt, "model_json_schema") and hasattr(fmt, "model_validate_json"):
        from ..errors import LlmdeskError

        try:
            schema = fmt.model_json_schema()
        except Exception as e:  # a field type with no JSON schema
            raise LlmdeskError(f"{fmt.__name__}: no JSON schema for it ({e})") from None

        def parse(text: str):
            try:
                return fmt.model_validate_json(text)
            except ValueError as e:  # pydantic.ValidationError
                errs = e.errors() if hasattr(e, "errors") else []
                where = ".".join(map(str, errs[0]["loc"])) if errs and errs[0].get("loc") else ""
                what = f"{where + ': ' if where else ''}{errs[0]['msg']}" if errs else str(e).splitlines()[0]
                cut = " (the answer was cut off: raise max_tokens)" if errs and errs[0].get("type") == "json_invalid" else ""
                raise LlmdeskError(f"the answer does not validate as {fmt.__name__}: {what}{cut}") from None
        return {"type": "json_schema", "json_schema": {"name": fmt.__name__, "schema": schema}}, parse
    return fmt, None
