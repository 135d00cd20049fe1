"""Hugging Face checkpoint -> GGUF, for the Llama family and BERT encoders, written with the `gguf` package.

One story, top to bottom:
  1. read the folder (formats/hf.py): config, weights, tokenizer files;
  2. decide the GGUF architecture and its hyperparameter keys from config.json;
  3. the vocabulary: byte-level BPE from tokenizer.json, its llama.cpp pre-tokenizer decided from
     the tokenizer's own pre_tokenizer settings (the Split regex / ByteLevel flags), never from a
     table of hashes; SentencePiece from tokenizer.model; or BERT's WordPiece from tokenizer.json;
  4. the tensors, renamed with gguf's tensor-name maps, reshaped where llama.cpp's layout differs
     (Llama's q/k rows are permuted for its RoPE; Gemma's norms store 1 + w), checked against the
     shapes the config implies, stored as f32/f16/bf16/q8_0;
  5. write to a temporary name and rename (no half file ever has the final name);
  6. self-check: tokenize test strings with the original tokenizer and with llama.cpp reading the
     new file (the caller hands in llama.cpp's tokenizer: formats/ does not load llama.cpp); any
     difference is an error and the file is removed.
The caller registers the file in the store if it wants it there (`llmdesk convert` does).

Reference for the per-architecture details: llama.cpp's convert_hf_to_gguf.py (LlamaModel,
Qwen2Model, Phi3MiniModel, GemmaModel, Gemma2Model, BertModel).

BERT (an encoder: all-MiniLM-L6-v2, bge-small) becomes llama.cpp's "bert": bidirectional attention,
learned position and token-type embeddings, post-layer LayerNorms, GELU, no output head; its
embeddings are pooled as the sentence-transformers folder's Pooling module says (mean or CLS).
"""

from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from llmdesk.atomic import atomic_path
from llmdesk.formats.gguf_write import FILE_TYPES, add_tensor_info, add_transformer_keys, encode, file_type
from llmdesk.formats.hf import Checkpoint, ConversionError, open_checkpoint
from llmdesk.formats.shape import ModelShape

OUT_TYPES = FILE_TYPES

# HF `architectures[0]` -> llama.cpp's architecture name (gguf.MODEL_ARCH_NAMES)
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",  # llama.cpp runs Mistral 7B-style models as llama
    "Qwen2ForCausalLM": "qwen2",
    "Phi3ForCausalLM": "phi3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
}
# encoders, for embeddings (not generation: `tune` and LoRA take the decoders above only)
ENCODER_ARCHITECTURES = {
    "BertModel": "bert",  # sentence-transformers folders (all-MiniLM-L6-v2, bge-small)
    "BertForMaskedLM": "bert",  # the encoder under "bert."; the MLM head is dropped
}

# Strings the self-check tokenizes both ways: multilingual text, code, whitespace, numbers.
CHECK_STRINGS = [
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog. It's 12345 o'clock, isn't it? I'LL DO IT",
    "Grüße aus München! Ça va très bien. ¿Dónde está la biblioteca? Привет, как дела?",
    "日本語のテキストと中文文本，还有한국어 문장. 🙂🚀 emoji ✓",
    "def main(argv):\n    for i in range(10):\n        print(f\"{i:03d}\")  # comment\n\treturn 0\n",
    "   leading spaces, trailing spaces   \n\n\n  tabs\t\tand\r\nnewlines\n",
    "numbers 3.14159 1,000,000 2024-05-01 0x1F +42 -7",
    "  ",
    "a",
    "<html><body class=\"x\">&amp; {\"json\": [1, 2, 3]}</body></html>",
]


@dataclass
class ConvertResult:
    path: Path
    architecture: str  # the GGUF architecture, e.g. "llama"
    hf_architecture: str
    out_type: str
    n_params: int
    n_tensors: int
    vocab_size: int
    tokenizer: str  # "gpt2 (pre: llama-bpe)" / "llama (sentencepiece)"
    size_bytes: int
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["path"] = str(self.path)
        return d


# =============================================================================================
# 2. hyperparameters


@dataclass
class Hparams:
    """config.json as the converter needs it: the model's shape and the numbers beside it."""

    shape: ModelShape
    rope_theta: float
    rms_eps: float
    rope: dict[str, Any]  # rope scaling parameters ({} when none)
    # encoders (bert)
    norm_eps: float = 0.0  # LayerNorm epsilon
    n_token_types: int = 0  # rows of the token-type (segment) embedding
    pooling: str | None = None  # "mean" / "cls" / "last" from the sentence-transformers folder


