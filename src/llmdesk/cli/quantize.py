"""`llmdesk quantize` (one type, or a --sweep over many) and `llmdesk imatrix`.

Thin wrappers over llmdesk.quantize: workflow.quantize_model, sweep.sweep, imatrix.compute_imatrix.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer

from ..errors import LlmdeskError
from .app import app, err, out

ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="CPU threads (default: all cores).")]


class _Display:
    """What a long quantization shows on stderr: a line saying what is happening and a bar of
    tensors, both transient (nothing is left behind when done); nothing when stderr is not a
    terminal (piped, captured), so that errors stay one line."""

    def __init__(self, bar=None):
        self.bar = bar
        self.status = bar.add_task("", total=None, tensor="", visible=False) if bar else None
        self.tasks: dict[str, int] = {}

    def say(self, msg: str) -> None:
        if self.bar:
            self.bar.update(self.status, description=msg, visible=True)

    def progress(self, label: str, done: int, total: int, detail: str = "") -> None:
        if not self.bar:
            return
        if label not in self.tasks:
            self.tasks[label] = self.bar.add_task(label, total=total, tensor="")
        self.bar.update(self.tasks[label], completed=done, total=total, tensor=detail)
        if done >= total:  # the next run starts a fresh bar
            self.bar.remove_task(self.tasks.pop(label))

    def tensors(self, done: int, total: int, tensor: str) -> None:
        self.progress("quantizing (tensors)", done, total, tensor)


@contextmanager
def display(enabled: bool = True) -> Iterator[_Display]:
    if not (enabled and err.is_terminal):
        yield _Display()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("[dim]{task.fields[tensor]}"), console=err, transient=True) as bar:
        yield _Display(bar)


def _threads(threads: int | None) -> int | None:
    if threads is not None and threads < 1:
        raise LlmdeskError(f"--threads must be at least 1, got {threads}")
    return threads


@app.command()
def quantize(
    args: Annotated[Optional[list[str]], typer.Argument(metavar="MODEL [TYPE]", help="MODEL TYPE; with --sweep, one or more MODELs. A MODEL is a .gguf file (f16/bf16/f32), NAME[:TAG] from 'llmdesk list', or a Hugging Face checkpoint folder (converted first).")] = None,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Also write the quantized model to this file (it is always added to the store).")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="NAME[:TAG] in the store (default: the model's name, the type as tag).")] = None,
    imatrix: Annotated[Optional[Path], typer.Option("--imatrix", help="Importance matrix (from 'llmdesk imatrix' or llama-imatrix); needed for IQ1/IQ2 types, IQ3_XXS and Q2_K_S.")] = None,
    keep_output_f16: Annotated[bool, typer.Option("--keep-output-f16", help="Keep the output projection in F16.")] = False,
    threads: ThreadsOpt = None,
    sweep: Annotated[Optional[str], typer.Option("--sweep", help="TYPE,TYPE,...: quantize to each and measure size, perplexity, KL divergence and speed.")] = None,
    text: Annotated[Optional[Path], typer.Option("--text", help="With --sweep: the text to measure on.")] = None,
    report: Annotated[Optional[Path], typer.Option("--report", help="With --sweep: write the Markdown table here.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="With --sweep: write the size-quality plot here (.png or .svg).")] = None,
    ctx: Annotated[Optional[int], typer.Option("--ctx", help="With --sweep: window length in tokens (default 512).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    list_types: Annotated[bool, typer.Option("--types", help="List the quantization types and exit.")] = False,
) -> None:
    """Quantize a model with llama.cpp's quantizer and add it to the store.

    'llmdesk quantize MODEL Q4_K_M' makes NAME:q4_k_m. 'llmdesk quantize MODEL [MODEL...] --sweep
    Q8_0,Q4_K_M,Q2_K --text FILE' shows what each type costs, in a table and a plot.
    'llmdesk quantize --types' lists the types.
    """
    threads = _threads(threads)
    args = args or []
    if list_types:
        _print_types(as_json)
        return
    if sweep is not None:
        _sweep(args, sweep, text, report, plot, ctx, imatrix, threads, as_json, output, name)
        return
    for flag, val in (("--text", text), ("--report", report), ("--plot", plot), ("--ctx", ctx)):
        if val is not None:
            raise LlmdeskError(f"{flag} goes with --sweep TYPE,TYPE,...")
    if len(args) != 2:
        raise LlmdeskError("give MODEL and TYPE, e.g. 'llmdesk quantize model-f16.gguf Q4_K_M' "
                           "(or several MODELs with --sweep TYPE,TYPE,...)")
    from ..quantize.core import quant_type
    from ..quantize.workflow import quantize_model
    from .models import human_size

    model, type_name = args
    quant_type(type_name)  # an unknown type is reported before anything else
    with display(not as_json) as show:
        r = quantize_model(model, type_name, out=output, name=name, imatrix=imatrix, threads=threads,
                           keep_output_f16=keep_output_f16, progress=show.tensors,
                           say=lambda m: err.print(m, markup=False))
    if as_json:
        out.print_json(data=r.to_dict())
        return
    where = f"  -> {r.path}" if output else ""
    out.print(f"{r.ref}  {r.type}  {human_size(r.size)}  {r.bits_per_weight:.2f} bits/weight  "
              f"(from {r.source}, {r.seconds:.1f} s){where}", markup=False)


def _print_types(as_json: bool) -> None:
    from rich.table import Table

    from ..quantize.core import QUANT_TYPES

    if as_json:
        out.print_json(data={n: q._asdict() for n, q in QUANT_TYPES.items()})
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("TYPE", "IMATRIX", "NOTE (llama.cpp's figures)"):
        table.add_column(col, no_wrap=col != "NOTE (llama.cpp's figures)")
    for n, q in QUANT_TYPES.items():
        table.add_row(n, "required" if q.needs_imatrix else "", q.description)
    out.print(table)


def _sweep(models, types, text, report, plot, ctx, imatrix, threads, as_json, output, name) -> None:
    from ..eval.ppl import read_text
    from ..quantize.sweep import sweep as run_sweep

    if output is not None or name is not None:
        raise LlmdeskError("-o/--name name one result; a --sweep adds each type to the store as NAME:TYPE")
    if not models:
        raise LlmdeskError("give at least one MODEL to sweep")
    if text is None:
        raise LlmdeskError("--sweep needs --text FILE, the text to measure perplexity and KL divergence on")
    types_list = [t for t in (s.strip() for s in types.split(",")) if t]
    body = read_text(text)
    with display(not as_json) as show:
        res = run_sweep(models, types_list, body, ctx=ctx, imatrix=imatrix, threads=threads,
                        progress=show.tensors, say=show.say)
    md = res.markdown()
    if report is not None:
        report.write_text(md + "\n")
        err.print(f"report: {report}", markup=False)
    if plot is not None:
        res.plot(plot)
        err.print(f"plot: {plot}", markup=False)
    if as_json:
        out.print_json(data=res.to_dict())
    else:
        out.print(md, markup=False)


@app.command("imatrix")
def imatrix_cmd(
    model: Annotated[str, typer.Argument(help="A .gguf file (f16/f32 is best), NAME[:TAG], or an HF checkpoint folder.")],
    text: Annotated[Path, typer.Argument(help="Calibration text (a few hundred KB of varied text is typical).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write it (.gguf: llama.cpp's format; .dat: the legacy one).")],
    ctx: Annotated[int, typer.Option("--ctx", help="Tokens per chunk.")] = 512,
    threads: ThreadsOpt = None,
) -> None:
    """Compute an importance matrix from calibration text, for 'llmdesk quantize --imatrix'."""
    from ..eval.common import resolve_model
    from ..eval.ppl import read_text
    from ..quantize.imatrix import compute_imatrix, save_imatrix

    threads = _threads(threads)
    if ctx < 16:
        raise LlmdeskError(f"--ctx must be at least 16, got {ctx}")
    body = read_text(text)
    src = resolve_model(model, say=lambda m: err.print(m, markup=False))
    with display() as show:
        im = compute_imatrix(src.path, body, n_ctx=ctx, threads=threads, dataset=text.name,
                             progress=lambda d, n: show.progress("importance matrix (chunks)", d, n))
    save_imatrix(im, output)
    out.print(f"{output}: {len(im.entries)} weight matrices, {im.chunk_count} chunks of {im.chunk_size} tokens "
              f"(from {src.name} on {text.name})", markup=False)
