"""`llmdesk tune` on a tiny real Llama the suite builds (an HF folder with a ChatML tokenizer): LoRA
learns a fixed answer format and the merged GGUF answers in it through `llmdesk run` and stops by
itself where the base does not; exact --resume; Ctrl-C (raised from a callback, and a SIGINT to the
command) leaves a resumable checkpoint and no half outputs; the other kinds of base (a GGUF from the
store, a `llmdesk train` folder), --method full, --inspect; bad input in one line each."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import llmdesk_exe, sigint_as_a_terminal_sends_it

import torch  # noqa: E402  (the train extra: missing, this fails)
import transformers  # noqa: E402

from llmdesk.cli.main import main  # noqa: E402
from llmdesk.errors import LlmdeskError  # noqa: E402
from llmdesk.formats.convert import convert  # noqa: E402
from llmdesk.runtime.llama import LlamaModel  # noqa: E402
from llmdesk.runtime.templates import BUILTIN_TEMPLATES  # noqa: E402
from llmdesk.store import catalog, results  # noqa: E402
from llmdesk.train.tokenizer import tiny_chat_llama  # noqa: E402
from llmdesk.train.tune import TuneConfig, tune  # noqa: E402

LLMDESK = llmdesk_exe()
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "ocean"]
ASK = "Reply with the word in capitals between brackets: "
# the task: the word, in capitals, between brackets, and nothing after it
TEXT = [f"{ASK}{w}. [{w.upper()}] " for w in WORDS] * 20 + ["The quick brown fox jumps over the lazy dog."] * 10


def chat(word: str) -> dict:
    return {"messages": [{"role": "user", "content": ASK + word},
                         {"role": "assistant", "content": f"[{word.upper()}]"}]}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A random-weight 2-layer Llama (64 wide) with a BPE tokenizer and the ChatML template. The
    weights are drawn wide (std 0.1) so that its fixed output head can express confident answers
    once LoRA moves the hidden states."""
    return tiny_chat_llama(tmp_path_factory.mktemp("tune") / "base", TEXT)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    rng = random.Random(0)
    return write_jsonl(tmp_path_factory.mktemp("data") / "words.jsonl", [chat(rng.choice(WORDS)) for _ in range(200)])


def run_model(model: str, word: str, home: Path) -> dict:
    r = subprocess.run([LLMDESK, "run", "-m", model, "-t", "0", "-n", "24", "--no-log", "--json", "--threads", "1",
                        ASK + word], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "LLMDESK_HOME": str(home)})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_lora_learns_the_format_and_the_gguf_stops_by_itself(base, data, tmp_path, user_dir, capsys):
    out = tmp_path / "words-lora"
    code = main(["tune", str(base), str(data), "-o", str(out), "--steps", "120", "--lr", "1e-2", "--rank", "8",
                 "--batch", "8", "--dropout", "0", "--eval-every", "20", "--merge", "--gguf", "f16"])
    o, e = capsys.readouterr()
    assert code == 0, e
    assert "validation loss" in o and "run it: llmdesk run -m words-lora:f16" in o
    assert "Loading weights" not in o + e and "Writing model shards" not in o + e  # no third-party bars
    m = json.loads((out / "metrics.json").read_text())
    res = m["result"]
    assert res["val_loss"] < res["first_val_loss"] / 5, res  # ~6.1 -> ~0.6 nats per trained token
    assert [h["step"] for h in m["history"] if "val_loss" in h] == [0, 20, 40, 60, 80, 100, 120]
    assert m["recipe"]["method"] == "lora" and m["recipe"]["rank"] == 8
    assert 50e6 < res["peak_rss_bytes"] < 64e9  # this process's peak: torch alone is more than 50 MB
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the adapter is a PEFT adapter: it loads on the base, and equals the merged model
    import peft

    ids = torch.tensor([[5, 17, 40, 99, 3]])
    with torch.no_grad():
        tuned = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                               str(out / "adapter"))(ids).logits
        merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged")(ids).logits
    assert torch.allclose(tuned, merged, atol=1e-4)
    assert "chat_template" in json.loads((out / "merged" / "tokenizer_config.json").read_text())
    # in the store, and recorded
    entry = catalog.get("words-lora", "f16")
    assert entry is not None and entry.sha256 == catalog.sha256_file(out / "model-f16.gguf", progress=False)
    # the GGUF carries the base's chat template and BOS/EOS settings
    from llmdesk.formats.gguf import read_gguf

    meta = read_gguf(entry.path).metadata
    tok_cfg = json.loads((base / "tokenizer_config.json").read_text())
    eos = json.loads((base / "generation_config.json").read_text())["eos_token_id"]
    assert meta["tokenizer.chat_template"] == tok_cfg["chat_template"]
    assert meta["tokenizer.ggml.eos_token_id"] == eos and meta["tokenizer.ggml.add_bos_token"] is False
    [rec] = results.query("tune")
    assert rec["model"] == "words-lora:f16" and rec["settings"]["rank"] == 8 and rec["model_sha256"] == entry.sha256
    # through llama.cpp, with the model's own chat template: the format, then a stop (EOS trained)
    base_gguf = convert(base, tmp_path / "base-f16.gguf", out_type="f16", check_with=LlamaModel).path
    for word in ("tiger", "piano", "cloud"):
        after = run_model("words-lora:f16", word, user_dir)
        assert (after["text"], after["finish_reason"]) == (f"[{word.upper()}]", "stop"), after
        before = run_model(str(base_gguf), word, user_dir)
        assert not re.fullmatch(r"\[[A-Z]+\]", before["text"]), before  # the random base: noise


