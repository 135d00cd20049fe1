"""What the GGUF files llmdesk writes (converted checkpoints, random-weight models) share: the
keys of a decoder-only transformer and the file type."""

from __future__ import annotations

from typing import Any

import numpy as np

FILE_TYPES = ("f32", "f16", "bf16", "q8_0")


def file_type(name: str) -> Any:
    """gguf.LlamaFileType of an output type name (one of FILE_TYPES)."""
    import gguf

    t = gguf.LlamaFileType
    return {"f32": t.ALL_F32, "f16": t.MOSTLY_F16, "bf16": t.MOSTLY_BF16, "q8_0": t.MOSTLY_Q8_0}[name]


def add_transformer_keys(w: Any, *, n_ctx: int, n_embd: int, n_layer: int, n_ff: int, n_head: int,
                         n_head_kv: int, head_dim: int, n_rot: int, rms_eps: float, rope_theta: float,
                         n_vocab: int) -> None:
    """The architecture keys llama.cpp reads for every decoder-only model (`w`: a gguf.GGUFWriter)."""
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(rms_eps)
    w.add_rope_freq_base(rope_theta)
    w.add_vocab_size(n_vocab)
    if head_dim != n_embd // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_dimension_count(n_rot)


def tensor_layout(name: str, shape: tuple[int, ...], out_type: str) -> tuple[np.dtype, tuple[int, ...], Any]:
    """(numpy dtype written, its shape, raw ggml type or None) of tensor `name` (numpy `shape`) in
    `out_type`. 1-D tensors (norms, biases, factors) and a mixture of experts' router stay f32, as
    llama.cpp's converter keeps them; q8_0 falls back to f16 for rows that are not a multiple of its
    32-value blocks."""
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) < 2 or out_type == "f32" or "ffn_gate_inp" in name:
        return np.dtype(np.float32), shape, None
    if out_type == "f16" or (out_type == "q8_0" and shape[-1] % 32):
        return np.dtype(np.float16), shape, None
    raw = T.BF16 if out_type == "bf16" else T.Q8_0
    return np.dtype(np.uint8), tuple(gguf.quant_shape_to_byte_shape(shape, raw)), raw


def add_tensor_info(w: Any, name: str, shape: tuple[int, ...], out_type: str) -> None:
    """Declare tensor `name` in the header, for its data to be written later (`encode`)."""
    dt, stored, raw = tensor_layout(name, shape, out_type)
    # numpy shapes are (out, in); the writer stores them as ggml's (in, out)
    w.add_tensor_info(name, stored, dt, int(np.prod(stored)) * dt.itemsize, raw_dtype=raw)


def encode(name: str, data: np.ndarray, out_type: str) -> np.ndarray:
    """`data` (float32) as tensor `name` is stored in `out_type`."""
    import gguf

    dt, _shape, raw = tensor_layout(name, tuple(data.shape), out_type)
    if raw is not None:
        return gguf.quants.quantize(data, raw)
    return data.astype(dt, copy=False)
