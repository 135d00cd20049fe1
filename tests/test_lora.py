"""LoRA adapters: a PEFT adapter written as a llama.cpp LoRA GGUF (formats/lora_gguf.py) and
applied at run time (Engine, Model, `llmdesk run --lora`), on a tiny real Llama (test_engine_scoring's
`hf` checkpoint) with a real PEFT LoRA on all seven projections, its B matrices random (PEFT
starts them at zero: an adapter that changes nothing would prove nothing).

Three ways of running the tuned model agree, as a user checks a fine-tune: the PEFT model in
transformers, the merged model (merge_and_unload, converted to f32 GGUF) in llama.cpp, and the
base f32 GGUF with the LoRA GGUF applied in llama.cpp: logits within 1e-3 (f32 KV cache, flash
attention off, as the scoring tests' EXACT) and the same greedy tokens. Scales: 0 is the base,
0.5 is PEFT with B halved, two adapters add up. Bad input is one line each.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

import peft  # noqa: E402  (the train extra: missing, this fails)
import torch  # noqa: E402
import transformers  # noqa: E402

import llmdesk  # noqa: E402
from llmdesk.cli.main import main  # noqa: E402
from llmdesk.errors import LlmdeskError  # noqa: E402
from llmdesk.formats.convert import convert  # noqa: E402
from llmdesk.formats.gguf import read_gguf  # noqa: E402
from llmdesk.formats.lora_gguf import convert_lora, write_lora_gguf  # noqa: E402
from llmdesk.runtime.engine import Engine, Request, SamplingParams, ScoreRequest  # noqa: E402
from llmdesk.runtime.llama import LlamaModel, LoraAdapter  # noqa: E402

from conftest import llmdesk_exe  # noqa: E402
from test_engine_scoring import EXACT, hf, one_thread  # noqa: E402, F401  (fixtures)

PARITY = 1e-3  # logits, f32 everywhere (the converter's parity tolerance)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = "The quick brown fox jumps over the lazy dog. Question: what holds keys and values?"
N_GREEDY = 16


def peft_model(ckpt, seed: int = 1, **config):
    """A real PEFT LoRA on a fresh copy of the checkpoint, its lora_B random (seeded)."""
    base = transformers.LlamaForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
    cfg = dict(r=4, lora_alpha=8, target_modules=TARGETS) | config
    pm = peft.get_peft_model(base, peft.LoraConfig(**cfg)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return pm


def save_merged(pm, ckpt, out_dir):
    """merge_and_unload (of a copy) saved beside the base's tokenizer files, as a checkpoint folder."""
    merged = copy.deepcopy(pm).merge_and_unload()
    merged.save_pretrained(out_dir)
    for f in ckpt.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, out_dir / f.name)
    return out_dir


@pytest.fixture(scope="module")
def tuned(hf):
    d = hf["dir"]
    pm = peft_model(hf["ckpt"])
    pm.save_pretrained(d / "adapter")
    convert(save_merged(pm, hf["ckpt"], d / "merged"), d / "merged-f32.gguf", out_type="f32", check_with=LlamaModel)
    lora = write_lora_gguf(d / "adapter", hf["ckpt"], d / "adapter.gguf")
    return {"peft": pm, "adapter": d / "adapter", "lora": lora, "merged": d / "merged-f32.gguf"}


def torch_logits(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].double().numpy()


def torch_greedy(model, tokens: list[int], n: int) -> list[int]:
    out = []
    for _ in range(n):
        out.append(int(torch_logits(model, tokens + out)[-1].argmax()))
    return out


def engine_run(llama: LlamaModel, tokens: list[int], lora=None) -> tuple[np.ndarray, list[int]]:
    """(logits at every prompt position but the last, predicting tokens[1:]; greedy tokens after
    the prompt) from one Engine with `lora` applied, f32 cache and no flash attention."""
    with Engine(llama, n_ctx=256, n_slots=1, lora=lora, **EXACT) as eng:
        r = eng.score([ScoreRequest(tokens[:1], tokens[1:], logits=True)]).wait()[0]
        g = eng.submit(Request(tokens, max_tokens=N_GREEDY, sampling=SamplingParams(temperature=0),
                               ignore_eos=True)).wait()
    return r.logits.astype(np.float64), g.tokens


# ---------------------------------------------------------------------------------------------
# the three ways agree


