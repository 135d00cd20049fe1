"""The store under attack and after accidents: `hf:` references that try to leave the store,
endpoints that answer with paths, imports and pulls killed with -9, `llmdesk doctor`, and error
messages without the machine's paths for remote clients."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import llmdesk_exe

from llmdesk import atomic
from llmdesk.cli.main import main
from llmdesk.errors import BadModelFile, LlmdeskError, ModelNotFound
from llmdesk.formats.gguf import read_gguf
from llmdesk.formats.synth import SynthConfig, write_llama_gguf
from llmdesk.store import catalog, doctor, leftovers, paths, pull, refs

COMMAND = [llmdesk_exe()]
BIG = 200 * 1000 * 1000  # bytes of the "large model" the kill tests import


def cli(*args, timeout=120) -> subprocess.CompletedProcess:
    # os.environ carries LLMDESK_HOME (the autouse fixture) and, with fake_hub, HF_ENDPOINT
    return subprocess.run([*COMMAND, *map(str, args)], capture_output=True, text=True, env=dict(os.environ),
                          timeout=timeout, stdin=subprocess.DEVNULL)


def one_error_line(p: subprocess.CompletedProcess) -> str:
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def outside_home(tmp_path: Path, user_dir: Path) -> set[str]:
    """What exists in the test's folder outside the user directory (and huggingface_hub's own
    settings folder, HF_HOME): where a traversal out of the store would land."""
    return tree(tmp_path, user_dir, tmp_path / "hf-home")


def tree(root: Path, *skip: Path) -> set[str]:
    """Every file, link and folder under `root` except those under `skip`."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        if any(d == s or s in d.parents for s in skip):
            continue
        out |= {str(d / n) for n in dirnames + filenames}
    return {p for p in out if not any(Path(p) == s for s in skip)}


def wait_for(cond, what: str, proc: subprocess.Popen | None = None, timeout: float = 120.0) -> None:
    """Poll `cond` (a generous timeout only turns a hang into a failure; no speed is asserted)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process ended (rc {proc.returncode}) before {what}: {proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def refs_in_db() -> list[str]:
    """The catalog's names, read without a store operation (which would clean up)."""
    with sqlite3.connect(paths.db_path()) as c:
        rows = c.execute("SELECT name, tag FROM models ORDER BY name, tag").fetchall()
    return [f"{n}:{t}" for n, t in rows]


def parts(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if ".part" in p.name) if folder.exists() else []


@pytest.fixture(scope="module")
def other_gguf(tmp_path_factory):
    """A second model with different bytes."""
    return write_llama_gguf(tmp_path_factory.mktemp("other") / "other.gguf", SynthConfig(seed=1, name="other"))


@pytest.fixture
def big_gguf(tiny_gguf, tmp_path) -> Path:
    """A valid GGUF of 200 MB (the tiny model, then zeros; sparse, so it takes no disk space)."""
    p = tmp_path / "big-model.gguf"
    p.write_bytes(tiny_gguf.read_bytes())
    os.truncate(p, BIG)
    return p


# ---------------------------------------------------------------------------------------------
# hf: references: every part is held to the Hub's rules before anything is asked or written

GOOD = [
    ("hf:acme/tiny-GGUF/tiny.Q8_0.gguf", ("acme/tiny-GGUF", "tiny.Q8_0.gguf", None)),
    ("hf:my_org/m.v2_x/sub/dir/m.gguf@v1.0", ("my_org/m.v2_x", "sub/dir/m.gguf", "v1.0")),
    ("hf:a/b/c.gguf@refs/pr/12", ("a/b", "c.gguf", "refs/pr/12")),
    ("hf:a/b/c.gguf@feature/new-tokenizer_2", ("a/b", "c.gguf", "feature/new-tokenizer_2")),
    ("hf:a/b/c.gguf@0123456789abcdef0123456789abcdef01234567", ("a/b", "c.gguf", "0123456789abcdef0123456789abcdef01234567")),
    ("hf:a/b/My Model (v2).gguf", ("a/b", "My Model (v2).gguf", None)),
    ("hf:" + "o" * 96 + "/" + "r" * 96 + "/m.gguf", ("o" * 96 + "/" + "r" * 96, "m.gguf", None)),
]


@pytest.mark.parametrize("ref, expected", GOOD)
def test_good_references(ref, expected):
    r = pull.parse_hf_ref(ref)
    assert (r.repo_id, r.filename, r.revision) == expected and r.source == ref


