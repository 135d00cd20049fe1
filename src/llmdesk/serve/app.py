"""The FastAPI application behind `llmdesk serve`.

    app = create_app(ServeConfig(models=["tiny.gguf"], parallel=4))
    server.run(app, host="127.0.0.1", port=8080)   # serve/server.py: uvicorn with connection limits

    with BackgroundServer(app) as server:      # a real server on a free port, in a thread
        print(server.url)                       # for tests, notebooks and benchmarks

Routes: the OpenAI API (openai.py), the Ollama API (ollama.py), document collections
(documents.py), prompt templates (prompts.py), the MCP servers of --mcp (agent.py), and here the operations ones:
`/health` (no key needed), `/metrics` (Prometheus), `/slots` (what each model's slots hold),
and the web chat's static files at `/`.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.middleware.cors import CORSMiddleware

from .. import __version__
from ..errors import LlmdeskError
from ..formats.gguf import GGUFInfo, read_gguf
from . import errors
from .config import ServeConfig
from .metrics import CONTENT_TYPE, server_metrics
from .middleware import AccessLogMiddleware, AuthMiddleware, BodyLimitMiddleware, LocalHostHeaderMiddleware
from ..store.refs import ModelRef
from .models import ModelManager
from .server import BackgroundServer  # noqa: F401 (it lived here; `from llmdesk.serve.app import BackgroundServer` still works)

log = logging.getLogger("llmdesk.serve")
WEB = Path(__file__).parent / "web"

# the web chat runs only its own files: no inline script, no other origin
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class ServerState:
    """What the routes share: `request.app.state.llmdesk`."""

    def __init__(self, config: ServeConfig, models: ModelManager, metrics):
        self.config = config
        self.models = models
        self.metrics = metrics
        self.started = time.time()
        self._infos: dict[tuple[str, float], GGUFInfo] = {}

    def gguf_info(self, src: ModelRef) -> GGUFInfo | None:
        lm = self.models.loaded.get(src.name)
        if lm is not None:
            return lm.info
        try:
            key = (str(src.path), src.path.stat().st_mtime)
            if key not in self._infos:
                self._infos[key] = read_gguf(src.path)
            return self._infos[key]
        except (OSError, LlmdeskError):
            return None


def create_app(config: ServeConfig) -> FastAPI:
    """The app for `config`. Resolves the -m models now and, with `config.preload`, loads the
    default one (so a model that cannot load stops the server before it listens)."""
    config.check()
    metrics = server_metrics()
    manager = ModelManager(config, metrics)
    if config.models:
        for ref in config.models:
            manager.add_startup_model(ref)
        manager.check_lora()
    if config.preload and manager.default is not None:
        manager.preload(manager.default)
    mcp_tools = None
    if config.mcp_servers:  # started once; one line in the log for each that cannot start
        from .agent import ServerTools

        mcp_tools = ServerTools(config.mcp_servers, allow=config.allow_tools, yes=config.allow_all_tools)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        manager.start()
        try:
            yield
        finally:
            try:
                await manager.close()
            finally:
                if mcp_tools is not None:
                    mcp_tools.close()

    app = FastAPI(title="llmdesk", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.llmdesk = ServerState(config, manager, metrics)
    app.state.mcp_tools = mcp_tools
    errors.install(app)

    from . import ollama, openai

    app.include_router(openai.router)
    app.include_router(ollama.router)
    from . import arena  # the web chat's Arena mode: battles between two anonymous models
    app.include_router(arena.router)
    from . import agent, documents, prompts  # collections of documents, prompt templates by name, MCP tools
    app.include_router(documents.router)
    app.include_router(prompts.router)
    app.include_router(agent.router)
    # same routes without the /v1 prefix, as llama.cpp's server and vLLM also answer them
    for path, endpoint in (("/chat/completions", openai.chat_completions), ("/completions", openai.completions),
                           ("/embeddings", openai.embeddings)):
        app.add_api_route(path, endpoint, methods=["POST"], include_in_schema=False)
    app.add_api_route("/models", openai.list_models, methods=["GET"], include_in_schema=False)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus(request: Request):
        gauges = [("llmdesk_models_loaded", "Models loaded now.", {}, len(manager.loaded)),
                  ("llmdesk_uptime_seconds", "Seconds since the server started.", {}, time.time() - app.state.llmdesk.started)]
        for lm in list(manager.loaded.values()):
            eng = lm.model.engine
            labels = {"model": lm.name}
            gauges += [("llmdesk_slots_total", "Slots (requests decoded together) per loaded model.", labels, eng.n_slots),
                       ("llmdesk_slots_busy", "Slots holding a request now.", labels, eng.busy_slots),
                       ("llmdesk_queue_depth", "Requests waiting for a slot.", labels, len(eng.waiting)),
                       ("llmdesk_model_memory_bytes", "Estimated memory of a loaded model.", labels, lm.estimate.total)]
        return PlainTextResponse(metrics.render(gauges), media_type=CONTENT_TYPE)

    @app.get("/slots")
    async def slots(request: Request):
        out = []
        for lm in list(manager.loaded.values()):
            eng = lm.model.engine
            names = {id(a): n for n, (a, _) in lm.model.named.items()}  # the --lora names
            states = []
            for s in eng.slots:
                stream = s.stream
                if s.task is not None:
                    state = "scoring"
                else:
                    state = "idle" if stream is None else ("prompt" if s.todo or not stream.result.n_gen else "generating")
                states.append({"id": s.seq, "state": state, "cached_tokens": len(s.cache),
                               "generated_tokens": stream.result.n_gen if stream is not None else 0,
                               "adapters": [names.get(id(a), a.path.name) for a, _ in s.lora]})
            exp = lm.expires_wall()
            out.append({"model": lm.name, "n_ctx": lm.n_ctx, "n_slots": eng.n_slots, "busy": eng.busy_slots,
                        "waiting": len(eng.waiting), "active_requests": lm.active, "in_flight": lm.gate.inflight,
                        "expires_at": exp, "slots": states})
        return {"models": out, "default": manager.default.name if manager.default else None}

    @app.get("/", include_in_schema=False)
    @app.get("/index.html", include_in_schema=False)
    async def index():
        return FileResponse(WEB / "index.html", headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache",
                                                         "X-Content-Type-Options": "nosniff"})

    @app.get("/favicon.ico", include_in_schema=False)
    @app.get("/favicon.svg", include_in_schema=False)
    async def favicon():
        return FileResponse(WEB / "favicon.svg", media_type="image/svg+xml")

    app.mount("/static", StaticFiles(directory=WEB), name="static")

    # outermost last: AccessLog(LocalHost(CORS(Auth(BodyLimit(app)))))
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    if config.api_key:
        app.add_middleware(AuthMiddleware, api_key=config.api_key)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["authorization", "content-type"], max_age=600)
    if config.is_local:
        app.add_middleware(LocalHostHeaderMiddleware)
    app.add_middleware(AccessLogMiddleware, metrics=metrics)
    return app
