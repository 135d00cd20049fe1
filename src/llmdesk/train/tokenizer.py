"""Byte-level BPE tokenizers trained with the `tokenizers` library, in a layout llama.cpp reads.

The pre-tokenizer is chosen by name and written into tokenizer.json as the matching Split regex
and ByteLevel settings; the converter later reads those settings back to pick llama.cpp's
pre-tokenizer (formats/convert.py, PRE_TOKENIZERS).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from llmdesk.errors import LlmdeskError
from llmdesk.formats.convert import LLAMA3_REGEX, QWEN2_REGEX
from llmdesk.formats.hf import require_train_extra

# the tokens every llmdesk-trained tokenizer has: end of text, and ChatML's turn markers
EOS = "<|endoftext|>"
SPECIALS = [EOS, "<|im_start|>", "<|im_end|>"]

# ChatML, as Qwen 2 and SmolLM 2 ship it
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers as pt

    if pre == "llama-bpe":
        return pt.Sequence([pt.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre == "qwen2":
        return pt.Sequence([pt.Split(Regex(QWEN2_REGEX), behavior="isolated"),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre == "gpt-2":
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        return pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    raise LlmdeskError(f"unknown pre-tokenizer {pre!r} (choose llama-bpe, qwen2, gpt-2 or smollm)")


def train_bpe(texts: Iterable[str], vocab_size: int, *, pre: str = "llama-bpe",
              specials: list[str] = SPECIALS):
    """A byte-level BPE `tokenizers.Tokenizer` with `vocab_size` tokens (256 bytes + merges + specials)."""
    require_train_extra("tokenizers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(specials):
        raise LlmdeskError(f"--vocab-size must be at least {256 + len(specials)} (the 256 bytes and the special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def save_hf_tokenizer(tok, out_dir: Path, *, chat_template: str | None = CHATML_TEMPLATE,
                      eos: str = EOS, bos: str | None = None) -> None:
    """tokenizer.json + tokenizer_config.json (with the chat template) in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": bos,
           "pad_token": eos, "add_bos_token": False, "add_eos_token": False,
           "model_max_length": 1_000_000, "clean_up_tokenization_spaces": False}
    if chat_template:
        cfg["chat_template"] = chat_template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def load_tokenizer(path: str | Path):
    """A `tokenizers.Tokenizer` from a tokenizer.json file or a folder holding one."""
    require_train_extra("tokenizers")
    from tokenizers import Tokenizer

    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:
        raise LlmdeskError(f"{p}: cannot read the tokenizer ({e}); give a tokenizer.json or its folder") from None


def tiny_chat_llama(folder: Path, texts: list[str], *, vocab_size: int = 320, seed: int = 0) -> Path:
    """A random-weight 2-layer Llama (64 wide) in transformers' format, with a BPE tokenizer
    trained on `texts` and the ChatML template: a real chat model small enough to fine-tune in
    seconds (the tests' and the reward proofs' base). Its weights are drawn wide (std 0.1) so that
    the fixed output head can express confident answers once LoRA moves the hidden states."""
    import torch
    import transformers

    tok = train_bpe(texts, vocab_size)
    eos = tok.token_to_id(EOS)
    cfg = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=False, initializer_range=0.1)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    save_hf_tokenizer(tok, Path(folder))
    (Path(folder) / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "bos_token_id": eos}))
    return Path(folder)
