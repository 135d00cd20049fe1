"""`BASE+ADAPTER` wherever a model is named: `llmdesk run`, `chat`, `serve -m` and `llmdesk.load`
read it as `eval run` and `arena auto` do (runtime/adapters.py). The adapters are real:
test_lora's PEFT LoRA on its tiny Llama, written as a llama.cpp LoRA GGUF, and that base's f32
GGUF; `--lora FILE` is the reference each way of naming the adapter is checked against.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time

import httpx
import pytest

import llmdesk
from llmdesk.errors import LlmdeskError
from llmdesk.formats.lora_gguf import write_lora_gguf

from conftest import llmdesk_exe
from test_arena import one_line_error, run_cli
from test_engine_scoring import hf, one_thread  # noqa: F401  (fixtures)
from test_lora import PROMPT, cli, other_base, tuned  # noqa: F401  (fixtures)

N = 12  # tokens per answer


def run(*args: str) -> dict:
    """`llmdesk run ARGS --json` at temperature 0, in-process: the answer and the model's name."""
    rc, out, err = run_cli("run", *args, "-t", "0", "-n", str(N), "--threads", "1", "--ctx", "256", "--raw",
                           "--no-log", "--json", PROMPT)
    assert rc == 0, err
    return json.loads(out)


def tune_folder(tmp_path, lora):
    """A folder as `llmdesk tune -o out --lora-gguf` leaves it: the adapter as out/adapter.gguf."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(lora, out / "adapter.gguf")
    return out


def test_run_base_plus_adapter_answers_as_run_with_lora(hf, tuned, tmp_path):
    """`run -m BASE+ADAPTER` is `run -m BASE --lora ADAPTER.gguf` (not the base), named so; a
    `tune -o` folder and a scale work; a '+' in the base's file name stays part of it; --lora adds
    its adapters after the reference's."""
    gguf, lora = hf["gguf"], tuned["lora"]
    plain = run("-m", str(gguf))["text"]
    flagged = run("-m", str(gguf), "--lora", str(lora))["text"]
    named = run("-m", f"{gguf}+{lora}")
    assert named["text"] == flagged != plain
    assert named["model"] == f"{gguf.name}+{lora.parent.name}"  # tune -o DIR's adapter.gguf: named by DIR

    out = tune_folder(tmp_path, lora)
    odd = tmp_path / "tiny+base.gguf"
    shutil.copy(gguf, odd)
    half = run("-m", f"{odd}+{out}:0.5")
    assert half["text"] == run("-m", str(gguf), "--lora", f"{lora}:0.5")["text"]
    assert half["model"] == "tiny+base.gguf+out:0.5"
    assert run("-m", str(odd))["text"] == plain  # the whole name is a file: not split
    both = run("-m", f"{gguf}+{out}", "--lora", str(lora))["text"]
    assert both == run("-m", str(gguf), "--lora", str(lora), "--lora", str(lora))["text"] != flagged


def test_load_takes_a_tune_folder_a_peft_folder_and_a_store_adapter(hf, tuned, tmp_path):
    """`llmdesk.load("BASE+out/")`: the Model answers as the base with the adapter applied, for
    the folder `tune -o` wrote, a PEFT adapter folder (converted once) and an adapter imported
    into the store beside its base."""
    kw = dict(temperature=0, max_tokens=N, ignore_eos=True)
    with llmdesk.Model(hf["gguf"], ctx=256, threads=1, lora=[tuned["lora"]]) as m:
        want = m.generate(PROMPT, **kw)
    with llmdesk.Model(hf["gguf"], ctx=256, threads=1) as m:
        assert m.generate(PROMPT, **kw) != want
    out = tune_folder(tmp_path, tuned["lora"])
    for file, name in ((hf["gguf"], "tiny"), (tuned["lora"], "style")):
        rc, _, err = run_cli("import", str(file), "--name", name)
        assert rc == 0, err
    for ref, name in ((f"{hf['gguf']}+{out}", "tiny-f32.gguf+out"),
                      (f"{hf['gguf']}+{out / 'adapter.gguf'}", "tiny-f32.gguf+out"),  # named by its run's folder
                      (f"{hf['gguf']}+{tuned['adapter']}", "tiny-f32.gguf+adapter"),
                      ("tiny+style", "tiny:latest+style:latest")):
        with llmdesk.load(ref, ctx=256, threads=1) as m:
            assert (m.name, m.generate(PROMPT, **kw)) == (name, want)


