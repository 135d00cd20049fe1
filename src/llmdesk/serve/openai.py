"""The OpenAI API: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models.

Shapes follow OpenAI's API reference (and its Python client's types): streamed answers are
server-sent events of `chat.completion.chunk` / `text_completion` objects ending in
`data: [DONE]`; with `stream_options.include_usage` a last chunk carries `usage` and no choices.
Extensions, ignored by OpenAI's clients: request fields `top_k`, `min_p`, `repeat_penalty`,
`ignore_eos`, `truncate`; response fields `timings` (llama.cpp server's) and
`truncated_prompt_tokens`. Chat requests may also name a `collection` of documents to answer from
(the response then has `sources`; serve/documents.py) and a `prompt_template` (serve/prompts.py).
`tools` may name MCP servers of `serve --mcp` instead of functions: the server then runs their
tools itself and answers with the calls it made (`mcp_calls`; serve/agent.py).

`/v1/completions` with `echo` and `logprobs` also returns the prompt's own log-probabilities
(what lm-evaluation-harness's loglikelihood needs), scored by the Engine; `/tokenize`,
`/detokenize` and `/tokenizer_info` are vLLM's tokenizer routes (lm-eval's remote tokenizer).
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import dataclasses
import json
import logging
import secrets
import struct
import sys
import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..errors import LlmdeskError
from ..runtime import conversation, grammars, limits
from ..runtime.conversation import finish_reason, sampling_params
from ..runtime.engine import ContextOverflow, ScoreRequest
from . import agent, documents, prompts
from .chat import off_loop, prompt_headers, timings
from .errors import APIError
from .models import variant_name
from .scheduler import ClientGone, admit, collect, start

log = logging.getLogger("llmdesk.serve")
router = APIRouter()
FINGERPRINT = "llmdesk"
# streamed answers: not cached, not buffered by a reverse proxy (nginx honours X-Accel-Buffering)
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
MAX_N = 16


def state(request: Request):
    return request.app.state.llmdesk


def note(request: Request, **kv) -> None:
    """Facts for this request's access-log line."""
    request.scope.setdefault("llmdesk.log", {}).update(kv)


def record(request: Request, model: str, prompt: str, system: str | None, results) -> None:
    """With --log-prompts, the finished answers go to `llmdesk logs` like the CLI's."""
    if not state(request).config.log_prompts:
        return
    from ..store.logs import log_turn

    for r in results:
        if r.finish_reason not in ("stop", "length"):
            continue
        try:
            log_turn(model=model, prompt=prompt, response=r.text, system=system, tokens_in=r.n_prompt,
                     tokens_out=r.n_gen, duration_s=r.ttft_s + r.decode_s, options={"api": request.url.path})
        except Exception:  # a full disk must not fail the request
            log.exception("could not record the answer in the log")


def _last_user(messages: list[dict]) -> tuple[str, str | None]:
    user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    system = next((m["content"] for m in messages if m["role"] == "system"), None)
    return user, system


class _Body(BaseModel):
    # strict: "5" is not a number and 1.5 is not an integer, as in OpenAI's API
    model_config = ConfigDict(extra="allow", strict=True)


