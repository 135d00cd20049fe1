"""The Engine: one llama.cpp context, N sequence slots, continuous batching.

A request becomes a slot. Its prompt is compared with what every free slot still holds in its KV
cache; the slot with the longest common prefix is taken and only the rest of the prompt is
prefilled, in chunks that share each `llama_decode` call with the other slots' next tokens. Every
generating slot advances by one token per call, so requests join and leave the running batch
between steps. Tokens go back to the caller through a `Stream` it iterates; cancelling (or
dropping the iterator) frees the slot and its KV cells at the next step.

One background thread owns the context: callers never touch llama.cpp directly.

Nothing holds the Engine for long: every request is checked against `limits` before any work,
may carry a time limit (checked between steps, and during a step by llama.cpp's abort flag),
and a cancel takes effect within one step even inside a long prefill: the `llama_decode` in
flight is aborted and the other slots' tokens are decoded again.

The Engine also scores: a `ScoreRequest` (context tokens, continuation tokens) takes a slot like
a generation, its tokens go into the same `llama_decode` calls as the other slots' (so a server
scores while it serves), and it returns the log-probability of each continuation token and
whether it was the most likely one (what lm-evaluation-harness's `loglikelihood` needs). Pairs
that share a context (the choices of a multiple-choice question) compute it once: a free slot
takes the longest prefix already computed, from its own cells or copied from another slot's
(`llama_memory_seq_cp`), and waits a step for a slot that is computing that prefix right now.

Embeddings are batched on a second context (several texts per `llama_decode`, pooled the way
the model says: mean, CLS or last token) and interleaved with generation steps too. An encoder
(BERT: an embedding model) has only its embeddings contexts: no generation context, no slots'
cache, no logits.

LoRA adapters: a generation, a score or an embedding request may carry its own adapter set
(`adapters`, pairs of a loaded `LoraAdapter` and a scale); without one it uses the Engine's
(`Engine(lora=...)`).
llama.cpp sets adapters on a whole context (llama_set_adapters_lora), so each step decodes the
slots of one set per `llama_decode`, setting the context's adapters before a set that differs
from the last one decoded; a step whose slots all share the context's set is one decode, with
no call. A slot's cells are valid only under the set they were computed with: a cached prefix
is reused, or copied to another slot, only for a request of the same set (docs/lora.md).
An embeddings step packs the texts of one set (the first waiting job's) and sets it on the
embeddings contexts it uses when they hold another.
"""

from __future__ import annotations

import codecs
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import llama_cpp as C
import numpy as np

from ..errors import LlmdeskError
from . import limits
from .llama import (AbortFlag, Batch, LlamaModel, LoraAdapter, clear_memory, decode, default_threads, free_context,
                    new_context, output_logits, pooling_of, sequence_embedding, set_adapters)

log = logging.getLogger("llmdesk.engine")


class ContextOverflow(limits.InvalidRequest):
    """A prompt that does not fit in the context: always an explicit error, never a silent cut.
    `param` names the field that is too long, when there is one."""


# ---------------------------------------------------------------------------------------------
# what a request asks for


@dataclass
class SamplingParams:
    """Sampling settings; temperature <= 0 means greedy. The chain order follows llama.cpp's
    defaults: penalties -> top-k -> top-p -> min-p -> temperature -> draw."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    grammar: str | None = None  # GBNF, root rule "root"

    @property
    def has_penalties(self) -> bool:
        return self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def build_chain(self, model: LlamaModel, n_ctx: int):
        chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
        add = lambda s: C.llama_sampler_chain_add(chain, s)  # noqa: E731
        if self.grammar:
            g = C.llama_sampler_init_grammar(model.vocab, self.grammar.encode(), b"root")
            if not g:
                C.llama_sampler_free(chain)
                raise LlmdeskError("the grammar could not be parsed (GBNF with a 'root' rule expected)")
            add(g)
        if self.has_penalties:
            # llama-cpp-python 0.3.36's llama.h: (n_vocab, penalty_last_n, repeat, freq, present)
            # (its window is allocated up front: never longer than the context)
            add(C.llama_sampler_init_penalties(
                model.n_vocab, limits.penalty_window(self.repeat_last_n, n_ctx), self.repeat_penalty,
                self.frequency_penalty, self.presence_penalty))
        if self.temperature <= 0:
            add(C.llama_sampler_init_greedy())
            return chain
        if self.top_k > 0:
            add(C.llama_sampler_init_top_k(min(self.top_k, model.n_vocab)))
        if 0 < self.top_p < 1:
            add(C.llama_sampler_init_top_p(self.top_p, 1))
        if 0 < self.min_p < 1:
            add(C.llama_sampler_init_min_p(self.min_p, 1))
        add(C.llama_sampler_init_temp(self.temperature))
        seed = C.LLAMA_DEFAULT_SEED if self.seed is None else self.seed & 0xFFFFFFFF
        add(C.llama_sampler_init_dist(seed))
        return chain


def sampling_params(*, seed: int | None = None, grammar: str | None = None, params: dict[str, str] | None = None,
                    **sampling) -> SamplingParams:
    """Sampling settings, llama.cpp server's defaults (limits.DEFAULTS) for what is left out
    (None), checked against the library's bounds. `params`: a face's name for each setting, for
    the error (Ollama's "options.top_k")."""
    values = {k: (sampling[k] if sampling.get(k) is not None else v) for k, v in limits.DEFAULTS.items()}
    sp = SamplingParams(**values, seed=seed, grammar=grammar)
    try:
        limits.check_sampling(sp)
    except limits.InvalidRequest as e:
        name = (params or {}).get(e.param, e.param)
        if name == e.param:
            raise
        raise limits.InvalidRequest(str(e).replace(e.param, name, 1), name) from None
    return sp


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int | None = 256  # None: until the context is full
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: off; 0: the chosen token's; k: also the k most likely
    ignore_eos: bool = False
    time_limit: float | None = None  # seconds from submission to the end, queue included; None: none
    adapters: list[tuple[LoraAdapter, float]] | None = None  # LoRA set; None: the Engine's


# ---------------------------------------------------------------------------------------------
# what comes back


@dataclass
class TokenEvent:
    token: int
    text: str  # text that is now safe to show (may be "" while a stop string might be forming)
    piece: bytes  # the token's own bytes
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class Result:
    finish_reason: str = ""  # "stop" | "length" | "time_limit" | "cancelled" | "error"
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    n_prompt: int = 0
    n_cached: int = 0  # prompt tokens reused from the KV cache
    n_gen: int = 0
    queued_s: float = 0.0
    prefill_s: float = 0.0  # admission to first token: time to first token, less the queue
    decode_s: float = 0.0  # first token to last
    error: str | None = None
    stop_string: str | None = None

    @property
    def ttft_s(self) -> float:
        return self.queued_s + self.prefill_s

    @property
    def prefill_tokens_per_second(self) -> float:
        n = self.n_prompt - self.n_cached
        return n / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Generation speed: tokens after the first over the time they took."""
        return (self.n_gen - 1) / self.decode_s if self.n_gen > 1 and self.decode_s > 0 else 0.0


class _TextOut:
    """Bytes -> text, holding back incomplete UTF-8 and anything that may be the start of a stop
    string, so the caller never sees a stop string or half a character."""

    def __init__(self, stop: list[str]):
        self.stop = [s for s in stop if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.pending = ""
        self.emitted: list[str] = []
        self.hit: str | None = None

    def feed(self, piece: bytes) -> str:
        self.pending += self.decoder.decode(piece)
        if not self.stop:
            out, self.pending = self.pending, ""
            self.emitted.append(out)
            return out
        first = min(((self.pending.find(s), s) for s in self.stop if s in self.pending), default=None)
        if first is not None:
            idx, self.hit = first
            out, self.pending = self.pending[:idx], ""
            self.emitted.append(out)
            return out
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:k]):
                    hold = k
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        self.emitted.append(out)
        return out

    def flush(self) -> str:
        out = "" if self.hit else self.pending + self.decoder.decode(b"", final=True)
        self.pending = ""
        self.emitted.append(out)
        return out

    @property
    def text(self) -> str:
        return "".join(self.emitted)


_DONE = object()


class _Work:
    """Anything in the Engine's queue: it has a time limit and can be cancelled."""

    def __init__(self, engine: "Engine", time_limit: float | None):
        self.engine = engine
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.t_submit = time.perf_counter()
        self.deadline = self.t_submit + time_limit if time_limit else None
        self.abort_error: str | None = None  # set by cancel(error=...): the work ends as an error

    def cancel(self, error: str | None = None) -> None:
        """Stop it; its slots are freed within one step (a decode in flight is aborted). With
        `error` it ends as an error saying so, else as "cancelled"."""
        if not self.done.is_set():
            if error and self.abort_error is None:
                self.abort_error = error
            self.cancelled.set()
            self.engine._interrupt(self)


class Stream(_Work):
    """A request in flight. Iterate it for TokenEvents; `.result` is set when it ends."""

    def __init__(self, engine: "Engine", request: Request, events=None):
        super().__init__(engine, request.time_limit)
        self.request = request
        self.result = Result(n_prompt=len(request.prompt))
        # where the engine thread puts TokenEvents and the end marker; a caller may pass its own
        # object with put() (the server hands them straight to its event loop), then not iterate
        self.events = events if events is not None else queue.Queue()
        self._drained = False  # the end marker was read: iterating again yields nothing

    def __iter__(self):
        try:
            while not self._drained:
                ev = self.events.get()
                if ev is _DONE:
                    self._drained = True
                    return
                yield ev
        finally:
            # the caller stopped listening (break, disconnect, exception): free the slot
            if not self.done.is_set():
                self.cancel()

    def wait(self) -> Result:
        for _ in self:
            pass
        self.done.wait()
        return self.result


EMBED_SLICE_S = 0.25  # an embeddings decode's time when no slot is busy (see Engine._embed_limit)


class _Job(_Work):
    """Work in the Engine's queue that is not a generation (embeddings, scores): waited for as
    a whole, its error raised."""

    def __init__(self, engine: "Engine", time_limit: float | None):
        super().__init__(engine, time_limit)
        self.time_limit = time_limit
        self.error: str | None = None
        self._callbacks: list = []
        self._lock = threading.Lock()

    def add_done_callback(self, fn) -> None:
        """Call `fn(job)` when the job ends (from the Engine's thread; at once if it has ended),
        so an event loop can wait for it without a thread of its own."""
        with self._lock:
            if not self.done.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def _finish(self, error: str | None) -> None:
        with self._lock:
            if self.done.is_set():
                return
            self.error = error
            self.done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)

    def _wait(self):
        self.done.wait()
        if self.error is not None:
            raise LlmdeskError(self.error)


