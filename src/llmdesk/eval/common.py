"""What every measurement needs: the model file a reference names, its identity (sha256), and
the results store."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import LlmdeskError


@dataclass
class MeasuredModel:
    """A local model file with its identity, as results record it (store.refs.ModelRef says which
    file a reference names; this adds the sha256 the results store keys on)."""

    path: Path
    name: str  # for display and the results store: "name:tag" or the file name
    sha256: str
    store_name: str | None = None  # NAME of "NAME:TAG" when the model is in the store


def resolve_model(ref: str | os.PathLike, *, say: Callable[[str], None] | None = None) -> MeasuredModel:
    """A .gguf path, NAME[:TAG], hf:... or a Hugging Face checkpoint folder (converted to an f16
    GGUF in the store first, once)."""
    from ..store import catalog, refs

    p = Path(ref).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return _convert_hf(p, say)
    r = refs.resolve(str(ref))
    if r.entry is not None:
        return MeasuredModel(r.path, r.name, r.entry.sha256, r.entry.name)
    return MeasuredModel(r.path, r.name, catalog.sha256_file(r.path), None)


def _convert_hf(folder: Path, say: Callable[[str], None] | None) -> MeasuredModel:
    """Convert a checkpoint folder to f16 and register it as NAME:f16 (reused when its source matches)."""
    from ..formats.convert import convert
    from ..store import catalog, paths

    name, _ = catalog.names_from_filename(folder.resolve().name)
    source = f"convert:{folder.resolve()}"
    entry = catalog.get(name, "f16")
    if entry is None or entry.source != source or not entry.path.is_file():
        if say:
            say(f"converting {folder} to GGUF (f16) first")
        tmp_dir = paths.cache_dir() / "convert"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        out = tmp_dir / f"{name}-f16.{os.getpid()}.gguf"
        try:
            from ..runtime.llama import LlamaModel

            convert(folder, out, out_type="f16", name=name, check_with=LlamaModel)
            catalog.add_file(out, name, "f16", source=source, progress=False)
        finally:
            out.unlink(missing_ok=True)  # the store holds it (hard link or copy)
        entry = catalog.get(name, "f16")
        if entry is None:
            raise LlmdeskError(f"{folder}: the conversion did not register {name}:f16")
    return MeasuredModel(entry.path, entry.ref, entry.sha256, entry.name)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def record(kind: str, model: MeasuredModel, metrics: dict[str, Any], settings: dict[str, Any], text: str | None) -> int:
    """One row in the results store (llmdesk results)."""
    from ..store import results

    return results.record(kind, model=model.name, metrics=metrics, settings=settings,
                          model_sha256=model.sha256, data_sha256=text_sha256(text) if text is not None else None)
