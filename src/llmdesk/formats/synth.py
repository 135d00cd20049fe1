"""Write GGUF files with random weights and real architectures.

Tests build their own tiny models with this (no downloads), and benchmarks build models with the
exact shapes of real ones. The tokenizer is a real byte-level BPE (GPT-2 style, as in Llama 3 and
Qwen 2), trained here on a small built-in text so that common words become single tokens.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path
from .gguf_write import FILE_TYPES, add_tensor_info, add_transformer_keys, encode, file_type
from .shape import ModelShape, model_tensors

# The ChatML template as Hugging Face tokenizers ship it (Qwen 2, SmolLM 2 and others).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]

# A small built-in text the tokenizer's merges are learned from.
_BPE_TEXT = """
The quick brown fox jumps over the lazy dog. A model runs on your own machine when it fits in
memory. Quantization stores weights in fewer bits, so the file is smaller and decoding is faster.
The context length is the number of tokens the model can see at once. Tokens per second measures
speed. The KV cache holds the keys and values of every token already seen. Hello, world! How are
you today? I am fine, thank you. def main(): return 0  # code and numbers 12345 67890
"""


@dataclass(frozen=True)
class SynthConfig(ModelShape):
    """A model shape and how synth fills it. The shape's defaults are a tiny test model (f32,
    ~0.5 MB).

    Real shapes (`SynthConfig.like(shape)`, e.g. a `llmdesk.fit.presets` preset) set `n_vocab`
    (the vocabulary is padded to it with filler words), `head_dim` where it is not n_embd /
    n_head, `arch` (qwen2: biases on q/k/v; phi3: fused qkv and gate+up; gemma2: extra norms,
    soft-capping, a sliding window), experts, and `dtype` for the stored type of the 2-D weights.
    """

    n_merges: int = 200  # BPE merges learned from the built-in text (filler words add their own)
    n_vocab: int | None = None  # None: just the BPE tokens and the special tokens
    rope_freq_base: float = 10000.0
    rms_eps: float = 1e-5
    seed: int = 0
    weight_std: float = 0.35
    chat_template: str | None = CHATML_TEMPLATE
    extra_tokens: list[str] = field(default_factory=list)
    dtype: str = "f32"  # 2-D weights: "f32", "f16", "bf16" or "q8_0"; norms and biases stay f32
    pooling: str | None = None  # "mean", "cls", "last": written as {arch}.pooling_type; None: no key

    @classmethod
    def like(cls, shape: ModelShape, **settings: Any) -> "SynthConfig":
        """`shape`'s sizes filled as `settings` say. The tokenizer stays synth's own (trained on
        the built-in text, padded to n_vocab), so the real model's merge count is not taken."""
        sizes = {f.name: getattr(shape, f.name) for f in fields(ModelShape)
                 if f.name not in ("n_merges", "source", "tensor_types")}
        return cls(**{**sizes, **settings})


# the types synth writes itself; anything else is written as f16 and quantized by llama.cpp
DIRECT_TYPES = FILE_TYPES


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def train_bpe(text: str, n_merges: int) -> tuple[list[str], list[str]]:
    """Learn byte-level BPE merges on `text`. Returns (tokens, merges)."""
    b2u = _bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    # split like the GPT-2 pre-tokenizer, roughly: a leading space belongs to the word after it
    words = Counter()
    for piece in text.replace("\n", " ").split(" "):
        if piece:
            words[tuple(b2u[b] for b in (" " + piece).encode())] += 1
    merges: list[str] = []
    for _ in range(n_merges):
        pairs = Counter()
        for word, count in words.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] += count
        if not pairs:
            break
        (a, b), _count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append(f"{a} {b}")
        tokens.append(a + b)
        merged = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return tokens, merges


def _filler_tokens(n: int, tokens: list[str]) -> tuple[list[str], list[str]]:
    """`n` more words and a merge for each (ranked after the trained ones): a word followed by a
    word ending ("Ġthe" + "ing"), then longer ones made the same way. A random model then writes
    words, and its text tokenizes back to (mostly) the tokens it generated, as a real model's
    does, so a follow-up turn's prompt reuses the cache as it would with a real model."""
    heads = [t for t in tokens if t.startswith("\u0120") and t[1:].isalpha()]
    tails = [t for t in tokens if t.isalpha() and t.isascii()]
    have = set(tokens)
    words: list[str] = []
    merges: list[str] = []
    while len(words) < n:
        grown = []
        for tail in tails:
            for head in heads:
                if head + tail in have:
                    continue
                have.add(head + tail)
                grown.append(head + tail)
                words.append(head + tail)
                merges.append(f"{head} {tail}")
                if len(words) == n:
                    return words, merges
        if not grown:
            raise ValueError("the trained vocabulary has no words to build filler words from")
        heads = grown
    return words, merges


SYNTH_ARCHS = ("llama", "qwen2", "phi3", "gemma2")


