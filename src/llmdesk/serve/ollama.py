"""The Ollama API: /api/generate, /api/chat, /api/tags, /api/show, /api/ps, /api/embed,
/api/embeddings, /api/pull, /api/delete, /api/version.

Shapes follow Ollama's docs/api.md and its Python client's types: streamed answers are NDJSON
lines ending in one with `"done": true` and the timings (in nanoseconds); errors are
`{"error": "..."}`. Where llmdesk differs on purpose: a prompt longer than the context is an
error unless the request sends `"truncate": true` (Ollama cuts it silently), and `pull` takes
`hf:OWNER/REPO/FILE.gguf` references (GGUF files on the Hugging Face Hub).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..errors import LlmdeskError
from ..store.paths import redact
from ..runtime import conversation, grammars, limits
from ..runtime.conversation import finish_reason, sampling_params
from . import agent, documents
from .chat import off_loop, prompt_headers
from .config import parse_duration
from .errors import APIError, from_library
from .openai import STREAM_HEADERS, _last_user, embed_texts, note, record, state
from .scheduler import ClientGone, collect, start

router = APIRouter()

# the version of Ollama's API whose shapes these routes follow
OLLAMA_API_VERSION = "0.12.0"
NDJSON = "application/x-ndjson"

# options llmdesk honours, and their JSON types
_OPTIONS: dict[str, type | tuple] = {
    "num_ctx": int, "num_predict": int, "temperature": (int, float), "top_k": int, "top_p": (int, float),
    "min_p": (int, float), "seed": int, "stop": list, "repeat_penalty": (int, float), "repeat_last_n": int,
    "presence_penalty": (int, float), "frequency_penalty": (int, float),
    "adapters": list,  # LoRA adapters (llmdesk's): ["NAME", ...] or [{"name": ..., "scale": ...}]
    # answer /api/chat from a document collection (llmdesk's, as OpenAI's `collection` field)
    "collection": str, "collection_k": int, "collection_mode": str,
}
# options Ollama knows that do not apply here (GPU offload, mmap, mirostat, ...): accepted, reported
_IGNORED = {"numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all", "vocab_only",
            "use_mmap", "use_mlock", "embedding_only", "num_thread", "num_keep", "tfs_z", "typical_p", "mirostat",
            "mirostat_tau", "mirostat_eta", "penalize_newline"}


def _collection_from_options(body: "ChatBody", opts: dict) -> None:
    """`collection` (and `collection_k`, `collection_mode`) at the top level, or in `options`,
    where Ollama's own clients can send it; checked as the OpenAI route checks it."""
    for key in ("collection", "collection_k", "collection_mode"):
        if key in opts:
            if key in body.model_fields_set:
                raise APIError(400, f"give '{key}' once: at the top level or in 'options'", param=key)
            setattr(body, key, opts[key])
    if body.collection is not None and not 0 < len(body.collection) <= 64:
        raise APIError(400, "'collection' must name a collection (1 to 64 characters)", param="collection")
    if not 1 <= body.collection_k <= documents.MAX_K:
        raise APIError(400, f"'collection_k' must be 1 to {documents.MAX_K}", param="collection_k")
    if body.collection_mode not in ("hybrid", "bm25", "vector"):
        raise APIError(400, "'collection_mode' must be hybrid, bm25 or vector", param="collection_mode")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class _GenBody(_Body):
    model: str = Field(min_length=1, max_length=512)
    format: str | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    stream: bool = True
    keep_alive: str | int | float | None = None
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    truncate: bool = False
    adapters: list | None = None  # LoRA adapters, here or in options (where Ollama's clients can send it)


class GenerateBody(_GenBody):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[Any] | None = None


class ChatBody(_GenBody):
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None  # llmdesk's: OpenAI's tool_choice (Ollama has none)
    max_steps: int = 8  # rounds of MCP tool calls the server runs (serve/agent.py)
    # answer from a document collection (serve/documents.py), here or in options
    collection: str | None = None
    collection_k: int = 5
    collection_mode: str = "hybrid"