def _hparams(ck: Checkpoint, arch: str) -> Hparams:
    def need(*names: str) -> Any:
        v = ck.cfg(*names)
        if v is None:
            raise ConversionError(f"{ck.path / 'config.json'}: missing {names[0]}")
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise ConversionError(f"{ck.path / 'config.json'}: {names[0]} must be a positive number, got {v!r}")
        return v

    if arch == "bert":
        return _bert_hparams(ck, need)
    n_embd = int(need("hidden_size"))
    n_head = int(need("num_attention_heads"))
    n_head_kv = int(ck.cfg("num_key_value_heads", default=n_head))
    head_dim = int(ck.cfg("head_dim", default=n_embd // n_head))
    # transformers >= 5 keeps rope settings in rope_parameters (with rope_theta inside)
    rope = dict(ck.cfg("rope_parameters", "rope_scaling", default={}) or {})
    theta = float(rope.get("rope_theta") or ck.cfg("rope_theta", default=10000.0))
    if rope.get("rope_type", rope.get("type", "default")) == "default":
        rope = {}
    shape = ModelShape(name=ck.path.name, arch=arch, n_vocab=int(need("vocab_size")), n_embd=n_embd,
                       n_layer=int(need("num_hidden_layers")), n_head=n_head, n_head_kv=n_head_kv,
                       head_dim=head_dim, n_ff=int(need("intermediate_size")),
                       n_ctx_train=int(ck.cfg("max_position_embeddings", default=2048)),
                       tied_embeddings=bool(ck.cfg("tie_word_embeddings", default=arch in ("gemma", "gemma2"))),
                       source=str(ck.path / "config.json"))
    return Hparams(shape, rope_theta=theta, rms_eps=float(ck.cfg("rms_norm_eps", default=1e-5)), rope=rope)


def _bert_hparams(ck: Checkpoint, need: Callable[..., Any]) -> Hparams:
    """A BERT encoder's config.json (transformers' BertConfig), checked for what llama.cpp's
    "bert" computes: absolute learned positions, GELU, one LayerNorm epsilon."""
    where = ck.path / "config.json"
    n_embd, n_head = int(need("hidden_size")), int(need("num_attention_heads"))
    if n_embd % n_head:
        raise ConversionError(f"{where}: hidden_size {n_embd} is not a multiple of num_attention_heads {n_head}")
    kind = ck.cfg("position_embedding_type", default="absolute")
    if kind != "absolute":
        raise ConversionError(f"{where}: position_embedding_type {kind!r} is not supported "
                              "(llama.cpp's bert has learned absolute positions)")
    act = ck.cfg("hidden_act", default="gelu")
    if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        raise ConversionError(f"{where}: hidden_act {act!r} is not supported for bert (llama.cpp uses gelu)")
    shape = ModelShape(name=ck.path.name, arch="bert", n_vocab=int(need("vocab_size")), n_embd=n_embd,
                       n_layer=int(need("num_hidden_layers")), n_head=n_head, n_head_kv=n_head,
                       n_ff=int(need("intermediate_size")), n_ctx_train=int(need("max_position_embeddings")),
                       source=str(where))
    # the sizes must be given; the two numbers beside them default as transformers' BertConfig does
    return Hparams(shape, rope_theta=0.0, rms_eps=0.0, rope={}, norm_eps=float(ck.cfg("layer_norm_eps", default=1e-12)),
                   n_token_types=int(ck.cfg("type_vocab_size", default=2)), pooling=ck.pooling)


def _write_bert_hparams(w, hp: Hparams) -> None:
    """The keys llama.cpp's bert reads (convert_hf_to_gguf.py BertModel.set_gguf_parameters)."""
    import gguf

    s = hp.shape
    w.add_context_length(s.n_ctx_train)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_layer)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_layer_norm_eps(hp.norm_eps)
    w.add_causal_attention(False)
    w.add_token_type_count(hp.n_token_types)
    if hp.pooling is not None:  # none written: llama.cpp (and Model.embed) pool by the mean
        w.add_pooling_type({"mean": gguf.PoolingType.MEAN, "cls": gguf.PoolingType.CLS,
                            "last": gguf.PoolingType.LAST}[hp.pooling])


def _write_hparams(w, hp: Hparams, ck: Checkpoint) -> list[tuple[str, np.ndarray]]:
    """Architecture keys; returns extra tensors they imply (llama 3's rope_freqs)."""
    import gguf

    s = hp.shape
    if s.arch == "bert":
        _write_bert_hparams(w, hp)
        return []
    rot = int(s.head_dim * float(ck.cfg("partial_rotary_factor", default=1.0)))
    add_transformer_keys(w, n_ctx=s.n_ctx_train, n_embd=s.n_embd, n_layer=s.n_layer, n_ff=s.n_ff, n_head=s.n_head,
                         n_head_kv=s.n_head_kv, head_dim=s.head_dim, n_rot=rot, rms_eps=hp.rms_eps,
                         rope_theta=hp.rope_theta, n_vocab=s.n_vocab)

    extra: list[tuple[str, np.ndarray]] = []
    kind = hp.rope.get("rope_type", hp.rope.get("type"))
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(hp.rope["factor"]))
    elif kind == "llama3" and s.arch == "llama":
        # llama.cpp multiplies each rotary frequency by a stored factor (convert_hf_to_gguf.py,
        # LlamaModel.generate_extra_tensors; the same math as transformers' _compute_llama3_parameters)
        factor = float(hp.rope.get("factor", 8.0))
        low, high = float(hp.rope.get("low_freq_factor", 1.0)), float(hp.rope.get("high_freq_factor", 4.0))
        old_ctx = float(hp.rope.get("original_max_position_embeddings", 8192))
        low_wl, high_wl = old_ctx / low, old_ctx / high
        freqs = 1.0 / (hp.rope_theta ** (np.arange(0, rot, 2, dtype=np.float64) / rot))
        factors = []
        for f in freqs:
            wl = 2 * math.pi / f
            if wl < high_wl:
                factors.append(1.0)
            elif wl > low_wl:
                factors.append(factor)
            else:
                smooth = (old_ctx / wl - low) / (high - low)
                factors.append(1.0 / ((1 - smooth) / factor + smooth))
        extra.append(("rope_freqs.weight", np.array(factors, dtype=np.float32)))
    elif kind == "yarn":
        # llama.cpp's YaRN takes the same inputs as transformers' _compute_yarn_parameters: the
        # factor, the pre-training context (where the correction range is computed) and beta_fast/slow
        orig = int(hp.rope.get("original_max_position_embeddings")
                   or ck.cfg("original_max_position_embeddings", default=0) or s.n_ctx_train)
        factor = hp.rope.get("factor") or s.n_ctx_train / orig
        if hp.rope.get("attention_factor") is not None or hp.rope.get("mscale") or hp.rope.get("mscale_all_dim"):
            raise ConversionError(f"{ck.path / 'config.json'}: YaRN with attention_factor/mscale is not supported yet")
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(factor))
        w.add_rope_scaling_orig_ctx_len(orig)
        w.add_rope_scaling_yarn_beta_fast(float(hp.rope.get("beta_fast") or 32.0))
        w.add_rope_scaling_yarn_beta_slow(float(hp.rope.get("beta_slow") or 1.0))
    elif kind in ("longrope", "su") and s.arch == "phi3":
        # Phi-3's LongRoPE: per-frequency divisors, a short set within the pre-training context and
        # a long one beyond it (llama.cpp picks by the context size), and a cos/sin scale
        orig = int(hp.rope.get("original_max_position_embeddings")
                   or ck.cfg("original_max_position_embeddings", default=0) or s.n_ctx_train)
        long_f, short_f = hp.rope.get("long_factor"), hp.rope.get("short_factor")
        if not (isinstance(long_f, list) and isinstance(short_f, list) and len(long_f) == len(short_f) == rot // 2):
            raise ConversionError(f"{ck.path / 'config.json'}: longrope needs long_factor and short_factor "
                                  f"lists of {rot // 2} numbers each")
        scale = s.n_ctx_train / orig
        attn = hp.rope.get("attention_factor")
        if attn is None:
            attn = 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(orig))
        w.add_rope_scaling_attn_factors(float(attn))
        extra.append(("rope_factors_long.weight", np.array(long_f, dtype=np.float32)))
        extra.append(("rope_factors_short.weight", np.array(short_f, dtype=np.float32)))
    elif kind:
        raise ConversionError(f"{ck.path / 'config.json'}: rope scaling {kind!r} is not supported yet "
                              f"for {ck.architecture} (supported: linear, llama3, yarn; longrope for Phi-3)")

    if s.arch == "phi3":
        w.add_rope_scaling_orig_ctx_len(int(ck.cfg("original_max_position_embeddings", default=s.n_ctx_train)))
        w.add_sliding_window(int(ck.cfg("sliding_window", default=0) or 0))
    if s.arch == "gemma2":
        w.add_attn_logit_softcapping(float(ck.cfg("attn_logit_softcapping", default=50.0) or 0.0))
        w.add_final_logit_softcapping(float(ck.cfg("final_logit_softcapping", default=30.0) or 0.0))
        w.add_sliding_window(int(ck.cfg("sliding_window", default=4096)))
        # llama.cpp scales queries by 1/sqrt(head_dim), except for a 46-layer model (Gemma 2 27B),
        # which gets 1/sqrt(n_embd / n_head): those are the two query_pre_attn_scalar it can follow
        qpas = int(ck.cfg("query_pre_attn_scalar", default=s.head_dim))
        llama_cpp_qpas = s.n_embd // s.n_head if s.n_layer == 46 else s.head_dim
        if qpas != llama_cpp_qpas:
            raise ConversionError(f"{ck.path / 'config.json'}: query_pre_attn_scalar {qpas} differs from what "
                                  f"llama.cpp's gemma2 uses for {s.n_layer} layers ({llama_cpp_qpas})")
    if s.arch in ("gemma", "gemma2"):
        act = ck.cfg("hidden_activation", "hidden_act", default="gelu_pytorch_tanh")
        if act not in ("gelu_pytorch_tanh", "gelu"):
            raise ConversionError(f"{ck.path / 'config.json'}: activation {act!r} is not supported for gemma")
    elif ck.cfg("hidden_act", default="silu") != "silu":
        raise ConversionError(f"{ck.path / 'config.json'}: hidden_act {ck.cfg('hidden_act')!r} is not "
                              f"supported for {ck.architecture} (llama.cpp uses silu)")
    return extra


