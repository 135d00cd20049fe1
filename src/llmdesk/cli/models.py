"""Model commands: pull, import, list, show, rm. Each is a thin wrapper over `llmdesk.store`."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from ..store import catalog, paths
from .app import app, err, out

TEMPLATE_PREVIEW_LINES = 8


@app.command()
def pull(
    ref: Annotated[str, typer.Argument(help="hf:OWNER/REPO/FILE.gguf, optionally with @REVISION")],
) -> None:
    """Download a GGUF model from the Hugging Face Hub into the store."""
    from ..store.pull import pull as pull_model

    entry = pull_model(ref)
    out.print(f"{entry.ref}  {human_size(entry.size)}  sha256:{entry.sha256[:12]}  (from {entry.source})", markup=False)


@app.command("import")
def import_(
    file: Annotated[Path, typer.Argument(help="a .gguf file")],
    name: Annotated[
        Optional[str], typer.Option("--name", "-n", help="NAME[:TAG] in the store (default: from the file name)")
    ] = None,
) -> None:
    """Add a local GGUF file to the store (validated, checksummed, stored by content)."""
    if name:
        model, tag = catalog.parse_name(name)
    else:
        model, tag = catalog.names_from_filename(file.name)
    entry = catalog.add_file(file, model, tag, source=str(file.expanduser().absolute()))
    out.print(f"{entry.ref}  {human_size(entry.size)}  sha256:{entry.sha256[:12]}", markup=False)


@app.command("list")
def list_(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """List the models in the store."""
    entries = catalog.list_models()
    if as_json:
        out.print_json(data=[e.to_dict() for e in entries])
        return
    if not entries:
        err.print(
            "no models in the store yet; add one with 'llmdesk pull hf:OWNER/REPO/FILE.gguf' "
            "or 'llmdesk import FILE.gguf --name NAME'",
            markup=False,
        )
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("NAME", "TAG", "SIZE", "ARCH", "PARAMS", "TYPE", "CTX", "ADDED"):
        table.add_column(col, justify="right" if col in ("SIZE", "PARAMS", "CTX") else "left", no_wrap=True)
    for e in entries:
        table.add_row(
            e.name,
            e.tag,
            human_size(e.size),
            e.architecture or "?",
            human_count(e.parameters),
            e.file_type or "?",
            str(e.context_length or "?"),
            local_time(e.added),
        )
    out.print(table)


@app.command()
def show(
    model: Annotated[str, typer.Argument(help="a store name[:tag], a path to a .gguf file, or hf:...")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    template: Annotated[bool, typer.Option("--template", help="print only the chat template, all of it")] = False,
) -> None:
    """Show what is inside a model: architecture, size, quantization, shapes, tokenizer, template."""
    from ..formats.gguf import read_gguf, summary
    from ..store.refs import resolve

    resolved = resolve(model)
    info = summary(read_gguf(resolved.path))
    entry = resolved.entry
    if as_json:
        data = {"model": resolved.name, **info, "store": entry.to_dict() if entry else None}
        out.print_json(data=data)
        return
    if template:
        out.print(info["chat_template"] or "(this model has no chat template)", markup=False)
        return
    for line in describe(resolved.name, info, entry):
        out.print(line, markup=False)


@app.command()
def rm(
    model: Annotated[str, typer.Argument(help="name[:tag] of a model in the store")],
) -> None:
    """Remove a model from the store (its file too, unless another name uses it)."""
    entry = catalog.remove(model)
    freed = "" if entry.path.exists() else f", freed {human_size(entry.size)}"
    out.print(f"removed {entry.ref}{freed}", markup=False)


# ---------------------------------------------------------------------------------------------
# formatting


def describe(title: str, s: dict[str, Any], entry: catalog.ModelEntry | None) -> list[str]:
    """The lines `llmdesk show` prints for a summary() dict."""
    q = lambda v: "?" if v is None else str(v)  # noqa: E731
    rows = [
        ("architecture", q(s["architecture"]) + (f"  ({s['name']})" if s.get("name") else "")),
        ("parameters", human_count(s["parameters"])),
        ("file type", f"{q(s['file_type'])}, {s['bits_per_weight']:.2f} bits per weight"),
        ("tensor types", ", ".join(f"{t} x{n}" for t, n in s["tensor_types"].items()) or "none"),
        ("context length", q(s["context_length"])),
        ("layers", f"{q(s['layers'])}   heads {q(s['heads'])}   KV heads {q(s['kv_heads'])}"),
        ("embedding length", f"{q(s['embedding_length'])}   feed-forward {q(s['feed_forward_length'])}"),
        ("vocabulary", f"{q(s['vocab_size'])} tokens ({q(s['tokenizer_model'])})"),
        ("special tokens", "  ".join(f"{k} {v!r}" for k, v in s["special_tokens"].items()) or "none"),
        ("size", f"{human_size(s['size_bytes'])}  {paths.display(Path(s['path']))}"),
    ]
    if entry is not None:
        rows += [("sha256", entry.sha256), ("source", entry.source or "?"), ("added", local_time(entry.added))]
    width = max(len(k) for k, _ in rows)
    lines = [title] + [f"  {k:<{width}}  {v}" for k, v in rows]
    tpl = s.get("chat_template")
    if tpl:
        tl = tpl.splitlines() or [""]
        more = len(tl) - TEMPLATE_PREVIEW_LINES
        lines.append(f"  chat template ({len(tl)} lines{'; --template prints it all' if more > 0 else ''}):")
        lines += ["    " + line for line in tl[:TEMPLATE_PREVIEW_LINES]]
        if more > 0:
            lines.append(f"    ... {more} more lines")
    else:
        lines.append("  chat template    none")
    return lines


def human_size(n: int | None) -> str:
    """Bytes in decimal units, like file managers and the Hub: 1.2 MB, 4.7 GB."""
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def human_count(n: int | None) -> str:
    """Parameter counts the way model names write them: 133K, 3.4M, 1.1B."""
    if n is None:
        return "?"
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            v = n / div
            return f"{v:.1f}{unit}" if v < 100 else f"{v:.0f}{unit}"
    return str(n)


def local_time(iso: str | None) -> str:
    if not iso:
        return "?"
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return iso

