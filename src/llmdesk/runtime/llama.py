"""The thin layer over llama.cpp's C API (through llama-cpp-python's ctypes bindings).

Only runtime/ touches `llama_cpp`, and in it only this module and engine.py. This module owns:
backend start-up, llama.cpp's log (routed into Python logging, the last errors kept so a failed
load can say why), loading a model, its vocabulary (tokenize, token -> bytes), creating contexts,
the one `Batch` every `llama_decode` in llmdesk is filled through, and the view of llama.cpp's
compute graph that an eval callback gets (`GraphTensor`, for importance matrices).
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import re
import threading
from pathlib import Path
from typing import Callable

# A llama.cpp built against Intel MKL (`make mkl`) runs MKL's threads on the GNU OpenMP runtime
# that ggml's own threads use: one runtime in the process, not two competing for the cores.
os.environ.setdefault("MKL_THREADING_LAYER", "GNU")

import llama_cpp as C  # noqa: E402
import numpy as np  # noqa: E402

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


def blas() -> str | None:
    """The BLAS library llama.cpp's prompt processing uses ("MKL", "OpenBLAS", ...), None for
    ggml's own matrix products (the default build; `make mkl` builds one on MKL)."""
    lib = Path(C.__file__).parent / "lib" / "libggml-blas.so"
    if not lib.is_file():
        return None
    data = lib.read_bytes()
    for needle, name in ((b"libmkl_rt", "MKL"), (b"libopenblas", "OpenBLAS"), (b"libblis", "BLIS")):
        if needle in data:
            return name
    return "BLAS"


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
        self.arch = self.meta("general.architecture") or ""
        self._piece_cache: dict[int, bytes] = {}
        self.adapters: list[LoraAdapter] = []  # loaded for this model: llama.cpp frees them with it

    def close(self) -> None:
        if getattr(self, "ptr", None):
            for a in self.adapters:  # llama_model_free frees the adapters still loaded
                a.ptr = None
            self.adapters.clear()
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

    @property
    def pooling(self) -> str:
        """How the model pools token states into one embedding: "mean", "cls", "last" or "rank",
        from the GGUF key `{arch}.pooling_type` (llama.cpp's enum llama_pooling_type). A model
        without the key, or with "none" (decoder models), pools by the mean."""
        value = self.meta(f"{self.arch}.pooling_type")
        try:
            code = int(value) if value is not None else C.LLAMA_POOLING_TYPE_MEAN
        except ValueError:
            code = C.LLAMA_POOLING_TYPE_MEAN
        name = POOLING_NAMES.get(code, "mean")
        return "mean" if name == "none" else name

    @property
    def causal(self) -> bool:
        """Whether attention is causal (`{arch}.attention.causal`; false for BERT-style encoders)."""
        value = self.meta(f"{self.arch}.attention.causal")
        return value is None or value.strip().lower() not in ("false", "0")

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


# ---------------------------------------------------------------------------------------------
# LoRA adapters


class LoraAdapter:
    """A llama.cpp LoRA GGUF loaded for one model (llama_adapter_lora_init): its A/B tensors in
    memory beside the model's weights, applied to a context by `set_adapters`. Free it (`close`)
    only once no context uses it; llama.cpp frees what is left with the model."""

    def __init__(self, model: LlamaModel, path: str | os.PathLike):
        init_backend()
        self.path = Path(path)
        self.model = model
        if not self.path.is_file():
            raise LlmdeskError(f"{self.path}: no such LoRA adapter file")
        from ..formats.gguf import read_gguf  # our own validation first, as for models

        info = read_gguf(self.path)
        if info.get("general.type") != "adapter" or info.get("adapter.type") != "lora":
            raise LlmdeskError(f"{self.path}: not a LoRA adapter (a {info.get('general.type') or 'model'} file); "
                               "make one from a PEFT adapter with 'llmdesk convert --lora ADAPTER_DIR --base BASE'")
        if info.architecture != model.arch:
            raise LlmdeskError(f"{self.path}: a LoRA adapter for {info.architecture!r} models, but {model.path.name} "
                               f"is {model.arch!r}: it was made for another base model")
        _recent_errors.clear()
        ptr = C.llama_adapter_lora_init(model.ptr, str(self.path).encode())
        if not ptr:
            why = re.sub(r"^\w+: failed to apply lora adapter: ", "", last_error())
            raise LlmdeskError(f"{self.path}: llama.cpp refused it as a LoRA adapter for {model.path.name}: "
                               f"{why or 'not a LoRA GGUF'}")
        self.ptr = ptr
        model.adapters.append(self)
        self.alpha = float(self.meta("adapter.lora.alpha") or 0.0)

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1024)
        n = C.llama_adapter_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return None if n < 0 else buf.value.decode("utf-8", "replace")

    def close(self) -> None:
        if self.ptr:
            C.llama_adapter_lora_free(self.ptr)
            self.ptr = None
            self.model.adapters.remove(self)


