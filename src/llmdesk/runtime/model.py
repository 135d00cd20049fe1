"""A loaded model: the Python API (`llmdesk.load`) over the Engine.

`Model` validates the file, loads it into llama.cpp, picks its chat template, and offers
generate / stream / chat / tokenize / logprobs / embed / score. The CLI and the server use the
same calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LlmdeskError
from ..formats.gguf import GGUFInfo, read_gguf
from . import limits
from .engine import Engine, Request, Result, ScoreRequest, ScoreResult, Stream, sampling_params
from .adapters import lora_spec
from .llama import LlamaModel, LoraAdapter
from .templates import ChatTemplate, resolve_template

from ..formats.shape import DEFAULT_CTX  # one default for fit, the Engine and the server


@dataclass
class TokenLogprob:
    token: int
    text: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Completion:
    """A finished generation: the text, why it stopped, and what it cost."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    ttft_s: float
    tokens_per_second: float
    prefill_tokens_per_second: float
    total_s: float
    logprobs: list[TokenLogprob] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "logprobs"}
        if self.logprobs is not None:
            d["logprobs"] = [
                {"token": t.token, "text": t.text, "logprob": t.logprob,
                 "top": [{"text": s, "logprob": p} for s, p in t.top]}
                for t in self.logprobs
            ]
        return d


