"""A PEFT LoRA adapter folder -> a llama.cpp LoRA GGUF, written with the `gguf` package.

One story, top to bottom:
  1. read the adapter folder: `adapter_config.json` (a LoRA: peft_type "LORA", no DoRA, no
     trained biases) and `adapter_model.safetensors` (or `adapter_model.bin`), through
     formats/hf.py's lazy tensor reader (torch only when tensors are read);
  2. read the base it was trained on: a Hugging Face folder (only config.json is needed), its
     config as a dict, or the base's GGUF file (then the shapes checked are the file's own);
  3. pair each module's lora_A (r, in) and lora_B (out, r), name it as the base's converter names
     the module's weight (formats.convert.gguf_tensor: gguf's tensor-name map), check
     (out, in) against the base, and give B llama's q/k row order for its RoPE (W = B A, so
     permuting W's rows is permuting B's);
  4. write to a temporary name and rename: general.type "adapter", general.architecture the
     base's, adapter.type "lora", adapter.lora.alpha, and tensors `<base tensor>.lora_a` /
     `.lora_b`, as llama.cpp's convert_lora_to_gguf.py writes them.

llama.cpp adds `scale * alpha / r * B (A x)` to each adapted matmul (llama-adapter.h,
`get_scale`: alpha / rank, rank read from the tensor), where PEFT adds `lora_alpha / r * B (A x)`
(`lora_alpha / sqrt(r)` with rsLoRA, per-module alphas with `alpha_pattern`). The file keeps
the config's lora_alpha; where PEFT's factor for a module differs from llama.cpp's (rsLoRA,
alpha_pattern), the difference is multiplied into that module's B, so a scale of 1 at run time
is PEFT's adapter, exactly.

llama.cpp's shapes (ggml order, ne0 first): a model weight is (in, out); lora_a is (in, r) and
lora_b is (r, out) (llama_adapter_lora_init_impl checks model ne0 == a ne0, model ne1 == b ne1,
a ne1 == b ne0). numpy keeps them as PEFT does: A (r, in), B (out, r).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from llmdesk.atomic import atomic_path
from llmdesk.formats.convert import (ARCHITECTURES, config_shape, expected_shape, gguf_tensor, output_path,
                                     permute_rope)
from llmdesk.formats.gguf_write import add_tensor_info, encode, file_type
from llmdesk.formats.hf import Checkpoint, ConversionError, LazyTensor, _read_json
from llmdesk.formats.shape import ModelShape

# the matrices of a transformer block a LoRA may adapt (GGUF names without "blk.N.")
TARGETS = {
    "attn_q.weight": "q_proj", "attn_k.weight": "k_proj", "attn_v.weight": "v_proj",
    "attn_output.weight": "o_proj", "attn_qkv.weight": "qkv_proj",
    "ffn_gate.weight": "gate_proj", "ffn_up.weight": "up_proj", "ffn_down.weight": "down_proj",
}
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_BLOCK = re.compile(r"^blk\.\d+\.")


@dataclass
class LoraResult:
    path: Path
    architecture: str  # the base's GGUF architecture, e.g. "llama"
    rank: int  # the largest rank (rank_pattern may give some modules another)
    alpha: float  # adapter.lora.alpha as written
    targets: list[str]  # the adapted modules, PEFT's names: ["q_proj", "v_proj"]
    n_tensors: int  # lora_a + lora_b tensors
    out_type: str
    size_bytes: int
    base: str  # what the shapes were checked against

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "path": str(self.path)}


# =============================================================================================
# 1. the adapter folder


@dataclass
class Adapter:
    """A PEFT LoRA adapter folder, its config read and checked, its tensors not yet read."""

    path: Path
    config: dict[str, Any]
    weights: Path
    r: int
    alpha: float
    rslora: bool
    alpha_pattern: dict[str, float]

    def module_scale(self, module: str, rank: int) -> float:
        """PEFT's factor for `module` (its LoraLayer.scaling): alpha / r, or alpha / sqrt(r) with
        rsLoRA; alpha from alpha_pattern when a key there names the module (peft's
        get_pattern_key: the key is the module's name or a dotted suffix of it)."""
        alpha = next((float(v) for k, v in self.alpha_pattern.items() if re.match(rf"(.*\.)?{k}$", module)),
                     self.alpha)
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank


def read_adapter(adapter_dir: str | os.PathLike) -> Adapter:
    """Find and check a PEFT LoRA adapter folder; one-line errors for what is missing or not LoRA."""
    path = Path(adapter_dir).expanduser()
    if not path.is_dir():
        what = "no such folder" if not path.exists() else "is a file, not an adapter folder"
        raise ConversionError(f"{path}: {what} (give the folder PEFT's save_pretrained wrote: "
                              "adapter_config.json and adapter_model.safetensors)")
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        hint = " (this is a model checkpoint, not an adapter)" if (path / "config.json").is_file() else ""
        raise ConversionError(f"{path}: not a PEFT adapter: no adapter_config.json{hint}")
    cfg = _read_json(cfg_path, "adapter_config.json")
    kind = str(cfg.get("peft_type", "")).upper()
    if kind != "LORA":
        raise ConversionError(f"{cfg_path}: peft_type is {cfg.get('peft_type')!r}, not LORA; llama.cpp "
                              "applies LoRA adapters only (merge this one into the model and convert that)")
    if cfg.get("use_dora"):
        raise ConversionError(f"{cfg_path}: a DoRA adapter (use_dora); llama.cpp applies plain LoRA only "
                              "(merge it with merge_and_unload and convert the merged model)")
    if cfg.get("bias", "none") not in (None, "none") or cfg.get("lora_bias"):
        raise ConversionError(f"{cfg_path}: the adapter trains biases (bias {cfg.get('bias')!r}); llama.cpp's "
                              "LoRA has none (merge it into the model and convert that)")
    if cfg.get("fan_in_fan_out"):
        raise ConversionError(f"{cfg_path}: fan_in_fan_out adapters (GPT-2's Conv1D) are not supported")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ConversionError(f"{cfg_path}: r must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise ConversionError(f"{cfg_path}: lora_alpha must be a number, got {alpha!r}")
    pattern = cfg.get("alpha_pattern") or {}
    if not isinstance(pattern, dict) or not all(isinstance(v, (int, float)) for v in pattern.values()):
        raise ConversionError(f"{cfg_path}: alpha_pattern must map module names to numbers")
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (path / name).is_file():
            weights = path / name
            break
    else:
        raise ConversionError(f"{path}: no adapter weights (need adapter_model.safetensors or adapter_model.bin)")
    return Adapter(path, cfg, weights, r=r, alpha=float(alpha), rslora=bool(cfg.get("use_rslora")),
                   alpha_pattern={str(k): float(v) for k, v in pattern.items()})


# =============================================================================================
# 2. the base


@dataclass
class Base:
    """What the adapter is checked against: the base's shape (for names and RoPE order) and the
    numpy (out, in) shape of each weight, from its GGUF or implied by its config."""

    shape: ModelShape
    where: str
    shapes: Callable[[str], tuple[int, ...] | None]  # GGUF tensor name -> (out, in), None: not in the base


def read_base(base: Any) -> Base:
    """`base`: a Hugging Face folder (config.json is enough), a config.json file, a config as a
    dict (or anything with `to_dict()`, a transformers config), or the base's GGUF file."""
    if hasattr(base, "to_dict") and not isinstance(base, dict):
        base = base.to_dict()
    if isinstance(base, dict):
        if not base.get("architectures") and base.get("model_type"):  # a config made in code names none
            kind = f"{base['model_type']}ForCausalLM".lower()
            base = {**base, "architectures": [a for a in ARCHITECTURES if a.lower() == kind][:1] or None}
        shape = config_shape(base, "the base config")
        return Base(shape, "the base config", lambda name: expected_shape(name, shape))
    p = Path(base).expanduser()
    if p.is_dir():
        p = p / "config.json"
        if not p.is_file():
            raise ConversionError(f"{p.parent}: no config.json (give the base model's Hugging Face folder or its GGUF)")
    if not p.exists():
        raise ConversionError(f"{p}: no such base model (give its Hugging Face folder or its GGUF)")
    if p.suffix == ".gguf":
        return _gguf_base(p)
    shape = config_shape(_read_json(p, "the base's config"), p.parent)
    return Base(shape, str(p.parent), lambda name: expected_shape(name, shape))


def _gguf_base(path: Path) -> Base:
    from llmdesk.formats.gguf import read_gguf

    info = read_gguf(path)
    if info.get("general.type") == "adapter":
        raise ConversionError(f"{path}: is a LoRA adapter, not a base model")
    need = {"general.architecture": info.architecture, "block_count": info.block_count,
            "attention.head_count": info.head_count}
    missing = [k for k, v in need.items() if not v]
    if missing:
        raise ConversionError(f"{path}: the GGUF has no {missing[0]}; it cannot be the base of an adapter")
    shape = ModelShape(name=path.stem, arch=str(info.architecture), n_layer=int(info.block_count),
                       n_embd=info.embedding_length or 0, n_head=int(info.head_count),
                       n_head_kv=int(info.head_count_kv or info.head_count), source=str(path))
    # ggml keeps ne0 (the row, `in`) first: numpy's (out, in) is the reverse
    shapes = {t.name: tuple(reversed(t.shape)) for t in info.tensors}
    return Base(shape, str(path), shapes.get)


# =============================================================================================
# 3. pairs, checked


@dataclass
class _Pair:
    module: str  # PEFT's module name, "model.layers.0.self_attn.q_proj"
    name: str  # the base's GGUF tensor, "blk.0.attn_q.weight"
    a: LazyTensor
    b: LazyTensor
    heads: int  # B's rows go to llama.cpp's RoPE order by this many heads (0: as they are)
    factor: float  # B is multiplied by this: PEFT's scaling over llama.cpp's

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        a = self.a.load()  # (r, in)
        b = self.b.load()  # (out, r)
        if self.heads:
            b = permute_rope(b, self.heads)
        if self.factor != 1.0:
            b = b * np.float32(self.factor)
        return np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)


def _plan(ad: Adapter, base: Base) -> list[_Pair]:
    ck = Checkpoint(ad.path, ad.config, [ad.weights])
    halves: dict[str, dict[str, LazyTensor]] = {}
    extras: list[LazyTensor] = []  # not LoRA pairs: refused once the pairs' targets are checked
    for t in ck.tensors():
        m = _LORA_KEY.match(t.name)
        if m is None:
            extras.append(t)
            continue
        if len(t.shape) != 2:
            raise ConversionError(f"{ad.weights}: tensor {t.name!r} has shape {t.shape}, not a matrix")
        halves.setdefault(m["module"], {})[m["ab"]] = t
    if not halves and not extras:
        raise ConversionError(f"{ad.weights}: holds no LoRA tensors")
    s = base.shape
    pairs = []
    for module, ab in halves.items():
        if set(ab) != {"A", "B"}:
            raise ConversionError(f"{ad.weights}: module {module!r} has lora_{next(iter(ab))} but not "
                                  f"lora_{'B' if 'A' in ab else 'A'}")
        a, b = ab["A"], ab["B"]
        name, heads = gguf_tensor(module + ".weight", s)
        kind = _BLOCK.sub("", name or "")
        layer = re.search(r"\.layers\.(\d+)\.", module)
        if name is None and layer and int(layer[1]) >= s.n_layer:
            raise ConversionError(f"{ad.path}: the adapter adapts {module}, in layer {layer[1]}, but {base.where} "
                                  f"has {s.n_layer} layers: the adapter was trained for another base model")
        if kind not in TARGETS:
            short = module.rsplit(".", 1)[-1]
            raise ConversionError(f"{ad.path}: the adapter targets {short!r} ({module}), which llama.cpp "
                                  f"adapters from llmdesk do not support for {s.arch}; supported: "
                                  f"{', '.join(TARGETS.values())}")
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise ConversionError(f"{ad.weights}: {module}: lora_A is {a.shape} and lora_B is {b.shape}; "
                                  "their ranks differ")
        want = base.shapes(name)
        got = (b.shape[0], a.shape[1])
        if want is None:
            raise ConversionError(f"{ad.path}: the adapter adapts {module} ({name}), which {base.where} does "
                                  "not have: the adapter was trained for another base model")
        if got != want:
            raise ConversionError(f"{ad.path}: {module} is {got[0]} x {got[1]} in the adapter but {name} is "
                                  f"{want[0]} x {want[1]} in {base.where}: the adapter was trained for "
                                  "another base model")
        llama_scale = ad.alpha / rank if ad.alpha else 1.0  # llama-adapter.h get_scale, at scale 1
        pairs.append(_Pair(module, name, a, b, heads, ad.module_scale(module, rank) / llama_scale))
    for t in extras:
        kind = ("a trained bias" if t.name.endswith(".bias") else
                "a copy of a base weight (modules_to_save or save_embedding_layers)" if ".base_layer." in t.name
                or "embed" in t.name or "lm_head" in t.name else "not a lora_A/lora_B weight")
        raise ConversionError(f"{ad.weights}: tensor {t.name!r} is {kind}; llama.cpp applies only LoRA "
                              "pairs (merge this adapter into the model and convert that instead)")
    return sorted(pairs, key=lambda p: _order(p.name))


def _order(name: str) -> tuple[int, str]:
    m = re.match(r"blk\.(\d+)\.(.*)", name)
    return (int(m[1]), m[2]) if m else (-1, name)


# =============================================================================================
# 4. the file


def convert_lora(adapter_dir: str | os.PathLike, base: Any, out: str | os.PathLike, *, out_type: str = "f32",
                 name: str | None = None, progress: Callable[[str], None] | None = None) -> LoraResult:
    """Write the PEFT LoRA adapter in `adapter_dir` as a llama.cpp LoRA GGUF `out`, checked
    against `base` (see `read_base`; None: the adapter config's base_model_name_or_path, when
    that is a local folder). Every problem is a one-line ConversionError, before anything is
    written; the file appears whole or not at all."""
    out = output_path(out, out_type, "adapter.gguf")
    say = progress or (lambda _msg: None)
    ad = read_adapter(adapter_dir)
    if base is None:
        named = ad.config.get("base_model_name_or_path")
        if not named or not Path(str(named)).expanduser().is_dir():
            raise ConversionError(f"{ad.path}: give the base model (its Hugging Face folder or GGUF); the "
                                  f"adapter names {named!r}, which is not a folder here")
        base = named
    b = read_base(base)
    say("reading the adapter")
    pairs = _plan(ad, b)
    import gguf

    arch = b.shape.arch
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        try:
            w.add_type(gguf.GGUFType.ADAPTER)
            w.add_string(gguf.Keys.Adapter.TYPE, "lora")
            w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, ad.alpha)
            w.add_name(name or ad.path.resolve().name)
            w.add_file_type(file_type(out_type))
            for p in pairs:
                add_tensor_info(w, p.name + ".lora_a", p.a.shape, out_type)
                add_tensor_info(w, p.name + ".lora_b", p.b.shape, out_type)
            say(f"writing {out.name}")
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for p in pairs:  # one module in memory at a time
                a, bm = p.load()
                w.write_tensor_data(encode(p.name + ".lora_a", a, out_type))
                w.write_tensor_data(encode(p.name + ".lora_b", bm, out_type))
        finally:
            w.close()
    targets = sorted({p.module.rsplit(".", 1)[-1] for p in pairs})
    return LoraResult(path=out, architecture=arch, rank=max(p.a.shape[0] for p in pairs), alpha=ad.alpha,
                      targets=targets, n_tensors=2 * len(pairs), out_type=out_type,
                      size_bytes=out.stat().st_size, base=b.where)