BAD_OWNER = ["", "-acme", "acme-", ".acme", "acme.", "ac--me", "ac..me", "ac me", "ac%2Fme", "%2e%2e", "ácme",
             "o" * 97, "ac\x00me", "ac\\me", "..", "~acme", "ac:me"]
BAD_REPO = ["", "re--po", "repo.git", "REPO.GIT", "..", ".", "re..po", "%2e%2e", "re\\po", "re po", "-repo",
            "repo-", "r" * 97, "re\npo", "re$po"]
BAD_FILE = [
    "../x.gguf", "a/../../x.gguf", "a/../b.gguf", "./x.gguf", "a/./x.gguf", "a//x.gguf", "/etc/x.gguf",
    "//srv/share/x.gguf", "..\\..\\x.gguf", "a\\x.gguf", "%2e%2e/x.gguf", "%2e%2e%2fx.gguf", "..%2Fx.gguf",
    "x%00.gguf", "x\x00.gguf", "x\n.gguf", "x\r.gguf", "x\x1b[2J.gguf", "\u202ex.gguf", "x\x7f.gguf",
    "C:x.gguf", "C:\\Windows\\x.gguf", "a/" + "x" * 300 + ".gguf", "/".join(["d"] * 600) + "/x.gguf",
    "x.bin", "x.gguf/", "x.gguf.exe", "",
]
BAD_REVISION = [
    "", "..", "../../..", "../../../../../../tmp/escaped", "v1/../../x", "refs/../../x", "..%2F..%2Fx",
    "%2e%2e%2f%2e%2e", "main%2F..%2F..", "v%00", "/main", "/etc/passwd", "main/", "a//b", "-x", "--help",
    "main.lock", "a.lock/b", ".hidden", "a/.b", "v1.", "a@{1}", "@", "a~1", "a^", "a:b", "a?", "a*", "a[",
    "a\\b", "..\\..\\x", "a b", "a\x00b", "a\tb", "a\nb", "a\x7fb", "refs/pr/x", "refs/pr/1/../..",
    "refs/pr/", "x" * 256,
]


def refs_with(part: str, value: str) -> str:
    owner, repo, file, rev = "acme", "repo", "m.gguf", None
    if part == "owner":
        owner = value
    elif part == "repository name":
        repo = value
    elif part == "file path":
        file = value
    else:
        rev = value
    return f"hf:{owner}/{repo}/{file}" + ("" if rev is None else f"@{rev}")


CASES = ([("owner", v) for v in BAD_OWNER] + [("repository name", v) for v in BAD_REPO]
         + [("file path", v) for v in BAD_FILE] + [("revision", v) for v in BAD_REVISION])


@pytest.mark.parametrize("part, value", CASES, ids=[f"{p}:{v!r}"[:60] for p, v in CASES])
def test_bad_part_is_refused_before_any_request(part, value, fake_hub, tiny_gguf, user_dir):
    fake_hub.any_revision = True  # an endpoint that answers whatever revision it is asked for
    fake_hub.add("acme/repo", "m.gguf", tiny_gguf.read_bytes())
    ref = refs_with(part, value)
    with pytest.raises(LlmdeskError) as e:
        pull.pull(ref)
    msg = str(e.value)
    assert "\n" not in msg and "\r" not in msg and "\x00" not in msg
    assert msg.startswith(f"bad {part} "), msg
    assert "hf:OWNER/REPO/FILE.gguf" in msg  # the syntax to use
    assert fake_hub.requests == []
    assert catalog.list_models() == []


def test_messages_say_which_part_and_why():
    def msg(ref):
        with pytest.raises(LlmdeskError) as e:
            pull.parse_hf_ref(ref)
        return str(e.value)

    m = msg("hf:acme/repo/m.gguf@../../../../x")
    assert m.startswith("bad revision '../../../../x'") and "'..'" in m and "refs/pr/N" in m and "40-hex" in m
    m = msg("hf:acme/repo/m.gguf@v1%2F..")
    assert "percent-encoded" in m
    m = msg("hf:acme/repo/../../m.gguf")
    assert m.startswith("bad file path '../../m.gguf'") and "'..'" in m
    m = msg("hf:acme/repo//etc/m.gguf")
    assert m.startswith("bad file path") and "absolute" in m
    m = msg("hf:acme/repo/a\\m.gguf")
    assert "backslash" in m
    m = msg("hf:acme/repo/m\x1b[2J.gguf")
    assert "control character" in m and "\x1b" not in m  # escaped, so a terminal is not driven by it
    m = msg("hf:ac--me/repo/m.gguf")
    assert m.startswith("bad owner 'ac--me'") and "'--'" in m
    m = msg("hf:acme/repo.git/m.gguf")
    assert m.startswith("bad repository name") and ".git" in m
    m = msg("hf:acme/repo/" + "x" * 5000 + ".gguf")
    assert len(m) < 400  # the value is cut, the line stays readable
    m = msg("hf:acme/repo/m.gguf@a b")
    assert "' '" in m and "git" in m


