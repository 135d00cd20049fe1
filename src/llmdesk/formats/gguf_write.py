"""What the GGUF files llmdesk writes (converted checkpoints, random-weight models) share: the
keys of a decoder-only transformer and the file type."""

from __future__ import annotations

from typing import Any

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
