"""Connection hygiene (serve/server.py), against real servers on 127.0.0.1 with raw sockets:
slowly sent headers and bodies are cut off, connections are capped, failed accepts are logged
quietly, and SIGTERM stops `llmdesk serve` within seconds with its streams ended by an error,
while a normal client sent at the same time gets its answer."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time

import httpx
import openai
import pytest
from conftest import llmdesk_exe
from test_serve_util import LONG, wait_until

from llmdesk.errors import LlmdeskError
from llmdesk.formats.synth import SynthConfig, write_llama_gguf
from llmdesk.serve import BackgroundServer, ServeConfig, create_app

GUARD = 20.0  # seconds: a socket or process still open after this is hung; not a speed threshold
INTERVAL = 0.5  # seconds between two summary lines of the servers here
HI = [{"role": "user", "content": "Hello"}]
HEAD = b"Host: 127.0.0.1\r\nContent-Type: application/json\r\n"
BODY = json.dumps({"model": "tiny.gguf", "messages": HI, "max_tokens": 2}).encode()


class Captured(logging.Handler):
    """Warnings and errors of llmdesk, uvicorn and asyncio while a test runs."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def lines(self, name: str) -> list[str]:
        return [r.getMessage() for r in self.records if r.name.startswith(name)]

    def summaries(self) -> list[logging.LogRecord]:
        return [r for r in self.records if r.name == "llmdesk.serve" and r.getMessage().startswith("connections")]

    def count(self, what: str) -> int:
        """The connections the summary lines say were `what`."""
        return sum(int(n) for r in self.summaries() for n in re.findall(rf"(\d+) {what}", r.getMessage()))

    def assert_quiet(self, interval: float = INTERVAL):
        """No tracebacks, nothing from uvicorn, and at most one summary line per interval."""
        times = [r.created for r in self.summaries()]
        assert all(b - a >= interval * 0.9 for a, b in zip(times, times[1:])), [r.getMessage() for r in self.summaries()]
        noisy = [r for r in self.records if r.exc_info or "Traceback" in r.getMessage()]
        assert not noisy, [r.getMessage() for r in noisy]
        uvicorn_lines = self.lines("uvicorn")
        assert not uvicorn_lines, uvicorn_lines


def serve(model, **settings):
    """A server with small timeouts, so the cases take seconds, and its captured log."""
    settings = {"header_timeout": 2.0, "body_timeout": 2.0, "max_connections": 1000, **settings}
    app = create_app(ServeConfig(models=[str(model)], parallel=2, threads=1, **settings))
    server = BackgroundServer(app, log_interval=INTERVAL)
    log = Captured()  # after BackgroundServer: uvicorn's config resets its loggers' handlers
    for name in ("llmdesk", "uvicorn", "asyncio"):
        logging.getLogger(name).addHandler(log)
    server.start()
    return server, log


def stop(server, log):
    server.stop()
    for name in ("llmdesk", "uvicorn", "asyncio"):
        logging.getLogger(name).removeHandler(log)


def connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=GUARD)


def read_to_end(sock: socket.socket) -> bytes:
    """What the server sends until it closes; AssertionError if it is still open after GUARD."""
    out = b""
    sock.settimeout(GUARD)
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open for {GUARD} s; it sent {out[:200]!r}") from None
    except ConnectionResetError:
        pass
    return out


