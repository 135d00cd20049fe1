"""Bytes per tensor at a llama.cpp quantization.

A "Q4_K_M" file is not 4.5 bits everywhere: llama.cpp's quantizer picks a type per tensor
(`llama_tensor_get_type` in llama.cpp's src/llama-quant.cpp). `tensor_type` ports the rules that
matter for the types listed in QUANT_TYPES, so the weights are counted tensor by tensor:

- output.weight (or the token embedding when it is tied to the output) -> Q6_K, unless the file
  type is Q8_0 or the row length is not a multiple of the type's block (then Q8_0);
- attn_v: Q4_K_M/Q5_K_M -> Q6_K on "more bits" layers (the first and last eighth, and every
  third layer between); Q3_K_M -> Q5_K on the first two, Q4_K after; Q3_K_L -> Q5_K; Q2_K -> Q4_K
  with GQA >= 4, else Q3_K; Q4_K_S -> Q5_K on the first four; 70B models bump Q3_K/Q4_K -> Q5_K;
  8-expert models -> Q8_0;
- ffn_down: the same "more bits" layers -> Q6_K for Q4_K_M/Q5_K_M; Q3_K_M -> Q5_K on the first
  sixteenth, Q4_K after; Q3_K_L -> Q5_K; Q2_K -> Q3_K; Q4_K_S -> Q5_K on the first eighth;
- attn_output: Q3_K_M -> Q4_K, Q3_K_L -> Q5_K, Q2_K -> Q3_K; 8-expert models -> Q5_K;
- attn_qkv (fused, Phi-3): as attn_v (llama.cpp's tensor categories put it with attn_v, ahead of
  its own, unreachable, qkv rule);
- a row length that is not a multiple of 256 cannot hold a k-quant: Q4_K -> Q5_0, Q5_K -> Q5_1,
  Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0, IQ4_XS -> IQ4_NL (then F16 if even that does not divide);
- 1-D tensors (norms, biases) and the MoE router stay F32.
"""

from __future__ import annotations

import difflib

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import LlmdeskError
from ..formats.shape import ModelShape, Tensor, model_tensors

# ggml types: name -> (elements per block, bytes per block), ggml's type traits as the gguf
# package (llama.cpp's own) carries them
GGML_BLOCK: dict[str, tuple[int, int]] = {t.name: GGML_QUANT_SIZES[t] for t in GGMLQuantizationType
                                          if t in GGML_QUANT_SIZES}

# llama.cpp file types (what `--quant` / `--type` take) -> the type most tensors get
QUANT_TYPES: dict[str, str] = {
    "F32": "F32", "F16": "F16", "BF16": "BF16",
    "Q8_0": "Q8_0", "Q6_K": "Q6_K",
    "Q5_K_M": "Q5_K", "Q5_K_S": "Q5_K", "Q5_1": "Q5_1", "Q5_0": "Q5_0",
    "Q4_K_M": "Q4_K", "Q4_K_S": "Q4_K", "Q4_1": "Q4_1", "Q4_0": "Q4_0",
    "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS",
    "Q3_K_L": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_S": "Q3_K",
    "Q2_K": "Q2_K",
}

# KV cache types (`--kv-type`, the cache types llama.cpp accepts): bytes per element
KV_TYPES: dict[str, float] = {k: GGML_BLOCK[k.upper()][1] / GGML_BLOCK[k.upper()][0]
                              for k in ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl")}

# the fallbacks of the llama.cpp in llama-cpp-python 0.3.36 (checked against its quantizer in
# tests/test_make_model.py; older llama.cpp sent Q2_K/Q3_K to IQ4_NL)
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "Q2_K": "Q4_0", "Q3_K": "Q4_0", "IQ4_XS": "IQ4_NL"}


class UnknownQuant(LlmdeskError):
    pass


def normalize_quant(name: str) -> str:
    """'q4_k_m' -> 'Q4_K_M'; an unknown name is one line listing the valid ones."""
    key = name.strip().upper().replace("-", "_")
    if key in QUANT_TYPES:
        return key
    close = difflib.get_close_matches(key, list(QUANT_TYPES), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(c.lower() for c in close)}?)" if close else ""
    raise UnknownQuant(f"unknown quantization type '{name}'{hint}; valid types: "
                       f"{', '.join(q.lower() for q in QUANT_TYPES)}")


