"""Compute an importance matrix from calibration text, as llama.cpp's `llama-imatrix` does.

llama-imatrix is a C++ tool, not part of the library, so this is its collector ported to Python
(tools/imatrix/imatrix.cpp IMatrixCollector::collect_imatrix): the text is evaluated in chunks of
`n_ctx` tokens with an eval callback (`cb_eval` in the context params, ggml's
ggml_backend_sched_eval_callback) that sees every matrix multiplication `W @ x` of a weight
`blk.*` and adds x_j**2 to the sums of W's input column j. The file is written in llama.cpp's
GGUF imatrix format (imatrix_file.py), which `llmdesk quantize --imatrix` and llama-quantize read.
The graph's tensors are seen through runtime/llama.py (`EvalCallback`, `GraphTensor`), and the
chunks are fed through its `Batch`: this module does not touch llama.cpp itself.

    im = compute_imatrix("model-f16.gguf", open("calibration.txt").read())
    save_imatrix(im, "imatrix.gguf")
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..errors import LlmdeskError
from .imatrix_file import Imatrix, load_imatrix, save_imatrix  # noqa: F401  (re-exported)

if TYPE_CHECKING:  # pragma: no cover
    from ..runtime.llama import GraphTensor

# llama-imatrix skips products over fewer than 16 tokens ("why are small batches ignored?" in
# its source; presumably to keep single-token decode noise out). Same here, for bit-parity.
MIN_TOKENS = 16


def _weight_name(raw: bytes) -> str:
    """imatrix.cpp filter_tensor_name: "CPU#blk.0.attn_q.weight#0" -> "blk.0.attn_q.weight"."""
    name = raw.decode("utf-8", "replace")
    if "#" in name:
        name = name.split("#")[1]
    return name


class _Collector:
    """The eval callback: per weight, sums (n_mat, n_in) of x**2 and token counts."""

    def __init__(self, include_output: bool = False):
        from ..runtime.llama import EvalCallback

        self.include_output = include_output
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}
        self.error: BaseException | None = None
        self.callback = EvalCallback(self._cb)  # keep a reference while the context lives

    def _cb(self, t: GraphTensor, ask: bool) -> bool:
        try:
            op = t.op
            if op not in ("MUL_MAT", "MUL_MAT_ID"):
                return False
            src0, src1 = t.src(0), t.src(1)
            if src0 is None or src1 is None:
                return False
            wname = _weight_name(src0.name)
            if ask:
                if op == "MUL_MAT_ID":
                    return True
                if src1.ne[1] < MIN_TOKENS or not src1.is_f32:
                    return False
                return wname.startswith("blk.") or (self.include_output and wname == "output.weight")
            x = src1.array(np.float32)  # (ne3, ne2, ne1, ne0)
            if op == "MUL_MAT_ID":
                self._collect_moe(t, src0, wname, x)
            else:
                self._collect_dense(src0, wname, x)
            return True
        except BaseException as e:  # an exception must not cross into C; report it afterwards
            self.error = self.error or e
            return False

    def _collect_dense(self, src0: GraphTensor, wname: str, x: np.ndarray) -> None:
        # ggml broadcasts src0 over x's dims 2 and 3: matrix id = (i3 % ne03) * ne02 + (i2 % ne02)
        ne02, ne03 = src0.ne[2], src0.ne[3]
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

    def _collect_moe(self, t: GraphTensor, src0: GraphTensor, wname: str, x: np.ndarray) -> None:
        # ids (n_expert_used, n_tokens) int32 -> which expert each token's row went to;
        # src1 (cols, n_expert_used or 1, n_tokens)
        ids = t.src(2).array(np.int32)[0, 0].copy()  # (n_tokens, n_ids)
        n_as, n_in = src0.ne[2], x.shape[3]
        sums = self.sums.setdefault(wname, np.zeros((n_as, n_in), np.float64))
        counts = self.counts.setdefault(wname, np.zeros(n_as, np.int64))
        rows = x[0]  # (n_tokens, ne1, ne0)
        ne1 = rows.shape[1]
        for idx in range(ids.shape[1]):
            xs = rows[:, idx % ne1, :].astype(np.float64) ** 2  # (n_tokens, ne0)
            ex = ids[:, idx]
            np.add.at(sums, ex, xs)
            np.add.at(counts, ex, 1)


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
    from ..formats.gguf import read_gguf
    from ..runtime.llama import Batch, LlamaModel, clear_memory, decode, free_context, last_error, new_context

    read_gguf(model_path)
    model = LlamaModel(model_path)
    tokens = model.tokenize(text, add_special=False)
    n_chunks = len(tokens) // (n_ctx - int(model.add_bos))
    if n_chunks < 1:
        model.close()
        raise LlmdeskError(
            f"the calibration text has {len(tokens)} tokens, fewer than one chunk of {n_ctx}; "
            "give a longer text or a smaller --ctx"
        )
    collector = _Collector(include_output)
    try:
        ctx = new_context(model, n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, eval_callback=collector.callback)
    except LlmdeskError:
        model.close()
        raise
    batch = Batch(n_ctx)
    try:
        per = n_ctx - int(model.add_bos)
        for c in range(n_chunks):
            chunk = ([model.bos] if model.add_bos else []) + tokens[c * per : (c + 1) * per]
            clear_memory(ctx)
            batch.clear()
            for i, tok in enumerate(chunk):
                # every position outputs, as in llama-imatrix: else the last layer is evaluated
                # for the last token only and its weights would get no statistics
                batch.add(tok, i, 0, True)
            rc = decode(ctx, batch)
            if collector.error:
                raise collector.error
            if rc != 0:
                raise LlmdeskError(f"imatrix: llama_decode failed ({rc}): {last_error()}")
            if progress:
                progress(c + 1, n_chunks)
    finally:
        batch.free()
        free_context(ctx)
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