# =============================================================================================
# 3. the vocabulary


# Byte-level BPE pre-tokenizers llama.cpp knows, by what they do (its llama-vocab.cpp regexes).
# A tokenizer.json pre_tokenizer is reduced to a signature (its steps, in order) and looked up here.
_CONTRACTIONS_I = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_CONTRACTIONS_X = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
LLAMA3_REGEX = (_CONTRACTIONS_I + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (_CONTRACTIONS_I + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    ("bytelevel-regex",): "gpt-2",  # GPT-2's own regex inside ByteLevel(use_regex=True)
    ("digits-individual", "bytelevel-regex"): "smollm",  # digits one by one, then GPT-2's regex
    ("split:" + LLAMA3_REGEX, "bytelevel"): "llama-bpe",  # Llama 3
    ("split:" + QWEN2_REGEX, "bytelevel"): "qwen2",  # Qwen 2 (digits one by one)
}


def pre_tokenizer_name(pre: dict | None, where: str = "tokenizer.json") -> str:
    """The llama.cpp pre-tokenizer whose splitting matches a tokenizer.json `pre_tokenizer`."""
    steps: list[str] = []

    def walk(p: dict) -> None:
        kind = p.get("type")
        if kind == "Sequence":
            for q in p.get("pretokenizers", []):
                walk(q)
        elif kind == "ByteLevel":
            if p.get("add_prefix_space"):
                raise ConversionError(f"{where}: ByteLevel pre-tokenizer with add_prefix_space is not supported by llama.cpp")
            steps.append("bytelevel-regex" if p.get("use_regex", True) else "bytelevel")
        elif kind == "Split":
            pat = p.get("pattern", {})
            regex = pat.get("Regex") if isinstance(pat, dict) else None
            if regex is None or p.get("behavior") != "Isolated" or p.get("invert"):
                raise ConversionError(f"{where}: unsupported Split pre-tokenizer {_short(p)}")
            steps.append("split:" + regex.replace(_CONTRACTIONS_X, _CONTRACTIONS_I))
        elif kind == "Digits":
            steps.append("digits-individual" if p.get("individual_digits") else "digits")
        else:
            raise ConversionError(f"{where}: unsupported pre-tokenizer step {kind!r}")

    if not pre:
        raise ConversionError(f"{where}: byte-level BPE without a pre_tokenizer is not supported by llama.cpp")
    walk(pre)
    name = PRE_TOKENIZERS.get(tuple(steps))
    if name is None:
        shown = " + ".join(_short(s) for s in steps)
        raise ConversionError(f"{where}: no llama.cpp pre-tokenizer matches this one ({shown}); supported: "
                              "ByteLevel (gpt-2), Digits + ByteLevel (smollm), Split with the Llama 3 "
                              "regex (llama-bpe) or the Qwen 2 regex (qwen2)")
    return name


def _short(x: Any, n: int = 90) -> str:
    s = str(x)
    return s if len(s) <= n else s[: n - 3] + "..."


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model: "gpt2", "llama" or "bert"
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad/eot/sep/mask -> id
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    add_sep: bool | None = None  # WordPiece: [SEP] after the text

    @property
    def description(self) -> str:
        """What ConvertResult.tokenizer says: "gpt2 (pre: llama-bpe)", "llama (sentencepiece)"."""
        if self.pre:
            return f"{self.model} (pre: {self.pre})"
        return f"{self.model} ({'wordpiece' if self.model == 'bert' else 'sentencepiece'})"


def _token_text(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None


def _build_vocab(ck: Checkpoint, n_vocab: int) -> Vocab:
    import gguf

    tj = ck.tokenizer_json
    model = (tj or {}).get("model") or {}
    use_spm = ck.sp_model is not None and (tj is None or model.get("type") != "BPE" or model.get("byte_fallback"))
    if use_spm:
        v = _spm_vocab(ck)
    elif tj is not None and model.get("type") == "BPE":
        v = _bpe_vocab(ck, tj)
    elif tj is not None and model.get("type") == "WordPiece":
        v = _wordpiece_vocab(ck, tj)
    else:
        raise ConversionError(f"{ck.path / 'tokenizer.json'}: tokenizer model {model.get('type')!r} is not "
                              "supported (byte-level BPE or WordPiece in tokenizer.json, or SentencePiece in "
                              "tokenizer.model)")
    if len(v.tokens) > n_vocab:
        raise ConversionError(f"{ck.path}: the tokenizer has {len(v.tokens)} tokens but config.json says "
                              f"vocab_size {n_vocab}")
    # the embedding may have more rows than the tokenizer has tokens: pad (as llama.cpp's converter)
    for i in range(len(v.tokens), n_vocab):
        v.tokens.append(f"[PAD{i}]")
        v.types.append(gguf.TokenType.UNUSED)
        if v.scores is not None:
            v.scores.append(-1000.0)

    # special tokens: tokenizer_config.json, then special_tokens_map.json, then generation_config.json
    index = {t: i for i, t in enumerate(v.tokens)}
    tc, sm = ck.tokenizer_config, ck.special_tokens_map
    for role in ("bos", "eos", "unk", "pad"):
        text = _token_text(tc.get(f"{role}_token")) or _token_text(sm.get(f"{role}_token"))
        if text is not None and text in index and role not in v.special:
            v.special[role] = index[text]
    gen_eos = ck.generation_config.get("eos_token_id", ck.config.get("eos_token_id"))
    gen_eos = [gen_eos] if isinstance(gen_eos, int) else [i for i in (gen_eos or []) if isinstance(i, int)]
    if "eos" not in v.special and gen_eos:
        v.special["eos"] = gen_eos[0]
    others = [i for i in gen_eos if i != v.special.get("eos") and 0 <= i < n_vocab]
    if others:  # e.g. <|im_end|> or <|eot_id|> beside the tokenizer's own eos
        v.special["eot"] = others[0]
    bos = ck.generation_config.get("bos_token_id", ck.config.get("bos_token_id"))
    if "bos" not in v.special and isinstance(bos, int) and 0 <= bos < n_vocab:
        v.special["bos"] = bos
    if isinstance(tc.get("add_bos_token"), bool):
        v.add_bos = tc["add_bos_token"]
    if isinstance(tc.get("add_eos_token"), bool):
        v.add_eos = tc["add_eos_token"]
    return v


def _bpe_vocab(ck: Checkpoint, tj: dict) -> Vocab:
    import gguf

    where = str(ck.path / "tokenizer.json")
    model = tj["model"]
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise ConversionError(f"{where}: the BPE model has no vocab")
    pre = pre_tokenizer_name(tj.get("pre_tokenizer"), where)
    norm = tj.get("normalizer")
    if norm and norm.get("type") not in ("NFC",):  # Qwen 2 ships NFC; llama.cpp does not normalize
        raise ConversionError(f"{where}: normalizer {norm.get('type')!r} is not supported for byte-level BPE")
    by_id: dict[int, tuple[str, int]] = {int(i): (t, gguf.TokenType.NORMAL) for t, i in vocab.items()}
    for a in tj.get("added_tokens") or []:
        by_id[int(a["id"])] = (a["content"], gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    n = max(by_id) + 1
    tokens, types = [], []
    for i in range(n):
        t, ty = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        tokens.append(t)
        types.append(ty)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    v = Vocab("gpt2", pre, tokens, types, merges=merges)
    # a TemplateProcessing post-processor that starts with a special token adds BOS
    pp = tj.get("post_processor") or {}
    if pp.get("type") == "Sequence":
        pp = next((p for p in pp.get("processors", []) if p.get("type") == "TemplateProcessing"), {})
    if pp.get("type") == "TemplateProcessing":
        single = pp.get("single") or []
        v.add_bos = bool(single) and "SpecialToken" in single[0]
        v.add_eos = len(single) > 1 and "SpecialToken" in single[-1]
        if v.add_bos:
            v.special["bos"] = tokens.index(single[0]["SpecialToken"]["id"])
    return v


def _wordpiece_vocab(ck: Checkpoint, tj: dict) -> Vocab:
    """BERT's WordPiece as llama.cpp's WPM tokenizer reads it (convert_hf_to_gguf.py BertModel.set_vocab):
    a word's first piece carries a phantom space ("\u2581the"), a continuation loses its "##"
    ("##ing" -> "ing"), special tokens stay as they are. llama.cpp lowercases, splits on
    whitespace, punctuation and CJK characters, and matches the longest piece first, as
    BertNormalizer(lowercase) + BertPreTokenizer + WordPiece do; other settings are refused."""
    import gguf

    where = str(ck.path / "tokenizer.json")
    model = tj["model"]
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise ConversionError(f"{where}: the WordPiece model has no vocab")
    if model.get("continuing_subword_prefix", "##") != "##":
        raise ConversionError(f"{where}: WordPiece continuing_subword_prefix "
                              f"{model.get('continuing_subword_prefix')!r} is not supported (llama.cpp expects '##')")
    norm = tj.get("normalizer") or {}
    if norm.get("type") != "BertNormalizer" or not norm.get("lowercase", True):
        raise ConversionError(f"{where}: WordPiece needs BertNormalizer with lowercase (llama.cpp lowercases "
                              f"every text), not {_short(norm)}")
    pre = (tj.get("pre_tokenizer") or {}).get("type")
    if pre != "BertPreTokenizer":
        raise ConversionError(f"{where}: WordPiece needs the BertPreTokenizer (what llama.cpp splits by), not {pre!r}")
    added = {int(a["id"]): a for a in tj.get("added_tokens") or []}
    by_id = {int(i): t for t, i in vocab.items()}
    by_id.update({i: a["content"] for i, a in added.items()})
    tokens, types = [], []
    for i in range(max(by_id) + 1):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(t[2:] if t.startswith("##") else "\u2581" + t)
            types.append(gguf.TokenType.NORMAL)
    v = Vocab("bert", None, tokens, types, add_bos=True, add_eos=False, add_sep=True)
    # [CLS] text [SEP]: the post-processor's template, or the tokenizer config's cls/sep tokens
    index = {t: i for i, t in enumerate(tokens) if types[i] != gguf.TokenType.NORMAL}
    pp = tj.get("post_processor") or {}
    if pp.get("type") == "BertProcessing":  # {"cls": ["[CLS]", 101], "sep": ["[SEP]", 102]}
        template = [(pp.get("cls") or [None])[0], (pp.get("sep") or [None])[0]]
    else:
        single = pp.get("single") or [] if pp.get("type") == "TemplateProcessing" else []
        template = [x["SpecialToken"]["id"] for x in single if "SpecialToken" in x]
    tc, sm = ck.tokenizer_config, ck.special_tokens_map
    for role, key, fallback in (("bos", "cls_token", template[:1]), ("sep", "sep_token", template[1:2]),
                                ("unk", "unk_token", [model.get("unk_token")]), ("pad", "pad_token", []),
                                ("mask", "mask_token", [])):
        text = _token_text(tc.get(key)) or _token_text(sm.get(key)) or next(iter(fallback), None)
        if text in index:
            v.special[role] = index[text]
    for role, what in (("bos", "[CLS]"), ("sep", "[SEP]"), ("unk", "[UNK]")):
        if role not in v.special:
            raise ConversionError(f"{where}: no {what} token (a special token named by tokenizer_config.json's "
                                  f"{'cls' if role == 'bos' else role}_token)")
    return v


def _spm_vocab(ck: Checkpoint) -> Vocab:
    import gguf

    from llmdesk.formats.hf import require_train_extra

    require_train_extra("sentencepiece")
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(ck.sp_model))
    except Exception as e:
        raise ConversionError(f"{ck.sp_model}: cannot read the SentencePiece model ({e})") from None
    tokens, types, scores = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_unused(i):
            types.append(gguf.TokenType.UNUSED)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    # tokens added on top (tokenizer.json's added_tokens past the SentencePiece vocabulary)
    for a in sorted((ck.tokenizer_json or {}).get("added_tokens") or [], key=lambda a: a["id"]):
        if a["id"] >= len(tokens):
            while len(tokens) < a["id"]:
                tokens.append(f"[PAD{len(tokens)}]")
                types.append(gguf.TokenType.UNUSED)
                scores.append(-1000.0)
            tokens.append(a["content"])
            types.append(gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
            scores.append(-1000.0)
    v = Vocab("llama", None, tokens, types, scores=scores)
    # the dummy prefix (a space before the text) shows in how a single letter is encoded
    v.add_space_prefix = sp.encode_as_pieces("a")[:1] == ["\u2581a"]
    v.add_bos = True  # SentencePiece Llama-style default; tokenizer_config.json may override
    if sp.bos_id() >= 0:
        v.special["bos"] = sp.bos_id()
    if sp.eos_id() >= 0:
        v.special["eos"] = sp.eos_id()
    if sp.unk_id() >= 0:
        v.special["unk"] = sp.unk_id()
    return v


def _write_vocab(w, v: Vocab) -> None:
    w.add_tokenizer_model(v.model)
    if v.pre:
        w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.types)
    if v.scores is not None:
        w.add_token_scores(v.scores)
    if v.merges:
        w.add_token_merges(v.merges)
    adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id,
              "pad": w.add_pad_token_id, "eot": w.add_eot_token_id, "sep": w.add_sep_token_id,
              "mask": w.add_mask_token_id}
    for role, tid in v.special.items():
        adders[role](tid)
    w.add_add_bos_token(v.add_bos)
    w.add_add_eos_token(v.add_eos)
    if v.add_space_prefix is not None:
        w.add_add_space_prefix(v.add_space_prefix)
    if v.add_sep is not None:
        w.add_add_sep_token(v.add_sep)


def _chat_template(ck: Checkpoint) -> str | None:
    t = ck.tokenizer_config.get("chat_template")
    if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    if t is None and (ck.path / "chat_template.jinja").is_file():
        t = (ck.path / "chat_template.jinja").read_text(encoding="utf-8")
    return t if isinstance(t, str) and t.strip() else None


# =============================================================================================
# 4. tensors


def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF Llama's q/k rows (rotate-half RoPE) -> llama.cpp's (interleaved pairs).
    convert_hf_to_gguf.py LlamaModel.permute; (n_head * head_dim, n_embd) or (n_head * head_dim,)."""
    shape = w.shape
    return (w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape))


def _expected_shape(base: str, s: ModelShape) -> tuple[int, ...] | None:
    """numpy (out, in) shape implied by config.json for a GGUF tensor name without its blk prefix."""
    E, F, H, KV, D, V = s.n_embd, s.n_ff, s.n_head, s.n_head_kv, s.head_dim, s.n_vocab
    shapes = {
        "token_embd.weight": (V, E), "output.weight": (V, E), "output_norm.weight": (E,),
        "attn_norm.weight": (E,), "ffn_norm.weight": (E,), "post_attention_norm.weight": (E,),
        "post_ffw_norm.weight": (E,),
        "attn_q.weight": (H * D, E), "attn_k.weight": (KV * D, E), "attn_v.weight": (KV * D, E),
        "attn_q.bias": (H * D,), "attn_k.bias": (KV * D,), "attn_v.bias": (KV * D,),
        "attn_output.weight": (E, H * D), "attn_qkv.weight": ((H + 2 * KV) * D, E),
        "ffn_gate.weight": (F, E), "ffn_up.weight": (2 * F if s.arch == "phi3" else F, E),
        "ffn_down.weight": (E, F),
        # bert
        "position_embd.weight": (s.n_ctx_train, E), "token_embd_norm.weight": (E,), "token_embd_norm.bias": (E,),
        "attn_output.bias": (E,), "attn_output_norm.weight": (E,), "attn_output_norm.bias": (E,),
        "ffn_up.bias": (F,), "ffn_down.bias": (E,), "layer_output_norm.weight": (E,), "layer_output_norm.bias": (E,),
    }
    return shapes.get(base)


@dataclass
class _Planned:
    """One tensor of the output: its GGUF name and shape, and where its data comes from."""

    name: str
    shape: tuple[int, ...]
    src: Any = None  # hf.LazyTensor, read when written
    data: np.ndarray | None = None  # or the data itself (tensors implied by the config)
    permute_heads: int = 0  # llama's q/k rows are reordered for llama.cpp's rope
    add_one: bool = False  # Gemma's norms: llama.cpp stores 1 + w
    f32: bool = False  # kept f32 whatever the file's type (bert's position and token-type tables, as llama.cpp's converter)

    def load(self) -> np.ndarray:
        if self.data is not None:
            return self.data
        data = self.src.load()
        if self.permute_heads:
            data = _permute_rope(data, self.permute_heads)
        if self.add_one:
            data = data + 1.0
        return np.ascontiguousarray(data, dtype=np.float32)


def _source_name(hf_name: str, arch: str) -> str | None:
    """The name gguf's tensor map knows for checkpoint tensor `hf_name`; None for one llama.cpp
    does not use (buffers it recomputes; BERT's pooler and pre-training heads)."""
    if hf_name.endswith((".rotary_emb.inv_freq", "attn.masked_bias", "attn.bias")):
        return None
    if arch == "bert":
        # BertForMaskedLM nests the encoder under "bert."; old checkpoints call LayerNorm's
        # parameters gamma and beta (convert_hf_to_gguf.py BertModel.filter_tensors)
        name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", hf_name.removeprefix("bert.")))
        if name == "embeddings.position_ids" or name.startswith(("pooler.", "cls.")):
            return None
        return name
    return hf_name


def _required(s: ModelShape) -> list[str]:
    """Tensors every model of shape `s` has: a config that promises more layers than the weights hold fails."""
    if s.arch == "bert":
        per_layer = ["attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                     "attn_output_norm.weight", "ffn_up.weight", "ffn_down.weight", "layer_output_norm.weight"]
        return (["token_embd.weight", "position_embd.weight", "token_embd_norm.weight"]
                + [f"blk.{i}.{t}" for i in range(s.n_layer) for t in per_layer])
    return ["token_embd.weight", "output_norm.weight"] + [f"blk.{i}.attn_norm.weight" for i in range(s.n_layer)]


def _plan(ck: Checkpoint, hp: Hparams, extra: list[tuple[str, np.ndarray]]) -> list[_Planned]:
    """Every output tensor, checked against the config by name and shape before any data is read."""
    s = hp.shape
    out: dict[str, _Planned] = {}
    src = ck.path / ck.weight_files[0].name if len(ck.weight_files) == 1 else ck.path
    for t in ck.tensors():
        hf_name = _source_name(t.name, s.arch)
        if hf_name is None:
            continue
        name, heads = gguf_tensor(hf_name, s)
        if name is None:
            raise ConversionError(f"{src}: unexpected tensor {t.name!r} for {ck.architecture} "
                                  "(is config.json's architecture right?)")
        m = re.match(r"blk\.(\d+)\.(.*)", name)
        if m and int(m[1]) >= s.n_layer:
            raise ConversionError(f"{src}: tensor {t.name!r} is in layer {m[1]}, but config.json says "
                                  f"num_hidden_layers {s.n_layer}")
        base = m[2] if m else name
        want = _expected_shape(base, s)
        if base == "token_types.weight":
            want = (hp.n_token_types, s.n_embd)
        if want is not None and t.shape != want:
            raise ConversionError(f"{src}: tensor {t.name!r} has shape {t.shape} but config.json "
                                  f"implies {want} (the config and the weights disagree)")
        add_one = s.arch in ("gemma", "gemma2") and name.endswith("norm.weight")
        out[name] = _Planned(name, t.shape, src=t, permute_heads=heads, add_one=add_one,
                             f32=name in ("position_embd.weight", "token_types.weight"))
    for name, data in extra:
        out[name] = _Planned(name, tuple(data.shape), data=data)
    if "output.weight" in out and "token_embd.weight" in out and s.tied_embeddings:
        if np.array_equal(out["output.weight"].load(), out["token_embd.weight"].load()):
            del out["output.weight"]  # tied: llama.cpp reuses token_embd
    # every layer needs its tensors: a config that promises more layers than the weights hold fails here
    missing = [r for r in _required(s) if r not in out]
    if missing:
        raise ConversionError(f"{src}: missing tensor {missing[0]} (config.json says {s.n_layer} layers; "
                              "the weights and the config disagree)")
    return list(out.values())


# what other writers (formats/lora_gguf.py: LoRA adapters) share with this one: the shape read
# from config.json, and each checkpoint tensor's GGUF name and layout


def config_shape(config: dict[str, Any], where: str | os.PathLike) -> ModelShape:
    """The shape of the model `config` (a config.json, from the folder `where`) describes, as
    this converter reads it; one-line errors for an unsupported architecture or a bad config."""
    ck = Checkpoint(Path(where), config, [])
    arch = ARCHITECTURES.get(ck.architecture)
    if arch is None:
        raise ConversionError(f"{ck.path}: architecture {ck.architecture!r} is not supported "
                              f"(supported: {', '.join(ARCHITECTURES)})")
    return _hparams(ck, arch).shape


@functools.lru_cache(maxsize=8)
def _name_map(arch: str, n_layer: int) -> Any:
    """gguf's map of checkpoint tensor names to GGUF names for `arch` (built once per model)."""
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layer)


def gguf_tensor(hf_name: str, s: ModelShape) -> tuple[str | None, int]:
    """(the GGUF name of the checkpoint tensor `hf_name` in a model of shape `s`, or None when the
    architecture has no such tensor; the heads its rows are permuted by for llama.cpp's RoPE, 0
    for none: llama's q and k, see `_permute_rope`)."""
    name = _name_map(s.arch, s.n_layer).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    base = re.sub(r"^blk\.\d+\.", "", name or "")
    heads = 0
    if s.arch == "llama" and base in ("attn_q.weight", "attn_q.bias"):
        heads = s.n_head
    elif s.arch == "llama" and base in ("attn_k.weight", "attn_k.bias"):
        heads = s.n_head_kv
    return name, heads


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """The rows of `w` (out, ...) in llama.cpp's RoPE order (`gguf_tensor` says when, and how many heads)."""
    return _permute_rope(w, n_head)


def expected_shape(gguf_name: str, s: ModelShape) -> tuple[int, ...] | None:
    """numpy (out, in) shape of the GGUF tensor `gguf_name` ("blk.3.attn_q.weight") in a model of
    shape `s` (None: not one the converter checks)."""
    return _expected_shape(re.sub(r"^blk\.\d+\.", "", gguf_name), s)


class GGUFTokenizer(Protocol):
    """llama.cpp's tokenizer over a GGUF file (runtime.llama.LlamaModel is one)."""

    def tokenize(self, text: str, *, add_special: bool = ..., parse_special: bool = ...) -> list[int]: ...

    def close(self) -> None: ...



def output_path(out: str | os.PathLike, out_type: str, example: str) -> Path:
    """The output file of a conversion, checked before any work: a known type, not a folder."""
    if out_type not in OUT_TYPES:
        raise ConversionError(f"unknown --type {out_type!r} (choose from {', '.join(OUT_TYPES)})")
    out = Path(out).expanduser()
    if out.is_dir():
        raise ConversionError(f"{out}: is a folder; give the output file name (e.g. {out / example})")
    return out

def convert(hf_dir: str | os.PathLike, out: str | os.PathLike, *, out_type: str = "f16",
            name: str | None = None, check_with: Callable[[Path], GGUFTokenizer] | None = None,
            progress: Callable[[str], None] | None = None) -> ConvertResult:
    """Convert the Hugging Face checkpoint folder `hf_dir` to the GGUF file `out`.

    `name` is the model's name in the file (of a store NAME:TAG, the NAME; default: the folder's).
    `check_with(path)` opens the written file with llama.cpp's tokenizer for the self-check
    (pass `runtime.llama.LlamaModel`); None skips it. The file is not registered in the store:
    that is the caller's choice."""
    out = output_path(out, out_type, "model.gguf")
    say = progress or (lambda _msg: None)
    ck = open_checkpoint(hf_dir)
    arch_name = ARCHITECTURES.get(ck.architecture) or ENCODER_ARCHITECTURES.get(ck.architecture)
    if arch_name is None:
        raise ConversionError(f"{ck.path}: architecture {ck.architecture!r} is not supported "
                              f"(supported: {', '.join([*ARCHITECTURES, *ENCODER_ARCHITECTURES])})")
    from llmdesk.formats.hf import require_train_extra

    require_train_extra("torch")
    import gguf

    hp = _hparams(ck, arch_name)
    say("reading the tokenizer")
    vocab = _build_vocab(ck, hp.shape.n_vocab)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        gguf_arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch_name.upper()]]
        w = gguf.GGUFWriter(str(tmp), gguf_arch)
        try:
            w.add_name(name.partition(":")[0] if name else ck.path.resolve().name)
            extra = _write_hparams(w, hp, ck)
            w.add_file_type(file_type(out_type))
            _write_vocab(w, vocab)
            template = _chat_template(ck)
            if template:
                w.add_chat_template(template)
            say("reading the weights")
            tensors = _plan(ck, hp, extra)
            n_params = 0
            for t in tensors:
                add_tensor_info(w, t.name, t.shape, "f32" if t.f32 else out_type)
                n_params += int(np.prod(t.shape))
            say(f"writing {out.name}")
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for t in tensors:  # one tensor in memory at a time
                w.write_tensor_data(encode(t.name, t.load(), "f32" if t.f32 else out_type))
        finally:
            w.close()

    try:
        if check_with is not None:
            say("checking the tokenizer against the original")
            check_tokenizer(ck, out, check_with)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return ConvertResult(path=out, architecture=gguf_arch, hf_architecture=ck.architecture,
                         out_type=out_type, n_params=n_params, n_tensors=len(tensors),
                         vocab_size=len(vocab.tokens),
                         tokenizer=vocab.description,
                         size_bytes=out.stat().st_size)