def test_chat_takes_base_plus_adapter(hf, tuned, tmp_path):
    """`llmdesk chat -m BASE+ADAPTER`, as a user types it in a shell: the banner names the
    adapted model, and the answers are those of `chat --lora`."""

    def chat(*args):
        p = cli("chat", *args, "-t", "0", "-n", "8", "--threads", "1", "--ctx", "256", "--no-log",
                stdin="Hello there\n/bye\n", home=tmp_path)
        assert p.returncode == 0, p.stderr
        return p

    named = chat("-m", f"{hf['gguf']}+{tuned['lora']}")
    assert named.stderr.startswith(f"{hf['gguf'].name}+{tuned['lora'].parent.name} · context 256 tokens")
    assert named.stdout == chat("-m", hf["gguf"], "--lora", tuned["lora"]).stdout


def test_serve_m_base_plus_adapter(hf, tuned, tmp_path):
    """`llmdesk serve -m BASE+ADAPTER`: a request that names no model, or BASE+ADAPTER, gets the
    base with the adapter; the base alone answers as the base (one load, both)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "LLMDESK_HOME": str(tmp_path)}
    proc = subprocess.Popen([llmdesk_exe(), "serve", "-m", f"{hf['gguf']}+{tuned['lora']}", "--port", str(port),
                             "--threads", "1", "--ctx", "256", "--parallel", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.1)

        def complete(**model):
            r = httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": N, "temperature": 0,
                                                          "ignore_eos": True, **model}, timeout=120)
            assert r.status_code == 200, r.text
            return r.json()["model"], r.json()["choices"][0]["text"]

        with llmdesk.Model(hf["gguf"], ctx=256, threads=1, lora=[tuned["lora"]]) as m:
            want = m.generate(PROMPT, temperature=0, max_tokens=N, ignore_eos=True)
        with llmdesk.Model(hf["gguf"], ctx=256, threads=1) as m:
            base = m.generate(PROMPT, temperature=0, max_tokens=N, ignore_eos=True)
        adapted = f"{hf['gguf'].name}+{tuned['lora'].parent.name}"
        assert complete() == (adapted, want)
        assert complete(model=adapted) == (adapted, want)
        assert complete(model=hf["gguf"].name) == (hf["gguf"].name, base)
        # listed first, so the web chat and clients that take the first model get what -m named
        ids = [c["id"] for c in httpx.get(url + "/v1/models", timeout=10).json()["data"]]
        assert ids[0] == adapted and hf["gguf"].name in ids
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert f"serving {adapted}" in proc.stderr.read()


# ---------------------------------------------------------------------------------------------
# bad input: one line each, before any model loads


@pytest.fixture
def wrong(other_base, tmp_path):
    """A LoRA GGUF made for another (wider) Llama."""
    return write_lora_gguf(other_base["adapter"], other_base["config"], tmp_path / "wrong.gguf")


@pytest.mark.parametrize("ref, extra, says", [
    ("{gguf}+missing.gguf", (), "no LoRA adapter 'missing.gguf' (no such file, folder or store name)"),
    ("{gguf}+{wrong}", (), "wrong.gguf adapts blk.0.attn_k.weight as"),
    ("{gguf}+{lora}:x", (), "the scale after the last colon must be a number, not 'x'"),
    ("{gguf}+{lora}:inf", (), "the scale must be a finite number"),
    ("{gguf}+", (), "no adapter after '+'"),
    ("openai:http://127.0.0.1:9/v1#tiny+{lora}", (), "a model behind an HTTP API cannot take a local LoRA adapter"),
    ("openai:http://127.0.0.1:9/v1#tiny", ("--lora", "{lora}"), "is a remote model: LoRA adapters can only"),
])
def test_bad_references_are_one_line(hf, tuned, wrong, ref, extra, says):
    """`run`, `chat` and `serve` stop in one line (and `llmdesk.load` raises it) for an adapter that
    does not exist, one made for another base (naming both), a bad scale, and a remote model
    with an adapter."""
    fill = dict(gguf=hf["gguf"], lora=tuned["lora"], wrong=wrong)
    ref, extra = ref.format(**fill), [x.format(**fill) for x in extra]
    one_line_error(*run_cli("run", "-m", ref, *extra, "--no-log", "hi")[::2], says)
    one_line_error(*run_cli("chat", "-m", ref, *extra, "--no-log")[::2], says)
    if not extra:
        # (a port out of range: had the reference been taken, the start would stop there, not serve)
        one_line_error(*run_cli("serve", "-m", ref, "--port", "-1")[::2], says)
        with pytest.raises(LlmdeskError) as e:
            llmdesk.load(ref)
        assert says in str(e.value) and "\n" not in str(e.value)
    if "wrong" in ref:
        assert "tiny-f32.gguf: the adapter was made for another base model" in str(e.value)
