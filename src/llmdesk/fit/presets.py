"""The shapes of real models, as plain data, and how to get a shape from what a user names.

Each preset is copied from the model's Hugging Face `config.json` (the repo is named in the
comment): layers, widths, heads and KV heads (GQA), feed-forward width, vocabulary, trained
context, tied embeddings, experts. That is all fit needs to count bytes; nothing is downloaded.

`resolve_shape(ref)` accepts a preset name, a GGUF file (or a store name), an HF `config.json`
or a checkpoint folder holding one.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import LlmdeskError
from ..formats.shape import ModelShape


class UnknownModel(LlmdeskError):
    """A preset name that is not in the table (the message lists close matches)."""


def _p(name: str, **kw: Any) -> ModelShape:
    return ModelShape(name=name, **kw)


# n_merges: the length of tokenizer.ggml.merges in llama.cpp's conversions of these models
# (Llama 3: 280,147; Qwen 2.5: 151,387; SmolLM2: 48,900); the others use SentencePiece.
# fmt: off
PRESETS: dict[str, ModelShape] = {s.name: s for s in [
    # meta-llama/Llama-2-7b-hf config.json
    _p("llama-2-7b", arch="llama", n_layer=32, n_embd=4096, n_head=32, n_head_kv=32, n_ff=11008,
       n_vocab=32000, n_ctx_train=4096, source="meta-llama/Llama-2-7b-hf"),
    # meta-llama/Llama-2-13b-hf config.json
    _p("llama-2-13b", arch="llama", n_layer=40, n_embd=5120, n_head=40, n_head_kv=40, n_ff=13824,
       n_vocab=32000, n_ctx_train=4096, source="meta-llama/Llama-2-13b-hf"),
    # meta-llama/Llama-2-70b-hf config.json (GQA: 8 KV heads)
    _p("llama-2-70b", arch="llama", n_layer=80, n_embd=8192, n_head=64, n_head_kv=8, n_ff=28672,
       n_vocab=32000, n_ctx_train=4096, source="meta-llama/Llama-2-70b-hf"),
    # huggyllama/llama-65b config.json (the original LLaMA 65B)
    _p("llama-65b", arch="llama", n_layer=80, n_embd=8192, n_head=64, n_head_kv=64, n_ff=22016,
       n_vocab=32000, n_ctx_train=2048, source="huggyllama/llama-65b"),
    # meta-llama/Llama-3.1-8B config.json
    _p("llama-3.1-8b", arch="llama", n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336,
       n_vocab=128256, n_ctx_train=131072, n_merges=280147, source="meta-llama/Llama-3.1-8B"),
    # meta-llama/Llama-3.1-70B config.json
    _p("llama-3.1-70b", arch="llama", n_layer=80, n_embd=8192, n_head=64, n_head_kv=8, n_ff=28672,
       n_vocab=128256, n_ctx_train=131072, n_merges=280147, source="meta-llama/Llama-3.1-70B"),
    # meta-llama/Llama-3.2-1B config.json (tie_word_embeddings: true, head_dim 64)
    _p("llama-3.2-1b", arch="llama", n_layer=16, n_embd=2048, n_head=32, n_head_kv=8, n_ff=8192,
       n_vocab=128256, n_ctx_train=131072, head_dim=64, tied_embeddings=True, n_merges=280147, source="meta-llama/Llama-3.2-1B"),
    # meta-llama/Llama-3.2-3B config.json (tie_word_embeddings: true, head_dim 128)
    _p("llama-3.2-3b", arch="llama", n_layer=28, n_embd=3072, n_head=24, n_head_kv=8, n_ff=8192,
       n_vocab=128256, n_ctx_train=131072, head_dim=128, tied_embeddings=True, n_merges=280147, source="meta-llama/Llama-3.2-3B"),
    # mistralai/Mistral-7B-v0.3 config.json (no sliding window in v0.3)
    _p("mistral-7b", arch="llama", n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336,
       n_vocab=32768, n_ctx_train=32768, source="mistralai/Mistral-7B-v0.3"),
    # mistralai/Mixtral-8x7B-v0.1 config.json (8 experts, 2 per token)
    _p("mixtral-8x7b", arch="llama", n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336,
       n_vocab=32000, n_ctx_train=32768, n_expert=8, n_expert_used=2, source="mistralai/Mixtral-8x7B-v0.1"),
    # Qwen/Qwen2.5-0.5B config.json
    _p("qwen2.5-0.5b", arch="qwen2", n_layer=24, n_embd=896, n_head=14, n_head_kv=2, n_ff=4864,
       n_vocab=151936, n_ctx_train=32768, tied_embeddings=True, n_merges=151387, source="Qwen/Qwen2.5-0.5B"),
    # Qwen/Qwen2.5-1.5B config.json
    _p("qwen2.5-1.5b", arch="qwen2", n_layer=28, n_embd=1536, n_head=12, n_head_kv=2, n_ff=8960,
       n_vocab=151936, n_ctx_train=32768, tied_embeddings=True, n_merges=151387, source="Qwen/Qwen2.5-1.5B"),
    # Qwen/Qwen2.5-3B config.json
    _p("qwen2.5-3b", arch="qwen2", n_layer=36, n_embd=2048, n_head=16, n_head_kv=2, n_ff=11008,
       n_vocab=151936, n_ctx_train=32768, tied_embeddings=True, n_merges=151387, source="Qwen/Qwen2.5-3B"),
    # Qwen/Qwen2.5-7B config.json
    _p("qwen2.5-7b", arch="qwen2", n_layer=28, n_embd=3584, n_head=28, n_head_kv=4, n_ff=18944,
       n_vocab=152064, n_ctx_train=131072, n_merges=151387, source="Qwen/Qwen2.5-7B"),
    # Qwen/Qwen2.5-14B config.json
    _p("qwen2.5-14b", arch="qwen2", n_layer=48, n_embd=5120, n_head=40, n_head_kv=8, n_ff=13824,
       n_vocab=152064, n_ctx_train=131072, n_merges=151387, source="Qwen/Qwen2.5-14B"),
    # Qwen/Qwen2.5-32B config.json
    _p("qwen2.5-32b", arch="qwen2", n_layer=64, n_embd=5120, n_head=40, n_head_kv=8, n_ff=27648,
       n_vocab=152064, n_ctx_train=131072, n_merges=151387, source="Qwen/Qwen2.5-32B"),
    # Qwen/Qwen2.5-72B config.json
    _p("qwen2.5-72b", arch="qwen2", n_layer=80, n_embd=8192, n_head=64, n_head_kv=8, n_ff=29568,
       n_vocab=152064, n_ctx_train=131072, n_merges=151387, source="Qwen/Qwen2.5-72B"),
    # microsoft/Phi-3-mini-4k-instruct config.json (llama.cpp fuses q/k/v and gate/up)
    _p("phi-3-mini", arch="phi3", n_layer=32, n_embd=3072, n_head=32, n_head_kv=32, n_ff=8192,
       n_vocab=32064, n_ctx_train=4096, source="microsoft/Phi-3-mini-4k-instruct"),
    # google/gemma-2-2b config.json (head_dim 256, sliding window 4096 on every other layer)
    _p("gemma-2-2b", arch="gemma2", n_layer=26, n_embd=2304, n_head=8, n_head_kv=4, n_ff=9216,
       n_vocab=256000, n_ctx_train=8192, head_dim=256, tied_embeddings=True, n_swa=4096, swa_every=2,
       source="google/gemma-2-2b"),
    # google/gemma-2-9b config.json
    _p("gemma-2-9b", arch="gemma2", n_layer=42, n_embd=3584, n_head=16, n_head_kv=8, n_ff=14336,
       n_vocab=256000, n_ctx_train=8192, head_dim=256, tied_embeddings=True, n_swa=4096, swa_every=2,
       source="google/gemma-2-9b"),
    # google/gemma-2-27b config.json (head_dim 128)
    _p("gemma-2-27b", arch="gemma2", n_layer=46, n_embd=4608, n_head=32, n_head_kv=16, n_ff=36864,
       n_vocab=256000, n_ctx_train=8192, head_dim=128, tied_embeddings=True, n_swa=4096, swa_every=2,
       source="google/gemma-2-27b"),
    # TinyLlama/TinyLlama-1.1B-Chat-v1.0 config.json
    _p("tinyllama-1.1b", arch="llama", n_layer=22, n_embd=2048, n_head=32, n_head_kv=4, n_ff=5632,
       n_vocab=32000, n_ctx_train=2048, source="TinyLlama/TinyLlama-1.1B-Chat-v1.0"),
    # HuggingFaceTB/SmolLM2-135M config.json
    _p("smollm2-135m", arch="llama", n_layer=30, n_embd=576, n_head=9, n_head_kv=3, n_ff=1536,
       n_vocab=49152, n_ctx_train=8192, tied_embeddings=True, n_merges=48900, source="HuggingFaceTB/SmolLM2-135M"),
    # HuggingFaceTB/SmolLM2-360M config.json
    _p("smollm2-360m", arch="llama", n_layer=32, n_embd=960, n_head=15, n_head_kv=5, n_ff=2560,
       n_vocab=49152, n_ctx_train=8192, tied_embeddings=True, n_merges=48900, source="HuggingFaceTB/SmolLM2-360M"),
    # HuggingFaceTB/SmolLM2-1.7B config.json
    _p("smollm2-1.7b", arch="llama", n_layer=24, n_embd=2048, n_head=32, n_head_kv=32, n_ff=8192,
       n_vocab=49152, n_ctx_train=8192, tied_embeddings=True, n_merges=48900, source="HuggingFaceTB/SmolLM2-1.7B"),
]}
# fmt: on

# other spellings people type
ALIASES = {
    "llama2-7b": "llama-2-7b", "llama2-13b": "llama-2-13b", "llama2-70b": "llama-2-70b",
    "llama3.1-8b": "llama-3.1-8b", "llama3-8b": "llama-3.1-8b", "llama-3-8b": "llama-3.1-8b",
    "llama3.1-70b": "llama-3.1-70b", "llama-3-70b": "llama-3.1-70b",
    "llama3.2-1b": "llama-3.2-1b", "llama3.2-3b": "llama-3.2-3b", "mistral-7b-v0.3": "mistral-7b",
    "tinyllama": "tinyllama-1.1b", "phi3-mini": "phi-3-mini", "phi-3-mini-4k": "phi-3-mini",
}


def get_preset(name: str) -> ModelShape:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key in PRESETS:
        return PRESETS[key]
    close = difflib.get_close_matches(key, list(PRESETS) + list(ALIASES), n=4, cutoff=0.5)
    close = list(dict.fromkeys(ALIASES.get(c, c) for c in close))
    hint = f"did you mean {', '.join(close)}?" if close else "see 'llmdesk fit --presets' for the list"
    raise UnknownModel(f"unknown model preset '{name}'; {hint}")


# ---------------------------------------------------------------------------------------------
# shapes from an HF config.json


def from_hf_config(cfg: dict[str, Any], name: str = "", where: str = "config.json", n_merges: int = 0) -> ModelShape:
    """A shape from a transformers config.json (Llama, Mistral, Mixtral, Qwen 2, Gemma 2, Phi-3);
    `n_merges` from the tokenizer beside it (`count_merges`)."""
    text = cfg.get("text_config") or {}  # multimodal wrappers keep the LM's config here
    c = {**text, **{k: v for k, v in cfg.items() if k != "text_config"}} if text else cfg
    mt = str(c.get("model_type", "llama"))
    arch = {"qwen2": "qwen2", "gemma2": "gemma2", "phi3": "phi3", "mixtral": "llama", "mistral": "llama"}.get(mt, "llama")
    try:
        n_head = int(c["num_attention_heads"])
        n_embd = int(c["hidden_size"])
        shape = ModelShape(
            name=name or str(c.get("_name_or_path") or mt),
            arch=arch,
            n_layer=int(c["num_hidden_layers"]),
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=int(c.get("num_key_value_heads") or n_head),
            n_ff=int(c["intermediate_size"]),
            n_vocab=int(c["vocab_size"]),
            n_ctx_train=int(c.get("max_position_embeddings") or 4096),
            head_dim=int(c.get("head_dim") or n_embd // n_head),
            tied_embeddings=bool(c.get("tie_word_embeddings", False)),
            n_expert=int(c.get("num_local_experts") or c.get("num_experts") or 0),
            n_expert_used=int(c.get("num_experts_per_tok") or 0),
            n_swa=int(c.get("sliding_window") or 0) if arch == "gemma2" else 0,
            swa_every=2 if arch == "gemma2" else 0,
            n_merges=n_merges,
            source="config.json",
        )
    except KeyError as e:
        raise LlmdeskError(f"{where}: not a transformers model config (no {e.args[0]}); "
                           "give a model's config.json, a GGUF file or a preset name") from None
    except (TypeError, ValueError) as e:
        raise LlmdeskError(f"{where}: unreadable model config ({e})") from None
    return shape


def from_gguf(path: str | Path) -> tuple[ModelShape, Any]:
    """The shape stored in a GGUF file's metadata, with the file's own tensor types."""
    from ..formats.gguf import read_gguf

    info = read_gguf(path)
    return shape_of_gguf(info, path), info


def shape_of_gguf(info: Any, path: str | Path) -> ModelShape:
    """The shape of an already read GGUF (`formats.gguf.read_gguf`)."""
    arch = info.architecture or "llama"
    md = info.metadata

    def k(name: str, default: int = 0) -> int:
        v = md.get(f"{arch}.{name}", default)
        if isinstance(v, list):
            v = max((x for x in v if isinstance(x, int)), default=default)
        return int(v) if isinstance(v, (int, float)) else default

    n_embd = info.embedding_length or 0
    n_head = info.head_count or 1
    if not n_embd or not info.block_count:
        raise LlmdeskError(f"{Path(path).name}: the GGUF has no {arch}.embedding_length/block_count; "
                           "fit knows decoder-only transformers")
    names = {t.name for t in info.tensors}
    return ModelShape(
        name=info.name or Path(path).stem,
        arch=arch,
        n_layer=info.block_count,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=info.head_count_kv or n_head,
        n_ff=info.feed_forward_length or 0,
        n_vocab=info.vocab_size or 0,
        n_ctx_train=info.context_length or 0,
        head_dim=k("attention.key_length", n_embd // n_head),
        tied_embeddings="output.weight" not in names,
        n_expert=k("expert_count"),
        n_expert_used=k("expert_used_count"),
        n_swa=k("attention.sliding_window"),
        swa_every=2 if arch == "gemma2" and k("attention.sliding_window") else 0,
        n_merges=len(md.get("tokenizer.ggml.merges") or ()),
        causal=md.get(f"{arch}.attention.causal", True) is not False,
        source=str(path),
        tensor_types={t.name: t.type_name for t in info.tensors},
    )


@dataclass
class ModelSource:
    """A shape and, when the user named a file, the file's own facts."""

    shape: ModelShape
    kind: str  # "preset" | "gguf" | "config"
    path: Path | None = None
    gguf: Any = None  # GGUFInfo for a GGUF file
    file_type: str | None = None  # the GGUF's quantization ("Q4_K_M"), if any


