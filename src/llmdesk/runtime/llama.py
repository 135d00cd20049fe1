"""The thin layer over llama.cpp's C API (through llama-cpp-python's ctypes bindings).

Only this module and engine.py touch `llama_cpp`. It owns: backend start-up, llama.cpp's log
(routed into Python logging, the last errors kept so a failed load can say why), loading a model,
its vocabulary (tokenize, token -> bytes), and creating contexts.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import threading
from pathlib import Path

import llama_cpp as C

from ..errors import BadModelFile, LlmdeskError

log = logging.getLogger("llmdesk.llama")

# ---------------------------------------------------------------------------------------------
# backend and logging

_recent_errors: collections.deque[str] = collections.deque(maxlen=8)
_init_lock = threading.Lock()
_initialized = False
# ggml's levels: 0 none, 1 debug, 2 info, 3 warn, 4 error, 5 continue the previous line
_GGML_WARN, _GGML_ERROR, _GGML_CONT = 3, 4, 5
_last_level = 0


@C.llama_log_callback
def _log_callback(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    global _last_level
    if level == _GGML_CONT:
        level = _last_level
    _last_level = level
    msg = text.decode("utf-8", "replace").rstrip()
    if not msg:
        return
    if level == _GGML_ERROR:
        _recent_errors.append(msg)
    # llama.cpp's chatter (and its warnings, which llmdesk turns into its own messages) is
    # DEBUG for us: a user sees it only when they turn logging on
    log.debug(msg)


def init_backend() -> None:
    global _initialized
    with _init_lock:
        if _initialized:
            return
        C.llama_log_set(_log_callback, ctypes.c_void_p(0))
        C.llama_backend_init()
        _initialized = True


def last_error() -> str:
    return _recent_errors[-1] if _recent_errors else ""


ALL_LAYERS = 999  # llama.cpp's "every layer" (more than any model has)


def parse_gpu_layers(value: str | int | None) -> int:
    """--gpu-layers: a number of layers to offload to a GPU, or "all"; 0 (the default) runs on the CPU."""
    if value is None:
        return 0
    text = str(value).strip().lower()
    if text in ("all", "max", "-1"):
        return ALL_LAYERS
    if not text.isdigit():
        raise LlmdeskError(f"--gpu-layers takes a number of layers or 'all', not {value!r}")
    return int(text)


def gpu_offload() -> bool:
    """Whether this llama.cpp build has a GPU backend (CUDA, ROCm, Metal, Vulkan) to offload to."""
    init_backend()
    return bool(C.llama_supports_gpu_offload())


def default_threads() -> int:
    """Physical cores are what matters for llama.cpp; use all but leave one for the rest when many."""
    n = os.cpu_count() or 1
    return n if n <= 4 else n - 1


# ---------------------------------------------------------------------------------------------
# the model and its vocabulary


class LlamaModel:
    """A loaded model (weights mmapped) and its vocabulary. Contexts are made from it."""

    def __init__(self, path: str | os.PathLike, *, n_gpu_layers: int = 0):
        init_backend()
        self.path = Path(path)
        params = C.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        self.n_gpu_layers = n_gpu_layers
        _recent_errors.clear()
        ptr = C.llama_model_load_from_file(str(self.path).encode(), params)
        if not ptr:
            why = last_error() or "llama.cpp could not load it"
            raise BadModelFile(f"{self.path}: llama.cpp refused the model: {why}")
        self.ptr = ptr
        self.vocab = C.llama_model_get_vocab(ptr)
        self.n_vocab = C.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = C.llama_model_n_ctx_train(ptr)
        self.n_embd = C.llama_model_n_embd(ptr)
        self.bos = C.llama_vocab_bos(self.vocab)
        self.eos = C.llama_vocab_eos(self.vocab)
        self.add_bos = bool(C.llama_vocab_get_add_bos(self.vocab))
        self._piece_cache: dict[int, bytes] = {}

    def close(self) -> None:
        if getattr(self, "ptr", None):
            C.llama_model_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order varies
        try:
            self.close()
        except Exception:
            pass

    # metadata -----------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = C.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):  # long values (chat templates) need a bigger buffer
            buf = ctypes.create_string_buffer(n + 1)
            C.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    def chat_template(self) -> str | None:
        ptr = C.llama_model_chat_template(self.ptr, None)
        return ptr.decode("utf-8", "replace") if ptr else None

    def n_params(self) -> int:
        return C.llama_model_n_params(self.ptr)

    def size_bytes(self) -> int:
        return C.llama_model_size(self.ptr)

    # tokens -------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (C.llama_token * n_max)()
        n = C.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:  # buffer too small: -n is the size needed
            n_max = -n
            buf = (C.llama_token * n_max)()
            n = C.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token (may be part of a UTF-8 character)."""
        key = token if not special else -1 - token
        cached = self._piece_cache.get(key)
        if cached is not None:
            return cached
        buf = ctypes.create_string_buffer(64)
        n = C.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        out = buf.raw[:n]
        self._piece_cache[key] = out
        return out

    def detokenize(self, tokens: list[int], *, special: bool = False) -> str:
        return b"".join(self.piece(t, special=special) for t in tokens).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return bool(C.llama_vocab_is_eog(self.vocab, token))

    def token_text(self, token: int) -> str:
        return (C.llama_vocab_get_text(self.vocab, token) or b"").decode("utf-8", "replace")