class EmbedJob(_Job):
    """Texts (as token ids) to embed, in the Engine's queue. `wait()` returns the vectors."""

    def __init__(self, engine: "Engine", inputs: list[list[int]], normalize: bool, time_limit: float | None,
                 lora: tuple = ()):
        super().__init__(engine, time_limit)
        self.inputs = inputs
        self.normalize = normalize
        self.lora = lora  # the adapter set (Engine._set_of) its texts are embedded under
        self.vectors: list[list[float]] = []

    def wait(self) -> list[list[float]]:
        self._wait()
        return self.vectors


# ---------------------------------------------------------------------------------------------
# scoring: log-probabilities of given continuations


@dataclass
class ScoreRequest:
    """Score `continuation` after `context` (token ids; the context holds at least one token).

    Position i of the result is log P(continuation[i] | context + continuation[:i]). The last
    continuation token is never fed to the model (lm-evaluation-harness feeds
    (context + continuation)[:-1] the same way)."""

    context: list[int]
    continuation: list[int]
    top_k: int = 0  # also the k most likely tokens at each position (0: not)
    logits: bool = False  # keep the raw logits too: (len(continuation), n_vocab) float32
    adapters: list[tuple[LoraAdapter, float]] | None = None  # LoRA set; None: the Engine's


@dataclass
class ScoreResult:
    tokens: list[int]  # the continuation
    logprobs: list[float]  # log P(tokens[i] | context + tokens[:i]), natural log
    greedy: list[bool]  # tokens[i] was the most likely token there (argmax of the logits)
    top: list[list[tuple[int, float]]] | None = None  # per position: (token, logprob), most likely first
    logits: np.ndarray | None = None  # (n_tokens, n_vocab) float32 when asked for
    n_cached: int = 0  # context tokens not computed again: reused or copied from the KV cache

    @property
    def logprob(self) -> float:
        """The continuation's log-probability: the sum over its tokens."""
        return float(np.sum(self.logprobs))

    @property
    def is_greedy(self) -> bool:
        """Greedy decoding from the context would produce the whole continuation (lm-eval's is_greedy)."""
        return all(self.greedy)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


class ScoreJob(_Job):
    """Score requests in the Engine's queue. `wait()` returns one ScoreResult per request, in order."""

    def __init__(self, engine: "Engine", requests: list[ScoreRequest], time_limit: float | None):
        super().__init__(engine, time_limit)
        self.requests = requests
        self.results: list[ScoreResult | None] = [None] * len(requests)
        self.n_done = 0

    def wait(self) -> list[ScoreResult]:
        self._wait()
        return self.results  # type: ignore[return-value]


class _ScoreTask:
    """One ScoreRequest on its way through a slot."""

    def __init__(self, job: ScoreJob, index: int, req: ScoreRequest, n_vocab: int, lora: tuple):
        self.job = job
        self.lora = lora  # the adapter set (Engine._set_of)
        self.index = index
        self.cont = list(req.continuation)
        self.tokens = list(req.context) + self.cont[:-1]  # what is fed to the model
        self.first = len(req.context) - 1  # the position whose logits predict cont[0]
        n = len(self.cont)
        self.targets = np.asarray(self.cont, dtype=np.int64)
        self.logprobs = np.empty(n, dtype=np.float64)
        self.greedy = np.empty(n, dtype=bool)
        self.top_k = req.top_k
        self.top: list[list[tuple[int, float]]] | None = [[] for _ in range(n)] if req.top_k else None
        self.logits = np.empty((n, n_vocab), dtype=np.float32) if req.logits else None  # (n, n_vocab)
        self.n_cached = 0

    def take(self, j0: int, logits: np.ndarray) -> None:
        """Rows (k, n_vocab) float32 of logits, predicting cont[j0 : j0 + k]."""
        k = len(logits)
        targets = self.targets[j0 : j0 + k]
        for r0 in range(0, k, 64):  # 64 rows at a time: the float64 copy stays small
            x = logits[r0 : r0 + 64].astype(np.float64)  # (<=64, n_vocab)
            # log-softmax as eval/ppl.py computes it: x - (max + log sum exp(x - max))
            m = x.max(axis=1, keepdims=True)
            lse = m + np.log(np.exp(x - m).sum(axis=1, keepdims=True))
            rows = np.arange(len(x))
            t = targets[r0 : r0 + 64]
            self.logprobs[j0 + r0 : j0 + r0 + len(x)] = x[rows, t] - lse[:, 0]
            # lm-eval: greedy_tokens = logits.argmax(dim=-1); is_greedy = (greedy_tokens == cont).all()
            self.greedy[j0 + r0 : j0 + r0 + len(x)] = x.argmax(axis=1) == t
            if self.top is not None:
                lp = x - lse
                best = np.argpartition(-lp, min(self.top_k, lp.shape[1] - 1), axis=1)[:, : self.top_k]
                for i in range(len(x)):
                    b = best[i][np.argsort(-lp[i, best[i]])]
                    self.top[j0 + r0 + i] = [(int(v), float(lp[i, v])) for v in b]
        if self.logits is not None:
            self.logits[j0 : j0 + k] = logits

    def result(self) -> ScoreResult:
        return ScoreResult(tokens=self.cont, logprobs=self.logprobs.tolist(), greedy=self.greedy.tolist(),
                           top=self.top, logits=self.logits, n_cached=self.n_cached)