class EmbedBody(_Body):
    model: str = Field(min_length=1, max_length=512)
    input: str | list[str] = ""
    truncate: bool = False
    options: dict[str, Any] | None = None
    keep_alive: str | int | float | None = None
    dimensions: int | None = Field(None, ge=1)


class EmbeddingsBody(_Body):
    model: str = Field(min_length=1, max_length=512)
    prompt: str = ""
    options: dict[str, Any] | None = None
    keep_alive: str | int | float | None = None


class NameBody(_Body):
    model: str | None = Field(None, max_length=512)
    name: str | None = Field(None, max_length=512)  # the older field name
    verbose: bool = False
    stream: bool = True
    insecure: bool = False

    @property
    def ref(self) -> str:
        ref = self.model or self.name
        if not ref:
            raise APIError(400, "'model' is required", param="model")
        return ref


def parse_options(options: dict | None) -> tuple[dict, list[str]]:
    """(the options llmdesk honours, type-checked; the names of the ones it ignores). Ranges are
    the library's, checked with the sampling settings (`sampling_params`)."""
    if not options:
        return {}, []
    out, ignored = {}, []
    for key, value in options.items():
        kind = _OPTIONS.get(key)
        if kind is None:
            ignored.append(key)
            continue
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, kind):
            want = {int: "an integer", list: "a list of strings", str: "a string"}.get(kind, "a number")
            raise APIError(400, f"option \"{key}\" must be {want}, got {json.dumps(value)[:40]}", param=f"options.{key}")
        out[key] = value
    if "stop" in out:
        out["stop"] = limits.check_stop(out["stop"], "options.stop")
    if out.get("num_ctx") is not None and out["num_ctx"] < 16:
        raise APIError(400, "option \"num_ctx\" must be at least 16", param="options.num_ctx")
    if "num_predict" in out and out["num_predict"] < -2:
        raise APIError(400, "option \"num_predict\" must be >= 0, or -1 (no limit) or -2 (fill the context)",
                       param="options.num_predict")
    return out, ignored


_SAMPLING_OPTIONS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "presence_penalty",
                     "frequency_penalty")


def _sampling(opts: dict):
    return sampling_params(**{k: opts.get(k) for k in _SAMPLING_OPTIONS}, seed=opts.get("seed"),
                           params={k: f"options.{k}" for k in (*_SAMPLING_OPTIONS, "seed")})


def _keep_alive(value) -> float | None:
    try:
        return parse_duration(value)
    except LlmdeskError as e:
        raise APIError(400, str(e), param="keep_alive") from None


def _details(st, src) -> dict:
    info = st.gguf_info(src)
    params = info.parameter_count if info else (src.entry.parameters if src.entry else None)
    family = (info.architecture if info else None) or (src.entry.architecture if src.entry else None) or ""
    quant = (info.file_type if info else None) or (src.entry.file_type if src.entry else None) or ""
    return {"parent_model": "", "format": "gguf", "family": family, "families": [family] if family else None,
            "parameter_size": _param_size(params), "quantization_level": quant}


def _param_size(n: int | None) -> str:
    if not n:
        return ""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def _ignored_header(ignored: list[str]) -> dict[str, str]:
    return {"X-Llmdesk-Ignored-Options": ",".join(sorted(ignored))[:500]} if ignored else {}


async def _load_only(request: Request, model: str, keep_alive: float | None, chat: bool):
    """Ollama's convention: a request without a prompt loads the model (keep_alive 0: unloads it)."""
    st = state(request)
    lease = await st.models.acquire(model, keep_alive=keep_alive)
    lease.release()
    reason = "load"
    if keep_alive is not None and keep_alive == 0:
        await st.models.unload(lease.loaded.name)
        reason = "unload"
    out: dict[str, Any] = {"model": lease.loaded.name, "created_at": _now(), "done": True, "done_reason": reason}
    if chat:
        out["message"] = {"role": "assistant", "content": ""}
    else:
        out["response"] = ""
    return out


