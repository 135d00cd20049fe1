"""`llmdesk convert` from the command line: output types, registration, and bad input (one line,
non-zero exit, no file left behind)."""

from __future__ import annotations

import json
import shutil

import pytest

import torch  # noqa: E402, F401  (the train extra: missing, this fails)
import transformers  # noqa: E402, F401

from llmdesk.cli.main import main  # noqa: E402
from llmdesk.formats import convert as convert_mod  # noqa: E402
from llmdesk.formats.convert import pre_tokenizer_name  # noqa: E402
from llmdesk.formats.hf import ConversionError  # noqa: E402
from llmdesk.runtime.llama import LlamaModel  # noqa: E402

from test_convert import make_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("hf") / "ckpt", "llama")


def run(capsys, *args):
    code = main(list(map(str, args)))
    o, e = capsys.readouterr()
    return code, o, e


def listed_names(capsys) -> list[str]:
    code, o, e = run(capsys, "list", "--json")
    assert code == 0, e
    return [m["name"] for m in json.loads(o)]


def one_error_line(code, e, *needles):
    assert code != 0
    lines = [ln for ln in e.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), e
    for n in needles:
        assert n in lines[0], lines[0]


def test_convert_registers_and_runs(ckpt, tmp_path, capsys):
    out = tmp_path / "tiny.gguf"
    code, o, e = run(capsys, "convert", ckpt, "-o", out, "--type", "q8_0", "--name", "tiny-conv:q8")
    assert code == 0, e
    assert "registered as tiny-conv:q8" in o and out.exists()
    assert listed_names(capsys) == ["tiny-conv"]
    from llmdesk.formats.gguf import read_gguf

    info = read_gguf(out)
    assert info.file_type == "Q8_0" and info.tokenizer_model == "gpt2"
    assert info.get("tokenizer.ggml.pre") == "llama-bpe"
    assert "<|im_start|>" in info.chat_template
    assert info.special_tokens["eos"] == "<|endoftext|>" and info.special_tokens["eot"] == "<|im_end|>"
    assert not list(tmp_path.glob(".*part"))