def test_peft_merged_and_runtime_lora_agree(hf, tuned):
    base = LlamaModel(hf["gguf"])
    merged = LlamaModel(tuned["merged"])
    try:
        tokens = base.tokenize(PROMPT)
        adapter = LoraAdapter(base, tuned["lora"])
        assert adapter.alpha == 8.0
        ref = torch_logits(tuned["peft"], tokens)[:-1]  # (n - 1, n_vocab): predicting tokens[1:]
        ref_greedy = torch_greedy(tuned["peft"], tokens, N_GREEDY)

        got_merged, greedy_merged = engine_run(merged, tokens)
        got_lora, greedy_lora = engine_run(base, tokens, lora=[(adapter, 1.0)])
        got_base, greedy_base = engine_run(base, tokens)

        assert np.abs(got_merged - ref).max() < PARITY
        assert np.abs(got_lora - ref).max() < PARITY
        assert np.abs(got_lora - got_merged).max() < PARITY
        assert greedy_lora == greedy_merged == ref_greedy
        assert base.detokenize(greedy_lora) == merged.detokenize(greedy_merged)
        # the adapter matters: without it the logits and the text are another model's
        assert np.abs(got_base - ref).max() > 0.5
        assert greedy_base != greedy_lora
    finally:
        merged.close()
        base.close()


def test_scales_zero_half_and_two_adapters(hf, tuned):
    base = LlamaModel(hf["gguf"])
    try:
        tokens = base.tokenize(PROMPT)
        adapter = LoraAdapter(base, tuned["lora"])
        got_base, greedy_base = engine_run(base, tokens)
        got_zero, greedy_zero = engine_run(base, tokens, lora=[(adapter, 0.0)])
        assert np.abs(got_zero - got_base).max() < 1e-6 and greedy_zero == greedy_base

        # scale 0.5 is PEFT with every lora_B halved
        half = copy.deepcopy(tuned["peft"])
        with torch.no_grad():
            for name, p in half.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.5)
        got_half, _ = engine_run(base, tokens, lora=[(adapter, 0.5)])
        assert np.abs(got_half - torch_logits(half, tokens)[:-1]).max() < PARITY

        # adapters add up: the same adapter twice at 0.5 is it once at 1
        twice = LoraAdapter(base, tuned["lora"])
        got_twice, _ = engine_run(base, tokens, lora=[(adapter, 0.5), (twice, 0.5)])
        got_one, _ = engine_run(base, tokens, lora=[(adapter, 1.0)])
        assert np.abs(got_twice - got_one).max() < 1e-4
        twice.close()
        assert twice.ptr is None and twice not in base.adapters
    finally:
        base.close()
    assert adapter.ptr is None  # llama.cpp freed it with the model


def test_rslora_and_per_module_alpha_and_rank(hf, tmp_path):
    """rsLoRA (alpha / sqrt(r)), alpha_pattern and rank_pattern: PEFT's scaling differs from
    llama.cpp's alpha / r there, and the writer folds the difference into B."""
    pm = peft_model(hf["ckpt"], seed=2, use_rslora=True, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3})
    pm.save_pretrained(tmp_path / "adapter")
    lora = write_lora_gguf(tmp_path / "adapter", hf["ckpt"], tmp_path / "rs.gguf")
    base = LlamaModel(hf["gguf"])
    try:
        tokens = base.tokenize(PROMPT)
        got, greedy = engine_run(base, tokens, lora=[(LoraAdapter(base, lora), 1.0)])
        assert np.abs(got - torch_logits(pm, tokens)[:-1]).max() < PARITY
        assert greedy == torch_greedy(pm, tokens, N_GREEDY)
    finally:
        base.close()


# ---------------------------------------------------------------------------------------------
# the file, the Python API and the CLI


def test_the_file_is_what_llama_cpp_expects(hf, tuned):
    """general.type adapter, adapter.type lora, the alpha, and <base tensor>.lora_a (in, r) /
    .lora_b (r, out) in ggml order for every adapted weight of the base."""
    info = read_gguf(tuned["lora"])
    base = {t.name: t.shape for t in read_gguf(hf["gguf"]).tensors}
    assert info.get("general.type") == "adapter" and info.get("adapter.type") == "lora"
    assert info.architecture == "llama" and info.get("adapter.lora.alpha") == 8.0
    names = {t.name: t.shape for t in info.tensors}
    assert len(names) == 2 * len(TARGETS) * 2  # two layers, A and B each
    for name, shape in names.items():
        weight, _, half = name.rpartition(".")
        n_in, n_out = base[weight]
        assert shape == ((n_in, 4) if half == "lora_a" else (4, n_out))


