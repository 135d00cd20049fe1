"""Reading a Hugging Face checkpoint folder: its config, its tensors and its tokenizer files.

A checkpoint folder holds `config.json`; weights as `model.safetensors`, sharded safetensors with
`model.safetensors.index.json`, or `pytorch_model.bin` (also sharded); a tokenizer as
`tokenizer.json` (the `tokenizers` library's format) and/or `tokenizer.model` (SentencePiece);
`tokenizer_config.json` (special tokens, `chat_template`) and `generation_config.json` (eos ids).
A sentence-transformers folder adds `modules.json` and its modules' folders (`1_Pooling/config.json`:
how token states become one embedding).

This module is cheap to import: torch and safetensors are imported only when tensors are read.
Every problem a user can cause is a one-line `ConversionError`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmdesk.errors import LlmdeskError

TRAIN_EXTRA_HINT = "pip install 'llmdesk[train]'"


class ConversionError(LlmdeskError):
    """A checkpoint that cannot be converted (not a checkpoint, unsupported, inconsistent)."""


def require_train_extra(*modules: str) -> None:
    """Fail in one line, naming the extra to install, when torch & co. are missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise LlmdeskError(f"this needs {', '.join(missing)}, which is not installed: {TRAIN_EXTRA_HINT}")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConversionError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: {what} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: {what} is not a JSON object")
    return data


@dataclass
class Checkpoint:
    """A Hugging Face checkpoint folder, read lazily."""

    path: Path
    config: dict[str, Any]
    weight_files: list[Path]
    tokenizer_json: dict[str, Any] | None = field(default=None, repr=False)
    sp_model: Path | None = None
    tokenizer_config: dict[str, Any] = field(default_factory=dict, repr=False)
    generation_config: dict[str, Any] = field(default_factory=dict, repr=False)
    special_tokens_map: dict[str, Any] = field(default_factory=dict, repr=False)
    pooling: str | None = None  # a sentence-transformers folder's Pooling: "mean", "cls" or "last"

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        if archs and isinstance(archs[0], str):
            return archs[0]
        return str(self.config.get("model_type") or "unknown")

    def cfg(self, *names: str, default: Any = None) -> Any:
        """The first of `names` present in config.json (text_config too, for multimodal wrappers)."""
        for n in names:
            if self.config.get(n) is not None:
                return self.config[n]
        return default

    def tensors(self) -> Iterator["LazyTensor"]:
        """Every tensor of the weight files, in file order, as name and shape; its data is read
        only when `LazyTensor.load()` is called, so a converter holds one tensor at a time."""
        require_train_extra("torch")
        for f in self.weight_files:
            try:
                if f.suffix == ".safetensors":
                    require_train_extra("safetensors")
                    from safetensors import safe_open

                    with safe_open(str(f), framework="pt") as st:
                        names = list(st.keys())
                        shapes = [tuple(st.get_slice(n).get_shape()) for n in names]
                    for name, shape in zip(names, shapes):
                        yield LazyTensor(name, shape, f)
                else:
                    import torch

                    # memory-mapped: a tensor's bytes are read when it is used
                    state = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
                    for name, t in state.items():
                        if isinstance(t, torch.Tensor):
                            yield LazyTensor(name, tuple(t.shape), f, t)
            except ConversionError:
                raise
            except Exception as e:  # safetensors/torch raise many types for a damaged file
                raise ConversionError(f"{f}: cannot read the weights ({type(e).__name__}: {e})") from None