def write_lora_gguf(adapter_dir: str | os.PathLike, base_dir_or_config: Any, out_path: str | os.PathLike, *,
                    out_type: str = "f32") -> Path:
    """The PEFT LoRA adapter `adapter_dir` as a llama.cpp LoRA GGUF at `out_path`, for the base
    `base_dir_or_config` (its Hugging Face folder, config dict or GGUF); returns the path."""
    return convert_lora(adapter_dir, base_dir_or_config, out_path, out_type=out_type).path


def lora_mismatch(adapter, base, names: tuple[str, str] | None = None) -> str | None:
    """Why the LoRA GGUF `adapter` cannot apply to the model `base` (both formats.gguf.GGUFInfo;
    `names`: the two as the user knows them, default their file names), or None when it can: the
    checks llama.cpp's llama_adapter_lora_init makes, from the headers alone (a model's weight is
    ne (in, out); its lora_a (in, r), its lora_b (r, out))."""
    mine, shown = names or (adapter.path.name, base.path.name)
    if adapter.get("general.type") != "adapter" or adapter.get("adapter.type") != "lora":
        return f"{mine} is not a LoRA adapter (a {adapter.get('general.type') or 'model'} file)"
    if adapter.architecture != base.architecture:
        return (f"{mine} is an adapter for {adapter.architecture!r} models, and {shown} "
                f"is {base.architecture!r}")
    weights = {t.name: t.shape for t in base.tensors}
    loras = {t.name: t.shape for t in adapter.tensors}
    for name, a in loras.items():
        if not name.endswith(".lora_a"):
            continue
        target = name[: -len(".lora_a")]
        b, w = loras.get(target + ".lora_b"), weights.get(target)
        if w is None:
            return f"{mine} adapts {target}, which {shown} does not have"
        if b is None or len(a) < 2 or len(b) < 2 or len(w) < 2 or (w[0], w[1]) != (a[0], b[1]):
            got = f"{a[0]} x {b[1]}" if b is not None and len(a) > 1 and len(b) > 1 else "unpaired"
            return (f"{mine} adapts {target} as {got}, but it is {w[0]} x {w[1]} in {shown}: "
                    "the adapter was made for another base model")
    return None
