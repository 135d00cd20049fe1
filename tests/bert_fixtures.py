"""Tiny BERT embedding models for tests: random weights in transformers' real BertModel, a real
WordPiece tokenizer trained here with `tokenizers`, saved as a sentence-transformers folder and
converted by llmdesk's own converter (tokenizer self-check included).

    from bert_fixtures import make_tiny_bert_gguf
    path = make_tiny_bert_gguf(tmp_path)          # -> tmp_path/tiny-bert.gguf (mean pooling)
    with llmdesk.load(path) as m: m.embed(["some text"])

Random weights still embed texts that share words closer than texts that do not (the vectors
are pooled token embeddings mixed by attention), which is enough for retrieval tests to rank.
Building one takes a second or two after torch is imported.
"""

from __future__ import annotations

import json
from pathlib import Path

# the tokenizer's training text: English prose about the project's subjects, accents, punctuation
CORPUS = [
    "The quick brown fox jumps over the lazy dog. A lazy dog sleeps in the sun all afternoon.",
    "Quantization stores the weights of a model in fewer bits, so it needs less memory and runs faster.",
    "The KV cache holds keys and values for every token; tokens per second measures the speed.",
    "SQLite is an embedded database: one file, no server, transactions and full-text search.",
    "Embeddings turn a sentence into a vector; similar sentences point in similar directions.",
    "Paris is the capital of France. Berlin is the capital of Germany. Rome is in Italy.",
    "Cats and dogs are pets. The cat sat on the mat, and the dog chased the ball in the garden.",
    "Python packages are installed with pip; a virtual environment keeps them apart from the system.",
    "Grüße aus München! Ça va très bien, merci. Café, naïve, résumé, déjà vu, façade, coöperate.",
    "Numbers: 3.14159, 1,000,000 and 2024-05-01. Symbols: (a) [b] {c} <d> #e $f %g &h *i +j = k / l @ m",
    "Retrieval finds the passages that answer a question; a reranker orders them by relevance.",
    "Trains, planes and ships carry people and goods between cities, countries and continents.",
    "The weather today is sunny with a light breeze; tomorrow it will rain in the mountains.",
    "A recipe: mix flour, water, salt and yeast, knead the dough, let it rise, then bake the bread.",
    "Music, painting and literature are arts; a novel tells a story over many chapters.",
    "日本語のテキスト。中文文本。Привет, мир.",
] * 3

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_tiny_bert_folder(path: str | Path, *, pooling: str | None = "mean", vocab_size: int = 600,
                          seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4,
                          masked_lm: bool = False) -> Path:
    """A tiny random-weight BertModel checkpoint with a trained WordPiece tokenizer (lowercasing,
    accents stripped, as bert-base-uncased and all-MiniLM-L6-v2). `pooling` "mean" or "cls" makes
    it a sentence-transformers folder (modules.json, 1_Pooling/config.json, Normalize); None a
    plain transformers folder. `masked_lm`: saved as BertForMaskedLM (the encoder under "bert.",
    with its MLM head), as pre-trained BERT checkpoints are."""
    import torch
    import transformers
    from tokenizers import BertWordPieceTokenizer
    from tokenizers.processors import TemplateProcessing

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = BertWordPieceTokenizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
    tok.train_from_iterator(CORPUS, vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIAL,
                            limit_alphabet=500, wordpieces_prefix="##", show_progress=False)
    # [CLS] text [SEP], as a real BERT tokenizer.json says (training alone leaves no post-processor)
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertTokenizer", "do_lower_case": True, "strip_accents": None,
        "tokenize_chinese_chars": True, "model_max_length": 128, "unk_token": "[UNK]", "sep_token": "[SEP]",
        "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}))
    cfg = transformers.BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=heads, intermediate_size=2 * hidden,
                                  max_position_embeddings=128, type_vocab_size=2, hidden_act="gelu",
                                  layer_norm_eps=1e-12, initializer_range=0.1, pad_token_id=0)
    torch.manual_seed(seed)
    model = (transformers.BertForMaskedLM if masked_lm else transformers.BertModel)(cfg).eval()
    with torch.no_grad():  # LayerNorms not at their 1/0 start, biases not zero: checks they are carried over
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    if pooling is not None:
        (path / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
        (path / "1_Pooling").mkdir(exist_ok=True)
        (path / "1_Pooling" / "config.json").write_text(json.dumps({
            "word_embedding_dimension": hidden, "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False}))
        (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": False}))
    return path


def make_tiny_bert_gguf(dir: str | Path, *, pooling: str | None = "mean", out_type: str = "f32",
                        name: str = "tiny-bert", masked_lm: bool = False) -> Path:
    """`dir`/NAME.gguf: the tiny BERT of `make_tiny_bert_folder` (in `dir`/NAME-hf) converted by
    llmdesk's converter with its tokenizer self-check; made once per folder, reused after."""
    from llmdesk.formats.convert import convert
    from llmdesk.runtime.llama import LlamaModel

    dir = Path(dir)
    out = dir / f"{name}.gguf"
    if not out.exists():
        folder = make_tiny_bert_folder(dir / f"{name}-hf", pooling=pooling, masked_lm=masked_lm)
        convert(folder, out, out_type=out_type, name=name, check_with=LlamaModel)
    return out