def _logprobs(model, events) -> list[dict]:
    out = []
    for ev in events:
        if ev.logprob is None:
            continue
        text = lambda t: model.llama.piece(t, special=True).decode("utf-8", "replace")  # noqa: E731
        out.append({"token": text(ev.token), "logprob": ev.logprob,
                    "top_logprobs": [{"token": text(t), "logprob": p} for t, p in ev.top_logprobs or []]})
    return out


def _final(r, t_start: float, load_s: float) -> dict:
    ns = lambda s: int(s * 1e9)  # noqa: E731
    return {"done": True, "done_reason": finish_reason(r) if r.finish_reason in ("stop", "length", "time_limit") else "stop",
            "total_duration": ns(time.perf_counter() - t_start), "load_duration": ns(load_s),
            "prompt_eval_count": r.n_prompt, "prompt_eval_duration": ns(r.prefill_s),
            "eval_count": r.n_gen, "eval_duration": ns(r.decode_s)}


async def _generate_common(request: Request, body: _GenBody, *, chat: bool):
    st = state(request)
    t_start = time.perf_counter()
    if body.think:
        raise APIError(400, "'think' is not supported by this server's models", param="think")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    keep_alive = _keep_alive(body.keep_alive)
    opts, ignored = parse_options(body.options)
    sampling = _sampling(opts)
    grammar = await off_loop(grammars.ollama_format_grammar, body.format)
    docs = None
    if chat:
        if not body.messages:
            return await _load_only(request, body.model, keep_alive, chat=True)
        messages = conversation.normalize_messages(body.messages, images_field=True)
        mcp = agent.mcp_entries(body.tools)
        if mcp is not None:
            return await _chat_with_mcp(request, body, messages, agent.chosen_tools(request, mcp), keep_alive, opts,
                                        sampling, ignored, t_start)
        _collection_from_options(body, opts)
        docs = await documents.retrieve_for(st.models, body, messages)  # from the user's own words
    else:
        if "collection" in opts:
            raise APIError(400, "a collection answers a chat: send it to /api/chat", param="options.collection")
        if body.images:
            raise APIError(400, "'images': this server's models read text only", param="images")
        if body.suffix:
            raise APIError(400, "'suffix' (fill in the middle) is not supported", param="suffix")
        if body.template:
            raise APIError(400, "'template' overrides are not supported; the model's own chat template is used "
                                "(or send \"raw\": true with a formatted prompt)", param="template")
        if not body.prompt and not body.context:
            return await _load_only(request, body.model, keep_alive, chat=False)
    num_ctx = opts.get("num_ctx")
    lease, load_s = await _acquire(st, body, opts, keep_alive)
    try:
        lm = lease.loaded
        model = lease.model
        limit = min(num_ctx or model.n_ctx, model.n_ctx)
        num_predict = opts.get("num_predict")
        max_tokens = None if num_predict is None or num_predict < 0 else num_predict
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        common = dict(grammar=grammar, sampling=sampling, max_tokens=max_tokens, stop=opts.get("stop"),
                      logprobs=logprobs, truncate=body.truncate, time_limit=st.config.request_timeout, context=limit)
        if chat:
            if docs is not None:
                messages = await off_loop(documents.quote, model, messages, docs, max_tokens)
            turn = await off_loop(conversation.prepare, model, messages, tools=body.tools, tool_choice=body.tool_choice,
                                  **common)
        elif body.raw or body.context:
            turn = await off_loop(_raw_turn, model, body, limit, common)
        else:
            msgs = ([{"role": "system", "content": body.system}] if body.system else []) + \
                   [{"role": "user", "content": body.prompt or ""}]
            turn = await off_loop(conversation.prepare, model, msgs, **common)
        prompt, reqs = turn.prompt, turn.requests
        gens = start(lease, reqs, st.metrics)
    except BaseException:
        lease.release()
        raise
    note(request, model=lm.name, prompt=len(prompt.tokens))
    headers = {**prompt_headers(prompt), **_ignored_header(ignored)}
    head = {"model": lease.name}
    tail = docs.fields() if chat and docs is not None else {}  # the documents' sources, on the last line
    if body.stream:
        return StreamingResponse(_ndjson(request, body, lease, gens, turn, head, prompt, t_start, load_s, chat, tail),
                                 media_type=NDJSON, headers={**headers, **STREAM_HEADERS})
    try:  # the lease is held until the answer is built
        events = (await collect(request, gens))[0]
        r = gens.results[0]
        if r.finish_reason == "error":
            raise APIError(500, f"generation failed: {r.error}")
        out: dict[str, Any] = {**head, "created_at": _now()}
        if chat:
            content, calls = turn.parse(r.text)
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = [{"function": {"name": c.name, "arguments": c.arguments}} for c in calls]
            out["message"] = message
        else:
            out["response"] = r.text
        out.update(_final(r, t_start, load_s))
        if not chat:
            out["context"] = prompt.tokens + r.tokens
        if body.logprobs:
            out["logprobs"] = _logprobs(model, events)
        if prompt.truncated_tokens:
            out["truncated_prompt_tokens"] = prompt.truncated_tokens
        out.update(tail)
        note(request, gen=r.n_gen, cached=r.n_cached, ttft=round(r.ttft_s, 3))
        record(request, lm.name, *_shown(body, chat), gens.results)
        return JSONResponse(out, headers=headers)
    except ClientGone:
        return Response(status_code=499)
    finally:
        lease.release()


