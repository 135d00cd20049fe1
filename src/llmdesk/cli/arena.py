"""`llmdesk arena`: battles between anonymous models (judged by a model with `arena auto`, or by
people in the web chat's Arena mode), Bradley-Terry ratings and exported preference pairs."""

from __future__ import annotations

import typer

from .app import app

arena_app = typer.Typer(name="arena", help="Battles between models, ratings with intervals, preference pairs.",
                        no_args_is_help=True, add_completion=False, rich_markup_mode=None)
app.add_typer(arena_app, name="arena")
