"""uvicorn with the connection limits it lacks: what `llmdesk serve` runs.

    run(app, "127.0.0.1", 8080, header_timeout=10, body_timeout=30, max_connections=1024)

    with BackgroundServer(app) as server:      # the same server in a thread, on a free port
        print(server.url)                       # for tests, notebooks and benchmarks

uvicorn closes idle keep-alive connections, but it waits forever for a request's headers and
body and accepts every connection offered. A few hundred clients sending a byte now and then
hold every file descriptor and the server stops answering, before any API key is checked. Here:

- headers must be complete `header_timeout` s after the connection opens (on a kept-alive
  connection: after the next request's first byte; the idle time between requests is
  uvicorn's `timeout_keep_alive`); else 408 and close (just close if nothing was sent);
- a body gets `body_timeout` s, plus one second per MIN_BODY_RATE bytes received, so a big
  upload on a slow link passes and a stalled or trickled one does not; else 408 and close;
- at most `max_connections` connections, kept below the process's file limit (raised to its
  hard limit at start). At the cap a new connection takes the place of the one that has waited
  longest without sending a request; if every connection holds a request, it gets 503 and is closed;
- cut-off connections, invalid requests and failed accepts (out of file descriptors: the
  longest-idle connection is then closed too) are counted and logged as one summary line at
  most every `log_interval` s, never a line or a traceback per connection;
- on SIGTERM/SIGINT (or `BackgroundServer.stop`) running generations end at once with an error
  (`ModelManager.begin_shutdown`), bodies still arriving are cut off, and uvicorn's graceful
  shutdown gets `shutdown_timeout` s for the rest.

HTTP/1.1 is parsed by h11, always installed with uvicorn: the timers are written against its
states, and its parser bounds a request's headers (16 KiB). httptools parses faster, but parsing
is not where an LLM server spends its time.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, fields

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from .config import ServeConfig

try:
    import resource
except ImportError:  # Windows: no RLIMIT_NOFILE to raise
    resource = None

log = logging.getLogger("llmdesk.serve")

# A body may take one second more per 500 bytes received: Apache's mod_reqtimeout default
# (`body=20,MinRate=500`). An 8 MiB body then has ~4.7 h at 500 B/s: the rate, not the size, is checked.
MIN_BODY_RATE = 500.0
# file descriptors kept for all that is not a client connection: the listening socket, models,
# the database, logs, llama.cpp's and Python's own
FD_RESERVE = 128
ACCEPT_ERROR = "socket.accept() out of system resource"  # asyncio's text (selector_events.py)


@dataclass
class Limits:
    header_timeout: float = ServeConfig.header_timeout
    body_timeout: float = ServeConfig.body_timeout
    max_connections: int = ServeConfig.max_connections
    min_body_rate: float = MIN_BODY_RATE
    log_interval: float = 10.0  # seconds between two summary lines
    shutdown_timeout: float = 3.0  # seconds uvicorn's graceful shutdown waits for requests to end

    @classmethod
    def of(cls, app, **overrides) -> "Limits":
        """The limits of `app`'s ServeConfig (if it has one), with `overrides`."""
        config = getattr(getattr(getattr(app, "state", None), "llmdesk", None), "config", None)
        own = {f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)}
        return cls(**{**own, **overrides})


# ---------------------------------------------------------------------------------------------
# counting what is cut off, logged as one line per interval


