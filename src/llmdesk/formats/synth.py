"""Write GGUF files with random weights and real architectures.

Tests build their own tiny models with this (no downloads), and benchmarks build models with the
exact shapes of real ones. The tokenizer is a real byte-level BPE (GPT-2 style, as in Llama 3 and
Qwen 2), trained here on a small built-in text so that common words become single tokens.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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


@dataclass
class SynthConfig:
    """Shapes of a Llama-architecture model. The defaults are a tiny test model."""

    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_ctx_train: int = 2048
    n_merges: int = 200
    rope_freq_base: float = 10000.0
    rms_eps: float = 1e-5
    tied_embeddings: bool = False
    seed: int = 0
    weight_std: float = 0.35
    chat_template: str | None = CHATML_TEMPLATE
    name: str = "tiny-llama"
    extra_tokens: list[str] = field(default_factory=list)


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


def write_llama_gguf(path: str | os.PathLike, cfg: SynthConfig | None = None) -> Path:
    """Write a random-weight Llama model with a byte-level BPE tokenizer to `path` (f32)."""
    import gguf

    cfg = cfg or SynthConfig()
    path = Path(path)
    rng = np.random.default_rng(cfg.seed)
    tokens, merges = train_bpe(_BPE_TEXT, cfg.n_merges)
    specials = SPECIAL_TOKENS + cfg.extra_tokens
    token_types = [gguf.TokenType.NORMAL] * len(tokens) + [gguf.TokenType.CONTROL] * len(specials)
    tokens = tokens + specials
    n_vocab = len(tokens)
    head_dim = cfg.n_embd // cfg.n_head

    tmp = path.with_name(path.name + ".part")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(cfg.name)
    w.add_context_length(cfg.n_ctx_train)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.n_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(cfg.rope_freq_base)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
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

    def rand(*shape: int, std: float | None = None) -> np.ndarray:
        scale = (std if std is not None else cfg.weight_std) / np.sqrt(shape[-1] / 64)
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    # numpy shapes are (out, in); the writer stores them as ggml's (in, out)
    w.add_tensor("token_embd.weight", rand(n_vocab, cfg.n_embd, std=1.0))
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(cfg.n_embd, dtype=np.float32))
        w.add_tensor(p + "attn_q.weight", rand(cfg.n_embd, cfg.n_embd))
        w.add_tensor(p + "attn_k.weight", rand(cfg.n_head_kv * head_dim, cfg.n_embd))
        w.add_tensor(p + "attn_v.weight", rand(cfg.n_head_kv * head_dim, cfg.n_embd))
        w.add_tensor(p + "attn_output.weight", rand(cfg.n_embd, cfg.n_embd))
        w.add_tensor(p + "ffn_norm.weight", np.ones(cfg.n_embd, dtype=np.float32))
        w.add_tensor(p + "ffn_gate.weight", rand(cfg.n_ff, cfg.n_embd))
        w.add_tensor(p + "ffn_up.weight", rand(cfg.n_ff, cfg.n_embd))
        w.add_tensor(p + "ffn_down.weight", rand(cfg.n_embd, cfg.n_ff))
    w.add_tensor("output_norm.weight", np.ones(cfg.n_embd, dtype=np.float32))
    if not cfg.tied_embeddings:
        w.add_tensor("output.weight", rand(n_vocab, cfg.n_embd, std=2.0))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return path
