"""Shared fixtures. Every test gets its own user directory; nothing touches the network.

No test hides: a skip or an xfail is reported as a failure (a skipped test is most often a
missing install, and `make test` installs everything the tests need), unless the test carries
`@pytest.mark.may_skip(reason="...")` saying why it may not run here. Subprocesses run the
installed `llmdesk` command, found as a shell would find it (`llmdesk_exe()`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from llmdesk.formats.synth import SynthConfig, write_llama_gguf

# ---------------------------------------------------------------------------------------------
# skips are failures


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "may_skip(reason): this test may skip or xfail without failing the run; the reason "
        "says why (e.g. it needs hardware this machine may not have). Every other skip fails.")


def _skip_reason(report) -> str:
    if isinstance(report.longrepr, tuple):  # (path, line, "Skipped: why")
        path, lineno, why = report.longrepr
        return f"{why} (at {path}:{lineno})"
    return str(report.longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    xfail = getattr(report, "wasxfail", None)
    if not report.skipped and xfail is None:
        return report
    mark = item.get_closest_marker("may_skip")
    if mark is not None and mark.kwargs.get("reason"):
        return report
    unexcused = "" if mark is None else " (its may_skip marker gives no reason=...)"
    if xfail is None:
        message = (f"{item.nodeid} did not run{unexcused}: {_skip_reason(report)}. A skipped test hides "
                   f"what it tests, most often a package `make test` should have installed: install it, or "
                   f"mark the test @pytest.mark.may_skip(reason=...) if it truly cannot run here.")
    else:
        del report.wasxfail
        did = "failed" if report.skipped else "passed"
        message = (f"{item.nodeid} is marked xfail ({xfail or 'no reason given'}) and {did}{unexcused}: "
                   f"an expected failure hides a bug or a stale marker; fix the test or the code.")
        if report.skipped and report.longrepr is not None:
            message += "\n\n" + str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = message
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """A module that skips itself while being imported (importorskip, skip(allow_module_level=True))
    is a collection error: its tests would vanish from the count."""
    report = yield
    if report.skipped:
        why = _skip_reason(report)
        report.outcome = "failed"
        report.longrepr = (f"{collector.nodeid} skipped all its tests while being collected: {why}. "
                           f"Install what it needs (`make test` installs the [train,test] extras).")
    return report


# ---------------------------------------------------------------------------------------------
# the installed command


@functools.cache
def sigint_as_a_terminal_sends_it() -> None:
    """preexec_fn for a command a test interrupts: a shell's background jobs (nohup, `make test &`)
    start with SIGINT ignored and Python keeps it so; a user's Ctrl-C reaches a foreground
    process with the default action."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(autouse=True, scope="session")
