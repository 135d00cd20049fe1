"""llmdesk fit: presets, per-tensor quantization rules, memory arithmetic, devices, the CLI."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from llmdesk.cli.main import main
from llmdesk.errors import LlmdeskError
from llmdesk.fit import DEVICES, PRESETS, estimate_memory, fit, get_device, get_preset
from llmdesk.fit.memory import kv_cache_bytes, n_params
from llmdesk.fit.presets import from_hf_config, resolve_shape
from llmdesk.fit.quants import normalize_quant, tensor_type
from llmdesk.fit.training import estimate_training
from llmdesk.formats.shape import model_tensors

GiB = 1 << 30


@pytest.fixture(autouse=True)
def fixed_machine(monkeypatch):
    """No bandwidth measurement in tests: a fixed, plausible machine."""
    from llmdesk.fit import hardware

    monkeypatch.setattr(hardware, "measure_bandwidth", lambda *a, **k: 20.0)
    monkeypatch.setattr(hardware, "cpu_peak_gflops", lambda *a, **k: 200.0)


# -- presets ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, billions", [
    ("llama-2-7b", 6.74), ("llama-2-13b", 13.0), ("llama-2-70b", 69.0), ("llama-3.1-8b", 8.03),
    ("llama-3.2-1b", 1.24), ("mistral-7b", 7.25), ("mixtral-8x7b", 46.7), ("qwen2.5-0.5b", 0.494),
    ("qwen2.5-7b", 7.62), ("tinyllama-1.1b", 1.10), ("smollm2-135m", 0.1349), ("phi-3-mini", 3.82),
    ("gemma-2-2b", 2.61), ("gemma-2-9b", 9.24),
])
def test_preset_parameter_counts_match_the_published_sizes(name, billions):
    assert n_params(PRESETS[name]) / 1e9 == pytest.approx(billions, rel=0.02)


def test_every_preset_names_its_config():
    for p in PRESETS.values():
        assert "/" in p.source, p.name
        assert p.n_head % p.n_head_kv == 0


def test_unknown_preset_lists_close_matches():
    with pytest.raises(LlmdeskError, match="did you mean llama-3.1-8b"):
        get_preset("lama-3.1-8b")


def test_hf_config_gives_the_preset_shape(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
           "max_position_embeddings": 131072, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = resolve_shape(str(tmp_path)).shape  # a checkpoint folder
    p = PRESETS["llama-3.1-8b"]
    for k in ("n_layer", "n_embd", "n_head", "n_head_kv", "n_ff", "n_vocab", "head_dim", "tied_embeddings"):
        assert getattr(shape, k) == getattr(p, k)
    assert from_hf_config(cfg).n_embd_kv == 1024
    assert shape.n_merges == 0  # no tokenizer files beside it
    # BPE merge rules are held in memory by llama.cpp: counted from the tokenizer beside the config
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "merges": ["a b", "ab c", "Ġ t"]}}))
    assert resolve_shape(str(tmp_path / "config.json")).shape.n_merges == 3
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\nab c\n")
    assert resolve_shape(str(tmp_path)).shape.n_merges == 2


def test_merge_rules_cost_memory():
    """Llama 3's 280,147 merges are tens of MB in llama.cpp's tables; SentencePiece models have none."""
    from llmdesk.fit.memory import PER_MERGE_BYTES, overhead_bytes

    llama3, llama2 = PRESETS["llama-3.1-8b"], PRESETS["llama-2-7b"]
    assert llama3.n_merges == 280147 and llama2.n_merges == 0
    assert overhead_bytes(llama3) - overhead_bytes(replace(llama3, n_merges=0)) == 280147 * PER_MERGE_BYTES


# -- the per-tensor rules (llama-quant.cpp) ---------------------------------------------------

def test_q4_k_m_mix_follows_llama_cpp_rules():
    shape = PRESETS["llama-3.1-8b"]
    types = {t.name: tensor_type(t, "Q4_K_M", shape) for t in model_tensors(shape)}
    assert types["output.weight"] == "Q6_K"
    assert types["token_embd.weight"] == "Q4_K"
    assert types["blk.0.attn_v.weight"] == "Q6_K"  # first eighth: more bits
    assert types["blk.5.attn_v.weight"] == "Q4_K"
    assert types["blk.6.attn_v.weight"] == "Q6_K"  # (6 - 4) % 3 == 2
    assert types["blk.31.ffn_down.weight"] == "Q6_K"  # last eighth
    assert types["blk.10.ffn_gate.weight"] == "Q4_K"
    assert types["blk.10.attn_norm.weight"] == "F32"


def test_rows_not_divisible_by_256_fall_back():
    shape = PRESETS["smollm2-135m"]  # n_embd 576 = 2.25 x 256
    types = {t.name: tensor_type(t, "Q4_K_M", shape) for t in model_tensors(shape)}
    assert types["blk.3.attn_q.weight"] == "Q5_0"  # Q4_K -> Q5_0
    assert types["token_embd.weight"] == "Q8_0"  # tied: output rule, Q6_K -> Q8_0
    assert types["blk.3.ffn_down.weight"] == "Q4_K"  # n_ff 1536 = 6 x 256


def test_unknown_quant_lists_the_valid_ones():
    with pytest.raises(LlmdeskError, match="valid types: .*q4_k_m"):
        normalize_quant("q4_k_z")


# -- memory arithmetic ------------------------------------------------------------------------

def test_kv_cache_counts_kv_heads_not_attention_heads():
    # llama-2-7b, 4096 tokens, f16: 32 layers x 4096 x 4096 x 2 x 2 bytes = 2 GiB (no GQA)
    assert kv_cache_bytes(PRESETS["llama-2-7b"], 4096) == 2 * GiB
    # llama-3.1-8b has 8 KV heads of 32: a quarter of that per token
    assert kv_cache_bytes(PRESETS["llama-3.1-8b"], 8192) == 1 * GiB
    assert kv_cache_bytes(PRESETS["llama-3.1-8b"], 8192, kv_type="q8_0") == 1 * GiB * 34 // 64


def test_sliding_window_layers_keep_the_full_cache_unless_told():
    """llama.cpp's context default (swa_full, kept by llmdesk) sizes window layers like the others
    (measured: gemma-2-2b's two caches log 64 MiB each at 8k with 4 layers); without it they keep
    window + micro-batch cells."""
    g = PRESETS["gemma-2-9b"]
    full = 42 * 8192 * 8 * 256 * 2 * 2
    assert kv_cache_bytes(g, 8192) == full
    assert kv_cache_bytes(g, 8192, swa_full=False) < 0.8 * full


def test_a_gguf_file_is_counted_from_its_own_tensors(tiny_gguf):
    src = resolve_shape(str(tiny_gguf))
    e = estimate_memory(src.shape, quant=None, ctx=512, gguf_info=src.gguf)
    assert e.weights_bytes == sum(t.nbytes for t in src.gguf.tensors)
    assert e.weights_by_type == {"F32": e.weights_bytes}
    assert src.shape.n_merges == len(src.gguf.metadata["tokenizer.ggml.merges"]) > 0


def test_max_ctx_is_the_largest_that_fits():
    from llmdesk.fit.memory import max_ctx

    shape = PRESETS["llama-3.1-8b"]
    budget = 8 * GiB
    c = max_ctx(shape, budget, quant="Q4_K_M", gpu=True, repack=False)
    assert estimate_memory(shape, quant="Q4_K_M", ctx=c, repack=False).gpu_bytes <= budget
    assert estimate_memory(shape, quant="Q4_K_M", ctx=c + 256, repack=False).gpu_bytes > budget


def test_the_question_of_the_issue():
    """llama-3.1-8b at q4_k_m with 8k context on an RTX 4060: fits, ~40 tokens/s."""
    r = fit("llama-3.1-8b", quant="q4_k_m", ctx=8192, devices=["rtx-4060"], local=False)
    t = r.primary
    assert t.fits and 5 * GiB < t.needed_bytes < 8 * GiB
    assert 25 < t.decode_tokens_per_second < 60
    assert t.decode_tokens_per_second < t.decode_roofline_tokens_per_second
    assert 4.8e9 < r.memory.weights_bytes < 5.0e9  # Q4_K_M files of it are 4.92 GB


def test_a_gpu_too_small_for_the_whole_model_gets_a_layer_count():
    """Q8_0 at 8k does not fit an 8 GB card; llama.cpp can still put most layers there (-ngl N)."""
    from llmdesk.fit.memory import layer_weight_bytes

    whole = fit("llama-3.1-8b", quant="q4_k_m", ctx=8192, devices=["rtx-4060"], local=False).primary
    assert whole.fits and whole.gpu_layers == 33  # every layer and the output layer: -ngl all
    r = fit("llama-3.1-8b", quant="q8_0", ctx=8192, devices=["rtx-4060", "rtx-4090"], local=False)
    small, big = r.targets
    assert not small.fits and 20 <= small.gpu_layers < 32
    assert big.fits and big.gpu_layers == 33
    assert f"-ngl {small.gpu_layers}" in small.note
    # the count is the largest whose layers, their KV cache and the fixed GPU buffers fit the card
    m = r.memory
    per_layer = (layer_weight_bytes(PRESETS["llama-3.1-8b"], "Q8_0") + m.kv_cache_bytes) / 32
    fixed = m.compute_reserved_bytes + 512 * 2**20
    assert fixed + small.gpu_layers * per_layer <= small.budget_bytes < fixed + (small.gpu_layers + 1) * per_layer
    assert fit("llama-3.1-8b", quant="q8_0", devices=["raspberry-pi-5"], local=False).primary.gpu_layers is None  # a CPU


def test_training_memory():
    full = estimate_training(PRESETS["llama-2-7b"], "full", seq_len=2048, batch=1)
    assert full.weights_bytes + full.gradients_bytes + full.optimizer_bytes == 16 * full.n_params
    q = estimate_training(PRESETS["llama-2-7b"], "qlora", seq_len=2048, batch=1)
    lo = estimate_training(PRESETS["llama-2-7b"], "lora", seq_len=2048, batch=1)
    assert q.total_bytes < lo.total_bytes < full.total_bytes
    assert 0.1e9 < q.weights_bytes / 10 < 0.5e9  # ~3.6 GB of NF4 weights
    assert q.trainable_params == lo.trainable_params == pytest.approx(40e6, rel=0.1)


def test_devices_have_sources_and_sane_figures():
    assert len(DEVICES) >= 40
    for d in DEVICES.values():
        assert d.source and d.bandwidth_gbs > 0 and d.memory_gb > 0
    assert get_device("m2-max:96").memory_gb == 96
    with pytest.raises(LlmdeskError, match="did you mean rtx-4090"):
        get_device("rtx4090")


# -- the CLI ----------------------------------------------------------------------------------

def test_cli_json_has_the_documented_keys(capsys):
    assert main(["fit", "qwen2.5-7b", "--quant", "q4_k_m", "--ctx", "8192", "--device", "rtx-3060", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    for k in ("total_bytes", "weights_bytes", "kv_cache_bytes", "compute_bytes", "overhead_bytes", "fits",
              "max_ctx", "decode_tokens_per_second", "prefill_tokens_per_second"):
        assert k in d, k
    assert d["target"].startswith("rtx-3060") and d["fits"] is True


def test_cli_table_and_this_machine(capsys):
    assert main(["fit", "tinyllama-1.1b", "-q", "q8_0", "-c", "2048"]) == 0
    o = capsys.readouterr().out
    assert "KV cache" in o and "this machine" in o and "Q8_0" in o


@pytest.mark.parametrize("args, message", [
    (["fit", "lama-3.1-8b"], "unknown model preset 'lama-3.1-8b'; did you mean llama-3.1-8b"),
    (["fit", "llama-3.1-8b", "--quant", "q5_z"], "valid types:"),
    (["fit", "llama-3.1-8b", "--device", "rtx-9999"], "unknown device"),
    (["fit", "llama-3.1-8b", "--kv-type", "q3"], "unknown KV cache type"),
    (["fit", "llama-3.1-8b", "--train", "half"], "--train must be full, lora or qlora"),
])
def test_cli_bad_input_is_one_line(capsys, args, message):
    assert main(args) == 1
    e = capsys.readouterr().err
    assert message in e and e.count("\n") == 1 and "Traceback" not in e


def test_cli_non_model_file(tmp_path, capsys):
    f = tmp_path / "notes.gguf"
    f.write_text("hello, this is not a model")
    assert main(["fit", str(f)]) == 1
    e = capsys.readouterr().err
    assert "not a GGUF file" in e and e.count("\n") == 1


def test_cli_ctx_above_trained_max_says_so_and_still_estimates(capsys):
    assert main(["fit", "tinyllama-1.1b", "--ctx", "8192", "--json"]) == 0
    c = capsys.readouterr()
    d = json.loads(c.out)
    assert any("above the model's trained maximum of 2048" in n for n in d["notes"])
    assert d["kv_cache_bytes"] == kv_cache_bytes(PRESETS["tinyllama-1.1b"], 8192)


def test_cli_lists(capsys):
    assert main(["fit", "--devices"]) == 0
    o = capsys.readouterr().out
    assert "rtx-4060" in o and "raspberry-pi-5" in o and "jetson-agx-orin" in o and "m4-max" in o
    assert main(["fit", "--presets"]) == 0
    assert "smollm2-360m" in capsys.readouterr().out


def test_cli_train(capsys):
    assert main(["fit", "llama-3.1-8b", "--train", "qlora", "--seq-len", "1024", "--batch", "2", "--device", "rtx-4090"]) == 0
    o = capsys.readouterr().out
    assert "training (qlora, seq 1024, batch 2" in o and "optimizer" in o


def test_an_embedding_model_has_no_kv_cache_and_does_not_decode(tmp_path, capsys):
    from bert_fixtures import make_tiny_bert_gguf

    path = make_tiny_bert_gguf(tmp_path)
    src = resolve_shape(str(path))
    assert src.shape.causal is False
    e = estimate_memory(src.shape, quant=None, ctx=512, gguf_info=src.gguf)
    assert e.kv_cache_bytes == 0 and e.ubatch == 512  # a whole text per pass
    # every head's T x T scores: the working set grows with the square of the context
    small = estimate_memory(src.shape, quant=None, ctx=128, gguf_info=src.gguf)
    assert e.compute_bytes > 4 * small.compute_bytes
    assert main(["fit", str(path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["kv_cache_bytes"] == 0 and d["decode_tokens_per_second"] == 0 and d["prefill_tokens_per_second"] > 0
    assert main(["fit", str(path)]) == 0
    o = capsys.readouterr().out
    assert re.search(r"KV cache +none", o) and "does not decode" in o
