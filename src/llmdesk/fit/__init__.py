"""Memory and speed estimates, hardware detection and the device catalog (no llama.cpp, no torch).

    from llmdesk.fit import fit
    report = fit("llama-3.1-8b", quant="q4_k_m", ctx=8192, devices=["rtx-4060"])
"""

from .core import FitReport, Target, fit
from .devices import DEVICES, Device, get_device
from .memory import MemoryEstimate, estimate_memory
from .presets import PRESETS, ModelShape, get_preset, resolve_shape
from .training import estimate_training

__all__ = ["fit", "FitReport", "Target", "DEVICES", "Device", "get_device", "MemoryEstimate",
           "estimate_memory", "PRESETS", "ModelShape", "get_preset", "resolve_shape", "estimate_training"]