def resolve_shape(ref: str) -> ModelSource:
    """MODEL as fit takes it: a preset, a .gguf (or store name), a config.json or a folder with one."""
    if ref.startswith("hf:"):
        raise LlmdeskError(f"fit does not download models: pull {ref} first ('llmdesk pull {ref}'), "
                           "or give a preset name or the repo's config.json")
    p = Path(ref).expanduser()
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.is_file():
            raise LlmdeskError(f"{ref}: a folder without config.json; give a GGUF file, a config.json or a preset name")
        return ModelSource(from_hf_config(_read_json(cfg), name=p.name, where=str(cfg), n_merges=count_merges(p)),
                           "config", cfg)
    if p.is_file():
        with open(p, "rb") as f:
            head = f.read(1)
        if p.suffix == ".json" or head == b"{":
            return ModelSource(from_hf_config(_read_json(p), name=p.parent.name or p.stem, where=str(p),
                                              n_merges=count_merges(p.parent)), "config", p)
        shape, info = from_gguf(p)
        return ModelSource(shape, "gguf", p, info, info.file_type)
    key = ALIASES.get(ref.strip().lower(), ref.strip().lower())
    if key in PRESETS:
        return ModelSource(PRESETS[key], "preset")
    looks_like_path = "/" in ref or ref.endswith((".gguf", ".json"))
    if not looks_like_path:
        # a store name? (only if the store has it; otherwise the preset error with suggestions)
        try:
            from ..store.refs import resolve

            found = resolve(ref)
        except LlmdeskError:
            found = None
        if found is not None:
            shape, info = from_gguf(found.path)
            return ModelSource(replace(shape, name=found.name), "gguf", found.path, info, info.file_type)
        get_preset(ref)  # raises UnknownModel with close matches
    raise LlmdeskError(f"no such file: {ref}")


def count_merges(folder: Path) -> int:
    """BPE merge rules in the tokenizer of a checkpoint folder (tokenizer.json, else merges.txt);
    0 when there are none (SentencePiece) or no tokenizer files."""
    tok = folder / "tokenizer.json"
    try:
        if tok.is_file():
            merges = (json.loads(tok.read_text(encoding="utf-8")).get("model") or {}).get("merges") or []
            return len(merges)
        txt = folder / "merges.txt"
        if txt.is_file():
            lines = txt.read_text(encoding="utf-8").splitlines()
            return sum(1 for line in lines if line.strip() and not line.startswith("#version"))
    except (OSError, ValueError, AttributeError):
        pass
    return 0


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LlmdeskError(f"{path}: not a readable JSON config ({e})") from None
    if not isinstance(data, dict):
        raise LlmdeskError(f"{path}: not a model config (expected a JSON object)")
    return data
