"""What both APIs share between a request and the Engine: messages -> prompt tokens (through the
model's chat template), the context checks, and the per-request numbers.

A prompt that does not fit the context is an error (400, `context_length_exceeded`) unless the
request asks for `"truncate": true`; then the oldest turns (chat) or the oldest tokens (a raw
prompt) are dropped, and the response says how many tokens were (`truncated_prompt_tokens`
and the `X-Llmdesk-Truncated-Tokens` header). Never silently.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import LlmdeskError
from ..runtime import limits
from . import tools as tools_mod
from .errors import APIError, from_library

if TYPE_CHECKING:  # pragma: no cover
    from ..runtime.engine import SamplingParams

ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
TRUNCATED_HEADER = "X-Llmdesk-Truncated-Tokens"


@dataclass
class Prompt:
    tokens: list[int]
    truncated_tokens: int = 0  # dropped to fit, when the request asked for truncation
    messages_dropped: int = 0

    def headers(self) -> dict[str, str]:
        return {TRUNCATED_HEADER: str(self.truncated_tokens)} if self.truncated_tokens else {}


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
                raise APIError(400, f"{where}[{i}] is {part['type']}: this server's models read text only",
                               param=f"{where}[{i}]")
            else:
                raise APIError(400, f"{where}[{i}] must be {{\"type\": \"text\", \"text\": ...}}", param=f"{where}[{i}]")
        return "".join(out)
    raise APIError(400, f"{where} must be a string or a list of content parts", param=where)


def _arguments(value, where: str) -> dict:
    """Tool call arguments: OpenAI sends a JSON string, Ollama an object."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            parsed = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError:
            raise APIError(400, f"{where} must be a JSON object (as a string)", param=where) from None
        if isinstance(parsed, dict):
            return parsed
    raise APIError(400, f"{where} must be a JSON object", param=where)


def normalize_messages(messages, *, images_field: bool = False) -> list[dict]:
    """OpenAI or Ollama messages -> [{"role", "content", ["tool_calls", "tool_call_id", "name"]}]
    with text content, `developer` as `system`, and tool call arguments as objects."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object", param=where)
        role = m.get("role")
        if role not in ROLES:
            raise APIError(400, f"{where}.role must be one of system, user, assistant, tool; got {role!r}",
                           param=f"{where}.role")
        if images_field and m.get("images"):
            raise APIError(400, f"{where}.images: this server's models read text only", param=f"{where}.images")
        msg = {"role": {"developer": "system", "function": "tool"}.get(role, role),
               "content": text_of(m.get("content"), f"{where}.content")}
        calls = m.get("tool_calls")
        if calls:
            if role != "assistant" or not isinstance(calls, list):
                raise APIError(400, f"{where}.tool_calls must be a list, on an assistant message",
                               param=f"{where}.tool_calls")
            norm = []
            for j, c in enumerate(calls):
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise APIError(400, f"{where}.tool_calls[{j}] must have a function with a name",
                                   param=f"{where}.tool_calls[{j}]")
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


async def chat_prompt(model, messages: list[dict], *, spec: "tools_mod.ToolSpec | None", limit: int,
                      truncate: bool) -> Prompt:
    """Render and tokenize a conversation for `model`; it must leave room for at least one token
    in `limit` (the context). With `truncate`, the oldest turns after the system prompt go first."""
    msgs = tools_mod.prepare_messages(messages, spec)
    tools = spec.tools if spec is not None and spec.native else None

    def tokens_for(ms: list[dict]) -> list[int]:
        return model.chat_tokens(ms, tools=tools)

    try:
        tokens = await asyncio.to_thread(tokens_for, msgs)
        if len(tokens) < limit:
            return Prompt(tokens)
        if not truncate:
            raise _too_long(len(tokens), limit)
        full = len(tokens)
        head = [m for m in msgs[:1] if m["role"] == "system"]
        body = msgs[len(head):]
        dropped = 0
        while len(tokens) >= limit and len(body) > 1:
            body = body[1:]
            dropped += 1
            while len(body) > 1 and body[0]["role"] not in ("user",):  # start on a user turn
                body = body[1:]
                dropped += 1
            tokens = await asyncio.to_thread(tokens_for, head + body)
        if len(tokens) >= limit:
            raise APIError(400, f"even the last message alone has {len(tokens)} tokens, more than the context "
                                f"({limit}) holds, so truncation cannot help; shorten it, or serve with a larger --ctx",
                           code="context_length_exceeded", param="messages")
        return Prompt(tokens, truncated_tokens=full - len(tokens), messages_dropped=dropped)
    except LlmdeskError as e:
        raise from_library(e) from None


def text_prompt(model, prompt, *, limit: int, truncate: bool, reserve: int = 1) -> Prompt:
    """A raw prompt: text or token ids. With `truncate`, the oldest tokens are dropped."""
    if isinstance(prompt, str):
        tokens = model.tokenize(prompt, add_special=True, parse_special=True)
    elif isinstance(prompt, list) and all(type(t) is int for t in prompt):
        n_vocab = model.llama.n_vocab
        if any(not 0 <= t < n_vocab for t in prompt):
            raise APIError(400, f"token ids in 'prompt' must be between 0 and {n_vocab - 1}", param="prompt")
        tokens = list(prompt)
    else:
        raise APIError(400, "'prompt' must be a string, a list of strings, or token ids", param="prompt")
    if not tokens:
        raise APIError(400, "the prompt is empty", param="prompt")
    if len(tokens) < limit:
        return Prompt(tokens)
    if not truncate:
        raise _too_long(len(tokens), limit)
    keep = max(1, limit - max(reserve, 1))
    return Prompt(tokens[-keep:], truncated_tokens=len(tokens) - keep)


def _too_long(n: int, limit: int) -> APIError:
    return APIError(400, f"the prompt has {n} tokens, but the context holds {limit} (and needs room for the "
                         "answer); shorten it, serve with a larger --ctx, or send \"truncate\": true to drop the "
                         "oldest part explicitly", code="context_length_exceeded", param="messages")


def cap_max_tokens(requested: int | None, n_prompt: int, limit: int) -> int:
    """What may be generated: the request's max_tokens, never past the end of the context."""
    room = max(0, limit - n_prompt)
    return room if requested is None else min(requested, room)