def _raw_turn(model, body: GenerateBody, limit: int, common: dict) -> conversation.Turn:
    """/api/generate with `raw` (the prompt as it is) or `context` (the tokens of an earlier
    answer, then this prompt): a turn without the chat template's rendering of messages."""
    if body.raw:
        prompt = conversation.text_prompt(model, body.prompt or "", limit=limit, truncate=body.truncate)
    else:
        msgs = ([{"role": "system", "content": body.system}] if body.system else []) + \
               [{"role": "user", "content": body.prompt or ""}]
        prompt = conversation.chat_prompt(model, msgs, spec=None, limit=limit, truncate=body.truncate)
    if body.context:
        if any(not 0 <= t < model.llama.n_vocab for t in body.context):
            raise APIError(400, "'context' holds token ids out of the vocabulary", param="context")
        prompt.tokens = list(body.context) + prompt.tokens
        if len(prompt.tokens) >= limit:
            raise APIError(400, f"'context' and the prompt have {len(prompt.tokens)} tokens, but the context "
                                f"holds {limit}", code="context_length_exceeded", param="context")
    stop = limits.check_stop(common["stop"])
    if not body.raw:
        stop = conversation.with_template_stops(stop, model)
    budget = conversation.cap_max_tokens(common["max_tokens"], len(prompt.tokens), limit)
    reqs = conversation.requests_for(prompt.tokens, dataclasses.replace(common["sampling"], grammar=common["grammar"]),
                                     max_tokens=budget, stop=stop, logprobs=common["logprobs"],
                                     time_limit=common["time_limit"])
    return conversation.Turn(prompt, None, reqs, budget)


def _shown(body, chat: bool) -> tuple[str, str | None]:
    """The prompt and system prompt of a request, for the log."""
    if chat:
        return _last_user([{"role": m.get("role"), "content": m.get("content") if isinstance(m.get("content"), str) else ""}
                           for m in body.messages or []])
    return body.prompt or "", body.system


