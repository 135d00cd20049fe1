"""`fit`: will this model run here (or on that device), with how much memory, how fast?

    >>> from llmdesk.fit import fit
    >>> r = fit("llama-3.1-8b", quant="q4_k_m", ctx=8192, devices=["rtx-4060"])
    >>> r.memory.total_bytes, r.targets[0].fits, r.targets[0].decode_tokens_per_second

One function for the CLI and the Python API. It never loads llama.cpp or torch: shapes come from
presets, config.json files or GGUF headers, and everything else is arithmetic (memory.py,
speed.py) and, for this machine, a one-time bandwidth measurement (hardware.py).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..errors import LlmdeskError
from ..formats.shape import DEFAULT_CTX
from .devices import DEVICES, Device, LocalMachine, get_device
from .memory import MemoryEstimate, estimate_memory, gpu_layers_that_fit, max_ctx
from .presets import ModelSource, resolve_shape
from .quants import normalize_kv, normalize_quant
from .speed import estimate_speed
from .training import TrainEstimate, estimate_training

DEFAULT_QUANT = "Q4_K_M"
# llama.cpp's decode reaches about this fraction of the best numpy-copy bandwidth hardware.py
# measures (`llmdesk bench`, TinyLlama 1.1B Q4_K_M, tg128: 0.41-0.47 of 36.9 GB/s on the 2-core
# EPYC VM this was written on, where two slow cores are part compute-bound; see docs/fit.md)
LOCAL_CPU_DECODE_EFFICIENCY = 0.5
# llama.cpp's prompt processing against the CPU's peak FP32 FLOPS (hardware.cpu_peak_gflops): its
# quantized matmuls use integer dot products (AVX-512 VNNI here), so it exceeds 1 (same bench,
# pp512 on one thread: 1.37 x that thread's FP32 peak; 1.2 leaves room for two threads' sync)
LOCAL_CPU_PREFILL_EFFICIENCY = 1.2


@dataclass
class Target:
    """One place the model could run: this machine's RAM, one of its GPUs, or a catalog device."""

    name: str
    kind: str  # "ram" | "gpu" | "apple" | "soc" | "cpu" | "npu"
    budget_bytes: int  # memory the model may use there
    needed_bytes: int
    fits: bool
    max_ctx: int
    decode_tokens_per_second: float
    decode_roofline_tokens_per_second: float
    prefill_tokens_per_second: float
    bandwidth_gbs: float
    compute_tflops: float
    source: str = ""  # where the device's figures come from
    note: str = ""
    gpu_layers: int | None = None  # GPUs: layers that fit there (llama.cpp's -ngl); n_layer + 1 is all

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FitReport:
    model: str
    source: str  # "preset" | "gguf" | "config"
    shape: dict[str, Any]
    quant: str  # what was counted: "Q4_K_M" or "file (Q4_K_M)"
    memory: MemoryEstimate
    targets: list[Target]
    machine: LocalMachine | None
    bytes_per_token: int
    notes: list[str] = field(default_factory=list)
    training: TrainEstimate | None = None

    @property
    def primary(self) -> Target:
        return self.targets[0]

    def to_dict(self) -> dict[str, Any]:
        m = self.memory
        p = self.primary
        d: dict[str, Any] = {
            "model": self.model, "source": self.source, "quant": self.quant,
            "ctx": m.ctx, "parallel": m.parallel, "batch": m.batch, "kv_type": m.kv_type,
            "total_bytes": m.total_bytes if p.kind in ("ram", "cpu") else p.needed_bytes,
            "required_bytes": p.needed_bytes,
            "weights_bytes": m.weights_bytes, "weights_by_type": m.weights_by_type,
            "repacked_weights_bytes": m.repack_bytes, "kv_cache_bytes": m.kv_cache_bytes,
            "compute_bytes": m.compute_bytes, "compute_reserved_bytes": m.compute_reserved_bytes,
            "output_bytes": m.output_bytes, "overhead_bytes": m.overhead_bytes,
            "cpu_total_bytes": m.total_bytes, "gpu_total_bytes": m.gpu_bytes,
            "n_params": m.n_params, "bytes_per_token": self.bytes_per_token,
            "fits": p.fits, "max_ctx": p.max_ctx, "target": p.name,
            "decode_tokens_per_second": round(p.decode_tokens_per_second, 2),
            "prefill_tokens_per_second": round(p.prefill_tokens_per_second, 2),
            "targets": [t.to_dict() for t in self.targets],
            "shape": self.shape, "notes": self.notes + m.notes,
        }
        if self.machine is not None:
            d["machine"] = self.machine.to_dict()
        if self.training is not None:
            d["training"] = self.training.to_dict()
        return d


