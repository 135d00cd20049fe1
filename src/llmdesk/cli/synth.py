"""`llmdesk synth`: make training data with a model (instruct, docs, answers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import LlmdeskError
from .app import app, err, out

synth_app = typer.Typer(help="Make training data with a model: new instructions from seed tasks, questions and answers "
                             "from your documents, answers (or K candidates) to your prompts. Resumable; filtered.",
                        no_args_is_help=True)
app.add_typer(synth_app, name="synth")

ModelOpt = Annotated[Optional[str], typer.Option("-m", "--model", help="The generating model: a .gguf, NAME[:TAG], openai:URL#MODEL (default: $LLMDESK_MODEL, else the demo model).")]
OutOpt = Annotated[Path, typer.Option("-o", "--output", help="The rows, JSON Lines (OUT.jsonl.part holds the work until the end: run again to continue).")]
NOpt = Annotated[int, typer.Option("--n", "-n", help="Rows to generate (before filtering).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="The same seed and settings give the same rows.")]
TempOpt = Annotated[float, typer.Option("-t", "--temperature", help="Sampling temperature.")]
MaxTokOpt = Annotated[int, typer.Option("--max-tokens", help="Most tokens per generated text.")]
BatchOpt = Annotated[int, typer.Option("--batch", help="Requests in flight at once (the Engine runs them side by side).")]
MinOpt = Annotated[int, typer.Option("--min-chars", help="Drop rows shorter than this.")]
MaxOpt = Annotated[int, typer.Option("--max-chars", help="Drop rows longer than this.")]
LangOpt = Annotated[Optional[str], typer.Option("--lang", help="Keep only rows in this language (en).")]
DedupOpt = Annotated[float, typer.Option("--dedup", help="Near-duplicate threshold: Jaccard similarity of word 3-grams (MinHash); 1.0 removes exact duplicates only.")]
JudgeOpt = Annotated[Optional[str], typer.Option("--judge", help="A judge model that grades each row 1-10 (with --min-score).")]
ScoreOpt = Annotated[Optional[float], typer.Option("--min-score", help="With --judge: drop rows graded below this.")]


def _run(mode: str, model: str | None, jobs_of, output: Path, source: str, *, n: int, seed: int, temperature: float,
         max_tokens: int, batch: int, k: int, min_chars: int, max_chars: int, lang: str | None, dedup: float,
         judge: str | None, min_score: float | None):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..runtime.model import load
    from ..train import synth
    from .run import default_model_ref

    if n < 1:
        raise LlmdeskError(f"--n {n}: give at least 1")
    if not 0 < dedup <= 1:
        raise LlmdeskError(f"--dedup {dedup}: give a similarity in (0, 1]")
    if (judge is None) != (min_score is None):
        raise LlmdeskError("--judge and --min-score go together")
    if batch < 1 or k < 1:
        raise LlmdeskError("--batch and -k must be at least 1")
    ref = default_model_ref(model)
    settings = synth.SynthSettings(mode=mode, model=ref, n=n, seed=seed, temperature=temperature, max_tokens=max_tokens,
                                   k=k, batch=batch, source=source,
                                   source_sha256=synth.file_sha256(source) if source else "")
    jobs = list(jobs_of(settings))  # bad inputs: one line before the model loads
    filters = synth.Filters(min_chars=min_chars, max_chars=max_chars, language=lang, near_duplicate=dedup,
                            judge_threshold=min_score)
    with err.status(f"loading {ref} ...", spinner="dots"):
        # one slot per request in flight, over one shared KV cache
        m = load(ref, slots=batch, kv_unified=True) if not ref.startswith("openai:") else load(ref)
    judge_model = None
    try:
        if judge:
            judge_model = m if judge == ref else load(judge)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=err, transient=True) as bar:
            task = bar.add_task(f"synth {mode}", total=None, rate="")

            def progress(done: int, total: int, seconds: float) -> None:
                bar.update(task, completed=done, total=total, rate=f"{done / seconds:.2f} rows/s" if seconds else "")

            report = synth.generate(m, jobs, settings, output, filters=filters, judge=judge_model, on_progress=progress)
    finally:
        if judge_model is not None and judge_model is not m:
            judge_model.close()
        m.close()
    removed = ", ".join(f"{v} {k}" for k, v in report.removed.items()) or "none"
    resumed = f" (continued after {report.resumed_from})" if report.resumed_from else ""
    out.print(f"wrote {report.kept} rows to {report.out} from {report.generated} generated{resumed}; removed: {removed}; "
              f"{report.rows_per_second:.2f} rows/s", markup=False)
    return report


@synth_app.command("instruct")
def instruct(
    seeds: Annotated[Path, typer.Option("--seeds", help="Seed tasks: a text file (one per line) or JSONL rows with 'prompt'/'instruction'.")],
    output: OutOpt, model: ModelOpt = None, n: NOpt = 50, seed: SeedOpt = 0, temperature: TempOpt = 0.9,
    max_tokens: MaxTokOpt = 256, batch: BatchOpt = 8, min_chars: MinOpt = 10, max_chars: MaxOpt = 8000,
    lang: LangOpt = None, dedup: DedupOpt = 0.8, judge: JudgeOpt = None, min_score: ScoreOpt = None,
) -> None:
    """New instructions from seed tasks (self-instruct), and an answer to each: 'messages' rows."""
    from ..train import synth

    rows = synth.read_rows(seeds)
    tasks = [synth._prompt_of(r, f"{seeds}: row {i + 1}")[-1]["content"] for i, r in enumerate(rows)]
    _run("instruct", model, lambda s: synth.instruct_jobs(tasks, s), output, str(seeds), n=n, seed=seed,
         temperature=temperature, max_tokens=max_tokens, batch=batch, k=1, min_chars=min_chars, max_chars=max_chars,
         lang=lang, dedup=dedup, judge=judge, min_score=min_score)


@synth_app.command("docs")
def docs(
    path: Annotated[Path, typer.Argument(help="A file or folder of documents (text, Markdown, HTML, PDF, DOCX), or a collection ('llmdesk docs list').")],
    output: OutOpt, model: ModelOpt = None, n: NOpt = 50, seed: SeedOpt = 0, temperature: TempOpt = 0.7,
    max_tokens: MaxTokOpt = 256, batch: BatchOpt = 8, min_chars: MinOpt = 10, max_chars: MaxOpt = 8000,
    lang: LangOpt = None, dedup: DedupOpt = 0.8, judge: JudgeOpt = None, min_score: ScoreOpt = None,
) -> None:
    """Question/answer pairs grounded in passages of your documents; each row keeps its passage."""
    from ..train import synth

    items = synth.passages(path)
    _run("docs", model, lambda s: synth.docs_jobs(items, s), output, str(path), n=n, seed=seed,
         temperature=temperature, max_tokens=max_tokens, batch=batch, k=1, min_chars=min_chars, max_chars=max_chars,
         lang=lang, dedup=dedup, judge=judge, min_score=min_score)


@synth_app.command("answers")
def answers(
    prompts: Annotated[Path, typer.Argument(help="Prompts: JSONL/JSON rows with 'prompt' or 'messages', or a text file, one per line.")],
    output: OutOpt, model: ModelOpt = None,
    k: Annotated[int, typer.Option("-k", help="Candidates per prompt (2 or more: rows with 'candidates', to rank into preference pairs).")] = 1,
    n: Annotated[int, typer.Option("--n", "-n", help="Only the first N prompts (default: all).")] = 0,
    seed: SeedOpt = 0, temperature: TempOpt = 0.8,
    max_tokens: MaxTokOpt = 256, batch: BatchOpt = 8, min_chars: MinOpt = 1, max_chars: MaxOpt = 32000,
    lang: LangOpt = None, dedup: DedupOpt = 1.0, judge: JudgeOpt = None, min_score: ScoreOpt = None,
    rank: Annotated[Optional[str], typer.Option("--rank", help="With -k 2+: graders (as tune --reward takes them) that pick chosen/rejected; writes --pairs.")] = None,
    rank_weights: Annotated[Optional[str], typer.Option("--rank-weights", help="Weights of the --rank graders.")] = None,
    pairs: Annotated[Optional[Path], typer.Option("--pairs", help="With --rank: where the prompt/chosen/rejected rows go (JSONL).")] = None,
) -> None:
    """Answers (or K candidates) to prompts you have; with --rank, preference pairs for DPO."""
    from ..atomic import write_text
    from ..eval.graders import parse_graders
    from ..train import synth

    if (rank is None) != (pairs is None):
        raise LlmdeskError("--rank and --pairs go together")
    if rank and k < 2:
        raise LlmdeskError("--rank needs candidates to compare: -k 2 or more")
    graders = parse_graders(rank, rank_weights) if rank else None
    rows = synth.read_rows(prompts)
    if graders:
        for g in graders[0]:  # every row must have what the graders read
            g.check_columns(set.intersection(*(set(r) for r in rows)) if rows else set(), str(prompts))
    report = _run("answers", model, lambda s: synth.answer_jobs(rows, s, str(prompts)), output, str(prompts),
                  n=n or len(rows), seed=seed, temperature=temperature, max_tokens=max_tokens, batch=batch, k=k,
                  min_chars=min_chars, max_chars=max_chars, lang=lang, dedup=dedup, judge=judge, min_score=min_score)
    if graders:
        made = synth.read_rows(report.out)
        by_row = {r["provenance"]["row"]: r for r in made}
        for i, r in by_row.items():  # the graders read the prompt row's own columns (answer, ...)
            r.update({c: v for c, v in rows[i - 1].items() if c not in r})
        found, ties = synth.rank_pairs(list(by_row.values()), *graders)
        write_text(pairs, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in found))
        out.print(f"wrote {len(found)} preference pairs to {pairs} ({ties} prompts skipped: their candidates scored "
                  "the same)", markup=False)