def stop_list(stop, param: str = "stop") -> list[str]:
    try:
        return limits.check_stop(stop, param)
    except limits.InvalidRequest as e:
        raise APIError(400, str(e), param=param) from None


def sampling_params(*, seed: int | None = None, grammar: str | None = None, params: dict[str, str] | None = None,
                    **sampling) -> "SamplingParams":
    """A request's sampling settings, llama.cpp server's defaults for what it leaves out, checked
    against the library's bounds (APIError 400 naming the field, before any model is loaded).
    `params`: the API's name for each setting, for the error (Ollama's "options.top_k")."""
    from ..runtime.engine import SamplingParams

    values = {k: (sampling[k] if sampling.get(k) is not None else v) for k, v in limits.DEFAULTS.items()}
    sp = SamplingParams(**values, seed=seed, grammar=grammar)
    try:
        limits.check_sampling(sp)
    except limits.InvalidRequest as e:
        name = (params or {}).get(e.param, e.param)
        raise APIError(400, str(e).replace(e.param, name, 1) if e.param else str(e), param=name) from None
    return sp


def requests_for(tokens: list[int], sampling: "SamplingParams", *, n: int = 1, max_tokens: int, stop: list[str],
                 logprobs: int | None = None, ignore_eos: bool = False, time_limit: float | None = None) -> list:
    """The Engine requests for `n` choices of one prompt (seeds seed, seed+1, ... when seeded)."""
    from ..runtime.engine import Request

    out = []
    for i in range(n):
        sp = dataclasses.replace(sampling, seed=None if sampling.seed is None else sampling.seed + i)
        out.append(Request(list(tokens), max_tokens=max_tokens, sampling=sp, stop=list(stop),
                           logprobs=logprobs, ignore_eos=ignore_eos, time_limit=time_limit))
    return out


def finish_reason(r) -> str:
    """The APIs' finish reasons: a request stopped by its time limit reads as "length" (cut short
    by a limit), the closest both APIs have."""
    return "length" if r.finish_reason == "time_limit" else r.finish_reason


def with_template_stops(stop: list[str], model) -> list[str]:
    return stop + [s for s in model.template.stop_strings if s not in stop]


def timings(r) -> dict:
    """llama.cpp server's `timings` object (the web chat shows tokens/s from it)."""
    return {
        "prompt_n": r.n_prompt - r.n_cached,
        "cached_n": r.n_cached,
        "prompt_ms": round(r.ttft_s * 1000, 3),
        "predicted_n": r.n_gen,
        "predicted_ms": round(r.decode_s * 1000, 3),
        "predicted_per_second": round(r.tokens_per_second, 3),
    }
