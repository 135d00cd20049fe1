"""What every measurement needs: the model file a reference names, its identity (sha256), and
the results store; and the models `eval run`, `eval judge` and `arena auto` take, which may carry
LoRA adapters (`ModelChoice`, `resolve_choice`).

    resolve_choice("qwen:q4")                  # a store model (any reference store.refs takes)
    resolve_choice("qwen:q4+style")            # with the adapter 'style' applied to everything
    resolve_choice("tiny.gguf+out/adapter.gguf:0.5+terse.gguf")   # two adapters, one at half
    resolve_choice("openai:http://h/v1#tiny+style")   # the endpoint applies it (llmdesk serve)

After the `+`: a LoRA GGUF (`llmdesk convert --lora`, `tune --lora-gguf`), a folder `llmdesk
tune -o` wrote (its adapter.gguf, else its PEFT adapter), a PEFT adapter folder (converted once
against the base, kept in the cache), or NAME[:TAG] of an adapter GGUF imported into the store;
`:SCALE` after it scales it (1 by default).
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
    from ..store import catalog, refs

    p = Path(ref).expanduser()
    if ADAPTER_SEP in str(ref) and not p.exists():
        raise LlmdeskError(f"'{ref}': this command takes one model file, not a model with LoRA adapters "
                           "(BASE+ADAPTER works with 'eval run', 'eval judge' and 'arena auto'); merge the adapter "
                           "into the model first ('llmdesk tune --merge --gguf TYPE')")
    if p.is_dir() and (p / "config.json").is_file():
        return _convert_hf(p, say)
    r = refs.resolve(str(ref))
    if r.entry is not None:
        return MeasuredModel(r.path, r.name, r.entry.sha256, r.entry.name)
    return MeasuredModel(r.path, r.name, catalog.sha256_file(r.path), None)


# ---------------------------------------------------------------------------------------------
# BASE+ADAPTER: a model with LoRA adapters applied to everything it computes

ADAPTER_SEP = "+"
ADAPTER_KINDS = ("a LoRA GGUF ('llmdesk convert --lora', 'tune --lora-gguf'), a PEFT adapter folder or a "
                 "'tune -o' folder, or NAME[:TAG] of an adapter GGUF imported with 'llmdesk import'")


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


def split_adapters(ref: str) -> tuple[str, list[str]]:
    """`BASE+A+B` -> ("BASE", ["A", "B"]). A reference that names an existing file or folder as a
    whole, or a remote one (its server resolves `+`), is not split."""
    if ADAPTER_SEP not in ref or Path(ref).expanduser().exists():
        return ref, []
    from ..store.refs import REMOTE_PREFIX

    if ref.startswith(REMOTE_PREFIX):
        return ref, []
    base, *adapters = ref.split(ADAPTER_SEP)
    if not base.strip():
        raise LlmdeskError(f"'{ref}': no model before '+'; write BASE+ADAPTER (e.g. qwen:q4+style)")
    if any(not a.strip() for a in adapters):
        raise LlmdeskError(f"'{ref}': no adapter after '+'; write BASE+ADAPTER, where ADAPTER is {ADAPTER_KINDS}")
    return base, adapters


def resolve_choice(ref: str | os.PathLike, *, say: Callable[[str], None] | None = None) -> ModelChoice:
    """What a model reference of `eval run`, `eval judge` or `arena auto` names (see the module):
    every file found and every adapter checked against its base (llama.cpp's checks, from the
    files' headers) before any model loads; one-line errors."""
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
    from ..formats.gguf import read_gguf
    from ..formats.lora_gguf import lora_mismatch
    from ..runtime.model import lora_spec

    base_info = read_gguf(m.path)
    lora, labels, digest = [], [], hashlib.sha256(m.sha256.encode())
    for a in adapters:
        got = _find_adapter(a, m, say) or _scaled(a, m, say)
        if got is None:
            raise LlmdeskError(f"'{text}': no LoRA adapter '{a}' (no such file, folder or store name); "
                               f"give {ADAPTER_KINDS}")
        path, label, sha, scale = got
        why = lora_mismatch(read_gguf(path), base_info, (label, m.name))
        if why is not None:
            raise LlmdeskError(f"'{text}': {why}")
        path, scale = lora_spec((path, scale))  # a finite scale
        lora.append((path, scale))
        labels.append(label + (f":{scale:g}" if scale != 1.0 else ""))
        digest.update(f"+{sha}:{scale!r}".encode())
    return ModelChoice(found, m.name + "".join(ADAPTER_SEP + x for x in labels), digest.hexdigest(), lora, m)


def _scaled(text: str, base: MeasuredModel, say) -> tuple[Path, str, str, float] | None:
    """ADAPTER:SCALE (tried when ADAPTER:SCALE as a whole names nothing)."""
    head, sep, tail = text.rpartition(":")
    if not sep or not head:
        return None
    try:
        scale = float(tail)
    except ValueError:
        if Path(head).expanduser().is_file():
            raise LlmdeskError(f"LoRA adapter '{text}': the scale after the last colon must be a number, not "
                               f"{tail!r} (write ADAPTER or ADAPTER:SCALE)") from None
        return None
    got = _find_adapter(head, base, say)
    return None if got is None else (*got[:3], scale)


def _find_adapter(text: str, base: MeasuredModel, say) -> tuple[Path, str, str, float] | None:
    """(LoRA GGUF, label, sha256, scale 1) of an adapter reference, or None when it names nothing."""
    from ..store import catalog, refs

    p = Path(text).expanduser()
    if p.is_file():
        return p, p.name, catalog.sha256_file(p, progress=False), 1.0
    if p.is_dir():
        label = p.resolve().name
        if (p / "adapter.gguf").is_file():  # what `tune -o DIR --lora-gguf` writes
            return p / "adapter.gguf", label, catalog.sha256_file(p / "adapter.gguf", progress=False), 1.0
        peft = next((d for d in (p, p / "adapter") if (d / "adapter_config.json").is_file()), None)
        if peft is None:
            raise LlmdeskError(f"{text}: a folder with no LoRA adapter in it (adapter.gguf, or a PEFT adapter's "
                               "adapter_config.json)")
        path, sha = _converted(peft, base, say)
        return path, label, sha, 1.0
    if refs.looks_like_path(text):
        return None
    try:
        name, tag = catalog.parse_name(text)
    except LlmdeskError:
        return None
    entry = catalog.get(name, tag)
    if entry is None or not entry.path.is_file():
        return None
    return entry.path, entry.ref, entry.sha256, 1.0


def _converted(folder: Path, base: MeasuredModel, say) -> tuple[Path, str]:
    """A PEFT adapter folder as a LoRA GGUF for `base`, converted once and kept in the cache
    (keyed by the folder's files and the base), as `llmdesk convert --lora` writes it."""
    from ..formats.lora_gguf import convert_lora
    from ..store import paths

    h = hashlib.sha256(base.sha256.encode())
    for f in sorted(folder.iterdir()):
        if f.is_file():
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    key = h.hexdigest()
    out = paths.cache_dir() / "lora" / f"{key[:32]}.gguf"
    if not out.is_file():
        if say:
            say(f"converting the PEFT adapter {folder} to a LoRA GGUF for {base.name} first")
        convert_lora(folder, base.path, out)
    return out, key


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