def normal_answer(server) -> None:
    """A chat completion by the official client, on its own connection, with no retries."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=GUARD)
    r = client.chat.completions.create(model="tiny.gguf", messages=HI, max_tokens=3)
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens >= 1
    client.close()


def open_connections(server) -> int:
    return server.server.server_state.open_connections()


def server_descriptors(port: int) -> int:
    """This process's open sockets whose local port is `port`: the server's side of its
    connections (and its listening socket). Read from /proc: Linux only."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                cols = line.split()
                if int(cols[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(cols[9])
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += target.startswith("socket:[") and target[8:-1] in inodes
    return count


def accept_queue(port: int) -> int:
    """Connections the kernel has completed for the listening socket on `port` that the server
    has not accepted yet (the listening row's rx_queue in /proc/net/tcp). Linux only."""
    waiting = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                cols = line.split()
                if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "0A":  # LISTEN
                    waiting += int(cols[4].split(":")[1], 16)
    return waiting


def trickle(sock: socket.socket, data: bytes, every: float, stop: threading.Event) -> None:
    """Send `data` one byte every `every` seconds until the server closes or `stop` is set."""
    for i in range(len(data)):
        if stop.wait(every):
            return
        try:
            sock.send(data[i:i + 1])
        except OSError:  # cut off
            return


# ---------------------------------------------------------------------------------------------
# slowly sent headers

HEALTH = b"GET /health HTTP/1.1\r\n" + HEAD
SLOW_HEADERS = {  # (a whole request first, sent at once; then the headers sent one byte every 0.3 s)
    # a request that would never end
    "one_byte_at_a_time": (b"", HEALTH + b"X-Padding: " + b"a" * 1000),
    # a start, then nothing
    "never_finished": (b"", b"POST /v1/chat/completions HTTP/1.1\r\n" + HEAD + b"Content-Len"),
    # connects, sends nothing
    "idle": (b"", b""),
    # a request answered, then the next one's headers trickled on the kept-alive connection
    "after_keep_alive": (HEALTH + b"\r\n", HEALTH + b"X-Padding: " + b"a" * 1000),
}


@pytest.mark.parametrize("case", SLOW_HEADERS)
def test_slow_headers_are_cut_off_while_others_are_answered(tiny_gguf, case):
    first, slow = SLOW_HEADERS[case]
    server, log = serve(tiny_gguf)
    n = 20
    stop_sending = threading.Event()
    try:
        socks = [connect(server) for _ in range(n)]
        senders = []
        for s in socks:
            if first:
                s.sendall(first)
            if case == "never_finished":
                s.sendall(slow)
            elif slow:
                senders.append(threading.Thread(target=trickle, args=(s, slow, 0.3, stop_sending), daemon=True))
                senders[-1].start()
        wait_until(lambda: open_connections(server) >= n, timeout=GUARD)
        normal_answer(server)  # while all n are held open
        got = [read_to_end(s) for s in socks]
        for answer in got:
            if first:  # the whole first request was answered
                assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
                answer = answer[answer.index(b'{"status":"ok"}') + len(b'{"status":"ok"}'):]
            if case == "idle":
                assert answer == b""  # nothing was asked: no answer, just closed
            else:
                assert answer.startswith(b"HTTP/1.1 408 Request Timeout"), answer[:100]
                assert b"--header-timeout" in answer
        wait_until(lambda: open_connections(server) == 0, timeout=GUARD)
        normal_answer(server)
        wait_until(lambda: log.count("closed waiting for request headers") == n)
        assert len(log.summaries()) < n / 4  # a line per interval, not per connection
        log.assert_quiet()
    finally:
        stop_sending.set()
        stop(server, log)


# ---------------------------------------------------------------------------------------------
# slowly sent bodies

POST = b"POST /v1/chat/completions HTTP/1.1\r\n" + HEAD
SLOW_BODIES = {
    # says 1000 bytes, sends a few
    "shorter_than_said": (POST + b"Content-Length: 1000\r\n\r\n" + BODY[:10], b""),
    # a chunked body whose last chunk never comes
    "chunked_never_finished": (POST + b"Transfer-Encoding: chunked\r\n\r\n" + b"a\r\n" + BODY[:10] + b"\r\n", b""),
    # one byte every 0.3 s: far below the 500 bytes/s that buy more time
    "one_byte_at_a_time": (POST + b"Content-Length: %d\r\n\r\n" % (len(BODY) * 20), BODY * 20),
}


@pytest.mark.parametrize("case", SLOW_BODIES)
def test_slow_bodies_are_cut_off_while_others_are_answered(tiny_gguf, case):
    first, slow = SLOW_BODIES[case]
    server, log = serve(tiny_gguf)
    n = 10
    stop_sending = threading.Event()
    try:
        socks = [connect(server) for _ in range(n)]
        for s in socks:
            s.sendall(first)
            if slow:
                threading.Thread(target=trickle, args=(s, slow, 0.3, stop_sending), daemon=True).start()
        wait_until(lambda: open_connections(server) >= n, timeout=GUARD)
        normal_answer(server)
        for s in socks:
            answer = read_to_end(s)
            assert answer.startswith(b"HTTP/1.1 408 Request Timeout") and b"--body-timeout" in answer, answer[:100]
        wait_until(lambda: open_connections(server) == 0, timeout=GUARD)
        normal_answer(server)
        wait_until(lambda: log.count("closed waiting for a request body") == n)
        log.assert_quiet()
    finally:
        stop_sending.set()
        stop(server, log)


def test_a_body_sent_in_pieces_in_time_is_answered(tiny_gguf):
    server, log = serve(tiny_gguf)
    try:
        s = connect(server)
        s.sendall(POST + b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY[:20])
        time.sleep(0.5)  # well inside --body-timeout 2
        s.sendall(BODY[20:])
        s.settimeout(GUARD)
        answer = s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        s.close()
        log.assert_quiet()
    finally:
        stop(server, log)


# ---------------------------------------------------------------------------------------------
# the cap on connections


def test_hundreds_of_idle_connections_stay_under_the_cap(tiny_gguf):
    """300 idle connections, in waves of 50, against --max-connections 50: the server holds at
    most 50, and its descriptors pass that only by the wave it is accepting for a moment."""
    cap, wave = 50, 50
    server, log = serve(tiny_gguf, max_connections=cap, header_timeout=3.0)
    highest = [0, 0]  # connections held open, and the server's socket descriptors
    done = threading.Event()

    def watch():
        while not done.is_set():
            highest[0] = max(highest[0], open_connections(server))
            highest[1] = max(highest[1], server_descriptors(server.port))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        socks = []
        for _ in range(300 // wave):
            socks += [connect(server) for _ in range(wave)]
            # the whole wave accepted (a client's connect returns before the server accepts), and
            # the descriptors back under the cap (+ the listening socket)
            wait_until(lambda: accept_queue(server.port) == 0 and server_descriptors(server.port) <= cap + 1,
                       timeout=GUARD)
        assert open_connections(server) == cap
        normal_answer(server)  # takes the place of the longest-waiting idle one
        for s in socks:
            assert read_to_end(s) == b""  # closed, either to make room or at --header-timeout
        normal_answer(server)
        done.set()
        watcher.join()
        assert highest[0] == cap  # the cap was reached and never passed
        assert highest[1] <= cap + wave + 2  # + the listening socket and the normal client's
        wait_until(lambda: log.count("idle closed to make room") + log.count("closed waiting for request headers") >= 300)
        log.assert_quiet()
    finally:
        done.set()
        stop(server, log)


def test_at_the_cap_busy_connections_are_kept_and_a_new_one_gets_503(tiny_gguf):
    server, log = serve(tiny_gguf, max_connections=3, body_timeout=60.0)
    try:
        busy = [connect(server) for _ in range(2)]
        for s in busy:  # each in the middle of sending a body: not idle, not to be closed
            s.sendall(POST + b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY[:10])
        idle = connect(server)
        wait_until(lambda: open_connections(server) == 3, timeout=GUARD)
        normal_answer(server)  # the idle one made room
        assert read_to_end(idle) == b""
        # the answered connection is closed by the client; until the server sees it go it still
        # counts, and the third would be refused in its place
        wait_until(lambda: open_connections(server) == 2, timeout=GUARD)
        third = connect(server)
        third.sendall(POST + b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY[:10])
        wait_until(lambda: open_connections(server) == 3, timeout=GUARD)
        # and the server has read the third one's request start: no connection is idle now
        wait_until(lambda: not server.server.server_state.idle, timeout=GUARD)
        refused = connect(server)  # all three hold a request now
        answer = read_to_end(refused)
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable") and b"retry-after: 1" in answer, answer
        assert b"--max-connections" in answer
        for s in busy:  # the busy ones were kept: they finish their requests and are answered
            s.sendall(BODY[10:])
            s.settimeout(GUARD)
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
            s.close()
        third.close()
        normal_answer(server)
        wait_until(lambda: log.count("refused with 503") == 1)
        log.assert_quiet()
    finally:
        stop(server, log)


# ---------------------------------------------------------------------------------------------
# failed accepts: out of file descriptors


def test_failed_accepts_are_counted_in_one_line_and_the_server_recovers(tiny_gguf):
    """The process's file limit is lowered so only a few more can open; 30 clients connect. The
    server's accepts fail (asyncio retries each second), and the log says so in a line or two."""
    import resource

    server, log = serve(tiny_gguf, header_timeout=1.0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    clients = [socket.socket() for _ in range(30)]  # their descriptors exist before the limit drops
    try:
        used = {int(fd) for fd in os.listdir("/proc/self/fd")}
        room, limit = 0, 0
        while room < 3:  # the limit under which exactly 3 descriptor numbers are free
            room += limit not in used
            limit += 1
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        try:
            for c in clients:
                c.settimeout(GUARD)
                c.connect(("127.0.0.1", server.port))
            wait_until(lambda: any("failed accepts" in line for line in log.lines("llmdesk.serve")), timeout=GUARD)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for c in clients:  # each is accepted once there is room again, and cut off at --header-timeout
            assert read_to_end(c) == b""
        normal_answer(server)
        assert log.count("failed accepts") >= 1
        assert "Too many open files" in [line for line in log.lines("llmdesk.serve") if "failed accepts" in line][0]
        log.assert_quiet()
    finally:
        for c in clients:
            c.close()
        stop(server, log)


# ---------------------------------------------------------------------------------------------
# settings, and stopping


@pytest.fixture(scope="module")
def long_gguf(tmp_path_factory):
    """The tiny model with a 32k context: a stream of it is still generating whatever the
    machine's speed when the test stops the server."""
    return write_llama_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf", SynthConfig(n_ctx_train=32768))


def test_limits_are_checked():
    for field, value, flag in (("header_timeout", 0, "--header-timeout"), ("body_timeout", float("nan"), "--body-timeout"),
                               ("max_connections", 0, "--max-connections")):
        with pytest.raises(LlmdeskError, match=flag) as e:
            ServeConfig(**{field: value}).check()
        assert "\n" not in str(e.value)


def test_stopping_ends_open_streams_with_an_error(long_gguf):
    server, log = serve(long_gguf, ctx=32768)
    events: list[str] = []

    def stream():
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=GUARD,
                          json={"model": "tiny.gguf", "messages": HI, "stream": True, **LONG}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])

    readers = [threading.Thread(target=stream, daemon=True) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        wait_until(lambda: len(events) >= 20, timeout=GUARD)
    finally:
        stop(server, log)
    assert not server.thread.is_alive()  # stopped (stop() waits a bounded time for it)
    for t in readers:
        t.join(GUARD)
        assert not t.is_alive()
    errors = [json.loads(e)["error"]["message"] for e in events if e.startswith('{"error"')]
    assert len(errors) == 2 and all("shutting down" in m for m in errors), events[-3:]
    assert "[DONE]" not in events
    log.assert_quiet()


def test_sigterm_stops_llmdesk_serve_within_seconds(long_gguf, tmp_path):
    """`llmdesk serve` as a user runs it, with the new options; a stream is open when SIGTERM comes."""
    model = long_gguf
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([llmdesk_exe(), "serve", "-m", str(model), "--port", str(port),
                             "--parallel", "2", "--ctx", "32768", "--threads", "1", "--header-timeout", "1",
                             "--body-timeout", "5", "--max-connections", "64"],
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            env={**os.environ, "LLMDESK_HOME": str(tmp_path / "home")})
    stderr: list[str] = []
    threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True).start()
    events: list[str] = []
    try:
        wait_until(lambda: "Ctrl-C to stop" in "".join(stderr) or proc.poll() is not None, timeout=60)
        assert proc.poll() is None, "".join(stderr)
        idle = socket.create_connection(("127.0.0.1", port))
        assert read_to_end(idle) == b""  # --header-timeout 1 reached the server

        def stream():
            with httpx.stream("POST", url + "/v1/chat/completions", timeout=GUARD,
                              json={"model": "tiny.gguf", "messages": HI, "stream": True, **LONG}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        wait_until(lambda: len(events) >= 20, timeout=GUARD)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=GUARD)
        reader.join(GUARD)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, -signal.SIGTERM)
    errors = [json.loads(e)["error"]["message"] for e in events if e.startswith('{"error"')]
    assert errors and "shutting down" in errors[0] and "[DONE]" not in events, events[-3:]
    text = "".join(stderr)
    assert "Traceback" not in text and "ERROR" not in text, text
