"""`llmdesk eval run|compare|ppl|kld` (benchmark tasks, models side by side, perplexity, KL
divergence from a base) and `llmdesk results`.

Thin wrappers over llmdesk.eval.harness.evaluate, eval.compare.compare, eval.ppl.perplexity and
eval.kld.kl_divergence; every result is recorded in the results store, which `llmdesk results`
lists.
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Iterator, List, Optional

import typer
from rich.table import Table

from ..errors import LlmdeskError
from .app import app, err, out

eval_app = typer.Typer(name="eval", help="Measure models: benchmarks, judges, perplexity, KL divergence.", no_args_is_help=True,
                       add_completion=False, rich_markup_mode=None)
app.add_typer(eval_app, name="eval")

ModelArg = Annotated[str, typer.Argument(help="A .gguf file, NAME[:TAG] from 'llmdesk list', hf:..., or an HF checkpoint folder.")]
TextArg = Annotated[Path, typer.Argument(help="A UTF-8 text file.")]
CtxOpt = Annotated[Optional[int], typer.Option("--ctx", help="Window length in tokens (default 512; at least the text's length scores it in one window).")]
StrideOpt = Annotated[Optional[int], typer.Option("--stride", help="Tokens between window starts (default ctx/2).")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="CPU threads (default: all cores).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


@contextmanager
def progress_bar(enabled: bool, unit: str) -> Iterator:
    """Progress bars on stderr, one per label: done / total UNIT, and UNIT per second."""
    if not (enabled and err.is_terminal):
        yield None
        return
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                  TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=err, transient=True) as bar:
        tasks: dict[str, tuple[int, float, int]] = {}  # label -> (bar task, start time, done at start)

        def update(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = (bar.add_task(label, total=total, rate=""), time.perf_counter(), done)
            t, t0, d0 = tasks[label]
            dt = time.perf_counter() - t0
            rate = f"{(done - d0) / dt:.1f} {unit}/s" if done > d0 and dt > 0 else ""
            bar.update(t, completed=done, total=total, rate=rate)

        yield update


def _check(ctx: int | None, stride: int | None, threads: int | None) -> None:
    for flag, v, low in (("--ctx", ctx, 2), ("--stride", stride, 1), ("--threads", threads, 1)):
        if v is not None and v < low:
            raise LlmdeskError(f"{flag} must be at least {low}, got {v}")


def _say(m: str) -> None:
    err.print(m, markup=False)


def _shots(n: int | None, seed: int | None) -> str:
    """How the few-shot examples were chosen: "5-shot, seed 1234", "0-shot"."""
    if n == 0:
        return "0-shot"
    return ("the task's default shots" if n is None else f"{n}-shot") + f", seed {seed}"


def _stderr(se: float | None) -> str:
    return "n/a" if se is None else f"{se:.4f}"


NAME_MIN = 12  # the narrowest a shortened model name gets, however narrow the terminal


def _models_table(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """A results table: MODEL, then `columns` (numbers on the right), one row a line, columns two
    spaces apart. In a terminal, a model name too long to leave the other columns room is
    shortened in the middle (`tiny:f32+/home/…/words/adapter.gguf`: both ends kept, the base and
    the adapter, the endpoint and the model) and given whole under the table; piped, names are
    whole."""
    from rich.cells import cell_len
    from rich.markup import escape

    heads = ("MODEL", *columns)
    widths = [max(cell_len(x) for x in (h, *(r[i] for r in rows))) for i, h in enumerate(heads)]
    room = max(NAME_MIN, out.width - sum(widths[1:]) - 2 * len(columns)) if out.is_terminal else widths[0]
    short = {r[0]: _middle(r[0], room) for r in rows}
    widths[0] = max(cell_len(x) for x in ("MODEL", *short.values()))

    def line(cells) -> str:
        pad = [" " * (w - cell_len(c)) for c, w in zip(cells, widths)]
        return "  ".join(p + c if h in ("N", "SCORE ± STDERR", "DIFF ± STDERR") else c + p
                         for h, c, p in zip(heads, cells, pad)).rstrip()

    out.print(f"[bold]{escape(line(heads))}[/bold]")
    for r in rows:
        out.print(line((short[r[0]], *r[1:])), markup=False)
    for name, cut in short.items():
        if cut != name:
            out.print(f"{cut} = {name}", markup=False)


def _middle(name: str, width: int) -> str:
    """`name` in at most `width` characters: its start and its end, with "…" for the middle."""
    if len(name) <= width:
        return name
    head = (width - 1) // 2
    return name[:head] + "…" + name[len(name) - (width - 1 - head):]


@eval_app.command("run")
def run_cmd(
    models: Annotated[List[str], typer.Argument(help="Models: .gguf files, NAME[:TAG], hf:..., HF checkpoint folders, openai:URL#MODEL; BASE+ADAPTER applies a LoRA adapter (a LoRA GGUF, a PEFT or 'tune -o' folder, or an adapter imported into the store; ADAPTER:SCALE scales it).")],
    task: Annotated[str, typer.Option("--task", help="Task names or spec files (.yaml), comma-separated.")],
    data: Annotated[Optional[Path], typer.Option("--data", help="The task's data (a file or folder) when it is not where the spec says.")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N items of each task.")] = None,
    shots: Annotated[Optional[int], typer.Option("--shots", help="Few-shot examples per item (default: the task's).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for choosing the few-shot examples.")] = 1234,
    slots: Annotated[int, typer.Option("--slots", help="Sequences a local model scores at once.")] = 4,
    ctx: Annotated[Optional[int], typer.Option("--ctx", help="Context per slot in tokens (default: the model's, at most 4096).")] = None,
    threads: ThreadsOpt = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Score every item again instead of resuming.")] = False,
    chat: Annotated[bool, typer.Option("--chat", help="Generate tasks: ask each item as a user message through the model's chat template (for chat fine-tunes; lm-eval's --apply_chat_template).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Score MODELs on benchmark tasks (multiple choice by log-likelihood as lm-evaluation-harness
    does, or generation with answer extraction); an interrupted run resumes where it stopped."""
    from ..eval.harness import evaluate, identify, open_model, record
    from ..eval.tasks import load_task

    for flag, v, low in (("--limit", limit, 1), ("--shots", shots, 0), ("--slots", slots, 1), ("--ctx", ctx, 16),
                         ("--threads", threads, 1)):
        if v is not None and v < low:
            raise LlmdeskError(f"{flag} must be at least {low}, got {v}")
    names = [t.strip() for t in task.split(",") if t.strip()]
    if not names:
        raise LlmdeskError("--task names no task; give a task name or a spec file, e.g. --task mmlu")
    tasks = [(name, load_task(name, data=data)) for name in names]  # every task loads before any model
    found = [identify(ref, say=_say) for ref in models]  # and every model is found before any runs
    done = []
    for ref, f in zip(models, found):
        model, ident = open_model(ref, slots=slots, ctx=ctx, threads=threads, found=f, say=_say)
        try:
            for name, t in tasks:
                with progress_bar(not as_json, "items") as update:
                    label = f"{ident.name} · {t.name}"
                    r = evaluate(model, t, limit=limit, shots=shots, seed=seed, identity=ident, fresh=fresh,
                                 progress=(lambda d, n: update(label, d, n)) if update else None, say=_say,
                                 chat=chat)
                record(r, task_ref=name)
                done.append(r)
                if not as_json:
                    _say(f"{ident.name} on {t.name}: {r.n - r.resumed} items scored in {r.seconds:.1f} s "
                         f"({r.items_per_second:.1f} items/s), {r.resumed} resumed")
        finally:
            model.close()
    if as_json:
        out.print_json(data=[r.to_dict() for r in done])
        return
    for name, t in tasks:
        rows = [r for r in done if r.task == t.name]
        out.print(f"{t.name} ({_shots(rows[0].shots, seed)})", markup=False)
        _models_table(("METRIC", "SCORE ± STDERR", "N"),
                      [(r.model, k, f"{m.value:.4f} ± {_stderr(m.stderr)}", str(r.n))
                       for r in rows for k, m in r.metrics.items()])


