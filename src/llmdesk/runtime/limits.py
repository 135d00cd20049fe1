"""The bounds on every request, one set for every face (Python API, CLI, OpenAI and Ollama routes).

A request is checked here before the Engine does any work for it, so that no single request can
make the Engine do unbounded work: numbers must be finite and in range, the repetition-penalty
window is never longer than the context (llama.cpp allocates it up front: 2**31 tokens would be
8 GB), stop lists and grammars are bounded, and every request has a time limit.

    check_request(request, n_ctx=4096, n_vocab=32000)   # raises InvalidRequest, naming the field

Sampling defaults are llama.cpp server's: whatever a request leaves out gets these.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..errors import LlmdeskError

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Request, SamplingParams, ScoreRequest

# llama.cpp server's sampling defaults
DEFAULTS = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0, repeat_last_n=64,
                presence_penalty=0.0, frequency_penalty=0.0)

# (lowest, highest) for the real-valued settings; both ends included except where noted
RANGES = {
    "temperature": (0.0, 100.0),  # 0: greedy
    "top_p": (0.0, 1.0),
    "min_p": (0.0, 1.0),
    "repeat_penalty": (0.0, 10.0),  # must be > 0; 1.0: off
    "presence_penalty": (-2.0, 2.0),  # OpenAI's range
    "frequency_penalty": (-2.0, 2.0),
}
MAX_TOP_K = 2**31 - 1  # a C int; llama.cpp clamps it to the vocabulary
MAX_STOPS = 16
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_GRAMMAR_CHARS = 512 * 1024
# scoring: one job holds at most this many (context, continuation) pairs, and the raw logits it
# keeps (ScoreRequest.logits: continuation tokens x vocabulary x 4 bytes) stay under this size
MAX_SCORE_REQUESTS = 65536
MAX_SCORE_LOGITS_BYTES = 2 << 30


class InvalidRequest(LlmdeskError):
    """A request setting out of bounds; `param` names it (for an HTTP error's `param` field)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _number(name: str, value, lo: float, hi: float, *, open_low: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"{name} must be a number, got {value!r}", name)
    ok = math.isfinite(value) and (lo < value if open_low else lo <= value) and value <= hi
    if not ok:
        low = f"above {lo:g}" if open_low else f"from {lo:g}"
        raise InvalidRequest(f"{name} must be a finite number {low} to {hi:g}, got {value!r}", name)


def _integer(name: str, value, lo: int, hi: int, meaning: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidRequest(f"{name} must be an integer from {lo} to {hi}{meaning}, got {value!r}", name)


def check_sampling(sp: "SamplingParams") -> None:
    for name, (lo, hi) in RANGES.items():
        _number(name, getattr(sp, name), lo, hi, open_low=name == "repeat_penalty")
    _integer("top_k", sp.top_k, 0, MAX_TOP_K, " (0 turns it off)")
    _integer("repeat_last_n", sp.repeat_last_n, -1, MAX_TOP_K, " (-1: the whole context, 0: off)")
    if sp.seed is not None and (isinstance(sp.seed, bool) or not isinstance(sp.seed, int)):
        raise InvalidRequest(f"seed must be an integer, got {sp.seed!r}", "seed")
    if sp.grammar is not None and len(sp.grammar) > MAX_GRAMMAR_CHARS:
        raise InvalidRequest(f"the grammar has {len(sp.grammar)} characters; the limit is {MAX_GRAMMAR_CHARS}",
                             "grammar")


def check_stop(stop, param: str = "stop") -> list[str]:
    """A stop list: at most MAX_STOPS strings of at most MAX_STOP_CHARS characters; empty ones dropped."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise InvalidRequest(f"{param} must be a string or a list of strings", param)
    if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise InvalidRequest(f"{param} takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters",
                             param)
    return [s for s in stops if s]


def check_request(req: "Request", *, n_ctx: int, n_vocab: int) -> None:
    """Everything the Engine will do for `req` is bounded, or InvalidRequest says which field is not."""
    check_sampling(req.sampling)
    if req.max_tokens is not None:
        _integer("max_tokens", req.max_tokens, 0, MAX_TOP_K)
    if req.logprobs is not None:
        _integer("top_logprobs", req.logprobs, 0, MAX_TOP_LOGPROBS)
    check_stop(req.stop)
    if req.time_limit is not None:
        _number("time_limit", req.time_limit, 0.0, math.inf, open_low=True)
    if any(not 0 <= t < n_vocab for t in req.prompt):
        raise InvalidRequest(f"the prompt holds token ids outside the vocabulary (0 to {n_vocab - 1})", "prompt")


def penalty_window(repeat_last_n: int, n_ctx: int) -> int:
    """The repetition-penalty window in tokens: -1 is the whole context, and it never exceeds it."""
    return n_ctx if repeat_last_n < 0 else min(repeat_last_n, n_ctx)


def check_score(requests: "list[ScoreRequest]", *, n_vocab: int, time_limit: float | None = None) -> None:
    """A scoring job is bounded: a bounded number of pairs, each with a context of at least one
    token (llmdesk's prefix token, BOS, when the text has none) and a non-empty continuation of
    token ids in the vocabulary; top_k as for logprobs; the raw logits kept within a budget.
    (The length against the context is the Engine's check: it knows its context.)"""
    if len(requests) > MAX_SCORE_REQUESTS:
        raise InvalidRequest(f"a scoring job takes at most {MAX_SCORE_REQUESTS} pairs, got {len(requests)}; "
                             "split it", "requests")
    logit_bytes = 0
    for i, r in enumerate(requests):
        if not r.context:
            raise InvalidRequest(f"pair {i} has an empty context; give at least one token (the BOS token, as "
                                 "lm-evaluation-harness does for an empty context)", "context")
        if not r.continuation:
            raise InvalidRequest(f"pair {i} has an empty continuation: there is nothing to score", "continuation")
        for name, toks in (("context", r.context), ("continuation", r.continuation)):
            if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < n_vocab for t in toks):
                raise InvalidRequest(f"pair {i}'s {name} holds token ids outside the vocabulary (0 to {n_vocab - 1})",
                                     name)
        _integer("top_logprobs", r.top_k, 0, MAX_TOP_LOGPROBS)
        if r.logits:
            logit_bytes += len(r.continuation) * n_vocab * 4
    if logit_bytes > MAX_SCORE_LOGITS_BYTES:
        raise InvalidRequest(f"the job would keep {logit_bytes / 2**30:.1f} GiB of logits (the limit is "
                             f"{MAX_SCORE_LOGITS_BYTES / 2**30:.0f} GiB); score fewer tokens per job", "logits")
    if time_limit is not None:
        _number("time_limit", time_limit, 0.0, math.inf, open_low=True)
