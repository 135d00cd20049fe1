"""The layers every request passes, outermost first (plain ASGI, so streamed answers and the
client's disconnect pass straight through):

    AccessLog   one log line and the HTTP metrics per request, whatever answered it
    LocalHost   on 127.0.0.1, only requests with a local Host header (no DNS rebinding)
    CORS        only with --cors-origin (Starlette's CORSMiddleware), so preflights need no key
    Auth        `Authorization: Bearer KEY` on every route but /health and the web chat's files
    BodyLimit   413 for a body over --max-body, before or while it is read
"""

from __future__ import annotations

import hmac
import json
import logging
import time

from fastapi import HTTPException

from .metrics import Metrics

access_log = logging.getLogger("llmdesk.access")

# The web chat's static files carry no data; the page asks for the key and sends it with every
# API call. /health tells a load balancer the process is up, nothing more.
PUBLIC_PATHS = {"/health", "/", "/index.html", "/favicon.ico", "/favicon.svg"}
PUBLIC_PREFIXES = ("/static/",)


def _is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


async def _send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


def _error(path: str, status: int, message: str, kind: str, code: str) -> dict:
    if path.startswith("/api/"):
        return {"error": message}
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class LocalHostHeaderMiddleware:
    """For a server on 127.0.0.1: answer only requests addressed to a local name. A web page whose
    domain is re-pointed at 127.0.0.1 (DNS rebinding) would send its own name in `Host`."""

    ALLOWED = {"127.0.0.1", "localhost", "::1"}

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = ""
        for k, v in scope["headers"]:
            if k == b"host":
                host = v.decode("latin-1").strip().lower()
                break
        name = host[1:].split("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        if name in self.ALLOWED:
            return await self.app(scope, receive, send)
        await _send_json(send, 403, _error(scope["path"], 403, f"this server answers only requests to 127.0.0.1 or "
                                           f"localhost, not {host[:100]!r}; serve with --host to use another name",
                                           "permission_error", "bad_host"))


class AuthMiddleware:
    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or _is_public(scope["path"]):
            return await self.app(scope, receive, send)
        given = b""
        for k, v in scope["headers"]:
            if k == b"authorization":
                given = v
                break
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        why = "a valid API key is required" if given else "an API key is required"
        await _send_json(send, 401, _error(scope["path"], 401, f"{why}: send 'Authorization: Bearer KEY'",
                                           "authentication_error", "invalid_api_key"),
                         [(b"www-authenticate", b"Bearer")])


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return f"the request body is larger than this server's limit of {self.max_bytes} bytes (--max-body)"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope["headers"]:
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    return await _send_json(send, 400, _error(scope["path"], 400, "bad Content-Length header",
                                                              "invalid_request_error", "bad_request"))
                if declared > self.max_bytes:
                    return await _send_json(send, 413, _error(scope["path"], 413, self._message(),
                                                              "invalid_request_error", "body_too_large"),
                                            [(b"connection", b"close")])
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # chunked, or longer than it said
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited, send)


class AccessLogMiddleware:
    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500
        size = 0

        async def counted(message):
            nonlocal status, size
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                size += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            seconds = time.perf_counter() - t0
            route = scope.get("route")
            route_path = getattr(route, "path", None) or ("/static" if scope["path"].startswith("/static/") else "other")
            self.metrics.inc("llmdesk_http_requests_total", method=scope["method"], route=route_path, status=str(status))
            self.metrics.observe("llmdesk_http_request_duration_seconds", seconds, route=route_path)
            client = scope.get("client")
            who = f"{client[0]}:{client[1]}" if client else "-"
            facts = " ".join(f"{k}={v}" for k, v in scope.get("llmdesk.log", {}).items())
            access_log.info('%s "%s %s HTTP/%s" %d %dB %.1fms%s', who, scope["method"], scope["path"],
                            scope.get("http_version", "1.1"), status, size, seconds * 1000,
                            " " + facts if facts else "")
