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
flight is aborted and the other slots' tokens are decoded again. Embeddings run on the same
thread, interleaved with generation steps, so neither starves the other.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import llama_cpp as C
import numpy as np

from ..errors import LlmdeskError
from . import limits
from .llama import AbortFlag, LlamaModel, new_context

log = logging.getLogger("llmdesk.engine")


class ContextOverflow(LlmdeskError):
    """A prompt that does not fit in the context: always an explicit error, never a silent cut."""


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


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int | None = 256  # None: until the context is full
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: off; 0: the chosen token's; k: also the k most likely
    ignore_eos: bool = False
    time_limit: float | None = None  # seconds from submission to the end, queue included; None: none


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


class Stream:
    """A request in flight. Iterate it for TokenEvents; `.result` is set when it ends."""

    def __init__(self, engine: "Engine", request: Request, events=None):
        self.engine = engine
        self.request = request
        self.result = Result(n_prompt=len(request.prompt))
        # where the engine thread puts TokenEvents and the end marker; a caller may pass its own
        # object with put() (the server hands them straight to its event loop), then not iterate
        self.events = events if events is not None else queue.Queue()
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.t_submit = time.perf_counter()
        self.deadline = self.t_submit + request.time_limit if request.time_limit else None
        self.abort_error: str | None = None  # set by cancel(error=...): the request ends as an error
        self._drained = False  # the end marker was read: iterating again yields nothing

    def cancel(self, error: str | None = None) -> None:
        """Stop the request; its slot is freed within one step. With `error` it ends as an error
        saying so (finish_reason "error"), else as "cancelled"."""
        if not self.done.is_set():
            if error and self.abort_error is None:
                self.abort_error = error
            self.cancelled.set()
            self.engine._interrupt(self)

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


class EmbedJob:
    """Texts (as token ids) to embed, in the Engine's queue. `wait()` returns the vectors."""

    def __init__(self, engine: "Engine", inputs: list[list[int]], normalize: bool, time_limit: float | None):
        self.engine = engine
        self.inputs = inputs
        self.normalize = normalize
        self.vectors: list[list[float]] = []
        self.error: str | None = None
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.deadline = time.perf_counter() + time_limit if time_limit else None
        self.abort_error: str | None = None

    def cancel(self, error: str | None = None) -> None:
        if not self.done.is_set():
            if error and self.abort_error is None:
                self.abort_error = error
            self.cancelled.set()
            self.engine._interrupt(self)

    def wait(self) -> list[list[float]]:
        self.done.wait()
        if self.error is not None:
            raise LlmdeskError(self.error)
        return self.vectors


class _Slot:
    def __init__(self, seq: int):
        self.seq = seq
        self.cache: list[int] = []  # tokens whose K/V are in this sequence's cells, in order
        self.stream: Stream | None = None
        self.chain = None
        self.todo: list[int] = []  # prompt tokens still to prefill
        self.next_token: int | None = None  # sampled, to be decoded at the next step
        self.text: _TextOut | None = None
        self.t_admit = 0.0
        self.t_first = 0.0
        self.last_used = 0.0


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _time_limit_message(limit: float | None, what: str) -> str:
    return f"the request reached its time limit of {limit:g} s {what}"


