"""What a user may type where a model is expected, and the file it means.

    ./models/tiny.gguf, /abs/x.gguf, ~/x.gguf    a GGUF file on disk
    hf:OWNER/REPO/FILE.gguf[@REVISION]           a file on the Hugging Face Hub (pulled if needed)
    NAME or NAME:TAG                             a model in the store (the tag defaults to latest)

An existing file always wins; anything that looks like a path (ends in .gguf or has a separator)
must exist.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import LlmdeskError, ModelNotFound
from . import catalog, paths


@dataclass
class ResolvedModel:
    path: Path
    name: str  # for display: "name:tag", or the file name
    entry: catalog.ModelEntry | None = None  # set when the model is in the store


def _looks_like_path(ref: str) -> bool:
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return ref.lower().endswith(".gguf") or any(s in ref for s in seps) or ref.startswith("~")


def resolve(ref: str) -> ResolvedModel:
    """The model file `ref` names. Raises ModelNotFound (one line, with what to do)."""
    if ref.startswith("hf:"):
        from . import pull as _pull

        entry = catalog.find_by_source(_pull.parse_hf_ref(ref).source) or _pull.pull(ref)
        return _from_entry(entry)

    path = Path(ref).expanduser()
    if path.is_file():
        return ResolvedModel(path=path, name=path.name)
    if _looks_like_path(ref):
        if path.is_dir():
            raise ModelNotFound(f"{ref} is a directory; pass the .gguf file inside it")
        raise ModelNotFound(f"no such file: {ref}")

    try:
        name, tag = catalog.parse_name(ref)
    except LlmdeskError:
        name, tag = ref, None
    entry = catalog.get(name, tag) if tag else None
    if entry is None:
        shown = f"{name}:{tag}" if tag else name
        raise ModelNotFound(
            f"model '{shown}' not found in the store ({paths.display(paths.home())}); "
            "run 'llmdesk list' to see local models, or pass a path to a .gguf file"
        )
    return _from_entry(entry)


def _from_entry(entry: catalog.ModelEntry) -> ResolvedModel:
    if not entry.path.is_file():
        raise ModelNotFound(
            f"the file of model '{entry.ref}' is missing ({paths.display(entry.path)}); "
            f"run 'llmdesk rm {entry.ref}' and add it again"
        )
    return ResolvedModel(path=entry.path, name=entry.ref, entry=entry)