# the same through the real command, against an endpoint that answers any revision: one error
# line, exit code 1, and not one file written outside the user directory
CLI_CASES = [
    "hf:acme/repo/m.gguf@../../../../../escaped",
    "hf:acme/repo/m.gguf@..%2F..%2F..%2F..%2F..%2Fescaped",
    "hf:acme/repo/m.gguf@refs/pr/1/../../../../../../escaped",
    "hf:acme/repo/../../../../../escaped.gguf",
    "hf:acme/repo/%2e%2e/%2e%2e/escaped.gguf",
    "hf:acme/repo//tmp/escaped.gguf",
    "hf:acme/repo/..\\..\\escaped.gguf",
    "hf:acme/repo/m\x01.gguf",
    "hf:../repo/m.gguf",
    "hf:acme/..%2F..%2Fescaped/m.gguf",
]


@pytest.mark.parametrize("ref", CLI_CASES)
def test_pull_command_refuses_traversal(ref, fake_hub, tiny_gguf, tmp_path, user_dir):
    fake_hub.any_revision = True
    fake_hub.add("acme/repo", "m.gguf", tiny_gguf.read_bytes())
    before = outside_home(tmp_path, user_dir)
    line = one_error_line(cli("pull", ref))
    assert line.startswith("error: bad ") and "hf:OWNER/REPO/FILE.gguf" in line
    assert outside_home(tmp_path, user_dir) == before
    assert not list(tmp_path.rglob("escaped*"))
    assert fake_hub.requests == []
    assert catalog.list_models() == []


def test_a_lax_endpoint_still_serves_good_revisions(fake_hub, tiny_gguf, tmp_path, user_dir):
    """The control for the traversal tests: the same endpoint, a good revision, a pull that works
    and writes only inside the user directory."""
    fake_hub.any_revision = True
    fake_hub.add("acme/repo", "m.gguf", tiny_gguf.read_bytes())
    before = outside_home(tmp_path, user_dir)
    e = pull.pull("hf:acme/repo/m.gguf@v1.0")
    assert e.ref == "m:latest" and e.path.is_file()
    assert outside_home(tmp_path, user_dir) == before
    assert (user_dir / "cache" / "huggingface" / "models--acme--repo" / "refs" / "v1.0").is_file()


# ---------------------------------------------------------------------------------------------
# the endpoint's answers become paths too (blobs/<etag>, snapshots/<commit>): checked first


@pytest.mark.parametrize(
    "attr, value, needle",
    [
        ("answer_commit", "../../../../../escaped", "commit id"),
        ("answer_commit", "0123456789abcdef0123456789abcdef0123456/", "commit id"),
        ("answer_commit", "main", "commit id"),
        ("answer_etag", "../../../../../escaped", "ETag"),
        ("answer_etag", "..", "ETag"),
        ("answer_etag", "a\\b", "ETag"),
    ],
)
def test_hostile_endpoint_answers_are_refused(attr, value, needle, fake_hub, tiny_gguf, tmp_path, user_dir):
    fake_hub.add("acme/m", "m.gguf", tiny_gguf.read_bytes())
    setattr(fake_hub, attr, value)
    before = outside_home(tmp_path, user_dir)
    with pytest.raises(LlmdeskError) as e:
        pull.pull("hf:acme/m/m.gguf")
    assert needle in str(e.value) and "nothing was downloaded" in str(e.value) and "\n" not in str(e.value)
    assert [m for m, path in fake_hub.requests if "/resolve/" in path] == ["HEAD"]  # asked, never downloaded
    assert outside_home(tmp_path, user_dir) == before and not list(tmp_path.rglob("escaped*"))
    assert catalog.list_models() == []


def test_download_outside_the_cache_is_refused_and_removed(fake_hub, tiny_gguf, tmp_path, monkeypatch, user_dir):
    """Defence in depth: were huggingface_hub to put the file elsewhere, it is removed, not added."""
    import huggingface_hub

    fake_hub.add("acme/m", "m.gguf", tiny_gguf.read_bytes())
    outside = tmp_path / "outside.gguf"

    def misplaced(*args, **kwargs):
        outside.write_bytes(tiny_gguf.read_bytes())
        return str(outside)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", misplaced)
    with pytest.raises(LlmdeskError) as e:
        pull.pull("hf:acme/m/m.gguf")
    assert "outside llmdesk's download cache" in str(e.value) and "\n" not in str(e.value)
    assert not outside.exists()
    assert catalog.list_models() == [] and not any(paths.blobs_dir().iterdir())


