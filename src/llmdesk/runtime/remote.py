"""A model behind an OpenAI-compatible HTTP API, with the local Model's methods.

    model = llmdesk.load("openai:http://127.0.0.1:8080/v1#tiny.gguf")   # or openai:NAME (endpoints.toml)
    model.generate("The capital of France is", max_tokens=8, temperature=0)
    reply = model.respond([{"role": "user", "content": "Weather in Oslo?"}], tools=[...])

Any server that speaks OpenAI's API will do: `llmdesk serve`, llama.cpp's server, vLLM, a cloud
API. Loading asks GET /models once: the endpoint is there, the key is accepted, the model exists
(a reference without `#MODEL` takes the first model listed). Every answer is streamed
(server-sent events), so `on_text`, `stream` and the time to first token work as they do locally.

Sampling: OpenAI's own fields (temperature, top_p, seed, stop, penalties, max_tokens) are sent as
given; None leaves the endpoint's default. llama.cpp's extensions (top_k, min_p, repeat_penalty,
repeat_last_n, ignore_eos) are sent only when they differ from llama.cpp's defaults: a strict
endpoint (OpenAI's own) refuses fields it does not know, and at those values they are what
llmdesk and llama.cpp servers use anyway. A GBNF `grammar` is refused (no OpenAI field carries
it); `response_format` with a JSON schema does the same job everywhere.

Failures: a connection error, a 429 (after the Retry-After it asks for) or a 5xx is retried with
exponential backoff and jitter, at most `max_retries` times and `max_retry_s` seconds in all, and
only before an answer has started (text already shown cannot be taken back); a 4xx is never
retried. Every failure a user can cause is one LlmdeskError line. The API key is read from the
environment variable the reference names (never from the reference itself), sent as
`Authorization: Bearer`, and kept out of every message, log line and repr.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

import httpx

from .. import __version__
from ..errors import LlmdeskError, ModelNotFound
from ..store import paths
from ..store.refs import ModelRef, endpoints_path, resolve
from .limits import DEFAULTS as LLAMA_DEFAULTS

if TYPE_CHECKING:  # pragma: no cover
    from .conversation import Reply
    from .model import Completion

log = logging.getLogger("llmdesk.remote")

# backoff: 0.5 s, 1 s, 2 s, ... at most 8 s, each times a random factor in [0.5, 1] so that clients
# refused together do not come back together
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 8.0
_STANDARD = ("temperature", "top_p", "seed", "frequency_penalty", "presence_penalty")
_EXTENSIONS = ("top_k", "min_p", "repeat_penalty", "repeat_last_n")
_KEYWORDS = set(_STANDARD) | set(_EXTENSIONS) | {"max_tokens", "stop", "logprobs", "grammar", "ignore_eos",
                                                  "time_limit"}
MAX_MESSAGE_CHARS = 300  # of an endpoint's error message, in ours


@dataclass
class RemoteEvent:
    """A piece of a streamed answer (what `run` prints as it comes)."""

    text: str


@dataclass
class RemoteScore:
    """A scored (context, continuation) pair from an endpoint: the local ScoreResult's fields,
    with the tokens as the endpoint writes them (it does not send their ids)."""

    tokens: list[str]
    logprobs: list[float]  # log P(tokens[i] | context + tokens[:i]), natural log
    greedy: list[bool]  # tokens[i] was the most likely token there
    top: list[list[tuple[str, float]]] | None = None  # with top_k: the most likely tokens there

    @property
    def logprob(self) -> float:
        return float(sum(self.logprobs))

    @property
    def is_greedy(self) -> bool:
        return all(self.greedy)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


@dataclass
class _ToolCallParts:
    id: str = ""
    name: str = ""
    arguments: str = ""  # JSON text, streamed in pieces


class RemoteStream:
    """One answer as it streams in: iterate for RemoteEvents; afterwards the fields hold the
    whole answer (text, tool calls, finish reason, usage, timings)."""

    def __init__(self, model: "RemoteModel", response: httpx.Response, *, chat: bool, t0: float,
                 time_limit: float | None, read_timeout: float):
        self._model = model
        self._response = response
        self.chat = chat
        self.t0 = t0
        self.deadline = None if time_limit is None else t0 + time_limit
        self.read_timeout = read_timeout
        self.parts: list[str] = []
        self.calls: dict[int, _ToolCallParts] = {}
        self.finish_reason: str | None = None
        self.usage: dict = {}
        self.timings: dict = {}
        self.truncated_tokens = 0
        self.logprobs: list[tuple[str, float, list[tuple[str, float]]]] = []
        self.ttft_s: float | None = None
        self.total_s = 0.0
        self.done = False
        self._events = self._read()

    def __iter__(self) -> Iterator[RemoteEvent]:
        return self._events

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def drain(self) -> "RemoteStream":
        for _ in self._events:
            pass
        return self

    def cancel(self) -> None:
        """Stop reading; closing the connection makes the server cancel the generation."""
        self._events.close()
        self._response.close()  # (closing a generator that never started runs no finally)

    # -- reading ---------------------------------------------------------------------------------
    def _read(self) -> Iterator[RemoteEvent]:
        base = self._model.base_url
        try:
            for obj in self._chunks():
                text = self._take(obj)
                if self.ttft_s is None and (text or self.calls):
                    self.ttft_s = time.monotonic() - self.t0
                if text:
                    self.parts.append(text)
                    yield RemoteEvent(text)
                if self.deadline is not None and time.monotonic() > self.deadline and self.finish_reason is None:
                    self.finish_reason = "time_limit"
                    break
        except httpx.ReadTimeout:
            raise LlmdeskError(f"{base} stopped sending in the middle of an answer (nothing for "
                               f"{self.read_timeout:g} s)") from None
        except httpx.TransportError as e:
            raise LlmdeskError(f"the connection to {base} broke in the middle of an answer ({_why(e)})") from None
        finally:
            self._response.close()
            self.total_s = time.monotonic() - self.t0
            self.done = True
        if self.finish_reason is None:
            raise LlmdeskError(f"{base} ended the answer without saying why (no finish_reason); "
                               "the connection may have been cut")

    def _chunks(self) -> Iterator[dict]:
        r = self._response
        if not r.headers.get("content-type", "").startswith("text/event-stream"):
            # an endpoint that ignores stream=true answers once, as one JSON object
            r.read()
            yield _as_chunk(self._model._json(r, "the answer"), self.chat)
            return
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue  # comments (": ping"), event names, blank separators
            data = line[5:].strip()
            if data == "[DONE]":
                return
            try:
                obj = json.loads(data)
            except json.JSONDecodeError:
                raise LlmdeskError(f"{self._model.base_url} sent an event that is not JSON in its stream: "
                                   f"{_one_line(data, 80)}") from None
            if not isinstance(obj, dict):
                continue
            if obj.get("error") is not None:
                raise LlmdeskError(f"the endpoint failed in the middle of the answer: "
                                   f"{self._model._scrub(_error_text(obj))}")
            yield obj

    def _take(self, obj: dict) -> str:
        """Fold one chunk into the answer; returns its new text."""
        if isinstance(obj.get("usage"), dict):
            self.usage = obj["usage"]
        if isinstance(obj.get("timings"), dict):
            self.timings = obj["timings"]
        if isinstance(obj.get("truncated_prompt_tokens"), int):
            self.truncated_tokens = obj["truncated_prompt_tokens"]
        text = ""
        for ch in obj.get("choices") or []:
            if not isinstance(ch, dict) or ch.get("index", 0) != 0:
                continue  # only the first choice is asked for
            if self.chat:
                delta = ch.get("delta") or {}
                text += delta.get("content") or ""
                for j, tc in enumerate(delta.get("tool_calls") or []):
                    part = self.calls.setdefault(tc.get("index", j), _ToolCallParts())
                    part.id = tc.get("id") or part.id
                    fn = tc.get("function") or {}
                    part.name += fn.get("name") or ""  # names and arguments stream as pieces to join
                    args = fn.get("arguments")
                    part.arguments = (part.arguments + args if isinstance(args, str)
                                      else json.dumps(args) if isinstance(args, dict) else part.arguments)
                for e in (ch.get("logprobs") or {}).get("content") or []:
                    self.logprobs.append((e.get("token", ""), float(e.get("logprob", 0.0)),
                                          [(t.get("token", ""), float(t.get("logprob", 0.0)))
                                           for t in e.get("top_logprobs") or []]))
            else:
                text += ch.get("text") or ""
                lp = ch.get("logprobs") or {}
                for i, (tok, p) in enumerate(zip(lp.get("tokens") or [], lp.get("token_logprobs") or [])):
                    tops = (lp.get("top_logprobs") or [])
                    top = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
                    self.logprobs.append((tok, float(p if p is not None else 0.0), [(t, float(v)) for t, v in top.items()]))
            if ch.get("finish_reason"):
                self.finish_reason = ch["finish_reason"]
        return text

    # -- the numbers -----------------------------------------------------------------------------
    def numbers(self) -> dict[str, Any]:
        """Usage and speed: the endpoint's counts; times as this client saw them (network and
        queue included); decode speed from llama.cpp's `timings` when the endpoint sends them."""
        u, t = self.usage, self.timings
        n_prompt = int(u.get("prompt_tokens") or 0)
        n_gen = int(u.get("completion_tokens") or 0)
        cached = int((u.get("prompt_tokens_details") or {}).get("cached_tokens") or t.get("cached_n") or 0)
        ttft = self.ttft_s if self.ttft_s is not None else self.total_s
        decode = self.total_s - ttft
        tps = t.get("predicted_per_second")
        if not isinstance(tps, (int, float)):
            tps = (n_gen - 1) / decode if n_gen > 1 and decode > 0 else 0.0
        prefill = (n_prompt - cached) / ttft if ttft > 0 and n_prompt > cached else 0.0
        if isinstance(t.get("prompt_ms"), (int, float)) and t["prompt_ms"] > 0 and isinstance(t.get("prompt_n"), int):
            prefill = t["prompt_n"] / (t["prompt_ms"] / 1000)
        return dict(prompt_tokens=n_prompt, completion_tokens=n_gen, cached_tokens=cached, ttft_s=ttft,
                    tokens_per_second=float(tps), prefill_tokens_per_second=float(prefill), total_s=self.total_s)


