"""`llmdesk serve`: the OpenAI- and Ollama-compatible server, with a web chat at its root."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import LlmdeskError
from .app import app, err
from .run import GpuLayersOpt


@app.command()
def serve(
    model: Annotated[Optional[list[str]], typer.Option("-m", "--model", help="A model to serve (repeatable; the first is the default): a .gguf path, NAME[:TAG] from 'llmdesk list', or hf:OWNER/REPO/FILE.gguf; BASE+ADAPTER[:SCALE] serves BASE with a LoRA adapter (as 'llmdesk run' takes it), answering as BASE+ADAPTER and, for the first, to requests that name no model. Default: $LLMDESK_MODEL or the bundled demo model. Models in the store are served too, loaded on first use.")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on. Anything but 127.0.0.1/localhost needs --api-key (or --insecure).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8080,
    parallel: Annotated[int, typer.Option("--parallel", help="Requests per model decoded together (slots); each gets its own --ctx tokens.")] = 4,
    ctx: Annotated[Optional[int], typer.Option("--ctx", help="Context length per slot, in tokens (default: the model's, at most 4096).")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads (default: all cores).")] = None,
    gpu_layers: GpuLayersOpt = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="LLMDESK_API_KEY", help="Require 'Authorization: Bearer KEY' on every route but /health (also $LLMDESK_API_KEY).")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Allow another address than 127.0.0.1 without an API key.")] = False,
    keep_alive: Annotated[str, typer.Option("--keep-alive", help="How long a model stays loaded after its last request: 5m, 1h, 30s, 0 (unload at once), -1 (forever).")] = "5m",
    cors_origin: Annotated[Optional[list[str]], typer.Option("--cors-origin", help="Let web pages from ORIGIN call the API (repeatable; '*' for any). Off by default.")] = None,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Requests per model that may wait for a slot; more get 429 with Retry-After.")] = 64,
    max_body: Annotated[str, typer.Option("--max-body", help="Largest request body accepted.")] = "8MiB",
    max_memory: Annotated[Optional[str], typer.Option("--max-memory", help="Memory all loaded models may use together, e.g. 12GB (default: what is free when a model loads).")] = None,
    template: Annotated[Optional[str], typer.Option("--template", help="Chat template for every model: a built-in name (chatml, llama-3, ...) or a .jinja file.")] = None,
    log_prompts: Annotated[bool, typer.Option("--log-prompts", help="Record every prompt and answer in 'llmdesk logs' (off by default for a server).")] = False,
    header_timeout: Annotated[float, typer.Option("--header-timeout", help="Seconds a client has to send a request's headers, from connecting (or from the request's first byte on a kept-alive connection); then 408 and close.")] = 10.0,
    body_timeout: Annotated[float, typer.Option("--body-timeout", help="Seconds a client has to send a request's body, plus one per 500 bytes received; then 408 and close.")] = 30.0,
    request_timeout: Annotated[float, typer.Option("--request-timeout", help="Seconds one request may take, waiting for a slot included; then it ends (with what was generated so far, finish_reason 'length').")] = 600.0,
    max_connections: Annotated[int, typer.Option("--max-connections", help="Connections open at once. Past it a new one replaces the longest-idle one, or gets 503 if all hold a request.")] = 1024,
    mcp: Annotated[Optional[Path], typer.Option("--mcp", help="An MCP config (the mcpServers JSON of Claude Desktop or LM Studio): its servers start with the server, and a request that names one in 'tools' ({\"type\": \"mcp\", \"server_label\": NAME}) has the server call its tools. Only allowed tools run: see --allow-tool and --yes.", dir_okay=False)] = None,
    allow_tool: Annotated[Optional[list[str]], typer.Option("--allow-tool", help="With --mcp: a tool the server may run when the model calls it: SERVER/TOOL, or SERVER for all of its tools (repeatable). An entry's \"alwaysAllow\" list in the config allows its tools too.")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="With --mcp: the server may run every tool of every server in the config.")] = False,
    lora: Annotated[Optional[list[str]], typer.Option("--lora", help="A LoRA adapter, loaded once beside each -m model it was made for: NAME=ADAPTER.gguf[:SCALE] (NAME: the file's stem when left out; repeatable). Requests choose it by model name BASE+NAME or an 'adapters' field; the others get the base.")] = None,
) -> None:
    """Serve models over the OpenAI and Ollama APIs, with a web chat at http://HOST:PORT/."""
    from ..runtime.llama import parse_gpu_layers
    from ..serve.config import ServeConfig, parse_duration, parse_lora, parse_size
    from .run import default_model_ref

    refs = list(model or [])
    if not refs:
        try:
            refs = [default_model_ref(None)]
        except LlmdeskError:
            from ..store.catalog import list_models

            if not list_models():
                raise
            refs = []  # no default model, but the store has some: requests name one
    refs, adapters, first = _with_adapters(refs, parse_lora(lora or []))
    cfg = ServeConfig(models=refs, host=host, port=port, parallel=parallel, ctx=ctx, threads=threads,
                      gpu_layers=parse_gpu_layers(gpu_layers),
                      api_key=api_key, insecure=insecure, keep_alive=parse_duration(keep_alive, "--keep-alive"),
                      cors_origins=list(cors_origin or []), max_queue=max_queue,
                      max_body_bytes=parse_size(max_body, "--max-body"),
                      max_memory=parse_size(max_memory, "--max-memory") if max_memory else None,
                      template=template, log_prompts=log_prompts, header_timeout=header_timeout,
                      body_timeout=body_timeout, max_connections=max_connections, request_timeout=request_timeout,
                      lora=adapters, default_adapters=first, mcp_servers=_mcp_config(mcp), allow_tools=list(allow_tool or []),
                      allow_all_tools=yes)
    cfg.check()
    _configure_logging()
    if not cfg.is_local and not cfg.api_key:
        err.print(f"warning: serving on {host} without an API key (--insecure): anyone who can reach this "
                  "machine can use it", style="bold yellow", markup=False)
    from ..serve.app import create_app
    from ..serve.errors import APIError
    from ..serve.models import variant_name

    try:
        n = len(cfg.mcp_servers)
        starting = f"starting {n} MCP server{'s' if n > 1 else ''}" if n else ""
        doing = " and ".join(x for x in (f"loading {refs[0]}" if refs else "", starting) if x)
        with err.status(f"{doing} ...", spinner="dots") if doing else _nothing():
            application = create_app(cfg)
    except APIError as e:
        raise LlmdeskError(e.message) from None
    state = application.state.llmdesk
    tools = application.state.mcp_tools
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"
    default = "none (requests name a model)"
    if state.models.default:  # what a request that names no model gets (-m BASE+ADAPTER: that variant)
        src, chosen = state.models.find_variant(None)
        default = variant_name(src.name, chosen)

    def banner() -> None:  # once the socket listens: the addresses it gives can be used at once
        err.print(f"llmdesk {_version()} serving {default} · {parallel} slots per model", markup=False)
        if cfg.lora:
            shown = [v for s in state.models.started for v in state.models.variants(s)]
            err.print(f"  LoRA adapters: {', '.join(shown)}", markup=False)
        err.print(f"  web chat:    {url}/", markup=False)
        err.print(f"  OpenAI API:  {url}/v1   (base_url for the openai client)", markup=False)
        err.print(f"  Ollama API:  {url}   (OLLAMA_HOST={url})", markup=False)
        if tools is not None:
            for line in _mcp_lines(tools):
                err.print(line, markup=False)
        if cfg.api_key:
            err.print("  API key required: Authorization: Bearer <key>", markup=False)
        err.print("Ctrl-C to stop", style="dim", markup=False)
        sys.stderr.flush()

    from ..serve.server import run

    run(application, host=host, port=port, on_ready=banner)  # limits and timeouts from cfg, through application.state


