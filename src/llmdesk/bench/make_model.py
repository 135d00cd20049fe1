"""`llmdesk make-model`: a GGUF with random weights and the exact shapes of a real model.

Benchmarks and fit's accuracy checks need models of real shapes without downloading them. The
weights are random (the model writes gibberish), but every tensor has the shape and type a real
model's file has, so memory and speed are those of the real model. f32/f16/bf16/q8_0 are written
directly (formats/synth.py); other types are written as f16 and quantized by llama.cpp's own
quantizer (llmdesk.quantize), which applies the same per-tensor mix as for a real model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ..errors import LlmdeskError
from ..fit.presets import get_preset
from ..fit.quants import normalize_quant
from ..formats.shape import ModelShape
from ..formats.synth import DIRECT_TYPES, SYNTH_ARCHS, SynthConfig, write_llama_gguf


def check_supported(shape: ModelShape) -> None:
    if shape.arch not in SYNTH_ARCHS:
        raise LlmdeskError(f"make-model writes the {', '.join(SYNTH_ARCHS)} architectures; {shape.name} is "
                           f"{shape.arch} (fit still estimates it)")


def with_depth(shape: ModelShape, layers: int | None) -> ModelShape:
    """`shape` with `layers` layers (same widths), for quicker models; None keeps its own."""
    if layers is None:
        return shape
    if layers < 1:
        raise LlmdeskError(f"--layers must be at least 1, got {layers}")
    from dataclasses import replace

    return replace(shape, n_layer=layers)


def synth_config(shape: ModelShape, dtype: str = "f16", *, seed: int = 0) -> SynthConfig:
    check_supported(shape)
    return SynthConfig.like(
        shape,
        # llama.cpp looks these up by name in a model called Phi-3 (llama-vocab.cpp)
        extra_tokens=["<unk>", "<|endoftext|>"] if shape.arch == "phi3" else [],
        dtype=dtype, name=f"{shape.name} (random weights)", seed=seed,
        weight_std=0.02 * 8,  # small weights keep activations finite through many layers
    )


def make_model(preset: str | ModelShape, type_name: str, out: str | os.PathLike, *, seed: int = 0,
               threads: int | None = None, layers: int | None = None,
               progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Write `out`: random weights with the shapes of `preset`, stored as `type_name` (q4_k_m, ...).
    `layers` overrides the layer count (a shorter model of the same width, for quick tests).
    `progress(done, total, tensor name)` is called per tensor while llama.cpp quantizes."""
    shape = with_depth(get_preset(preset) if isinstance(preset, str) else preset, layers)
    ftype = normalize_quant(type_name)
    out = Path(out)
    if out.is_dir():
        raise LlmdeskError(f"{out} is a directory; give a file name ending in .gguf")
    if not out.parent.exists():
        raise LlmdeskError(f"{out.parent}: no such directory")
    direct = ftype.lower()
    if direct in DIRECT_TYPES:
        return write_llama_gguf(out, synth_config(shape, direct, seed=seed))
    try:
        from ..quantize.core import quantize_file
    except ImportError:
        raise LlmdeskError(f"{ftype.lower()} needs llmdesk's quantizer (llmdesk.quantize), which is not "
                           f"installed here; use f16, q8_0 or f32") from None
    tmp = out.with_name(out.name + ".f16.part")
    try:
        write_llama_gguf(tmp, synth_config(shape, "f16", seed=seed))
        quantize_file(tmp, out, ftype.lower(), threads=threads, progress=progress)
    finally:
        tmp.unlink(missing_ok=True)
    return out