class Engine:
    """One llama.cpp context over `model` with `n_slots` sequences of `n_ctx` tokens each."""

    # one token's sampling may take this long before the request is stopped (a grammar that is
    # slow for this vocabulary); the grammar checks keep accepted grammars far below it
    max_sample_s = 2.0

    def __init__(
        self,
        model: LlamaModel,
        *,
        n_ctx: int = 4096,
        n_slots: int = 1,
        n_batch: int = 512,
        n_threads: int | None = None,
    ):
        if n_slots < 1:
            raise LlmdeskError(f"--parallel must be at least 1, got {n_slots}")
        if n_ctx < 16:
            raise LlmdeskError(f"--ctx must be at least 16 tokens, got {n_ctx}")
        self.model = model
        self.n_slots = n_slots
        self.n_batch = max(n_batch, n_slots)
        self.n_threads = n_threads
        self.ctx = new_context(model, n_ctx=n_ctx * n_slots, n_seq=n_slots, n_batch=self.n_batch,
                               n_threads=n_threads)
        self.abort = AbortFlag()  # read by llama.cpp during a decode: set, the decode returns early
        self.abort.attach(self.ctx)
        # per slot; llama.cpp rounds its cache up (to 256 cells), the limit is what was asked for
        self.n_ctx = min(n_ctx, C.llama_n_ctx_seq(self.ctx))
        self.mem = C.llama_get_memory(self.ctx)
        self.batch = C.llama_batch_init(self.n_batch, 0, 1)
        self.slots = [_Slot(i) for i in range(n_slots)]
        self.waiting: deque[Stream] = deque()
        self.embed_jobs: deque[EmbedJob] = deque()
        self._embed_ctx = None
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)  # the engine thread waits for work on it
        self._watch_cv = threading.Condition(self._lock)  # the watchdog waits for a decode on it
        self._decoding: list = []  # the Streams / EmbedJob whose tokens are in the decode in flight
        self._decode_deadline: float | None = None
        self._closed = False
        self.steps = 0  # llama_decode calls, for tests and metrics
        self.aborted_steps = 0  # of those, the ones cut short (a cancel, a time limit, close)
        self._thread = threading.Thread(target=self._run, name="llmdesk-engine", daemon=True)
        self._thread.start()
        self._watchdog = threading.Thread(target=self._watch, name="llmdesk-engine-watchdog", daemon=True)
        self._watchdog.start()

    # -- public -------------------------------------------------------------------------------
    def submit(self, request: Request, events=None) -> Stream:
        if self._closed:
            raise LlmdeskError("the model was unloaded")
        n = len(request.prompt)
        if n == 0:
            raise LlmdeskError("the prompt is empty")
        if n >= self.n_ctx:
            raise ContextOverflow(
                f"the prompt has {n} tokens but the context holds {self.n_ctx}; "
                f"use a larger --ctx (the model was trained on {self.model.n_ctx_train}) or a shorter prompt"
            )
        limits.check_request(request, n_ctx=self.n_ctx, n_vocab=self.model.n_vocab)
        stream = Stream(self, request, events)
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

    def embed(self, inputs: list[list[int]], *, normalize: bool = True, time_limit: float | None = None) -> EmbedJob:
        """Queue token-id sequences to embed (mean-pooled, L2-normalised unless asked not to);
        the Engine thread computes them between generation steps. `.wait()` the job."""
        if self._closed:
            raise LlmdeskError("the model was unloaded")
        for i, toks in enumerate(inputs):
            if not toks:
                raise LlmdeskError("cannot embed an empty text")
            if len(toks) > self.n_ctx:
                raise ContextOverflow(f"input {i} has {len(toks)} tokens, more than the context ({self.n_ctx})")
            if any(not 0 <= t < self.model.n_vocab for t in toks):
                raise limits.InvalidRequest(f"input {i} holds token ids outside the vocabulary "
                                            f"(0 to {self.model.n_vocab - 1})", "input")
        job = EmbedJob(self, [list(t) for t in inputs], normalize, time_limit)
        with self._cv:
            self.embed_jobs.append(job)
            self._cv.notify()
        return job

    @property
    def busy_slots(self) -> int:
        return sum(1 for s in self.slots if s.stream is not None)

    def abort_all(self, error: str) -> None:
        """End every request, running or waiting, as an error saying `error` (a server shutting down)."""
        with self._lock:
            work = [s.stream for s in self.slots if s.stream is not None] + list(self.waiting) + list(self.embed_jobs)
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
        if stuck:
            log.warning("a step did not end within %.0f s of closing the model; it is left running", timeout)
            for slot in self.slots:
                if slot.stream is not None:
                    slot.stream.result.finish_reason = "cancelled"
                    self._finish_stream(slot.stream)
            return
        if self._embed_ctx:
            C.llama_free(self._embed_ctx)
            self._embed_ctx = None
        C.llama_batch_free(self.batch)
        C.llama_free(self.ctx)
        self.ctx = None

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

    def _decode(self, ctx, batch, work: list) -> int:
        """llama_decode, abortable: by a cancel of any of `work`, by its time limits, by close()."""
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
            return C.llama_decode(ctx, batch)
        finally:
            with self._lock:
                self._decoding = []
                self._decode_deadline = None

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self.waiting and not self.embed_jobs and self.busy_slots == 0:
                    self._cv.wait()
                if self._closed:
                    break
            try:
                self._drop_cancelled()
                self._expire()
                self._admit()
                if self.busy_slots:
                    self._step()
                if self.embed_jobs:
                    self._embed_step()
            except Exception as e:  # a bug or a llama.cpp failure: fail the requests, keep serving
                log.exception("engine step failed")
                for slot in self.slots:
                    if slot.stream is not None:
                        self._end(slot, "error", error=str(e) or type(e).__name__)
                with self._lock:
                    jobs = list(self.embed_jobs)
                    self.embed_jobs.clear()
                for job in jobs:
                    self._finish_job(job, str(e) or type(e).__name__)
        for slot in self.slots:
            if slot.stream is not None:
                self._end(slot, "cancelled")

    def _drop_cancelled(self) -> None:
        with self._cv:
            gone = [s for s in self.waiting if s.cancelled.is_set()]
            for stream in gone:
                self.waiting.remove(stream)
        for stream in gone:
            stream.result.finish_reason = "error" if stream.abort_error else "cancelled"
            stream.result.error = stream.abort_error
            C.llama_sampler_free(stream._chain)
            self._finish_stream(stream)
        for slot in self.slots:
            if slot.stream is not None and slot.stream.cancelled.is_set():
                err = slot.stream.abort_error
                self._end(slot, "error" if err else "cancelled", error=err)

    def _expire(self) -> None:
        """End the requests past their time limit: an error if nothing was generated yet, else
        finish_reason "time_limit" with what was generated."""
        now = time.perf_counter()
        with self._cv:
            late = [s for s in self.waiting if s.deadline is not None and s.deadline <= now]
            for stream in late:
                self.waiting.remove(stream)
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

    def _admit(self) -> None:
        while True:
            with self._cv:
                free = [s for s in self.slots if s.stream is None]
                if not free or not self.waiting:
                    return
                stream = self.waiting.popleft()
            prompt = stream.request.prompt
            # the free slot whose cache shares the longest prefix; else the least recently used
            slot = max(free, key=lambda s: (common_prefix(s.cache, prompt), -s.last_used))
            keep = min(common_prefix(slot.cache, prompt), len(prompt) - 1)  # recompute >= 1 token for logits
            if not C.llama_memory_seq_rm(self.mem, slot.seq, keep, -1):
                C.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
                keep = 0
            slot.cache = slot.cache[:keep]
            slot.todo = prompt[keep:]
            slot.stream = stream
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

    def _step(self) -> None:
        b = self.batch
        n = 0
        outputs: list[tuple[_Slot, int]] = []
        # what each slot in this batch was before it, to put back if the decode is aborted
        before: list[tuple[_Slot, int, int | None, list[int]]] = []

        def add(tok: int, pos: int, seq: int, want: bool) -> None:
            nonlocal n
            b.token[n] = tok
            b.pos[n] = pos
            b.n_seq_id[n] = 1
            b.seq_id[n][0] = seq
            b.logits[n] = want
            n += 1

        # generating slots first: one token each
        for slot in self.slots:
            if slot.stream is not None and slot.next_token is not None:
                before.append((slot, len(slot.cache), slot.next_token, slot.todo))
                outputs.append((slot, n))
                add(slot.next_token, len(slot.cache), slot.seq, True)
                slot.cache.append(slot.next_token)
                slot.next_token = None
        # then prompt chunks, in the room left in this batch
        for slot in self.slots:
            if slot.stream is None or not slot.todo or n >= self.n_batch:
                continue
            before.append((slot, len(slot.cache), slot.next_token, slot.todo))
            take = slot.todo[: self.n_batch - n]
            slot.todo = slot.todo[len(take):]
            for i, tok in enumerate(take):
                last = not slot.todo and i == len(take) - 1
                if last:
                    outputs.append((slot, n))
                add(tok, len(slot.cache), slot.seq, last)
                slot.cache.append(tok)
        if n == 0:
            return
        b.n_tokens = n
        rc = self._decode(self.ctx, b, [slot.stream for slot, *_ in before])
        self.steps += 1
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
            for slot, _ in outputs:
                self._end(slot, "error", error=f"llama_decode failed (code {rc})")
            for slot in self.slots:  # slots that were mid-prompt in this batch
                if slot.stream is not None and slot.todo:
                    self._end(slot, "error", error=f"llama_decode failed (code {rc})")
            return
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

    # -- embeddings -----------------------------------------------------------------------------
    def _embed_step(self) -> None:
        """Embed the next input of the first job (one decode), so generation steps go on between."""
        with self._lock:
            job = self.embed_jobs[0] if self.embed_jobs else None
        if job is None:
            return
        if job.cancelled.is_set() or (job.deadline is not None and job.deadline <= time.perf_counter()):
            why = job.abort_error or ("cancelled" if job.cancelled.is_set() else
                                      "the embedding request reached its time limit")
            self._pop_job(job, why)
            return
        if self._embed_ctx is None:
            self._embed_ctx = new_context(self.model, n_ctx=self.n_ctx, n_seq=1, n_batch=self.n_ctx,
                                          n_threads=self.n_threads, embeddings=True)
            self.abort.attach(self._embed_ctx)
        toks = job.inputs[len(job.vectors)]
        ctx = self._embed_ctx
        C.llama_memory_clear(C.llama_get_memory(ctx), True)
        batch = C.llama_batch_init(len(toks), 0, 1)
        try:
            for i, t in enumerate(toks):
                batch.token[i] = t
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = True
            batch.n_tokens = len(toks)
            rc = self._decode(ctx, batch, [job])
            self.steps += 1
            if rc == 2:
                self.aborted_steps += 1
                return  # aborted: the next loop sees why
            if rc != 0:
                self._pop_job(job, f"llama.cpp failed to compute the embedding (code {rc})")
                return
            ptr = C.llama_get_embeddings_seq(ctx, 0)
            vec = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                        shape=(self.model.n_embd,)).astype(np.float64)
        finally:
            C.llama_batch_free(batch)
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
    def _finish_job(job: EmbedJob, error: str | None) -> None:
        job.error = error
        job.done.set()
