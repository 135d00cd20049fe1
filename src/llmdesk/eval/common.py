"""What every measurement needs: the model file a reference names, its identity (sha256), and
the results store; and the models `eval run`, `eval judge` and `arena auto` take, which may carry
LoRA adapters (`ModelChoice`, `resolve_choice`).

    resolve_choice("qwen:q4")                  # a store model (any reference store.refs takes)
    resolve_choice("qwen:q4+style")            # with the adapter 'style' applied to everything
    resolve_choice("tiny.gguf+out/adapter.gguf:0.5+terse.gguf")   # two adapters, one at half
    resolve_choice("openai:http://h/v1#tiny+style")   # the endpoint applies it (llmdesk serve)

`BASE+ADAPTER` is read as `llmdesk.load`, `run`, `chat` and `serve -m` read it
(runtime/adapters.py): after the `+` a LoRA GGUF, a `tune -o` or PEFT folder, or an adapter in
the store, with `:SCALE` after it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
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
    from ..runtime.adapters import ADAPTER_SEP
    from ..store import catalog, refs

    p = Path(ref).expanduser()
    if ADAPTER_SEP in str(ref) and not p.exists():
        raise LlmdeskError(f"'{ref}': this command takes one model file, not a model with LoRA adapters "
                           "(BASE+ADAPTER works with run, chat, serve, 'eval run', 'eval judge' and 'arena auto'); "
                           "merge the adapter into the model first ('llmdesk tune --merge --gguf TYPE')")
    if p.is_dir() and (p / "config.json").is_file():
        return _convert_hf(p, say)
    r = refs.resolve(str(ref))
    if r.entry is not None:
        return MeasuredModel(r.path, r.name, r.entry.sha256, r.entry.name)
    return MeasuredModel(r.path, r.name, catalog.sha256_file(r.path), None)


# ---------------------------------------------------------------------------------------------
# BASE+ADAPTER: a model with LoRA adapters applied to everything it computes

@dataclass
class ModelChoice:
    """A model as `eval run`, `eval judge` and `arena auto` take it: local or remote, with the
    LoRA adapters of `BASE+ADAPTER` applied to everything it computes. `name` is what results
    and votes are stored under (the base's name, then `+` and each adapter's); `sha256` its
    identity: the file's, or with adapters a hash of the base's and theirs (and their scales),
    so caches and results never mix a base with its fine-tune; None for a remote model."""

    ref: object  # store.refs.ModelRef of the base
    name: str
    sha256: str | None
    lora: list[tuple[Path, float]] = field(default_factory=list)
    local: MeasuredModel | None = None  # the base's file and identity (None: remote)

    @property
    def is_remote(self) -> bool:
        return self.ref.is_remote

    @property
    def key(self) -> str:
        return self.sha256 or self.name

    def load(self, **kw):
        """The model, loaded (runtime.model.load's keywords: ctx, threads, slots, kv_unified, ...)."""
        from ..runtime.model import load

        model = load(self.ref, lora=self.lora or None, **kw)
        if not self.is_remote:
            model.name = self.name
        return model


def resolve_choice(ref: str | os.PathLike, *, say: Callable[[str], None] | None = None) -> ModelChoice:
    """What a model reference of `eval run`, `eval judge` or `arena auto` names (see the module):
    every file found and every adapter checked against its base (runtime/adapters.py, as
    `llmdesk.load` finds them) before any model loads; one-line errors."""
    from ..runtime.adapters import adapted_name, find_adapters, split_adapters
    from ..store import refs

    text = str(ref)
    base, adapters = split_adapters(text)
    if base.startswith(refs.REMOTE_PREFIX):
        found = refs.resolve(base, allow_remote=True)
        return ModelChoice(found, found.name, None)
    m = resolve_model(base, say=say)
    found = refs.ModelRef("store" if m.store_name else "file", m.name, path=m.path)
    if not adapters:
        return ModelChoice(found, m.name, m.sha256, [], m)
    chosen = find_adapters(text, adapters, found, base_sha256=m.sha256, say=say)
    digest = hashlib.sha256(m.sha256.encode())
    for a in chosen:
        digest.update(f"+{a.sha256}:{a.scale!r}".encode())
    return ModelChoice(found, adapted_name(m.name, chosen), digest.hexdigest(), [(a.path, a.scale) for a in chosen], m)


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
