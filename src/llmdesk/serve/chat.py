"""What both APIs add around the conversation layer (runtime/conversation.py): the truncation
header, llama.cpp server's `timings` object, and running slow preparation off the event loop.

A prompt that does not fit the context is an error (400, `context_length_exceeded`) unless the
request asks for `"truncate": true`; then the oldest turns (chat) or the oldest tokens (a raw
prompt) are dropped, and the response says how many tokens were (`truncated_prompt_tokens`
and the `X-Llmdesk-Truncated-Tokens` header). Never silently.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from .errors import APIError

TRUNCATED_HEADER = "X-Llmdesk-Truncated-Tokens"
# preparing a request (tokenizing a conversation, turning a JSON schema into a grammar) may take
# this long; the schema checks keep real work far below it, so this only stops what slipped past
PREPARE_TIMEOUT_S = 10.0


# its own threads: long work on the default executor (a pull, a model load) cannot delay requests
_PREPARE = ThreadPoolExecutor(4, thread_name_prefix="llmdesk-prepare")


async def off_loop(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` in a worker thread, so the event loop (every other request) goes on;
    past PREPARE_TIMEOUT_S the request is answered with an error. (A thread cannot be stopped:
    the bounds on schemas and prompts are what keep the work itself short.)"""
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(loop.run_in_executor(_PREPARE, lambda: fn(*args, **kwargs)), PREPARE_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise APIError(400, f"preparing this request took longer than {PREPARE_TIMEOUT_S:g} s (a very large "
                            "schema, tool list or prompt?); make it smaller", code="request_too_complex") from None


def prompt_headers(prompt) -> dict[str, str]:
    return {TRUNCATED_HEADER: str(prompt.truncated_tokens)} if prompt.truncated_tokens else {}


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
