"""`llmdesk logs`: see and search past prompts and responses; `logs on|off|path`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..store import logs as store_logs
from ..store import paths
from .app import app, out
from .models import local_time

logs_app = typer.Typer(
    name="logs",
    help="Show recent prompts and responses (newest first); search them with -q.",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.add_typer(logs_app)


@logs_app.callback(invoke_without_command=True)
def logs(
    ctx: typer.Context,
    count: Annotated[int, typer.Option("-n", "--count", min=1, help="how many to show")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    query: Annotated[Optional[str], typer.Option("-q", "--query", help="only turns containing all these words")] = None,
) -> None:
    """Show recent prompts and responses (newest first); search them with -q."""
    if ctx.invoked_subcommand:
        return
    rows = store_logs.recent(count, query)
    if as_json:
        out.print_json(data=rows)
        return
    if not rows:
        state = "" if store_logs.logging_enabled() else " (logging is off; 'llmdesk logs on' turns it on)"
        what = f"matching {query!r}" if query else "yet"
        out.print(f"no logged prompts {what}{state}", markup=False)
        return
    for r in rows:
        out.print(_heading(r), markup=False)
        for label in ("system", "prompt", "response"):
            if r[label]:
                text = r[label].replace("\n", "\n    ")
                out.print(f"  {label}:\n    {text}", markup=False)
        out.print()


def _heading(r: dict) -> str:
    parts = [f"#{r['id']}", local_time(r["time"]), r["model"] or "?"]
    stats = f"{r['tokens_in']} in, {r['tokens_out']} out"
    if r["duration_s"]:
        stats += f", {r['duration_s']:.2f} s"
    if r["tokens_per_second"]:
        stats += f", {r['tokens_per_second']:.1f} tokens/s"
    return "  ".join(parts + [stats])


@logs_app.command("on")
def logs_on() -> None:
    """Log prompts and responses (the default)."""
    store_logs.set_logging(True)
    out.print("logging is on", markup=False)


@logs_app.command("off")
def logs_off() -> None:
    """Stop logging prompts and responses (what is logged already stays)."""
    store_logs.set_logging(False)
    out.print("logging is off", markup=False)


@logs_app.command("status")
def logs_status() -> None:
    """Say whether logging is on."""
    out.print(f"logging is {'on' if store_logs.logging_enabled() else 'off'}", markup=False)


@logs_app.command("path")
def logs_path() -> None:
    """Print the path of the database the logs are kept in."""
    out.print(str(paths.db_path()), markup=False)
