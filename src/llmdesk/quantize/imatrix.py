"""Compute an importance matrix from calibration text, as llama.cpp's `llama-imatrix` does.

llama-imatrix is a C++ tool, not part of the library, so this is its collector ported to Python
(tools/imatrix/imatrix.cpp IMatrixCollector::collect_imatrix): the text is evaluated in chunks of
`n_ctx` tokens with an eval callback (`cb_eval` in the context params, ggml's
ggml_backend_sched_eval_callback) that sees every matrix multiplication `W @ x` of a weight
`blk.*` and adds x_j**2 to the sums of W's input column j. The file is written in llama.cpp's
GGUF imatrix format (imatrix_file.py), which `llmdesk quantize --imatrix` and llama-quantize read.

    im = compute_imatrix("model-f16.gguf", open("calibration.txt").read())
    save_imatrix(im, "imatrix.gguf")
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import LlmdeskError
from .imatrix_file import Imatrix, load_imatrix, save_imatrix  # noqa: F401  (re-exported)

# llama-imatrix skips products over fewer than 16 tokens ("why are small batches ignored?" in
# its source; presumably to keep single-token decode noise out). Same here, for bit-parity.
MIN_TOKENS = 16

GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_OP_PARAMS, GGML_MAX_NAME = 4, 10, 64, 64
GGML_TYPE_F32 = 0


class GgmlTensor(ctypes.Structure):
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


def _ggml():
    from llama_cpp._ggml import libggml

    lib = libggml
    lib.ggml_op_name.argtypes, lib.ggml_op_name.restype = [ctypes.c_int], ctypes.c_char_p
    lib.ggml_backend_buffer_is_host.argtypes, lib.ggml_backend_buffer_is_host.restype = [ctypes.c_void_p], ctypes.c_bool
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_nbytes.argtypes, lib.ggml_nbytes.restype = [ctypes.c_void_p], ctypes.c_size_t
    return lib


def _weight_name(raw: bytes) -> str:
    """imatrix.cpp filter_tensor_name: "CPU#blk.0.attn_q.weight#0" -> "blk.0.attn_q.weight"."""
    name = raw.decode("utf-8", "replace")
    if "#" in name:
        name = name.split("#")[1]
    return name


class _Collector:
    """The eval callback: per weight, sums (n_mat, n_in) of x**2 and token counts."""

    def __init__(self, include_output: bool = False):
        self.lib = _ggml()
        self.include_output = include_output
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}
        self.error: BaseException | None = None
        self.ops: dict[int, str] = {}
        self.callback = C_EVAL(self._cb)  # keep a reference while the context lives

    def _op(self, op: int) -> str:
        if op not in self.ops:
            self.ops[op] = (self.lib.ggml_op_name(op) or b"").decode()
        return self.ops[op]

    def _cb(self, t_ptr: int, ask: bool, _user: int) -> bool:
        try:
            t = GgmlTensor.from_address(t_ptr)
            op = self._op(t.op)
            if op not in ("MUL_MAT", "MUL_MAT_ID") or not t.src[0] or not t.src[1]:
                return False
            src0 = GgmlTensor.from_address(t.src[0])
            src1 = GgmlTensor.from_address(t.src[1])
            wname = _weight_name(src0.name)
            if ask:
                if op == "MUL_MAT_ID":
                    return True
                if src1.ne[1] < MIN_TOKENS or src1.type != GGML_TYPE_F32:
                    return False
                return wname.startswith("blk.") or (self.include_output and wname == "output.weight")
            x = self._activations(t.src[1], src1)  # (ne3, ne2, ne1, ne0)
            if op == "MUL_MAT_ID":
                self._collect_moe(t, src0, src1, wname, x)
            else:
                self._collect_dense(src0, wname, x)
            return True
        except BaseException as e:  # an exception must not cross into C; report it afterwards
            self.error = self.error or e
            return False

    def _activations(self, ptr: int, t: GgmlTensor) -> np.ndarray:
        if t.nb[0] != 4:
            raise LlmdeskError("imatrix: activations are not contiguous f32 rows (unsupported backend?)")
        shape = tuple(int(t.ne[i]) for i in reversed(range(4)))
        strides = tuple(int(t.nb[i]) for i in reversed(range(4)))
        span = sum((n - 1) * s for n, s in zip(shape, strides)) + 4
        if self.lib.ggml_backend_buffer_is_host(t.buffer):
            buf = (ctypes.c_char * span).from_address(t.data)
        else:  # a GPU tensor: copy it to the host first
            nbytes = self.lib.ggml_nbytes(ptr)
            buf = ctypes.create_string_buffer(nbytes)
            self.lib.ggml_backend_tensor_get(ptr, buf, 0, nbytes)
        return np.ndarray(shape, dtype=np.float32, buffer=buf, strides=strides)

    def _collect_dense(self, src0: GgmlTensor, wname: str, x: np.ndarray) -> None:
        # ggml broadcasts src0 over x's dims 2 and 3: matrix id = (i3 % ne03) * ne02 + (i2 % ne02)
        ne02, ne03 = int(src0.ne[2]), int(src0.ne[3])
        n_mat, n_in = ne02 * ne03, x.shape[3]
        sums = self.sums.setdefault(wname, np.zeros((n_mat, n_in), np.float64))
        counts = self.counts.setdefault(wname, np.zeros(1, np.int64))
        if sums.shape != (n_mat, n_in):
            raise LlmdeskError(f"imatrix: inconsistent size for {wname}")
        sq = np.square(x, dtype=np.float64).sum(axis=2)  # (ne3, ne2, ne0): summed over tokens
        for i3 in range(x.shape[0]):
            for i2 in range(x.shape[1]):
                sums[(i3 % ne03) * ne02 + (i2 % ne02)] += sq[i3, i2]
        if not np.all(np.isfinite(sums)):
            raise LlmdeskError(f"imatrix: non-finite activations in {wname}; the model or text is broken")
        counts += (x.shape[0] * x.shape[1] * x.shape[2]) // n_mat

    def _collect_moe(self, t: GgmlTensor, src0: GgmlTensor, src1: GgmlTensor, wname: str, x: np.ndarray) -> None:
        # ids (n_expert_used, n_tokens) int32 -> which expert each token's row went to;
        # src1 (cols, n_expert_used or 1, n_tokens)
        ids_t = GgmlTensor.from_address(t.src[2])
        ids = self._ids(t.src[2], ids_t)  # (n_tokens, n_ids)
        n_as, n_in = int(src0.ne[2]), x.shape[3]
        sums = self.sums.setdefault(wname, np.zeros((n_as, n_in), np.float64))
        counts = self.counts.setdefault(wname, np.zeros(n_as, np.int64))
        rows = x[0]  # (n_tokens, ne1, ne0)
        ne1 = rows.shape[1]
        for idx in range(ids.shape[1]):
            xs = rows[:, idx % ne1, :].astype(np.float64) ** 2  # (n_tokens, ne0)
            ex = ids[:, idx]
            np.add.at(sums, ex, xs)
            np.add.at(counts, ex, 1)

    def _ids(self, ptr: int, t: GgmlTensor) -> np.ndarray:
        nbytes = self.lib.ggml_nbytes(ptr)
        buf = ctypes.create_string_buffer(nbytes)
        self.lib.ggml_backend_tensor_get(ptr, buf, 0, nbytes)
        shape = (int(t.ne[1]), int(t.ne[0]))
        return np.ndarray(shape, dtype=np.int32, buffer=buf, strides=(int(t.nb[1]), int(t.nb[0]))).copy()


def _eval_callback_type():
    import llama_cpp as C

    return C.ggml_backend_sched_eval_callback


C_EVAL = None  # set on first use, so that importing this module does not load llama.cpp


def compute_imatrix(
    model_path: str | os.PathLike,
    text: str,
    *,
    n_ctx: int = 512,
    threads: int | None = None,
    include_output: bool = False,
    dataset: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Imatrix:
    """The importance matrix of the model's weights on `text`, evaluated in chunks of `n_ctx`
    tokens (llama-imatrix's default 512). Each chunk starts with BOS when the model adds one."""
    global C_EVAL
    import llama_cpp as C

    from ..formats.gguf import read_gguf
    from ..runtime.llama import LlamaModel, default_threads, init_backend, last_error

    read_gguf(model_path)
    init_backend()
    if C_EVAL is None:
        C_EVAL = _eval_callback_type()
    model = LlamaModel(model_path)
    tokens = model.tokenize(text, add_special=False)
    n_chunks = len(tokens) // (n_ctx - int(model.add_bos))
    if n_chunks < 1:
        raise LlmdeskError(
            f"the calibration text has {len(tokens)} tokens, fewer than one chunk of {n_ctx}; "
            "give a longer text or a smaller --ctx"
        )
    collector = _Collector(include_output)
    params = C.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = n_ctx
    params.n_ubatch = min(n_ctx, 512)
    params.n_seq_max = 1
    params.n_threads = params.n_threads_batch = threads or default_threads()
    params.no_perf = True
    params.cb_eval = collector.callback
    params.cb_eval_user_data = None
    ctx = C.llama_init_from_model(model.ptr, params)
    if not ctx:
        raise LlmdeskError(f"{Path(model_path).name}: could not create a context of {n_ctx} tokens ({last_error() or 'out of memory?'})")
    batch = C.llama_batch_init(n_ctx, 0, 1)
    try:
        per = n_ctx - int(model.add_bos)
        for c in range(n_chunks):
            chunk = ([model.bos] if model.add_bos else []) + tokens[c * per : (c + 1) * per]
            C.llama_memory_clear(C.llama_get_memory(ctx), True)
            batch.n_tokens = len(chunk)
            for i, tok in enumerate(chunk):
                batch.token[i] = tok
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                # every position outputs, as in llama-imatrix: else the last layer is evaluated
                # for the last token only and its weights would get no statistics
                batch.logits[i] = True
            rc = C.llama_decode(ctx, batch)
            if collector.error:
                raise collector.error
            if rc != 0:
                raise LlmdeskError(f"imatrix: llama_decode failed ({rc}): {last_error()}")
            if progress:
                progress(c + 1, n_chunks)
    finally:
        C.llama_batch_free(batch)
        C.llama_free(ctx)
        model.close()
    if not collector.sums:
        raise LlmdeskError(f"{Path(model_path).name}: no matrix multiplications were seen; is it a transformer model?")
    return Imatrix(
        entries={k: (collector.sums[k], collector.counts[k]) for k in sorted(collector.sums)},
        datasets=[dataset] if dataset else [],
        chunk_count=n_chunks,
        chunk_size=n_ctx,
    )


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