@eval_app.command("compare")
def compare_cmd(
    models: Annotated[List[str], typer.Argument(help="Two or more models, as given to 'llmdesk eval run'; the first is the reference.")],
    task: Annotated[str, typer.Option("--task", help="The task, as given to 'llmdesk eval run'.")],
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also draw the scores with 95% error bars (.png, .svg or .pdf).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """MODELs side by side on TASK (their latest stored 'eval run' results): each metric with its
    standard error, the difference to the first model and whether it exceeds the noise."""
    from ..eval import compare as cmp
    from ..eval.harness import identify

    c = cmp.compare([identify(ref, say=_say)[0] for ref in models], task)
    drawn = cmp.plot(c, plot) if plot is not None else None
    if as_json:
        out.print_json(data=c.to_dict())
    else:
        out.print(f"{c.task} ({_shots(c.shots, c.seed)}, task {c.task_sha256[:8]}); differences to "
                  f"{c.entries[0].model}", markup=False)
        rows = []
        for e in c.entries:
            for k in c.metrics:
                m, d = e.metrics[k], e.diff.get(k)
                if d is None:
                    diff = ("", "")
                else:
                    noise = ("yes" if d.significant else "no") + (" (paired)" if d.paired else "")
                    diff = (f"{d.value:+.4f} ± {_stderr(d.stderr)}", noise)
                rows.append((e.model, k, f"{m.value:.4f} ± {_stderr(m.stderr)}", str(e.n), *diff))
        _models_table(("METRIC", "SCORE ± STDERR", "N", "DIFF ± STDERR", "BEYOND NOISE"), rows)
    if drawn is not None:
        _say(f"plot: {drawn}")


@eval_app.command("ppl")
def ppl_cmd(model: ModelArg, text: TextArg, ctx: CtxOpt = None, stride: StrideOpt = None,
            threads: ThreadsOpt = None, as_json: JsonOpt = False) -> None:
    """Perplexity of MODEL on TEXT (sliding window), with its standard error."""
    from ..eval.common import record, resolve_model
    from ..eval.ppl import perplexity, read_text

    _check(ctx, stride, threads)
    body = read_text(text)
    m = resolve_model(model, say=_say)
    with progress_bar(not as_json, "windows") as update:
        r = perplexity(m.path, body, ctx=ctx, stride=stride, threads=threads,
                       progress=(lambda d, n: update("perplexity", d, n)) if update else None)
    r.model = m.name
    record("ppl", m, metrics={"ppl": r.ppl, "stderr": r.stderr, "nll": r.nll, "nll_stderr": r.nll_stderr,
                              "tokens": r.tokens},
           settings={"ctx": r.ctx, "stride": r.stride, "text": text.name, "text_tokens": r.text_tokens}, text=body)
    if as_json:
        out.print_json(data=r.to_dict())
        return
    out.print(f"{m.name}: perplexity {num(r.ppl)} ± {num(r.stderr)} over {r.tokens:,} tokens "
              f"(ctx {r.ctx}, stride {r.stride}, {r.windows} windows)", markup=False)


@eval_app.command("kld")
def kld_cmd(
    base: Annotated[str, typer.Argument(help="The reference model (e.g. the f16), or a base saved with --save-base (.npz).")],
    model: ModelArg,
    text: TextArg,
    save_base: Annotated[Optional[Path], typer.Option("--save-base", help="Reuse the base's log-probabilities from FILE (.npz) if it exists, else save them there.")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Keep only the base's K most likely tokens per position (default: all, if they fit in 1 GiB).")] = None,
    ctx: CtxOpt = None, stride: StrideOpt = None, threads: ThreadsOpt = None, as_json: JsonOpt = False,
) -> None:
    """KL divergence of MODEL from BASE on TEXT, and how often they agree."""
    from ..eval.common import record, resolve_model
    from ..eval.kld import kl_divergence
    from ..eval.ppl import read_text

    _check(ctx, stride, threads)
    if top_k is not None and top_k < 1:
        raise LlmdeskError(f"--top-k must be at least 1, got {top_k}")
    body = read_text(text)
    saved = Path(base).suffix == ".npz"
    b = None if saved else resolve_model(base, say=_say)
    m = resolve_model(model, say=_say)
    with progress_bar(not as_json, "windows") as update:
        r = kl_divergence(Path(base).expanduser() if saved else b.path, m.path, body, ctx=ctx, stride=stride,
                          top_k=top_k, save_base=save_base, threads=threads, progress=update)
    r.model = m.name
    if b is not None:
        r.base = b.name
    metrics = r.to_dict()
    for k in ("base", "model", "ctx", "stride", "top_k"):
        metrics.pop(k)
    record("kld", m, metrics=metrics,
           settings={"base": r.base, "base_sha256": b.sha256 if b else None, "ctx": r.ctx, "stride": r.stride,
                     "top_k": r.top_k, "text": text.name}, text=body)
    if save_base is not None and not as_json:
        _say(f"base log-probabilities: {save_base}")
    if as_json:
        out.print_json(data=r.to_dict())
        return
    rows = [
        ("tokens", f"{r.tokens:,}"),
        ("mean KLD", f"{r.mean_kld:.6f} ± {r.kld_stderr:.6f}"),
        ("median KLD", f"{r.median_kld:.6f}"),
        ("99th percentile KLD", f"{r.p99_kld:.6f}"),
        ("max KLD", f"{r.max_kld:.6f}"),
        ("same top token", f"{100 * r.same_top_token:.2f}%"),
        ("mean Δp (correct token)", f"{100 * r.mean_delta_p:+.3f}%"),
        ("RMS Δp", f"{100 * r.rms_delta_p:.3f}%"),
        ("perplexity base / model", f"{num(r.ppl_base)} / {num(r.ppl_model)}"),
        ("perplexity ratio", f"{r.ppl_ratio:.5f} ± {r.extra['ppl_ratio_stderr']:.5f}"),
    ]
    table = Table(box=None, pad_edge=False, show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for k, v in rows:
        table.add_row(k, v)
    out.print(f"{m.name} against {r.base} (ctx {r.ctx}, stride {r.stride}"
              f"{'' if r.top_k is None else f', base top-{r.top_k}'})", markup=False)
    out.print(table)


@app.command()
def results(
    kind: Annotated[Optional[str], typer.Option("--kind", help="Only this kind: eval, ppl, kld, quantize, sweep, bench, ...")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Only this model (its name as listed).")] = None,
    limit: Annotated[int, typer.Option("-n", "--limit", help="At most this many, newest first.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """List stored results (benchmark tasks, perplexity, KL divergence, quantizations, sweeps, benchmarks)."""
    from ..store.results import query

    if limit < 1:
        raise LlmdeskError(f"--limit must be at least 1, got {limit}")
    rows = query(kind, model=model, limit=limit)
    if as_json:
        out.print_json(data=rows)
        return
    if not rows:
        _say("no results yet; measure something with 'llmdesk eval ppl MODEL TEXT' or 'llmdesk quantize ... --sweep'")
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("ID", "TIME", "KIND", "MODEL", "RESULT", "DATA"):
        table.add_column(col, no_wrap=col not in ("RESULT",))
    for r in rows:
        table.add_row(str(r["id"]), _local(r["time"]), r["kind"], r["model"],
                      summarize(r["kind"], r["metrics"], r["settings"]),
                      (r["data_sha256"] or "")[:8])
    out.print(table)


def num(x: float) -> str:
    """A perplexity for people: 4 decimals, or scientific notation when it is huge (random models)."""
    return f"{x:.4f}" if abs(x) < 1e6 else f"{x:.4e}"


def summarize(kind: str, m: dict, settings: dict | None = None) -> str:
    """The few numbers that matter for a result of this kind, on one line."""
    def f(key: str, fmt: str = "{:.4g}") -> str | None:
        v = m.get(key)
        return fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    parts: list[str | None]
    if kind == "ppl":
        parts = [f"ppl {f('ppl')} ± {f('stderr', '{:.2g}')}", f"{m.get('tokens')} tokens"]
    elif kind == "kld":
        parts = [f"mean KLD {f('mean_kld', '{:.5f}')}", f"p99 {f('p99_kld', '{:.4f}')}",
                 f"same top {f('same_top_token', '{:.1%}')}", f"ppl ratio {f('ppl_ratio', '{:.4f}')}"]
    elif kind == "quantize":
        parts = [f"{f('bits_per_weight', '{:.2f}')} bits/weight", f"{f('size', '{:,}')} bytes"]
    elif kind == "sweep":
        parts = [m.get("type"), f"{f('bits_per_weight', '{:.2f}')} bpw", f"ppl {f('ppl')}",
                 f"KLD {f('mean_kld', '{:.5f}')}", f"{f('tokens_per_second', '{:.1f}')} tok/s"]
    elif kind == "eval":
        names = [k for k in m if f"{k}_stderr" in m]
        se = [f(f"{k}_stderr", "{:.3f}") or "n/a" for k in names]
        parts = [(settings or {}).get("task")] + [f"{k} {f(k, '{:.4f}')} ± {s}" for k, s in zip(names, se)] + \
            [f"n {m.get('n')}"]
    elif kind == "judge" and "win_rate" in m:  # pairwise, against settings["against"]
        parts = [f"vs {(settings or {}).get('against')}", f"win rate {f('win_rate', '{:.1%}')}",
                 f"W/T/L {m.get('wins')}/{m.get('ties')}/{m.get('losses')}", f"{m.get('malformed')} malformed"]
    elif kind == "judge":
        parts = [f"score {f('mean', '{:.2f}')} ± {f('stderr', '{:.2f}')}", f"n {m.get('n')}",
                 f"{m.get('malformed')} malformed"]
    else:  # another team's kind: its first few numbers
        parts = [f"{k} {f(k)}" for k in list(m)[:4] if f(k) is not None]
    return ", ".join(p for p in parts if p and "None" not in p)


def _local(ts: str) -> str:
    try:
        return datetime.fromisoformat(ts).astimezone().strftime("%Y-%m-%d %H:%M")
    except (TypeError, ValueError):
        return str(ts)