def set_adapters(ctx, adapters: list[tuple[LoraAdapter, float]]) -> None:
    """Apply these adapters at these scales to every sequence of `ctx` (llama_set_adapters_lora:
    a context has one adapter set; an empty list clears it). llama.cpp adds
    scale * alpha / rank * B(A x) to each adapted matmul."""
    n = len(adapters)
    ptrs = (C.llama_adapter_lora_p_ctypes * n)(*(a.ptr for a, _ in adapters)) if n else None
    scales = (ctypes.c_float * n)(*(float(s) for _, s in adapters)) if n else None
    rc = C.llama_set_adapters_lora(ctx, ptrs, n, scales)
    if rc != 0:
        raise LlmdeskError(f"llama.cpp could not apply the LoRA adapters ({last_error() or f'error {rc}'})")


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


# llama.cpp's enum llama_pooling_type, by name
POOLING_TYPES = {"none": C.LLAMA_POOLING_TYPE_NONE, "mean": C.LLAMA_POOLING_TYPE_MEAN,
                 "cls": C.LLAMA_POOLING_TYPE_CLS, "last": C.LLAMA_POOLING_TYPE_LAST,
                 "rank": C.LLAMA_POOLING_TYPE_RANK}
POOLING_NAMES = {v: k for k, v in POOLING_TYPES.items()}

# KV cache element types (llama.cpp's -ctk/-ctv); f16 is llama.cpp's default
CACHE_TYPES = {"f16": C.GGML_TYPE_F16, "f32": C.GGML_TYPE_F32}


def new_context(
    model: LlamaModel,
    *,
    n_ctx: int,
    n_seq: int = 1,
    n_batch: int = 512,
    n_ubatch: int | None = None,
    n_threads: int | None = None,
    embeddings: bool = False,
    pooling: str | None = None,
    flash_attn: bool | None = None,
    unified: bool = False,
    cache_type: str = "f16",
    eval_callback: "EvalCallback | None" = None,
):
    """A llama.cpp context with `n_seq` sequences of `n_ctx // n_seq` cells each (`unified`: all
    sequences share `n_ctx` cells). `n_ubatch` (default min(n_batch, 512)) is how many tokens
    one compute graph takes; `pooling` ("mean", "cls", "last") applies to `embeddings` contexts;
    `eval_callback` sees every tensor of the graph (llama.cpp's cb_eval)."""
    if cache_type not in CACHE_TYPES:
        raise LlmdeskError(f"the KV cache type must be one of {', '.join(CACHE_TYPES)}, not {cache_type!r}")
    params = C.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = n_batch
    params.n_ubatch = n_ubatch or min(n_batch, 512)
    params.n_seq_max = n_seq
    threads = n_threads or default_threads()
    params.n_threads = threads
    params.n_threads_batch = threads
    params.no_perf = True
    # every sequence gets its own part of the cache: a request's room does not depend on others
    params.kv_unified = unified
    params.type_k = params.type_v = CACHE_TYPES[cache_type]
    if flash_attn is not None:
        params.flash_attn_type = 1 if flash_attn else 0
    if embeddings:
        params.embeddings = True
        params.pooling_type = POOLING_TYPES[pooling or "mean"]
    if eval_callback is not None:
        params.cb_eval = eval_callback.c_callback
        params.cb_eval_user_data = None
    _recent_errors.clear()
    ctx = C.llama_init_from_model(model.ptr, params)
    if not ctx:
        raise LlmdeskError(
            f"{model.path.name}: could not create a context of {n_ctx} tokens "
            f"({last_error() or 'out of memory?'}); try a smaller --ctx"
        )
    return ctx


def free_context(ctx) -> None:
    C.llama_free(ctx)


def clear_memory(ctx) -> None:
    """Forget every sequence's KV cells (and their data)."""
    C.llama_memory_clear(C.llama_get_memory(ctx), True)


def pooling_of(ctx) -> str:
    """The pooling an embeddings context applies (llama_pooling_type)."""
    return POOLING_NAMES.get(C.llama_pooling_type(ctx), "none")


# ---------------------------------------------------------------------------------------------
# batches: the one place llmdesk fills a llama_batch


class Batch:
    """A llama_batch of up to `capacity` tokens, each in one sequence. The Engine's steps, its
    scoring and embeddings, and the importance-matrix pass all fill their batches through `add`.

        b = Batch(512)
        b.add(token, pos, seq, output=True)   # -> the token's index in the batch
        decode(ctx, b)                         # llama_decode; 0 ok, 1 no KV room, 2 aborted
        logits = output_logits(ctx, b, n_vocab)  # (b.n_outputs, n_vocab), in the order added
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.raw = C.llama_batch_init(capacity, 0, 1)
        self.n = 0  # tokens added
        self.n_outputs = 0  # of those, the ones whose logits (or embeddings) are wanted

    def add(self, token: int, pos: int, seq: int, output: bool) -> int:
        i = self.n
        if i >= self.capacity:
            raise IndexError(f"the batch holds {self.capacity} tokens")
        b = self.raw
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = output
        self.n = i + 1
        self.n_outputs += bool(output)
        return i

    def clear(self) -> None:
        self.n = 0
        self.n_outputs = 0

    def __len__(self) -> int:
        return self.n

    def free(self) -> None:
        if self.raw is not None:
            C.llama_batch_free(self.raw)
            self.raw = None


def decode(ctx, batch: Batch) -> int:
    """llama_decode of what was added to `batch`: 0 done, 1 no room in the KV cache, 2 aborted
    (the context's abort callback said so), other values errors."""
    batch.raw.n_tokens = batch.n
    return C.llama_decode(ctx, batch.raw)


def output_logits(ctx, batch: Batch, n_vocab: int) -> np.ndarray:
    """(batch.n_outputs, n_vocab) float32: a view of the last decode's logits, one row per token
    added with output=True, in the order they were added (llama.h: llama_get_logits). Valid
    until the next decode: copy what must outlive it."""
    ptr = C.llama_get_logits(ctx)
    return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(batch.n_outputs, n_vocab))