class AbortFlag:
    """A flag llama.cpp's compute threads read between graph nodes: `set()` it and the
    `llama_decode` in progress returns 2 (aborted) within one node, so a long prefill can be
    cancelled mid-call.

    The check runs on every node of every decode, so it must not enter Python (a ctypes callback
    would take the GIL hundreds of times per token). The callback is libc's `strlen` over a
    two-byte buffer: it reads "\\x01" as 1 (abort) and "" as 0 (go on); ggml takes the low byte
    of the return register as its bool. Where libc cannot be found, a Python callback does the
    same, more slowly."""

    def __init__(self):
        self.buf = ctypes.create_string_buffer(2)  # b"\0\0": not set
        try:
            libc = ctypes.CDLL(None)
            self.callback = C.ggml_abort_callback(ctypes.cast(libc.strlen, ctypes.c_void_p).value)
        except (OSError, AttributeError, TypeError):  # pragma: no cover - no dlopen(NULL) (Windows)
            self.callback = C.ggml_abort_callback(lambda _data: self.buf.raw[0] != 0)
        self.data = ctypes.cast(self.buf, ctypes.c_void_p)

    def set(self) -> None:
        self.buf[0] = 1

    def clear(self) -> None:
        self.buf[0] = 0

    def is_set(self) -> bool:
        return self.buf.raw[0] != 0

    def attach(self, ctx) -> None:
        C.llama_set_abort_callback(ctx, self.callback, self.data)


def new_context(
    model: LlamaModel,
    *,
    n_ctx: int,
    n_seq: int = 1,
    n_batch: int = 512,
    n_threads: int | None = None,
    embeddings: bool = False,
    pooling: int | None = None,
    flash_attn: bool | None = None,
):
    """A llama.cpp context with `n_seq` sequences of `n_ctx // n_seq` cells each."""
    params = C.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = n_batch
    params.n_ubatch = min(n_batch, 512)
    params.n_seq_max = n_seq
    threads = n_threads or default_threads()
    params.n_threads = threads
    params.n_threads_batch = threads
    params.no_perf = True
    # every sequence gets its own part of the cache: a request's room does not depend on others
    params.kv_unified = False
    if flash_attn is not None:
        params.flash_attn_type = 1 if flash_attn else 0
    if embeddings:
        params.embeddings = True
        params.pooling_type = C.LLAMA_POOLING_TYPE_MEAN if pooling is None else pooling
    _recent_errors.clear()
    ctx = C.llama_init_from_model(model.ptr, params)
    if not ctx:
        raise LlmdeskError(
            f"{model.path.name}: could not create a context of {n_ctx} tokens "
            f"({last_error() or 'out of memory?'}); try a smaller --ctx"
        )
    return ctx
