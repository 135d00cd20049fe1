"""`llmdesk docs`: collections of your documents (add, sync, list, rm, search)."""

from __future__ import annotations

import typer

from .app import app

docs_app = typer.Typer(help="Your documents: add files and folders to a collection, keep it in sync, search it.",
                       no_args_is_help=True)
app.add_typer(docs_app, name="docs")