def test_a_link_out_of_the_cache_is_removed_but_never_followed(fake_hub, tiny_gguf, tmp_path, monkeypatch):
    import huggingface_hub

    fake_hub.add("acme/m", "m.gguf", tiny_gguf.read_bytes())
    victim = tmp_path / "precious.gguf"  # a file of the user's that a bad link points at
    victim.write_bytes(tiny_gguf.read_bytes())
    link = leftovers.hf_cache() / "models--acme--m" / "snapshots" / fake_hub.COMMIT / "m.gguf"

    def linked(*args, **kwargs):
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(victim)
        return str(link)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", linked)
    with pytest.raises(LlmdeskError, match="outside llmdesk's download cache"):
        pull.pull("hf:acme/m/m.gguf")
    assert not link.is_symlink() and victim.read_bytes() == tiny_gguf.read_bytes()
    assert catalog.list_models() == []


def test_pull_leaves_no_copy_in_the_cache(fake_hub, tiny_gguf, user_dir):
    fake_hub.add("acme/m", "m.gguf", tiny_gguf.read_bytes())
    e = pull.pull("hf:acme/m/m.gguf")
    assert read_gguf(e.path).architecture == "llama"
    cache = leftovers.hf_cache()
    kept = [p for p in cache.rglob("*") if (p.is_file() or p.is_symlink()) and "/.locks/" not in str(p)
            and "/refs/" not in str(p) and p.name != "CACHEDIR.TAG"]
    assert kept == []


def test_a_bad_download_names_the_file_not_a_temporary_name(fake_hub, tiny_gguf, user_dir):
    fake_hub.add("acme/m", "sub/broken.gguf", tiny_gguf.read_bytes()[:1000])
    with pytest.raises(BadModelFile) as e:
        pull.pull("hf:acme/m/sub/broken.gguf")
    assert "model: broken.gguf: " in str(e.value) and "truncated" in str(e.value) and ".part" not in str(e.value)
    assert parts(leftovers.hf_cache()) == [] and catalog.list_models() == []


# ---------------------------------------------------------------------------------------------
# leftovers: what a kill -9 leaves is removed by the next store operation, and only that

# Runs the real command in a child that stops in the middle of the import (after the first
# chunk is staged) until the file GO appears, so that the test kills it exactly mid-way.
PAUSED = r"""
import os, sys, time
from pathlib import Path
from llmdesk.store import catalog
marker, go, how = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
if how == "copy":  # as if the file were on another filesystem: copied, not hard linked
    def no_link(*args, **kwargs):
        raise OSError("no hard links here")
    os.link = no_link
advance = catalog._Progress.advance
def paused(self, n):
    advance(self, n)
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        while not go.exists():
            time.sleep(0.02)
catalog._Progress.advance = paused
from llmdesk.cli.main import main
sys.exit(main(sys.argv[4:]))
"""


