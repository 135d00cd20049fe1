"""From HTTP requests to Engine streams, and back.

The Engine does the batching: requests join and leave the running batch between steps, and a
prompt reuses the longest prefix some slot still has in its KV cache. What the server adds:

- admission: at most `--parallel + --max-queue` generations per model in flight; past that a
  request is answered 429 with Retry-After instead of waiting without bound;
- a bridge from the Engine's thread to the event loop (`Generations`): the Engine puts each
  TokenEvent straight into an asyncio queue (Engine.submit's `events`), no thread per stream;
- cancellation: a stream whose consumer goes away (client disconnect, error) is cancelled, and
  the Engine frees its slot at the next step;
- LoRA adapters: each request carries the set its lease chose (`Lease.adapters`);
- accounting: a finished generation is counted (tokens, time to first token, speed) when the
  Engine ends it, whoever was or was not listening.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from ..runtime.engine import Request, Result, Stream, TokenEvent
from .errors import APIError
from .metrics import Metrics
from .models import Lease

_END = object()


class _Sink:
    """What the Engine thread puts one stream's events into: each goes straight to the event
    loop (no thread per stream)."""

    def __init__(self, gens: "Generations", index: int):
        self.gens = gens
        self.index = index

    def put(self, item) -> None:
        try:
            self.gens.loop.call_soon_threadsafe(self.gens._deliver, self.index, item)
        except RuntimeError:  # the loop is gone (server shutting down): nobody listens any more
            if self.index < len(self.gens.streams):
                self.gens.streams[self.index].cancel()


class Generations:
    """The Engine streams of one API request (its `n` choices), iterated together on the event
    loop through one asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_done):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self._on_done = on_done
        self.streams: list[Stream] = []

    def submit(self, engine, request: Request) -> Stream:
        stream = engine.submit(request, events=_Sink(self, len(self.streams)))
        self.streams.append(stream)
        return stream

    def _deliver(self, index: int, item) -> None:
        # on the loop, so after submit() has recorded the stream, even for one that ended at once
        if not isinstance(item, TokenEvent):  # the Engine's end-of-stream marker
            try:
                self._on_done(self.streams[index].result)  # counted whoever is listening
            finally:
                self.queue.put_nowait((index, _END))
        else:
            self.queue.put_nowait((index, item))

    @property
    def results(self) -> list[Result]:
        return [s.result for s in self.streams]

    def cancel(self) -> None:
        for s in self.streams:
            s.cancel()

    async def events(self) -> AsyncIterator[tuple[int, TokenEvent | None]]:
        """(choice index, TokenEvent) as they come, and (index, None) when that choice has ended.
        Leaving early cancels whatever is still generating."""
        remaining = len(self.streams)
        try:
            while remaining:
                # let the loop run between events, so a client that has gone is noticed before
                # a burst of tokens is written to its closed connection
                await asyncio.sleep(0)
                i, ev = await self.queue.get()
                if ev is _END:
                    remaining -= 1
                    yield i, None
                else:
                    yield i, ev
        finally:
            if remaining:
                self.cancel()

    async def wait(self) -> list[list[TokenEvent]]:
        out: list[list[TokenEvent]] = [[] for _ in self.streams]
        async for i, ev in self.events():
            if ev is not None:
                out[i].append(ev)
        return out


def admit(lease: Lease, n: int, metrics: Metrics):
    """Take `n` places in the lease's model queue (generations or an embedding request), or answer
    429 with Retry-After. Returns the Gate; each place is left with `gate.leave()`."""
    lm = lease.loaded
    gate = lm.gate
    if n > gate.capacity:
        raise APIError(400, f"this server runs at most {gate.capacity} generations per model at once; "
                            f"asked for {n}", param="n")
    if not gate.try_enter(n):
        metrics.inc("llmdesk_rejected_total", model=lm.name, reason="queue_full")
        wait = gate.retry_after()
        raise APIError(429, f"model '{lm.name}' is busy: {gate.inflight} requests are running or queued "
                            f"(--parallel {gate.n_slots}, --max-queue {gate.capacity - gate.n_slots}); "
                            f"retry in {wait} s", code="queue_full", headers={"Retry-After": str(wait)})
    return gate


def start(lease: Lease, requests: list[Request], metrics: Metrics) -> Generations:
    """Submit `requests` (the `n` choices of one API request) to the lease's Engine, or answer 429."""
    lm = lease.loaded
    gate = admit(lease, len(requests), metrics)
    t0 = time.perf_counter()

    def on_done(result: Result) -> None:
        gate.leave(time.perf_counter() - t0 if result.finish_reason in ("stop", "length") else None)
        _account(metrics, lm.name, result)

    gens = Generations(asyncio.get_running_loop(), on_done)
    try:
        for req in requests:
            req.adapters = lease.adapters  # the LoRA set the request chose (None: the base)
            gens.submit(lm.model.engine, req)
    except BaseException:
        # the ones submitted end (cancelled) through on_done; the rest never started
        gens.cancel()
        for _ in range(len(requests) - len(gens.streams)):
            gate.leave()
        raise
    return gens


def _account(metrics: Metrics, model: str, r: Result) -> None:
    metrics.inc("llmdesk_generations_total", model=model, finish_reason=r.finish_reason or "unknown")
    metrics.inc("llmdesk_prompt_tokens_total", r.n_prompt, model=model)
    metrics.inc("llmdesk_prompt_cached_tokens_total", r.n_cached, model=model)
    metrics.inc("llmdesk_generated_tokens_total", r.n_gen, model=model)
    if r.n_gen:
        metrics.observe("llmdesk_time_to_first_token_seconds", r.ttft_s, model=model)
    if r.n_gen > 1 and r.tokens_per_second > 0:
        metrics.observe("llmdesk_tokens_per_second", r.tokens_per_second, model=model)


async def wait_for_disconnect(receive) -> None:
    """Returns when the client has gone (the request body must have been read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class ClientGone(Exception):
    pass


async def collect(request, gens: Generations) -> list[list[TokenEvent]]:
    """Every choice's events, or ClientGone (with the generations cancelled) if the client leaves first."""
    work = asyncio.ensure_future(gens.wait())
    watch = asyncio.ensure_future(wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        gens.cancel()
        work.cancel()
        raise
    finally:
        watch.cancel()
    if not work.done():
        gens.cancel()
        work.cancel()
        raise ClientGone()
    return work.result()
