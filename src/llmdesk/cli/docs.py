"""`llmdesk docs`: collections of your documents (add, sync, list, rm, search)."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..store import paths
from .app import app, err, out

docs_app = typer.Typer(help="Your documents: add files and folders to a collection, keep it in sync, search it.",
                       no_args_is_help=True)
app.add_typer(docs_app, name="docs")

CollectionOpt = Annotated[str, typer.Option("--collection", "-c", help="The collection's name.")]
EmbedOpt = Annotated[Optional[str], typer.Option(
    "--embed-model", help="The embedding model (a .gguf path or a name in the store); default: the collection's own, "
    "or all-MiniLM-L6-v2 for a new one.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


def shown(path: str) -> str:
    """A document's path for the terminal: relative to here when below it."""
    try:
        return os.path.relpath(path) if Path(path).is_relative_to(Path.cwd()) else paths.display(Path(path))
    except ValueError:
        return path


@contextmanager
def _progress(enabled: bool):
    """A bar over the files, with the chunks embedded and chunks/s; errors print as they come."""
    state = {"files": 0, "total": 0, "chunks": 0, "t0": time.perf_counter()}
    bar = task = None
    ctx = None
    if enabled and err.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("files"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                       TimeElapsedColumn(), console=err, transient=True)
        ctx = bar.__enter__()
        task = bar.add_task("files", total=None, info="")

    def on_event(ev: dict) -> None:
        if ev["event"] == "note":
            err.print(f"{ev['message']}", markup=False)
        elif ev["event"] == "files":
            state["total"] = ev["total"]
        elif ev["event"] == "file":
            state["files"] += 1
            state["chunks"] += ev.get("chunks", 0)
            if ev["status"] == "error":
                err.print(f"error: {ev['error']}", markup=False)
        if bar is not None:
            dt = time.perf_counter() - state["t0"]
            rate = f", {state['chunks'] / dt:.1f} chunks/s" if state["chunks"] and dt > 0 else ""
            bar.update(task, completed=state["files"], total=state["total"] or None,
                       info=f"{state['chunks']} chunks{rate}")

    try:
        yield on_event
    finally:
        if ctx is not None:
            bar.__exit__(None, None, None)


def _report(r, as_json: bool) -> None:
    if as_json:
        out.print_json(data=r.to_dict())
    else:
        parts = [f"{r.added} added", f"{r.updated} updated", f"{r.unchanged} unchanged"]
        if r.removed:
            parts.append(f"{r.removed} removed")
        if r.errors:
            parts.append(f"{len(r.errors)} failed")
        if r.skipped:
            parts.append(f"{r.skipped} skipped (not a kind llmdesk reads)")
        rate = f", {r.chunks_per_second:.1f} chunks/s" if r.chunks else ""
        out.print(f"{r.collection}: {', '.join(parts)}; {r.chunks} chunk{'' if r.chunks == 1 else 's'} embedded in {r.seconds:.1f} s{rate}",
                  markup=False)
    if r.errors:
        raise typer.Exit(1)


@docs_app.command("add")
def add(
    paths_: Annotated[list[str], typer.Argument(metavar="PATH...", help="Files and folders (folders recursively).")],
    collection: CollectionOpt = "default",
    include: Annotated[Optional[list[str]], typer.Option(
        "--include", help="Only files matching this glob (e.g. '*.md'; repeat for more).")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(
        "--exclude", help="Leave out files or folders matching this glob (e.g. 'drafts'; repeat for more).")] = None,
    embed_model: EmbedOpt = None,
    rebuild: Annotated[bool, typer.Option(
        "--rebuild", help="Re-embed the whole collection (with --embed-model, or the default model).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Add files and folders to a collection: new and changed files are embedded, unchanged ones skipped."""
    from ..rag import ingest

    with _progress(not as_json) as on_event:
        r = ingest.add(paths_, collection, include=include, exclude=exclude, embedder=embed_model,
                       on_event=on_event, rebuild=rebuild)
    _report(r, as_json)


@docs_app.command("sync")
def sync(
    collection: Annotated[str, typer.Argument(help="The collection.")] = "default",
    embed_model: EmbedOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Bring a collection in line with the disk: files gone are removed, changed ones re-embedded, new ones added."""
    from ..rag import ingest

    with _progress(not as_json) as on_event:
        r = ingest.sync(collection, embedder=embed_model, on_event=on_event)
    _report(r, as_json)


@docs_app.command("list")
def list_(as_json: JsonOpt = False) -> None:
    """List the collections: documents, chunks and the embedding model of each."""
    from ..rag import ingest

    cols = ingest.list_collections()
    if as_json:
        out.print_json(data=[c.to_dict() for c in cols])
        return
    if not cols:
        out.print("no collections yet; add documents with `llmdesk docs add PATH`", markup=False)
        return
    from rich.table import Table

    t = Table(box=None, pad_edge=False)
    for h in ("collection", "documents", "chunks", "embedding model", "updated"):
        t.add_column(h, justify="right" if h in ("documents", "chunks") else "left")
    for c in cols:
        t.add_row(c.name, str(c.documents), str(c.chunks), f"{Path(c.model).name if os.sep in c.model else c.model} "
                  f"({c.dim}d)", c.updated.replace("T", " ").replace("+00:00", " UTC"))
    out.print(t)


@docs_app.command("rm")
def rm(collection: Annotated[str, typer.Argument(help="The collection to delete.")]) -> None:
    """Delete a collection from the index (your files are not touched)."""
    from ..rag import ingest

    col = ingest.remove(collection)
    out.print(f"removed collection '{col.name}' ({col.documents} documents, {col.chunks} chunks)", markup=False)


@docs_app.command("search")
def search_(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    collection: CollectionOpt = "default",
    mode: Annotated[str, typer.Option("--mode", help="hybrid, bm25 or vector: words (BM25), meaning (vectors), or both "
                                      "fused by score.")] = "hybrid",
    k: Annotated[int, typer.Option("-k", help="How many passages.")] = 5,
    embed_model: EmbedOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Search a collection; passages that look like instructions to a model are marked as such."""
    from ..rag.search import search

    hits = search(query, collection, k=k, mode=mode, embedder=embed_model,
                  on_notice=lambda m: err.print(f"note: {m}", markup=False))
    if as_json:
        out.print_json(data=[h.to_dict() for h in hits])
        return
    if not hits:
        out.print("no passage matches", markup=False)
        return
    for i, h in enumerate(hits, 1):
        where = h.where.replace(h.path, shown(h.path), 1)
        out.print(f"[{i}] {where}  (score {h.score:.4g})", markup=False)
        if h.flags:
            out.print(f"    FLAGGED, looks like instructions to a model: {', '.join(h.flags)}", markup=False)
        text = " ".join(h.text.split())
        out.print("    " + (text if len(text) <= 300 else text[:297] + "..."), markup=False)