# ---------------------------------------------------------------------------------------------
# the engine


class _Slot:
    def __init__(self, seq: int, lora: tuple):
        self.seq = seq
        self.cache: list[int] = []  # tokens whose K/V are in this sequence's cells, in order
        self.lora = lora  # the adapter set those cells were computed under
        self.stream: Stream | None = None  # a generation in this slot, or
        self.task: _ScoreTask | None = None  # a score request in it
        self.cached_for = None  # the ScoreJob whose finished request left these cells
        self.chain = None
        self.todo: list[int] = []  # prompt tokens still to prefill
        self.next_token: int | None = None  # sampled, to be decoded at the next step
        self.text: _TextOut | None = None
        self.t_admit = 0.0
        self.t_first = 0.0
        self.last_used = 0.0

    @property
    def idle(self) -> bool:
        return self.stream is None and self.task is None

    @property
    def work(self):
        """What this slot works for: its Stream or its task's ScoreJob."""
        return self.stream if self.stream is not None else self.task.job if self.task is not None else None

    def shared(self, tokens: list[int], lora: tuple) -> int:
        """Tokens of `tokens` already in this slot's cells under adapter set `lora`."""
        return common_prefix(self.cache, tokens) if self.lora == lora else 0


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i + 64 <= n and a[i : i + 64] == b[i : i + 64]:  # 64 at a time, compared in C
        i += 64
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _time_limit_message(limit: float | None, what: str) -> str:
    return f"the request reached its time limit of {limit:g} s {what}"


EMBED_MAX_SEQS = 32  # texts per embeddings decode
EMBED_PROBE = 8  # an encoder's embeddings step tries the way it found slower once in this many steps


