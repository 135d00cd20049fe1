"""`llmdesk docs ...` as a user runs it: the installed command, in a subprocess, on real files."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from conftest import llmdesk_exe
from test_rag_index import HTML, MARKDOWN, make_pdf


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([llmdesk_exe(), *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=os.environ.copy())


def test_docs_add_search_list_rm(tmp_path, tiny_gguf):
    d = tmp_path / "notes"
    d.mkdir()
    (d / "guide.md").write_text(MARKDOWN)
    (d / "support.html").write_text(HTML)
    make_pdf(d / "manual.pdf", [["Serial number PX-7781 is recalled."]])
    (d / "empty.txt").write_bytes(b"")

    r = run("docs", "add", "notes", "missing-folder", "-c", "work", "--embed-model", str(tiny_gguf), cwd=tmp_path)
    assert r.returncode == 1  # two inputs failed; the rest went in
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and "Traceback" not in r.stderr
    assert any("empty.txt: the file is empty (0 bytes)" in e for e in errors)
    assert any("missing-folder: no such file or folder" in e for e in errors)
    assert r.stdout.startswith("work: 3 added, 0 updated, 0 unchanged, 2 failed; ")

    r = run("docs", "add", "notes", "-c", "work", cwd=tmp_path)  # nothing changed
    assert "work: 0 added, 0 updated, 3 unchanged, 1 failed; 0 chunks embedded" in r.stdout

    r = run("docs", "search", "PX-7781", "-c", "work", "--mode", "bm25", "-k", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith("[1] notes/manual.pdf, page 1, line 1")
    assert "PX-7781 is recalled" in r.stdout

    r = run("docs", "search", "help desk ticket", "-c", "work", cwd=tmp_path)  # hybrid
    assert "[1] notes/support.html > Support" in r.stdout
    assert "FLAGGED, looks like instructions to a model: " in r.stdout and "hidden text" in r.stdout

    r = run("docs", "search", "key", "-c", "work", "-k", "2", "--json", cwd=tmp_path)
    hits = json.loads(r.stdout)
    assert len(hits) == 2 and {"path", "headings", "page", "line_start", "char_end", "score", "flags"} <= set(hits[0])

    r = run("docs", "list", cwd=tmp_path)
    assert r.stdout.split("\n")[1].split()[:3] == ["work", "3", str(_chunks(tmp_path))]

    r = run("docs", "search", "x", "-c", "nope", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip() == (
        "error: no collection named 'nope' (the collections are: work); create it with "
        "`llmdesk docs add PATH --collection nope`")

    r = run("docs", "rm", "work", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("removed collection 'work' (3 documents")
    assert "no collections yet" in run("docs", "list", cwd=tmp_path).stdout


def _chunks(tmp_path: Path) -> int:
    r = run("docs", "list", "--json", cwd=tmp_path)
    return json.loads(r.stdout)[0]["chunks"]


def test_docs_sync_and_model_change(tmp_path, tiny_gguf):
    from llmdesk.formats.synth import SynthConfig, write_llama_gguf

    d = tmp_path / "notes"
    d.mkdir()
    (d / "a.md").write_text("# A\n\nApples are red.\n")
    (d / "b.md").write_text("# B\n\nBananas are yellow.\n")
    assert run("docs", "add", "notes", "--embed-model", str(tiny_gguf), cwd=tmp_path).returncode == 0
    (d / "b.md").unlink()
    (d / "a.md").write_text("# A\n\nApples are green.\n")
    r = run("docs", "sync", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("default: 0 added, 1 updated, 0 unchanged, 1 removed; 1 chunk ")

    other = write_llama_gguf(tmp_path / "other.gguf", SynthConfig(seed=3))
    r = run("docs", "add", "notes", "--embed-model", str(other), cwd=tmp_path)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "built with the embedding model" in r.stderr and "--rebuild" in r.stderr
    r = run("docs", "add", "notes", "--embed-model", str(other), "--rebuild", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("default: 1 added")