async def _ndjson(request, body, lease, gens, turn, head, prompt, t_start, load_s, chat, tail):
    model = lease.model
    filt = turn.stream_filter()

    def line(obj) -> str:
        return json.dumps(obj, ensure_ascii=False) + "\n"

    def part(text: str, events=None, calls=None) -> str:
        out: dict[str, Any] = {**head, "created_at": _now()}
        if chat:
            out["message"] = {"role": "assistant", "content": text}
            if calls:
                out["message"]["tool_calls"] = [{"function": {"name": c.name, "arguments": c.arguments}} for c in calls]
        else:
            out["response"] = text
        if events and body.logprobs:
            out["logprobs"] = _logprobs(model, events)
        out["done"] = False
        return line(out)

    try:
        async for _, ev in gens.events():
            if ev is None:
                break
            text = filt.feed(ev.text) if filt else ev.text
            if text or (body.logprobs and ev.logprob is not None):
                yield part(text, [ev])
        r = gens.results[0]
        if r.finish_reason == "error":
            yield line({"error": f"generation failed: {r.error}"})
            return
        if filt:
            tail, calls = filt.finish()
            if tail or calls:
                yield part(tail, calls=calls)
        final: dict[str, Any] = {**head, "created_at": _now()}
        if chat:
            final["message"] = {"role": "assistant", "content": ""}
        else:
            final["response"] = ""
            final["context"] = prompt.tokens + r.tokens
        final.update(_final(r, t_start, load_s))
        if prompt.truncated_tokens:
            final["truncated_prompt_tokens"] = prompt.truncated_tokens
        final.update(tail)
        yield line(final)
    finally:
        gens.cancel()
        lease.release()
        r = gens.results[0]
        note(request, gen=r.n_gen, cached=r.n_cached, ttft=round(r.ttft_s, 3), finish=r.finish_reason or "cancelled")
        record(request, lease.loaded.name, *_shown(body, chat), gens.results)


async def _acquire(st, body: _GenBody, opts: dict, keep_alive):
    """The request's model leased (loaded if need be), with its LoRA adapters from the top level
    or from `options` (where Ollama's clients can send them): (lease, seconds the load took)."""
    if body.adapters is not None and "adapters" in opts:
        raise APIError(400, "give 'adapters' once: at the top level or in 'options'", param="adapters")
    in_options = body.adapters is None
    t_load = time.perf_counter()
    lease = await st.models.acquire(body.model, keep_alive=keep_alive, n_ctx=opts.get("num_ctx"),
                                    adapters=opts.get("adapters") if in_options else body.adapters,
                                    adapters_param="options.adapters" if in_options else "adapters")
    return lease, time.perf_counter() - t_load


async def _chat_with_mcp(request: Request, body: ChatBody, messages: list[dict], functions: dict, keep_alive,
                         opts: dict, sampling, ignored: list[str], t_start: float):
    """/api/chat whose `tools` name MCP servers: the server runs the agent loop over their tools
    (serve/agent.py); the answer's message carries the calls it made in `mcp_calls`."""
    st = state(request)
    for param, given in (("format", body.format), ("logprobs", body.logprobs)):
        if given:
            raise APIError(400, f"'{param}' cannot be combined with MCP tools", param=param)
    num_ctx = opts.get("num_ctx")
    lease, load_s = await _acquire(st, body, opts, keep_alive)
    try:
        num_predict = opts.get("num_predict")
        settings = dict(sampling=sampling, max_tokens=None if num_predict is None or num_predict < 0 else num_predict,
                        stop=opts.get("stop"), truncate=body.truncate,
                        context=min(num_ctx or lease.model.n_ctx, lease.model.n_ctx))
        turn = await agent.start_turn(request, st, lease, messages, functions, tool_choice=body.tool_choice or "auto",
                                      max_steps=body.max_steps, settings=settings)
    except BaseException:
        lease.release()
        raise
    note(request, model=lease.loaded.name)
    head = {"model": lease.name}
    headers = _ignored_header(ignored)

    def line(obj) -> str:
        return json.dumps(obj, ensure_ascii=False) + "\n"

    def final(result) -> dict:
        out = {**head, "created_at": _now(),
               "message": {"role": "assistant", "content": "" if body.stream else result.text,
                           **({} if body.stream else {"mcp_calls": turn.calls})}}
        out.update(_final(turn.last, t_start, load_s))
        return out

    async def lines():
        try:
            async for kind, value in turn.events():
                if kind == "text":
                    yield line({**head, "created_at": _now(), "message": {"role": "assistant", "content": value},
                                "done": False})
                elif kind == "call":
                    yield line({**head, "created_at": _now(),
                                "message": {"role": "assistant", "content": "", "mcp_calls": [value]}, "done": False})
                else:
                    yield line(final(value))
        except (APIError, LlmdeskError) as e:
            yield line({"error": getattr(e, "message", None) or str(e)})
        finally:
            turn.stop()
            if turn.model.results:
                note(request, gen=sum(r.n_gen for r in turn.model.results), mcp_calls=len(turn.calls))
                record(request, lease.loaded.name, *_shown(body, True), [turn.last])

    if body.stream:
        return StreamingResponse(lines(), media_type=NDJSON, headers={**headers, **STREAM_HEADERS})
    try:
        result = await turn.finish(request)
    except ClientGone:
        return Response(status_code=499)
    finally:
        turn.stop()
    note(request, gen=sum(r.n_gen for r in turn.model.results), mcp_calls=len(turn.calls))
    record(request, lease.loaded.name, *_shown(body, True), [turn.last])
    return JSONResponse(final(result), headers=headers)