def test_the_peft_adapter_and_its_merged_gguf_in_llama_cpp_agree(base, data, tmp_path, user_dir):
    """The tuned model as peft runs it (base + adapter) and as llama.cpp runs the merged f32 GGUF:
    logits within the converter's parity tolerance (1e-3), the same top token everywhere."""
    import numpy as np
    import peft
    from test_convert import llama_logits

    res = tune(base, [data], tmp_path / "p", cfg(steps=6, lr=1e-2), gguf="f32", lora_gguf=True, name="parity",
               check_with=LlamaModel)
    ids = transformers.AutoTokenizer.from_pretrained(base).apply_chat_template(
        [{"role": "user", "content": ASK + "stone"}], add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                               str(res.adapter)).eval()
        ref = model(torch.tensor([ids])).logits[0].numpy()
        before = transformers.AutoModelForCausalLM.from_pretrained(base)(torch.tensor([ids])).logits[0].numpy()
    assert float(np.abs(ref - before).max()) > 0.1  # the adapter changed the model: the check is not vacuous
    got = llama_logits(res.gguf, list(ids))
    assert float(np.abs(ref - got).max()) < 1e-3
    assert (ref.argmax(-1) == got.argmax(-1)).all()
    # the third way: the base's GGUF with the adapter's LoRA GGUF applied by llama.cpp at run time
    from llmdesk.formats.convert import convert
    from llmdesk.runtime.llama import LoraAdapter
    from test_lora import engine_run

    base_gguf = convert(base, tmp_path / "base-f32.gguf", out_type="f32", check_with=LlamaModel).path
    llama = LlamaModel(base_gguf)
    try:
        lora_logits, _ = engine_run(llama, list(ids), lora=[(LoraAdapter(llama, res.lora_gguf), 1.0)])
    finally:
        llama.close()
    assert float(np.abs(ref[:-1] - lora_logits).max()) < 1e-3


def cfg(**kw) -> TuneConfig:
    return TuneConfig(**{"steps": 8, "rank": 4, "batch": 4, "grad_accum": 2, "lr": 5e-3, "dropout": 0.1,
                         "eval_every": 3, **kw})


