"""llmdesk make-model: random weights with the exact shapes (and, quantized, the exact per-tensor
types) of real models; formats/synth.py's writer behind it."""

from __future__ import annotations

import pytest

from llmdesk.bench.make_model import make_model
from llmdesk.cli.main import main
from llmdesk.fit import PRESETS, estimate_memory
from llmdesk.fit.presets import resolve_shape
from llmdesk.formats.gguf import read_gguf
from llmdesk.formats.synth import SynthConfig, write_llama_gguf


def test_default_synth_model_is_unchanged(tmp_path):
    """Many tests use write_llama_gguf(path, SynthConfig()): a tiny f32 llama, deterministic."""
    a = write_llama_gguf(tmp_path / "a.gguf", SynthConfig())
    b = write_llama_gguf(tmp_path / "b.gguf", SynthConfig())
    assert a.read_bytes() == b.read_bytes()
    info = read_gguf(a)
    assert info.architecture == "llama" and info.file_type == "F32" and len(info.tensors) == 21
    assert {t.type_name for t in info.tensors} == {"F32"}
    assert info.vocab_size == 456 + 4


def test_real_shape_f16(tmp_path):
    path = make_model("smollm2-135m", "f16", tmp_path / "m.gguf", layers=2)
    info = read_gguf(path)
    p = PRESETS["smollm2-135m"]
    assert info.vocab_size == p.n_vocab == 49152
    assert info.embedding_length == 576 and info.head_count == 9 and info.head_count_kv == 3
    assert info.block_count == 2 and info.feed_forward_length == 1536
    assert "output.weight" not in {t.name for t in info.tensors}  # tied embeddings
    assert info.file_type == "F16"
    # llama.cpp loads it and generates
    from llmdesk.runtime.model import Model

    with Model(path, ctx=64) as m:
        assert m.llama.n_vocab == 49152
        assert m.complete("hello", max_tokens=3, temperature=0, ignore_eos=True).completion_tokens == 3
        # the padded vocabulary is words: a random model streams visible text, like a real one
        # (a server benchmark's time to first token is the time to the first visible text)
        pieces = [ev.text for ev in m.start("hello", max_tokens=24, temperature=1.0, seed=3, ignore_eos=True)]
        assert len(pieces) == 24 and sum(bool(p.strip()) for p in pieces) >= 20


def test_q8_0_written_directly_matches_the_estimate(tmp_path):
    path = make_model("smollm2-135m", "q8_0", tmp_path / "t.gguf", layers=1)
    src = resolve_shape(str(path))
    est = estimate_memory(src.shape, quant="Q8_0", ctx=512)
    assert est.weights_by_type == read_gguf(path).tensor_type_bytes


SMALL = {  # the architectures' layouts at a small size (rows of 256: every k-quant applies)
    "phi3": dict(arch="phi3", n_head=4, n_head_kv=4),  # fused qkv and gate+up
    "gemma2": dict(arch="gemma2", n_head=4, n_head_kv=2, head_dim=96, tied_embeddings=True, n_swa=128,
                   swa_every=2),  # extra norms, soft-capping, sliding window, head_dim != n_embd/n_head
    "mixtral": dict(arch="llama", n_head=4, n_head_kv=2, n_expert=8, n_expert_used=2),  # 8 experts: their own rules
}


@pytest.mark.parametrize("kind", list(SMALL))
def test_other_architectures_load_generate_and_match_fit(kind, tmp_path):
    """make-model writes every fit preset's architecture: llama.cpp loads and runs each, and its
    tensors have exactly the types and bytes fit counts, written directly and quantized."""
    from llmdesk.fit.presets import ModelShape
    from llmdesk.runtime.model import Model

    shape = ModelShape(name=f"small-{kind}", n_layer=3, n_embd=256, n_ff=512, n_vocab=1024, n_ctx_train=512,
                       **SMALL[kind])
    for q in ("Q8_0", "Q4_K_M"):
        path = make_model(shape, q.lower(), tmp_path / f"{kind}-{q}.gguf")
        info = read_gguf(path)
        assert info.architecture == shape.arch
        assert estimate_memory(shape, quant=q, ctx=512).weights_by_type == info.tensor_type_bytes, q
        with Model(path, ctx=128) as m:
            assert m.complete("hello", max_tokens=4, temperature=0, ignore_eos=True).completion_tokens == 4


@pytest.mark.slow
def test_quantized_types_match_llama_cpp_per_tensor(tmp_path):
    """fit's port of llama.cpp's per-tensor rules, checked against llama.cpp's quantizer itself:
    the bytes of every type equal the quantized file's, exactly (fallbacks included: n_embd 576
    is not a multiple of 256)."""
    from llmdesk.quantize.core import quantize_file

    f16 = make_model("smollm2-135m", "f16", tmp_path / "f16.gguf", layers=9)
    for q in ("Q4_K_M", "Q4_0", "Q3_K_M", "Q5_K_M", "Q6_K", "Q2_K", "IQ4_XS"):
        out = quantize_file(f16, tmp_path / f"{q}.gguf", q)
        src = resolve_shape(str(out))
        est = estimate_memory(src.shape, quant=q, ctx=512)
        assert est.weights_by_type == read_gguf(out).tensor_type_bytes, q


@pytest.mark.slow
def test_qwen2_shape_with_biases_loads(tmp_path):
    path = make_model("qwen2.5-0.5b", "q8_0", tmp_path / "q.gguf", layers=1)
    info = read_gguf(path)
    assert info.architecture == "qwen2" and "blk.0.attn_q.bias" in {t.name for t in info.tensors}
    from llmdesk.runtime.llama import LlamaModel

    m = LlamaModel(path)
    try:
        assert m.n_vocab == 151936
    finally:
        m.close()


def test_cli(tmp_path, capsys):
    out = tmp_path / "s.gguf"
    assert main(["make-model", "--preset", "smollm2-135m", "--type", "f16", "-o", str(out), "--layers", "1"]) == 0
    assert "F16" in capsys.readouterr().out and out.exists()
    assert not list(tmp_path.glob("*.part"))


@pytest.mark.parametrize("args, message", [
    (["--preset", "smolm2-135m", "--type", "f16"], "did you mean smollm2-135m"),
    (["--preset", "smollm2-135m", "--type", "q4_k_x"], "valid types:"),
    (["--preset", "gemma-2-2b", "--type", "f16", "--layers", "0"], "--layers must be at least 1"),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, args, message):
    assert main(["make-model", *args, "-o", str(tmp_path / "x.gguf")]) == 1
    e = capsys.readouterr().err
    assert message in e and e.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_cli_missing_folder(tmp_path, capsys):
    assert main(["make-model", "--preset", "smollm2-135m", "--type", "f16", "-o", str(tmp_path / "no" / "x.gguf")]) == 1
    assert "no such directory" in capsys.readouterr().err
