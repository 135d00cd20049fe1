"""How much memory a model takes when llama.cpp runs it: the breakdown fit prints.

    total = weights + repacked weights + KV cache + compute buffer + output buffer + overhead

- weights: every tensor at its type (quants.py ports llama.cpp's per-tensor rules). On a CPU the
  file is mmapped; llama.cpp maps it with MAP_POPULATE, so all weight pages become resident (as
  file-backed pages: the kernel may drop and re-read them under pressure, which makes decoding
  crawl, so they are counted in full). The file's header (the vocabulary) is unmapped after
  loading and is not counted.
- repacked weights: on x86 with AVX2 (and ARM with i8mm/dotprod), llama.cpp copies Q4_0, Q4_K
  and IQ4_NL matrices into an interleaved layout (its CPU_REPACK buffer) for faster matmuls. The
  copy is anonymous memory, and the mapped originals stay resident too: those tensors count twice
  in the resident set (`total_bytes`, what `top` shows). The originals are never read again, so
  the kernel drops them first under pressure: `required_bytes`, what must fit, counts them once.
- KV cache: per layer, K and V for every cell: n_layer x cells x (KV heads x head_dim) x 2 x the
  KV type's bytes. KV heads, not attention heads (GQA). llama.cpp gives each of `parallel`
  sequences its own `ctx` cells (the Engine's layout); sliding-window layers (Gemma 2) too
  (llama.cpp's default full-size window cache, which prefix reuse needs).
- compute buffer: ggml's graph allocator reserves room for the worst micro-batch. The CPU working
  set (what becomes resident when the Engine prefills a full micro-batch of T = min(batch, 512)
  tokens, asking logits for one token per sequence) is the feed-forward block's live tensors,
  4 x T x (2 x n_embd + 3 x n_ff) bytes, plus the f16 attention mask (cells x T x 2) and the
  matmul work buffer. A GPU allocates the whole reservation, which also holds the logits of all
  T tokens: 4 x T x (n_vocab + 2 x n_embd).
- output buffer: the logits llama.cpp keeps per sequence: 4 x n_vocab x parallel (+ embeddings).
- overhead: the llmdesk process before the model (Python, numpy, llama.cpp's code) and the
  tokenizer's tables in llama.cpp and in llmdesk's GGUF reader, which grow with the vocabulary
  and, for BPE tokenizers, with the merge rules (Llama 3 has 280,147: about 56 MB).

The constants marked "measured" come from this repository's accuracy grid (docs/fit.md), which
loads random-weight models of real shapes and compares the process's peak RSS with this estimate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..formats.shape import ModelShape, model_tensors, n_params
from .quants import GGML_BLOCK, KV_TYPES, tensor_type, type_bytes

MiB = 1 << 20
GiB = 1 << 30

# measured on the accuracy grid (Linux x86-64, Python 3.11, llama-cpp-python 0.3.36): the RSS of
# a process that imported llmdesk and llama.cpp, before any model
PROCESS_BASELINE_BYTES = 48 * MiB
# measured: per-model fixed cost (llama.cpp's model and context structs, threadpool) and per token
# of vocabulary (llama.cpp's token tables and caches, llmdesk's GGUF metadata in Python)
MODEL_FIXED_BYTES = 12 * MiB
PER_VOCAB_TOKEN_BYTES = 326
# measured: per BPE merge rule (llama.cpp's rank map of string pairs, llmdesk's GGUF metadata)
PER_MERGE_BYTES = 200
# a CUDA/ROCm/Metal context and its kernels, on the device (typical: 300-600 MB on CUDA)
GPU_CONTEXT_BYTES = 512 * MiB

# weight types llama.cpp's CPU backend repacks (ggml-cpu/repack.cpp) on x86 with AVX2 and ARM
REPACKED_TYPES = ("Q4_0", "Q4_K", "IQ4_NL")


@dataclass
class MemoryEstimate:
    quant: str | None  # the file type counted ("Q4_K_M"), None for a GGUF's own tensors
    ctx: int  # tokens per sequence
    parallel: int
    batch: int
    ubatch: int
    kv_type: str
    weights_by_type: dict[str, int]
    weights_bytes: int
    repack_bytes: int
    mapped_bytes: int  # weight bytes that stay mapped (resident) on a CPU
    kv_cache_bytes: int
    compute_bytes: int  # resident working set on a CPU
    compute_reserved_bytes: int  # what llama.cpp reserves (all of it is allocated on a GPU)
    output_bytes: int
    overhead_bytes: int
    n_params: int
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """Resident memory on a CPU-only machine."""
        return (self.mapped_bytes + self.repack_bytes + self.kv_cache_bytes + self.compute_bytes
                + self.output_bytes + self.overhead_bytes)

    @property
    def required_bytes(self) -> int:
        """What must fit: the total less the mapped file pages of repacked tensors, which are never
        read after loading (the kernel drops them first when memory runs short)."""
        return self.total_bytes - min(self.repack_bytes, self.mapped_bytes - (self.weights_bytes - self.repack_bytes))

    @property
    def gpu_bytes(self) -> int:
        """Device memory when every layer is offloaded to a GPU (weights not repacked there)."""
        return self.weights_bytes + self.kv_cache_bytes + self.compute_reserved_bytes + GPU_CONTEXT_BYTES

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_bytes"] = self.total_bytes
        d["required_bytes"] = self.required_bytes
        d["gpu_bytes"] = self.gpu_bytes
        return d


def kv_cells(shape: ModelShape, ctx: int, parallel: int) -> int:
    """Cells per sequence as llama.cpp allocates them (padded to 256 per context)."""
    total = _pad(ctx * parallel, 256)
    return total // parallel


def kv_cache_bytes(shape: ModelShape, ctx: int, parallel: int = 1, kv_type: str = "f16", ubatch: int = 512,
                   swa_full: bool = True) -> int:
    """K and V of every layer. Sliding-window layers (Gemma 2) get as many cells as the others:
    llama.cpp's context default (`swa_full`, which llmdesk keeps, so that a conversation's cached
    prefix can be reused); with swa_full off they keep only window + micro-batch cells, as
    llama-server does by default."""
    if not shape.causal:
        return 0  # an encoder keeps no cache: each text is embedded in one pass
    per_elem = KV_TYPES[kv_type]
    cells = kv_cells(shape, ctx, parallel)
    total = 0.0
    for i in range(shape.n_layer):
        n = cells
        if not swa_full and shape.n_swa and shape.swa_every and (i + 1) % shape.swa_every != 0:
            n = min(cells, _pad(shape.n_swa + ubatch, 256))
        total += n * parallel * shape.n_embd_kv * 2 * per_elem  # K and V
    return int(total)


def compute_bytes(shape: ModelShape, ctx: int, parallel: int, ubatch: int) -> tuple[int, int]:
    """(CPU working set, llama.cpp's reservation) of the compute buffer, bytes."""
    T = ubatch
    cells = kv_cells(shape, ctx, parallel)
    n_ff = shape.n_ff * (shape.n_expert_used if shape.n_expert else 1)
    layer = 4 * T * (2 * shape.n_embd + 3 * n_ff)  # the FFN block's live f32 tensors
    attn = 4 * T * (2 * shape.n_embd + shape.n_embd_q * 2 + 2 * shape.n_embd_kv)  # q, k, v, attention out
    mask = cells * T * 2  # f16 KQ mask, one row per token
    if not shape.causal:
        # an encoder's ubatch is the whole context and its tokens attend only to each other:
        # an f32 T x T mask, and the scores and their softmax materialised for every head
        mask = T * T * 4
        attn += 2 * 4 * shape.n_head * T * T
    work = T * max(shape.n_ff, shape.n_embd) * 34 // 32  # matmul inputs converted to Q8 blocks
    logits = 4 * T * (shape.n_vocab + 2 * shape.n_embd)  # all T tokens' logits: the worst case
    ws = max(layer, attn) + mask + work
    return ws, max(ws, logits + mask)


EMBED_SEQS = 32  # texts per embeddings decode in the Engine (runtime.engine.EMBED_MAX_SEQS)


def output_bytes(shape: ModelShape, parallel: int) -> int:
    if not shape.causal:  # llama.cpp reserves logits and an embedding for every sequence of a decode
        return 4 * (shape.n_vocab + shape.n_embd) * EMBED_SEQS
    return 4 * shape.n_vocab * parallel


def overhead_bytes(shape: ModelShape) -> int:
    return (PROCESS_BASELINE_BYTES + MODEL_FIXED_BYTES + PER_VOCAB_TOKEN_BYTES * shape.n_vocab
            + PER_MERGE_BYTES * shape.n_merges)


def _pad(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def weights(shape: ModelShape, quant: str | None, gguf_info: Any = None) -> tuple[dict[str, int], int, int, int]:
    """(bytes per type, total bytes, repacked bytes, bytes left mapped). With `gguf_info` and no
    quant, the file's own tensors.

    llama.cpp keeps one mapping over the file's tensor data and unmaps what lies before the first
    and after the last tensor it reads from the mapping; repacked tensors in between stay mapped
    (and resident), repacked tensors at either end do not."""
    by_type: dict[str, int] = {}
    repack = 0
    spans: list[tuple[int, int, bool]] = []  # (offset, nbytes, repacked) in file order
    if quant is None and gguf_info is not None:
        for t in gguf_info.tensors:
            by_type[t.type_name] = by_type.get(t.type_name, 0) + t.nbytes
            rp = (t.type_name in REPACKED_TYPES and len(t.shape) >= 2 and t.shape[1] % 8 == 0
                  and t.name != "token_embd.weight")  # looked up by row, never multiplied
            repack += t.nbytes if rp else 0
            spans.append((t.offset, t.nbytes, rp))
    else:
        off = 0
        for t in model_tensors(shape):
            ty = tensor_type(t, quant or "F16", shape)
            nb = type_bytes(ty, t.n_elements)
            by_type[ty] = by_type.get(ty, 0) + nb
            rp = ty in REPACKED_TYPES and t.name != "token_embd.weight" and t.ne1 % 8 == 0
            repack += nb if rp else 0
            spans.append((off, nb, rp))
            off += nb
    kept = [(o, n) for o, n, rp in spans if not rp]
    mapped = (max(o + n for o, n in kept) - min(o for o, _ in kept)) if kept else 0
    by_type = dict(sorted(by_type.items(), key=lambda kv: -kv[1]))
    return by_type, sum(by_type.values()), repack, mapped


def estimate_memory(shape: ModelShape, *, quant: str | None = "Q4_K_M", ctx: int = 4096, parallel: int = 1,
                    batch: int = 512, kv_type: str = "f16", gguf_info: Any = None,
                    repack: bool = True) -> MemoryEstimate:
    """The memory llama.cpp needs for `shape` at `quant` with `parallel` sequences of `ctx` tokens."""
    ubatch = min(batch, 512) if shape.causal else ctx  # an encoder takes a whole text in one ubatch
    by_type, wbytes, rbytes, mapped = weights(shape, quant, gguf_info)
    if not repack:
        rbytes, mapped = 0, wbytes
    if gguf_info is not None and quant is None:
        n = sum(t.n_elements for t in gguf_info.tensors)
    else:
        n = n_params(shape)
    ws, reserved = compute_bytes(shape, ctx, parallel, ubatch)
    est = MemoryEstimate(
        quant=quant, ctx=ctx, parallel=parallel, batch=batch, ubatch=ubatch, kv_type=kv_type,
        weights_by_type=by_type, weights_bytes=wbytes, repack_bytes=rbytes, mapped_bytes=mapped,
        kv_cache_bytes=kv_cache_bytes(shape, ctx, parallel, kv_type, ubatch),
        compute_bytes=ws, compute_reserved_bytes=reserved,
        output_bytes=output_bytes(shape, parallel), overhead_bytes=overhead_bytes(shape), n_params=n,
    )
    if kv_type not in ("f16", "f32", "bf16"):
        est.notes.append(f"a {kv_type} KV cache needs flash attention (llama.cpp turns it on where supported)")
    return est


def layer_weight_bytes(shape: ModelShape, quant: str | None, gguf_info: Any = None) -> int:
    """Bytes of the repeating layers' weights (blk.*), all layers together."""
    if quant is None and gguf_info is not None:
        return sum(t.nbytes for t in gguf_info.tensors if t.name.startswith("blk."))
    return sum(type_bytes(tensor_type(t, quant or "F16", shape), t.n_elements)
               for t in model_tensors(shape) if t.name.startswith("blk."))


def gpu_layers_that_fit(shape: ModelShape, est: MemoryEstimate, budget_bytes: int, *, quant: str | None,
                        gguf_info: Any = None) -> int:
    """How many of the repeating layers llama.cpp can put on a GPU with `budget_bytes` (its -ngl),
    the rest staying on the CPU: each offloaded layer brings its weights and KV cache, and the GPU
    holds the compute reservation and the driver's context whatever the count. The token embedding
    and (below all layers plus one) the output layer stay on the CPU. n_layer + 1 when all fit."""
    if est.gpu_bytes <= budget_bytes:
        return shape.n_layer + 1
    per_layer = (layer_weight_bytes(shape, quant, gguf_info) + est.kv_cache_bytes) / max(shape.n_layer, 1)
    room = budget_bytes - est.compute_reserved_bytes - GPU_CONTEXT_BYTES
    return max(0, min(shape.n_layer, int(room // per_layer))) if per_layer > 0 else 0


def max_ctx(shape: ModelShape, budget_bytes: int, *, quant: str | None, parallel: int = 1, batch: int = 512,
            kv_type: str = "f16", gguf_info: Any = None, gpu: bool = False, repack: bool = True) -> int:
    """The largest context (tokens per sequence, a multiple of 256) whose total fits in `budget_bytes`;
    0 if not even 256 tokens fit. Capped at the model's trained context."""

    def size(c: int) -> int:
        e = estimate_memory(shape, quant=quant, ctx=c, parallel=parallel, batch=batch, kv_type=kv_type,
                            gguf_info=gguf_info, repack=repack)
        return e.gpu_bytes if gpu else e.required_bytes

    top = max(shape.n_ctx_train or 131072, 256)
    if size(256) > budget_bytes:
        return 0
    if size(top) <= budget_bytes:
        return top
    lo, hi = 256, top  # size(lo) fits, size(hi) does not
    while hi - lo > 256:
        mid = (lo + hi) // 2 // 256 * 256
        if mid <= lo:
            break
        if size(mid) <= budget_bytes:
            lo = mid
        else:
            hi = mid
    return lo


def block_size(type_name: str) -> int:
    return GGML_BLOCK[type_name][0]


__all__ = ["MemoryEstimate", "estimate_memory", "max_ctx", "kv_cache_bytes", "compute_bytes"]
