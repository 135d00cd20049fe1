"""The shape of a decoder-only transformer, and the tensors llama.cpp's converter writes for it.

One flat dataclass, shared by everything that describes a model without loading it: fit counts
its bytes (llmdesk.fit, whose presets are plain data of this type), make-model writes random
weights in it (formats/synth.py), convert reads it from config.json (formats/convert.py), and
train builds its Llama model from it (train/config.py). Sizes that follow from others are
computed in `__post_init__` (head_dim) or as properties (n_embd_q, n_embd_kv, n_gqa).

Plain Python: no numpy, gguf, torch or llama.cpp here, so anything may import it cheaply.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Tokens per sequence when nobody asks for a context size: the model's trained context, at most
# this. 4096 holds a long chat turn, and its KV cache stays small (512 MiB for an 8B Llama 3 in
# f16: 32 layers x 4096 x 1024 x 2 x 2 bytes); a model trained on 128K tokens would otherwise
# reserve 16 GiB by default. fit, the Engine and the server all use it.
DEFAULT_CTX = 4096


@dataclass(frozen=True)
class ModelShape:
    """What fixes the size of a decoder-only transformer; ggml tensor shapes follow from it.

    The defaults describe a tiny two-layer Llama (the model tests write with formats/synth.py).
    """

    name: str = "tiny-llama"
    arch: str = "llama"  # llama.cpp's architecture name: llama, qwen2, gemma, gemma2, phi3
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2  # grouped-query attention: KV heads (n_head for plain multi-head attention)
    n_ff: int = 128
    n_vocab: int = 0
    n_ctx_train: int = 2048
    head_dim: int = 0  # 0: n_embd // n_head
    tied_embeddings: bool = False
    n_expert: int = 0  # mixture of experts: experts per layer (0: dense)
    n_expert_used: int = 0
    n_swa: int = 0  # sliding-window attention: window size (0: none)
    swa_every: int = 0  # every swa_every-th layer is global, the others use the window (gemma 2: 2)
    n_merges: int = 0  # BPE merge rules of the tokenizer (0 for SentencePiece): llama.cpp keeps them in memory
    causal: bool = True  # False for an encoder (BERT): no KV cache, every token attends to every other
    source: str = ""  # where the numbers come from
    tensor_types: dict[str, str] = field(default_factory=dict, compare=False)  # from a GGUF: name -> type

    def __post_init__(self) -> None:
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.n_embd // max(self.n_head, 1))

    @property
    def n_embd_q(self) -> int:
        return self.n_head * self.head_dim

    @property
    def n_embd_kv(self) -> int:
        """Width of one layer's K (or V) per token: KV heads, not attention heads (GQA)."""
        return self.n_head_kv * self.head_dim

    @property
    def n_gqa(self) -> int:
        return self.n_head // max(self.n_head_kv, 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("tensor_types")
        return d


@dataclass
class Tensor:
    """One weight tensor in ggml order: ne0 (the row length, what a block divides) first."""

    name: str
    ne0: int
    ne1: int = 1
    ne2: int = 1  # experts

    @property
    def n_elements(self) -> int:
        return self.ne0 * self.ne1 * self.ne2

    @property
    def is_matrix(self) -> bool:
        return self.ne1 > 1


def model_tensors(shape: ModelShape) -> list[Tensor]:
    """The weight tensors llama.cpp's converter writes for `shape`, in file order (the layouts of
    convert_hf_to_gguf.py's LlamaModel, Qwen2Model, Phi3MiniModel and Gemma2Model)."""
    E, V, F, L = shape.n_embd, shape.n_vocab, shape.n_ff, shape.n_layer
    Q, KV = shape.n_embd_q, shape.n_embd_kv
    ts = [Tensor("token_embd.weight", E, V)]
    for i in range(L):
        p = f"blk.{i}."
        ts.append(Tensor(p + "attn_norm.weight", E))
        if shape.arch == "phi3":
            ts.append(Tensor(p + "attn_qkv.weight", E, Q + 2 * KV))
        else:
            ts += [Tensor(p + "attn_q.weight", E, Q), Tensor(p + "attn_k.weight", E, KV), Tensor(p + "attn_v.weight", E, KV)]
        if shape.arch == "qwen2":
            ts += [Tensor(p + "attn_q.bias", Q), Tensor(p + "attn_k.bias", KV), Tensor(p + "attn_v.bias", KV)]
        ts.append(Tensor(p + "attn_output.weight", Q, E))
        if shape.arch == "gemma2":
            ts.append(Tensor(p + "post_attention_norm.weight", E))
        ts.append(Tensor(p + "ffn_norm.weight", E))
        if shape.n_expert:
            X = shape.n_expert
            ts += [Tensor(p + "ffn_gate_inp.weight", E, X), Tensor(p + "ffn_gate_exps.weight", E, F, X),
                   Tensor(p + "ffn_down_exps.weight", F, E, X), Tensor(p + "ffn_up_exps.weight", E, F, X)]
        elif shape.arch == "phi3":
            ts += [Tensor(p + "ffn_up.weight", E, 2 * F), Tensor(p + "ffn_down.weight", F, E)]
        else:
            ts += [Tensor(p + "ffn_gate.weight", E, F), Tensor(p + "ffn_up.weight", E, F), Tensor(p + "ffn_down.weight", F, E)]
        if shape.arch == "gemma2":
            ts.append(Tensor(p + "post_ffw_norm.weight", E))
    ts.append(Tensor("output_norm.weight", E))
    if not shape.tied_embeddings:
        ts.append(Tensor("output.weight", E, V))
    return ts


def n_params(shape: ModelShape) -> int:
    """Parameters of `shape`, embeddings counted once when tied."""
    return sum(t.n_elements for t in model_tensors(shape))
