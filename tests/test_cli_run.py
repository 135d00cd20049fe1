"""`llmdesk run` and `llmdesk chat` as a user runs them: the real console script, as a subprocess."""

import json
import os
import subprocess

import pytest
from conftest import llmdesk_exe

LLMDESK = llmdesk_exe()


def cli(*args, stdin=None, home, timeout=120):
    env = {**os.environ, "LLMDESK_HOME": str(home)}
    env.pop("LLMDESK_MODEL", None)
    return subprocess.run([LLMDESK, *map(str, args)], input=stdin, capture_output=True, text=True,
                          env=env, timeout=timeout, stdin=None if stdin is not None else subprocess.DEVNULL)


def one_error_line(p):
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in p.stderr
    return lines[0]


def test_run_streams_and_is_deterministic(tiny_gguf, tmp_path):
    a = cli("run", "-m", tiny_gguf, "-t", "0", "-n", "12", "Hello there", home=tmp_path)
    b = cli("run", "-m", tiny_gguf, "-t", "0", "-n", "12", "Hello there", home=tmp_path)
    assert a.returncode == 0, a.stderr
    assert a.stdout.strip() and a.stdout == b.stdout
    s1 = cli("run", "-m", tiny_gguf, "-t", "1", "--seed", "5", "-n", "12", "Hello", home=tmp_path)
    s2 = cli("run", "-m", tiny_gguf, "-t", "1", "--seed", "5", "-n", "12", "Hello", home=tmp_path)
    assert s1.stdout == s2.stdout


def test_gpu_layers_reach_llama_cpp(tiny_gguf, tmp_path):
    """-ngl/--gpu-layers is passed to llama.cpp's model loader; a build without a GPU backend (this
    one) keeps every layer on the CPU and gives the same answer."""
    from llmdesk.runtime.llama import ALL_LAYERS, parse_gpu_layers
    from llmdesk.runtime.model import Model

    assert [parse_gpu_layers(v) for v in (None, "0", "12", "all", "-1")] == [0, 0, 12, ALL_LAYERS, ALL_LAYERS]
    with Model(tiny_gguf, ctx=64, gpu_layers=ALL_LAYERS) as m:
        assert m.llama.n_gpu_layers == ALL_LAYERS
    cpu = cli("run", "-m", tiny_gguf, "-t", "0", "-n", "8", "--no-log", "Hello", home=tmp_path)
    gpu = cli("run", "-m", tiny_gguf, "-t", "0", "-n", "8", "--no-log", "-ngl", "all", "Hello", home=tmp_path)
    assert gpu.returncode == 0 and gpu.stdout == cpu.stdout


def test_run_without_a_model_uses_the_bundled_demo(tmp_path):
    p = cli("run", "-t", "0", "-n", "12", "--json", "What does llmdesk pull do?", home=tmp_path)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["model"] == "llmdesk-demo.gguf" and d["completion_tokens"] > 0


def test_run_json_and_stdin(tiny_gguf, tmp_path):
    p = cli("run", "-m", tiny_gguf, "-t", "0", "-n", "9", "--json", "Hello there", home=tmp_path)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["completion_tokens"] == 9 and d["finish_reason"] == "length"
    assert d["prompt_tokens"] > 2 and d["tokens_per_second"] > 0 and d["text"]
    piped = cli("run", "-m", tiny_gguf, "-t", "0", "-n", "9", "--json", stdin="Hello there", home=tmp_path)
    assert json.loads(piped.stdout)["text"] == d["text"]


def test_run_logs_unless_no_log(tiny_gguf, tmp_path):
    cli("run", "-m", tiny_gguf, "-t", "0", "-n", "4", "first question", home=tmp_path)
    cli("run", "-m", tiny_gguf, "-t", "0", "-n", "4", "--no-log", "secret question", home=tmp_path)
    p = cli("logs", "--json", home=tmp_path)
    assert p.returncode == 0, p.stderr
    prompts = [row["prompt"] for row in json.loads(p.stdout)]
    assert prompts == ["first question"]


def test_chat_repl(tiny_gguf, tmp_path):
    saved = tmp_path / "conv.json"
    script = "\n".join([
        "/set temperature 0",
        "/set temperature hot",
        "/system You are terse.",
        "Hello",
        '"""',
        "a message",
        "on two lines",
        '"""',
        f"/save {saved}",
        "/bye",
    ]) + "\n"
    p = cli("chat", "-m", tiny_gguf, "-n", "8", stdin=script, home=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "tokens/s" in p.stderr
    assert "is not a valid float" in p.stderr
    conv = json.loads(saved.read_text())
    roles = [m["role"] for m in conv["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert conv["messages"][3]["content"] == "a message\non two lines"
    assert conv["settings"]["temperature"] == 0


@pytest.mark.parametrize("args, needle", [
    (["run", "--bogus", "x"], "--bogus"),
    (["run", "-m", "MISSING.gguf", "x"], "MISSING.gguf"),
    (["run", "-m", "nosuchmodel:tag", "x"], "nosuchmodel"),
    (["run", "-m", "{model}", "-t", "-1", "x"], "temperature"),
    (["run", "-m", "{model}", "--ctx", "8", "x"], "ctx"),
    (["run", "-m", "{model}", "--threads", "0", "x"], "threads"),
    (["run", "-m", "{model}", "-t", "abc", "x"], "--temperature"),
    (["run", "-m", "{model}", "--template", "nosuch", "x"], "nosuch"),
    (["run", "-m", "{model}", "-ngl", "lots", "x"], "--gpu-layers"),
    (["run", "-m", "{bad}", "x"], "bad.gguf"),
])
def test_bad_input_is_one_line(tiny_gguf, tmp_path, args, needle):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 24)
    args = [a.format(model=tiny_gguf, bad=bad) for a in args]
    assert needle in one_error_line(cli(*args, home=tmp_path))
