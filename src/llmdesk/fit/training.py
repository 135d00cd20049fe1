"""Training memory: full fine-tuning, LoRA and QLoRA with AdamW, on one device.

    full   weights bf16 (2 B) + fp32 master copy (4 B) + gradients bf16 (2 B) + Adam moments fp32
           (8 B) = 16 bytes per parameter (mixed-precision AdamW, as in the ZeRO paper's "16 Psi")
    lora   frozen weights bf16 (2 B/param) + adapters (rank r on q, k, v, o, gate, up, down:
           r x (in + out) each) trained in fp32 with AdamW: 16 B per adapter parameter
    qlora  frozen weights in NF4 (0.5 B/param + block constants, 0.127 bits/param with double
           quantization: Dettmers et al. 2023) except the embeddings and output head (bf16),
           plus LoRA adapters as above

Activations (bf16) per layer and token, after Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models") with a SwiGLU MLP and a memory-efficient attention
kernel (no s x s score matrix): 17 x n_embd + 6 x n_ff bytes. With gradient checkpointing (the
default in llmdesk's trainer and most fine-tuning recipes) only each layer's input (2 x n_embd)
is kept, plus one layer recomputed at a time. The logits are counted separately: seq x vocab in
fp32, twice (values and gradients), which dominates for 128k-256k vocabularies.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import LlmdeskError
from ..formats.shape import ModelShape, model_tensors

LORA_TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "attn_qkv", "ffn_gate", "ffn_up", "ffn_down")
CUDA_OVERHEAD_BYTES = 1 << 30  # CUDA context, cuBLAS workspaces, allocator slack (typical ~1 GB)


@dataclass
class TrainEstimate:
    method: str
    seq_len: int
    batch: int
    lora_rank: int
    checkpointing: bool
    n_params: int
    trainable_params: int
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    logits_bytes: int
    overhead_bytes: int

    @property
    def total_bytes(self) -> int:
        return (self.weights_bytes + self.gradients_bytes + self.optimizer_bytes + self.activations_bytes
                + self.logits_bytes + self.overhead_bytes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_bytes"] = self.total_bytes
        return d


def lora_params(shape: ModelShape, rank: int) -> int:
    n = 0
    for t in model_tensors(shape):
        if any(f".{target}." in t.name for target in LORA_TARGETS) and t.is_matrix:
            n += rank * (t.ne0 + t.ne1) * t.ne2
    return n


def estimate_training(shape: ModelShape, method: str = "lora", *, seq_len: int = 2048, batch: int = 1,
                      lora_rank: int = 16, checkpointing: bool = True) -> TrainEstimate:
    if method not in ("full", "lora", "qlora"):
        raise LlmdeskError(f"--train must be full, lora or qlora, got '{method}'")
    if seq_len < 1 or batch < 1:
        raise LlmdeskError("--seq-len and --batch must be at least 1")
    tensors = model_tensors(shape)
    n_params = sum(t.n_elements for t in tensors)
    emb = sum(t.n_elements for t in tensors if t.name in ("token_embd.weight", "output.weight"))
    if method == "full":
        trainable = n_params
        weights = 2 * n_params + 4 * n_params  # bf16 working copy + fp32 master
        grads = 2 * n_params
        optim = 8 * n_params
    else:
        trainable = lora_params(shape, lora_rank)
        if method == "lora":
            frozen = 2 * n_params
        else:
            frozen = int((n_params - emb) * (4 + 0.127) / 8) + 2 * emb
        weights = frozen + 4 * trainable
        grads = 4 * trainable
        optim = 8 * trainable
    tokens = seq_len * batch
    per_layer = tokens * (17 * shape.n_embd + 6 * shape.n_ff * max(shape.n_expert_used, 1))
    if checkpointing:
        acts = shape.n_layer * tokens * 2 * shape.n_embd + per_layer
    else:
        acts = shape.n_layer * per_layer
    logits = tokens * shape.n_vocab * 4 * 2
    return TrainEstimate(method, seq_len, batch, lora_rank, checkpointing, n_params, trainable, weights, grads,
                         optim, acts, logits, CUDA_OVERHEAD_BYTES)
