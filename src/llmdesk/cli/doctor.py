"""`llmdesk doctor`: check the store (catalog, model files, leftovers, database). A thin wrapper
over `llmdesk.store.doctor`."""

from __future__ import annotations

from typing import Annotated

import typer

from ..store import doctor as store_doctor
from ..store import paths
from .app import app, out
from .models import human_size


@app.command()
def doctor(
    fix: Annotated[bool, typer.Option("--fix", help="remove what is safe to remove")] = False,
) -> None:
    """Check the store: catalog entries whose file is missing, files no entry uses, temporary files
    left by interrupted imports and pulls, and the database's integrity. Exit code 1 while
    problems remain."""
    r = store_doctor.check(fix=fix)
    db = "database ok" if r.database in ("ok", "none yet") else "database damaged"
    out.print(
        f"store {paths.display(r.home)}: {_n(r.models, 'model')}, {_n(r.blobs, 'file')} "
        f"({human_size(r.blob_bytes)}), {db}",
        markup=False,
    )
    if not r.problems:
        out.print("no problems found", markup=False)
        return

    # one line per problem, never folded: paths stay whole for copying
    width = max(len(p.kind) for p in r.problems)
    for p in r.problems:
        size = f" ({human_size(p.size)})" if p.size is not None else ""
        if p.fix is None:
            status = "needs you"
        elif fix:
            status = "fixed" if p.fixed else f"not fixed, could not {p.fix}"
        else:
            status = f"--fix: {p.fix}"
        out.print(f"{p.kind:<{width}}  {p.where}{size}: {p.detail}  [{status}]", markup=False)

    left = r.remaining
    fixable = [p for p in left if p.fix is not None]
    if not left:
        out.print(f"fixed {_n(len(r.problems), 'problem')}", markup=False)
        return
    summary = f"{_n(len(left), 'problem')} left"
    if fixable and not fix:
        summary += f"; 'llmdesk doctor --fix' fixes {len(fixable)} of them"
    out.print(summary, markup=False)
    raise typer.Exit(1)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"