def _tensor_plan(cfg: SynthConfig, n_vocab: int) -> list[tuple[str, tuple[int, ...], float | None]]:
    """(name, numpy shape (out, in) or (experts, out, in), std) of every tensor in file order, the
    tensors llama.cpp's converter writes for the architecture (`formats.shape.model_tensors`); std
    None means ones (norm weights), 0.0 means zeros (biases)."""
    plan: list[tuple[str, tuple[int, ...], float | None]] = []
    for t in model_tensors(replace(cfg, n_vocab=n_vocab)):
        dims = (t.ne2, t.ne1, t.ne0) if t.ne2 > 1 else (t.ne1, t.ne0) if t.ne1 > 1 else (t.ne0,)
        if t.name == "token_embd.weight":
            std = 1.0
        elif t.name == "output.weight":
            std = 2.0
        elif t.name.endswith("norm.weight"):
            std = None
        elif t.name.endswith(".bias"):
            std = 0.0
        else:
            std = cfg.weight_std
        plan.append((t.name, dims, std))
    return plan


def write_llama_gguf(path: str | os.PathLike, cfg: SynthConfig | None = None) -> Path:
    """Write a random-weight Llama-family model with a byte-level BPE tokenizer to `path`.

    Tensors are generated and written one at a time, so a model of a few GB needs little memory.
    The write is atomic (a `.part` file renamed at the end).
    """
    import gguf

    cfg = cfg or SynthConfig()
    if cfg.dtype not in DIRECT_TYPES:
        raise ValueError(f"synth writes {', '.join(DIRECT_TYPES)}; quantize the result for {cfg.dtype}")
    if cfg.arch not in SYNTH_ARCHS:
        raise ValueError(f"synth writes the {', '.join(SYNTH_ARCHS)} architectures, not {cfg.arch}")
    path = Path(path)
    rng = np.random.default_rng(cfg.seed)
    tokens, merges = train_bpe(_BPE_TEXT, cfg.n_merges)
    specials = SPECIAL_TOKENS + cfg.extra_tokens
    token_types = [gguf.TokenType.NORMAL] * len(tokens) + [gguf.TokenType.CONTROL] * len(specials)
    tokens = tokens + specials
    if cfg.n_vocab is not None and cfg.n_vocab > len(tokens):
        # filler words: the vocabulary (and so the embedding and output matrices, the logits)
        # has the real model's size, and a random model writes visible text, as a real one does
        # (a stream of empty pieces would hide its time to first token)
        n_fill = cfg.n_vocab - len(tokens)
        words, more = _filler_tokens(n_fill, tokens)
        tokens += words
        merges = merges + more
        token_types += [gguf.TokenType.NORMAL] * n_fill
    n_vocab = len(tokens)
    head_dim = cfg.head_dim

    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), cfg.arch)
        try:
            w.add_name(cfg.name)
            add_transformer_keys(w, n_ctx=cfg.n_ctx_train, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_ff=cfg.n_ff,
                                 n_head=cfg.n_head, n_head_kv=cfg.n_head_kv, head_dim=head_dim, n_rot=head_dim,
                                 rms_eps=cfg.rms_eps, rope_theta=cfg.rope_freq_base, n_vocab=n_vocab)
            w.add_file_type(file_type(cfg.dtype))
            if cfg.pooling is not None:  # how embeddings pool token states (llama.cpp's llama_pooling_type)
                w.add_pooling_type(gguf.PoolingType[cfg.pooling.upper()])
            if cfg.n_expert:
                w.add_expert_count(cfg.n_expert)
                w.add_expert_used_count(cfg.n_expert_used)
            if cfg.arch == "gemma2":  # Gemma 2's published values
                w.add_attn_logit_softcapping(50.0)
                w.add_final_logit_softcapping(30.0)
                w.add_sliding_window(cfg.n_swa or 4096)
            w.add_tokenizer_model("gpt2")
            w.add_tokenizer_pre("default")
            w.add_token_list(tokens)
            w.add_token_types(token_types)
            w.add_token_merges(merges)
            w.add_bos_token_id(tokens.index("<s>"))
            w.add_eos_token_id(tokens.index("<|im_end|>") if cfg.chat_template else tokens.index("</s>"))
            w.add_add_bos_token(False)
            if cfg.chat_template:
                w.add_chat_template(cfg.chat_template)

            plan = _tensor_plan(cfg, n_vocab)
            for name, shape, _std in plan:
                add_tensor_info(w, name, shape, cfg.dtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for name, shape, std in plan:
                if std is None:
                    data = np.ones(shape, dtype=np.float32)
                elif std == 0.0:
                    data = np.zeros(shape, dtype=np.float32)
                else:
                    scale = std / np.sqrt(shape[-1] / 64)
                    data = _random(rng, shape, scale)
                w.write_tensor_data(encode(name, data, cfg.dtype))
        finally:
            w.close()
    return path


def _random(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    """Random float32 values of standard deviation `scale`. Small tensors draw normal float64 (so
    the default test model keeps its exact bytes); large ones draw uniform float32 of the same
    deviation, in slices, which is several times faster for the GBs of a real-shape model."""
    n = int(np.prod(shape))
    if n <= 1 << 22:
        return (rng.standard_normal(shape) * scale).astype(np.float32)
    out = np.empty(shape, dtype=np.float32)
    flat = out.reshape(-1)
    step = 1 << 24
    for i in range(0, n, step):
        chunk = rng.random(min(step, n - i), dtype=np.float32)
        chunk -= np.float32(0.5)
        chunk *= np.float32(scale * np.sqrt(12.0))  # U(-a, a) has deviation a / sqrt(3)
        flat[i:i + step] = chunk
    return out