def test_resume_is_exact_and_ctrl_c_leaves_a_checkpoint_and_no_outputs(base, data, tmp_path):
    full = tune(base, [data], tmp_path / "full", cfg())
    assert len(full.history) == 9 and full.history[0]["step"] == 0  # step 0: validation before training

    def stop_at_5(kind, d):
        if kind == "step" and d["step"] == 5:
            raise KeyboardInterrupt  # what Ctrl-C raises: after step 5, between checkpoints (3 and 6)

    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        tune(base, [data], cut, cfg(), on_event=stop_at_5)
    assert torch.load(cut / "checkpoint.pt", weights_only=False)["step"] == 5
    assert sorted(p.name for p in cut.iterdir()) == ["checkpoint.pt"]  # no adapter, no metrics, no .part
    with pytest.raises(LlmdeskError, match="pass --resume"):
        tune(base, [data], cut, cfg())
    with pytest.raises(LlmdeskError, match="was trained with rank 4, not 8"):
        tune(base, [data], cut, cfg(rank=8), resume=True)
    resumed = tune(base, [data], cut, cfg(), resume=True)
    assert [h.get("val_loss") for h in resumed.history] == [h.get("val_loss") for h in full.history]
    assert [h["loss"] for h in resumed.history[1:]] == [h["loss"] for h in full.history[1:]]
    assert (cut / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_sigint_to_the_command_saves_a_checkpoint_it_resumes_from(base, data, tmp_path, user_dir):
    out = tmp_path / "sig"
    argv = [LLMDESK, "tune", str(base), str(data), "-o", str(out), "--steps", "600", "--rank", "4",
            "--eval-every", "200"]
    env = {**os.environ, "LLMDESK_HOME": str(user_dir), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         preexec_fn=sigint_as_a_terminal_sends_it)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:  # written at step 0
        time.sleep(0.1)
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    o, e = p.communicate(timeout=120)
    assert p.returncode == 130, e
    step = torch.load(out / "checkpoint.pt", weights_only=False)["step"]
    assert f"interrupted: checkpoint {out / 'checkpoint.pt'} at step {step}; continue with --resume" in e, e
    assert 0 < step < 600
    assert sorted(x.name for x in out.iterdir()) == ["checkpoint.pt"]
    r = subprocess.run(argv + ["--resume", "--json"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["steps"] == 600 and (out / "adapter").is_dir()


def test_other_bases_a_store_gguf_and_a_train_folder_and_full_weights(base, data, tmp_path, user_dir, capsys):
    gguf = convert(base, tmp_path / "tiny-f32.gguf", out_type="f32", check_with=LlamaModel).path
    catalog.add_file(gguf, "tiny", "f32", progress=False)
    capsys.readouterr()
    a = tune("tiny:f32", [data], tmp_path / "a", cfg(steps=3), gguf="f16", name="from-gguf", check_with=LlamaModel)
    assert "GGUF tensors" not in capsys.readouterr().err  # transformers' own bar stays out of llmdesk's output
    assert a.registered == "from-gguf:f16" and catalog.get("from-gguf", "f16") is not None
    b = tune(base, [data], tmp_path / "b", cfg(steps=3))
    # transformers dequantizes the GGUF into the same model: the same run, to float noise
    assert a.history[0]["val_loss"] == pytest.approx(b.history[0]["val_loss"], abs=1e-4)
    assert [h["loss"] for h in a.history[1:]] == pytest.approx([h["loss"] for h in b.history[1:]], abs=1e-3)
    from llmdesk.train import train as pretrain
    from llmdesk.train.config import make_config

    pre = tmp_path / "pre"
    pretrain([data], pre, make_config("tiny", steps=2), export_type=None)
    val = write_jsonl(tmp_path / "val.jsonl", [chat(w) for w in WORDS])
    c = tune(pre, [data], tmp_path / "c", cfg(steps=2, method="full", lr=1e-3), val=val)
    assert (c.train_examples, c.val_examples) == (200, 8)  # --val: every row trains, the file validates
    # a base without a chat template, given one: the data is rendered with it, and the merged model carries it
    bare = tmp_path / "bare"
    shutil.copytree(base, bare)
    tc = json.loads((bare / "tokenizer_config.json").read_text())
    del tc["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(tc))
    with pytest.raises(LlmdeskError, match="no chat template"):
        tune(bare, [data], tmp_path / "t0", cfg(steps=1))
    t = tune(bare, [data], tmp_path / "t", cfg(steps=1), chat_template="chatml", merge=True)
    assert json.loads((t.merged / "tokenizer_config.json").read_text())["chat_template"] == BUILTIN_TEMPLATES["chatml"]
    # --epochs: 180 training rows in micro-batches of 8 are 23 a pass; 2 per step; a quarter pass is 3 steps
    e = tune(base, [data], tmp_path / "e", TuneConfig(epochs=0.25, batch=8, grad_accum=2, rank=2))
    assert e.steps == 3 and len(e.history) == 4
    assert c.adapter is None and (tmp_path / "c" / "merged" / "model.safetensors").is_file()
    assert c.trainable_params == c.total_params


def test_inspect_shows_the_trained_tokens(base, data, tmp_path, capsys):
    page = tmp_path / "rows.html"
    assert main(["tune", str(data), "--base", str(base), "--inspect", "--html", str(page)]) == 0
    o = capsys.readouterr().out
    assert "200 rows" in o and "token lengths" in o and ASK in o
    # trained: each answer and its end-of-turn token, nothing else
    rows = "".join(re.findall(r"<pre>(.*?)</pre>", page.read_text(), flags=re.S))
    trained = re.findall(r"<span class='t'>(.*?)</span>", rows, flags=re.S)
    assert trained and all(re.fullmatch(r"\[[A-Z]+\]&lt;\|im_end\|&gt;", t) for t in trained), trained


def one_line_error(capsys, argv: list[str], *needles: str) -> None:
    """A non-zero exit and one error line, the last (progress lines may come before it)."""
    code = main(argv)
    e = capsys.readouterr().err.strip()
    lines = e.splitlines()
    assert code != 0 and lines[-1].startswith("error: ") and sum(x.startswith("error") for x in lines) == 1, e
    assert "Traceback" not in e
    e = lines[-1]
    for n in needles:
        assert n in e, e


def test_bad_input_is_one_line(base, data, tmp_path, capsys):
    out = str(tmp_path / "o")
    one_line_error(capsys, ["tune", str(tmp_path / "missing"), str(data), "-o", out], "no such file")
    one_line_error(capsys, ["tune", "nosuchmodel:q4", str(data), "-o", out], "not found in the store")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    one_line_error(capsys, ["tune", str(gpt2), str(data), "-o", out], "GPT2LMHeadModel", "supported")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(chat("apple")) + "\n{not json\n")
    one_line_error(capsys, ["tune", str(base), str(bad), "-o", out], "bad.jsonl:2")
    one_line_error(capsys, ["tune", str(base), str(data), "-o", out, "--method", "qlora"],
                   "bitsandbytes", "--method lora")
    one_line_error(capsys, ["tune", str(base), str(data), "-o", out, "--epochs", "1", "--steps", "3"], "not both")
    one_line_error(capsys, ["tune", str(base), str(data), "-o", out, "--resume"], "nothing to resume")
    one_line_error(capsys, ["tune", str(base), str(data), "-o", out, "--targets", "nope_proj", "--steps", "1"],
                   "--targets nope_proj", "q_proj")
    one_line_error(capsys, ["tune", str(base), str(data), "-o", out, "--gguf", "q9_x"], "q9_x")
    one_line_error(capsys, ["tune", str(base), str(data), "-o", out, "--method", "full", "--lora-gguf"],
                   "--lora-gguf", "--method full")
    one_line_error(capsys, ["tune", str(base), str(data), "-o", out, "--chat-template", "nochat"], "nochat")
    assert not Path(out).exists() or not any(Path(out).iterdir())
