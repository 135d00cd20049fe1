"""HF -> GGUF conversion, measured against transformers on tiny random-weight checkpoints.

Each checkpoint is built here: a transformers config with tiny sizes, random weights (norms
perturbed too, so that Gemma's `1 + w` and Llama's q/k permutation are exercised), and a
byte-level BPE tokenizer trained with `tokenizers` on a few lines of text. The logits llama.cpp
computes from the converted f32 GGUF must match transformers' (max abs diff < 1e-3, same top-1
at every position of a 48-token prompt).
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import numpy as np
import pytest

import torch  # noqa: E402  (the train extra: missing, this fails)
import transformers  # noqa: E402

from llmdesk.formats.convert import CHECK_STRINGS, convert, reference_tokenize  # noqa: E402
from llmdesk.formats.hf import open_checkpoint  # noqa: E402
from llmdesk.runtime.llama import LlamaModel  # noqa: E402
from llmdesk.train.tokenizer import CHATML_TEMPLATE, save_hf_tokenizer, train_bpe  # noqa: E402

TEXT = [
    "The quick brown fox jumps over the lazy dog. Quantization stores weights in fewer bits.",
    "def main(argv):\n    return sum(int(x) for x in argv)  # 12345 67890\n",
    "Grüße aus München! Ça va? Привет, мир. 日本語のテキスト。中文文本。 🙂",
    "The KV cache holds keys and values; tokens per second measures speed. I'm sure it's fine.",
    "   spaces   and\ttabs\n\n\nnewlines\r\n  ",
] * 4

PROMPT = ("The quick brown fox jumps over the lazy dog. Quantization stores weights in fewer bits, "
          "and the KV cache holds keys and values for every token; tokens per second measures speed.")

# Gemma's GELU runs through ggml's f16 lookup table (GGML_GELU_FP16), an error that grows with the
# activations: its random weights are drawn a little smaller than the others'
GEMMA_INIT = 0.05

# architecture -> (config class name, extra config fields, pre-tokenizer)
ARCHS = {
    "llama": ("LlamaConfig", {}, "llama-bpe"),
    "llama-tied-llama3rope": ("LlamaConfig", {"tie_word_embeddings": True, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}, "rope_theta": 500000.0}, "gpt-2"),
    # many larger tensors: 8.4 M parameters, none over 0.27 M (the streaming test)
    "llama-wide": ("LlamaConfig", {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 8}, "llama-bpe"),
    "mistral": ("MistralConfig", {"sliding_window": 4096}, "llama-bpe"),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}, "qwen2"),
    # YaRN (Qwen2.5's long-context setting) with the correction range inside the rotary dims
    "qwen2-yarn": ("Qwen2Config", {"tie_word_embeddings": True, "rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}}, "qwen2"),
    # LongRoPE (Phi-3-128k, Phi-3.5): short factors apply within the pre-training context (llama.cpp
    # pads the test context of 128 to 256 cells and picks the factors by that)
    "phi3-longrope": ("Phi3Config", {"pad_token_id": 0, "original_max_position_embeddings": 256,
                                     "max_position_embeddings": 1024, "rope_scaling": {
        "type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
        "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 18.0]}}, "smollm"),
    "phi3": ("Phi3Config", {"pad_token_id": 0}, "smollm"),
    "gemma": ("GemmaConfig", {"head_dim": 16, "hidden_activation": "gelu_pytorch_tanh"}, "llama-bpe"),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 4096,
                                "hidden_activation": "gelu_pytorch_tanh"}, "llama-bpe"),
    # Gemma 2 27B's layout: 46 layers, queries scaled by hidden/heads (16), not head_dim (8). Smaller
    # weights, or the f16 GELU table's error adds up over 46 layers: parity is then 4.7e-4, while
    # the other scaling would move transformers' own logits by 8.4e-3
    "gemma2-27b-scaling": ("Gemma2Config", {"head_dim": 8, "query_pre_attn_scalar": 16, "num_hidden_layers": 46,
                                            "initializer_range": 0.02,
                                            "sliding_window": 4096, "hidden_activation": "gelu_pytorch_tanh"},
                           "llama-bpe"),
}


def make_checkpoint(path: Path, arch: str = "llama", *, vocab_size: int = 384, seed: int = 0) -> Path:
    """A tiny random-weight HF checkpoint of `arch` with a trained byte-level BPE tokenizer."""
    cls_name, extra, pre = ARCHS[arch]
    tok = train_bpe(TEXT, vocab_size, pre=pre)
    n_vocab = tok.get_vocab_size()
    eos = tok.token_to_id("<|endoftext|>")
    cfg = getattr(transformers, cls_name)(
        vocab_size=n_vocab + 3 if arch == "llama" else n_vocab,  # llama: padded embedding rows
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, bos_token_id=eos, eos_token_id=eos,
        **{"hidden_size": 64, "intermediate_size": 96, "max_position_embeddings": 256, "num_hidden_layers": 2,
           "initializer_range": 0.15 if not arch.startswith("gemma") else GEMMA_INIT, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name.replace("Config", "ForCausalLM"))(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)  # not all ones: checks the norm handling
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    save_hf_tokenizer(tok, path, chat_template=CHATML_TEMPLATE)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, tok.token_to_id("<|im_end|>")]}))
    return path


def llama_logits(gguf_path: Path, tokens: list[int]) -> np.ndarray:
    """(n_tokens, n_vocab) logits for every position, from llama.cpp."""
    import llama_cpp as C

    m = LlamaModel(gguf_path)
    params = C.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = 128
    params.n_threads = params.n_threads_batch = 2
    # an f32 KV cache: the default f16 cache alone moves logits by ~1e-2
    params.type_k = params.type_v = C.GGML_TYPE_F32
    params.flash_attn_type = 0
    ctx = C.llama_init_from_model(m.ptr, params)
    assert ctx
    try:
        batch = C.llama_batch_init(len(tokens), 0, 1)
        for i, t in enumerate(tokens):
            batch.token[i] = t
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = True
        batch.n_tokens = len(tokens)
        assert C.llama_decode(ctx, batch) == 0
        ptr = C.llama_get_logits(ctx)
        out = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(len(tokens), m.n_vocab)).copy()
        C.llama_batch_free(batch)
        return out
    finally:
        C.llama_free(ctx)
        m.close()


def hf_logits(ckpt: Path, tokens: list[int]) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def check_parity(tmp_path: Path, arch: str) -> float:
    # (not named after the architecture: llama.cpp special-cases some general.name values)
    ckpt = make_checkpoint(tmp_path / "ckpt", arch)
    out = tmp_path / f"{arch}.gguf"
    res = convert(ckpt, out, out_type="f32", check_with=LlamaModel)
    assert out.exists() and res.out_type == "f32"
    ids = reference_tokenize(open_checkpoint(ckpt))(PROMPT)
    assert len(ids) >= 48, len(ids)
    ids = ids[:48]
    ref, got = hf_logits(ckpt, ids), llama_logits(out, ids)
    n = min(ref.shape[1], got.shape[1])
    diff = float(np.abs(ref[:, :n] - got[:, :n]).max())
    assert diff < 1e-3, f"{arch}: max abs logit diff {diff}"
    assert (ref.argmax(-1) == got.argmax(-1)).all(), f"{arch}: top-1 differs"
    # token ids agree on multilingual text, code and whitespace (the self-check also ran)
    m = LlamaModel(out)
    ref_tok = reference_tokenize(open_checkpoint(ckpt))
    for s in CHECK_STRINGS:
        assert m.tokenize(s, add_special=False) == ref_tok(s), s
    m.close()
    print(f"parity {arch}: max abs diff {diff:.2e}")
    return diff


# -- parity, one per architecture ---------------------------------------------------------------


def test_parity_llama(tmp_path):
    check_parity(tmp_path, "llama")


@pytest.mark.parametrize("arch", ["llama-tied-llama3rope", "mistral", "qwen2", "qwen2-yarn", "phi3",
                                  "phi3-longrope", "gemma", "gemma2", "gemma2-27b-scaling"])
def test_parity_more_architectures(tmp_path, arch):
    check_parity(tmp_path, arch)


# -- SentencePiece (Llama 2 style tokenizer.model) ----------------------------------------------


def make_spm_checkpoint(path: Path) -> Path:
    """A tiny Llama checkpoint with a SentencePiece BPE tokenizer trained like Llama 2's
    (identity normalization, whitespace kept, a dummy prefix, byte fallback)."""
    import io

    import sentencepiece as spm  # the train extra
    path.mkdir(parents=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT * 5), model_writer=buf, vocab_size=600, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (path / "tokenizer.model").write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    cfg = transformers.LlamaConfig(vocab_size=sp.vocab_size(), hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, initializer_range=0.15,
                                   bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                            "unk_token": "<unk>", "add_bos_token": True}))
    return path


def test_sentencepiece_tokenizer(tmp_path):
    ckpt = make_spm_checkpoint(tmp_path / "spm")
    out = tmp_path / "spm.gguf"
    res = convert(ckpt, out, out_type="f32", check_with=LlamaModel)  # the self-check compares token ids
    assert res.tokenizer == "llama (sentencepiece)"
    ref = reference_tokenize(open_checkpoint(ckpt))
    ids = ref(PROMPT)[:48]
    m = LlamaModel(out)
    assert m.add_bos and m.bos == 1
    for s in CHECK_STRINGS:
        assert m.tokenize(s, add_special=False) == ref(s), s
    m.close()
    a, b = hf_logits(ckpt, ids), llama_logits(out, ids)
    assert float(np.abs(a - b).max()) < 1e-3
