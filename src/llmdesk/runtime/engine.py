"""The Engine: one llama.cpp context, N sequence slots, continuous batching.

A request becomes a slot. Its prompt is compared with what every free slot still holds in its KV
cache; the slot with the longest common prefix is taken and only the rest of the prompt is
prefilled, in chunks that share each `llama_decode` call with the other slots' next tokens. Every
generating slot advances by one token per call, so requests join and leave the running batch
between steps. Tokens go back to the caller through a `Stream` it iterates; cancelling (or
dropping the iterator) frees the slot and its KV cells at the next step.

One background thread owns the context: callers never touch llama.cpp directly.
"""

from __future__ import annotations

import codecs
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import llama_cpp as C
import numpy as np

from ..errors import LlmdeskError
from .llama import LlamaModel, new_context

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

    def build_chain(self, model: LlamaModel):
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
            add(C.llama_sampler_init_penalties(
                model.n_vocab, self.repeat_last_n, self.repeat_penalty, self.frequency_penalty, self.presence_penalty))
        if self.temperature <= 0:
            add(C.llama_sampler_init_greedy())
            return chain
        if self.top_k > 0:
            add(C.llama_sampler_init_top_k(self.top_k))
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
    finish_reason: str = ""  # "stop" | "length" | "cancelled" | "error"
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
        self._drained = False  # the end marker was read: iterating again yields nothing

    def cancel(self) -> None:
        if not self.done.is_set():
            self.cancelled.set()
            self.engine._wake()

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


class Engine:
    """One llama.cpp context over `model` with `n_slots` sequences of `n_ctx` tokens each."""

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
        self.ctx = new_context(model, n_ctx=n_ctx * n_slots, n_seq=n_slots, n_batch=self.n_batch,
                               n_threads=n_threads)
        # per slot; llama.cpp rounds its cache up (to 256 cells), the limit is what was asked for
        self.n_ctx = min(n_ctx, C.llama_n_ctx_seq(self.ctx))
        self.mem = C.llama_get_memory(self.ctx)
        self.batch = C.llama_batch_init(self.n_batch, 0, 1)
        self.slots = [_Slot(i) for i in range(n_slots)]
        self.waiting: deque[Stream] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self.steps = 0  # llama_decode calls, for tests and metrics
        self._thread = threading.Thread(target=self._run, name="llmdesk-engine", daemon=True)
        self._thread.start()

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
        if request.max_tokens is not None and request.max_tokens < 0:
            raise LlmdeskError(f"max_tokens must be >= 0, got {request.max_tokens}")
        stream = Stream(self, request, events)
        if request.max_tokens == 0:
            stream.result.finish_reason = "length"
            self._finish_stream(stream)
            return stream
        # build the sampler now, in the caller's thread, so a bad grammar is the caller's error
        chain = request.sampling.build_chain(self.model)
        stream._chain = chain
        with self._cv:
            self.waiting.append(stream)
            self._cv.notify()
        return stream

    @property
    def busy_slots(self) -> int:
        return sum(1 for s in self.slots if s.stream is not None)

    def close(self) -> None:
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify()
        self._thread.join()
        for stream in list(self.waiting):
            stream.result.finish_reason = "cancelled"
            self._finish_stream(stream)
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

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self.waiting and self.busy_slots == 0:
                    self._cv.wait()
                if self._closed:
                    break
            try:
                self._drop_cancelled()
                self._admit()
                if self.busy_slots:
                    self._step()
            except Exception as e:  # a bug or a llama.cpp failure: fail the requests, keep serving
                log.exception("engine step failed")
                for slot in self.slots:
                    if slot.stream is not None:
                        self._end(slot, "error", error=str(e) or type(e).__name__)
        for slot in self.slots:
            if slot.stream is not None:
                self._end(slot, "cancelled")

    def _drop_cancelled(self) -> None:
        with self._cv:
            for stream in [s for s in self.waiting if s.cancelled.is_set()]:
                self.waiting.remove(stream)
                stream.result.finish_reason = "cancelled"
                C.llama_sampler_free(stream._chain)
                self._finish_stream(stream)
        for slot in self.slots:
            if slot.stream is not None and slot.stream.cancelled.is_set():
                self._end(slot, "cancelled")

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
            if sp.has_penalties and not sp.grammar:
                for t in prompt[-sp.repeat_last_n:]:
                    C.llama_sampler_accept(slot.chain, t)

    def _step(self) -> None:
        b = self.batch
        n = 0
        outputs: list[tuple[_Slot, int]] = []

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
                outputs.append((slot, n))
                add(slot.next_token, len(slot.cache), slot.seq, True)
                slot.cache.append(slot.next_token)
                slot.next_token = None
        # then prompt chunks, in the room left in this batch
        for slot in self.slots:
            if slot.stream is None or not slot.todo or n >= self.n_batch:
                continue
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
        rc = C.llama_decode(self.ctx, b)
        self.steps += 1
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
        tok = C.llama_sampler_sample(slot.chain, self.ctx, idx)
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
        if reason in ("cancelled", "error"):
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