def start_paused(tmp_path: Path, how: str, *args) -> tuple[subprocess.Popen, Path, Path]:
    script = tmp_path / "paused.py"
    script.write_text(PAUSED)
    marker, go = tmp_path / "started", tmp_path / "go"
    proc = subprocess.Popen([sys.executable, str(script), str(marker), str(go), how, *map(str, args)],
                            env=dict(os.environ), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    wait_for(marker.exists, "the import to start", proc)
    return proc, marker, go


def kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


@pytest.mark.parametrize("how, op", [("link", "list"), ("copy", "list"), ("link", "import"), ("link", "rm"),
                                     ("copy", "pull"), ("link", "doctor")])
def test_kill_9_during_import_then_the_next_store_operation_cleans(how, op, big_gguf, tiny_gguf, tmp_path,
                                                                    user_dir, fake_hub, capsys):
    catalog.add_file(tiny_gguf, "keep")
    fake_hub.add("acme/m", "m.gguf", tiny_gguf.read_bytes())
    blobs = paths.blobs_dir()

    proc, _, _ = start_paused(tmp_path, how, "import", big_gguf, "--name", "big")
    (part,) = parts(blobs)
    assert re.fullmatch(rf"\.import-[0-9a-f]{{16}}\.{proc.pid}\.part", part.name)
    kill9(proc)
    # what kill -9 leaves: the temporary file (the whole model's size when hard linked, at least
    # the first chunk when copied), and nothing in the catalog
    assert parts(blobs) == [part]
    assert (part.stat().st_size == BIG) if how == "link" else (part.stat().st_size >= 1 << 20)
    assert refs_in_db() == ["keep:latest"]

    if op == "list":
        assert [e.ref for e in catalog.list_models()] == ["keep:latest"]
    elif op == "import":
        catalog.add_file(tiny_gguf, "again")
    elif op == "rm":
        catalog.remove("keep")
    elif op == "pull":
        pull.pull("hf:acme/m/m.gguf")
    elif op == "doctor":
        assert main(["doctor"]) == 1  # reported, with its size
        out = capsys.readouterr().out
        assert part.name in out and "200.0 MB" in out and f"pid {proc.pid}" in out
        assert "frees no space" in out  # a hard link to the file being imported: honest about it
        assert part.exists()  # looking changes nothing
        assert main(["doctor", "--fix"]) == 0
    assert parts(blobs) == []
    assert big_gguf.stat().st_size == BIG  # the source is untouched, hard link or not
    assert not any(p.name.startswith("sha256-") and p.stat().st_size == BIG for p in blobs.iterdir())


def test_kill_9_during_import_through_the_real_command_line(big_gguf, tmp_path, user_dir):
    proc, _, _ = start_paused(tmp_path, "copy", "import", big_gguf)
    kill9(proc)
    assert len(parts(paths.blobs_dir())) == 1
    p = cli("list")  # the real command, a new process
    assert p.returncode == 0 and "Traceback" not in p.stderr
    assert parts(paths.blobs_dir()) == []


def test_a_live_import_in_another_process_survives_every_store_operation(big_gguf, tiny_gguf, tmp_path,
                                                                          user_dir, fake_hub):
    fake_hub.add("acme/m", "m.gguf", tiny_gguf.read_bytes())
    proc, _, go = start_paused(tmp_path, "link", "import", big_gguf, "--name", "big")
    try:
        (live,) = parts(paths.blobs_dir())
        size = live.stat().st_size
        catalog.list_models()
        catalog.add_file(tiny_gguf, "other")
        pull.pull("hf:acme/m/m.gguf")
        catalog.remove("other")
        assert leftovers.clean(everywhere=True) == []
        report = doctor.check(fix=True)
        assert report.healthy and report.problems == []
        assert main(["doctor", "--fix"]) == 0
        assert live.exists() and live.stat().st_size == size
    finally:
        go.write_text("go")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert out.decode().startswith("big:latest ")
    assert parts(paths.blobs_dir()) == []
    assert sorted(e.ref for e in catalog.list_models()) == ["big:latest", "m:latest"]


def test_kill_9_between_download_and_import_of_a_pull(fake_hub, big_gguf, tmp_path, user_dir):
    fake_hub.add("acme/big", "big.gguf", big_gguf.read_bytes())
    proc, _, _ = start_paused(tmp_path, "link", "pull", "hf:acme/big/big.gguf")
    cache = leftovers.hf_cache()
    (staged,) = parts(cache)
    assert re.fullmatch(rf"\.pull-[0-9a-f]{{16}}\.{proc.pid}\.part", staged.name) and staged.stat().st_size == BIG
    kill9(proc)
    assert catalog.list_models() == []  # the next store operation...
    assert parts(cache) == [] and parts(paths.blobs_dir()) == []  # ...removed both temporary files


def test_kill_9_during_a_download_then_the_incomplete_file_goes(fake_hub, tmp_path, user_dir):
    content = b"\0" * (24 << 20)
    fake_hub.add("acme/big", "big.gguf", content)
    fake_hub.stall_after = 12 << 20  # the download stops mid-way until released
    proc = subprocess.Popen([*COMMAND, "pull", "hf:acme/big/big.gguf"], env=dict(os.environ),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    blobs = leftovers.hf_cache() / "models--acme--big" / "blobs"
    wait_for(lambda: any(p.name.endswith(".incomplete") for p in blobs.glob("*")), "the download to start", proc)
    kill9(proc)
    fake_hub.release.set()
    (incomplete,) = [p for p in blobs.iterdir() if p.name.endswith(".incomplete")]
    found = leftovers.find()
    assert [f.path for f in found] == [incomplete] and "download" in found[0].why
    catalog.list_models()
    assert not incomplete.exists()


def test_an_incomplete_download_someone_is_writing_is_kept(user_dir):
    """huggingface_hub holds `.locks/<repo>/<etag>.lock` (filelock.FileLock) for a whole download."""
    from filelock import FileLock

    etag = "ab" * 32
    blobs = leftovers.hf_cache() / "models--acme--m" / "blobs"
    blobs.mkdir(parents=True)
    incomplete = blobs / f"{etag}.0a1b2c3d.incomplete"
    incomplete.write_bytes(b"half")
    lock = leftovers.hf_cache() / ".locks" / "models--acme--m" / f"{etag}.lock"
    lock.parent.mkdir(parents=True)
    with FileLock(str(lock)):
        assert leftovers.find() == [] and leftovers.clean(everywhere=True) == []
        catalog.list_models()
        assert incomplete.exists()
        assert doctor.check(fix=True).problems == [] and incomplete.exists()
    catalog.list_models()  # the download ended without finishing: now it goes
    assert not incomplete.exists()


def test_old_style_import_names_are_judged_by_age(user_dir, monkeypatch):
    blobs = paths.blobs_dir()
    old = blobs / ".import-0123456789abcdef.part"
    old.write_bytes(b"x" * 100)
    catalog.list_models()
    assert old.exists()  # just written: perhaps an older llmdesk still importing
    real_time = time.time
    monkeypatch.setattr(leftovers.time, "time", lambda: real_time() + 2 * leftovers.OLD_PART_AGE_S)
    catalog.list_models()
    assert not old.exists()


def test_parts_of_live_and_dead_processes(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".plot.png.{dead.pid}.part.png"  # atomic_path with a suffix
    stale2 = tmp_path / f".model.gguf.{dead.pid}.part"
    mine = tmp_path / f".other.gguf.{os.getpid()}.part"
    parent = tmp_path / f".x.gguf.{os.getppid()}.part"
    unrelated = tmp_path / "notes.part"
    for p in (stale, stale2, mine, parent, unrelated):
        p.write_bytes(b"x")
    assert sorted(atomic.clean_stale_parts(tmp_path)) == sorted([stale, stale2])
    assert mine.exists() and parent.exists() and unrelated.exists()
    assert atomic.part_owner(atomic.part_path(tmp_path / "a.gguf").name) == os.getpid()
    assert atomic.part_owner(atomic.unique_part_path(tmp_path, "import").name) == os.getpid()


def test_quantize_uses_the_same_cleanup():
    from llmdesk.quantize import core

    assert core.clean_stale_parts is atomic.clean_stale_parts


def test_finished_download_left_in_the_cache(user_dir, monkeypatch):
    blobs = leftovers.hf_cache() / "models--acme--m" / "blobs"
    blobs.mkdir(parents=True)
    blob = blobs / ("cd" * 32)
    blob.write_bytes(b"z" * 1000)
    catalog.list_models()
    assert blob.exists()  # a pull may be about to move it out
    real_time = time.time
    monkeypatch.setattr(leftovers.time, "time", lambda: real_time() + 2 * leftovers.OLD_PART_AGE_S)
    (item,) = leftovers.find()
    assert item.path == blob and item.size == 1000
    catalog.list_models()
    assert not blob.exists()


# ---------------------------------------------------------------------------------------------
# llmdesk doctor


def doctor_cli(capsys, *args) -> tuple[int, list[str]]:
    rc = main(["doctor", *args])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return rc, captured.out.splitlines()


def test_doctor_on_a_healthy_store(tiny_gguf, capsys, user_dir):
    assert doctor_cli(capsys) == (0, [f"store {paths.display(user_dir)}: 0 models, 0 files (0 B), database ok",
                                      "no problems found"])
    catalog.add_file(tiny_gguf, "tiny", "f32")
    catalog.add_file(tiny_gguf, "tiny")
    rc, lines = doctor_cli(capsys)
    assert rc == 0 and lines[1] == "no problems found"
    assert lines[0].startswith(f"store {paths.display(user_dir)}: 2 models, 1 file (") and "database ok" in lines[0]
    assert doctor_cli(capsys, "--fix")[0] == 0
    assert len(catalog.list_models()) == 2


def test_doctor_on_a_damaged_store(tiny_gguf, other_gguf, capsys, user_dir):
    a = catalog.add_file(tiny_gguf, "gone")
    b = catalog.add_file(other_gguf, "fine")
    c = catalog.add_file(tiny_gguf, "also-gone")
    assert a.path == c.path
    blobs = paths.blobs_dir()
    a.path.unlink()  # a model file deleted by hand
    unused = blobs / f"sha256-{'e' * 64}.gguf"
    unused.write_bytes(b"u" * 5000)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = paths.cache_dir() / "quantize" / f".m-Q8_0.gguf.{dead.pid}.part"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"s" * 3000)
    stranger = blobs / "notes.txt"
    stranger.write_text("mine")

    rc, lines = doctor_cli(capsys)
    assert rc == 1
    text = "\n".join(lines)
    assert re.search(r"missing file +gone:latest: models/blobs/sha256-\w+\.gguf is gone", text)
    assert re.search(r"missing file +also-gone:latest", text)
    assert re.search(rf"unused file +models/blobs/{unused.name} \(5.0 KB\)", text)
    assert re.search(rf"leftover +cache/quantize/{re.escape(stale.name)} \(3.0 KB\): its process \(pid {dead.pid}\) is gone",
                     text)
    assert "unknown file  models/blobs/notes.txt" in text and "[needs you]" in text
    assert lines[-1] == "5 problems left; 'llmdesk doctor --fix' fixes 4 of them"
    assert unused.exists() and stale.exists() and len(catalog.list_models()) == 3  # looking changes nothing

    rc, lines = doctor_cli(capsys, "--fix")
    assert rc == 1 and lines[-1] == "1 problem left"
    assert sum(line.endswith("[fixed]") for line in lines) == 4
    assert not unused.exists() and not stale.exists() and stranger.exists()
    assert [e.ref for e in catalog.list_models()] == ["fine:latest"] and b.path.is_file()

    stranger.unlink()
    rc, lines = doctor_cli(capsys)
    assert rc == 0 and ": 1 model, 1 file (" in lines[0] and lines[1:] == ["no problems found"]
    assert doctor.check().healthy


def test_doctor_wrong_size_removes_the_entry_and_the_damaged_file(tiny_gguf, capsys, tmp_path, user_dir):
    own = tmp_path / "cut.gguf"  # a copy: the blob is a hard link to it, and is about to be damaged
    own.write_bytes(tiny_gguf.read_bytes())
    e = catalog.add_file(own, "cut")
    os.truncate(e.path, 1000)  # cut short (a full disk, a bad copy)
    rc, lines = doctor_cli(capsys)
    assert rc == 1 and re.search(r"wrong size +cut:latest \(1.0 KB\): .* has 1000 bytes, not \d+", "\n".join(lines))
    assert doctor_cli(capsys, "--fix")[0] == 0
    assert catalog.list_models() == [] and not e.path.exists()


def test_doctor_on_a_damaged_database_touches_no_model_file(tiny_gguf, capsys, user_dir):
    e = catalog.add_file(tiny_gguf, "tiny")
    db_file = paths.db_path()
    for extra in ("-wal", "-shm"):
        Path(str(db_file) + extra).unlink(missing_ok=True)
    db_file.write_bytes(b"this is not a database at all " * 200)
    for args in ((), ("--fix",)):
        rc, lines = doctor_cli(capsys, *args)
        text = "\n".join(lines)
        assert rc == 1 and "database damaged" in lines[0]
        assert "database  llmdesk.db:" in text and "[needs you]" in text and "move it away" in text
        assert "unused file" not in text  # with no catalog to go by, no model file is called unused
        assert e.path.is_file()


def test_doctor_sees_a_corrupt_page(tiny_gguf, other_gguf, capsys, user_dir):
    for i in range(40):
        catalog.add_file(tiny_gguf if i % 2 else other_gguf, f"m{i}")
    c = sqlite3.connect(paths.db_path())
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page_size = c.execute("PRAGMA page_size").fetchone()[0]
    root = c.execute("SELECT rootpage FROM sqlite_master WHERE name = 'models_sha256'").fetchone()[0]
    c.close()
    with open(paths.db_path(), "r+b") as f:  # scribble over the index's page
        f.seek((root - 1) * page_size + 8)
        f.write(os.urandom(page_size - 8))
    report = doctor.check(fix=True)
    assert not report.healthy and report.problems[0].kind == "database"
    assert all(p.kind != "unused file" for p in report.problems)
    assert len(list(paths.blobs_dir().glob("sha256-*.gguf"))) == 2


def test_doctor_as_a_real_command(tiny_gguf, user_dir):
    catalog.add_file(tiny_gguf, "tiny").path.unlink()
    p = subprocess.run([*COMMAND, "doctor"], capture_output=True, text=True, env=dict(os.environ), timeout=120)
    assert p.returncode == 1 and "missing file" in p.stdout and p.stderr == ""
    p = subprocess.run([*COMMAND, "doctor", "--fix"], capture_output=True, text=True, env=dict(os.environ), timeout=120)
    assert p.returncode == 0 and p.stdout.strip().endswith("fixed 1 problem")


# ---------------------------------------------------------------------------------------------
# messages for remote clients: no paths of this machine


@pytest.mark.parametrize(
    "text, expected",
    [
        ("/home/alice/models/tiny.gguf: no such file (check the path)", "tiny.gguf: no such file (check the path)"),
        ("/home/alice/My Models/tiny.gguf: cannot open the file", "tiny.gguf: cannot open the file"),
        ("cannot open '/srv/models/x.gguf' (Permission denied)", "cannot open 'x.gguf' (Permission denied)"),
        ('cannot load "/srv/a b/x.gguf"', 'cannot load "x.gguf"'),
        ("failed: C:\\Users\\bob\\models\\m.gguf is corrupt", "failed: m.gguf is corrupt"),
        ("from \\\\fileserver\\share\\m.gguf", "from m.gguf"),
        ("~/models/x.gguf is a directory", "x.gguf is a directory"),
        ("path=/opt/llm/m.gguf, ok", "path=m.gguf, ok"),
        ("cannot reach https://hf-mirror.example/acme/m to pull hf:acme/m/m.gguf@refs/pr/1 (HTTP 404)",
         "cannot reach https://hf-mirror.example/acme/m to pull hf:acme/m/m.gguf@refs/pr/1 (HTTP 404)"),
        ("model 'tiny:f32' not found; 3/4 of the layers fit", "model 'tiny:f32' not found; 3/4 of the layers fit"),
        ("tensor 'blk.0.attn_q.weight' has shape [64, 64]", "tensor 'blk.0.attn_q.weight' has shape [64, 64]"),
    ],
)
def test_redact(text, expected):
    assert paths.redact(text) == expected


def test_redact_shows_store_places(user_dir, monkeypatch, tmp_path):
    blob = user_dir / "models" / "blobs" / f"sha256-{'a' * 64}.gguf"
    assert paths.redact(f"the file of model 'x:y' is missing ({blob}); run 'llmdesk rm x:y'") == \
        f"the file of model 'x:y' is missing ($LLMDESK_HOME/models/blobs/{blob.name}); run 'llmdesk rm x:y'"
    monkeypatch.setenv("HOME", str(tmp_path))  # the store under the user's home: shown as ~/...
    assert paths.redact(f"not found in the store ({paths.display(user_dir)}); run 'llmdesk list'") == \
        "not found in the store ($LLMDESK_HOME); run 'llmdesk list'"
    sibling = Path(str(user_dir) + "-old") / "m.gguf"  # a prefix of the home, not inside it
    assert paths.redact(f"{sibling}: bad") == "m.gguf: bad"


def no_paths(text: str, *roots: Path) -> None:
    assert not any(str(r) in text for r in roots), text
    assert not re.search(r"(^|[\s'\"(=])(/|~/|[A-Za-z]:\\)", text), text


def test_library_errors_a_request_can_cause_are_redacted(tiny_gguf, tmp_path, user_dir, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    e = catalog.add_file(tiny_gguf, "tiny")
    bad = tmp_path / "secret folder" / "bad.gguf"
    bad.parent.mkdir()
    bad.write_bytes(tiny_gguf.read_bytes()[:3000])
    errors = []
    e.path.unlink()
    for call in (
        lambda: refs.resolve("tiny"),  # the entry's file is missing
        lambda: refs.resolve("nope"),  # not in the store
        lambda: refs.resolve(str(tmp_path / "missing.gguf")),
        lambda: read_gguf(tmp_path / "missing.gguf"),
        lambda: read_gguf(bad),
        lambda: read_gguf(tmp_path),
        lambda: catalog.add_file(bad, "bad"),
        lambda: catalog.remove("nope"),
        lambda: pull.pull("hf:acme/m/m.gguf@../../x"),
    ):
        with pytest.raises((LlmdeskError, ModelNotFound, BadModelFile)) as ei:
            call()
        errors.append(str(ei.value))
    assert any(str(tmp_path) in m or "~/" in m for m in errors)  # the raw messages do carry paths
    for m in errors:
        shown = paths.redact(m)
        no_paths(shown, tmp_path, user_dir)
        assert "\n" not in shown
    shown = [paths.redact(m) for m in errors]
    assert f"$LLMDESK_HOME/models/blobs/{e.path.name}" in shown[0]
    assert shown[3].startswith("missing.gguf: no such file") and "bad.gguf" in shown[4]