class RemoteModel:
    """A model served by an OpenAI-compatible endpoint; the same calls as a local `Model`.

    `timeout`: seconds to wait for the next bytes of an answer; `connect_timeout`: for a
    connection; `max_retries` / `max_retry_s`: how often and how long to retry (see the module)."""

    def __init__(self, ref: ModelRef | str, *, timeout: float = 600.0, connect_timeout: float = 10.0,
                 max_retries: int = 4, max_retry_s: float = 60.0):
        if isinstance(ref, str):
            ref = resolve(ref, allow_remote=True)
        if not ref.is_remote:
            raise LlmdeskError(f"'{ref.name}' is a local model; load it with llmdesk.load")
        self.ref = ref
        self.base_url = ref.base_url
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_retries = max_retries
        self.max_retry_s = max_retry_s
        # the key lives only in the client's headers (httpx shows them as [secure] in a repr)
        key = self._read_key()
        headers = {"User-Agent": f"llmdesk/{__version__}"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, connect=connect_timeout),
                                    follow_redirects=False)
        self.is_llmdesk = False  # the endpoint is `llmdesk serve` (it takes "truncate")
        try:
            self.model, self.n_ctx = self._find_model()
        except BaseException:
            self._client.close()
            raise
        self.name = ref.name if ref.model else f"{ref.name}#{self.model}"

    def _read_key(self) -> str | None:
        var = self.ref.key_env
        if var is None:
            return None
        key = os.environ.get(var, "").strip()
        if not key:
            raise LlmdeskError(f"{var} is not set: endpoint '{self.ref.endpoint}' in "
                               f"{paths.display(endpoints_path())} reads its API key from it; export {var}=KEY")
        return key

    # -- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "RemoteModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RemoteModel {self.name} ({self.base_url})>"

    # -- generation (the local Model's calls) -------------------------------------------------------
    def start(self, prompt: str | list[int], **kw) -> RemoteStream:
        """Send a prompt as it is (POST /completions, no chat template); the answer streams in."""
        body, time_limit = self._body(kw, chat=False)
        return self._open("/completions", {"model": self.model, "prompt": prompt, **body}, chat=False,
                          time_limit=time_limit)

    def chat_start(self, messages: list[dict], **kw) -> RemoteStream:
        """Send a conversation (POST /chat/completions; the server applies its chat template)."""
        body, time_limit = self._body(kw, chat=True)
        return self._open("/chat/completions", {"model": self.model, "messages": wire_messages(messages), **body},
                          chat=True, time_limit=time_limit)

    def finish(self, stream: RemoteStream) -> "Completion":
        """Read the rest of a stream and describe the result."""
        from .model import Completion, TokenLogprob

        stream.drain()
        lps = None
        if stream.logprobs:
            lps = [TokenLogprob(-1, t, p, top) for t, p, top in stream.logprobs]  # ids are not sent
        return Completion(text=stream.text, finish_reason=stream.finish_reason or "stop", logprobs=lps,
                          **stream.numbers())

    def complete(self, prompt: str | list[int], **kw) -> "Completion":
        return self.finish(self.start(prompt, **kw))

    def generate(self, prompt: str | list[int], **kw) -> str:
        return self.complete(prompt, **kw).text

    def stream(self, prompt: str | list[int], **kw) -> Iterator[str]:
        """Yield pieces of text as they come; joined they equal `generate`."""
        s = self.start(prompt, **kw)
        try:
            for ev in s:
                yield ev.text
        finally:
            s.cancel()

    def chat(self, messages: list[dict], *, tools=None, max_steps: int = 8, confirm=None, tool_choice=None,
             tool_timeout: float | None = 60.0, on_run=None, **kw):
        """The text of the answer; with `tools` the agent loop, as the local Model's `chat`."""
        if tools is not None:
            from .agent import chat

            return chat(self, messages, tools, max_steps=max_steps, confirm=confirm, tool_choice=tool_choice,
                        tool_timeout=tool_timeout, on_run=on_run, **kw)
        if tool_choice is not None or confirm is not None or on_run is not None:
            raise LlmdeskError("tool_choice, confirm and on_run go with tools=[...]")
        return self.finish(self.chat_start(messages, **kw)).text

    def chat_stream(self, messages: list[dict], **kw) -> Iterator[str]:
        s = self.chat_start(messages, **kw)
        try:
            for ev in s:
                yield ev.text
        finally:
            s.cancel()

    def respond(self, messages: list[dict], *, tools: list | None = None, tool_choice=None, response_format=None,
                on_text: Callable[[str], Any] | None = None, truncate: bool = False, max_tokens: int | None = 512,
                stop: list[str] | None = None, logprobs: int | None = None, time_limit: float | None = None,
                **sampling) -> "Reply":
        """Answer a conversation, as the local Model's `respond` does: tools in OpenAI's shapes
        come back as `reply.tool_calls`, `response_format` is passed on, `on_text(str)` hears
        the text as it comes. `truncate` is honoured by `llmdesk serve` (the others have no such
        setting and answer 400 when the conversation is too long); a remote reply cannot say how
        many messages the server dropped, so `messages_dropped` stays 0."""
        from .conversation import Reply, TokenLogprob, structured_format
        from .toolcalls import ToolCall

        response_format, parse = structured_format(response_format)

        body, time_limit = self._body({**sampling, "max_tokens": max_tokens, "stop": stop, "logprobs": logprobs,
                                       "time_limit": time_limit}, chat=True)
        body = {"model": self.model, "messages": wire_messages(messages), **body}
        if tools:
            body["tools"] = tools
        if tool_choice is not None:
            body["tool_choice"] = tool_choice
        if response_format is not None:
            body["response_format"] = response_format
        if truncate and self.is_llmdesk:
            body["truncate"] = True
        s = self._open("/chat/completions", body, chat=True, time_limit=time_limit)
        try:
            for ev in s:
                if on_text is not None:
                    on_text(ev.text)
        finally:
            s.cancel()  # when on_text raised (Ctrl-C): the connection closes and the server stops
        calls = [ToolCall(c.name, _call_arguments(c), c.id) for _, c in sorted(s.calls.items())]
        n = s.numbers()
        n.pop("prefill_tokens_per_second")
        lps = [TokenLogprob(-1, t, p, top) for t, p, top in s.logprobs] if s.logprobs else None
        finish = "tool_calls" if calls else (s.finish_reason or "stop")
        reply = Reply(text=s.text, finish_reason=finish, tool_calls=calls, truncated_tokens=s.truncated_tokens,
                      messages_dropped=0, logprobs=lps, **n)
        if parse is not None and not calls:
            reply.parsed = parse(reply.text)
        return reply

    # -- embeddings ---------------------------------------------------------------------------
    def embed(self, texts: str | list[str] | list[list[int]], *, normalize: bool = True,
              time_limit: float | None = None) -> list[list[float]]:
        """One vector per text (POST /embeddings), L2-normalised unless asked not to."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            return []
        timeout = self._timeout(time_limit)
        r = self._send("POST", "/embeddings", {"model": self.model, "input": list(texts), "encoding_format": "float"},
                       timeout=timeout)
        data = self._json(r, "the embeddings").get("data")
        try:
            rows = sorted(data, key=lambda d: d.get("index", 0))
            vectors = [[float(x) for x in d["embedding"]] for d in rows]
        except (TypeError, KeyError, ValueError, AttributeError):
            raise LlmdeskError(f"{self.base_url}/embeddings did not answer a list of vectors") from None
        if len(vectors) != len(texts):
            raise LlmdeskError(f"{self.base_url}/embeddings answered {len(vectors)} vectors for {len(texts)} inputs")
        if normalize:
            vectors = [_l2(v) for v in vectors]
        return vectors

    # -- scoring ------------------------------------------------------------------------------
    def score(self, pairs: list[tuple[str, str]], *, top_k: int = 0, time_limit: float | None = None,
              batch: int = 16) -> list["RemoteScore"]:
        """Score (context, continuation) text pairs, as lm-evaluation-harness's OpenAI completions
        model does: POST /completions with prompt = context + continuation, `echo` and
        `logprobs`, `max_tokens` 0; the continuation's tokens are those whose `text_offset` is
        at or past the end of the context (spaces at the end of the context move to the
        continuation first, as the local Model's split does). `batch` pairs go in one request.
        One RemoteScore per pair, with the local ScoreResult's fields (token texts, not ids).
        An endpoint that does not return the prompt's log-probabilities (llama.cpp's server)
        is a LlmdeskError saying so."""
        split = []
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise LlmdeskError(f"pair {i}: a remote model scores (context, continuation) pairs of text")
            context, continuation = pair
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces:
                context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
            if not continuation:
                raise LlmdeskError(f"pair {i}: the continuation is empty")
            split.append((context, continuation))
        out: list[RemoteScore] = []
        for start in range(0, len(split), max(1, batch)):
            chunk = split[start : start + batch]
            body = {"model": self.model, "prompt": [c + x for c, x in chunk], "echo": True,
                    "logprobs": max(1, top_k), "max_tokens": 0, "temperature": 0}
            r = self._send("POST", "/completions", body, timeout=self._timeout(time_limit))
            choices = self._json(r, "the scores").get("choices")
            if not isinstance(choices, list) or len(choices) != len(chunk):
                raise LlmdeskError(f"{self.base_url}/completions answered {_count(choices)} choices for "
                                   f"{len(chunk)} prompts")
            ordered = sorted(choices, key=lambda ch: ch.get("index", 0) if isinstance(ch, dict) else 0)
            for j, (ch, (context, continuation)) in enumerate(zip(ordered, chunk)):
                out.append(self._scored(start + j, ch, context, continuation, top_k))
        return out

    def loglikelihood(self, context: str, continuation: str) -> tuple[float, bool]:
        """lm-evaluation-harness's loglikelihood request: (log P(continuation | context), is_greedy)."""
        r = self.score([(context, continuation)])[0]
        return r.logprob, r.is_greedy

    def _scored(self, i: int, choice, context: str, continuation: str, top_k: int) -> "RemoteScore":
        refused = (f"{self.base_url} does not return the prompt's log-probabilities (echo with logprobs), so it "
                   "cannot score; llmdesk serve and vLLM do, llama.cpp's server does not")
        lp = choice.get("logprobs") if isinstance(choice, dict) else None
        if not isinstance(lp, dict):
            raise LlmdeskError(refused)
        tokens, values = lp.get("tokens"), lp.get("token_logprobs")
        offsets, tops = lp.get("text_offset"), lp.get("top_logprobs")
        if not (isinstance(tokens, list) and isinstance(values, list) and isinstance(offsets, list)
                and isinstance(tops, list) and len(tokens) == len(values) == len(offsets) == len(tops)):
            raise LlmdeskError(f"{self.base_url}/completions answered pair {i}'s logprobs without matching tokens, "
                               "token_logprobs, top_logprobs and text_offset")
        text = choice.get("text")
        if not isinstance(text, str) or not text.startswith(context + continuation) or not tokens:
            raise LlmdeskError(refused)
        first = next((k for k, o in enumerate(offsets) if isinstance(o, int) and o >= len(context)), None)
        if first is None:
            raise LlmdeskError(refused)
        score = RemoteScore(tokens=[], logprobs=[], greedy=[], top=[] if top_k else None)
        for k in range(first, len(tokens)):
            value, top = values[k], tops[k]
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise LlmdeskError(f"pair {i}: {self.base_url} gave no log-probability for the continuation's token "
                                   f"{tokens[k]!r} (the first token of a prompt has none: give a context)")
            top = top if isinstance(top, dict) else {}
            score.tokens.append(str(tokens[k]))
            score.logprobs.append(float(value))
            # lm-eval's rule: the token is greedy when its log-probability is the largest there
            score.greedy.append(not top or float(value) >= max(float(v) for v in top.values()))
            if score.top is not None:
                score.top.append(sorted(((str(t), float(v)) for t, v in top.items()), key=lambda tv: -tv[1])[:top_k])
        return score

    # -- the request body ---------------------------------------------------------------------
    def _body(self, kw: dict, *, chat: bool) -> tuple[dict, float | None]:
        """The sampling keywords of the local Model as an OpenAI request body (see the module)."""
        unknown = set(kw) - _KEYWORDS
        if unknown:
            raise TypeError(f"unexpected keyword argument {sorted(unknown)[0]!r}")
        if kw.get("grammar") is not None:
            raise LlmdeskError("a GBNF grammar cannot be sent to an OpenAI-compatible endpoint; use "
                               "response_format with a JSON schema instead")
        body: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}
        max_tokens = kw.get("max_tokens", 256)  # the local Model's default
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        for k in _STANDARD:
            if kw.get(k) is not None:
                body[k] = kw[k]
        for k in _EXTENSIONS:
            if kw.get(k) is not None and kw[k] != LLAMA_DEFAULTS[k]:
                body[k] = kw[k]
        if "repeat_penalty" in body:
            body["repetition_penalty"] = body["repeat_penalty"]  # vLLM's name for it
        if kw.get("ignore_eos"):
            body["ignore_eos"] = True
        stop = kw.get("stop")
        if stop:
            body["stop"] = [stop] if isinstance(stop, str) else list(stop)
        if kw.get("logprobs") is not None:
            if chat:
                body.update(logprobs=True, top_logprobs=kw["logprobs"])
            else:
                body["logprobs"] = kw["logprobs"]
        return body, kw.get("time_limit")

    def _timeout(self, time_limit: float | None) -> httpx.Timeout:
        read = self.timeout if time_limit is None else min(self.timeout, time_limit)
        return httpx.Timeout(read, connect=self.connect_timeout)

    def _open(self, path: str, body: dict, *, chat: bool, time_limit: float | None) -> RemoteStream:
        t0 = time.monotonic()
        timeout = self._timeout(time_limit)
        r = self._send("POST", path, body, stream=True, timeout=timeout)
        return RemoteStream(self, r, chat=chat, t0=t0, time_limit=time_limit, read_timeout=timeout.read)

    # -- HTTP, retries and errors -------------------------------------------------------------------
    def _send(self, method: str, path: str, body: dict | None = None, *, stream: bool = False,
              timeout: httpx.Timeout | None = None, accept: tuple[int, ...] = (),
              retry_refused: bool = True) -> httpx.Response:
        """One request, retried as the module says. Returns a response with a status below 400
        (or one in `accept`); anything else is a LlmdeskError."""
        url = self.base_url + path
        timeout = timeout or httpx.Timeout(self.timeout, connect=self.connect_timeout)
        started = time.monotonic()
        attempt = 0
        while True:
            asked: float | None = None  # the endpoint's Retry-After
            try:
                r = self._client.send(self._client.build_request(method, url, json=body, timeout=timeout),
                                      stream=stream)
            except httpx.ConnectTimeout:
                failure = f"cannot reach {self.base_url} (no connection within {self.connect_timeout:g} s)"
            except httpx.TimeoutException:
                # the request may be running: sending it again could run it twice
                raise LlmdeskError(f"{self.base_url} did not answer within {timeout.read:g} s; the server may be "
                                   "overloaded (RemoteModel(timeout=...) waits longer)") from None
            except httpx.ConnectError as e:
                why = _why(e)
                hint = ("is the server running?" if why == "connection refused" else
                        "check the host name" if "resolve" in why else "check the URL and the network")
                failure = f"cannot reach {self.base_url} ({why}); {hint}"
                if not retry_refused:
                    raise LlmdeskError(failure) from None
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
                failure = f"the connection to {self.base_url} broke ({_why(e)})"
            except httpx.TransportError as e:
                raise LlmdeskError(f"cannot talk to {self.base_url} ({_why(e)})") from None
            else:
                if r.status_code < 300 or r.status_code in accept:
                    return r
                if r.status_code < 400:  # not followed: a POST would turn into a GET, the key go elsewhere
                    r.close()
                    raise LlmdeskError(f"{url} redirects ({r.status_code}) to {r.headers.get('location', '?')}; "
                                       "use the URL it points to")
                if not _retryable(r.status_code):
                    raise self._status_error(r, path)
                failure = str(self._status_error(r, path))
                asked = _retry_after(r)
                r.close()
            elapsed = time.monotonic() - started
            delay = asked if asked is not None else _backoff(attempt)
            out_of_time = elapsed + delay > self.max_retry_s
            if attempt >= self.max_retries or out_of_time:
                tried = f"; tried {attempt + 1} times in {elapsed:.0f} s" if attempt else ""
                if out_of_time and asked is not None:
                    tried += f"; it asks to wait {asked:g} s more, past the {self.max_retry_s:g} s allowed for retries"
                raise LlmdeskError(failure + tried) from None
            log.info("%s; retrying in %.1f s", failure, delay)
            time.sleep(delay)
            attempt += 1

    def _status_error(self, r: httpx.Response, path: str) -> LlmdeskError:
        """One line for an error status, with what to do."""
        try:
            r.read()
            body = r.text
        except httpx.HTTPError:
            body = ""
        code = r.status_code
        said = self._scrub(_error_text(_json_or_none(r)) or _one_line(body, 200))
        said = f": {said}" if said else ""
        if code in (401, 403):
            if self.ref.key_env:
                return LlmdeskError(f"the endpoint answered {code}{said}; set {self.ref.key_env} to a valid key")
            return LlmdeskError(f"the endpoint answered {code}{said}; put its key in an environment variable, name "
                                f"that variable in {paths.display(endpoints_path())} ([endpoints.NAME] with url and "
                                "key_env) and use openai:NAME")
        if code == 404 and path != "/models" and "model" in said.lower():
            return ModelNotFound(self._not_found(self.model, self._list_ids()))
        if code == 404:
            return LlmdeskError(f"{self.base_url}{path} answered 404{said}; is {self.base_url} the API's base URL "
                                "(it usually ends in /v1)?")
        if code == 429:
            return LlmdeskError(f"the endpoint is busy (429{said})")
        if code >= 500:
            return LlmdeskError(f"the endpoint failed ({code}{said})")
        return LlmdeskError(f"the endpoint refused the request ({code}{said})")

    def _scrub(self, text: str) -> str:
        """An endpoint's words, with our key taken out should it echo it."""
        key = self._client.headers.get("authorization", "").removeprefix("Bearer ")
        return text.replace(key, "***") if key else text

    def _json(self, r: httpx.Response, what: str) -> dict:
        try:
            data = r.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = None
        if not isinstance(data, dict):
            raise LlmdeskError(f"{self.base_url} answered {what} with something that is not a JSON object; "
                               "is it an OpenAI-compatible API?")
        return data

    # -- which model ----------------------------------------------------------------------------
    def _cards(self, r: httpx.Response) -> list[dict]:
        data = self._json(r, "GET /models").get("data")
        if not isinstance(data, list) or not all(isinstance(c, dict) and isinstance(c.get("id"), str) for c in data):
            raise LlmdeskError(f"GET {self.base_url}/models did not answer a list of models; is {self.base_url} an "
                               "OpenAI-compatible API?")
        return data

    def _list_ids(self) -> list[str] | None:
        try:
            r = self._send("GET", "/models", retry_refused=False, accept=(404,))
            return None if r.status_code == 404 else [c["id"] for c in self._cards(r)]
        except LlmdeskError:
            return None

    def _not_found(self, model: str, ids: list[str] | None) -> str:
        if ids is None:
            return f"model '{model}' not found at {self.base_url}"
        shown = ", ".join(ids[:8]) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")
        return f"model '{model}' not found at {self.base_url}: GET {self.base_url}/models lists {shown or 'none'}"

    def _find_model(self) -> tuple[str, int | None]:
        """The model id to send and its context length (None when the endpoint does not say).
        A refused connection is not retried here: nothing listening at load time is almost
        always a server that is not running, and the user should hear so at once."""
        r = self._send("GET", "/models", retry_refused=False, accept=(404,))
        wanted = self.ref.model
        if r.status_code == 404:  # an endpoint without the listing: the reference must name the model
            if wanted is None:
                raise LlmdeskError(f"GET {self.base_url}/models answered 404, so the model must be named: "
                                   f"{self.ref.name}#MODEL")
            return wanted, None
        cards = self._cards(r)
        if wanted is None:
            if not cards:
                raise LlmdeskError(f"{self.base_url} serves no models (GET {self.base_url}/models lists none)")
            card = cards[0]
        else:
            card = next((c for c in cards if c["id"] == wanted), None)
            if card is None:  # not listed, but the endpoint may know it by another name (an alias)
                one = self._send("GET", "/models/" + urllib.parse.quote(wanted, safe=""), accept=(400, 404, 405))
                if one.status_code >= 400:
                    raise ModelNotFound(self._not_found(wanted, [c["id"] for c in cards]))
                card = _json_or_none(one) or {}
        self.is_llmdesk = card.get("owned_by") == "llmdesk"
        return wanted or card["id"], _context_of(card)