def test_smaller_adapter_types_apply(hf, tuned, tmp_path):
    """--type f16/bf16/q8_0 adapters load in llama.cpp and change the logits as the f32 one does,
    within their rounding (2% of what the adapter changes)."""
    base = LlamaModel(hf["gguf"])
    try:
        tokens = base.tokenize(PROMPT)
        plain, _ = engine_run(base, tokens)
        exact, _ = engine_run(base, tokens, lora=[(LoraAdapter(base, tuned["lora"]), 1.0)])
        effect = np.abs(exact - plain).max()
        for t in ("f16", "bf16", "q8_0"):
            res = convert_lora(tuned["adapter"], hf["gguf"], tmp_path / f"{t}.gguf", out_type=t)
            assert res.size_bytes < tuned["lora"].stat().st_size
            got, _ = engine_run(base, tokens, lora=[(LoraAdapter(base, res.path), 1.0)])
            assert np.abs(got - exact).max() < 0.02 * effect, t
    finally:
        base.close()


def test_python_api_load_with_lora(hf, tuned):
    kw = dict(temperature=0, max_tokens=N_GREEDY, ignore_eos=True)
    with llmdesk.load(str(tuned["merged"]), ctx=256, threads=1) as m:
        merged = m.generate(PROMPT, **kw)
    with llmdesk.load(str(hf["gguf"]), ctx=256, threads=1) as m:
        plain = m.generate(PROMPT, **kw)
    with llmdesk.load(str(hf["gguf"]), ctx=256, threads=1, lora=[(str(tuned["lora"]), 1.0)]) as m:
        assert m.generate(PROMPT, **kw) == merged != plain
        assert m.lora == [(tuned["lora"], 1.0)]
        adapters = list(m.adapters)
    assert all(a.ptr is None for a in adapters)  # freed on close
    with llmdesk.Model(hf["gguf"], ctx=256, threads=1, lora=[f"{tuned['lora']}:0"]) as m:
        assert m.generate(PROMPT, **kw) == plain


def cli(*args, home, stdin=None):
    env = {**os.environ, "LLMDESK_HOME": str(home)}
    env.pop("LLMDESK_MODEL", None)
    return subprocess.run([llmdesk_exe(), *map(str, args)], capture_output=True, text=True, env=env, timeout=120,
                          input=stdin, stdin=subprocess.DEVNULL if stdin is None else None)


def test_run_with_lora_as_a_user_does(hf, tuned, tmp_path):
    """`llmdesk convert --lora ... --base ...`, then `llmdesk run -m BASE --lora A.gguf[:SCALE]`:
    the base with the adapter answers as the merged model; at scale 0 as the base."""
    made = cli("convert", "--lora", tuned["adapter"], "--base", hf["gguf"], "-o", tmp_path / "a.gguf", "--json",
               home=tmp_path)
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["targets"] == sorted(TARGETS)
    assert (tmp_path / "a.gguf").read_bytes() == tuned["lora"].read_bytes()  # the same file from the base's GGUF

    def run(model, *lora):
        args = [a for x in lora for a in ("--lora", x)]
        p = cli("run", "-m", model, *args, "-t", "0", "-n", "12", "--threads", "1", "--ctx", "256", "--raw",
                "--no-log", PROMPT, home=tmp_path)
        assert p.returncode == 0, p.stderr
        return p.stdout

    with_lora = run(hf["gguf"], tmp_path / "a.gguf")
    assert with_lora == run(tuned["merged"])
    assert run(hf["gguf"], f"{tmp_path / 'a.gguf'}:0") == run(hf["gguf"]) != with_lora

    def chat(model, *args):
        p = cli("chat", "-m", model, *args, "-t", "0", "-n", "8", "--threads", "1", "--ctx", "256", "--no-log",
                stdin="Hello there\n/bye\n", home=tmp_path)
        assert p.returncode == 0, p.stderr
        return p

    lora_chat = chat(hf["gguf"], "--lora", f"{tmp_path / 'a.gguf'}:1")
    assert "LoRA a.gguf x1" in lora_chat.stderr
    assert lora_chat.stdout == chat(tuned["merged"]).stdout != chat(hf["gguf"]).stdout