def ctrl_c_in_the_tests_own_process() -> None:
    """The tests' own process as a terminal runs it: in the background (nohup, `make test &`)
    it starts with SIGINT ignored, and a test that sends itself Ctrl-C (a training run
    interrupted in process) would never see it."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def llmdesk_exe() -> str:
    """The `llmdesk` console script, found as a user's shell finds it: on PATH, with this venv's
    bin directory (where the interpreter running the tests lives) first. Fails the test, saying
    what to do, when it is not installed."""
    bindir = str(Path(sys.executable).parent)  # not resolved: a venv's python is a symlink
    path = os.pathsep.join([bindir, os.environ.get("PATH", "")])
    exe = shutil.which("llmdesk", path=path)
    if exe is None:
        pytest.fail(f"no `llmdesk` command in {bindir} or on PATH: install the project "
                    f"(`make install`, or `pip install -e .`) so its console script exists", pytrace=False)
    return exe


# ---------------------------------------------------------------------------------------------
# a user directory per test, tiny models


@pytest.fixture(autouse=True)
def user_dir(tmp_path, monkeypatch) -> Path:
    """An isolated `LLMDESK_HOME` per test (like simonw/llm's `LLM_USER_PATH`)."""
    home = tmp_path / "llmdesk-home"
    monkeypatch.setenv("LLMDESK_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    """A tiny random-weight Llama model (f32, ~0.5 MB), written once per session. Read only."""
    return write_llama_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf", SynthConfig())


# ---------------------------------------------------------------------------------------------
# A fake Hugging Face Hub on 127.0.0.1: the `/{repo}/resolve/{revision}/{file}` route that
# hf_hub_download uses (HEAD for metadata, GET with Range), with the Hub's error headers.


class FakeHub:
    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self):
        self.files: dict[tuple[str, str], bytes] = {}  # (repo_id, filename) -> content, on "main"
        self.gated: set[str] = set()
        self.requests: list[tuple[str, str]] = []  # (method, path)
        # for hostile-endpoint and interrupted-download tests; the defaults answer like the Hub
        self.any_revision = False  # answer every revision as if it were "main" (as lax mirrors do)
        self.answer_commit: str | None = None  # X-Repo-Commit to send instead of COMMIT
        self.answer_etag: str | None = None  # ETag to send instead of the content's sha256
        self.stall_after: int | None = None  # send this many bytes of a GET, then wait for `release`
        self.release = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def add(self, repo_id: str, filename: str, content: bytes) -> str:
        """Serve `content` as `repo_id/filename`; returns its sha256 (the ETag, as for LFS files)."""
        self.files[(repo_id, filename)] = content
        return hashlib.sha256(content).hexdigest()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _fail(self, status: int, code: str, commit: bool = False):
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                if commit:
                    self.send_header("X-Repo-Commit", hub.COMMIT)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _serve(self, body: bool):
                hub.requests.append((self.command, self.path))
                parts = urllib.parse.urlsplit(self.path).path.split("/")
                # /{owner}/{repo}/resolve/{revision}/{file...}
                if len(parts) < 6 or parts[3] != "resolve":
                    return self._fail(404, "RepoNotFound")
                repo_id = f"{parts[1]}/{parts[2]}"
                revision = urllib.parse.unquote(parts[4])
                filename = urllib.parse.unquote("/".join(parts[5:]))
                if repo_id in hub.gated:
                    return self._fail(401, "GatedRepo")
                if not any(r == repo_id for r, _ in hub.files):
                    return self._fail(401, "RepoNotFound")  # the Hub says 401 for unknown repos
                if revision not in ("main", hub.COMMIT) and not hub.any_revision:
                    return self._fail(404, "RevisionNotFound")
                content = hub.files.get((repo_id, filename))
                if content is None:
                    return self._fail(404, "EntryNotFound", commit=True)
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes=") and body:
                    start = int(rng[len("bytes="):].split("-")[0])
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", hub.answer_commit or hub.COMMIT)
                self.send_header("ETag", f'"{hub.answer_etag or hashlib.sha256(content).hexdigest()}"')
                self.send_header("Content-Length", str(len(content) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
                self.end_headers()
                if body and hub.stall_after is not None:
                    try:
                        self.wfile.write(content[start:start + hub.stall_after])
                        self.wfile.flush()
                        hub.release.wait(120)
                        self.wfile.write(content[start + hub.stall_after:])
                    except OSError:  # the client was killed meanwhile
                        pass
                elif body:
                    self.wfile.write(content[start:])

        return Handler


def point_hf_at(monkeypatch, url: str, tmp_path: Path) -> None:
    """Send every huggingface_hub request to `url`: HF_ENDPOINT for llmdesk and subprocesses,
    and huggingface_hub's import-time constants for this process (its user-agent code fetches
    `{ENDPOINT}/api/agent-harnesses` and caches it under HF_HOME)."""
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hc, "ENDPOINT", url)
    monkeypatch.setattr(hc, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hc, "AGENT_HARNESSES_PATH", str(tmp_path / "hf-home" / "agent-harnesses.json"))


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A FakeHub, with huggingface_hub pointed at it."""
    hub = FakeHub()
    hub.thread.start()
    point_hf_at(monkeypatch, hub.url, tmp_path)
    yield hub
    hub.release.set()
    hub.server.shutdown()
    hub.server.server_close()