def _with_adapters(refs: list[str], lora: dict) -> tuple[list[str], dict, list[str]]:
    """-m BASE+ADAPTER (runtime/adapters.py, as 'llmdesk run' reads it): BASE is served, and each
    adapter is loaded beside it as --lora NAME=ADAPTER would load it, NAME as 'run' names it
    (the file's or folder's name, NAME:TAG in the store) -> (the -m models, the --lora
    adapters, the names a request that names no model gets: the first model's)."""
    from ..runtime.adapters import find_adapters, split_adapters
    from ..store.refs import resolve

    models, first = [], []
    for i, ref in enumerate(refs):
        base, texts = split_adapters(ref)
        models.append(base)
        if not texts:
            continue
        chosen = find_adapters(ref, texts, resolve(base), say=lambda text: err.print(text, style="dim", markup=False))
        for a in chosen:
            given = (a.path.resolve(), a.scale)
            if lora.setdefault(a.label, given) != given:
                raise LlmdeskError(f"-m {ref}: another adapter is already named {a.label!r} (with --lora or another "
                                   "-m); name one apart with --lora NAME=ADAPTER.gguf")
        if i == 0:
            first = [a.label for a in chosen]
    return models, lora, first


def _mcp_config(path: Path | None) -> list:
    """The servers of --mcp's config (a file that cannot be read, or is not one, stops here)."""
    if path is None:
        return []
    from ..tools.mcp_client import read_config

    return read_config(path)


def _mcp_lines(tools) -> list[str]:
    """The banner's lines for --mcp: each running server's tools that requests may use, and the
    ones held back."""
    lines = []
    for s in tools.listing():
        if not s["running"]:
            continue
        ok = ", ".join(t["name"] for t in s["tools"]) or "none"
        held = f" · not allowed: {', '.join(s['not_allowed'])}" if s["not_allowed"] else ""
        lines.append(f"  MCP server {s['server_label']}: tools {ok}{held}")
    if any(s["not_allowed"] for s in tools.listing()):
        lines.append("  (allow a tool with --allow-tool SERVER/TOOL, --yes, or \"alwaysAllow\" in the MCP config)")
    return lines


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _version() -> str:
    from .. import __version__

    return __version__


def _configure_logging() -> None:
    """llmdesk's own lines (the access log, loads and unloads) on stderr; LLMDESK_LOG=debug for more."""
    level = os.environ.get("LLMDESK_LOG", "info").upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    for name in ("llmdesk.access", "llmdesk.serve"):
        logger = logging.getLogger(name)
        logger.setLevel(getattr(logging, level, logging.INFO))
        logger.addHandler(handler)
        logger.propagate = False