# ---------------------------------------------------------------------------------------------
# bad input: one line each, nothing written


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert isinstance(exc_info.value, LlmdeskError) and "\n" not in msg and msg
    return msg


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """A LoRA trained on another (wider) Llama: its config and its adapter folder."""
    d = tmp_path_factory.mktemp("other")
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg)
    peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)).save_pretrained(d / "adapter")
    return {"config": cfg.to_dict(), "adapter": d / "adapter", "dir": d}


def test_an_adapter_for_another_base_is_refused(hf, other_base, tmp_path):
    out = tmp_path / "x.gguf"
    for base in (hf["ckpt"], hf["gguf"]):
        with pytest.raises(LlmdeskError) as e:
            write_lora_gguf(other_base["adapter"], base, out)
        assert "trained for another base model" in one_line(e) and "48" in str(e.value)
        assert not out.exists()
    # the same widths but a layer more: the extra layer's modules are not in the base
    deeper = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2))
    peft.get_peft_model(deeper, peft.LoraConfig(r=2, target_modules=["v_proj"])).save_pretrained(tmp_path / "deep")
    with pytest.raises(LlmdeskError) as e:
        write_lora_gguf(tmp_path / "deep", hf["gguf"], out)
    assert "in layer 2" in one_line(e) and "has 2 layers" in str(e.value) and not out.exists()
    # written for its own base, then applied to ours: llama.cpp refuses it, in one line
    wrong = write_lora_gguf(other_base["adapter"], other_base["config"], other_base["dir"] / "wrong.gguf")
    with pytest.raises(LlmdeskError) as e:
        llmdesk.Model(hf["gguf"], ctx=64, lora=[wrong])
    assert "refused it as a LoRA adapter" in one_line(e) and "wrong base model" in str(e.value)
    p = cli("run", "-m", hf["gguf"], "--lora", wrong, "-n", "4", "--no-log", "hi", home=tmp_path)
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: ") and "refused" in lines[0]


def test_bad_adapters_are_one_line(hf, tuned, tmp_path, capsys):
    out = tmp_path / "x.gguf"

    def refused(adapter, *needles, base=hf["ckpt"]):
        with pytest.raises(LlmdeskError) as e:
            convert_lora(adapter, base, out)
        msg = one_line(e)
        for n in needles:
            assert n in msg, msg
        assert not out.exists()

    # a target module llama.cpp adapters from llmdesk do not take
    pm = peft_model(hf["ckpt"], target_modules=["q_proj", "lm_head"])
    pm.save_pretrained(tmp_path / "head")
    refused(tmp_path / "head", "'lm_head'", "supported: q_proj")
    # another PEFT method
    ia3 = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(hf["ckpt"]),
                              peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    ia3.save_pretrained(tmp_path / "ia3")
    refused(tmp_path / "ia3", "peft_type is 'IA3', not LORA")
    # missing pieces
    refused(tmp_path / "nowhere", "no such folder")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "no adapter_config.json")
    refused(hf["ckpt"], "not a PEFT adapter", "model checkpoint")
    (tmp_path / "config-only").mkdir()
    shutil.copy(tuned["adapter"] / "adapter_config.json", tmp_path / "config-only")
    refused(tmp_path / "config-only", "no adapter weights")
    refused(tuned["adapter"], "no such base model", base=tmp_path / "no-base")
    # the CLI says the same in one line, and what it needs
    capsys.readouterr()
    for args, needle in [(["--lora", tuned["adapter"]], "--lora needs --base"),
                         (["--lora", tmp_path / "ia3", "--base", hf["ckpt"]], "not LORA")]:
        code = main(["convert", *map(str, args), "-o", str(out)])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code != 0 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
        assert not out.exists()
    with pytest.raises(LlmdeskError) as e:
        llmdesk.Model(hf["gguf"], ctx=64, lora=[f"{tuned['lora']}:half"])
    assert "must be a number" in one_line(e)
    with pytest.raises(LlmdeskError) as e:
        llmdesk.Model(hf["gguf"], ctx=64, lora=[hf["gguf"]])  # a model is not an adapter
    assert "not a LoRA adapter" in one_line(e)
