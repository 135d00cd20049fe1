"""Training memory: the peak of `llmdesk tune` (full, LoRA, QLoRA with AdamW), on this CPU and on a GPU.

What tune holds is what this counts (train/tune.py; checked against its measured peak RSS by
benchmarks/fit_train_vs_tune.py, docs/fit.md has the table):

  on a CPU, tune trains in fp32 (4 bytes for every weight, gradient, optimizer state and
  activation) and the estimate is the whole process's peak resident memory, the interpreter
  and torch included (what `ru_maxrss` reports and tune's `peak_rss_bytes` is);
  on a CUDA GPU, LoRA loads the base in bf16 (its adapters stay fp32, as peft keeps them), QLoRA
  in NF4 with gradient checkpointing (peft's `prepare_model_for_kbit_training`), and full
  fine-tuning in fp32; the estimate is the device memory, with a CUDA context allowance.

The peak is the largest of three moments (not the sum of every part):

  loading   the fp32 weights, plus the checkpoint's pages while transformers reads them from
            the mapped safetensors file (bf16, 2 bytes per parameter, as models are published);
  logits    the backward pass through the loss, with every layer's activations still held:
            weights, optimizer states, activations, and three (tokens x vocabulary) fp32 arrays
            (log-softmax's output, kept by the loss; the loss's gradient; the logits' gradient).
            A 150k vocabulary makes these the largest part at any sequence length;
  optimizer full fine-tuning's AdamW step: weights, gradients and the two moments (16 bytes per
            parameter) plus two temporaries the size of the largest tensor (the square root of
            the second moment and the denominator; torch's single-tensor AdamW on a CPU).

Activations are the tensors autograd keeps for the backward pass, listed per layer and token
(transformers' Llama/Qwen2 layers with SDPA attention, which keeps no seq x seq matrix):

  both      SDPA's query, key, value and output, and its log-sum-exp per head:
            2 n_embd_q + 2 n_embd_kv + n_head; the MLP's gate output g, SiLU(g) and up output
            (3 n_ff)
  full      each RMSNorm's input, its normalized value (for the norm's weight gradient) and its
            output (the next matmul's input, for the weight gradient): 2 x 3 n_embd; the down
            projection's input (n_ff)
  lora      each RMSNorm's input (2 n_embd); the frozen matmuls keep nothing; every adapted linear
            (q, k, v, o, gate, up, down: tune's "all-linear") keeps its dropout's output and its
            dropout mask (both fp32 on a CPU): 2 (5 n_embd + n_embd_q + n_ff), and its rank-r
            down-projection (7 r). The first layer's input needs no gradient (the embeddings are
            frozen): its input norm and the q, k, v dropout masks are not kept (4 n_embd once).
  after     the last norm (full: 3 n_embd, lora: n_embd); RoPE's cos and sin (2 head_dim).

These counts were read off autograd's graph (each node's saved tensors) for transformers 5 and
torch 2.13, and equal the bytes saved-tensor hooks see. On a CPU the process holds more than the
live tensors: glibc's heap keeps the holes the forward pass's freed temporaries leave between
the kept activations (`HEAP_SLACK`, the one fitted number), and the process itself (Python,
torch, transformers, peft, the tokenizer, the loss plot at the end: `PROCESS_BYTES`, measured).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import LlmdeskError
from ..formats.shape import ModelShape, model_tensors

# what tune's "all-linear" adapts (llama.cpp's tensor names: fused qkv and gate+up count once)
LORA_TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "attn_qkv", "ffn_gate", "ffn_up", "ffn_down")
# tune's defaults (train/tune.py TuneConfig), so that `fit --train lora` estimates `tune`'s run
DEFAULT_SEQ_LEN = 1024
DEFAULT_BATCH = 4
DEFAULT_RANK = 16
# The process without the model: the peak RSS of a whole tune run of a 0.1M-parameter model on
# 16-token rows (Python, torch, transformers, peft, the tokenizer and data, one step's runtime,
# saving and the loss plot), measured: torch 2.13 CPU build, Linux x86-64
PROCESS_BYTES = 440 << 20
CHECKPOINT_BYTES_PER_PARAM = 2  # bf16/fp16 safetensors, mapped while loading
CUDA_OVERHEAD_BYTES = 1 << 30  # CUDA context, cuBLAS workspaces, allocator slack (typical ~1 GB)
# glibc's heap keeps the holes that the forward pass's freed temporaries leave between the kept
# activations (tensors under its 32 MiB mmap threshold; larger ones, like the logits, are mapped
# and returned), so the process holds nearly as much again as the activations: fitted (docs/fit.md)
HEAP_SLACK = 0.9


@dataclass
class TrainEstimate:
    method: str
    device: str  # "cpu" (fp32, what tune does without a GPU) | "cuda"
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
    slack_bytes: int  # the heap's holes beside the activations (CPU)
    overhead_bytes: int  # the Python process with torch (CPU) or the CUDA context (GPU)
    total_bytes: int  # the peak: the largest of the moments below, not the sum of the parts
    peak_at: str  # "loading", "logits" or "optimizer"
    gpu: "TrainEstimate | None" = None  # the same run on a CUDA GPU (with the CPU estimate)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lora_params(shape: ModelShape, rank: int) -> int:
    n = 0
    for t in model_tensors(shape):
        if any(f".{target}." in t.name for target in LORA_TARGETS) and t.is_matrix:
            n += rank * (t.ne0 + t.ne1) * t.ne2
    return n


def _layer_values(shape: ModelShape, method: str, rank: int) -> tuple[int, int]:
    """Values autograd keeps per token and layer: (on the model's own path, on the LoRA path)."""
    d, dq, dkv, nh = shape.n_embd, shape.n_embd_q, shape.n_embd_kv, shape.n_head
    ff = shape.n_ff * max(shape.n_expert_used, 1)
    attn = 2 * dq + 2 * dkv + nh  # SDPA: q, k, v, output, log-sum-exp
    if method == "full":
        return 6 * d + attn + 4 * ff, 0  # 2 norms x (input, normalized, output); g, SiLU(g), up, down's input
    return 2 * d + attn + 3 * ff, 2 * (5 * d + dq + ff) + 7 * rank  # norm inputs; dropout output + mask, A x


def estimate_training(shape: ModelShape, method: str = "lora", *, seq_len: int = DEFAULT_SEQ_LEN,
                      batch: int = DEFAULT_BATCH, lora_rank: int = DEFAULT_RANK) -> TrainEstimate:
    """The peak memory of `llmdesk tune --method METHOD --seq-len N --batch B --rank R` (all-linear
    targets, LoRA dropout on, no gradient checkpointing except QLoRA's): on this CPU in fp32, with
    the same run on a CUDA GPU as `.gpu`. QLoRA runs only on CUDA: its estimate is the GPU's."""
    if method not in ("full", "lora", "qlora"):
        raise LlmdeskError(f"--train must be full, lora or qlora, got '{method}'")
    if seq_len < 1 or batch < 1 or lora_rank < 1:
        raise LlmdeskError("--seq-len, --batch and --rank must be at least 1")
    if method == "qlora":
        return _estimate(shape, method, "cuda", seq_len, batch, lora_rank)
    cpu = _estimate(shape, method, "cpu", seq_len, batch, lora_rank)
    cpu.gpu = _estimate(shape, method, "cuda", seq_len, batch, lora_rank)
    return cpu


def _estimate(shape: ModelShape, method: str, device: str, seq_len: int, batch: int, rank: int) -> TrainEstimate:
    tensors = model_tensors(shape)
    n_params = sum(t.n_elements for t in tensors)
    largest = max(t.n_elements for t in tensors)
    emb = sum(t.n_elements for t in tensors if t.name in ("token_embd.weight", "output.weight"))
    gpu = device == "cuda"
    tokens = seq_len * batch
    base_values, lora_values = _layer_values(shape, method, rank)
    if method == "full":  # fp32 on both (tune loads bf16 only for LoRA), AdamW: 4 + 4 + 8 bytes per parameter
        trainable = n_params
        weights, grads, optim = 4 * n_params, 4 * n_params, 8 * n_params
        act_bytes = 4  # fp32 activations
        after = 3 * shape.n_embd
    else:
        trainable = lora_params(shape, rank)
        if method == "qlora":  # NF4: 0.5 byte + 0.127 bit of double-quantized constants (Dettmers et al. 2023)
            frozen = int((n_params - emb) * (4 + 0.127) / 8) + 2 * emb
        else:
            frozen = (2 if gpu else 4) * n_params
        weights, grads, optim = frozen + 4 * trainable, 4 * trainable, 8 * trainable
        act_bytes = 2 if gpu else 4  # the base's path in bf16 on a GPU; the adapters' in fp32 everywhere
        after = shape.n_embd
    checkpointing = method == "qlora"  # peft's prepare_model_for_kbit_training turns it on
    per_layer = act_bytes * base_values + 4 * lora_values
    if checkpointing:  # each layer's input kept, one layer's activations recomputed at a time
        acts = tokens * (shape.n_layer * act_bytes * shape.n_embd + per_layer)
    else:
        acts = tokens * (shape.n_layer * per_layer - (4 * 4 * shape.n_embd if method != "full" else 0))
    acts += tokens * act_bytes * (after + 2 * shape.head_dim)
    # log-softmax's output, the loss's gradient and the logits' gradient, fp32 (on a GPU also the
    # bf16 logits the loss's float copy was made from); full: or the logits' gradient beside the
    # output layer's weight gradient, whichever is larger
    vocab = tokens * shape.n_vocab
    logits = 3 * 4 * vocab + (2 * vocab if gpu and method != "full" else 0)
    if method == "full":
        logits = max(logits, 4 * vocab + 4 * shape.n_vocab * shape.n_embd)
    slack = 0 if gpu else int(HEAP_SLACK * acts)
    overhead = CUDA_OVERHEAD_BYTES if gpu else PROCESS_BYTES
    moments = {"logits": weights + optim + acts + logits + slack}
    if method == "full":
        moments["optimizer"] = weights + grads + optim + 2 * 4 * largest
    if not gpu:  # the checkpoint's mapped pages are host memory
        moments["loading"] = 4 * n_params + CHECKPOINT_BYTES_PER_PARAM * n_params
    peak_at = max(moments, key=moments.__getitem__)
    return TrainEstimate(method, device, seq_len, batch, rank, checkpointing, n_params, trainable, weights, grads,
                         optim, acts, logits, slack, overhead, moments[peak_at] + overhead, peak_at)
