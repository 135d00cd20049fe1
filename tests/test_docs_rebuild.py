"""`docs add --rebuild` is all or nothing: the old collection is searched, whole, until the new
one replaces it in one transaction; an interrupted rebuild leaves it exactly as it was."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import llmdesk_exe, sigint_as_a_terminal_sends_it
from llmdesk.errors import LlmdeskError
from llmdesk.formats.synth import SynthConfig, write_llama_gguf
from llmdesk.rag import index, ingest
from llmdesk.rag.search import search

# one word no other file has, per file: BM25 finds each file by it
WORDS = {"boiler.md": "pressure", "garden.md": "tulips", "harbour.md": "ferries", "pantry.md": "lentils",
         "attic.md": "rafters"}


@pytest.fixture(scope="module")
def other_gguf(tmp_path_factory) -> Path:
    """Another embedding model: another seed and another width (32 dimensions, not 64)."""
    return write_llama_gguf(tmp_path_factory.mktemp("other") / "other.gguf",
                            SynthConfig(seed=7, n_embd=32, n_head=2, n_head_kv=1, n_ff=64))


@pytest.fixture
def notes(tmp_path) -> Path:
    d = tmp_path / "notes"
    d.mkdir()
    for name, word in WORDS.items():
        topic = name.removesuffix(".md")
        (d / name).write_text(f"# {topic.title()}\n\nThe {topic} page mentions {word} twice: {word} again.\n\n"
                              f"A second paragraph about the {topic}, so that there is more than one line.\n")
    return d


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot() -> dict:
    """Everything the index holds, table by table: a collection's rows, and every row there is."""
    with index.connect() as c:
        col = index.require(c, "kb")
        return {
            "collections": [tuple(r) for r in c.execute("SELECT * FROM collections ORDER BY id")],
            "sources": [tuple(r) for r in c.execute("SELECT * FROM sources ORDER BY path")],
            "documents": [tuple(r) for r in c.execute("SELECT * FROM documents ORDER BY id")],
            "chunks": [tuple(r) for r in c.execute("SELECT * FROM chunks ORDER BY id")],
            "fts": c.execute("SELECT count(*) FROM chunks_fts").fetchone()[0],
            "vec": c.execute(f"SELECT count(*) FROM vec_{col.id}").fetchone()[0],
            "vec_tables": [r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE name GLOB 'vec_*' "
                                                   "AND name NOT GLOB 'vec_*_*'")],
            "counts": (col.documents, col.chunks),
        }


def assert_whole(notes: Path, model: Path) -> None:
    """`kb` is the only collection, built with `model`, and every note is found in it."""
    [col] = ingest.list_collections()
    assert (col.name, col.model_sha256, col.documents) == ("kb", sha(model), len(WORDS))
    for name, word in WORDS.items():
        assert [Path(h.path).name for h in search(word, "kb", mode="bm25", k=1)] == [name]
    assert len(search("the page about the garden", "kb", mode="vector", k=3)) == 3


def test_rebuild_with_another_model_replaces_the_collection(notes, tiny_gguf, other_gguf):
    ingest.add([notes], "kb", embedder=str(tiny_gguf))
    with pytest.raises(LlmdeskError, match="built with the embedding model .*--rebuild"):
        ingest.add([notes], "kb", embedder=str(other_gguf))

    r = ingest.add([], "kb", embedder=str(other_gguf), rebuild=True)
    assert (r.added, r.updated, r.unchanged, r.errors) == (len(WORDS), 0, 0, [])
    [col] = ingest.list_collections()
    assert (col.name, col.model_sha256, col.dim, col.documents, col.chunks) == (
        "kb", sha(other_gguf), 32, len(WORDS), r.chunks)
    assert_whole(notes, other_gguf)

    # the vectors are the new model's: a chunk's own text, embedded by it, finds that chunk first
    with index.connect() as c:
        text, headings = c.execute("SELECT text, headings FROM chunks WHERE text LIKE '%tulips%'").fetchone()
    query = " > ".join(json.loads(headings)) + "\n" + text
    assert search(query, "kb", mode="vector", k=1)[0].text == text
    with pytest.raises(LlmdeskError, match="built with the embedding model"):
        search("tulips", "kb", embedder=str(tiny_gguf))

    # nothing of the old collection is left, and the new one kept its sources: sync finds a new file
    s = snapshot()
    assert len(s["collections"]) == 1 and len(s["documents"]) == len(WORDS)
    assert s["fts"] == s["vec"] == len(s["chunks"]) == col.chunks
    assert s["vec_tables"] == [f"vec_{s['collections'][0][0]}"]
    (notes / "cellar.md").write_text("# Cellar\n\nThe cellar keeps the wine cool.\n")
    r = ingest.sync("kb")
    assert (r.added, r.unchanged) == (1, len(WORDS))
    assert Path(search("wine", "kb", mode="bm25", k=1)[0].path).name == "cellar.md"