class Summary:
    """Counts of connection events, logged together at most once per `interval` seconds. The
    first event of a quiet period is logged at once, the rest of its burst `interval` s later."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.counts: Counter[str] = Counter()
        self.since = 0.0  # when the first event counted now happened
        self.last = float("-inf")  # when the last line was logged
        self.timer: asyncio.TimerHandle | None = None
        self.accept_error = ""
        self.max_connections = limits.max_connections  # as it was applied: lowered to fit the file limit

    def add(self, what: str) -> None:
        if not self.counts:
            self.since = time.monotonic()
        self.counts[what] += 1
        if self.timer is None:
            delay = max(0.0, self.last + self.limits.log_interval - time.monotonic())
            self.timer = asyncio.get_running_loop().call_later(delay, self.flush)

    def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.counts:
            return
        lim = self.limits
        said = {
            "header_timeout": f"closed waiting for request headers (--header-timeout {lim.header_timeout:g} s)",
            "body_timeout": f"closed waiting for a request body (--body-timeout {lim.body_timeout:g} s)",
            "evicted": f"idle closed to make room (--max-connections {self.max_connections})",
            "refused": f"refused with 503, all {self.max_connections} connections busy (--max-connections)",
            "invalid": "invalid HTTP requests answered 400",
            "accept_error": f"failed accepts ({self.accept_error}; the process's file limit: ulimit -n)",
            "shutdown": "requests cancelled at shutdown",
        }
        took = time.monotonic() - self.since
        since = f" in the last {took:.0f} s" if took >= 1 else ""
        log.warning("connections%s: %s", since, ", ".join(f"{n} {said[k]}" for k, n in self.counts.most_common()))
        self.counts.clear()
        self.last = time.monotonic()


class _State(ServerState):
    """uvicorn's state shared by the connections of one server, with the limits and the
    connections that wait for a request (oldest first: the ones given up at the cap)."""

    def __init__(self, limits: Limits, summary: Summary):
        super().__init__()
        self.limits = limits
        self.max_connections = limits.max_connections  # lowered to fit the file limit at start
        self.summary = summary
        self.idle: dict[GuardedH11Protocol, None] = {}
        # closed by us, their descriptor released on the loop's next turn: no longer counted
        self.closing: set[GuardedH11Protocol] = set()
        self.http_408 = {
            "header": _plain(408, "Request Timeout", f"the request's headers did not arrive within "
                             f"{limits.header_timeout:g} s (--header-timeout)"),
            "body": _plain(408, "Request Timeout", f"the request's body did not arrive in time "
                           f"(--body-timeout {limits.body_timeout:g} s)")}
        self.http_503 = _plain(503, "Service Unavailable", "this server is at its connection limit "
                               "(--max-connections); try again shortly", b"retry-after: 1\r\n")
        self.http_503_stopping = _plain(503, "Service Unavailable", "the server is shutting down")

    def make_room(self) -> bool:
        """Close the connection that has waited longest for a request; False if none waits."""
        while self.idle:
            proto = next(iter(self.idle))
            del self.idle[proto]
            if not proto.transport.is_closing():
                proto.transport.close()
                self.closing.add(proto)
                self.summary.add("evicted")
                return True
        return False

    def open_connections(self) -> int:
        return len(self.connections) - len(self.closing)


def _plain(status: int, reason: str, text: str, extra: bytes = b"") -> bytes:
    body = (text + "\n").encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n").encode() + extra + b"\r\n" + body


# ---------------------------------------------------------------------------------------------
# the protocol: uvicorn's h11 connection, with timers on the parts the client sends


class GuardedH11Protocol(H11Protocol):
    """One connection. Between requests one timer always runs: uvicorn's keep-alive timer while
    the connection is idle after a response, the header timer otherwise. While a body arrives
    the body timer runs. While the app works on a request, none: generating takes what it takes."""

    def __init__(self, config, server_state, app_state, _loop=None):
        super().__init__(config, server_state, app_state, _loop)
        if not isinstance(server_state, _State):
            raise TypeError("GuardedH11Protocol runs under llmdesk.serve.server.Server")
        self.guard: _State = server_state
        self.refused = False
        self.header_timer: asyncio.TimerHandle | None = None
        self.body_timer: asyncio.TimerHandle | None = None
        self.body_start = 0.0
        self.body_bytes = 0

    def connection_made(self, transport) -> None:
        guard = self.guard
        if guard.open_connections() >= guard.max_connections and not guard.make_room():
            # every connection holds a request: answer at once and let the file descriptor go
            self.refused = True
            self.transport = transport
            transport.write(guard.http_503)
            transport.close()
            guard.summary.add("refused")
            return
        super().connection_made(transport)
        self._sync()

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        if self.conn.their_state is h11.SEND_BODY:
            self.body_bytes += len(data)
        super().data_received(data)
        self._sync()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._sync()

    def connection_lost(self, exc) -> None:
        if self.refused:
            return  # it never joined the server's connections
        self._cancel_timers()
        self.guard.idle.pop(self, None)
        self.guard.closing.discard(self)
        super().connection_lost(exc)

    def shutdown(self) -> None:
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            # still sending its body: its answer could not be ready in the seconds left
            answered = self.cycle is not None and self.cycle.response_started
            self._cut_off(None if answered else self.guard.http_503_stopping)
        else:
            super().shutdown()

    # -- the timers

    def _sync(self) -> None:
        """Start or stop the timers for the state h11 is in now."""
        if self.transport.is_closing():
            return
        theirs, ours = self.conn.their_state, self.conn.our_state
        if theirs is h11.IDLE and ours is h11.IDLE:  # between requests
            self.guard.idle.setdefault(self, None)
            if self.header_timer is None and self.timeout_keep_alive_task is None:
                self.header_timer = self.loop.call_later(self.guard.limits.header_timeout, self._headers_late)
        else:
            self.guard.idle.pop(self, None)
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None
        if theirs is h11.SEND_BODY:
            if self.body_timer is None:
                self.body_start, self.body_bytes = self.loop.time(), 0
                self.body_timer = self.loop.call_later(self.guard.limits.body_timeout, self._body_late)
        elif self.body_timer is not None:
            self.body_timer.cancel()
            self.body_timer = None

    def _headers_late(self) -> None:
        self.header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        started = bool(self.conn.trailing_data[0])  # part of a request came: it can be told why
        self._cut_off(self.guard.http_408["header"] if started else None)
        self.guard.summary.add("header_timeout")

    def _body_late(self) -> None:
        self.body_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            return
        lim = self.guard.limits
        now = self.loop.time()
        if self.flow.read_paused:  # the app has not taken what came: the wait is ours, not the client's
            self.body_start, self.body_bytes = now, 0
            self.body_timer = self.loop.call_later(lim.body_timeout, self._body_late)
            return
        deadline = self.body_start + lim.body_timeout + self.body_bytes / lim.min_body_rate
        if now < deadline:
            self.body_timer = self.loop.call_later(deadline - now, self._body_late)
            return
        answered = self.cycle is not None and self.cycle.response_started  # e.g. a 401 before the body
        if self.cycle is not None:  # the app may still log this request: say why it ended
            self.cycle.scope.setdefault("llmdesk.log", {})["cut"] = "body_timeout"
        self._cut_off(None if answered else self.guard.http_408["body"])
        self.guard.summary.add("body_timeout")

    def _cut_off(self, answer: bytes | None) -> None:
        """Send `answer` (None: nothing) and close. An app still reading the body reads a
        disconnect, and what it sends after goes nowhere."""
        if answer is not None:
            self.transport.write(answer)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        self._cancel_timers()
        self.guard.closing.add(self)
        # a client that does not read would keep a closing transport (and its fd) waiting to flush
        if self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.close()

    def _cancel_timers(self) -> None:
        for timer in (self.header_timer, self.body_timer):
            if timer is not None:
                timer.cancel()
        self.header_timer = self.body_timer = None


# ---------------------------------------------------------------------------------------------
# the server


class Server(uvicorn.Server):
    """uvicorn's Server with GuardedH11Protocol, quiet accept errors, and a shutdown that ends
    running generations first so it takes seconds, not as long as the longest answer."""

    def __init__(self, config: uvicorn.Config, limits: Limits | None = None):
        if config.loaded:
            raise ValueError("give Server a uvicorn.Config that has not been loaded yet")
        limits = limits or Limits()
        config.http = GuardedH11Protocol
        config.timeout_graceful_shutdown = limits.shutdown_timeout
        super().__init__(config)
        self.limits = limits
        self.summary = Summary(self.limits)
        self.server_state = _State(self.limits, self.summary)
        self.stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._filter = _QuietUvicorn(self)
        self.on_ready: Callable[[], None] | None = None

    async def serve(self, sockets=None) -> None:
        uvicorn_log = logging.getLogger("uvicorn.error")
        uvicorn_log.addFilter(self._filter)
        try:
            await super().serve(sockets)
        finally:
            uvicorn_log.removeFilter(self._filter)
            self.summary.flush()

    async def startup(self, sockets=None) -> None:
        loop = self._loop = asyncio.get_running_loop()
        previous = loop.get_exception_handler()

        def on_loop_error(loop, context):
            message = context.get("message", "")
            if message == ACCEPT_ERROR:
                # asyncio would log a traceback for each, then accept again 1 s later: count it,
                # and give up the longest-idle connection so that there is a descriptor by then
                exc = context.get("exception")
                self.summary.accept_error = getattr(exc, "strerror", None) or str(exc)
                self.summary.add("accept_error")
                self.server_state.make_room()
            elif self.stopping and "_start_serving" in message:
                pass  # one of those retries, due after the listening socket was closed: nothing to do
            elif previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(on_loop_error)
        files = raise_file_limit()
        if files is not None:
            # asyncio accepts up to `backlog` connections per turn of the loop, and those past the
            # cap are closed a turn or two later: descriptors can pass the cap by about two such
            # bursts. Cap, bursts and reserve are sized to fit under the limit, because running
            # out is costly: asyncio (3.11) then tries accept() again up to `backlog` times in
            # that turn, schedules a retry for each failure, and stops accepting for a second.
            self.config.backlog = min(self.config.backlog, max(16, files // 8))
            fit = max(1, files - min(FD_RESERVE, files // 8) - 2 * self.config.backlog)
            if fit < self.limits.max_connections:
                log.warning("--max-connections %d is more than this process's file limit (%d) allows; using %d "
                            "(raise the limit with ulimit -n)", self.limits.max_connections, files, fit)
                self.server_state.max_connections = self.summary.max_connections = fit
        await super().startup(sockets)
        if self.started and self.on_ready is not None:
            self.on_ready()  # listening now: a client told the address can connect

    async def shutdown(self, sockets=None) -> None:
        self.stopping = True
        # before uvicorn stops reading: streams end with an error event now, and the graceful
        # wait below is for answers to finish being written, not generated
        self._end_generations()
        keep_ending = asyncio.get_running_loop().create_task(self._keep_ending())
        try:
            await super().shutdown(sockets)
        finally:
            keep_ending.cancel()

    async def _keep_ending(self) -> None:
        # a request already read but not yet generating (tokenizing, queued for the model) is ended too
        while True:
            await asyncio.sleep(0.2)
            if not self.server_state.tasks:
                return
            self._end_generations()

    def _end_generations(self) -> None:
        state = getattr(getattr(self.config.app, "state", None), "llmdesk", None)
        begin = getattr(getattr(state, "models", None), "begin_shutdown", None)
        if begin is not None:
            begin()


class _QuietUvicorn(logging.Filter):
    """Counts instead of lines for what uvicorn logs once per connection: invalid requests, and
    the traceback of each request still running when the graceful shutdown gives up on it."""

    def __init__(self, server: Server):
        super().__init__()
        self.server = server

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            mine = asyncio.get_running_loop() is self.server._loop  # another server in this process is not mine
        except RuntimeError:
            return True
        if not mine:
            return True
        if record.msg == "Invalid HTTP request received.":
            self.server.summary.add("invalid")
            return False
        exc = record.exc_info[1] if record.exc_info else None
        if self.server.stopping and isinstance(exc, asyncio.CancelledError):
            self.server.summary.add("shutdown")
            return False
        return True


def raise_file_limit() -> int | None:
    """Raise this process's soft limit on open files to its hard limit; the soft limit now."""
    if resource is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= want:
        return None if soft == resource.RLIM_INFINITY else soft
    for target in (want, 10240):  # macOS refuses more than OPEN_MAX (10240) even when hard is unlimited
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):
            continue
    return soft