def test_convert_f16_no_register_json(ckpt, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    code, o, e = run(capsys, "convert", ckpt, "-o", out, "--no-register", "--json")
    assert code == 0, e
    d = json.loads(o)
    assert d["out_type"] == "f16" and d["registered"] is None and d["architecture"] == "llama"
    assert listed_names(capsys) == []


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "x.gguf"
    code, o, e = run(capsys, "convert", tmp_path / "empty", "-o", out)
    one_error_line(code, e, "not a Hugging Face checkpoint", "config.json")
    assert not out.exists()
    code, o, e = run(capsys, "convert", tmp_path / "nope", "-o", out)
    one_error_line(code, e, "no such folder")


def _copy(ckpt, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(ckpt, d)
    return d


def test_unsupported_architecture_lists_supported(ckpt, tmp_path, capsys):
    d = _copy(ckpt, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "x.gguf"
    code, o, e = run(capsys, "convert", d, "-o", out)
    one_error_line(code, e, "GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM")
    assert not out.exists()


@pytest.mark.parametrize("rope, needles", [
    ({"rope_type": "dynamic", "factor": 2.0}, ["'dynamic'", "yarn"]),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 0.7,
      "mscale_all_dim": 0.7}, ["YaRN with attention_factor/mscale"]),
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}, ["'longrope'", "Phi-3"]),
])
def test_rope_scaling_it_cannot_convert_is_one_line(ckpt, tmp_path, capsys, rope, needles):
    d = _copy(ckpt, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_scaling"] = rope
    (d / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "x.gguf"
    code, o, e = run(capsys, "convert", d, "-o", out)
    one_error_line(code, e, *needles)
    assert not out.exists()


def test_gemma2_query_scaling_llama_cpp_cannot_follow(tmp_path, capsys):
    d = make_checkpoint(tmp_path / "g2", "gemma2")
    cfg = json.loads((d / "config.json").read_text())
    cfg["query_pre_attn_scalar"] = 24  # head_dim is 16 and the model has 2 layers, not 46
    (d / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()  # (transformers' own output while making the checkpoint)
    code, o, e = run(capsys, "convert", d, "-o", tmp_path / "x.gguf")
    one_error_line(code, e, "query_pre_attn_scalar 24", "(16)")
    assert not (tmp_path / "x.gguf").exists()


def test_missing_and_unreadable_tokenizer(ckpt, tmp_path, capsys):
    d = _copy(ckpt, tmp_path)
    (d / "tokenizer.json").unlink()
    out = tmp_path / "x.gguf"
    code, o, e = run(capsys, "convert", d, "-o", out)
    one_error_line(code, e, "no tokenizer")
    (d / "tokenizer.json").write_text("{not json")
    code, o, e = run(capsys, "convert", d, "-o", out)
    one_error_line(code, e, "tokenizer.json", "not valid JSON")
    assert not out.exists()


def test_shape_mismatch(ckpt, tmp_path, capsys):
    d = _copy(ckpt, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (d / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "x.gguf"
    code, o, e = run(capsys, "convert", d, "-o", out)
    one_error_line(code, e, "shape", "config.json")
    assert not out.exists() and not list(tmp_path.glob(".x.gguf*"))


def test_more_layers_in_config_than_weights(ckpt, tmp_path, capsys):
    d = _copy(ckpt, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "x.gguf"
    code, o, e = run(capsys, "convert", d, "-o", out)
    one_error_line(code, e, "missing tensor blk.2")
    assert not out.exists()


def test_self_check_reports_tokenizer_differences(ckpt, tmp_path, capsys, monkeypatch):
    real = convert_mod.reference_tokenize

    def off_by_one(ck):
        f = real(ck)
        return lambda s: [i + 1 for i in f(s)]

    monkeypatch.setattr(convert_mod, "reference_tokenize", off_by_one)
    out = tmp_path / "x.gguf"
    code, o, e = run(capsys, "convert", ckpt, "-o", out)
    one_error_line(code, e, "tokenizer differs from the original")
    assert not out.exists()
    assert listed_names(capsys) == []


def test_pre_tokenizer_is_read_from_the_config():
    from llmdesk.formats.convert import LLAMA3_REGEX, QWEN2_REGEX

    def split(rx):
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": rx}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}

    assert pre_tokenizer_name(split(LLAMA3_REGEX)) == "llama-bpe"
    # Llama 3's tokenizer.json spells the contractions case by case: the same regex
    explicit = LLAMA3_REGEX.replace("(?i:'s|'t|'re|'ve|'m|'ll|'d)",
                                    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])")
    assert pre_tokenizer_name(split(explicit)) == "llama-bpe"
    assert pre_tokenizer_name(split(QWEN2_REGEX)) == "qwen2"
    assert pre_tokenizer_name({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}) == "gpt-2"
    with pytest.raises(ConversionError, match="no llama.cpp pre-tokenizer matches"):
        pre_tokenizer_name(split(r"\p{L}+|\s+"))


def test_sharded_safetensors_and_pytorch_bin(ckpt, tmp_path):
    import torch
    import transformers

    from llmdesk.formats.convert import convert

    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    sharded = _copy(ckpt, tmp_path)
    (sharded / "model.safetensors").unlink()
    model.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    a = convert(sharded, tmp_path / "a.gguf", out_type="f32", check_with=LlamaModel)

    binary = tmp_path / "bin"
    shutil.copytree(ckpt, binary)
    (binary / "model.safetensors").unlink()
    torch.save(model.state_dict(), binary / "pytorch_model.bin")
    b = convert(binary, tmp_path / "b.gguf", out_type="f32", check_with=LlamaModel)
    assert a.n_params == b.n_params and a.n_tensors == b.n_tensors
    import gguf
    import numpy as np

    ta = {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / "a.gguf").tensors}
    tb = {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / "b.gguf").tensors}
    assert ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)


def test_conversion_holds_one_tensor_at_a_time(tmp_path):
    """A 7B checkpoint must convert on a machine with less RAM than its weights: tensors are read,
    converted and written one by one. numpy's allocations (tracemalloc) peak far below the model
    (0.7 MB for this 32 MB one; holding every converted tensor until the end took 19 MB)."""
    import tracemalloc

    d = make_checkpoint(tmp_path / "wide", "llama-wide")
    convert_mod.convert(d, tmp_path / "warm.gguf", out_type="f16")  # imports, caches
    tracemalloc.start()
    try:
        res = convert_mod.convert(d, tmp_path / "w.gguf", out_type="f16")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    model_f32 = 4 * res.n_params
    assert res.n_params > 8_000_000
    assert peak < model_f32 / 4, f"peak {peak / 1e6:.1f} MB for a {model_f32 / 1e6:.1f} MB model"



def test_every_output_type_is_what_it_says_and_close_to_f32(ckpt, tmp_path):
    """2-D weights in the asked type (1-D ones stay f32), and llama.cpp's logits from each file near
    the f32 file's: a wrong byte layout would move them by the size of the logits themselves (~5)."""
    from test_convert import PROMPT, llama_logits

    from llmdesk.formats.convert import reference_tokenize
    from llmdesk.formats.gguf import read_gguf
    from llmdesk.formats.hf import open_checkpoint

    ids = reference_tokenize(open_checkpoint(ckpt))(PROMPT)[:48]
    ref = None
    for out_type, type_name, bound in (("f32", "F32", 0.0), ("f16", "F16", 0.02), ("bf16", "BF16", 0.2),
                                       ("q8_0", "Q8_0", 0.5)):
        res = convert_mod.convert(ckpt, tmp_path / f"{out_type}.gguf", out_type=out_type)
        assert {(len(t.shape) >= 2, t.type_name) for t in read_gguf(res.path).tensors} == {(True, type_name), (False, "F32")}
        logits = llama_logits(res.path, ids)
        ref = logits if ref is None else ref
        assert float(abs(logits - ref).max()) <= bound, out_type