class Model:
    """A GGUF model loaded into llama.cpp, with `slots` requests served at once.

    `lora`: LoRA adapters (llama.cpp LoRA GGUFs for this model) applied to everything it
    computes: paths, "path:scale" strings or (path, scale) pairs; several add up.

    `adapters`: LoRA adapters loaded beside the weights but applied only to the requests that
    name them ({name: path, "path:scale" or (path, scale)}): `generate(..., adapters=["name"])`
    or `[("name", scale)]` runs those on top of `lora`, while other requests go on without them,
    in the same batches over the same weights (the Engine decodes each set of adapters in a
    llama_decode of its own: docs/lora.md)."""

    def __init__(self, path: str | Path, *, name: str | None = None, ctx: int | None = None,
                 threads: int | None = None, slots: int = 1, batch: int = 512,
                 template: str | None = None, gpu_layers: int = 0, kv_unified: bool = False,
                 lora: list | None = None, adapters: dict | None = None):
        self.path = Path(path)
        self.name = name or self.path.stem
        self.lora = [lora_spec(x) for x in lora or []]  # (path, scale), as asked
        named = {n: lora_spec(x) for n, x in (adapters or {}).items()}  # checked before the model loads
        # our own validation runs first: llama.cpp never sees a malformed file
        self.info: GGUFInfo = read_gguf(self.path)
        # layers offloaded to a GPU (llama.cpp keeps them all on the CPU when it has no GPU backend)
        self.llama = LlamaModel(self.path, n_gpu_layers=gpu_layers)
        n_ctx = ctx or min(self.llama.n_ctx_train or DEFAULT_CTX, DEFAULT_CTX)
        self.threads = threads
        self.adapters: list[LoraAdapter] = []  # every adapter loaded: `lora`'s, then `adapters`'
        self.named: dict[str, tuple[LoraAdapter, float]] = {}  # `adapters`: name -> (adapter, default scale)
        try:
            for p, _scale in self.lora:
                self.adapters.append(LoraAdapter(self.llama, p))
            for n, (p, scale) in named.items():
                self.adapters.append(LoraAdapter(self.llama, p))
                self.named[n] = (self.adapters[-1], scale)
            # kv_unified: the slots share one KV cache (suits evaluation, where they share long
            # prefixes; see Engine and docs/scoring.md)
            self.engine = Engine(self.llama, n_ctx=n_ctx, n_slots=slots, n_batch=batch, n_threads=threads,
                                 kv_unified=kv_unified,
                                 lora=[(a, scale) for a, (_p, scale) in zip(self.adapters, self.lora)])
        except BaseException:
            if self.lora or named:  # the adapters' failures free what was loaded (the model's memory too)
                self.llama.close()
            raise
        self.n_ctx = self.engine.n_ctx
        specials = self.info.special_tokens or {}
        self.template: ChatTemplate = resolve_template(
            self.info.chat_template, template,
            bos_token=specials.get("bos", ""), eos_token=specials.get("eos", ""), model_name=self.name)

    # -- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        self.engine.close()
        if self.engine.freed:  # closed cleanly: no context (or step left running) uses them
            for a in self.adapters:
                a.close()
            self.llama.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Model {self.name} ({self.info.architecture}, ctx {self.n_ctx})>"

    def adapter_set(self, choice) -> list[tuple[LoraAdapter, float]] | None:
        """The LoRA set of a request that chooses `choice`: names given in `adapters=`, or
        (name, scale) pairs, on top of the model's own `lora`. None or [] is the model's own set."""
        if not choice:
            return None
        out = [(a, scale) for a, (_p, scale) in zip(self.adapters, self.lora)]
        seen = set()
        for item in choice:
            name, scale = (item, None) if isinstance(item, str) else item
            if name not in self.named:
                have = ", ".join(self.named) or "none"
                raise LlmdeskError(f"{self.name} has no LoRA adapter named {name!r} (loaded: {have})")
            if name in seen:
                raise LlmdeskError(f"LoRA adapter {name!r} is chosen twice")
            seen.add(name)
            adapter, default = self.named[name]
            out.append((adapter, default if scale is None else lora_spec((adapter.path, scale))[1]))
        return out

    # -- tokens -------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self.llama.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: list[int], *, special: bool = False) -> str:
        return self.llama.detokenize(tokens, special=special)

    # -- generation ---------------------------------------------------------------------------
    def render_chat(self, messages: list[dict], *, tools: list[dict] | None = None) -> str:
        return self.template.render(messages, add_generation_prompt=True, tools=tools)

    def chat_tokens(self, messages: list[dict], *, tools: list[dict] | None = None) -> list[int]:
        text = self.render_chat(messages, tools=tools)
        bos = self.template.bos_token
        # templates usually write the BOS text themselves; add it only when they do not
        add = self.llama.add_bos and not (bos and text.startswith(bos))
        return self.llama.tokenize(text, add_special=add, parse_special=True)

    def start(self, prompt: str | list[int], *, max_tokens: int | None = 256, temperature: float = 0.8,
              top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
              frequency_penalty: float = 0.0, presence_penalty: float = 0.0, seed: int | None = None,
              stop: list[str] | None = None, logprobs: int | None = None, grammar: str | None = None,
              ignore_eos: bool = False, repeat_last_n: int = 64, time_limit: float | None = None,
              adapters: list | None = None) -> Stream:
        """Submit a prompt (text, or token ids) to the engine; returns the Stream in flight.
        `time_limit`: seconds the whole request may take (then it ends with finish_reason
        "time_limit", or an error if it had not started answering). `adapters`: LoRA adapters
        loaded with `Model(adapters=...)` for this request, by name or (name, scale)."""
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        sampling = sampling_params(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                   repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n,
                                   frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                                   seed=seed, grammar=grammar)
        return self.engine.submit(Request(tokens, max_tokens=max_tokens, sampling=sampling,
                                          stop=limits.check_stop(stop), logprobs=logprobs, ignore_eos=ignore_eos,
                                          time_limit=time_limit, adapters=self.adapter_set(adapters)))

    def complete(self, prompt: str | list[int], **kw) -> Completion:
        return self.finish(self.start(prompt, **kw))

    def finish(self, stream: Stream) -> Completion:
        """Wait for a stream (or drain the rest of it) and describe the result."""
        lps: list[TokenLogprob] | None = [] if stream.request.logprobs is not None else None
        for ev in stream:
            if lps is not None and ev.logprob is not None:
                lps.append(TokenLogprob(ev.token, self._piece_text(ev.token), ev.logprob,
                                        [(self._piece_text(t), p) for t, p in ev.top_logprobs or []]))
        stream.done.wait()
        return self._completion(stream.result, lps)

    def _piece_text(self, token: int) -> str:
        return self.llama.piece(token, special=True).decode("utf-8", "replace")

    @staticmethod
    def _completion(r: Result, lps=None) -> Completion:
        if r.finish_reason == "error":
            raise LlmdeskError(f"generation failed: {r.error}")
        return Completion(text=r.text, finish_reason=r.finish_reason, prompt_tokens=r.n_prompt,
                          completion_tokens=r.n_gen, cached_tokens=r.n_cached, ttft_s=r.ttft_s,
                          tokens_per_second=r.tokens_per_second,
                          prefill_tokens_per_second=r.prefill_tokens_per_second,
                          total_s=r.ttft_s + r.decode_s, logprobs=lps)

    def stream(self, prompt: str | list[int], **kw) -> Iterator[str]:
        """Yield pieces of text as they are generated; joined they equal `generate`."""
        s = self.start(prompt, **kw)
        for ev in s:
            if ev.text:
                yield ev.text
        if s.result.finish_reason == "error":
            raise LlmdeskError(f"generation failed: {s.result.error}")

    def generate(self, prompt: str | list[int], **kw) -> str:
        return self.complete(prompt, **kw).text

    def _chat_kw(self, kw: dict) -> dict:
        kw = dict(kw)
        kw["stop"] = list(kw.get("stop") or []) + [s for s in self.template.stop_strings if s not in (kw.get("stop") or [])]
        return kw

    def chat(self, messages: list[dict], *, tools=None, max_steps: int = 8, confirm=None, tool_choice=None,
             tool_timeout: float | None = 60.0, on_run=None, **kw):
        """Answer the conversation `messages` ([{"role": ..., "content": ...}, ...]): the text.

        With `tools` (Python functions; their schemas come from type hints and docstrings) the
        model may call them: the calls run, their results go back, and so on until it answers or
        `max_steps` rounds of calls were made (runtime/agent.py). Returns a `runtime.agent.
        AgentResult` then: `.text` (also `str(result)`), `.runs` (each call and its result),
        `.messages` (the conversation with them), `.max_steps_reached`. `confirm(call) -> bool`
        is asked before each call; `tool_choice`: "auto" (default), "required", "none" or
        {"type": "function", "function": {"name": ...}} (a forced call, by a grammar; every round
        but the last); `tool_timeout`: seconds a call may run; `on_run(ToolRun)` hears each call.
        The other keywords (max_tokens, temperature, seed, stop, ...) are the sampling settings."""
        if tools is not None:
            from .agent import chat

            return chat(self, messages, tools, max_steps=max_steps, confirm=confirm, tool_choice=tool_choice,
                        tool_timeout=tool_timeout, on_run=on_run, **kw)
        if tool_choice is not None or confirm is not None or on_run is not None:
            raise LlmdeskError("tool_choice, confirm and on_run go with tools=[...]")
        return self.complete(self.chat_tokens(messages), **self._chat_kw(kw)).text

    def chat_start(self, messages: list[dict], **kw) -> Stream:
        return self.start(self.chat_tokens(messages), **self._chat_kw(kw))

    def chat_stream(self, messages: list[dict], **kw) -> Iterator[str]:
        return self.stream(self.chat_tokens(messages), **self._chat_kw(kw))

    def respond(self, messages: list[dict], *, tools: list | None = None, tool_choice=None, response_format=None,
                on_text=None, truncate: bool = False, max_tokens: int | None = 512, stop: list[str] | None = None,
                logprobs: int | None = None, time_limit: float | None = None, **sampling):
        """Answer a conversation through the conversation layer, as the server does: tools
        (OpenAI's tool shapes) come back as `reply.tool_calls`, `response_format`
        ({"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}}) is
        enforced by a grammar (a Pydantic model class works too: `reply.parsed` is then the
        validated instance), and with `truncate` a conversation longer than the context drops
        its oldest turns (reported in `reply.messages_dropped`). `on_text(str)` hears the text
        as it comes. Returns a `conversation.Reply`."""
        from . import conversation

        fmt, parse = conversation.structured_format(response_format)
        reply = conversation.respond(self, messages, tools=tools, tool_choice=tool_choice,
                                     response_format=fmt, on_text=on_text, truncate=truncate,
                                     max_tokens=max_tokens, stop=stop, logprobs=logprobs, time_limit=time_limit,
                                     sampling=sampling_params(**sampling))
        if parse is not None and not reply.tool_calls:
            reply.parsed = parse(reply.text)
        return reply

    # -- embeddings ---------------------------------------------------------------------------
    def embed(self, texts: str | list[str] | list[list[int]], *, normalize: bool = True,
              time_limit: float | None = None, adapters: list | None = None) -> list[list[float]]:
        """One vector per text (or per list of token ids): the hidden states pooled as the model
        says (`{arch}.pooling_type`: mean, the first (CLS) or the last token; mean for decoder
        models), L2-normalised unless asked not to. Computed by the Engine between generation
        steps, several texts per decode. `adapters`: as for `start`."""
        if isinstance(texts, str):
            texts = [texts]
        inputs = [list(t) if isinstance(t, list) else self.embed_tokens(t) for t in texts]
        return self.engine.embed(inputs, normalize=normalize, time_limit=time_limit,
                                 adapters=self.adapter_set(adapters)).wait()

    def embed_tokens(self, text: str, *, add_special: bool = True) -> list[int]:
        """The token ids `embed` reads for a text: the model's own [CLS] ... [SEP] (or BOS) around
        it, and a special token written in the text ("[SEP]", "<|endoftext|>") read as that token,
        as sentence-transformers' tokenizer and llama.cpp's llama-embedding read them. (Only
        embeddings read text so; a prompt's text is tokenized as text.)"""
        return self.tokenize(text, add_special=add_special, parse_special=True)


    # -- scoring ------------------------------------------------------------------------------
    def score_tokens(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context tokens, continuation tokens) of a text pair, as lm-evaluation-harness splits
        them (HFLM._encode_pair): spaces at the end of the context move to the start of the
        continuation; the context is tokenized alone (with the model's BOS rule) and the
        continuation is what tokenizing context + continuation adds after as many tokens as the
        context has: tokens(context + continuation)[len(tokens(context)):]. Where a token spans
        the boundary, the continuation's first tokens are the whole text's, scored after the
        context's own tokens, as lm-eval does. An empty context is the BOS token (or EOS when
        the model has none), lm-eval's prefix token. Special tokens written in the text are read
        as special tokens, as lm-eval's Hugging Face tokenizer reads them."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        # special tokens written in the text (<|im_start|>, ...) are read as such, as a Hugging
        # Face tokenizer and the server's text prompts read them
        ctx = self.tokenize(context, parse_special=True) if context else []
        if not ctx:
            prefix = self.llama.bos if self.llama.bos >= 0 else self.llama.eos
            return [prefix], self.tokenize(continuation, add_special=False, parse_special=True)
        whole = self.tokenize(context + continuation, parse_special=True)
        return ctx, whole[len(ctx):]

    def score(self, pairs: list[tuple[str, str]] | list[tuple[list[int], list[int]]], *, top_k: int = 0,
              time_limit: float | None = None, adapters: list | None = None) -> list[ScoreResult]:
        """Score (context, continuation) pairs: texts (split by `score_tokens`) or token ids (used
        as given; a context holds at least one token). One ScoreResult per pair: `.logprobs` per
        continuation token, `.logprob` their sum, `.greedy` per token and `.is_greedy` for the
        whole, and with `top_k` the k most likely tokens at each position. The pairs are scored
        together, several per llama_decode, and a context shared by several pairs (the choices
        of a question, a few-shot prefix) is computed once. `adapters`: as for `start`."""
        chosen = self.adapter_set(adapters)
        requests = []
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise LlmdeskError(f"pair {i} is not a (context, continuation) pair")
            context, continuation = pair
            if isinstance(context, str) and isinstance(continuation, str):
                context, continuation = self.score_tokens(context, continuation)
            elif not (isinstance(context, (list, tuple)) and isinstance(continuation, (list, tuple))):
                raise LlmdeskError(f"pair {i}: give the context and the continuation both as text or both "
                                   "as lists of token ids")
            requests.append(ScoreRequest(list(context), list(continuation), top_k=top_k, adapters=chosen))
        return self.engine.score(requests, time_limit=time_limit).wait()

    def loglikelihood(self, context: str | list[int], continuation: str | list[int]) -> tuple[float, bool]:
        """lm-evaluation-harness's loglikelihood request: (log P(continuation | context), whether
        greedy decoding would produce the continuation)."""
        r = self.score([(context, continuation)])[0]
        return r.logprob, r.is_greedy

    def prompt_logprobs(self, prompt: str | list[int], *, top_k: int = 0,
                        time_limit: float | None = None) -> list[TokenLogprob]:
        """The log-probability of every prompt token after the first, given the tokens before
        it (what perplexity is made of), and with `top_k` the k most likely tokens there."""
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if len(tokens) < 2:
            return []
        r = self.engine.score([ScoreRequest(tokens[:1], tokens[1:], top_k=top_k)], time_limit=time_limit).wait()[0]
        return [TokenLogprob(t, self._piece_text(t), lp, [(self._piece_text(a), b) for a, b in top])
                for t, lp, top in zip(r.tokens, r.logprobs, r.top or [[] for _ in r.tokens])]

