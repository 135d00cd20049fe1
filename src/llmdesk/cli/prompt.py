"""`llmdesk prompt`: reusable prompt templates (new, list, show, edit, rm, lint)."""

from __future__ import annotations

import typer

from .app import app

prompt_app = typer.Typer(help="Prompt templates: files with a task, context, exemplars, format and variables, "
                              "used by run, chat, the Python API and the server.", no_args_is_help=True)
app.add_typer(prompt_app, name="prompt")
