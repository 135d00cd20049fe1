"""`llmdesk arena`: battles between anonymous models (judged by a model with `arena auto`, or by
people in the web chat's Arena mode), Bradley-Terry ratings and exported preference pairs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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


def _check_source(source: str | None) -> None:
    from ..eval import arena

    if source is not None and source not in arena.SOURCES and not arena.votes(source=source, limit=1):
        known = sorted(set(arena.SOURCES) | {v["source"] for v in arena.votes()})
        raise LlmdeskError(f"unknown vote source '{source}': use {' or '.join(known)}")


def _votes(source: str | None) -> list[dict]:
    from ..eval import arena

    _check_source(source)
    rows = arena.votes(source=source)
    if source is not None and not rows:
        raise LlmdeskError(f"no arena votes from '{source}' yet")
    return rows


@arena_app.command("auto")
def auto(
    models: Annotated[list[str], typer.Argument(help="Two or more models: .gguf paths, NAME[:TAG] or openai:URL#MODEL; BASE+ADAPTER applies a LoRA adapter (a LoRA GGUF, a PEFT or 'tune -o' folder, or an adapter imported into the store), e.g. qwen qwen+out/.")],
    judge: Annotated[str, typer.Option("--judge", help="The model that decides each battle (local, BASE+ADAPTER or openai:URL#MODEL), or grader:SPEC: a grader (as tune --reward takes them: grader:exact, grader:python:FILE.py:FN, ...) scoring each answer against the question row's columns; the higher score wins.")],
    questions: Annotated[Path, typer.Option("--questions", help="JSONL questions: MT-Bench's layout (question_id, turns) or id/question.")],
    rounds: Annotated[Optional[int], typer.Option("--rounds", min=1, help="Fight this many random battles (question, pair) instead of every pair on every question.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random battles and sides.")] = 0,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", min=1, help="Longest answer, in tokens (default 512).")] = None,
    ctx: Annotated[Optional[int], typer.Option("--ctx", min=16, help="Context size of the local models and the judge.")] = None,
    threads: Annotated[Optional[int], typer.Option("-t", "--threads", min=1, help="CPU threads of the local models.")] = None,
    constrain: Annotated[Optional[bool], typer.Option("--constrain/--no-constrain", help="Hold the judge's reply to a JSON schema. Default: on for a local judge, off for a remote one.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was done as JSON.")] = False,
) -> None:
    """Battles judged by a model: each model answers each question (temperature 0; answers are
    cached, so a rerun does not answer again), the judge compares two answers in both orders (a
    verdict that flips with the order is a tie), and every verdict is stored as a vote (source
    auto). A battle this judge has decided before is skipped: a rerun resumes. Then see
    'llmdesk arena leaderboard --source auto'."""
    from ..eval import arena

    with _progress(not as_json) as update:
        report = arena.auto(models, judge, questions, rounds=rounds, seed=seed, max_tokens=max_tokens, ctx=ctx,
                            threads=threads, constrain=constrain, progress=update,
                            say=None if as_json else (lambda m: err.print(m, markup=False)))
    if as_json:
        out.print_json(data=report.to_dict())
    else:
        o = report.outcomes
        out.print(f"{report.battles} battles on {report.questions} questions, judged by {report.judge}: "
                  f"{report.votes} new votes (a {o['a']}, b {o['b']}, tie {o['tie']})", markup=False)
        for label, n in (("answers from the cache (not generated again)", report.cached),
                         ("decided before, skipped", report.done_before),
                         ("malformed verdicts, not recorded", report.malformed),
                         ("not fought (a model failed)", report.unanswered)):
            if n:
                out.print(f"  {n} {label}", markup=False)
        if report.votes or report.done_before:
            err.print("ratings: llmdesk arena leaderboard --source auto", markup=False)
    if report.failed:
        name, why = next(iter(report.failed.items()))
        more = f" (and {len(report.failed) - 1} more models)" if len(report.failed) > 1 else ""
        raise LlmdeskError(f"{name} failed{more} {why}; the {report.votes} new votes are kept and a rerun resumes")


@contextmanager
def _progress(enabled: bool) -> Iterator:
    """A progress bar per stage (each model's answers, then the verdicts), on stderr; it appears
    with the first stage, so errors found before any work are one line alone."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=err)
    tasks: dict[str, int] = {}

    def update(what: str, done: int, total: int) -> None:
        if not tasks:
            bar.start()
        if what not in tasks:
            tasks[what] = bar.add_task(what, total=total)
        bar.update(tasks[what], completed=done, total=total)

    try:
        yield update
    finally:
        if tasks:
            bar.stop()


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
        parts = arena.groups(rows)
        if len(parts) > 1:
            err.print(f"note: these models never met those of the other groups, directly or through others, "
                      f"so ratings across groups are not comparable: {' | '.join(', '.join(g) for g in parts)}",
                      markup=False)
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
    err.print(f"{written} preference pairs written to {output}; {skipped} votes without a winner "
              f"(tie, both bad) skipped",
              markup=False)


@arena_app.command("votes")
def votes(
    count: Annotated[int, typer.Option("-n", "--count", min=1, help="How many to show.")] = 20,
    source: SourceOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the votes as JSON.")] = False,
) -> None:
    """The most recent votes, newest first."""
    from ..eval import arena

    _check_source(source)
    rows = list(reversed(arena.votes(source=source, limit=count)))
    if as_json:
        out.print_json(data=rows)
        return
    if not rows:
        out.print("no arena votes yet" + (f" from '{source}'" if source else ""), markup=False)
        return
    for v in rows:
        said = {"a": f"a won ({v['model_a']})", "b": f"b won ({v['model_b']})"}.get(v["winner"], v["winner"])
        by = v["source"] + (f", judge {v['judge']}" if v["judge"] else "")
        prompt = " ".join(v["prompt"].split())
        prompt = prompt[:70] + ("..." if len(prompt) > 70 else "")
        out.print(f"#{v['id']}  {local_time(v['time'])}  {by}\n  a: {v['model_a']}  b: {v['model_b']}  -> {said}\n"
                  f"  prompt: {prompt}", markup=False)