def normalize_kv(name: str) -> str:
    key = name.strip().lower()
    if key not in KV_TYPES:
        raise UnknownQuant(f"unknown KV cache type '{name}'; valid types: {', '.join(KV_TYPES)}")
    return key


def type_bytes(type_name: str, n_elements: int) -> int:
    blck, size = GGML_BLOCK[type_name]
    return n_elements // blck * size


def _more_bits(i: int, n: int) -> bool:
    # llama-quant.cpp's use_more_bits: the first and last eighth, and every third layer between
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _layer(name: str) -> int:
    return int(name.split(".")[1]) if name.startswith("blk.") else 0


def tensor_type(t: Tensor, ftype: str, shape: ModelShape) -> str:
    """The type llama.cpp's quantizer gives tensor `t` for file type `ftype` (see the module doc)."""
    base = QUANT_TYPES[ftype]
    name = t.name
    if not name.endswith("weight") or not t.is_matrix or "_norm.weight" in name or "ffn_gate_inp" in name:
        return "F32"
    if base in ("F32", "F16", "BF16"):
        return base
    n_layer = shape.n_layer
    i = _layer(name)
    new = base
    is_output = name == "output.weight" or (shape.tied_embeddings and name == "token_embd.weight")
    if is_output:
        new = "Q8_0" if t.ne0 % GGML_BLOCK[base][0] != 0 or base == "Q8_0" else "Q6_K"
    elif name == "token_embd.weight":
        pass
    elif "attn_v.weight" in name or "attn_qkv.weight" in name:  # llama.cpp counts a fused qkv as a v
        if ftype == "Q2_K":
            new = "Q4_K" if shape.n_gqa >= 4 else "Q3_K"
        elif ftype == "IQ4_NL" or ftype == "IQ4_XS":
            new = "Q5_K" if shape.n_gqa >= 4 else new
        elif ftype == "Q3_K_M":
            new = "Q5_K" if i < 2 else "Q4_K"
        elif ftype == "Q3_K_L":
            new = "Q5_K"
        elif ftype in ("Q4_K_M", "Q5_K_M") and _more_bits(i, n_layer):
            new = "Q6_K"
        elif ftype == "Q4_K_S" and i < 4:
            new = "Q5_K"
        if shape.arch == "llama" and n_layer == 80 and new in ("Q3_K", "Q4_K"):  # llama.cpp's LLM_TYPE_70B
            new = "Q5_K"
        if shape.n_expert == 8:
            new = "Q8_0"
    elif "attn_k.weight" in name:
        if shape.n_expert == 8:
            new = "Q8_0"
    elif "ffn_down" in name:
        if ftype == "Q2_K":
            new = "Q3_K"
        elif ftype == "Q3_K_M":
            new = "Q5_K" if i < n_layer // 16 else "Q4_K"
        elif ftype == "Q3_K_L":
            new = "Q5_K"
        elif ftype in ("Q4_K_M", "Q5_K_M") and _more_bits(i, n_layer):
            new = "Q6_K"
        elif ftype in ("IQ4_NL", "IQ4_XS") and i < n_layer // 8:
            new = "Q5_K"
        elif ftype == "Q4_K_S" and i < n_layer // 8:
            new = "Q5_K"
    elif "attn_output.weight" in name:
        if shape.n_expert == 8:
            if ftype in ("Q2_K", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ4_XS"):
                new = "Q5_K"
        else:
            new = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(ftype, new)
    if t.ne0 % GGML_BLOCK[new][0] != 0:
        new = _FALLBACK.get(new, "F16")
        if t.ne0 % GGML_BLOCK[new][0] != 0:
            new = "F16"
    return new


def weights_by_type(shape: ModelShape, ftype: str | None) -> dict[str, int]:
    """Bytes of weights per ggml type. With ftype None, a GGUF shape's own tensor types."""
    out: dict[str, int] = {}
    for t in model_tensors(shape):
        if ftype is None and shape.tensor_types:
            ty = shape.tensor_types.get(t.name) or ("F32" if not t.is_matrix else "F16")
        else:
            ty = tensor_type(t, ftype or "F16", shape)
        out[ty] = out.get(ty, 0) + type_bytes(ty, t.n_elements)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))
