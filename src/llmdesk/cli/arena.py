"""`llmdesk arena`: battles between anonymous models (judged by a model with `arena auto`, or by
people in the web chat's Arena mode), Bradley-Terry ratings and exported preference pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.table import Table

from ..errors import LlmdeskError
from .app import app, err, out
from .models import local_time

arena_app = typer.Typer(name="arena", help="Battles between models, ratings with intervals, preference pairs.",
                        no_args_is_help=True, add_completion=False, rich_markup_mode=None)
app.add_typer(arena_app, name="arena")


SourceOpt = Annotated[Optional[str], typer.Option("--source", help="Only the votes of one source: web (people) or auto (a judge).")]


def _votes(source: str | None) -> list[dict]:
    from ..eval import arena

    rows = arena.votes(source=source)
    if source is not None and not rows:
        known = sorted(set(arena.SOURCES) | {v["source"] for v in arena.votes()})
        if source not in known:
            raise LlmdeskError(f"unknown vote source '{source}': use {' or '.join(known)}")
        raise LlmdeskError(f"no arena votes from '{source}' yet")
    return rows


@arena_app.command("leaderboard")
def leaderboard(
    source: SourceOpt = None,
    bootstrap: Annotated[int, typer.Option("--bootstrap", min=0, help="Bootstrap rounds for the 95% intervals (0: none).")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap resampling.")] = 0,
    anchor: Annotated[Optional[str], typer.Option("--anchor", help="Pin this model at 1000 (default: the mean is 1000).")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Draw the ratings with their intervals (PNG/SVG/PDF).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the leaderboard as JSON.")] = False,
) -> None:
    """Bradley-Terry ratings (maximum likelihood, Elo scale) of every model with votes, with
    bootstrap 95% intervals. A model ranks above another only when their intervals do not
    overlap, so models that share a rank are not told apart by the votes so far."""
    from ..eval import arena

    if plot is not None and plot.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise LlmdeskError(f"--plot writes .png, .svg or .pdf files, not '{plot.name}'")
    rows = _votes(source)
    board = arena.leaderboard(rows, bootstrap=bootstrap, seed=seed, anchor=anchor)
    if as_json:
        out.print_json(data={"votes": len(rows), "source": source, "bootstrap": bootstrap, "seed": seed,
                             "anchor": anchor, "models": [r.to_dict() for r in board]})
    else:
        table = Table(box=box.SIMPLE_HEAD, show_edge=False)
        for col, just in (("rank", "right"), ("model", "left"), ("rating", "right"), ("95% CI", "right"),
                          ("battles", "right"), ("W/T/L", "right")):
            table.add_column(col, justify=just)
        for r in board:
            table.add_row(str(r.rank), r.model, f"{r.rating:.0f}", f"{r.low:.0f} to {r.high:.0f}",
                          str(r.battles), f"{r.wins}/{r.ties}/{r.losses}")
        out.print(table)
        where = f" from {source}" if source else ""
        err.print(f"{len(rows)} votes{where}; ties and both-bad count half a win each way; "
                  f"{bootstrap} bootstrap rounds", markup=False)
    if plot is not None:
        err.print(f"plot: {arena.plot_leaderboard(board, plot)}", markup=False)


@arena_app.command("export")
def export(
    output: Annotated[Path, typer.Option("-o", "--output", help="The JSONL file to write.")],
    source: SourceOpt = None,
) -> None:
    """Write the votes with a winner as preference pairs, one JSON object a line: prompt, chosen,
    rejected (what TRL's DPO trainer reads), chosen_model, rejected_model, source. Ties and
    both-bad votes make no pair and are skipped."""
    from ..eval import arena

    rows = _votes(source)
    if not rows:
        raise LlmdeskError("no arena votes yet: vote in the web chat's Arena mode or run 'llmdesk arena auto'")
    written, skipped = arena.export_pairs(output, rows)
    err.print(f"{written} preference pairs written to {output}; {skipped} ties or both-bad votes skipped",
              markup=False)


@arena_app.command("votes")
def votes(
    count: Annotated[int, typer.Option("-n", "--count", min=1, help="How many to show.")] = 20,
    source: SourceOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the votes as JSON.")] = False,
) -> None:
    """The most recent votes, newest first."""
    from ..eval import arena

    rows = list(reversed(arena.votes(source=source, limit=count)))
    if as_json:
        out.print_json(data=rows)
        return
    if not rows:
        out.print("no arena votes yet" + (f" from '{source}'" if source else ""), markup=False)
        return
    table = Table(box=box.SIMPLE_HEAD, show_edge=False)
    for col in ("id", "time", "source", "model a", "model b", "winner", "prompt"):
        table.add_column(col, overflow="ellipsis", no_wrap=True, min_width=12 if col == "prompt" else None)
    for v in rows:
        said = {"a": f"a ({v['model_a']})", "b": f"b ({v['model_b']})"}.get(v["winner"], v["winner"])
        src = v["source"] + (f" ({v['judge']})" if v["judge"] else "")
        prompt = " ".join(v["prompt"].split())
        table.add_row(str(v["id"]), local_time(v["time"]), src, v["model_a"], v["model_b"], said,
                      prompt[:60] + ("..." if len(prompt) > 60 else ""))
    out.print(table)
