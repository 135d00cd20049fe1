"""Errors the server answers with, in the shape each API's clients expect.

OpenAI routes answer `{"error": {"message", "type", "param", "code"}}` (the client raises
BadRequestError, NotFoundError, RateLimitError, ... by status); Ollama routes answer
`{"error": "message"}` (the client raises ResponseError with the text).
"""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import BadModelFile, LlmdeskError, ModelNotFound, TemplateError
from ..runtime.engine import ContextOverflow
from ..runtime.limits import InvalidRequest
from ..store.paths import redact

log = logging.getLogger("llmdesk.serve")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
          413: "invalid_request_error", 429: "rate_limit_error", 503: "server_busy_error"}


class APIError(Exception):
    """An answer with an error status. `code` is machine-readable (OpenAI's `code` field)."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None, type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def from_library(e: LlmdeskError) -> APIError:
    """A library error a request caused, as an HTTP error. Remote clients see store names and
    file names, never the machine's paths."""
    message = redact(str(e))
    if isinstance(e, ModelNotFound):
        return APIError(404, message, code="model_not_found")
    if isinstance(e, ContextOverflow):
        return APIError(400, message, code="context_length_exceeded", param=e.param)
    if isinstance(e, BadModelFile):
        return APIError(500, message, code="bad_model_file")
    if isinstance(e, TemplateError):
        return APIError(400, message, code="chat_template_error")
    if isinstance(e, InvalidRequest):
        return APIError(400, message, param=e.param)
    return APIError(400, message)


def is_ollama(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def error_body(request: Request, err: APIError) -> dict:
    if is_ollama(request):
        return {"error": err.message}
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


def error_response(request: Request, err: APIError) -> JSONResponse:
    return JSONResponse(error_body(request, err), status_code=err.status, headers=err.headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "the request body is not valid", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        why = (first.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON{': ' + why if why else ''}", None
    if first.get("type") == "missing":
        return f"'{param}' is required", param
    msg = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return (f"'{param}': {msg}" if param else msg) + more, param


def install(app) -> None:
    """Register the handlers that turn every failure into the caller's API's error shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(request, exc)

    @app.exception_handler(LlmdeskError)
    async def _library_error(request: Request, exc: LlmdeskError):
        return error_response(request, from_library(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        ctype = request.headers.get("content-type", "")
        if "json" not in ctype and any(tuple(e.get("loc", ())) == ("body",) for e in exc.errors()):
            # FastAPI reads JSON only when it is declared: a browser page elsewhere cannot send
            # JSON to this server without a CORS preflight, which is what keeps it from using it
            message, param = "send the request body as JSON, with 'Content-Type: application/json'", None
        return error_response(request, APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        elif exc.status_code == 400 and "parsing the body" in message:
            message = "the request body could not be read as JSON"
        return error_response(request, APIError(exc.status_code, message, headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(request, APIError(500, f"internal server error ({type(exc).__name__}); see the server log",
                                                type="server_error"))
