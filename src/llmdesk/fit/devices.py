"""The device catalog: memory, bandwidth and compute of machines people run models on.

Every figure is the vendor's spec-sheet number (named in `source`); none is a benchmark result.
`fp16_tflops` is dense FP16 matrix throughput (tensor/matrix cores with FP32 accumulation where
the vendor gives both; half the "sparse" number), or the GPU's FP32 = FP16 shader rate where there
are no matrix units (Apple M1/M2/M3, CPUs). NPUs list INT8 TOPS in `npu_tops` instead: llama.cpp
does not run on them, the figures are for planning only.

`--device NAME[:GB]` picks a memory size where a chip comes in several (`m2-max:96`).
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..errors import LlmdeskError


@dataclass(frozen=True)
class Device:
    key: str
    name: str
    kind: str  # "gpu" (discrete, own VRAM) | "apple" (unified) | "soc" (unified, CUDA) | "cpu" | "npu"
    memory_gb: float  # the default (smallest common) configuration
    bandwidth_gbs: float
    fp16_tflops: float
    source: str
    memory_options_gb: tuple[float, ...] = ()
    npu_tops: float = 0.0
    notes: str = ""

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * 1e9) if self.kind != "gpu" or self.memory_gb < 1000 else 0

    @property
    def usable_bytes(self) -> int:
        """What a model may use: all of a GPU's VRAM; 75% of Apple unified memory (Metal's default
        recommendedMaxWorkingSetSize on machines above 36 GB is about 75%, ~66% below); unified
        SoCs and CPUs leave room for the OS."""
        gb = self.memory_gb
        if self.kind == "gpu":
            return int(gb * 2**30)
        if self.kind == "apple":
            return int(gb * 2**30 * (0.75 if gb > 36 else 0.66))
        return int(max(gb * 2**30 - 1.5 * 2**30, gb * 2**30 * 0.8))

    @property
    def vendor(self) -> str:
        k = self.key
        if k.startswith(("rtx", "t4", "l4", "l40", "a10", "a100", "v100", "h100", "h200", "b200", "jetson")):
            return "nvidia"
        if k.startswith(("rx-", "mi", "amd")):
            return "amd"
        if k.startswith(("arc", "intel")):
            return "intel"
        return "apple" if self.kind == "apple" else "other"

    @property
    def decode_efficiency(self) -> float:
        """Fraction of spec bandwidth llama.cpp's decode reaches (weights streamed once per token).
        From llama.cpp's published llama-bench runs (e.g. the Apple silicon table in llama.cpp
        discussion #4167: M1 7B Q4_0 tg128 ~0.75 of the bound, M2 Max ~0.6): ~0.65 on discrete
        GPUs and Apple silicon for 7-8B models (smaller models lose more to kernel launches),
        ~0.7 on embedded SoCs, ~0.75 on CPUs."""
        return {"gpu": 0.65, "apple": 0.65, "soc": 0.7, "cpu": 0.75, "npu": 0.7}.get(self.kind, 0.65)

    @property
    def prefill_efficiency(self) -> float:
        """Fraction of the FP16 figure llama.cpp's prompt processing reaches with quantized weights:
        NVIDIA ~1.0 (its quantized matmuls run on INT8 tensor cores, twice the FP16-with-FP32-
        accumulate rate, then lose half to dequantization and attention), Apple ~0.6, AMD ~0.4,
        Intel ~0.25, CPUs ~0.3."""
        return {"nvidia": 1.0, "apple": 0.6, "amd": 0.4, "intel": 0.25}.get(
            self.vendor, 0.3 if self.kind in ("cpu", "npu") else 0.4)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["usable_bytes"] = self.usable_bytes
        return d


def _d(key, name, kind, memory_gb, bandwidth_gbs, fp16_tflops, source, **kw) -> Device:
    return Device(key, name, kind, memory_gb, bandwidth_gbs, fp16_tflops, source, **kw)


# fmt: off
DEVICES: dict[str, Device] = {d.key: d for d in [
    # -- NVIDIA GeForce (dense FP16 tensor TFLOPS with FP32 accumulate, from NVIDIA's architecture
    #    whitepapers' GeForce tables: Ampere GA102, Ada AD102, Blackwell GB202)
    _d("rtx-3060", "NVIDIA GeForce RTX 3060 12GB", "gpu", 12, 360, 25.4, "nvidia.com RTX 3060 family specs; NVIDIA Ampere GA102 whitepaper (per-SM rates)"),
    _d("rtx-3080", "NVIDIA GeForce RTX 3080 10GB", "gpu", 10, 760, 59.5, "nvidia.com RTX 3080 specs; NVIDIA Ampere GA102 whitepaper"),
    _d("rtx-3090", "NVIDIA GeForce RTX 3090 24GB", "gpu", 24, 936, 71.0, "nvidia.com RTX 3090 specs; NVIDIA Ampere GA102 whitepaper, Table 9"),
    _d("rtx-4060", "NVIDIA GeForce RTX 4060 8GB", "gpu", 8, 272, 30.2, "nvidia.com RTX 4060 family specs; NVIDIA Ada whitepaper (per-SM rates x 24 SMs x 2.46 GHz)"),
    _d("rtx-4060-ti", "NVIDIA GeForce RTX 4060 Ti", "gpu", 8, 288, 44.1, "nvidia.com RTX 4060 Ti specs (8 or 16 GB); NVIDIA Ada whitepaper", memory_options_gb=(8, 16)),
    _d("rtx-4070", "NVIDIA GeForce RTX 4070 12GB", "gpu", 12, 504, 58.3, "nvidia.com RTX 4070 specs; NVIDIA Ada whitepaper"),
    _d("rtx-4070-ti-super", "NVIDIA GeForce RTX 4070 Ti SUPER 16GB", "gpu", 16, 672, 88.2, "nvidia.com RTX 4070 Ti SUPER specs; NVIDIA Ada whitepaper"),
    _d("rtx-4080", "NVIDIA GeForce RTX 4080 16GB", "gpu", 16, 716.8, 97.5, "nvidia.com RTX 4080 specs; NVIDIA Ada whitepaper, Appendix A"),
    _d("rtx-4090", "NVIDIA GeForce RTX 4090 24GB", "gpu", 24, 1008, 165.2, "nvidia.com RTX 4090 specs; NVIDIA Ada whitepaper, Appendix A (165.2 dense FP16/FP32-acc)"),
    _d("rtx-5060-ti", "NVIDIA GeForce RTX 5060 Ti", "gpu", 16, 448, 47.4, "nvidia.com RTX 5060 Ti specs (8 or 16 GB GDDR7); NVIDIA Blackwell RTX whitepaper", memory_options_gb=(8, 16)),
    _d("rtx-5070", "NVIDIA GeForce RTX 5070 12GB", "gpu", 12, 672, 61.7, "nvidia.com RTX 5070 specs; NVIDIA Blackwell RTX whitepaper"),
    _d("rtx-5080", "NVIDIA GeForce RTX 5080 16GB", "gpu", 16, 960, 112.6, "nvidia.com RTX 5080 specs; NVIDIA Blackwell RTX whitepaper"),
    _d("rtx-5090", "NVIDIA GeForce RTX 5090 32GB", "gpu", 32, 1792, 209.5, "nvidia.com RTX 5090 specs; NVIDIA Blackwell RTX whitepaper (838 sparse FP16 = 419 dense FP16-acc = 209.5 FP32-acc)"),
    # -- AMD Radeon and Intel Arc (vendor spec pages; FP16 = the card's peak half-precision figure)
    _d("rx-7600", "AMD Radeon RX 7600 8GB", "gpu", 8, 288, 43.5, "amd.com Radeon RX 7600 specifications (peak FP16)"),
    _d("rx-7800-xt", "AMD Radeon RX 7800 XT 16GB", "gpu", 16, 624, 74.6, "amd.com Radeon RX 7800 XT specifications (peak FP16)"),
    _d("rx-7900-xtx", "AMD Radeon RX 7900 XTX 24GB", "gpu", 24, 960, 122.8, "amd.com Radeon RX 7900 XTX specifications (peak FP16 122.8 TFLOPS)"),
    _d("rx-9070-xt", "AMD Radeon RX 9070 XT 16GB", "gpu", 16, 644.6, 97.3, "amd.com Radeon RX 9070 XT specifications (peak FP16, dense)"),
    _d("arc-a770", "Intel Arc A770 16GB", "gpu", 16, 560, 138.0, "intel.com Arc A770 specifications (XMX FP16 peak)"),
    _d("arc-b580", "Intel Arc B580 12GB", "gpu", 12, 456, 116.0, "intel.com Arc B580 specifications (XMX FP16 peak)"),
    # -- Apple silicon (apple.com tech specs / newsroom launch notes: memory bandwidth, GPU cores;
    #    FP16 = FP32 GPU shader rate, Apple GPUs have no separate matrix units before M5)
    _d("m1", "Apple M1", "apple", 8, 68.25, 2.6, "apple.com M1 newsroom (Nov 2020): 8-core GPU 2.6 TFLOPS; LPDDR4X-4266 128-bit", memory_options_gb=(8, 16)),
    _d("m1-pro", "Apple M1 Pro", "apple", 16, 200, 5.2, "apple.com M1 Pro/Max newsroom (Oct 2021): 200 GB/s, 16-core GPU 5.2 TFLOPS", memory_options_gb=(16, 32)),
    _d("m1-max", "Apple M1 Max", "apple", 32, 400, 10.4, "apple.com M1 Pro/Max newsroom (Oct 2021): 400 GB/s, 32-core GPU 10.4 TFLOPS", memory_options_gb=(32, 64)),
    _d("m1-ultra", "Apple M1 Ultra", "apple", 64, 800, 21.0, "apple.com M1 Ultra newsroom (Mar 2022): 800 GB/s, 64-core GPU 21 TFLOPS", memory_options_gb=(64, 128)),
    _d("m2", "Apple M2", "apple", 8, 100, 3.6, "apple.com M2 newsroom (Jun 2022): 100 GB/s, 10-core GPU 3.6 TFLOPS", memory_options_gb=(8, 16, 24)),
    _d("m2-pro", "Apple M2 Pro", "apple", 16, 200, 6.8, "apple.com M2 Pro/Max newsroom (Jan 2023): 200 GB/s, 19-core GPU 6.8 TFLOPS", memory_options_gb=(16, 32)),
    _d("m2-max", "Apple M2 Max", "apple", 32, 400, 13.6, "apple.com M2 Pro/Max newsroom (Jan 2023): 400 GB/s, 38-core GPU 13.6 TFLOPS", memory_options_gb=(32, 64, 96)),
    _d("m2-ultra", "Apple M2 Ultra", "apple", 64, 800, 27.2, "apple.com M2 Ultra newsroom (Jun 2023): 800 GB/s, 76-core GPU 27.2 TFLOPS", memory_options_gb=(64, 128, 192)),
    _d("m3", "Apple M3", "apple", 8, 100, 4.1, "apple.com MacBook Pro (M3) tech specs: 100 GB/s, 10-core GPU; FLOPS computed: cores x 128 lanes x 2 x 1.6 GHz (Apple publishes none)", memory_options_gb=(8, 16, 24)),
    _d("m3-pro", "Apple M3 Pro", "apple", 18, 150, 7.4, "apple.com MacBook Pro (M3 Pro) tech specs: 150 GB/s, 18-core GPU; FLOPS computed as for the M3", memory_options_gb=(18, 36)),
    _d("m3-max", "Apple M3 Max (40-core GPU)", "apple", 48, 400, 16.4, "apple.com MacBook Pro (M3 Max) tech specs: 400 GB/s (300 GB/s on the 30-core GPU part); FLOPS computed as for the M3", memory_options_gb=(48, 64, 128)),
    _d("m3-ultra", "Apple M3 Ultra", "apple", 96, 819, 32.8, "apple.com Mac Studio (2025) tech specs: 819 GB/s, up to 512 GB, 80-core GPU; FLOPS computed as for the M3", memory_options_gb=(96, 256, 512)),
    _d("m4", "Apple M4", "apple", 16, 120, 4.3, "apple.com Mac mini (M4) tech specs: 120 GB/s, 10-core GPU; FLOPS computed: cores x 128 lanes x 2 x 1.7 GHz (Apple publishes none)", memory_options_gb=(16, 24, 32)),
    _d("m4-pro", "Apple M4 Pro", "apple", 24, 273, 9.2, "apple.com Mac mini (M4 Pro) tech specs: 273 GB/s, 20-core GPU; FLOPS computed as for the M4", memory_options_gb=(24, 48, 64)),
    _d("m4-max", "Apple M4 Max (40-core GPU)", "apple", 48, 546, 18.4, "apple.com MacBook Pro (M4 Max) tech specs: 546 GB/s (410 GB/s on the 32-core GPU part); FLOPS computed as for the M4", memory_options_gb=(36, 48, 64, 128)),
    # -- single-board computers and embedded modules
    _d("raspberry-pi-5", "Raspberry Pi 5", "cpu", 8, 17.1, 0.31, "raspberrypi.com Pi 5 product brief: LPDDR4X-4267 32-bit (17 GB/s); 4x Cortex-A76 2.4 GHz, 2x128-bit FMA (FP16 NEON)", memory_options_gb=(2, 4, 8, 16)),
    _d("jetson-orin-nano", "NVIDIA Jetson Orin Nano 8GB (Super)", "soc", 8, 102, 16.7, "nvidia.com Jetson Orin Nano Super datasheet (Dec 2024): 102 GB/s, 67 INT8 TOPS sparse -> 16.7 FP16 dense"),
    _d("jetson-orin-nx", "NVIDIA Jetson Orin NX 16GB", "soc", 16, 102.4, 25.0, "nvidia.com Jetson Orin NX series datasheet: 102.4 GB/s, 100 INT8 TOPS sparse (GPU 50 dense INT8 -> 25 FP16)"),
    _d("jetson-agx-orin", "NVIDIA Jetson AGX Orin 64GB", "soc", 64, 204.8, 42.5, "nvidia.com Jetson AGX Orin series technical brief: 204.8 GB/s, GPU 170 INT8 TOPS sparse -> 42.5 FP16 dense", memory_options_gb=(32, 64)),
    # -- data-center GPUs (vendor datasheets; dense FP16 tensor TFLOPS)
    _d("t4", "NVIDIA T4 16GB", "gpu", 16, 320, 65.0, "nvidia.com T4 datasheet: 320 GB/s, 65 TFLOPS mixed precision"),
    _d("l4", "NVIDIA L4 24GB", "gpu", 24, 300, 121.0, "nvidia.com L4 datasheet: 300 GB/s, 242 FP16 TFLOPS with sparsity"),
    _d("a10", "NVIDIA A10 24GB", "gpu", 24, 600, 125.0, "nvidia.com A10 datasheet: 600 GB/s, 125 FP16 TFLOPS dense"),
    _d("v100", "NVIDIA V100 SXM2 32GB", "gpu", 32, 900, 125.0, "nvidia.com V100 datasheet: 900 GB/s, 125 tensor TFLOPS"),
    _d("a100-40gb", "NVIDIA A100 40GB (PCIe)", "gpu", 40, 1555, 312.0, "nvidia.com A100 datasheet: 1,555 GB/s, 312 FP16 TFLOPS dense"),
    _d("a100-80gb", "NVIDIA A100 80GB (SXM)", "gpu", 80, 2039, 312.0, "nvidia.com A100 datasheet: 2,039 GB/s, 312 FP16 TFLOPS dense"),
    _d("l40s", "NVIDIA L40S 48GB", "gpu", 48, 864, 362.0, "nvidia.com L40S datasheet: 864 GB/s, 733 FP16 TFLOPS with sparsity"),
    _d("h100-pcie", "NVIDIA H100 PCIe 80GB", "gpu", 80, 2000, 756.0, "nvidia.com H100 datasheet: 2 TB/s, 1,513 FP16 TFLOPS with sparsity"),
    _d("h100-sxm", "NVIDIA H100 SXM 80GB", "gpu", 80, 3350, 989.5, "nvidia.com H100 datasheet: 3.35 TB/s, 1,979 FP16 TFLOPS with sparsity"),
    _d("h200", "NVIDIA H200 SXM 141GB", "gpu", 141, 4800, 989.5, "nvidia.com H200 datasheet: 4.8 TB/s, 1,979 FP16 TFLOPS with sparsity"),
    _d("b200", "NVIDIA B200 192GB", "gpu", 192, 8000, 2250.0, "nvidia.com DGX B200 / HGX B200 datasheet: 8 TB/s per GPU, 4.5 PFLOPS FP16 with sparsity"),
    _d("mi250x", "AMD Instinct MI250X 128GB", "gpu", 128, 3277, 383.0, "amd.com Instinct MI250X specifications: 3.2 TB/s, 383 FP16 TFLOPS"),
    _d("mi300x", "AMD Instinct MI300X 192GB", "gpu", 192, 5300, 1307.4, "amd.com Instinct MI300X specifications: 5.3 TB/s, 1,307.4 FP16 TFLOPS dense"),
    # -- NPUs in laptop SoCs (memory = the system's; llama.cpp does not use these NPUs)
    _d("snapdragon-x-elite", "Qualcomm Snapdragon X Elite (Hexagon NPU)", "npu", 32, 135, 4.6, "qualcomm.com Snapdragon X Elite product brief: 45 NPU TOPS, LPDDR5x-8448 135 GB/s, Adreno GPU 4.6 TFLOPS FP32", npu_tops=45, memory_options_gb=(16, 32, 64)),
    _d("intel-lunar-lake", "Intel Core Ultra 200V (Lunar Lake NPU 4)", "npu", 32, 136.5, 6.0, "intel.com Core Ultra 200V product brief: NPU 48 TOPS, LPDDR5X-8533 on package (136.5 GB/s)", npu_tops=48, memory_options_gb=(16, 32)),
    _d("amd-ryzen-ai-300", "AMD Ryzen AI 9 HX 370 (XDNA 2 NPU)", "npu", 32, 120, 11.9, "amd.com Ryzen AI 9 HX 370 specifications: NPU 50 TOPS, LPDDR5X-7500 128-bit (120 GB/s), Radeon 890M", npu_tops=50, memory_options_gb=(16, 32, 64)),
    _d("amd-ryzen-ai-max-395", "AMD Ryzen AI Max+ 395 (Strix Halo)", "soc", 128, 256, 59.4, "amd.com Ryzen AI Max+ 395 specifications: LPDDR5X-8000 256-bit (256 GB/s), Radeon 8060S, NPU 50 TOPS", npu_tops=50, memory_options_gb=(32, 64, 128)),
]}
# fmt: on


def get_device(spec: str) -> Device:
    """`NAME` or `NAME:GB` (a memory size the chip comes with, or any size for a GPU of that name)."""
    name, _, gb = spec.strip().lower().partition(":")
    name = name.replace("_", "-").replace(" ", "-")
    dev = DEVICES.get(name)
    if dev is None:
        close = difflib.get_close_matches(name, list(DEVICES), n=4, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "see 'llmdesk fit --devices'"
        raise LlmdeskError(f"unknown device '{spec}'; {hint}")
    if gb:
        try:
            size = float(gb.removesuffix("gb"))
        except ValueError:
            raise LlmdeskError(f"device memory must be a number of GB, as in {name}:64; got '{gb}'") from None
        if size <= 0:
            raise LlmdeskError(f"device memory must be positive, got {size}")
        dev = replace(dev, memory_gb=size, name=f"{dev.name} ({size:g} GB)")
    return dev


@dataclass
class LocalMachine:
    """This machine, as fit sees it."""

    cpu: str
    cores: int
    ram_bytes: int
    available_bytes: int
    bandwidth_gbs: float  # measured (cached), or 0 if not measured
    fp32_gflops: float  # peak FP32 from cores x clock x SIMD width (hardware.cpu_peak_gflops)
    gpus: list[dict[str, Any]] = field(default_factory=list)  # {name, memory_bytes, free_bytes, vendor}
    apple_chip: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