def test_rebuild_interrupted_midway_leaves_the_old_collection_as_it_was(notes, tiny_gguf, other_gguf,
                                                                        monkeypatch):
    ingest.add([notes], "kb", embedder=str(tiny_gguf))
    before = snapshot()
    seen: dict = {}
    real_embed = ingest.Embedder.embed

    def embed_then_interrupt(self, texts):
        """The real model's vectors, and Ctrl-C while the third file is being embedded; what the
        user sees at that moment is recorded."""
        vectors = real_embed(self, texts)
        seen["calls"] = seen.get("calls", 0) + 1
        if seen["calls"] == 3:
            seen["built"] = built_aside()[1]  # the files the rebuild has written so far
            seen["listed"] = [(c.name, c.documents, c.chunks) for c in ingest.list_collections()]
            seen["found"] = [Path(h.path).name for w in WORDS.values() for h in search(w, "kb", mode="bm25", k=1)]
            raise KeyboardInterrupt
        return vectors

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(ingest, "EMBED_BATCH", 1)  # each file embedded and written before the next
        m.setattr(ingest.Embedder, "embed", embed_then_interrupt)
        ingest.add([], "kb", embedder=str(other_gguf), rebuild=True)

    # midway: two files were in the new collection, and the user saw the old one, whole
    assert seen["built"] == 2
    assert seen["listed"] == [("kb", *before["counts"])]
    assert seen["found"] == list(WORDS)
    # after: the index is exactly as it was, row for row
    assert snapshot() == before
    assert_whole(notes, tiny_gguf)

    r = ingest.add([], "kb", embedder=str(other_gguf), rebuild=True)  # again: it completes
    assert (r.added, r.errors) == (len(WORDS), [])
    assert_whole(notes, other_gguf)


def test_rebuild_refused_when_the_collection_changed_meanwhile(notes, tiny_gguf, other_gguf, monkeypatch):
    ingest.add([notes / "boiler.md"], "kb", embedder=str(tiny_gguf))
    real_embed = ingest.Embedder.embed
    done = []

    def embed_while_another_add_runs(self, texts):
        if self.sha256 == sha(other_gguf) and not done:  # the rebuild embeds: another add goes in meanwhile
            done.append(ingest.add([notes / "garden.md"], "kb"))  # with the collection's own model
        return real_embed(self, texts)

    monkeypatch.setattr(ingest.Embedder, "embed", embed_while_another_add_runs)
    with pytest.raises(LlmdeskError, match="collection 'kb' changed while it was being rebuilt .* run the "
                                           "rebuild again"):
        ingest.add([], "kb", embedder=str(other_gguf), rebuild=True)
    [col] = ingest.list_collections()  # the other add's file is kept, and the model is the old one
    assert (col.documents, col.model_sha256) == (2, sha(tiny_gguf))
    with index.connect() as c:
        assert c.execute("SELECT count(*) FROM collections").fetchone()[0] == 1


# ---------------------------------------------------------------------------------------------
# as a user runs it: the installed command, interrupted with Ctrl-C and killed


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([llmdesk_exe(), *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=os.environ.copy())


def built_aside() -> tuple[int, int]:
    """(collections, documents) a rebuild has made aside so far: rows `docs list` does not show."""
    with index.connect() as c:
        return tuple(c.execute("SELECT count(DISTINCT c.id), count(d.id) FROM collections c LEFT JOIN documents d "
                               "ON d.collection_id = c.id WHERE c.name LIKE '.%'").fetchone())


def interrupt_midway(sig: int, cwd: Path, other: Path) -> subprocess.CompletedProcess:
    """`docs add many --rebuild`, sent `sig` once the rebuild has written some files aside.
    Meanwhile another llmdesk lists the collections: it shows the old one, and leaves the running
    rebuild's work alone."""
    proc = subprocess.Popen([llmdesk_exe(), "docs", "add", "many", "-c", "kb", "--rebuild", "--embed-model",
                             str(other)], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ.copy(), preexec_fn=sigint_as_a_terminal_sends_it)
    while proc.poll() is None and built_aside()[1] == 0:
        time.sleep(0.01)
    listed = [(c.name, c.documents) for c in ingest.list_collections()]
    aside = built_aside()
    assert proc.poll() is None, f"the rebuild ended before it could be interrupted: {proc.communicate()}"
    assert listed == [("kb", len(WORDS))] and aside[0] == 1 and aside[1] > 0
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow  # three rebuilds of 600 files by the installed command
def test_rebuild_command_interrupted_or_killed_changes_nothing(notes, tmp_path, tiny_gguf, other_gguf):
    assert run("docs", "add", "notes", "-c", "kb", "--embed-model", str(tiny_gguf), cwd=tmp_path).returncode == 0
    many = tmp_path / "many"  # enough files that the rebuild writes some while it embeds the rest
    many.mkdir()
    for i in range(600):
        (many / f"n{i:03d}.md").write_text(f"# Note {i}\n\nNote number {i} is about item {i}.\n")
    before = snapshot()

    r = interrupt_midway(signal.SIGINT, tmp_path, other_gguf)  # Ctrl-C: what it built goes at once
    assert (r.returncode, r.stderr.strip().splitlines()[-1]) == (130, "interrupted"), r.stderr
    assert "Traceback" not in r.stderr
    assert built_aside() == (0, 0), r.stderr
    assert snapshot() == before

    r = interrupt_midway(signal.SIGKILL, tmp_path, other_gguf)  # killed: nothing can clean up ...
    assert r.returncode == -signal.SIGKILL
    assert built_aside()[1] > 0
    r = run("docs", "list", cwd=tmp_path)  # ... until the next llmdesk looks: never shown, and dropped
    assert r.returncode == 0 and [line.split()[:3] for line in r.stdout.splitlines()[1:]] == [
        ["kb", str(len(WORDS)), str(before["counts"][1])]]
    assert built_aside() == (0, 0)
    assert snapshot() == before
    assert_whole(notes, tiny_gguf)

    r = run("docs", "add", "many", "-c", "kb", "--rebuild", "--embed-model", str(other_gguf), cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith(f"kb: {len(WORDS) + 600} added, 0 updated"), r.stderr
    r = run("docs", "search", "ferries", "-c", "kb", "--mode", "bm25", "-k", "1", cwd=tmp_path)
    assert r.stdout.startswith("[1] notes/harbour.md")