def uvicorn_config(app, host: str, port: int, limits: Limits, log_level: str = "warning") -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on",
                          ws="none", http=GuardedH11Protocol, timeout_graceful_shutdown=limits.shutdown_timeout)


def run(app, host: str = "127.0.0.1", port: int = 8080, *, log_level: str = "warning",
        on_ready: Callable[[], None] | None = None, **limits) -> None:
    """Serve `app` until SIGINT or SIGTERM. `limits` are Limits' fields; the rest come from the
    app's ServeConfig. `on_ready()` is called once the socket listens. A SIGTERM is raised again
    once the server has stopped, as uvicorn does."""
    lim = Limits.of(app, **limits)
    server = Server(uvicorn_config(app, host, port, lim, log_level), lim)
    server.on_ready = on_ready
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    if not server.started:
        sys.exit(3)  # uvicorn's STARTUP_FAILURE; it has logged why


class BackgroundServer:
    """The server for `app` on 127.0.0.1 (a free port unless given) in a daemon thread."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning", **limits):
        lim = Limits.of(app, **limits)
        self.config = uvicorn_config(app, host, port, lim, log_level)
        self.server = Server(self.config, lim)
        self.thread = threading.Thread(target=self.server.run, name="llmdesk-uvicorn", daemon=True)
        self.host = host
        self.port = port

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server stopped while starting; see the log above")
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not start in time")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
