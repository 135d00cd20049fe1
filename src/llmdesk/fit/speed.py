"""How fast: the bandwidth roofline for decoding and the compute roofline for prefill.

Decoding one token reads every weight once (except the token embedding, of which one row is
looked up; a tied embedding is read in full by the output projection; a mixture of experts reads
only the experts it routes to) plus the KV cache of the tokens so far. So

    decode tokens/s <= bandwidth / bytes read per token

and llama.cpp reaches a large, steady fraction of that bound (`Device.decode_efficiency`).
Prefill is a matrix multiply over the whole prompt: ~2 FLOPs per weight per token plus attention,
bounded by the device's compute.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..formats.shape import ModelShape, model_tensors
from .memory import MemoryEstimate
from .quants import tensor_type, type_bytes


def bytes_per_token(shape: ModelShape, est: MemoryEstimate, depth: int = 0, gguf_info=None) -> int:
    """Bytes read from memory to decode one token `depth` tokens into the context."""
    read = est.weights_bytes
    if gguf_info is not None and est.quant is None:
        tensors = {t.name: t.nbytes for t in gguf_info.tensors}
    else:
        tensors = {t.name: type_bytes(tensor_type(t, est.quant or "F16", shape), t.n_elements)
                   for t in model_tensors(shape)}
    if not shape.tied_embeddings:
        emb = tensors.get("token_embd.weight", 0)
        read -= emb - emb // max(shape.n_vocab, 1)  # one row of it
    if shape.n_expert and shape.n_expert_used:
        experts = sum(v for k, v in tensors.items() if "_exps." in k)
        read -= experts - experts * shape.n_expert_used // shape.n_expert
    kv_per_token = est.kv_cache_bytes / max(est.ctx * est.parallel, 1)
    return int(read + kv_per_token * depth)


def flops_per_token(shape: ModelShape, n_prompt: int = 512) -> float:
    """FLOPs to prefill one token of an `n_prompt`-token prompt: 2 per multiplied weight, plus
    attention scores and values over (on average) half the prompt."""
    matmul = 0
    for t in model_tensors(shape):
        if t.is_matrix and t.name != "token_embd.weight":
            matmul += t.n_elements * (shape.n_expert_used / shape.n_expert if t.ne2 > 1 else 1)
    if shape.tied_embeddings:
        matmul += shape.n_embd * shape.n_vocab
    attn = 2 * 2 * shape.n_layer * shape.n_embd_q * (n_prompt / 2 if shape.causal else n_prompt)
    return 2 * matmul + attn


@dataclass
class SpeedEstimate:
    decode_tokens_per_second: float
    decode_roofline_tokens_per_second: float  # the bound itself (100% of bandwidth)
    prefill_tokens_per_second: float
    bytes_per_token: int
    flops_per_token: float
    bandwidth_gbs: float
    compute_tflops: float


def estimate_speed(shape: ModelShape, est: MemoryEstimate, *, bandwidth_gbs: float, tflops: float,
                   decode_efficiency: float, prefill_efficiency: float, depth: int = 0,
                   gguf_info=None) -> SpeedEstimate:
    bpt = bytes_per_token(shape, est, depth=depth, gguf_info=gguf_info)
    fpt = flops_per_token(shape)
    roof = bandwidth_gbs * 1e9 / bpt if bpt and shape.causal else 0.0  # an encoder never decodes
    return SpeedEstimate(
        decode_tokens_per_second=roof * decode_efficiency,
        decode_roofline_tokens_per_second=roof,
        prefill_tokens_per_second=tflops * 1e12 * prefill_efficiency / fpt if fpt else 0.0,
        bytes_per_token=bpt, flops_per_token=fpt, bandwidth_gbs=bandwidth_gbs, compute_tflops=tflops,
    )


__all__ = ["bytes_per_token", "flops_per_token", "estimate_speed", "SpeedEstimate"]
