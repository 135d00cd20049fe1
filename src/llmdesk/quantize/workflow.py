"""`llmdesk quantize MODEL TYPE`: a model reference in, a quantized model in the store out.

The model may be a .gguf path, a store name or a Hugging Face checkpoint folder (converted to f16
first). The result is registered in the store as NAME:<type> (or under the name of `out`), and a
"quantize" row with its size and bits per weight goes to the results store. Registration happens
before the output gets its final name, so an interruption at any moment leaves either nothing or
a complete, registered model (see core.py for how the quantization itself is made safe).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ..atomic import clean_stale_parts, pid_alive
from ..eval.common import MeasuredModel, record, resolve_model
from .core import Progress, quant_type, quantize_file


@dataclass
class QuantizeResult:
    ref: str  # NAME:TAG in the store
    path: str  # the output file (-o), else the store's blob
    type: str
    source: str
    size: int
    bits_per_weight: float
    sha256: str
    seconds: float
    tensor_types: dict

    def to_dict(self) -> dict:
        return asdict(self)


def quantize_model(
    model: str | os.PathLike | MeasuredModel,
    type_name: str,
    *,
    out: str | os.PathLike | None = None,
    name: str | None = None,
    imatrix: str | os.PathLike | None = None,
    threads: int | None = None,
    keep_output_f16: bool = False,
    progress: Progress | None = None,
    say: Callable[[str], None] | None = None,
) -> QuantizeResult:
    """Quantize `model` to `type_name`; register it as `name` (NAME[:TAG]; default: the model's
    store name, or the name of `out`, with the type as the tag)."""
    from ..formats.gguf import read_gguf
    from ..store import catalog, paths

    tname, _ = quant_type(type_name)  # an unknown type fails before any conversion
    src = model if isinstance(model, MeasuredModel) else resolve_model(model, say=say)
    if name:
        reg_name, reg_tag = catalog.parse_name(name)
        if ":" not in name:
            reg_tag = tname.lower()
    elif out is not None:
        reg_name, reg_tag = catalog.names_from_filename(Path(out).name)
        if reg_tag == catalog.DEFAULT_TAG:
            reg_tag = tname.lower()
    else:
        reg_name, reg_tag = store_name_for(src), tname.lower()
    catalog.check_name(reg_name, reg_tag)

    if out is not None:
        dst, keep = Path(out).expanduser(), True
    else:  # the store is the destination: a scratch name, hard-linked into the blobs, then dropped
        scratch = paths.cache_dir() / "quantize"
        scratch.mkdir(parents=True, exist_ok=True)
        clean_stale_parts(scratch)
        _clean_scratch(scratch)
        dst, keep = scratch / f"{reg_name}-{tname}.{os.getpid()}.gguf", False

    entry = None

    def register(tmp: Path) -> None:
        nonlocal entry
        entry = catalog.add_file(tmp, reg_name, reg_tag, source=f"quantize:{src.name}:{tname}", progress=False)

    t0 = time.perf_counter()
    try:
        quantize_file(src.path, dst, tname, imatrix=imatrix, threads=threads, keep_output_f16=keep_output_f16,
                      progress=progress, before_rename=register)
    finally:
        if not keep:
            dst.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    assert entry is not None
    info = read_gguf(entry.path)
    result = QuantizeResult(
        ref=entry.ref, path=str(dst if keep else entry.path), type=tname, source=src.name, size=entry.size,
        bits_per_weight=info.bits_per_weight, sha256=entry.sha256, seconds=seconds,
        tensor_types=info.tensor_type_mix,
    )
    record(
        "quantize", MeasuredModel(entry.path, entry.ref, entry.sha256, entry.name),
        metrics={"size": entry.size, "bits_per_weight": round(info.bits_per_weight, 4), "seconds": round(seconds, 3),
                 "tensor_types": info.tensor_type_mix},
        settings={"type": tname, "source": src.name, "source_sha256": src.sha256,
                  "imatrix": str(imatrix) if imatrix else None, "keep_output_f16": keep_output_f16},
        text=None,
    )
    return result


GENERIC_STEMS = {"model", "ggml-model", "consolidated", "out", "output"}


def store_name_for(src: MeasuredModel) -> str:
    """The store name quantizations of `src` get: its own store name, else from the file name,
    else (for generic names such as `llmdesk train`'s `OUT/model.gguf`) from its folder."""
    from ..store import catalog

    if src.store_name:
        return src.store_name
    name = catalog.names_from_filename(src.path.name)[0]
    if name in GENERIC_STEMS:
        folder = catalog.names_from_filename(src.path.resolve().parent.name + ".gguf")[0]
        if folder not in GENERIC_STEMS:
            return folder
    return name


def _clean_scratch(folder: Path) -> None:
    """Scratch outputs of runs killed between the rename and the cleanup (already in the store)."""
    import re

    for p in folder.glob("*.gguf"):
        m = re.search(r"\.(\d+)\.gguf$", p.name)
        if m and not pid_alive(int(m[1])):
            p.unlink(missing_ok=True)
