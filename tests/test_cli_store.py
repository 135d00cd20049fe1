"""`llmdesk pull/import/list/show/rm/logs` as a user runs them: the real console script, as a
subprocess, with LLMDESK_HOME pointing at the test's own directory."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from conftest import llmdesk_exe

from llmdesk.formats.synth import CHATML_TEMPLATE
from llmdesk.store import logs

COMMAND = [llmdesk_exe()]


def cli(*args, timeout=120) -> subprocess.CompletedProcess:
    # os.environ carries LLMDESK_HOME (the autouse fixture) and, with fake_hub, HF_ENDPOINT
    return subprocess.run([*COMMAND, *map(str, args)], capture_output=True, text=True, env=dict(os.environ),
                          timeout=timeout, stdin=subprocess.DEVNULL)


def ok(p) -> subprocess.CompletedProcess:
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    return p


def one_error_line(p) -> str:
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0, p.stdout
    assert "Traceback" not in p.stderr
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_empty_store():
    p = ok(cli("list"))
    assert p.stdout == "" and "llmdesk pull" in p.stderr and "llmdesk import" in p.stderr
    assert json.loads(ok(cli("list", "--json")).stdout) == []


def test_import_list_show_rm(tiny_gguf, user_dir):
    p = ok(cli("import", tiny_gguf, "--name", "tiny:f32"))
    assert p.stdout.startswith("tiny:f32 ")
    ok(cli("import", tiny_gguf))  # name from the file: tiny:latest

    table = ok(cli("list")).stdout.splitlines()
    assert table[0].split() == ["NAME", "TAG", "SIZE", "ARCH", "PARAMS", "TYPE", "CTX", "ADDED"]
    row = table[1].split()
    assert row[:2] == ["tiny", "f32"] and "llama" in row and "F32" in row and "2048" in row and "133K" in row
    assert len(table) == 3

    entries = json.loads(ok(cli("list", "--json")).stdout)
    assert [e["ref"] for e in entries] == ["tiny:f32", "tiny:latest"]
    e = entries[0]
    assert e["architecture"] == "llama" and e["file_type"] == "F32" and e["context_length"] == 2048
    assert e["size"] == tiny_gguf.stat().st_size and len(e["sha256"]) == 64 and e["source"] == str(tiny_gguf)
    assert Path(e["path"]).is_file() and Path(e["path"]).is_relative_to(user_dir)

    shown = json.loads(ok(cli("show", "tiny:f32", "--json")).stdout)
    for key in ("architecture", "parameters", "file_type", "bits_per_weight", "tensor_types", "context_length",
                "layers", "heads", "kv_heads", "embedding_length", "vocab_size", "tokenizer_model",
                "special_tokens", "chat_template"):
        assert key in shown
    assert shown["model"] == "tiny:f32" and shown["store"]["sha256"] == e["sha256"]
    assert (shown["layers"], shown["heads"], shown["kv_heads"], shown["embedding_length"]) == (2, 4, 2, 64)
    assert shown["chat_template"] == CHATML_TEMPLATE

    text = ok(cli("show", "tiny")).stdout
    for needle in ("tiny:latest", "architecture", "llama", "F32, 32.00 bits per weight", "context length",
                   "KV heads 2", "vocabulary", "(gpt2)", "special tokens", "<|im_end|>", "chat template", "sha256"):
        assert needle in text, needle
    assert ok(cli("show", "tiny", "--template")).stdout == CHATML_TEMPLATE + "\n"

    assert ok(cli("rm", "tiny:f32")).stdout.strip() == "removed tiny:f32"  # blob still used by tiny:latest
    assert ok(cli("rm", "tiny")).stdout.startswith("removed tiny:latest, freed ")
    assert not any((user_dir / "models" / "blobs").iterdir())
    assert "'tiny:latest'" in one_error_line(cli("rm", "tiny")) and "llmdesk list" in one_error_line(cli("rm", "tiny"))


def test_show_a_path_without_importing(tiny_gguf, user_dir):
    shown = json.loads(ok(cli("show", tiny_gguf, "--json")).stdout)
    assert shown["model"] == "tiny.gguf" and shown["store"] is None and shown["architecture"] == "llama"
    assert json.loads(ok(cli("list", "--json")).stdout) == []


def test_user_errors_are_one_line(tiny_gguf, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(tiny_gguf.read_bytes()[:5000])
    cases = [
        (["show", "nope"], "not found in the store"),
        (["show", "./missing.gguf"], "no such file"),
        (["import", tmp_path / "missing.gguf"], "no such file"),
        (["import", bad], "truncated"),
        (["import", tiny_gguf, "--name", "Bad Name"], "lowercase letters"),
        (["rm", "Bad Name"], "lowercase letters"),
        (["pull", "hf:just-a-name"], "hf:OWNER/REPO/FILE.gguf"),
    ]
    for args, needle in cases:
        assert needle in one_error_line(cli(*args)), args
    assert json.loads(ok(cli("list", "--json")).stdout) == []


def test_logs_commands(user_dir):
    assert "no logged prompts" in ok(cli("logs")).stdout
    assert ok(cli("logs", "path")).stdout.strip() == str(user_dir / "llmdesk.db")

    logs.log_turn(model="tiny:latest", prompt="What is quantization?", response="Fewer bits.", tokens_out=3,
                  duration_s=0.5, options={"temperature": 0})
    logs.log_turn(model="tiny:latest", prompt='say "foo"bar', response="AND NEAR(x)")
    rows = json.loads(ok(cli("logs", "--json")).stdout)
    assert [r["prompt"] for r in rows] == ['say "foo"bar', "What is quantization?"]
    assert rows[1]["options"] == {"temperature": 0} and rows[1]["tokens_per_second"] == 6.0
    assert len(json.loads(ok(cli("logs", "-n", "1", "--json")).stdout)) == 1

    text = ok(cli("logs")).stdout
    assert "What is quantization?" in text and "Fewer bits." in text and "6.0 tokens/s" in text
    found = json.loads(ok(cli("logs", "-q", "quantization", "--json")).stdout)
    assert [r["prompt"] for r in found] == ["What is quantization?"]
    for hostile in ['foo"bar', "AND", "NEAR(", "*", '"']:
        ok(cli("logs", "-q", hostile))

    assert ok(cli("logs", "off")).stdout.strip() == "logging is off"
    assert ok(cli("logs", "status")).stdout.strip() == "logging is off"
    assert not logs.logging_enabled()
    assert ok(cli("logs", "on")).stdout.strip() == "logging is on"
    assert logs.logging_enabled()


def test_pull_from_fake_hub(fake_hub, tiny_gguf):
    fake_hub.add("acme/tiny-GGUF", "tiny-chat.Q8_0.gguf", tiny_gguf.read_bytes())
    p = ok(cli("pull", "hf:acme/tiny-GGUF/tiny-chat.Q8_0.gguf"))
    assert p.stdout.startswith("tiny-chat:q8_0 ")
    (entry,) = json.loads(ok(cli("list", "--json")).stdout)
    assert entry["ref"] == "tiny-chat:q8_0" and entry["source"] == "hf:acme/tiny-GGUF/tiny-chat.Q8_0.gguf"
    # show resolves the hf: reference to the store entry
    assert json.loads(ok(cli("show", "hf:acme/tiny-GGUF/tiny-chat.Q8_0.gguf", "--json")).stdout)["model"] == "tiny-chat:q8_0"

    assert "repository acme/nope not found" in one_error_line(cli("pull", "hf:acme/nope/x.gguf"))
    assert "not found in acme/tiny-GGUF" in one_error_line(cli("pull", "hf:acme/tiny-GGUF/x.gguf"))
