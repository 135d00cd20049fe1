"""`BASE+ADAPTER`: a model named together with the LoRA adapters applied to everything it
computes, the one way every face names one (`llmdesk run`, `chat`, `serve -m`, `llmdesk.load`,
`eval run`, `eval judge`, `arena auto`).

    tiny.gguf+out/                       the folder `llmdesk tune -o out/` wrote
    qwen:q4+style                        an adapter GGUF imported into the store as 'style'
    tiny.gguf+a.gguf:0.5+terse.gguf      two adapters, the first at half strength
    openai:http://h/v1#tiny+style        a remote model: its server applies 'style' (`serve --lora`)

After each `+`: a LoRA GGUF (`llmdesk convert --lora`, `tune --lora-gguf`), a folder `llmdesk
tune -o` wrote (its adapter.gguf, else its PEFT adapter), a PEFT adapter folder (converted once
against the base, kept in the cache), or NAME[:TAG] of an adapter GGUF imported into the store;
`:SCALE` after it scales it (1 by default). A `+` inside a file or folder name stays part of it:
a reference that names an existing path as a whole is not split, and elsewhere the longest run of
parts that names an existing path is one part.

Every adapter is found and checked against its base (llama.cpp's checks, from the GGUF headers:
formats.lora_gguf.lora_mismatch) before any model loads; what is wrong is one line.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import LlmdeskError

ADAPTER_SEP = "+"
ADAPTER_KINDS = ("a LoRA GGUF ('llmdesk convert --lora', 'tune --lora-gguf'), a PEFT adapter folder or a "
                 "'tune -o' folder, or NAME[:TAG] of an adapter GGUF imported with 'llmdesk import'")


def lora_spec(item: Any) -> tuple[Path, float]:
    """(path, scale) of one adapter: a (path, scale) pair, or a path with an optional ":SCALE"
    ("style.gguf:0.5", what `--lora` takes; the scale defaults to 1)."""
    if isinstance(item, (tuple, list)):
        if len(item) != 2:
            raise LlmdeskError(f"a LoRA adapter is a path or a (path, scale) pair, not {item!r}")
        path, scale = item
    else:
        path, scale = str(item), 1.0
        head, sep, tail = path.rpartition(":")
        if sep and head and not tail.startswith(("/", "\\")):  # "a.gguf:0.5" (not "C:\\x.gguf")
            try:
                path, scale = head, float(tail)
            except ValueError:
                if not Path(path).exists():
                    raise LlmdeskError(f"LoRA adapter '{item}': the scale after the last colon must be a number, "
                                       f"not {tail!r} (write ADAPTER.gguf or ADAPTER.gguf:SCALE)") from None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise LlmdeskError(f"LoRA adapter {path}: the scale must be a finite number, not {scale!r}")
    return Path(path).expanduser(), float(scale)


@dataclass(frozen=True)
class Adapter:
    """One adapter of `BASE+ADAPTER`, found and checked against its base."""

    path: Path  # the llama.cpp LoRA GGUF
    scale: float
    label: str  # as the user named it: the file's name, the folder's, or NAME:TAG in the store
    sha256: str  # the LoRA GGUF's (a PEFT folder's: of its files and the base)

    @property
    def shown(self) -> str:
        return self.label + (f":{self.scale:g}" if self.scale != 1.0 else "")


def adapted_name(base: str, adapters: list[Adapter]) -> str:
    """What a base with adapters is called (results, logs, the chat's banner): BASE+A+B:0.5."""
    return base + "".join(ADAPTER_SEP + a.shown for a in adapters)


def _names_path(text: str, scaled: bool) -> bool:
    """Whether `text` (with a ':SCALE' after it when `scaled`) names an existing file or folder."""
    if Path(text).expanduser().exists():
        return True
    head, sep, _ = text.rpartition(":")
    return scaled and bool(sep and head) and Path(head).expanduser().exists()


def split_adapters(ref: str) -> tuple[str, list[str]]:
    """`BASE+A+B` -> ("BASE", ["A", "B"]). A reference that names an existing file or folder as a
    whole is not split, nor is a remote one (its server applies the adapters it names)."""
    if ADAPTER_SEP not in ref or Path(ref).expanduser().exists():
        return ref, []
    from ..store.refs import REMOTE_PREFIX

    if ref.startswith(REMOTE_PREFIX):
        _check_remote(ref)
        return ref, []
    parts, groups, i = ref.split(ADAPTER_SEP), [], 0
    while i < len(parts):  # the longest run of parts that names a path is one part ("my+model.gguf")
        j = next((j for j in range(len(parts), i + 1, -1) if _names_path(ADAPTER_SEP.join(parts[i:j]), i > 0)),
                 i + 1)
        groups.append(ADAPTER_SEP.join(parts[i:j]))
        i = j
    base, *adapters = groups
    if not base.strip():
        raise LlmdeskError(f"'{ref}': no model before '+'; write BASE+ADAPTER (e.g. qwen:q4+style)")
    if any(not a.strip() for a in adapters):
        raise LlmdeskError(f"'{ref}': no adapter after '+'; write BASE+ADAPTER, where ADAPTER is {ADAPTER_KINDS}")
    return base, adapters


def _check_remote(ref: str) -> None:
    """A remote model's `+NAME` is the name its server serves an adapter under; a local adapter
    file cannot be sent to it."""
    target, _, model = ref.partition("#")
    local = [a for a in model.split(ADAPTER_SEP)[1:] if _names_path(a, True)]
    if ADAPTER_SEP in target or local:
        raise LlmdeskError(f"'{ref}': a model behind an HTTP API cannot take a local LoRA adapter; serve the base "
                           "with it ('llmdesk serve -m BASE+ADAPTER') and name the variant it lists "
                           "(openai:URL#BASE+NAME), or run BASE+ADAPTER locally")


def resolve(ref: str, *, say: Callable[[str], None] | None = None):
    """(store.refs.ModelRef of the base, [Adapter]) of a reference `llmdesk.load` takes, with
    any `+ADAPTER`s found and checked; a remote reference has none (its server applies them)."""
    from ..store import refs

    base, texts = split_adapters(ref)
    found = refs.resolve(base, allow_remote=True)
    return found, (find_adapters(ref, texts, found, say=say) if texts else [])


def find_adapters(ref: str, texts: list[str], base, *, base_sha256: str | None = None,
                  say: Callable[[str], None] | None = None) -> list[Adapter]:
    """The adapters `texts` (what `split_adapters` gave after the base) of the reference `ref`,
    each checked against `base` (a local store.refs.ModelRef). `base_sha256`: the base's, when
    the caller has it (it keys a PEFT folder's conversion; else it is read when one is needed)."""
    from ..formats.gguf import read_gguf
    from ..formats.lora_gguf import lora_mismatch

    base_info = read_gguf(base.path)
    ident = _Identity(base, base_sha256)
    out = []
    for a in texts:
        got = _find(a, ident, say) or _scaled(a, ident, say)
        if got is None:
            raise LlmdeskError(f"'{ref}': no LoRA adapter '{a}' (no such file, folder or store name); "
                               f"give {ADAPTER_KINDS}")
        path, label, sha, scale = got
        why = lora_mismatch(read_gguf(path), base_info, (label, base.name))
        if why is not None:
            raise LlmdeskError(f"'{ref}': {why}")
        path, scale = lora_spec((path, scale))  # a finite scale
        out.append(Adapter(path, scale, label, sha))
    return out


class _Identity:
    """The base as an adapter's conversion needs it: its file, name, and sha256 (read once, when asked)."""

    def __init__(self, ref, sha256: str | None):
        self.path, self.name, self._sha = ref.path, ref.name, sha256 or (ref.entry.sha256 if ref.entry else None)

    @property
    def sha256(self) -> str:
        if self._sha is None:
            from ..store.catalog import sha256_file

            self._sha = sha256_file(self.path)
        return self._sha


def _scaled(text: str, base: _Identity, say) -> tuple[Path, str, str, float] | None:
    """ADAPTER:SCALE (tried when ADAPTER:SCALE as a whole names nothing)."""
    head, sep, tail = text.rpartition(":")
    if not sep or not head:
        return None
    try:
        scale = float(tail)
    except ValueError:
        if Path(head).expanduser().exists():
            raise LlmdeskError(f"LoRA adapter '{text}': the scale after the last colon must be a number, not "
                               f"{tail!r} (write ADAPTER or ADAPTER:SCALE)") from None
        return None
    got = _find(head, base, say)
    return None if got is None else (*got[:3], scale)


def _find(text: str, base: _Identity, say) -> tuple[Path, str, str, float] | None:
    """(LoRA GGUF, label, sha256, scale 1) of an adapter reference, or None when it names nothing."""
    from ..store import catalog, refs

    p = Path(text).expanduser()
    if p.is_file():
        # `tune -o DIR`'s adapter.gguf is named by its folder, as DIR itself is: two runs' adapters differ
        label = p.resolve().parent.name if p.name == "adapter.gguf" else p.name
        return p, label, catalog.sha256_file(p, progress=False), 1.0
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


def _converted(folder: Path, base: _Identity, say) -> tuple[Path, str]:
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
