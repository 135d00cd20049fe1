"""Will a model fit in the memory that is left? Asked before a load, so that a model too big is a
clear error instead of an out-of-memory kill.

`estimate_load_bytes` is the server's own, deliberately simple estimate (weights + KV cache +
a margin for llama.cpp's compute buffers). It is the one function to switch to `llmdesk.fit`'s
estimate once that exists; nothing else here needs to change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..formats.gguf import GGUFInfo
from .config import format_bytes

KV_BYTES_PER_VALUE = 2  # llama.cpp's default KV cache type is f16
COMPUTE_MARGIN = 0.05  # compute buffers and scratch, as a share of the weights...
COMPUTE_MIN_BYTES = 32 * 1024 * 1024  # ...but at least this much
SAFETY_BYTES = 256 * 1024 * 1024  # left free for the rest of the system when checking MemAvailable


@dataclass
class LoadEstimate:
    weights: int
    kv_cache: int
    compute: int
    n_ctx_total: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute

    def describe(self) -> str:
        return (f"{format_bytes(self.total)} (weights {format_bytes(self.weights)} + KV cache "
                f"{format_bytes(self.kv_cache)} for {self.n_ctx_total} tokens + {format_bytes(self.compute)} buffers)")


def estimate_load_bytes(info: GGUFInfo, *, n_ctx: int, n_slots: int) -> LoadEstimate:
    """Memory a model takes once loaded with `n_slots` sequences of `n_ctx` tokens each.

    KV cache: n_layer * n_ctx_total * n_kv_heads * head_dim values for K and again for V, f16.
    """
    n_layer = info.block_count or 0
    n_head = info.head_count or 1
    n_kv = info.head_count_kv or n_head
    arch = info.architecture or ""
    key_len = info.get(f"{arch}.attention.key_length")
    value_len = info.get(f"{arch}.attention.value_length")
    head_dim = (info.embedding_length or 0) // max(n_head, 1)
    k_dim = key_len if type(key_len) is int else head_dim
    v_dim = value_len if type(value_len) is int else head_dim
    n_ctx_total = n_ctx * n_slots
    kv = n_layer * n_ctx_total * n_kv * (k_dim + v_dim) * KV_BYTES_PER_VALUE
    weights = info.file_size
    compute = max(COMPUTE_MIN_BYTES, int(weights * COMPUTE_MARGIN))
    return LoadEstimate(weights=weights, kv_cache=kv, compute=compute, n_ctx_total=n_ctx_total)


def available_memory_bytes() -> int:
    """What the kernel says can be allocated without swapping (MemAvailable), less a safety margin."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return max(0, int(line.split()[1]) * 1024 - SAFETY_BYTES)
    except OSError:
        pass
    try:  # other Unixes: free pages (an underestimate: no page cache)
        return max(0, os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") - SAFETY_BYTES)
    except (ValueError, OSError, AttributeError):  # pragma: no cover - unknown platform: do not refuse
        return 1 << 62