class _Sampling(_Body):
    model: str | None = Field(None, max_length=512)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    # ranges are the library's (runtime/limits.py), the same for every face
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, Any] | None = None
    ignore_eos: bool = False
    truncate: bool = False
    adapters: list | None = None  # LoRA adapters: ["NAME", ...] or [{"name": ..., "scale": ...}]

    def sampling(self):
        """The checked SamplingParams (APIError 400 for a value out of bounds)."""
        if self.logit_bias:
            raise APIError(400, "'logit_bias' is not supported by this server", param="logit_bias")
        return sampling_params(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                               repeat_penalty=self.repeat_penalty, repeat_last_n=self.repeat_last_n,
                               presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                               seed=self.seed)

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatCompletionRequest(_Sampling):
    messages: list[dict[str, Any]]
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    collection: str | None = Field(None, max_length=64)  # answer from these documents (serve/documents.py)
    collection_k: int = Field(5, ge=1, le=documents.MAX_K)
    collection_mode: Literal["hybrid", "bm25", "vector"] = "hybrid"
    prompt_template: dict[str, Any] | None = None  # {"name", "variables"} (serve/prompts.py)
    max_steps: int = 8  # rounds of MCP tool calls the server runs before the model must answer (serve/agent.py)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for this legacy endpoint
    # OpenAI's legacy API allows 5; vLLM (max_logprobs) and lm-eval's gguf model (which asks for 10) 20
    logprobs: int | None = Field(None, ge=0, le=limits.MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    response_format: dict[str, Any] | None = None


class EmbeddingRequest(_Body):
    model: str | None = Field(None, max_length=512)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    truncate: bool = False


def _id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def _usage(results, prompt_tokens: int, cached: int) -> dict:
    gen = sum(r.n_gen for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": gen, "total_tokens": prompt_tokens + gen,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _error_event(message: str) -> str:
    return _sse({"error": {"message": message, "type": "server_error", "param": None, "code": "generation_failed"}})


# ---------------------------------------------------------------------------------------------
# logprobs


def _token_entry(model, token: int, logprob: float) -> dict:
    piece = model.llama.piece(token, special=True)
    return {"token": piece.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(piece)}


def _chat_logprobs(model, events) -> list[dict]:
    out = []
    for ev in events:
        if ev.logprob is None:
            continue
        entry = _token_entry(model, ev.token, ev.logprob)
        entry["top_logprobs"] = [_token_entry(model, t, p) for t, p in ev.top_logprobs or []]
        out.append(entry)
    return out


def _piece_text(model, token: int) -> str:
    return model.llama.piece(token, special=True).decode("utf-8", "replace")


def _top(model, token: int, logprob: float, top) -> dict[str, float]:
    """One position's `top_logprobs`: the most likely tokens, most likely first, and the token
    itself (OpenAI's API always returns the chosen token's, so up to logprobs + 1 entries)."""
    out: dict[str, float] = {}
    for t, p in top or []:
        out.setdefault(_piece_text(model, t), p)
    out.setdefault(_piece_text(model, token), logprob)
    return out


def _offsets(pieces: list[bytes], start: int = 0) -> list[int]:
    """Where each token's text starts, in characters of text that begins at `start`. The bytes of
    a character split over several tokens count once, where the character is completed."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    out, pos = [], start
    for p in pieces:
        out.append(pos)
        pos += len(decoder.decode(p))
    return out


def _legacy_logprobs(model, events, offset: int = 0) -> dict:
    events = [ev for ev in events if ev.logprob is not None]
    return {"tokens": [_piece_text(model, ev.token) for ev in events],
            "token_logprobs": [ev.logprob for ev in events],
            "top_logprobs": [_top(model, ev.token, ev.logprob, ev.top_logprobs) for ev in events],
            "text_offset": _offsets([model.llama.piece(ev.token) for ev in events], offset)}


# ---------------------------------------------------------------------------------------------
# /v1/chat/completions


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    st = state(request)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    messages = conversation.normalize_messages(body.messages)
    mcp = agent.mcp_entries(body.tools)
    if mcp is not None:
        return await _chat_with_mcp(body, request, messages, mcp)
    docs = await documents.retrieve_for(st.models, body, messages)  # from the user's own words, before any template
    if body.prompt_template is not None:
        messages = await off_loop(prompts.apply, body, messages)
    sampling = body.sampling()
    format_grammar = await off_loop(grammars.response_format_grammar, body.response_format)
    stop = limits.check_stop(body.stop)
    lease = await st.models.acquire(body.model, adapters=body.adapters)
    try:
        lm = lease.loaded
        model = lease.model
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if docs is not None:
            messages = await off_loop(documents.quote, model, messages, docs, requested)
        turn = await off_loop(conversation.prepare, model, messages, tools=body.tools, tool_choice=body.tool_choice,
                              grammar=format_grammar, sampling=sampling, n=body.n, max_tokens=requested, stop=stop,
                              logprobs=(body.top_logprobs or 0) if body.logprobs else None, truncate=body.truncate,
                              ignore_eos=body.ignore_eos, time_limit=st.config.request_timeout)
        prompt = turn.prompt
        gens = start(lease, turn.requests, st.metrics)
    except BaseException:
        lease.release()
        raise
    note(request, model=lm.name, prompt=len(prompt.tokens))
    base = {"id": _id("chatcmpl"), "created": int(time.time()), "model": lease.name, "system_fingerprint": FINGERPRINT}
    extra = {"truncated_prompt_tokens": prompt.truncated_tokens} if prompt.truncated_tokens else {}
    if body.stream:
        tail = docs.fields() if docs is not None else None
        return StreamingResponse(_chat_stream(request, body, lease, gens, turn, base, extra, messages, tail),
                                 media_type="text/event-stream", headers={**prompt_headers(prompt), **STREAM_HEADERS})
    try:  # the lease is held until the answer is built: the model may go as soon as it is released
        events = await collect(request, gens)
        choices = []
        for i, (r, evs) in enumerate(zip(gens.results, events)):
            if r.finish_reason == "error":
                raise APIError(500, f"generation failed: {r.error}", type="server_error")
            content, calls = turn.parse(r.text)
            message: dict[str, Any] = {"role": "assistant", "content": content if (content or not calls) else None,
                                       "refusal": None}
            if calls:
                message["tool_calls"] = [{"id": c.id, "type": "function",
                                          "function": {"name": c.name, "arguments": c.arguments_json}} for c in calls]
            choices.append({"index": i, "message": message,
                            "logprobs": {"content": _chat_logprobs(model, evs), "refusal": None} if body.logprobs else None,
                            "finish_reason": "tool_calls" if calls else finish_reason(r)})
        r0 = gens.results[0]
        note(request, gen=sum(r.n_gen for r in gens.results), cached=r0.n_cached, ttft=round(r0.ttft_s, 3))
        record(request, lm.name, *_last_user(messages), gens.results)
        return JSONResponse({**base, "object": "chat.completion", "choices": choices,
                             "usage": _usage(gens.results, r0.n_prompt, r0.n_cached), "timings": timings(r0), **extra,
                             **(docs.fields() if docs is not None else {})},
                            headers=prompt_headers(prompt))
    except ClientGone:
        return Response(status_code=499)
    finally:
        lease.release()


async def _chat_stream(request, body: ChatCompletionRequest, lease, gens, turn, base: dict, extra: dict, messages,
                       tail: dict | None = None):
    model = lease.model
    n = len(gens.streams)
    usage_field = {"usage": None} if body.include_usage else {}

    def chunk(i: int, delta: dict, finish=None, logprobs=None, **more) -> str:
        return _sse({**base, "object": "chat.completion.chunk",
                     "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
                     **usage_field, **more})

    filters = [turn.stream_filter() for _ in range(n)]
    try:
        for i in range(n):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for i, ev in gens.events():
            if ev is not None:
                text = filters[i].feed(ev.text) if filters[i] else ev.text
                lp = None
                if body.logprobs and ev.logprob is not None:
                    lp = {"content": _chat_logprobs(model, [ev]), "refusal": None}
                if text or lp:
                    yield chunk(i, {"content": text}, logprobs=lp)
                continue
            r = gens.streams[i].result
            if r.finish_reason == "error":
                yield _error_event(f"generation failed: {r.error}")
                return
            finish = finish_reason(r)
            if filters[i]:
                tail, calls = filters[i].finish()
                if tail:
                    yield chunk(i, {"content": tail})
                if calls:
                    finish = "tool_calls"
                    yield chunk(i, {"tool_calls": [
                        {"index": j, "id": c.id, "type": "function",
                         "function": {"name": c.name, "arguments": c.arguments_json}}
                        for j, c in enumerate(calls)]})
            yield chunk(i, {}, finish=finish, timings=timings(r), **extra)
        results = gens.results
        if tail:  # the documents' sources, once every answer is whole
            yield _sse({**base, "object": "chat.completion.chunk", "choices": [], **usage_field, **tail})
        if body.include_usage:
            yield _sse({**base, "object": "chat.completion.chunk", "choices": [],
                        "usage": _usage(results, results[0].n_prompt, results[0].n_cached)})
        yield "data: [DONE]\n\n"
    finally:
        gens.cancel()
        lease.release()
        r0 = gens.results[0]
        note(request, gen=sum(r.n_gen for r in gens.results), cached=r0.n_cached, ttft=round(r0.ttft_s, 3),
             finish=r0.finish_reason or "cancelled")
        record(request, lease.loaded.name, *_last_user(messages), gens.results)


async def _chat_with_mcp(body: ChatCompletionRequest, request: Request, messages: list[dict], entries: list[dict]):
    """`tools` naming MCP servers: the server runs the agent loop over their tools (serve/agent.py)
    and answers with the final message, the calls it made in its `mcp_calls`."""
    st = state(request)
    for param, given in (("n", body.n != 1), ("logprobs", body.logprobs), ("collection", body.collection),
                         ("response_format", body.response_format)):
        if given:
            raise APIError(400, f"'{param}' cannot be combined with MCP tools", param=param)
    functions = agent.chosen_tools(request, entries)
    if body.prompt_template is not None:
        messages = await off_loop(prompts.apply, body, messages)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    settings = dict(sampling=body.sampling(), max_tokens=requested, stop=limits.check_stop(body.stop),
                    truncate=body.truncate, ignore_eos=body.ignore_eos)
    lease = await st.models.acquire(body.model, adapters=body.adapters)
    try:
        turn = await agent.start_turn(request, st, lease, messages, functions, tool_choice=body.tool_choice or "auto",
                                      max_steps=body.max_steps, settings=settings)
    except BaseException:
        lease.release()
        raise
    note(request, model=lease.loaded.name)
    base = {"id": _id("chatcmpl"), "created": int(time.time()), "model": lease.name, "system_fingerprint": FINGERPRINT}
    if body.stream:
        return StreamingResponse(_mcp_stream(request, body, turn, base, messages), media_type="text/event-stream",
                                 headers=STREAM_HEADERS)
    try:
        result = await turn.finish(request)
    except ClientGone:
        return Response(status_code=499)
    finally:
        turn.stop()
    r = turn.last
    note(request, gen=sum(x.n_gen for x in turn.model.results), mcp_calls=len(turn.calls))
    record(request, lease.loaded.name, *_last_user(messages), [r])
    message = {"role": "assistant", "content": result.text, "refusal": None, "mcp_calls": turn.calls}
    more = {"max_steps_reached": True} if result.max_steps_reached else {}
    return JSONResponse({**base, "object": "chat.completion",
                         "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(r)}],
                         "usage": turn.usage(), "timings": timings(r), **more})


async def _mcp_stream(request, body: ChatCompletionRequest, turn, base: dict, messages):
    """The agent loop's answer as server-sent events: the text of every round as it comes, and
    each call, with its result, as a chunk whose delta holds `mcp_calls`."""
    usage_field = {"usage": None} if body.include_usage else {}

    def chunk(delta: dict, finish=None, **more) -> str:
        return _sse({**base, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                     **usage_field, **more})

    try:
        yield chunk({"role": "assistant", "content": ""})
        result = None
        try:
            async for kind, value in turn.events():
                if kind == "text":
                    yield chunk({"content": value})
                elif kind == "call":
                    yield chunk({"mcp_calls": [value]})
                else:
                    result = value
        except (APIError, LlmdeskError) as e:
            yield _error_event(getattr(e, "message", None) or str(e))
            return
        r = turn.last
        more = {"max_steps_reached": True} if result.max_steps_reached else {}
        yield chunk({}, finish=finish_reason(r), timings=timings(r), **more)
        if body.include_usage:
            yield _sse({**base, "object": "chat.completion.chunk", "choices": [], "usage": turn.usage()})
        yield "data: [DONE]\n\n"
    finally:
        turn.stop()
        if turn.model.results:
            note(request, gen=sum(x.n_gen for x in turn.model.results), mcp_calls=len(turn.calls))
            record(request, turn.lease.loaded.name, *_last_user(messages), [turn.last])


# ---------------------------------------------------------------------------------------------
# /v1/completions


def _prompts(prompt) -> list:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(type(p) is int for p in prompt):
        return [prompt]
    if not prompt:
        raise APIError(400, "'prompt' is empty", param="prompt")
    if len(prompt) > 64:
        raise APIError(400, "'prompt' takes at most 64 prompts at once", param="prompt")
    return list(prompt)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    st = state(request)
    if body.suffix:
        raise APIError(400, "'suffix' (fill in the middle) is not supported", param="suffix")
    if body.best_of not in (None, body.n):
        raise APIError(400, "'best_of' other than 'n' is not supported", param="best_of")
    prompts = _prompts(body.prompt)
    if body.echo and body.logprobs is not None:
        return await _scored_completions(body, request, prompts)
    if len(prompts) * body.n > MAX_N:
        raise APIError(400, f"prompts times 'n' must be at most {MAX_N}", param="n")
    sampling = body.sampling()
    grammar = await off_loop(grammars.response_format_grammar, body.response_format)
    stop = limits.check_stop(body.stop)
    lease = await st.models.acquire(body.model, adapters=body.adapters)
    try:
        lm = lease.loaded
        model = lease.model
        built = [await asyncio.to_thread(conversation.text_prompt, model, p, limit=model.n_ctx,
                                         truncate=body.truncate, reserve=body.max_tokens or 1) for p in prompts]
        reqs = []
        for p in built:
            max_tokens = conversation.cap_max_tokens(body.max_tokens, len(p.tokens), model.n_ctx)
            reqs += conversation.requests_for(p.tokens, dataclasses.replace(sampling, grammar=grammar), n=body.n,
                                 max_tokens=max_tokens, stop=stop, logprobs=body.logprobs, ignore_eos=body.ignore_eos,
                                 time_limit=st.config.request_timeout)
        gens = start(lease, reqs, st.metrics)
    except BaseException:
        lease.release()
        raise
    echoes = [(p if isinstance(p, str) else model.detokenize(p)) if body.echo else "" for p in prompts]
    echoes = [e for e in echoes for _ in range(body.n)]
    n_prompt = sum(len(p.tokens) for p in built)
    truncated = sum(p.truncated_tokens for p in built)
    headers = {"X-Llmdesk-Truncated-Tokens": str(truncated)} if truncated else {}
    extra = {"truncated_prompt_tokens": truncated} if truncated else {}
    note(request, model=lm.name, prompt=n_prompt)
    base = {"id": _id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": lease.name,
            "system_fingerprint": FINGERPRINT}
    if body.stream:
        shown = prompts[0] if isinstance(prompts[0], str) else "(token ids)"
        return StreamingResponse(_completion_stream(request, body, lease, gens, base, echoes, n_prompt, extra, shown),
                                 media_type="text/event-stream", headers={**headers, **STREAM_HEADERS})
    try:  # the lease is held until the answer is built
        events = await collect(request, gens)
        choices = []
        for i, (r, evs) in enumerate(zip(gens.results, events)):
            if r.finish_reason == "error":
                raise APIError(500, f"generation failed: {r.error}", type="server_error")
            choices.append({"index": i, "text": echoes[i] + r.text,
                            "logprobs": _legacy_logprobs(model, evs, len(echoes[i])) if body.logprobs is not None else None,
                            "finish_reason": finish_reason(r)})
        cached = sum(r.n_cached for r in gens.results[:: body.n])
        note(request, gen=sum(r.n_gen for r in gens.results), cached=cached)
        record(request, lm.name, prompts[0] if isinstance(prompts[0], str) else "(token ids)", None, gens.results)
        return JSONResponse({**base, "choices": choices, "usage": _usage(gens.results, n_prompt, cached),
                             "timings": timings(gens.results[0]), **extra}, headers=headers)
    except ClientGone:
        return Response(status_code=499)
    finally:
        lease.release()


async def _completion_stream(request, body: CompletionRequest, lease, gens, base, echoes, n_prompt, extra, shown,
                             prompt_logprobs: list[dict] | None = None, cached: int | None = None):
    """The echoes first (with the prompt's log-probabilities when scored), then the answers as
    they come; `gens` None: nothing is generated (max_tokens 0)."""
    model = lease.model
    usage_field = {"usage": None} if body.include_usage else {}
    finish = (lambda r: _scored_finish(model, body, r)) if prompt_logprobs is not None else finish_reason

    def chunk(i: int, text: str, finish=None, logprobs=None, **more) -> str:
        return _sse({**base, "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}],
                     **usage_field, **more})

    pos = [len(e) for e in echoes]  # where each choice's next text starts
    try:
        for i, e in enumerate(echoes):
            lps = prompt_logprobs[i] if prompt_logprobs is not None else None
            if e or lps:
                yield chunk(i, e, logprobs=lps, finish=None if gens is not None else "length")
        if gens is not None:
            async for i, ev in gens.events():
                if ev is not None:
                    lp = _legacy_logprobs(model, [ev], pos[i]) if body.logprobs is not None and ev.logprob is not None else None
                    pos[i] += len(ev.text)
                    if ev.text or lp:
                        yield chunk(i, ev.text, logprobs=lp)
                    continue
                r = gens.streams[i].result
                if r.finish_reason == "error":
                    yield _error_event(f"generation failed: {r.error}")
                    return
                yield chunk(i, "", finish=finish(r), timings=timings(r), **extra)
        if body.include_usage:
            results = gens.results if gens is not None else []
            if cached is None:
                cached = sum(r.n_cached for r in results[:: body.n])
            yield _sse({**base, "choices": [], "usage": _usage(results, n_prompt, cached)})
        yield "data: [DONE]\n\n"
    finally:
        if gens is not None:
            gens.cancel()
            note(request, gen=sum(r.n_gen for r in gens.results))
            record(request, lease.loaded.name, shown, None, gens.results)
        lease.release()


# ---------------------------------------------------------------------------------------------
# /v1/completions with echo and logprobs: the prompt's own log-probabilities
#
# What lm-evaluation-harness's loglikelihood asks for (`local-completions` sends token ids, its
# `gguf` model text; both `max_tokens` 1 and read all but the last entry). The reported tokens
# are the client's: token ids exactly as given (the first has no log-probability: null), a text
# as the model tokenizes it (its BOS rule) but without a BOS the rule added, so that the text's
# first token has its real log-probability given the BOS. (vLLM reports that BOS as a first
# token of its own, one more than the client's tokenizer counts.)


@dataclasses.dataclass
class _ScoredPrompt:
    tokens: list[int]  # what the model reads: the client's tokens, after a BOS the model's rule added
    lead: int  # 1 when that BOS was added (it is not reported), else 0
    echo: str  # the text echoed: the prompt, or the token ids as text (special tokens written out)
    logprobs: dict | None = None  # the legacy shape over tokens[lead:] (and the greedy next token)
    n_cached: int = 0
    next_text: str = ""  # the greedy next token's text, when it was taken from the scores
    next_eog: bool = False  # that token ends the text


def _scored_prompt(model, i: int, prompt, room: int) -> _ScoredPrompt:
    """Prompt `i` as the model reads it, checked: it must fit the context with `room` tokens to spare."""
    tokens = conversation.text_prompt(model, prompt, limit=sys.maxsize, truncate=False).tokens  # checked below
    lead = 0
    if isinstance(prompt, str) and len(tokens) >= 1 and tokens[0] == model.llama.bos:
        own = model.tokenize(prompt, add_special=False, parse_special=True)
        lead = int(tokens[1:] == own)
    if len(tokens) + room > model.n_ctx:
        more = " and room for the answer (max_tokens)" if room else ""
        raise ContextOverflow(f"prompt {i} has {len(tokens)} tokens, more than the context holds{more} "
                              f"({model.n_ctx}); shorten it or use a larger context (--ctx)", "prompt")
    echo = prompt if isinstance(prompt, str) else model.detokenize(tokens, special=True)
    return _ScoredPrompt(tokens, lead, echo)


def _prompt_logprobs(model, p: _ScoredPrompt, values: list[float], tops: list | None, n_top: int) -> dict:
    """The legacy logprobs object of a scored prompt: `values[i]` (and `tops[i]`, the most likely
    tokens there) for p.tokens[i + 1]."""
    shown = p.tokens[p.lead:]
    values = ([None] if p.lead == 0 else []) + list(values)
    tops = ([None] if p.lead == 0 else []) + (list(tops) if tops is not None else [None] * (len(values) - 1 + p.lead))
    pieces = [model.llama.piece(t, special=True) for t in shown]
    offsets = _offsets(pieces)
    written = b"".join(pieces).decode("utf-8", "replace")
    if written != p.echo and written[:1] == " " and written[1:] == p.echo:
        offsets = [max(0, o - 1) for o in offsets]  # a SentencePiece space prefix the text does not have
    return {"tokens": [x.decode("utf-8", "replace") for x in pieces],
            "token_logprobs": values,
            "top_logprobs": [None if v is None else _top(model, t, v, (top or [])[:n_top])
                             for t, v, top in zip(shown, values, tops)],
            "text_offset": offsets}


async def _score_prompts(lease, prompts: list, body: CompletionRequest, st, *, next_token: bool = False
                         ) -> list[_ScoredPrompt]:
    """Every prompt's log-probabilities, in one Engine job: the prompts are batched over the slots
    and share llama_decode calls with the other requests (docs/scoring.md). `next_token`: also
    the most likely token after each prompt (greedy decoding's one token), from the same job: a
    placeholder token after the prompt makes the Engine compute the logits after its last token
    (the last continuation token is never fed, so the placeholder costs nothing)."""
    model = lease.model
    room = 1 if body.max_tokens else 0
    scored = await off_loop(lambda: [_scored_prompt(model, i, p, room) for i, p in enumerate(prompts)])
    extra = [0] if next_token else []
    todo = [p for p in scored if len(p.tokens) + len(extra) >= 2]
    top_k = max(body.logprobs, 1) if next_token else body.logprobs
    results = []
    if todo:
        gate = admit(lease, 1, st.metrics)
        t0 = time.perf_counter()
        try:
            job = model.engine.score([ScoreRequest(p.tokens[:1], p.tokens[1:] + extra, top_k=top_k,
                                                   adapters=lease.adapters) for p in todo],
                                     time_limit=st.config.request_timeout)
            results = await engine_job(job)
        finally:
            gate.leave(time.perf_counter() - t0)
    by_prompt = dict(zip(map(id, todo), results))

    def describe() -> None:
        for p in scored:
            r = by_prompt.get(id(p))
            values, tops = (r.logprobs, r.top) if r is not None else ([], None)
            if next_token:  # the placeholder's position: the greedy token and its neighbours
                token, logprob = r.top[-1][0]
                values, tops = values[:-1], tops[:-1]
                p.next_text = model.llama.piece(token).decode("utf-8", "replace")
                p.next_eog = model.llama.is_eog(token)
            p.logprobs = _prompt_logprobs(model, p, values, tops, body.logprobs)
            if next_token:
                after = {"tokens": [_piece_text(model, token)], "token_logprobs": [logprob],
                         "top_logprobs": [_top(model, token, logprob, r.top[-1][: body.logprobs])],
                         "text_offset": [len(p.echo)]}
                p.logprobs = _joined(p.logprobs, after)
            p.n_cached = r.n_cached if r is not None else 0

    await off_loop(describe)
    return scored


def _joined(prompt: dict, generated: dict) -> dict:
    return {k: prompt[k] + generated[k] for k in prompt}


async def _scored_completions(body: CompletionRequest, request: Request, prompts: list):
    """/v1/completions with `echo` and `logprobs`: the prompts scored, then (max_tokens > 0) the
    answers generated after them, their tokens' entries following the prompt's."""
    st = state(request)
    if body.truncate:
        raise APIError(400, "'truncate' cannot be used with 'echo' and 'logprobs': the prompt's tokens are "
                            "reported as they are", param="truncate")
    if body.max_tokens is None:
        raise APIError(400, "'echo' with 'logprobs' needs 'max_tokens' (0: only the prompt is scored)",
                       param="max_tokens")
    if body.max_tokens > 1 and len(prompts) * body.n > MAX_N:
        raise APIError(400, f"prompts times 'n' must be at most {MAX_N}", param="n")
    sampling = body.sampling()
    grammar = await off_loop(grammars.response_format_grammar, body.response_format)
    stop = limits.check_stop(body.stop)
    t_start = time.monotonic()
    lease = await st.models.acquire(body.model, adapters=body.adapters)
    try:
        lm, model = lease.loaded, lease.model
        # lm-eval's request (one greedy token after each prompt, no stop, penalty or grammar):
        # that token is the most likely one after the prompt, taken from the same scoring job
        greedy_one = (body.max_tokens == 1 and not body.stream and sampling.temperature <= 0 and grammar is None
                      and not stop and not sampling.has_penalties)
        scored = await _score_prompts(lease, prompts, body, st, next_token=greedy_one)
        n_prompt = sum(len(p.tokens) for p in scored)
        cached = sum(p.n_cached for p in scored)
        note(request, model=lm.name, prompt=n_prompt, cached=cached)
        base = {"id": _id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": lease.name,
                "system_fingerprint": FINGERPRINT}
        gens = None
        if body.max_tokens and not greedy_one:
            left = st.config.request_timeout
            if left is not None:
                left = max(1e-3, left - (time.monotonic() - t_start))
            reqs = []
            for p in scored:
                # with max_tokens 1 the answer's token is reported even when it is an end of text
                # (lm-eval drops the last entry, so it must be there); finish_reason still says stop
                reqs += conversation.requests_for(
                    p.tokens, dataclasses.replace(sampling, grammar=grammar), n=body.n,
                    max_tokens=conversation.cap_max_tokens(body.max_tokens, len(p.tokens), model.n_ctx), stop=stop,
                    logprobs=body.logprobs, ignore_eos=body.ignore_eos or body.max_tokens == 1, time_limit=left)
            gens = start(lease, reqs, st.metrics)
    except BaseException:
        lease.release()
        raise
    echoes = [p for p in scored for _ in range(body.n)]
    if body.stream:
        shown = prompts[0] if isinstance(prompts[0], str) else "(token ids)"
        return StreamingResponse(_completion_stream(request, body, lease, gens, base, [p.echo for p in echoes],
                                                    n_prompt, {}, shown, [p.logprobs for p in echoes], cached),
                                 media_type="text/event-stream", headers=STREAM_HEADERS)
    try:
        if gens is None:
            choices = [{"index": i, "text": p.echo + p.next_text, "logprobs": p.logprobs,
                        "finish_reason": "stop" if p.next_eog else "length"} for i, p in enumerate(echoes)]
            results = []
        else:
            events = await collect(request, gens)
            results = gens.results
            choices = []
            for i, (r, evs, p) in enumerate(zip(results, events, echoes)):
                if r.finish_reason == "error":
                    raise APIError(500, f"generation failed: {r.error}", type="server_error")
                choices.append({"index": i, "text": p.echo + r.text,
                                "logprobs": _joined(p.logprobs, _legacy_logprobs(model, evs, len(p.echo))),
                                "finish_reason": _scored_finish(model, body, r)})
            note(request, gen=sum(r.n_gen for r in results))
            record(request, lease.loaded.name, prompts[0] if isinstance(prompts[0], str) else "(token ids)", None,
                   results)
        usage = _usage(results, n_prompt, cached)
        if greedy_one:
            usage.update(completion_tokens=len(echoes), total_tokens=n_prompt + len(echoes))
        return JSONResponse({**base, "choices": choices, "usage": usage})
    except ClientGone:
        return Response(status_code=499)
    finally:
        lease.release()


def _scored_finish(model, body: CompletionRequest, r) -> str:
    if body.max_tokens == 1 and not body.ignore_eos and r.tokens and model.llama.is_eog(r.tokens[-1]):
        return "stop"  # generated with ignore_eos only so that the end-of-text token is reported
    return finish_reason(r)


# ---------------------------------------------------------------------------------------------
# /v1/embeddings and /v1/models


async def embed_texts(lease, items: list, *, truncate: bool, metrics, time_limit: float | None,
                      normalize: bool = True) -> tuple[list, int, int]:
    """Embed `items` (texts, or lists of token ids, used as they are) with the lease's model:
    (vectors, prompt tokens, tokens dropped by truncation). Embeddings take a place in the
    model's queue like a generation (429 when it is full) and are computed by its Engine between
    generation steps, under the request's LoRA adapters (`BASE+NAME`) as its generations are."""
    model = lease.model
    n_ctx = model.engine.n_ctx

    def tokens() -> tuple[list[list[int]], int]:
        out, truncated = [], 0
        for i, it in enumerate(items):
            toks = list(it) if isinstance(it, list) else model.embed_tokens(it)
            if not toks:
                raise APIError(400, f"input[{i}] is empty", param="input")
            if len(toks) > n_ctx:
                if not truncate:
                    raise APIError(400, f"input[{i}] has {len(toks)} tokens, more than the context ({n_ctx}); "
                                        "shorten it or send \"truncate\": true", param="input",
                                   code="context_length_exceeded")
                truncated += len(toks) - n_ctx
                toks = toks[:n_ctx]
            out.append(toks)
        return out, truncated

    inputs, truncated = await off_loop(tokens)
    gate = admit(lease, 1, metrics)
    t0 = time.perf_counter()
    try:
        vectors = await engine_job(model.engine.embed(inputs, normalize=normalize, time_limit=time_limit,
                                                      adapters=lease.adapters))
    finally:
        gate.leave(time.perf_counter() - t0)
    return vectors, sum(len(t) for t in inputs), truncated


async def engine_job(job):
    """The result of an Engine job (embeddings, scores), awaited on the event loop: the Engine's
    thread says when it is done, so no worker thread waits for it (a flood of such requests must
    not take the threads other requests need). A request cancelled meanwhile cancels the job."""
    loop = asyncio.get_running_loop()
    ended = loop.create_future()

    def wake(_job) -> None:
        try:
            loop.call_soon_threadsafe(lambda: ended.done() or ended.set_result(None))
        except RuntimeError:  # the loop is gone: the server stopped, nobody waits
            pass

    job.add_done_callback(wake)
    try:
        await ended
    except asyncio.CancelledError:
        job.cancel()
        raise
    return job.wait()


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request):
    st = state(request)
    raw = body.input
    if isinstance(raw, str) or (raw and all(type(t) is int for t in raw)):
        items = [raw]
    else:
        items = list(raw)
    if not items or len(items) > 2048:
        raise APIError(400, "'input' must hold 1 to 2048 texts", param="input")
    lease = await st.models.acquire(body.model)
    try:
        model = lease.model
        for it in items:
            if isinstance(it, list) and any(not 0 <= t < model.llama.n_vocab for t in it):
                raise APIError(400, "token ids in 'input' are out of the vocabulary", param="input")
        if body.dimensions is not None and body.dimensions > model.llama.n_embd:
            raise APIError(400, f"'dimensions' must be at most {model.llama.n_embd} for this model", param="dimensions")
        vectors, n_tokens, truncated = await embed_texts(lease, items, truncate=body.truncate, metrics=st.metrics,
                                                         time_limit=st.config.request_timeout)
    finally:
        lease.release()
    data = []
    for i, v in enumerate(vectors):
        if body.dimensions is not None:
            v = v[: body.dimensions]
            norm = sum(x * x for x in v) ** 0.5
            v = [x / norm for x in v] if norm > 0 else v
        emb: Any = v if body.encoding_format == "float" else base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    note(request, model=lease.loaded.name, prompt=n_tokens)
    extra = {"truncated_prompt_tokens": truncated} if truncated else {}
    return {"object": "list", "data": data, "model": lease.loaded.name,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}, **extra}


def _model_card(st, src, name: str | None = None) -> dict:
    """A model's card; `name` a BASE+ADAPTER variant of it (`parent` names the base)."""
    created = int(src.path.stat().st_mtime) if src.path.exists() else 0
    card = {"id": name or src.name, "object": "model", "created": created, "owned_by": "llmdesk",
            "loaded": src.name in st.models.loaded}
    return {**card, "parent": src.name} if name and name != src.name else card


@router.get("/v1/models")
async def list_models(request: Request):
    st = state(request)
    cards = [_model_card(st, s, v) for s in st.models.available() for v in [s.name, *st.models.variants(s)]]
    # the model a request that names none gets comes first (`-m BASE+ADAPTER`: that variant); the web
    # chat and most clients pick the first
    try:
        src, chosen = st.models.find_variant(None)
        first = variant_name(src.name, chosen)
    except APIError:  # no default model: the order they were given in
        first = None
    return {"object": "list", "data": sorted(cards, key=lambda c: c["id"] != first)}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request):
    st = state(request)
    src, chosen = st.models.find_variant(model)
    return _model_card(st, src, variant_name(src.name, chosen))


# ---------------------------------------------------------------------------------------------
# the tokenizer: vLLM's routes (lm-evaluation-harness's `tokenizer_backend=remote` calls them)


class TokenizeRequest(_Body):
    model: str | None = Field(None, max_length=512)
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None  # vLLM's defaults: true for a prompt, false for messages
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = Field(None, max_length=512)
    tokens: list[int]


def _token_or_none(model, token: int) -> str | None:
    return model.llama.token_text(token) if 0 <= token < model.llama.n_vocab else None


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    """{"count", "max_model_len", "tokens"} as vLLM answers. Special tokens written in the text
    (`<s>`, `<|im_end|>`) are read as those tokens, as Hugging Face tokenizers read them."""
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give either 'prompt' or 'messages'", param="prompt")
    messages = conversation.normalize_messages(body.messages) if body.messages is not None else None
    lease = await state(request).models.acquire(body.model)
    try:
        model = lease.model

        def tokens() -> list[int]:
            if messages is None:
                add = True if body.add_special_tokens is None else body.add_special_tokens
                return model.tokenize(body.prompt, add_special=add, parse_special=True)
            text = model.template.render(messages, add_generation_prompt=body.add_generation_prompt)
            return model.tokenize(text, add_special=bool(body.add_special_tokens), parse_special=True)

        toks = await off_loop(tokens)
        return {"count": len(toks), "max_model_len": model.n_ctx, "tokens": toks, "token_strs": None}
    finally:
        lease.release()


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    """{"prompt"}: the text of token ids, special tokens written out (vLLM's shape)."""
    lease = await state(request).models.acquire(body.model)
    try:
        model = lease.model
        if any(not 0 <= t < model.llama.n_vocab for t in body.tokens):
            raise APIError(400, f"token ids in 'tokens' must be between 0 and {model.llama.n_vocab - 1}",
                           param="tokens")
        return {"prompt": await off_loop(model.detokenize, body.tokens, special=True)}
    finally:
        lease.release()


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request, model: str | None = None):
    """The tokenizer's special tokens, context and chat template (vLLM's shape; `?model=` picks
    a model, else the default one)."""
    lease = await state(request).models.acquire(model)
    try:
        m = lease.model
        return {"tokenizer_class": f"llama.cpp {m.info.tokenizer_model or ''}".strip(),
                "bos_token": _token_or_none(m, m.llama.bos), "eos_token": _token_or_none(m, m.llama.eos),
                "pad_token": None, "add_bos_token": m.llama.add_bos, "model_max_length": m.n_ctx,
                "chat_template": m.llama.chat_template()}
    finally:
        lease.release()
