"""`llmdesk mcp`: llmdesk as an MCP server, for Claude Desktop, LM Studio and other MCP hosts."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from ..errors import LlmdeskError
from .app import app, err
from .run import CtxOpt, ModelOpt, ThreadsOpt


@app.command("mcp")
def mcp_server(
    model: ModelOpt = None,
    http: Annotated[Optional[int], typer.Option("--http", help="Serve streamable HTTP on this port (at /mcp) instead of stdin/stdout.")] = None,
    host: Annotated[str, typer.Option("--host", help="With --http: the address to listen on. Anything but 127.0.0.1/localhost needs --api-key (or --insecure).")] = "127.0.0.1",
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="LLMDESK_API_KEY", help="With --http: require 'Authorization: Bearer KEY' (also $LLMDESK_API_KEY).")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="With --http: allow another address than 127.0.0.1 without an API key.")] = False,
    ctx: CtxOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Serve llmdesk to MCP hosts: tools to generate with a local model, list the store's models and
    estimate fit; the models as resources. Over stdin/stdout (what a host's config starts), or
    streamable HTTP with --http PORT."""
    from ..serve.config import ServeConfig
    from ..serve.mcp import build_server, http_app, run_stdio
    from .run import default_model_ref

    if http is not None:  # the same rule as `llmdesk serve`
        ServeConfig(host=host, port=http, api_key=api_key, insecure=insecure, threads=threads, ctx=ctx).check()
    elif threads is not None and threads < 1:
        raise LlmdeskError(f"--threads must be at least 1, got {threads}")
    try:
        ref = default_model_ref(model)
    except LlmdeskError:
        ref = None  # no default model: a generate call names one
    server, close = build_server(ref, ctx=ctx, threads=threads)
    try:
        if http is None:
            err.print(f"llmdesk MCP server on stdin/stdout · model {ref or 'none (calls name one)'}", markup=False)
            run_stdio(server)
            return
        from ..serve.server import run

        shown = f"[{host}]" if ":" in host else host

        def banner() -> None:
            err.print(f"llmdesk MCP server at http://{shown}:{http}/mcp · model {ref or 'none (calls name one)'}",
                      markup=False)
            if api_key:
                err.print("  API key required: Authorization: Bearer <key>", markup=False)
            err.print("Ctrl-C to stop", style="dim", markup=False)
            sys.stderr.flush()

        run(http_app(server, host, api_key), host=host, port=http, on_ready=banner)
    finally:
        close()