# ---------------------------------------------------------------------------------------------
# helpers


def wire_messages(messages: list[dict]) -> list[dict]:
    """Messages as OpenAI's API takes them: tool call arguments as JSON text (the conversation
    layer and Ollama keep them as objects)."""
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise LlmdeskError(f"a message must be a dict with 'role' and 'content', got {type(m).__name__}")
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                c = dict(c)
                fn = dict(c.get("function") or {})
                if not isinstance(fn.get("arguments", ""), str):
                    fn["arguments"] = json.dumps(fn["arguments"], ensure_ascii=False)
                c["function"] = fn
                c.setdefault("type", "function")
                calls.append(c)
            m["tool_calls"] = calls
        out.append(m)
    return out


def _call_arguments(c: _ToolCallParts) -> dict:
    if not c.arguments.strip():
        return {}
    try:
        args = json.loads(c.arguments)
    except json.JSONDecodeError:
        args = None
    if not isinstance(args, dict):
        raise LlmdeskError(f"the endpoint called {c.name or 'a tool'} with arguments that are not a JSON object: "
                           f"{_one_line(c.arguments, 80)}")
    return args


def _as_chunk(data: dict, chat: bool) -> dict:
    """A whole (non-streamed) answer in the shape of one stream chunk."""
    choices = []
    for ch in data.get("choices") or []:
        if not isinstance(ch, dict):
            continue
        ch = dict(ch)
        if chat:
            msg = dict(ch.pop("message", None) or {})
            msg["tool_calls"] = [{**tc, "index": j} for j, tc in enumerate(msg.get("tool_calls") or [])]
            ch["delta"] = msg
        choices.append(ch)
    return {**data, "choices": choices}


