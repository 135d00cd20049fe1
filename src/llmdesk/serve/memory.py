"""Will a model fit in the memory that is left? Asked before a load, so that a model too big is a
clear error instead of an out-of-memory kill.

The estimate is `llmdesk fit`'s (llmdesk.fit.memory, checked against measured peak memory in
docs/fit.md) for the file's own tensors, `--parallel` sequences of `n_ctx` tokens, and this CPU's
weight repacking; less the process baseline, which the running server has already paid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import LlmdeskError
from ..fit.hardware import cpu_repacks, ram
from ..fit.memory import PROCESS_BASELINE_BYTES, estimate_memory
from ..fit.presets import shape_of_gguf
from ..formats.gguf import GGUFInfo
from .config import format_bytes

SAFETY_BYTES = 256 * 1024 * 1024  # left free for the rest of the system when checking MemAvailable
# a file fit cannot read the shape of (not a decoder-only transformer): its size and this share
UNKNOWN_SHAPE_MARGIN = 0.25


@dataclass
class LoadEstimate:
    weights: int  # resident file pages (mmapped weights): page cache, not counted by MemAvailable
    other: int  # anonymous memory: repacked weights, KV cache, compute and output buffers, tables
    kv_cache: int
    n_ctx_total: int
    # the Engine's embeddings context (one sequence's KV cache and its compute buffer), made on
    # the first embedding request; counted in `other`, so a server that embeds stays in budget
    embeddings: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.other

    def describe(self) -> str:
        emb = f" + {format_bytes(self.embeddings)} for embeddings" if self.embeddings else ""
        return (f"{format_bytes(self.total)} (weights {format_bytes(self.weights)} + KV cache "
                f"{format_bytes(self.kv_cache)} for {self.n_ctx_total} tokens + "
                f"{format_bytes(self.other - self.kv_cache - self.embeddings)} buffers, tables and repacked "
                f"weights{emb})")


def estimate_load_bytes(info: GGUFInfo, path: str | os.PathLike, *, n_ctx: int, n_slots: int) -> LoadEstimate:
    """Memory a model takes once loaded with `n_slots` sequences of `n_ctx` tokens each."""
    try:
        shape = shape_of_gguf(info, Path(path))
    except LlmdeskError:
        size = info.file_size
        return LoadEstimate(weights=size, other=int(size * UNKNOWN_SHAPE_MARGIN), kv_cache=0,
                            n_ctx_total=n_ctx * n_slots)
    est = estimate_memory(shape, quant=None, ctx=n_ctx, parallel=n_slots, gguf_info=info, repack=cpu_repacks())
    # fit's total: the mapped file pages that must stay, plus anonymous memory; the server has
    # already paid the process baseline
    anonymous = est.repack_bytes + est.kv_cache_bytes + est.compute_bytes + est.output_bytes + est.overhead_bytes
    if not shape.causal:  # an encoder's Engine has only its embeddings context: fit's buffers are its
        return LoadEstimate(weights=est.required_bytes - anonymous, other=anonymous - PROCESS_BASELINE_BYTES,
                            kv_cache=0, n_ctx_total=n_ctx, embeddings=est.compute_bytes + est.output_bytes)
    one = estimate_memory(shape, quant=None, ctx=n_ctx, parallel=1, gguf_info=info, repack=cpu_repacks())
    embeddings = one.kv_cache_bytes + one.compute_bytes
    return LoadEstimate(weights=est.required_bytes - anonymous, other=anonymous - PROCESS_BASELINE_BYTES + embeddings,
                        kv_cache=est.kv_cache_bytes, n_ctx_total=n_ctx * n_slots, embeddings=embeddings)


def available_memory_bytes() -> int:
    """What the kernel says can be allocated without swapping (`fit.hardware.ram`), less a safety margin."""
    return max(0, ram()[1] - SAFETY_BYTES)