# =============================================================================================
# 6. the self-check


def reference_tokenize(ck: Checkpoint) -> Callable[[str], list[int]]:
    """The original tokenizer, as a function text -> ids (no special tokens added)."""
    tj = ck.tokenizer_json
    model = (tj or {}).get("model") or {}
    if ck.sp_model is not None and (tj is None or model.get("type") != "BPE" or model.get("byte_fallback")):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(ck.sp_model))
        return lambda s: list(sp.encode(s))
    from llmdesk.formats.hf import require_train_extra

    require_train_extra("tokenizers")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ck.path / "tokenizer.json"))
    tok.no_padding()  # a tokenizer.json may pad or cut every text to a fixed length (BERT's: 128)
    tok.no_truncation()
    return lambda s: tok.encode(s, add_special_tokens=False).ids


# llama.cpp's WordPiece reads a character as the first code point of its NFD form (that is how it
# strips accents: "é" -> "e"), so a Hangul syllable becomes its first jamo ("한" -> "ᄒ") where
# BERT's tokenizer keeps all three: Korean cannot match, and the WordPiece check leaves it out.
HANGUL_SYLLABLES = re.compile("[\uac00-\ud7a3]")


def check_strings(ck: Checkpoint) -> list[str]:
    """The test strings the self-check tokenizes both ways for this checkpoint's tokenizer."""
    if ((ck.tokenizer_json or {}).get("model") or {}).get("type") == "WordPiece":
        return [HANGUL_SYLLABLES.sub("", s) for s in CHECK_STRINGS]
    return CHECK_STRINGS


def tokenizer_differences(ck: Checkpoint, gguf_path: Path, open_tokenizer: Callable[[Path], GGUFTokenizer],
                          strings: list[str] | None = None) -> list[str]:
    ref = reference_tokenize(ck)
    m = open_tokenizer(gguf_path)
    try:
        diffs = []
        for s in check_strings(ck) if strings is None else strings:
            a, b = ref(s), m.tokenize(s, add_special=False, parse_special=False)
            if a != b:
                i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                diffs.append(f"{s[:30]!r}: original {a[i:i + 4]} vs gguf {b[i:i + 4]} at token {i}")
        return diffs
    finally:
        m.close()


def check_tokenizer(ck: Checkpoint, gguf_path: Path, open_tokenizer: Callable[[Path], GGUFTokenizer]) -> None:
    diffs = tokenizer_differences(ck, gguf_path, open_tokenizer)
    if diffs:
        raise ConversionError(f"{gguf_path.name}: the converted tokenizer differs from the original on "
                              f"{len(diffs)} of {len(CHECK_STRINGS)} test strings, e.g. {diffs[0]}; "
                              "the file was not kept")