@router.post("/api/generate")
async def generate(body: GenerateBody, request: Request):
    return await _generate_common(request, body, chat=False)


@router.post("/api/chat")
async def chat(body: ChatBody, request: Request):
    return await _generate_common(request, body, chat=True)


# ---------------------------------------------------------------------------------------------
# embeddings


@router.post("/api/embed")
async def embed(body: EmbedBody, request: Request):
    st = state(request)
    t0 = time.perf_counter()
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not texts or len(texts) > 2048:
        raise APIError(400, "'input' must hold 1 to 2048 texts", param="input")
    parse_options(body.options)
    lease = await st.models.acquire(body.model, keep_alive=_keep_alive(body.keep_alive))
    load_s = time.perf_counter() - t0
    try:
        if body.dimensions is not None and body.dimensions > lease.model.llama.n_embd:
            raise APIError(400, f"'dimensions' must be at most {lease.model.llama.n_embd}", param="dimensions")
        vectors, n_tokens, truncated = await embed_texts(lease, texts, truncate=body.truncate, metrics=st.metrics,
                                                         time_limit=st.config.request_timeout)
    finally:
        lease.release()
    if body.dimensions is not None:
        cut = []
        for v in vectors:
            v = v[: body.dimensions]
            norm = sum(x * x for x in v) ** 0.5
            cut.append([x / norm for x in v] if norm > 0 else v)
        vectors = cut
    note(request, model=lease.loaded.name, prompt=n_tokens)
    out = {"model": lease.loaded.name, "embeddings": vectors, "total_duration": int((time.perf_counter() - t0) * 1e9),
           "load_duration": int(load_s * 1e9), "prompt_eval_count": n_tokens}
    if truncated:
        out["truncated_prompt_tokens"] = truncated
    return out


@router.post("/api/embeddings")
async def embeddings_legacy(body: EmbeddingsBody, request: Request):
    st = state(request)
    if not body.prompt:
        raise APIError(400, "'prompt' is empty", param="prompt")
    lease = await st.models.acquire(body.model, keep_alive=_keep_alive(body.keep_alive))
    try:
        vectors, n_tokens, _ = await embed_texts(lease, [body.prompt], truncate=False, normalize=False,
                                                 metrics=st.metrics, time_limit=st.config.request_timeout)
    finally:
        lease.release()
    note(request, model=lease.loaded.name, prompt=n_tokens)
    return {"embedding": vectors[0]}


# ---------------------------------------------------------------------------------------------
# models


@router.get("/api/tags")
async def tags(request: Request):
    st = state(request)
    out = []
    for src in st.models.available():
        stat = src.path.stat()
        for name in [src.name, *st.models.variants(src)]:  # BASE+ADAPTER: the base with a LoRA adapter
            details = _details(st, src)
            if name != src.name:
                details["parent_model"] = src.name
            out.append({"name": name, "model": name,
                        "modified_at": src.entry.added if src.entry else _iso(stat.st_mtime),
                        "size": stat.st_size, "digest": src.entry.sha256 if src.entry else "", "details": details})
    return {"models": out}