def _retryable(status: int) -> bool:
    return status == 429 or (status >= 500 and status not in (501, 505))


def _retry_after(r: httpx.Response) -> float | None:
    """Retry-After in seconds: a number, or an HTTP date (RFC 9110 10.2.3)."""
    value = r.headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _backoff(attempt: int) -> float:
    return min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** attempt) * random.uniform(0.5, 1.0)


def _why(e: Exception) -> str:
    text = str(e) or type(e).__name__
    low = text.lower()
    if "refused" in low:
        return "connection refused"
    if "name or service not known" in low or "nodename nor servname" in low or "name resolution" in low:
        return "its host name does not resolve"
    if "ssl" in low or "certificate" in low:
        return f"TLS failed: {_one_line(text, 120)}"
    return _one_line(text, 120)


def _json_or_none(r: httpx.Response):
    try:
        return r.json()
    except Exception:  # any body that is not JSON (HTML error pages, empty bodies)
        return None


def _error_text(data) -> str:
    """The message of an error body: OpenAI's {"error": {"message"}}, Ollama's {"error": "..."},
    FastAPI's {"detail": ...}."""
    if not isinstance(data, dict):
        return ""
    err = data.get("error")
    if isinstance(err, dict):
        msg = err.get("message")
    elif isinstance(err, str):
        msg = err
    else:
        msg = data.get("detail") or data.get("message")
    if msg is None:
        return ""
    return _one_line(msg if isinstance(msg, str) else json.dumps(msg), MAX_MESSAGE_CHARS)


def _one_line(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _context_of(card: dict) -> int | None:
    # vLLM: max_model_len; OpenRouter and LM Studio: context_length
    for key in ("max_model_len", "context_length", "n_ctx", "context_window"):
        v = card.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _count(items) -> int | str:
    return len(items) if isinstance(items, list) else "no"


def _l2(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v] if n > 0 else v