def load(ref, *, ctx: int | None = None, threads: int | None = None, slots: int = 1,
         template: str | None = None, gpu_layers: int = 0, kv_unified: bool = False, lora: list | None = None,
         adapters: dict | None = None, say=None):
    """Load a model by reference (a string, a Path or a store.refs.ModelRef): a .gguf path,
    NAME[:TAG] in the store or hf:OWNER/REPO/FILE.gguf gives a Model; openai:URL#MODEL or
    openai:NAME (an endpoint in endpoints.toml) gives a runtime.remote.RemoteModel, with the same
    calls. For a remote model ctx, threads, slots, gpu_layers and kv_unified are its server's
    business. `BASE+ADAPTER[:SCALE][+...]` names a local model with LoRA adapters applied to
    everything it computes (a LoRA GGUF, a `tune -o` or PEFT folder, an adapter in the store:
    runtime/adapters.py), each checked against the base before it loads; the Model is named
    so (`BASE+ADAPTER`). `lora`: more LoRA adapters to apply, after those; `adapters`: LoRA
    adapters requests may choose (see `Model`), local models only. `say(text)` hears what is
    done first (a PEFT folder converted once)."""
    from ..store.refs import ModelRef
    from .adapters import adapted_name, resolve

    found, chosen = (ref, []) if isinstance(ref, ModelRef) else resolve(str(ref), say=say)
    if found.is_remote:
        from .remote import RemoteModel

        if template is not None:
            raise LlmdeskError(f"{found.name} answers with its server's chat template; a template can only be "
                               "chosen for a local model")
        if lora or adapters:
            raise LlmdeskError(f"{found.name} is a remote model: LoRA adapters can only be applied to a local GGUF")
        return RemoteModel(found)
    return Model(found.path, name=adapted_name(found.name, chosen), ctx=ctx, threads=threads, slots=slots,
                 template=template, gpu_layers=gpu_layers, kv_unified=kv_unified,
                 lora=[(a.path, a.scale) for a in chosen] + list(lora or []), adapters=adapters)
