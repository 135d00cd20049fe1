"""The typer application every command module registers itself on."""

import typer
from rich.console import Console

app = typer.Typer(
    name="llmdesk",
    help="Run, measure, tune and evaluate large language models on your own machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# results go to stdout; progress, hints and errors to stderr so output can be piped
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
