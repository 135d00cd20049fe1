"""`llmdesk eval judge`: a model grades answers (MT-Bench style) or compares two models' answers.

A thin face over llmdesk.eval.judge: it loads the judge and the answering models, reads or
generates the answers, runs the judge and prints the table; verdicts land in the judgments
table as they come, and a summary row per model (or pair) in `llmdesk results`.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.table import Table

from ..errors import LlmdeskError
from .app import err, out
from .evaluate import eval_app


def _say(m: str) -> None:
    err.print(m, markup=False)


@contextmanager
def _progress(enabled: bool, what: str) -> Iterator:
    if not (enabled and err.is_terminal):
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task(what, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _file_label(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


@eval_app.command("judge")
def judge_cmd(
    judge: Annotated[str, typer.Option("--judge", "-j", metavar="REF", help="The judge: a .gguf, NAME[:TAG], hf:..., or openai:URL#MODEL; BASE+ADAPTER applies a LoRA adapter.")],
    questions: Annotated[Path, typer.Option("--questions", "-q", metavar="FILE", help="Questions, JSONL: MT-Bench's layout (question_id, turns, reference) or rows with id and question.", dir_okay=False)],
    answers: Annotated[Optional[list[str]], typer.Option("--answers", metavar="MODEL=FILE", help="MODEL=FILE: MODEL's answers, JSONL (question_id with answer, turns or MT-Bench's choices). Repeatable.")] = None,
    models: Annotated[Optional[list[str]], typer.Option("--models", "-m", metavar="REF", help="A model that answers the questions first (temperature 0; its answers are saved under the user dir): a .gguf, NAME[:TAG], openai:URL#MODEL, or BASE+ADAPTER (a LoRA adapter applied); repeatable.")] = None,
    mode: Annotated[str, typer.Option("--mode", metavar="single|pairwise", help="single: grade each answer 1-10; pairwise: compare every two models, both orders.")] = "single",
    reference_column: Annotated[Optional[str], typer.Option("--reference-column", metavar="COL", help="The questions' column with reference answers (default: 'reference' where a row has it).")] = None,
    run: Annotated[Optional[str], typer.Option("--run", metavar="NAME", help="Store the verdicts under this name; a rerun with the same name skips stored verdicts.")] = None,
    constrain: Annotated[Optional[bool], typer.Option("--constrain/--no-constrain", help="Hold the judge's reply to a JSON schema (reasoning, then the verdict). Default: on for a local judge, off for a remote one.")] = None,
    ctx: Annotated[Optional[int], typer.Option("--ctx", metavar="N", help="Context length of local models in tokens (default: the model's, at most 4096).")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", metavar="N", help="CPU threads of local models (default: all cores).")] = None,
    parallel: Annotated[int, typer.Option("--parallel", "-p", metavar="N", help="Verdicts asked for at once (a local judge gets N slots and decodes them together).")] = 1,
    max_tokens: Annotated[int, typer.Option("--max-tokens", metavar="N", help="Most tokens per generated answer.")] = 512,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """A model judges answers to a questions file: single grades (1-10) or pairwise comparisons."""
    from ..eval import judge as J
    from ..eval.common import resolve_choice, text_sha256
    from ..store import paths

    if mode not in ("single", "pairwise"):
        raise LlmdeskError(f"--mode must be single or pairwise, got {mode!r}")
    for flag, v in (("--ctx", ctx), ("--threads", threads), ("--max-tokens", max_tokens), ("--parallel", parallel)):
        if v is not None and v < 1:
            raise LlmdeskError(f"{flag} must be at least 1, got {v}")
    given = []
    for a in answers or []:
        label, sep, file = a.partition("=")
        if not sep or not label.strip() or not file.strip():
            raise LlmdeskError(f"--answers takes MODEL=FILE, got {a!r}")
        given.append((label.strip(), Path(file.strip())))
    if not given and not models:
        raise LlmdeskError("nothing to judge: give --models MODEL (they answer first) or --answers MODEL=FILE")
    if mode == "pairwise" and len(given) + len(models or []) < 2:
        raise LlmdeskError("--mode pairwise compares models: give at least two (--models and --answers together)")
    qs = J.read_questions(questions, reference_column=reference_column)
    answer_sets: dict[str, dict[str, list[str]]] = {}
    for label, file in given:
        if label in answer_sets:
            raise LlmdeskError(f"--answers names {label} twice")
        answer_sets[label] = J.read_answers(file, qs)
    run = run or J.new_run_name()
    judge_ref = resolve_choice(judge, say=_say)
    found_models = [resolve_choice(ref, say=_say) for ref in models or []]  # all found before any loads
    loaded = []
    try:
        with err.status(f"loading the judge {judge} ...", spinner="dots"):
            jm = judge_ref.load(ctx=ctx, threads=threads, slots=parallel)
        loaded.append(jm)
        files: dict[str, str] = {}
        sha: dict[str, str] = {}
        for found in found_models:
            if found.name in answer_sets:
                raise LlmdeskError(f"{found.name} is given twice (as --models or --answers)")
            if found.sha256 is not None:
                sha[found.name] = found.sha256
            m = jm if found.key == judge_ref.key else found.load(ctx=ctx, threads=threads)
            try:
                dest = paths.home() / "judge" / _file_label(run) / f"{_file_label(found.name)}.jsonl"
                with _progress(not as_json, f"{found.name} answers") as update:
                    done = [0]

                    def step(done=done, update=update):
                        done[0] += 1
                        if update:
                            update(done[0], len(qs))
                    answer_sets[found.name] = J.generate_answers(m, qs, dest, max_tokens=max_tokens, progress=step)
            finally:
                if m is not jm:
                    m.close()
            files[found.name] = str(dest)
            if not as_json:
                _say(f"{found.name}'s answers: {paths.display(dest)}")
        with _progress(not as_json, "verdicts") as update:
            report = J.judge_run(jm, qs, answer_sets, mode=mode, run=run, constrain=constrain, parallel=parallel,
                                 say=_say, progress=update)
    finally:
        for m in loaded:
            m.close()
    report.answers = {**files, **{label: str(file) for label, file in given}}
    if report.judged:  # a rerun that found everything stored adds no second summary
        J.record_results(report, questions_sha256=text_sha256(questions.expanduser().read_text(encoding="utf-8")),
                         settings={"questions": questions.name}, model_sha256=sha)
    if as_json:
        out.print_json(data=report.to_dict())
        return
    _print(report)


def _print(r) -> None:
    how = "constrained" if r.constrained else "read from text"
    out.print(f"judge {r.judge} ({how}), run '{r.run}': {r.questions} questions, {r.judged} verdicts now, "
              f"{r.skipped} already stored", markup=False)
    table = Table(box=None, pad_edge=False, header_style="bold")
    if r.mode == "single":
        for col in ("MODEL", "SCORE", "± STDERR", "N", "MALFORMED"):
            _column(table, col)
        for s in r.scores:
            table.add_row(s.model, "-" if s.mean is None else f"{s.mean:.2f}",
                          "-" if s.stderr is None else f"{s.stderr:.2f}", str(s.n), str(s.malformed))
    else:
        for col in ("MODEL A", "MODEL B", "WINS", "TIES", "LOSSES", "WIN RATE", "INCONSISTENT", "MALFORMED"):
            _column(table, col)
        for p in r.pairs:
            table.add_row(p.model_a, p.model_b, str(p.wins), str(p.ties), str(p.losses),
                          "-" if p.win_rate is None else f"{p.win_rate:.1%}", str(p.inconsistent), str(p.malformed))
    out.print(table)


def _column(table: Table, name: str) -> None:
    """Numbers keep their whole header; a long model name folds onto a second line."""
    if name.startswith("MODEL"):
        table.add_column(name, overflow="fold")
    else:
        table.add_column(name, justify="right", no_wrap=True, min_width=len(name))