def sequence_embedding(ctx, seq: int, n_embd: int) -> np.ndarray | None:
    """(n_embd,) float64: the pooled embedding of sequence `seq` after the last decode, or None."""
    ptr = C.llama_get_embeddings_seq(ctx, seq)
    if not ptr:
        return None
    return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_embd,)).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# the compute graph, as an eval callback sees it (for importance matrices)

GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_OP_PARAMS, GGML_MAX_NAME = 4, 10, 64, 64
GGML_TYPE_F32 = 0


class _GgmlTensor(ctypes.Structure):
    """ggml.h `struct ggml_tensor` (the fields are read, never written)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),  # elements per dimension, ne[0] contiguous
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),  # strides in bytes
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


_ggml_lib = None
_op_names: dict[int, str] = {}


def _ggml():
    global _ggml_lib
    if _ggml_lib is None:
        from llama_cpp._ggml import libggml as lib

        lib.ggml_op_name.argtypes, lib.ggml_op_name.restype = [ctypes.c_int], ctypes.c_char_p
        lib.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_buffer_is_host.restype = ctypes.c_bool
        lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        lib.ggml_backend_tensor_get.restype = None
        lib.ggml_nbytes.argtypes, lib.ggml_nbytes.restype = [ctypes.c_void_p], ctypes.c_size_t
        _ggml_lib = lib
    return _ggml_lib


class GraphTensor:
    """One tensor of llama.cpp's compute graph, as the eval callback hands it over: its op
    ("MUL_MAT", ...), name, type, shape, sources, and (once computed) its data."""

    __slots__ = ("ptr", "t")

    def __init__(self, ptr: int):
        self.ptr = ptr
        self.t = _GgmlTensor.from_address(ptr)

    @property
    def op(self) -> str:
        code = self.t.op
        name = _op_names.get(code)
        if name is None:
            name = _op_names[code] = (_ggml().ggml_op_name(code) or b"").decode()
        return name

    @property
    def name(self) -> bytes:
        return self.t.name

    @property
    def is_f32(self) -> bool:
        return self.t.type == GGML_TYPE_F32

    @property
    def ne(self) -> tuple[int, int, int, int]:
        """Elements per dimension, ggml's order (ne[0] is the contiguous one)."""
        return tuple(int(n) for n in self.t.ne)

    def src(self, i: int) -> "GraphTensor | None":
        p = self.t.src[i]
        return GraphTensor(p) if p else None

    def array(self, dtype=np.float32) -> np.ndarray:
        """The data as (ne3, ne2, ne1, ne0) with the tensor's strides: a view of host memory, or
        a copy from a GPU buffer. Valid only inside the callback."""
        t = self.t
        item = np.dtype(dtype).itemsize
        if t.nb[0] != item:
            raise LlmdeskError("a graph tensor's rows are not contiguous (unsupported backend?)")
        shape = tuple(int(t.ne[i]) for i in reversed(range(4)))
        strides = tuple(int(t.nb[i]) for i in reversed(range(4)))
        lib = _ggml()
        if lib.ggml_backend_buffer_is_host(t.buffer):
            span = sum((n - 1) * s for n, s in zip(shape, strides)) + item
            buf = (ctypes.c_char * span).from_address(t.data)
        else:  # a GPU tensor: copy it to the host first
            nbytes = lib.ggml_nbytes(self.ptr)
            buf = ctypes.create_string_buffer(nbytes)
            lib.ggml_backend_tensor_get(self.ptr, buf, 0, nbytes)
        return np.ndarray(shape, dtype=dtype, buffer=buf, strides=strides)


class EvalCallback:
    """llama.cpp's eval callback (ggml_backend_sched_eval_callback) around `fn(tensor, ask)`:
    asked first for each graph node (`ask` True: return whether its data is wanted), then called
    again with the computed tensor (`ask` False: return True to go on). `fn` must not raise."""

    def __init__(self, fn: Callable[[GraphTensor, bool], bool]):
        init_backend()
        self.fn = fn
        self.c_callback = C.ggml_backend_sched_eval_callback(lambda ptr, ask, _user: fn(GraphTensor(ptr), ask))