class Engine:
    """One llama.cpp context over `model` with `n_slots` sequences of `n_ctx` tokens each.
    `cache_type`: the KV cache's element type, "f16" (llama.cpp's default) or "f32";
    `flash_attn`: llama.cpp's flash attention on, off, or None (llama.cpp decides). On a CPU its
    kernel rounds queries to f16: exact comparisons want "f32" and flash_attn=False.

    `kv_unified`: the slots share one cache of n_ctx * n_slots cells instead of n_ctx each. A
    prefix copied between slots is then shared, not copied (llama_memory_seq_cp marks the cells
    as the other sequence's too), and llama.cpp puts the tokens of any mix of slots into one
    ubatch; with a cache per slot it splits a decode into ubatches of equal tokens per slot, and
    of consecutive slots only (llama_batch_allocr::split_equal), which costs scoring (choices of
    different lengths) most of what batching gains on a CPU. But every token then attends over
    every slot's cells (masked), so for unrelated chats the default is faster: unified suits
    evaluation, where the slots share long prefixes.

    `lora`: LoRA adapters loaded for `model` (llama.LoraAdapter) and their scales, applied to
    every request that does not carry its own set (`Request.adapters`, `ScoreRequest.adapters`).
    llama.cpp sets adapters on a whole context (llama_set_adapters_lora), not per sequence: a
    step decodes each set's slots in a `llama_decode` of their own (docs/lora.md)."""

    # one token's sampling may take this long before the request is stopped (a grammar that is
    # slow for this vocabulary); the grammar checks keep accepted grammars far below it
    max_sample_s = 2.0
    # a score request copies another slot's cells (llama_memory_seq_cp) when that saves computing
    # at least this many tokens. The copy moves the whole sequence's buffer (n_ctx cells), which
    # on a CPU costs about what computing one token does
    min_copy_tokens = 8
    # waiting score requests looked at per admission, for a free slot and a prefix to reuse
    score_scan = 64
    # False: every request computes its whole prompt (no cached prefix, no copy), as a server
    # without a prompt cache would; for measuring what the reuse saves
    reuse_prefix = True
    # an encoder's (BERT's) texts: True, split over contexts of one thread, decoded side by side;
    # False, one context with all the threads; None, whichever has been faster per token lately
    # (see _embed_setup). True and False are for measuring and tests
    embed_side_by_side: bool | None = None

    def __init__(
        self,
        model: LlamaModel,
        *,
        n_ctx: int = 4096,
        n_slots: int = 1,
        n_batch: int = 512,
        n_threads: int | None = None,
        cache_type: str = "f16",
        flash_attn: bool | None = None,
        kv_unified: bool = False,
        lora: list[tuple[LoraAdapter, float]] | None = None,
    ):
        if n_slots < 1:
            raise LlmdeskError(f"--parallel must be at least 1, got {n_slots}")
        if n_ctx < 16:
            raise LlmdeskError(f"--ctx must be at least 16 tokens, got {n_ctx}")
        self.model = model
        self.n_slots = n_slots
        self.n_batch = max(n_batch, n_slots)
        self.n_threads = n_threads
        self.cache_type = cache_type
        self.flash_attn = flash_attn
        self.kv_unified = kv_unified
        # the generation context: its slots' KV cache, compute buffer and logits. An encoder
        # (BERT) never generates nor scores (_check_generates): it has only its embeddings
        # contexts, made on the first embedding (_embed_setup), and `ctx`, `mem`, `batch` stay None
        self.ctx = self.mem = self.batch = None
        if model.causal:
            self.ctx = new_context(model, n_ctx=n_ctx * n_slots, n_seq=n_slots, n_batch=self.n_batch,
                                   n_threads=n_threads, cache_type=cache_type, flash_attn=flash_attn,
                                   unified=kv_unified)
        self.freed = False  # True once close() has freed every context (none is left decoding)
        self.lora = list(lora or [])
        self._sets: dict[tuple, tuple] = {}
        self.lora_set = self._set_of(self.lora)  # the default set, as a key
        if self.lora and self.ctx is not None:
            try:
                set_adapters(self.ctx, self.lora)
            except BaseException:
                free_context(self.ctx)
                raise
        self._ctx_set = self.lora_set  # the set applied to self.ctx now
        self.lora_switches = 0  # llama_set_adapters_lora calls between steps, for tests and metrics
        self.abort = AbortFlag()  # read by llama.cpp during a decode: set, the decode returns early
        self.n_ctx = n_ctx  # tokens per slot (an encoder's: per text)
        if self.ctx is not None:
            self.abort.attach(self.ctx)
            # per slot; llama.cpp rounds its cache up (to 256 cells), the limit is what was asked for
            self.n_ctx = min(n_ctx, C.llama_n_ctx_seq(self.ctx))
            self.mem = C.llama_get_memory(self.ctx)
            self.batch = Batch(self.n_batch)
        self.slots = [_Slot(i, self.lora_set) for i in range(n_slots)]
        self.waiting: deque[Stream] = deque()
        self.score_queue: deque[_ScoreTask] = deque()  # score requests waiting for a slot
        self.score_jobs: list[ScoreJob] = []  # jobs not finished yet
        self.embed_jobs: deque[EmbedJob] = deque()
        # embeddings: their own context, made on first use; the model's pooling (mean for decoders)
        self.pooling = model.pooling
        self._embed_ctx = None
        self._embed_ctxs: list = []  # _embed_ctx first; an encoder's: one per thread
        self._embed_sets: list[tuple] = []  # the adapter set applied to each of them now
        self._embed_batches: list[Batch] = []
        self._embed_pool: ThreadPoolExecutor | None = None  # decodes the contexts after the first
        self._embed_rates: dict[bool, float] = {}  # side by side or not -> seconds a token (moving average)
        self._embed_choices = 0  # steps that chose between the two
        # for sharing time between generation and embeddings: a generation step's duration and
        # an embedded token's (moving averages)
        self._step_s = 0.0
        self._embed_token_s = 0.0
        self._embed_batch: Batch | None = None
        self._embed_long: dict | None = None  # a text longer than one embeddings decode, in progress
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)  # the engine thread waits for work on it
        self._watch_cv = threading.Condition(self._lock)  # the watchdog waits for a decode on it
        self._decoding: list = []  # the Streams / jobs whose tokens are in the decode in flight
        self._decode_deadline: float | None = None
        self._closed = False
        self.steps = 0  # llama_decode calls, for tests and metrics
        self.aborted_steps = 0  # of those, the ones cut short (a cancel, a time limit, close)
        # tokens fed to the generation context's llama_decode calls (aborted ones too), and the seconds
        # those calls took: where a run's time goes (the rest is Python between the calls)
        self.step_tokens = 0
        self.step_seconds = 0.0
        self.seq_copies = 0  # prefixes copied from one slot's cells to another's (llama_memory_seq_cp)
        self._thread = threading.Thread(target=self._run, name="llmdesk-engine", daemon=True)
        self._thread.start()
        self._watchdog = threading.Thread(target=self._watch, name="llmdesk-engine-watchdog", daemon=True)
        self._watchdog.start()

    # -- public -------------------------------------------------------------------------------
    def submit(self, request: Request, events=None) -> Stream:
        if self._closed:
            raise LlmdeskError("the model was unloaded")
        self._check_generates()
        n = len(request.prompt)
        if n == 0:
            raise LlmdeskError("the prompt is empty")
        if n >= self.n_ctx:
            raise ContextOverflow(
                f"the prompt has {n} tokens but the context holds {self.n_ctx}; "
                f"use a larger --ctx (the model was trained on {self.model.n_ctx_train}) or a shorter prompt"
            )
        limits.check_request(request, n_ctx=self.n_ctx, n_vocab=self.model.n_vocab)
        lora = self._set_of(request.adapters)
        stream = Stream(self, request, events)
        stream.lora = lora
        if request.max_tokens == 0:
            stream.result.finish_reason = "length"
            self._finish_stream(stream)
            return stream
        # build the sampler now, in the caller's thread, so a bad grammar is the caller's error
        chain = request.sampling.build_chain(self.model, self.n_ctx)
        stream._chain = chain
        with self._cv:
            self.waiting.append(stream)
            self._cv.notify()
        return stream

    def _check_generates(self) -> None:
        """An encoder (BERT: bidirectional attention, no output head) only embeds."""
        if not self.model.causal:
            raise LlmdeskError(f"this is an embedding model ({self.model.arch}): it makes vectors, not text; "
                               "use it to embed (Model.embed, llmdesk docs --embed-model)")

    def score(self, requests: list[ScoreRequest], *, time_limit: float | None = None) -> ScoreJob:
        """Queue (context, continuation) pairs to score; `.wait()` the job for one ScoreResult per
        pair. Pairs fill free slots and share `llama_decode` calls with generation; a context
        already in the KV cache, or shared by several pairs, is computed once."""
        if self._closed:
            raise LlmdeskError("the model was unloaded")
        self._check_generates()
        limits.check_score(requests, n_vocab=self.model.n_vocab, time_limit=time_limit)
        for i, r in enumerate(requests):
            n = len(r.context) + len(r.continuation) - 1
            if n > self.n_ctx:
                raise ContextOverflow(
                    f"pair {i} needs {n} tokens of context (context + continuation - 1) but the context holds "
                    f"{self.n_ctx}; use a larger --ctx or a shorter text")
        job = ScoreJob(self, list(requests), time_limit)
        if not requests:
            job._finish(None)
            return job
        tasks = [_ScoreTask(job, i, r, self.model.n_vocab, self._set_of(r.adapters)) for i, r in enumerate(requests)]
        with self._cv:
            self.score_jobs.append(job)
            self.score_queue.extend(tasks)
            self._cv.notify()
        return job

    def embed(self, inputs: list[list[int]], *, normalize: bool = True, time_limit: float | None = None,
              adapters: list[tuple[LoraAdapter, float]] | None = None) -> EmbedJob:
        """Queue token-id sequences to embed (pooled as the model says, `self.pooling`, and
        L2-normalised unless asked not to); the Engine thread computes them, several texts per
        decode, between generation steps. `adapters`: this job's LoRA set, as a Request's (None:
        the Engine's own). `.wait()` the job."""
        if self._closed:
            raise LlmdeskError("the model was unloaded")
        if self.pooling == "rank":
            raise LlmdeskError(f"{self.model.path.name} is a reranking model (pooling 'rank'): it scores "
                               "pairs of texts and has no embeddings; use an embedding model")
        for i, toks in enumerate(inputs):
            if not toks:
                raise LlmdeskError("cannot embed an empty text")
            if len(toks) > self.n_ctx:
                raise ContextOverflow(f"input {i} has {len(toks)} tokens, more than the context ({self.n_ctx})")
            if any(not 0 <= t < self.model.n_vocab for t in toks):
                raise limits.InvalidRequest(f"input {i} holds token ids outside the vocabulary "
                                            f"(0 to {self.model.n_vocab - 1})", "input")
        job = EmbedJob(self, [list(t) for t in inputs], normalize, time_limit, self._set_of(adapters))
        with self._cv:
            self.embed_jobs.append(job)
            self._cv.notify()
        return job

    def _set_of(self, adapters) -> tuple:
        """A request's adapter set as a key: ((adapter, scale), ...); None is the Engine's own."""
        if adapters is None:
            return self.lora_set
        out = []
        for a, scale in adapters:
            if not isinstance(a, LoraAdapter) or a.model is not self.model or not a.ptr:
                raise LlmdeskError(f"LoRA adapter {getattr(a, 'path', a)} is not loaded for {self.model.path.name}")
            out.append((a, float(scale)))
        key = tuple(out)
        if len(self._sets) > 256:  # requests sweeping scales: forget (a step then compares by value)
            self._sets.clear()
        return self._sets.setdefault(key, key)  # one object per set: a step compares them by identity

    @property
    def busy_slots(self) -> int:
        """Slots holding a generation or a score request."""
        return sum(1 for s in self.slots if not s.idle)

    def abort_all(self, error: str) -> None:
        """End every request, running or waiting, as an error saying `error` (a server shutting down)."""
        with self._lock:
            work = ([s.stream for s in self.slots if s.stream is not None] + list(self.waiting)
                    + list(self.embed_jobs) + list(self.score_jobs))
        for w in work:
            w.cancel(error)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the Engine: running requests end as cancelled. A step stuck in llama.cpp longer
        than `timeout` is left behind (its memory goes with the process) rather than waited for."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self.abort.set()
            self._cv.notify()
            self._watch_cv.notify()
        self._thread.join(timeout)
        stuck = self._thread.is_alive()
        for stream in list(self.waiting):
            stream.result.finish_reason = "cancelled"
            self._finish_stream(stream)
        for job in list(self.embed_jobs):
            self._finish_job(job, "the model was unloaded")
        for job in list(self.score_jobs):
            self._finish_job(job, "the model was unloaded")
        if stuck:
            log.warning("a step did not end within %.0f s of closing the model; it is left running", timeout)
            for slot in self.slots:
                if slot.stream is not None:
                    slot.stream.result.finish_reason = "cancelled"
                    self._finish_stream(slot.stream)
            return
        if self._embed_pool is not None:
            self._embed_pool.shutdown()
        for ctx, b in zip(self._embed_ctxs, self._embed_batches):
            free_context(ctx)
            b.free()
        self._embed_ctx, self._embed_ctxs, self._embed_batches, self._embed_sets = None, [], [], []
        if self.ctx is not None:
            self.batch.free()
            free_context(self.ctx)
        self.ctx = self.mem = self.batch = None
        self.freed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the loop -----------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def _interrupt(self, work) -> None:
        """`work` was cancelled: wake the loop, and abort the decode in flight if it holds its tokens."""
        with self._cv:
            if any(w is work for w in self._decoding):
                self.abort.set()
            self._cv.notify()

    def _watch(self) -> None:
        """Aborts a decode that runs past the earliest time limit of the requests in it."""
        with self._watch_cv:
            while not self._closed:
                deadline = self._decode_deadline
                if deadline is None:
                    self._watch_cv.wait()
                    continue
                left = deadline - time.perf_counter()
                if left <= 0:
                    self.abort.set()
                    self._decode_deadline = None
                else:
                    self._watch_cv.wait(left)

    def _decode(self, ctx, batch: Batch, work: list, also: list | None = None) -> int:
        """llama_decode, abortable: by a cancel of any of `work`, by its time limits, by close().
        `also`: more (context, batch) pairs, decoded at the same time on the embedding pool's
        threads; the result is then the first nonzero code of them all, or 0."""
        deadlines = [w.deadline for w in work if w.deadline is not None]
        with self._lock:
            if self._closed:
                return 2
            self._decoding = work
            self._decode_deadline = min(deadlines) if deadlines else None
            if any(w.cancelled.is_set() for w in work):
                self.abort.set()
            else:
                self.abort.clear()
            self._watch_cv.notify()
        try:
            others = [self._embed_pool.submit(decode, c, b) for c, b in also or []]
            rcs = [decode(ctx, batch)] + [f.result() for f in others]
            return next((rc for rc in rcs if rc), 0)
        finally:
            with self._lock:
                self._decoding = []
                self._decode_deadline = None

    def _run(self) -> None:
        while True:
            with self._cv:
                while (not self._closed and not self.waiting and not self.embed_jobs and not self.score_queue
                       and self.busy_slots == 0):
                    self._cv.wait()
                if self._closed:
                    break
            try:
                self._drop_cancelled()
                self._expire()
                self._admit()
                self._admit_scores()
                if self.busy_slots:
                    self._step()
                if self.embed_jobs:
                    self._embed_step()
            except Exception as e:  # a bug or a llama.cpp failure: fail the requests, keep serving
                log.exception("engine step failed")
                why = str(e) or type(e).__name__
                for slot in self.slots:
                    if slot.stream is not None:
                        self._end(slot, "error", error=why)
                with self._lock:
                    jobs = list(self.embed_jobs)
                    self.embed_jobs.clear()
                    self._embed_long = None
                    scoring = list(self.score_jobs)
                for job in jobs:
                    self._finish_job(job, why)
                for job in scoring:
                    self._fail_score_job(job, why)
        for slot in self.slots:
            if slot.stream is not None:
                self._end(slot, "cancelled")

    def _drop_cancelled(self) -> None:
        with self._cv:
            gone = [s for s in self.waiting if s.cancelled.is_set()]
            for stream in gone:
                self.waiting.remove(stream)
            scoring = [j for j in self.score_jobs if j.cancelled.is_set()]
        for stream in gone:
            stream.result.finish_reason = "error" if stream.abort_error else "cancelled"
            stream.result.error = stream.abort_error
            C.llama_sampler_free(stream._chain)
            self._finish_stream(stream)
        for slot in self.slots:
            if slot.stream is not None and slot.stream.cancelled.is_set():
                err = slot.stream.abort_error
                self._end(slot, "error" if err else "cancelled", error=err)
        for job in scoring:
            self._fail_score_job(job, job.abort_error or "cancelled")

    def _expire(self) -> None:
        """End the requests past their time limit: an error if nothing was generated yet, else
        finish_reason "time_limit" with what was generated."""
        now = time.perf_counter()
        with self._cv:
            late = [s for s in self.waiting if s.deadline is not None and s.deadline <= now]
            for stream in late:
                self.waiting.remove(stream)
            late_jobs = [j for j in self.score_jobs if j.deadline is not None and j.deadline <= now]
        for stream in late:
            stream.result.finish_reason = "error"
            stream.result.error = _time_limit_message(stream.request.time_limit, "while waiting for a free slot")
            C.llama_sampler_free(stream._chain)
            self._finish_stream(stream)
        for slot in self.slots:
            stream = slot.stream
            if stream is not None and stream.deadline is not None and stream.deadline <= now:
                if stream.result.n_gen:
                    self._end(slot, "time_limit")
                else:
                    self._end(slot, "error", error=_time_limit_message(stream.request.time_limit,
                                                                       "before its first token"))
        for job in late_jobs:
            self._fail_score_job(job, _time_limit_message(job.time_limit, f"with {job.n_done} of "
                                                                          f"{len(job.requests)} pairs scored"))

    def _admit(self) -> None:
        while True:
            with self._cv:
                free = [s for s in self.slots if s.idle]
                if not free or not self.waiting:
                    return
                stream = self.waiting.popleft()
            prompt, lora = stream.request.prompt, stream.lora
            # the free slot whose cache (under this adapter set) shares the longest prefix; else
            # the least recently used
            slot = max(free, key=lambda s: (s.shared(prompt, lora), -s.last_used))
            keep = min(slot.shared(prompt, lora), len(prompt) - 1)  # recompute >= 1 token for logits
            if not self.reuse_prefix:
                keep = 0
            if not C.llama_memory_seq_rm(self.mem, slot.seq, keep, -1):
                C.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
                keep = 0
            slot.cache = slot.cache[:keep]
            slot.lora = lora
            slot.todo = prompt[keep:]
            slot.stream = stream
            slot.cached_for = None
            slot.chain = stream._chain
            slot.next_token = None
            slot.text = _TextOut(stream.request.stop)
            slot.t_admit = time.perf_counter()
            stream.result.n_cached = keep
            stream.result.queued_s = slot.t_admit - stream.t_submit
            sp = stream.request.sampling
            window = limits.penalty_window(sp.repeat_last_n, self.n_ctx)
            if sp.has_penalties and not sp.grammar and window > 0:
                for t in prompt[-window:]:
                    C.llama_sampler_accept(slot.chain, t)

    def _admit_scores(self) -> None:
        """Give free slots to waiting score requests (after generations: they are latency-bound).

        Each takes the longest prefix of its tokens already computed somewhere: in a free slot's
        own cells (that slot is taken), or in a busy slot's cells, copied to a free slot with
        llama_memory_seq_cp (the shared context of a question's choices, or a few-shot prefix).
        A request whose prefix a busy slot is computing right now waits for it rather than
        computing it a second time beside it; requests behind it may go first."""
        i = seen = 0
        while True:
            with self._cv:
                if i >= len(self.score_queue) or seen >= self.score_scan:
                    return
                task = self.score_queue[i]
            free = [s for s in self.slots if s.idle]
            if not free:
                return
            seen += 1
            toks, limit, lora = task.tokens, task.first, task.lora  # the outputs start at `first`: always computed
            if not self.reuse_prefix:
                limit = 0
            # in a unified cache a copy shares the cells: worth it for one token
            min_copy = 1 if self.kv_unified else self.min_copy_tokens
            slot = max(free, key=lambda s: (s.shared(toks, lora), -s.last_used))
            own = min(slot.shared(toks, lora), limit)
            src, copied, coming = None, own, own
            for s in self.slots:
                if s.idle:
                    continue
                c = min(s.shared(toks, lora), limit)
                if c > copied:
                    src, copied = s, c
                if s.todo and s.lora == lora and c == len(s.cache) < limit:  # its prefill continues along ours
                    coming = max(coming, min(c + common_prefix(s.todo, toks[c:]), limit))
            if coming >= max(own, copied) + min_copy:
                i += 1  # wait: that slot's next steps compute this prefix
                continue
            with self._cv:
                del self.score_queue[i]
            if src is not None and copied >= own + min_copy:
                # with a cache per slot, a copy of the whole sequence's buffer, done at the next decode
                # (before its tokens are computed); in a unified cache the cells become shared, and
                # the slot's own cells must go first (seq_cp adds to them, it does not replace them)
                C.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
                C.llama_memory_seq_cp(self.mem, src.seq, slot.seq, -1, -1)
                slot.cache = list(src.cache)
                keep = copied
                self.seq_copies += 1
            else:
                keep = own
            if not C.llama_memory_seq_rm(self.mem, slot.seq, keep, -1):
                C.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
                keep = 0
            slot.cache = slot.cache[:keep]
            slot.lora = lora
            slot.todo = toks[keep:]
            slot.task = task
            slot.cached_for = None
            slot.t_admit = time.perf_counter()
            task.n_cached = keep

    def _step(self) -> None:
        """Every busy slot one step on: one llama_decode per adapter set among them, the set the
        context has now first (so a step of one set never switches, and two sets switch once)."""
        ctx_set = self._ctx_set
        if all(s.lora is ctx_set or s.idle for s in self.slots):  # one set, the context's: as always
            self._step_set(self.slots)
            return
        sets = list(dict.fromkeys(s.lora for s in self.slots if not s.idle))
        if self._ctx_set in sets:
            sets.remove(self._ctx_set)
            sets.insert(0, self._ctx_set)
        for lora in sets:
            if lora != self._ctx_set:
                set_adapters(self.ctx, list(lora))
                self._ctx_set = lora
                self.lora_switches += 1
            self._step_set([s for s in self.slots if s.lora == lora])

    def _step_set(self, slots: list[_Slot]) -> None:
        """One llama_decode over `slots` (all of one adapter set): the generating ones' next
        tokens, then prompt chunks in the room left."""
        b = self.batch
        b.clear()
        outputs: list[tuple[_Slot, int]] = []  # generating slots: (slot, batch index) to sample
        scored: list[tuple[_Slot, int, int, int]] = []  # score slots: (slot, first output row, first j, rows)
        # what each slot in this batch was before it, to put back if the decode is aborted
        before: list[tuple[_Slot, int, int | None, list[int]]] = []

        # generating slots first: one token each
        for slot in slots:
            if slot.stream is not None and slot.next_token is not None:
                before.append((slot, len(slot.cache), slot.next_token, slot.todo))
                outputs.append((slot, b.add(slot.next_token, len(slot.cache), slot.seq, True)))
                slot.cache.append(slot.next_token)
                slot.next_token = None
        # then prompt chunks in the room left: generations' prompts, then score requests
        for slot in sorted(slots, key=lambda s: s.task is not None):
            if slot.idle or not slot.todo or len(b) >= self.n_batch:
                continue
            before.append((slot, len(slot.cache), slot.next_token, slot.todo))
            take = slot.todo[: self.n_batch - len(b)]
            slot.todo = slot.todo[len(take):]
            task = slot.task
            if task is None:
                for i, tok in enumerate(take):
                    last = not slot.todo and i == len(take) - 1
                    idx = b.add(tok, len(slot.cache), slot.seq, last)
                    if last:
                        outputs.append((slot, idx))
                    slot.cache.append(tok)
            else:
                row0, j0 = b.n_outputs, None
                for tok in take:
                    pos = len(slot.cache)
                    want = pos >= task.first  # the logits here predict cont[pos - first]
                    if want and j0 is None:
                        j0 = pos - task.first
                    b.add(tok, pos, slot.seq, want)
                    slot.cache.append(tok)
                if j0 is not None:
                    scored.append((slot, row0, j0, b.n_outputs - row0))
        if len(b) == 0:
            return
        t0 = time.perf_counter()
        rc = self._decode(self.ctx, b, [slot.work for slot, *_ in before])
        took = time.perf_counter() - t0
        self._step_s = 0.8 * self._step_s + 0.2 * took if self._step_s else took
        self.steps += 1
        self.step_tokens += len(b)
        self.step_seconds += took
        if rc == 2:
            self.aborted_steps += 1
            # aborted (a cancel, a time limit, or close): undo this batch for every slot in it;
            # the next loop ends what must end and decodes the rest again
            for slot, n_cache, next_token, todo in before:
                C.llama_memory_seq_rm(self.mem, slot.seq, n_cache, -1)
                del slot.cache[n_cache:]
                slot.next_token, slot.todo = next_token, todo
            return
        if rc != 0:
            why = f"llama_decode failed (code {rc})"
            for slot, _ in outputs:
                self._end(slot, "error", error=why)
            for slot, *_ in before:  # slots that were mid-prompt in this batch
                if slot.stream is not None and slot.todo:
                    self._end(slot, "error", error=why)
                elif slot.task is not None:
                    self._fail_score_job(slot.task.job, why)
            return
        if scored:
            logits = output_logits(self.ctx, b, self.model.n_vocab)  # (n_outputs, n_vocab)
            for slot, row0, j0, k in scored:
                task = slot.task
                task.take(j0, logits[row0 : row0 + k])
                if not slot.todo:
                    self._finish_task(slot)
        now = time.perf_counter()
        for slot, idx in outputs:
            self._sample(slot, idx, now)

    def _sample(self, slot: _Slot, idx: int, now: float) -> None:
        stream = slot.stream
        req = stream.request
        res = stream.result
        logprob = top = None
        if req.logprobs is not None:
            logits = np.ctypeslib.as_array(C.llama_get_logits_ith(self.ctx, idx), shape=(self.model.n_vocab,))
            lp = logits.astype(np.float64)
            lp = lp - lp.max()
            lp = lp - np.log(np.exp(lp).sum())
        t0 = time.perf_counter()
        tok = C.llama_sampler_sample(slot.chain, self.ctx, idx)
        took = time.perf_counter() - t0
        if took > self.max_sample_s:
            self._end(slot, "error", error=f"choosing one token took {took:.1f} s (the grammar or sampling settings "
                                           f"are too costly for this model's vocabulary); the request was stopped")
            return
        if req.logprobs is not None:
            logprob = float(lp[tok])
            if req.logprobs > 0:
                best = np.argpartition(-lp, min(req.logprobs, len(lp) - 1))[: req.logprobs]
                best = best[np.argsort(-lp[best])]
                top = [(int(t), float(lp[t])) for t in best]
        if res.n_gen == 0:
            slot.t_first = now
            res.prefill_s = now - slot.t_admit
        if self.model.is_eog(tok) and not req.ignore_eos:
            self._end(slot, "stop")
            return
        res.n_gen += 1
        res.tokens.append(tok)
        piece = self.model.piece(tok)
        text = slot.text.feed(piece)
        stream.events.put(TokenEvent(tok, text, piece, logprob, top))
        if slot.text.hit is not None:
            res.stop_string = slot.text.hit
            self._end(slot, "stop")
        elif req.max_tokens is not None and res.n_gen >= req.max_tokens:
            self._end(slot, "length")
        elif len(slot.cache) + 1 >= self.n_ctx:
            self._end(slot, "length")
        else:
            slot.next_token = tok

    def _end(self, slot: _Slot, reason: str, error: str | None = None) -> None:
        stream = slot.stream
        res = stream.result
        res.finish_reason = reason
        res.error = error
        if slot.text is not None:
            tail = slot.text.flush()
            if tail:
                stream.events.put(TokenEvent(-1, tail, b""))
            res.text = slot.text.text
        if res.n_gen:
            res.decode_s = time.perf_counter() - slot.t_first
        if reason in ("cancelled", "error", "time_limit"):
            # free the cells now; a cancelled request's cache is not worth keeping
            C.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
            slot.cache = []
        C.llama_sampler_free(slot.chain)
        slot.chain = None
        slot.stream = None
        slot.todo = []
        slot.next_token = None
        slot.text = None
        slot.last_used = time.perf_counter()
        self._finish_stream(stream)

    @staticmethod
    def _finish_stream(stream: Stream) -> None:
        stream.done.set()
        stream.events.put(_DONE)

    # -- scoring ------------------------------------------------------------------------------
    def _finish_task(self, slot: _Slot) -> None:
        """The slot's score request has all its rows: record its result; the slot keeps its cache."""
        task = slot.task
        slot.task = None
        slot.todo = []
        slot.last_used = time.perf_counter()
        job = task.job
        slot.cached_for = job
        job.results[task.index] = task.result()
        job.n_done += 1
        if job.n_done == len(job.requests):
            with self._lock:
                if job in self.score_jobs:
                    self.score_jobs.remove(job)
            self._finish_job(job, None)

    def _fail_score_job(self, job: ScoreJob, error: str) -> None:
        """End `job` as `error`: its waiting requests leave the queue, its slots are freed (cells too)."""
        with self._lock:
            if job in self.score_jobs:
                self.score_jobs.remove(job)
            if any(t.job is job for t in self.score_queue):
                self.score_queue = deque(t for t in self.score_queue if t.job is not job)
        for slot in self.slots:
            # its slots, and the idle ones it left cells in (a cancel between two of its requests)
            if (slot.task is not None and slot.task.job is job) or (slot.idle and slot.cached_for is job):
                slot.cached_for = None
                C.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
                slot.cache = []
                slot.task = None
                slot.todo = []
                slot.last_used = time.perf_counter()
        self._finish_job(job, error)

    # -- embeddings -----------------------------------------------------------------------------
    def _embed_setup(self) -> None:
        """The embeddings context: up to EMBED_MAX_SEQS texts per decode in one shared (unified)
        cache of n_ctx cells. llama.cpp pools each sequence within one ubatch (a later ubatch
        overwrites the pooled value: llama_context::decode, embd_seq), so a decode never holds
        more than one ubatch of tokens; a longer text is fed over several decodes (below). An
        encoder (non-causal attention) must see the whole text in one ubatch: its ubatch is n_ctx.

        An encoder keeps nothing between decodes, so its texts can also be split over one context
        of one thread per thread asked for, decoded side by side. Within one decode llama.cpp's
        threads wait for each other at every node of the graph, spinning; on a machine with other
        work, a thread taken off its core stalls the rest, and side by side is much faster; on a
        quiet one, one context with every thread is (the side-by-side decodes of a step end
        unevenly). Measured with `docs add` of 8 pages of the Python manual (173 chunks, 2 cores):
        one context 123.6 s, side by side 24.5 s at load average 6; 14.3 s and 19.1 s at load
        average 4. So each step takes the way that has embedded a token faster lately
        (`_embed_split`), trying the other once in EMBED_PROBE steps."""
        self._embed_room = self.n_ctx if not self.model.causal else max(16, min(self.n_batch, self.n_ctx))
        threads = self.n_threads or default_threads()
        n = threads if not self.model.causal and self.embed_side_by_side is not False else 1
        for i in range(n):
            ctx = new_context(self.model, n_ctx=self.n_ctx, n_seq=EMBED_MAX_SEQS, n_batch=self._embed_room,
                              n_ubatch=self._embed_room, n_threads=threads if i == 0 else 1, embeddings=True,
                              pooling=self.pooling if self.pooling in ("mean", "cls", "last") else "mean",
                              unified=True, cache_type=self.cache_type, flash_attn=self.flash_attn)
            self._embed_ctxs.append(ctx)
            self._embed_batches.append(Batch(self._embed_room))
            if self.lora:  # embeddings come from the same adapted model as generations
                set_adapters(ctx, self.lora)
            self._embed_sets.append(self.lora_set)
            self.abort.attach(ctx)
        self._embed_ctx, self._embed_batch = self._embed_ctxs[0], self._embed_batches[0]
        if n > 1:
            self._embed_pool = ThreadPoolExecutor(n - 1, thread_name_prefix="llmdesk-embed")
        got = pooling_of(self._embed_ctx)
        if got not in ("mean", "cls", "last"):
            raise LlmdeskError(f"{self.model.path.name}: llama.cpp pools its embeddings as {got!r}, not mean, CLS or last")
        self.pooling = got

    def _embed_limit(self) -> int:
        """Tokens this embeddings decode may take. A decode cannot be paused, and 512 tokens of a
        1B model are seconds on a CPU, so a causal model's texts are fed in pieces that take about
        one generation step's time while slots are busy (a flood of embeddings then slows chats
        by about half instead of stalling every token), and at most EMBED_SLICE_S when they are
        not (a request that arrives waits at most that long for the Engine). An encoder must see
        a whole text in one decode."""
        if not self.model.causal:
            return self._embed_room
        if not self._embed_token_s:  # not measured yet: a small first piece
            return min(self._embed_room, 32)
        budget = self._step_s if self.busy_slots and self._step_s else EMBED_SLICE_S
        return max(8, min(self._embed_room, int(budget / self._embed_token_s)))

    def _embed_split(self) -> bool:
        """Whether this step splits its texts over the side-by-side contexts (the first then
        runs one thread) or gives them to the first with every thread: as asked
        (embed_side_by_side), else each way once, then the faster a token lately, the other
        again once in EMBED_PROBE steps (the machine's load changes)."""
        if len(self._embed_ctxs) == 1:
            return False
        split = self.embed_side_by_side
        if split is None:
            self._embed_choices += 1
            rates = self._embed_rates
            if len(rates) < 2:
                split = True not in rates
            else:
                best = rates[True] <= rates[False]
                split = best if self._embed_choices % EMBED_PROBE else not best
        n = 1 if split else len(self._embed_ctxs)
        if C.llama_n_threads(self._embed_ctx) != n:
            C.llama_set_n_threads(self._embed_ctx, n, n)
        return split

    def _embed_decode(self, b, work: list, also: list | None = None) -> int:
        t0 = time.perf_counter()
        rc = self._decode(self._embed_ctx, b, work, also)
        n = len(b) + sum(len(x) for _, x in also or [])
        if rc == 0 and n:
            per_token = (time.perf_counter() - t0) / n
            self._embed_token_s = 0.8 * self._embed_token_s + 0.2 * per_token if self._embed_token_s else per_token
        self.steps += 1
        return rc

    def _embed_step(self) -> None:
        """One embeddings decode: several short texts (from the jobs in order), or the next piece
        of a long one, so generation steps go on between."""
        now = time.perf_counter()
        with self._lock:
            jobs = list(self.embed_jobs)
        for job in jobs:
            if job.cancelled.is_set() or (job.deadline is not None and job.deadline <= now):
                why = job.abort_error or ("cancelled" if job.cancelled.is_set() else
                                          "the embedding request reached its time limit")
                self._pop_job(job, why)
        with self._lock:
            jobs = list(self.embed_jobs)
        if not jobs:
            return
        if self._embed_ctx is None:
            self._embed_setup()
        if self._embed_long is not None and self._embed_long["job"] not in jobs:
            self._embed_long = None  # its job ended
        room = self._embed_room_now = self._embed_limit()
        if self._embed_long is None and len(jobs[0].inputs[len(jobs[0].vectors)]) > room:
            clear_memory(self._embed_ctx)
            self._embed_under(0, jobs[0].lora)
            self._embed_long = {"job": jobs[0], "pos": 0, "sum": None, "vec": None}
        if self._embed_long is not None:
            self._embed_piece()
            return
        # pack whole texts, in order, while they fit: each into the least filled context's ubatch;
        # one adapter set a step (llama.cpp sets adapters per context), the first job's
        lora = jobs[0].lora
        jobs = [job for job in jobs if job.lora == lora]
        split = self._embed_split()
        bs = self._embed_batches if split else self._embed_batches[:1]
        for b in bs:
            b.clear()
        seqs = [0] * len(bs)
        packed: list[tuple[EmbedJob, int, int]] = []  # (job, context, sequence), in the jobs' order
        for job in jobs:
            for toks in job.inputs[len(job.vectors):]:
                i = min(range(len(bs)), key=lambda i: (seqs[i] == EMBED_MAX_SEQS, len(bs[i])))
                if seqs[i] == EMBED_MAX_SEQS or len(bs[i]) + len(toks) > room:
                    break
                for pos, t in enumerate(toks):
                    bs[i].add(t, pos, seqs[i], True)  # pooled embeddings need every token as an output
                packed.append((job, i, seqs[i]))
                seqs[i] += 1
            else:
                continue
            break
        used = [i for i in range(len(bs)) if seqs[i]]
        for i in used:
            clear_memory(self._embed_ctxs[i])
            self._embed_under(i, lora)
        work = list(dict.fromkeys(job for job, _, _ in packed))
        t0 = time.perf_counter()
        rc = self._embed_decode(bs[0], work, [(self._embed_ctxs[i], bs[i]) for i in used if i])  # the first is never empty
        n = sum(len(bs[i]) for i in used)
        if rc == 0 and len(self._embed_ctxs) > 1 and n >= self._embed_room // 2:  # a query's cost is mostly fixed
            per_token = (time.perf_counter() - t0) / n
            old = self._embed_rates.get(split)
            self._embed_rates[split] = per_token if old is None else 0.7 * old + 0.3 * per_token
        if rc == 2:
            self.aborted_steps += 1
            return  # aborted: the next loop sees why
        if rc != 0:
            for job in work:
                self._pop_job(job, f"llama.cpp failed to compute the embedding (code {rc})")
            return
        for job, i, seq in packed:
            self._embed_done(job, sequence_embedding(self._embed_ctxs[i], seq, self.model.n_embd))

    def _embed_under(self, i: int, lora: tuple) -> None:
        """Embeddings context `i` with adapter set `lora` applied (as a generation step switches
        the generation context's, counted in lora_switches)."""
        if self._embed_sets[i] != lora:
            set_adapters(self._embed_ctxs[i], list(lora))
            self._embed_sets[i] = lora
            self.lora_switches += 1

    def _embed_piece(self) -> None:
        """The next ubatch of a text too long for one: its cells stay for the next piece (causal
        attention sees them). Pooling over pieces: mean = the token-weighted mean of the pieces'
        means; CLS = the first piece's; last = the last piece's."""
        st = self._embed_long
        job = st["job"]
        toks = job.inputs[len(job.vectors)]
        pos = st["pos"]
        piece = toks[pos : pos + self._embed_room_now]
        b = self._embed_batch
        b.clear()
        for i, t in enumerate(piece):
            b.add(t, pos + i, 0, True)
        rc = self._embed_decode(b, [job])
        if rc == 2:
            self.aborted_steps += 1
            C.llama_memory_seq_rm(C.llama_get_memory(self._embed_ctx), 0, pos, -1)
            return
        if rc != 0:
            self._embed_long = None
            self._pop_job(job, f"llama.cpp failed to compute the embedding (code {rc})")
            return
        vec = sequence_embedding(self._embed_ctx, 0, self.model.n_embd)
        if self.pooling == "mean":
            st["sum"] = vec * len(piece) if st["sum"] is None else st["sum"] + vec * len(piece)
        elif self.pooling == "last" or st["vec"] is None:
            st["vec"] = vec
        st["pos"] = pos + len(piece)
        if st["pos"] < len(toks):
            return
        self._embed_long = None
        self._embed_done(job, st["sum"] / len(toks) if self.pooling == "mean" else st["vec"])

    def _embed_done(self, job: EmbedJob, vec: np.ndarray | None) -> None:
        if vec is None:
            self._pop_job(job, "llama.cpp returned no embedding")
            return
        if job.normalize:
            norm = np.linalg.norm(vec)
            vec = vec / norm if norm > 0 else vec
        job.vectors.append(vec.tolist())
        if len(job.vectors) == len(job.inputs):
            self._pop_job(job, None)

    def _pop_job(self, job: EmbedJob, error: str | None) -> None:
        with self._lock:
            if job in self.embed_jobs:
                self.embed_jobs.remove(job)
        self._finish_job(job, error)

    @staticmethod
    def _finish_job(job, error: str | None) -> None:
        job._finish(error)