def _match_gpu(name: str) -> Device | None:
    """The catalog entry of a GPU nvidia-smi / rocm-smi names ("NVIDIA GeForce RTX 4090")."""
    n = name.lower()
    m = re.search(r"rtx\s*(\d{4})(\s*ti)?(\s*super)?", n)
    if m:
        key = f"rtx-{m.group(1)}" + ("-ti" if m.group(2) else "") + ("-super" if m.group(3) else "")
        return DEVICES.get(key) or DEVICES.get(f"rtx-{m.group(1)}")
    for key in ("h200", "h100-sxm", "a100-80gb", "a100-40gb", "l40s", "l4", "a10", "t4", "v100",
                "mi300x", "mi250x", "rx-7900-xtx", "rx-7800-xt", "rx-7600"):
        if key.replace("-", " ").split()[0] in n.replace("-", " ").split():
            return DEVICES[key]
    return None


def fit(model: str, *, quant: str | None = None, ctx: int | None = None, parallel: int = 1, batch: int = 512,
        kv_type: str = "f16", devices: list[str] | None = None, local: bool = True, measure: bool = True,
        remeasure: bool = False,
        train: str | None = None, seq_len: int = 1024, train_batch: int = 4, lora_rank: int = 16) -> FitReport:
    """Estimate memory and speed of `model` (preset, GGUF, store name, config.json or folder)."""
    if parallel < 1:
        raise LlmdeskError(f"--parallel must be at least 1, got {parallel}")
    if batch < 1:
        raise LlmdeskError(f"--batch must be at least 1, got {batch}")
    if ctx is not None and ctx < 16:
        raise LlmdeskError(f"--ctx must be at least 16 tokens, got {ctx}")
    kv = normalize_kv(kv_type)
    qname = normalize_quant(quant) if quant else None
    device_list = [get_device(d) for d in (devices or []) if d not in ("auto", "local")]
    src: ModelSource = resolve_shape(model)
    shape = src.shape
    notes: list[str] = []
    gguf_info = None
    if qname is None:
        if src.kind == "gguf":
            gguf_info = src.gguf
            label = f"file ({src.file_type or 'mixed'})"
        else:
            qname = DEFAULT_QUANT
            label = qname
            notes.append(f"no --quant given: counted at {qname.lower()}")
    else:
        label = qname
    if ctx is None:
        ctx = min(shape.n_ctx_train or DEFAULT_CTX, DEFAULT_CTX)
    if shape.n_ctx_train and ctx > shape.n_ctx_train:
        notes.append(f"--ctx {ctx} is above the model's trained maximum of {shape.n_ctx_train} tokens; "
                     "quality degrades past it (estimated anyway)")

    def est_for(repack: bool) -> MemoryEstimate:
        return estimate_memory(shape, quant=qname, ctx=ctx, parallel=parallel, batch=batch, kv_type=kv,
                               gguf_info=gguf_info, repack=repack)

    from .hardware import cpu_repacks

    repack_here = cpu_repacks()
    est = est_for(repack_here)
    if repack_here and est.repack_bytes:
        notes.append("this CPU repacks Q4_0/Q4_K weights for faster matmuls: those tensors are counted "
                     "twice (the interleaved copy and the mapped file pages)")
    mc = dict(quant=qname, parallel=parallel, batch=batch, kv_type=kv, gguf_info=gguf_info)

    def speed(e: MemoryEstimate, bw: float, tf: float, de: float, pe: float):
        return estimate_speed(shape, e, bandwidth_gbs=bw, tflops=tf, decode_efficiency=de,
                              prefill_efficiency=pe, gguf_info=gguf_info)

    def device_target(dev: Device, label: str) -> Target:
        if dev.kind == "gpu":  # its own VRAM: weights, KV cache, the full compute reservation, the driver
            e = est_for(False)
            need, budget = e.gpu_bytes, dev.usable_bytes
            mx = max_ctx(shape, budget, gpu=True, repack=False, **mc)
        elif dev.kind in ("apple", "soc"):  # unified memory: the same, plus the process itself
            e = est_for(False)
            need, budget = e.gpu_bytes + e.overhead_bytes, dev.usable_bytes
            mx = max_ctx(shape, budget - e.overhead_bytes, gpu=True, repack=False, **mc)
        else:  # a CPU (Raspberry Pi), or an NPU laptop where llama.cpp runs on the CPU
            e = est_for(True)
            need, budget = e.required_bytes, dev.usable_bytes
            mx = max_ctx(shape, budget, **mc)
        sp = speed(e, dev.bandwidth_gbs, dev.fp16_tflops, dev.decode_efficiency, dev.prefill_efficiency)
        note = dev.name
        ngl = None
        if dev.kind == "gpu":
            ngl = gpu_layers_that_fit(shape, e, budget, quant=qname, gguf_info=gguf_info)
            if 0 < ngl <= shape.n_layer:
                note += (f"; the whole model does not fit, but {ngl} of its {shape.n_layer} layers do "
                         f"(-ngl {ngl}; the rest run on the CPU, slower than the speeds shown)")
        if dev.kind == "npu":
            note += ": llama.cpp runs on this machine's CPU/GPU, not its NPU"
        elif dev.kind == "apple":
            note += f": {budget / 2**30:.1f} GB of unified memory usable by the GPU (Metal's working-set limit)"
        return Target(label, dev.kind, budget, need, need <= budget, mx, sp.decode_tokens_per_second,
                      sp.decode_roofline_tokens_per_second, sp.prefill_tokens_per_second, dev.bandwidth_gbs,
                      dev.fp16_tflops, dev.source, note, ngl)

    targets = [device_target(d, d.key + (f":{d.memory_gb:g}" if d.name.endswith(" GB)") else "")) for d in device_list]
    machine = None
    if local:
        from .hardware import machine as detect

        machine = detect(measure=measure, again=remeasure)
        local_targets: list[Target] = []
        for g in machine.gpus:  # nvidia-smi / rocm-smi: the memory free now
            dev = _match_gpu(g["name"])
            budget = int(g.get("free_bytes") or g["memory_bytes"])
            dev = replace(dev, memory_gb=budget / 2**30) if dev else Device(
                "gpu", g["name"], "gpu", budget / 2**30, 0.0, 0.0, "nvidia-smi/rocm-smi")
            t = device_target(dev, f"this machine's {g['name']}")
            t.note = "" if dev.bandwidth_gbs else "not in the device catalog: no speed estimate"
            local_targets.append(t)
        if machine.apple_chip:
            gb = machine.ram_bytes / 2**30
            dev = replace(DEVICES[machine.apple_chip], memory_gb=round(gb))
            local_targets.append(device_target(dev, f"this machine ({dev.name}, {gb:.0f} GB)"))
        # the CPU and its RAM: what is available now
        budget = machine.available_bytes or machine.ram_bytes
        bw = machine.bandwidth_gbs
        tf = machine.fp32_gflops / 1000
        sp = speed(est, bw, tf, LOCAL_CPU_DECODE_EFFICIENCY, LOCAL_CPU_PREFILL_EFFICIENCY)
        local_targets.append(Target(
            "this machine (CPU)", "ram", budget, est.required_bytes, est.required_bytes <= budget,
            max_ctx(shape, budget, repack=repack_here, **mc), sp.decode_tokens_per_second,
            sp.decode_roofline_tokens_per_second, sp.prefill_tokens_per_second, bw, tf,
            "bandwidth measured here (numpy copies, cached); FLOPS from clock x SIMD" if bw else "not measured",
            "" if bw else "bandwidth not measured: no speed estimate"))
        local_targets.sort(key=lambda t: (not t.fits, t.kind == "ram"))  # a GPU that fits leads
        targets = targets + local_targets if device_list else local_targets
    if not targets:
        raise LlmdeskError("nothing to estimate for: give --device NAME or allow this machine")
    bpt = speed(est, 1.0, 1.0, 1.0, 1.0).bytes_per_token

    training = None
    if train:
        training = estimate_training(shape, train, seq_len=seq_len, batch=train_batch, lora_rank=lora_rank)
    return FitReport(model=shape.name if src.kind == "preset" else model, source=src.kind, shape=shape.to_dict(),
                     quant=label, memory=est, targets=targets, machine=machine, bytes_per_token=bpt, notes=notes,
                     training=training)