@dataclass
class LazyTensor:
    name: str
    shape: tuple[int, ...]
    file: Path
    mapped: Any = field(default=None, repr=False)  # a memory-mapped torch tensor (pytorch_model.bin)

    def load(self) -> np.ndarray:
        """The tensor as float32."""
        import torch

        try:
            if self.file.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(self.file), framework="pt") as st:
                    t = st.get_tensor(self.name)
            else:
                t = self.mapped
            return t.to(torch.float32).numpy()
        except Exception as e:  # a file damaged after its index was read
            raise ConversionError(f"{self.file}: cannot read {self.name} ({type(e).__name__}: {e})") from None


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Find and read the metadata of a checkpoint folder; one-line errors for what is missing."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConversionError(f"{path}: no such folder (give a Hugging Face checkpoint folder)")
    if not path.is_dir():
        raise ConversionError(f"{path}: is a file, not a checkpoint folder (give the folder with config.json)")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ConversionError(f"{path}: not a Hugging Face checkpoint (no config.json in the folder)")
    config = _read_json(cfg_path, "config.json")
    weights = _weight_files(path)

    ckpt = Checkpoint(path, config, weights)
    tj = path / "tokenizer.json"
    if tj.exists():
        ckpt.tokenizer_json = _read_json(tj, "tokenizer.json")
    sp = path / "tokenizer.model"
    if sp.exists():
        ckpt.sp_model = sp
    if ckpt.tokenizer_json is None and ckpt.sp_model is None:
        raise ConversionError(f"{path}: no tokenizer (need tokenizer.json or tokenizer.model beside config.json)")
    for attr, name in (("tokenizer_config", "tokenizer_config.json"), ("generation_config", "generation_config.json"),
                       ("special_tokens_map", "special_tokens_map.json")):
        p = path / name
        if p.exists():
            setattr(ckpt, attr, _read_json(p, name))
    ckpt.pooling = _sentence_transformers_pooling(path)
    return ckpt


# sentence-transformers modules llama.cpp computes: the transformer itself, its pooling, and the
# L2 normalisation (which Model.embed applies)
_ST_MODULES = {"Transformer", "Pooling", "Normalize"}
_ST_POOLING = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_lasttoken": "last"}


def _sentence_transformers_pooling(path: Path) -> str | None:
    """How a sentence-transformers folder (`modules.json`) pools token states: "mean", "cls" or
    "last"; None for a plain transformers folder. A module llama.cpp cannot compute (a Dense
    projection, max pooling) is a one-line error."""
    mj = path / "modules.json"
    if not mj.is_file():
        return None
    try:
        modules = json.loads(mj.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{mj}: cannot read modules.json ({e})") from None
    if not isinstance(modules, list):
        raise ConversionError(f"{mj}: modules.json is not a list of modules")
    pooling = None
    for m in modules:
        kind = str(m.get("type", "")).rpartition(".")[2] if isinstance(m, dict) else ""
        if kind not in _ST_MODULES:
            raise ConversionError(f"{mj}: the sentence-transformers module {kind or repr(m)} is not supported "
                                  f"(llama.cpp computes {', '.join(sorted(_ST_MODULES))})")
        if kind == "Pooling":
            cfg = _read_json(path / str(m.get("path", "")) / "config.json", "the Pooling config")
            modes = [v for k, v in _ST_POOLING.items() if cfg.get(k)]
            others = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v and k not in _ST_POOLING]
            if others or len(modes) != 1:
                shown = " + ".join(others + [k for k in _ST_POOLING if cfg.get(k)]) or "no pooling mode"
                raise ConversionError(f"{path / str(m.get('path', ''))}/config.json: {shown} is not supported "
                                      "(llama.cpp pools by one of: the mean, the CLS token, the last token)")
            pooling = modes[0]
    return pooling


def _weight_files(path: Path) -> list[Path]:
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = path / index_name
        if index.exists():
            data = _read_json(index, index_name)
            wm = data.get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise ConversionError(f"{index}: has no weight_map")
            files = sorted({path / str(v) for v in wm.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ConversionError(f"{index}: names shards that are missing: {', '.join(missing[:3])}")
            return files
        if (path / single).is_file():
            return [path / single]
    raise ConversionError(
        f"{path}: no weights (need model.safetensors, sharded safetensors with an index, or pytorch_model.bin)")
