"""The store: user paths, database and migrations, catalog, references, pull, logs."""

from __future__ import annotations

import hashlib
import os
import socket
import sqlite3
import threading

import pytest

from llmdesk.errors import BadModelFile, LlmdeskError, ModelNotFound
from llmdesk.formats.synth import SynthConfig, write_llama_gguf
from llmdesk.store import catalog, db, logs, paths, pull, refs

from conftest import point_hf_at


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def store_files(home) -> list[str]:
    """Every file under models/ (blobs and any temporary file), relative to the user dir."""
    root = home / "models"
    return sorted(str(p.relative_to(home)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def rows(table: str) -> list[sqlite3.Row]:
    with db.using() as c:
        return c.execute(f"SELECT * FROM {table}").fetchall()


@pytest.fixture(scope="module")
def other_gguf(tmp_path_factory):
    """A second model with different bytes."""
    return write_llama_gguf(tmp_path_factory.mktemp("other") / "other.gguf", SynthConfig(seed=1, name="other"))


# ---------------------------------------------------------------------------------------------
# paths and database


def test_home_is_env_and_created(user_dir):
    assert not user_dir.exists()
    assert paths.home() == user_dir and user_dir.is_dir()
    assert paths.db_path() == user_dir / "llmdesk.db"
    assert paths.models_dir() == user_dir / "models" and paths.models_dir().is_dir()


def test_home_defaults_to_platform_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("LLMDESK_HOME")
    monkeypatch.setattr(paths.platformdirs, "user_data_dir", lambda app, appauthor=None: str(tmp_path / "pd" / app))
    assert paths.home() == tmp_path / "pd" / "llmdesk"


def test_connect_sets_wal_and_foreign_keys():
    conn = db.connect()
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"migrations", "models", "logs", "logs_fts", "settings"} <= tables
    finally:
        conn.close()


def test_migrations_are_numbered_and_run_once(monkeypatch):
    names = [fn.__name__ for fn in db.MIGRATIONS]
    assert len(set(names)) == len(names)
    assert names == sorted(names) and all(n[:1] == "m" and n[1:4].isdigit() for n in names)

    db.connect().close()
    conn = db.connect()  # reconnect: nothing left to apply
    assert db.migrate(conn) == []
    assert [r[0] for r in conn.execute("SELECT name FROM migrations ORDER BY name")] == names
    conn.close()

    # a migration appended later is applied exactly once, to an existing database
    calls = []

    def m999_test_extra(c):
        calls.append(1)
        c.execute("CREATE TABLE extra (x)")

    monkeypatch.setattr(db, "MIGRATIONS", db.MIGRATIONS + [m999_test_extra])
    db.connect().close()
    db.connect().close()
    assert calls == [1]


def test_failed_migration_rolls_back(monkeypatch):
    db.connect().close()

    def m998_broken(c):
        c.execute("CREATE TABLE half (x)")
        raise RuntimeError("boom")

    # monkeypatch.context(): undoing the fixture itself would also undo the test's LLMDESK_HOME
    with monkeypatch.context() as m, pytest.raises(RuntimeError):
        m.setattr(db, "MIGRATIONS", db.MIGRATIONS + [m998_broken])
        db.connect()
    conn = db.connect()
    assert conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'half'").fetchone() is None
    assert conn.execute("SELECT 1 FROM migrations WHERE name = 'm998_broken'").fetchone() is None
    conn.close()


def test_not_a_database_is_one_line(user_dir):
    user_dir.mkdir(parents=True)
    (user_dir / "llmdesk.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LlmdeskError) as e:
        db.connect()
    assert "\n" not in str(e.value) and "llmdesk.db" in str(e.value)


# ---------------------------------------------------------------------------------------------
# names


@pytest.mark.parametrize(
    "ref, expected",
    [
        ("tiny", ("tiny", "latest")),
        ("tiny:f32", ("tiny", "f32")),
        ("qwen2.5-0.5b-instruct:q4_k_m", ("qwen2.5-0.5b-instruct", "q4_k_m")),
        ("a_b.c-d:7", ("a_b.c-d", "7")),
    ],
)
def test_parse_name(ref, expected):
    assert catalog.parse_name(ref) == expected


@pytest.mark.parametrize(
    "ref", ["Tiny", "tiny:F32", "foo bar", "", ":x", "foo:", "a:b:c", "-x", ".x", "foo/bar", "x" * 200, "tïny", "a\nb"]
)
def test_bad_names_are_one_line(ref):
    with pytest.raises(LlmdeskError) as e:
        catalog.parse_name(ref)
    msg = str(e.value)
    assert "\n" not in msg and "lowercase letters, digits" in msg


@pytest.mark.parametrize(
    "filename, expected",
    [
        ("TinyLlama-1.1B-Chat-v1.0.Q4_K_M.gguf", ("tinyllama-1.1b-chat-v1.0", "q4_k_m")),
        ("qwen2.5-0.5b-instruct-q8_0.gguf", ("qwen2.5-0.5b-instruct", "q8_0")),
        ("Llama-3.2-1B-Instruct-IQ2_XXS.gguf", ("llama-3.2-1b-instruct", "iq2_xxs")),
        ("Qwen3-8B-UD-Q4_K_XL.gguf", ("qwen3-8b", "ud-q4_k_xl")),
        ("gemma-2b-it-f16.gguf", ("gemma-2b-it", "f16")),
        ("model.BF16.gguf", ("model", "bf16")),
        ("sub/dir/Phi-2.gguf", ("phi-2", "latest")),
        ("My Model (v2)!.gguf", ("my-model-v2", "latest")),
    ],
)
def test_names_from_filename(filename, expected):
    assert catalog.names_from_filename(filename) == expected
    catalog.check_name(*expected)


# ---------------------------------------------------------------------------------------------
# catalog


def test_import_list_get_remove_round_trip(tiny_gguf, user_dir):
    digest = sha256(tiny_gguf)
    a = catalog.add_file(tiny_gguf, "tiny", "f32", source=str(tiny_gguf))
    b = catalog.add_file(tiny_gguf, "tiny", "latest")

    assert a.ref == "tiny:f32" and a.sha256 == digest and a.size == tiny_gguf.stat().st_size
    assert (a.architecture, a.file_type, a.context_length) == ("llama", "F32", 2048)
    assert a.parameters and a.parameters > 100_000
    assert a.path == b.path == user_dir / "models" / "blobs" / f"sha256-{digest}.gguf"
    assert sha256(a.path) == digest
    assert store_files(user_dir) == [f"models/blobs/sha256-{digest}.gguf"]  # one blob for two names

    # survives a reconnect: a fresh connection sees both entries
    conn = db.connect()
    assert [e.ref for e in catalog.list_models(conn=conn)] == ["tiny:f32", "tiny:latest"]
    conn.close()
    assert catalog.get("tiny", "f32") == a
    assert catalog.get("tiny", "nope") is None
    assert catalog.find_by_source(str(tiny_gguf)) == a
    assert a.to_dict()["ref"] == "tiny:f32" and a.to_dict()["path"] == str(a.path)

    assert catalog.remove("tiny:f32") == a
    assert a.path.is_file()  # still used by tiny:latest
    assert catalog.remove("tiny").ref == "tiny:latest"
    assert not a.path.exists() and store_files(user_dir) == []
    assert catalog.list_models() == []
    assert tiny_gguf.is_file()  # the original is never touched


def test_remove_unknown_is_one_line():
    with pytest.raises(ModelNotFound) as e:
        catalog.remove("ghost:v1")
    assert "\n" not in str(e.value) and "'ghost:v1'" in str(e.value) and "llmdesk list" in str(e.value)


def test_reimport_replaces_entry_and_drops_unused_blob(tiny_gguf, other_gguf, user_dir):
    first = catalog.add_file(tiny_gguf, "m")
    second = catalog.add_file(other_gguf, "m")
    assert [e.ref for e in catalog.list_models()] == ["m:latest"]
    assert second.sha256 == sha256(other_gguf) != first.sha256
    assert not first.path.exists()
    assert store_files(user_dir) == [f"models/blobs/sha256-{second.sha256}.gguf"]


def test_hard_link_when_possible(tiny_gguf, user_dir, tmp_path):
    src = tmp_path / "mine.gguf"
    src.write_bytes(tiny_gguf.read_bytes())
    e = catalog.add_file(src, "linked")
    assert os.path.samefile(src, e.path)  # tmp_path and the user dir share a filesystem
    src.unlink()
    assert sha256(e.path) == e.sha256  # the store's name keeps the bytes


def test_copy_when_hard_link_fails(tiny_gguf, user_dir, monkeypatch):
    def no_link(*a, **k):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(catalog.os, "link", no_link)
    monkeypatch.setattr(catalog, "PROGRESS_MIN_BYTES", 0)  # and show the progress bar
    e = catalog.add_file(tiny_gguf, "copied")
    assert not os.path.samefile(tiny_gguf, e.path)
    assert sha256(e.path) == e.sha256 == sha256(tiny_gguf)
    assert store_files(user_dir) == [f"models/blobs/sha256-{e.sha256}.gguf"]


def test_sha256_file(tiny_gguf, monkeypatch):
    monkeypatch.setattr(catalog, "PROGRESS_MIN_BYTES", 0)
    assert catalog.sha256_file(tiny_gguf) == sha256(tiny_gguf)


def bad_files(tiny_gguf, tmp_path):
    data = tiny_gguf.read_bytes()
    cases = {
        "truncated.gguf": data[: len(data) // 2],
        "garbage.gguf": b"not a model at all\n" * 50,
        "empty.gguf": b"",
        "header-only.gguf": data[:64],
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    return [tmp_path / n for n in cases]


def test_bad_file_leaves_nothing(tiny_gguf, tmp_path, user_dir):
    catalog.add_file(tiny_gguf, "good")  # an existing entry must survive failed imports
    before = store_files(user_dir)
    for bad in bad_files(tiny_gguf, tmp_path) + [tmp_path / "missing.gguf", tmp_path]:
        with pytest.raises((BadModelFile, ModelNotFound)) as e:
            catalog.add_file(bad, "good")
        assert "\n" not in str(e.value)
    assert store_files(user_dir) == before
    assert [e.ref for e in catalog.list_models()] == ["good:latest"]


def test_interrupted_import_leaves_no_temp_file(tiny_gguf, user_dir, monkeypatch):
    def crash(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):  # the test's LLMDESK_HOME stays
        m.setattr(catalog.os, "replace", crash)
        catalog.add_file(tiny_gguf, "x")
    assert store_files(user_dir) == []
    assert rows("models") == []


def test_bad_name_rejected_before_anything(tiny_gguf, user_dir):
    with pytest.raises(LlmdeskError):
        catalog.add_file(tiny_gguf, "Bad Name")
    assert store_files(user_dir) == []


def test_concurrent_imports_share_one_blob(tiny_gguf, user_dir):
    errors = []

    def work(tag):
        try:
            catalog.add_file(tiny_gguf, "conc", tag)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(f"t{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(catalog.list_models()) == 6
    assert len(store_files(user_dir)) == 1


# ---------------------------------------------------------------------------------------------
# references


def test_resolve_path_name_and_tag(tiny_gguf, monkeypatch):
    r = refs.resolve(str(tiny_gguf))
    assert r.path == tiny_gguf and r.entry is None and r.name == "tiny.gguf"
    monkeypatch.chdir(tiny_gguf.parent)
    assert refs.resolve("tiny.gguf").path.samefile(tiny_gguf)
    assert refs.resolve("./tiny.gguf").path.samefile(tiny_gguf)

    e = catalog.add_file(tiny_gguf, "tiny")  # same word as the file in the cwd: a path wins only with .gguf
    catalog.add_file(tiny_gguf, "tiny", "f32")
    assert refs.resolve("tiny").entry == e and refs.resolve("tiny").name == "tiny:latest"
    r = refs.resolve("tiny:f32")
    assert r.name == "tiny:f32" and r.path == e.path and r.entry.tag == "f32"


@pytest.mark.parametrize("ref", ["./nope.gguf", "nope.gguf", "/no/such/dir/model.gguf", "models/x"])
def test_resolve_missing_path(ref):
    with pytest.raises(ModelNotFound) as e:
        refs.resolve(ref)
    assert str(e.value) == f"no such file: {ref}"


@pytest.mark.parametrize("ref", ["foo", "foo:bar", "Foo"])
def test_resolve_unknown_name(ref, user_dir):
    with pytest.raises(ModelNotFound) as e:
        refs.resolve(ref)
    msg = str(e.value)
    assert "\n" not in msg and "not found in the store" in msg and "llmdesk list" in msg and ".gguf" in msg
    assert str(user_dir) in msg or "~" in msg
    assert catalog.list_models() == []


def test_resolve_store_entry_with_missing_blob(tiny_gguf):
    e = catalog.add_file(tiny_gguf, "gone")
    e.path.unlink()
    with pytest.raises(ModelNotFound) as err:
        refs.resolve("gone")
    assert "llmdesk rm gone:latest" in str(err.value)


def test_resolve_hf_ref_in_store_needs_no_network(tiny_gguf, monkeypatch, tmp_path):
    point_hf_at(monkeypatch, f"http://127.0.0.1:{closed_port()}", tmp_path)
    e = catalog.add_file(tiny_gguf, "tiny", "q8_0", source="hf:acme/tiny-GGUF/tiny.Q8_0.gguf")
    r = refs.resolve("hf:acme/tiny-GGUF/tiny.Q8_0.gguf")
    assert r.entry == e and r.name == "tiny:q8_0"


# ---------------------------------------------------------------------------------------------
# pull


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "ref, expected",
    [
        ("hf:acme/tiny-GGUF/tiny.Q8_0.gguf", ("acme/tiny-GGUF", "tiny.Q8_0.gguf", None)),
        ("hf:acme/tiny-GGUF/sub/dir/tiny.gguf@v1.0", ("acme/tiny-GGUF", "sub/dir/tiny.gguf", "v1.0")),
        ("hf:a/b/c.GGUF@refs/pr/1", ("a/b", "c.GGUF", "refs/pr/1")),
    ],
)
def test_parse_hf_ref(ref, expected):
    r = pull.parse_hf_ref(ref)
    assert (r.repo_id, r.filename, r.revision) == expected
    assert r.source == ref


@pytest.mark.parametrize(
    "ref",
    ["hf:", "hf:acme", "hf:acme/repo", "hf:acme/repo/file.bin", "hf:acme/repo/", "hf:acme//x.gguf",
     "hf:-acme/repo/x.gguf", "hf:acme/re--po/x.gguf", "hf:acme/repo/../x.gguf", "hf:acme/repo/a//x.gguf",
     "acme/repo/x.gguf", "hf:acme/repo/x.gguf@"],
)
def test_bad_hf_refs(ref):
    with pytest.raises(LlmdeskError) as e:
        pull.pull(ref)
    assert "\n" not in str(e.value) and "hf:OWNER/REPO/FILE.gguf" in str(e.value)


def hub_leftovers(user_dir) -> list[str]:
    """Files (not directories or bookkeeping) left in llmdesk's Hub cache."""
    root = user_dir / "cache" / "huggingface"
    skip = ("CACHEDIR.TAG", ".lock")
    return [str(p) for p in root.rglob("*") if (p.is_file() or p.is_symlink()) and not str(p).endswith(skip) and "/refs/" not in str(p)]


def test_pull_downloads_registers_and_is_idempotent(fake_hub, tiny_gguf, user_dir):
    digest = fake_hub.add("acme/tiny-GGUF", "sub/Tiny-Chat.Q8_0.gguf", tiny_gguf.read_bytes())
    e = pull.pull("hf:acme/tiny-GGUF/sub/Tiny-Chat.Q8_0.gguf")
    assert (e.name, e.tag, e.sha256) == ("tiny-chat", "q8_0", digest)
    assert e.source == "hf:acme/tiny-GGUF/sub/Tiny-Chat.Q8_0.gguf"
    assert sha256(e.path) == digest and e.path.parent == user_dir / "models" / "blobs"
    assert ("GET", "/acme/tiny-GGUF/resolve/main/sub/Tiny-Chat.Q8_0.gguf") in fake_hub.requests
    assert hub_leftovers(user_dir) == []  # the store owns the only copy

    # pulling again: one HEAD, no download, same entry
    fake_hub.requests.clear()
    assert pull.pull("hf:acme/tiny-GGUF/sub/Tiny-Chat.Q8_0.gguf") == e
    assert [m for m, _ in fake_hub.requests if "/resolve/" in _] == ["HEAD"]

    # resolve() uses the store entry without asking the Hub
    fake_hub.requests.clear()
    assert refs.resolve("hf:acme/tiny-GGUF/sub/Tiny-Chat.Q8_0.gguf").entry == e
    assert fake_hub.requests == []


def test_pull_updates_when_the_file_changed(fake_hub, tiny_gguf, other_gguf):
    fake_hub.add("acme/m", "m.gguf", tiny_gguf.read_bytes())
    old = pull.pull("hf:acme/m/m.gguf")
    new_digest = fake_hub.add("acme/m", "m.gguf", other_gguf.read_bytes())
    new = pull.pull("hf:acme/m/m.gguf")
    assert new.ref == old.ref == "m:latest" and new.sha256 == new_digest
    assert not old.path.exists() and new.path.is_file()


def test_pull_at_revision(fake_hub, tiny_gguf):
    fake_hub.add("acme/m", "m-f32.gguf", tiny_gguf.read_bytes())
    e = pull.pull(f"hf:acme/m/m-f32.gguf@{fake_hub.COMMIT}")
    assert e.ref == "m:f32" and e.source.endswith("@" + fake_hub.COMMIT)


def test_resolve_pulls_missing_hf_ref(fake_hub, tiny_gguf):
    fake_hub.add("acme/m", "m.gguf", tiny_gguf.read_bytes())
    r = refs.resolve("hf:acme/m/m.gguf")
    assert r.name == "m:latest" and r.path.is_file()


@pytest.mark.parametrize(
    "ref, needle",
    [
        ("hf:acme/nope/m.gguf", "repository acme/nope not found"),
        ("hf:acme/m/missing.gguf", "file 'missing.gguf' not found in acme/m"),
        ("hf:acme/m/m.gguf@v9", "revision 'v9' not found in acme/m"),
        ("hf:acme/gated/m.gguf", "gated repository"),
    ],
)
def test_pull_errors_are_one_line(fake_hub, tiny_gguf, user_dir, ref, needle):
    fake_hub.add("acme/m", "m.gguf", tiny_gguf.read_bytes())
    fake_hub.add("acme/gated", "m.gguf", tiny_gguf.read_bytes())
    fake_hub.gated.add("acme/gated")
    with pytest.raises(LlmdeskError) as e:
        pull.pull(ref)
    assert "\n" not in str(e.value) and needle in str(e.value)
    assert catalog.list_models() == [] and store_files(user_dir) == []


def test_pull_of_a_bad_file_leaves_nothing(fake_hub, tiny_gguf, user_dir):
    fake_hub.add("acme/m", "broken.gguf", tiny_gguf.read_bytes()[:1000])
    with pytest.raises(BadModelFile) as e:
        pull.pull("hf:acme/m/broken.gguf")
    assert "\n" not in str(e.value) and "hf:acme/m/broken.gguf" in str(e.value)
    assert catalog.list_models() == [] and store_files(user_dir) == [] and hub_leftovers(user_dir) == []


def test_pull_without_network_fails_fast(monkeypatch, tmp_path):

    point_hf_at(monkeypatch, f"http://127.0.0.1:{closed_port()}", tmp_path)
    with pytest.raises(LlmdeskError) as e:
        pull.pull("hf:acme/m/m.gguf")
    assert "\n" not in str(e.value) and "cannot reach" in str(e.value) and "network" in str(e.value)


def test_pull_offline(fake_hub, tiny_gguf, monkeypatch):
    fake_hub.add("acme/m", "m.gguf", tiny_gguf.read_bytes())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LlmdeskError) as e:
        pull.pull("hf:acme/m/m.gguf")
    assert "HF_HUB_OFFLINE" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    e = pull.pull("hf:acme/m/m.gguf")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake_hub.requests.clear()
    assert pull.pull("hf:acme/m/m.gguf") == e  # already in the store: fine offline
    assert fake_hub.requests == []


# ---------------------------------------------------------------------------------------------
# logs


def test_logs_record_and_list_newest_first():
    assert logs.logging_enabled()
    a = logs.log_turn(model="tiny:latest", prompt="What is quantization?", response="Fewer bits per weight.",
                      system="Be brief.", options={"temperature": 0.7, "seed": 1}, tokens_in=5, tokens_out=8,
                      duration_s=0.5)
    b = logs.log_turn(model="tiny:latest", prompt="hello", response="hi there")
    got = logs.recent()
    assert [r["id"] for r in got] == [b, a]
    first = got[1]
    assert first["options"] == {"temperature": 0.7, "seed": 1} and first["system"] == "Be brief."
    assert first["tokens_per_second"] == pytest.approx(16.0)
    assert got[0]["tokens_per_second"] is None and got[0]["options"] == {}
    assert [r["id"] for r in logs.recent(1)] == [b]


def test_logging_off_and_on():
    logs.set_logging(False)
    assert not logs.logging_enabled()
    assert logs.log_turn(model="m", prompt="secret", response="x") is None
    assert logs.recent() == []
    logs.set_logging(True)
    assert logs.logging_enabled()
    assert logs.log_turn(model="m", prompt="public", response="x") is not None
    assert [r["prompt"] for r in logs.recent()] == ["public"]


def test_log_search():
    logs.log_turn(model="m", prompt="Tell me about quantization", response="It stores weights in fewer bits")
    logs.log_turn(model="m", prompt="hello", response="hi", system="You are a pirate")
    logs.log_turn(model="m", prompt='say "foo"bar', response="AND then NEAR(x) OR NOT")
    assert [r["prompt"] for r in logs.recent(query="quantiz")] == ["Tell me about quantization"]  # prefix
    assert [r["prompt"] for r in logs.recent(query="FEWER weights")] == ["Tell me about quantization"]
    assert [r["prompt"] for r in logs.recent(query="pirate")] == ["hello"]  # the system prompt too
    assert logs.recent(query="quantization pirate") == []  # all words must match
    assert len(logs.recent(query="   ")) == 3


@pytest.mark.parametrize(
    "query",
    ['foo"bar', '"', '""', "AND", "OR", "NOT", "NEAR(x y)", "*", "(", ")", "a:b", "prompt:hello", "^x", "-x",
     "+", "'", "'; DROP TABLE logs; --", "\\", "{prompt}: x", "\x00"],
)
def test_hostile_queries_never_raise(query):
    logs.log_turn(model="m", prompt='say "foo"bar AND NEAR(x y)', response="ok")
    assert isinstance(logs.recent(query=query), list)
    assert len(logs.recent()) == 1


def test_fts_index_follows_updates_and_deletes():
    i = logs.log_turn(model="m", prompt="alpha", response="beta")
    with db.using() as c, db.transaction(c):
        c.execute("UPDATE logs SET prompt = 'gamma' WHERE id = ?", (i,))
    assert logs.recent(query="alpha") == [] and len(logs.recent(query="gamma")) == 1
    with db.using() as c, db.transaction(c):
        c.execute("DELETE FROM logs WHERE id = ?", (i,))
    assert logs.recent(query="gamma") == []
    with db.using() as c:
        assert c.execute("INSERT INTO logs_fts(logs_fts) VALUES ('integrity-check')") is not None


def test_many_first_opens_of_a_fresh_database_all_succeed(tmp_path):
    """Six processes' worth of first connections racing on a new database: each waits for the
    switch to WAL and the migrations instead of reporting it busy (this failed about one time
    in twenty before the switch was retried)."""
    from llmdesk.store import db

    errors = []
    start = threading.Barrier(6)

    def work(path):
        start.wait()
        try:
            db.connect(path).close()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    for trial in range(120):
        path = tmp_path / f"fresh{trial}.db"
        threads = [threading.Thread(target=work, args=(path,)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