@router.post("/api/show")
async def show(body: NameBody, request: Request):
    st = state(request)
    src, _ = st.models.find_variant(body.ref)
    info = st.gguf_info(src)
    model_info = {}
    for k, v in (info.metadata.items() if info else ()):
        if k == "tokenizer.chat_template":
            continue
        if isinstance(v, list) and len(v) > 64 and not body.verbose:
            v = None  # as Ollama: the vocabulary only with "verbose"
        model_info[k] = v
    template = (info.chat_template if info else None) or ""
    lm = st.models.loaded.get(src.name)
    stops = lm.model.template.stop_strings if lm else []
    params = "".join(f"stop {json.dumps(s)}\n" for s in stops)
    return {"license": "", "modelfile": f"# llmdesk: a GGUF file\nFROM {src.name}\n", "parameters": params,
            "template": template, "details": _details(st, src), "model_info": model_info,
            "capabilities": ["completion", "tools"],
            "modified_at": src.entry.added if src.entry else _iso(src.path.stat().st_mtime)}


@router.get("/api/ps")
async def ps(request: Request):
    st = state(request)
    out = []
    for lm in list(st.models.loaded.values()):
        exp = lm.expires_wall()
        out.append({"name": lm.name, "model": lm.name, "size": lm.estimate.total,
                    "digest": lm.source.entry.sha256 if lm.source.entry else "",
                    "details": _details(st, lm.source),
                    # Ollama's way of saying "never": a date far away
                    "expires_at": _iso(exp) if exp is not None else "2318-01-01T00:00:00Z",
                    "size_vram": 0, "context_length": lm.n_ctx})
    return {"models": out}


@router.post("/api/pull")
async def pull(body: NameBody, request: Request):
    from ..store import pull as pull_mod

    ref = body.ref
    if not ref.startswith("hf:"):
        raise APIError(400, f"cannot pull {ref!r}: llmdesk pulls GGUF files from the Hugging Face Hub; "
                            f"name one as {pull_mod.SYNTAX}", param="model")
    try:
        pull_mod.parse_hf_ref(ref)
    except LlmdeskError as e:
        raise from_library(e) from None
    note(request, model=ref)

    async def run():
        entry = await asyncio.to_thread(pull_mod.pull, ref, progress=False)
        return {"status": "success", "model": entry.ref, "digest": f"sha256:{entry.sha256}", "total": entry.size,
                "completed": entry.size}

    if not body.stream:
        return await run()

    async def lines():
        yield json.dumps({"status": f"pulling {ref}"}) + "\n"
        try:
            done = await run()
        except LlmdeskError as e:
            yield json.dumps({"error": redact(str(e))}) + "\n"
            return
        yield json.dumps({"status": "verifying sha256 digest", "digest": done["digest"]}) + "\n"
        yield json.dumps(done) + "\n"

    return StreamingResponse(lines(), media_type=NDJSON)


@router.delete("/api/delete")
async def delete(body: NameBody, request: Request):
    from ..store import catalog

    st = state(request)
    src = st.models.find(body.ref)
    if src.entry is None:
        raise APIError(400, f"'{src.name}' is a file the server was started with, not a model in the store; "
                            "llmdesk deletes only models in its store", param="model")
    lm = st.models.loaded.get(src.name)
    if lm is not None and not await st.models.unload(src.name, "deleted"):
        raise APIError(409, f"model '{src.name}' is answering requests; delete it when it is idle", param="model")
    try:
        await asyncio.to_thread(catalog.remove, src.entry.ref)
    except LlmdeskError as e:
        raise from_library(e) from None
    note(request, model=src.name)
    return Response(status_code=200)


@router.get("/api/version")
async def version():
    return {"version": OLLAMA_API_VERSION, "llmdesk": __version__}
