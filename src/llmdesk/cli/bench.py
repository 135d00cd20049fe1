"""`llmdesk bench` (model speed, like llama-bench; `bench serve URL` is the server load generator)
and `llmdesk make-model` (random weights, real shapes)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..errors import LlmdeskError
from .app import app, err, out
from .run import GpuLayersOpt

try:  # typer >= 0.29 carries its own copy of click
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover
    from click import exceptions as click_exc

_EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command(context_settings=_EXTRA)
def bench(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="A .gguf path, NAME[:TAG] from 'llmdesk list' or hf:...; or 'serve URL' to load-test a server.")],
    prompt: Annotated[Optional[list[str]], typer.Option("-p", "--n-prompt", help="Prompt sizes to process, e.g. 128,512 (default 512; 0 skips).")] = None,
    gen: Annotated[Optional[list[str]], typer.Option("-n", "--n-gen", help="Generation lengths, e.g. 128 (default 128; 0 skips).")] = None,
    threads: Annotated[Optional[list[str]], typer.Option("-t", "--threads", help="Thread counts, e.g. 1,2,4 or 1-4 (default: all cores).")] = None,
    batch: Annotated[Optional[list[str]], typer.Option("-b", "--batch", help="Batch sizes, e.g. 128,512 (default 512).")] = None,
    reps: Annotated[int, typer.Option("-r", "--reps", help="Timed repetitions per test (after one untimed warm-up).")] = 5,
    gpu_layers: GpuLayersOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print the rows as CSV.")] = False,
    as_md: Annotated[bool, typer.Option("--md", help="Print a Markdown table.")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Draw tokens/s against what was varied (PNG/SVG).")] = None,
    compare: Annotated[bool, typer.Option("--compare", help="Show earlier runs of the same model (same file hash) beside this one.")] = False,
    no_save: Annotated[bool, typer.Option("--no-save", help="Do not store this run in the results database.")] = False,
) -> None:
    """Measure prompt processing (ppN) and generation (tgN) tokens/s, time to first token, the
    memory bandwidth achieved and the fraction of this machine's bandwidth roofline, for every
    combination of -p/-n/-t/-b, mean +- std over -r repetitions after a warm-up, through the same
    Engine `llmdesk run` and `llmdesk serve` use. Runs are stored; --compare shows earlier ones.

    `llmdesk bench serve URL [--concurrency 1,4,16] [--requests N] [--prompt-tokens N]
    [--max-tokens N] [--api-key KEY] [--model NAME] [--json]` load-tests an OpenAI-compatible
    server instead."""
    if model == "serve":
        _serve(ctx.args, as_json)
        return
    if ctx.args:
        raise click_exc.UsageError(f"unexpected argument(s): {' '.join(ctx.args)}", ctx=ctx)
    from ..bench.core import earlier_runs, parse_list, run_bench, store_run
    from ..runtime.llama import parse_gpu_layers

    if sum((as_json, as_csv, as_md)) > 1:
        raise LlmdeskError("choose one of --json, --csv and --md")
    prompts = parse_list(prompt, "-p", [512])
    gens = parse_list(gen, "-n", [128])
    thread_list = parse_list(threads, "-t", [], minimum=1) or None
    batches = parse_list(batch, "-b", [512], minimum=1)
    ngl = parse_gpu_layers(gpu_layers)
    if plot is not None and plot.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise LlmdeskError(f"--plot writes .png, .svg or .pdf files, not '{plot.name}'")
    if reps < 1:
        raise LlmdeskError(f"-r/--reps must be at least 1, got {reps}")
    if not any(n > 0 for n in prompts + gens):
        raise LlmdeskError("nothing to measure: give -p and/or -n values above 0")
    # bad files are one-line errors before the progress bar starts
    from ..formats.gguf import read_gguf
    from ..store.refs import resolve

    read_gguf(resolve(model).path)

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task("loading", total=None)

        def progress(label: str, done: int, total: int) -> None:
            bar.update(task, description=label, completed=done, total=total)

        run = run_bench(model, prompts=prompts, gens=gens, threads=thread_list, batches=batches, reps=reps,
                        progress=progress, gpu_layers=ngl)
    earlier = earlier_runs(run) if compare else []
    if not no_save:
        store_run(run)
    if as_json:
        out.print(json.dumps([r.to_dict() for r in run.rows], indent=1), markup=False, highlight=False)
    elif as_csv:
        buf = io.StringIO()
        fields = ["test", "n_prompt", "n_gen", "threads", "batch", "reps", "tokens_per_second", "stddev",
                  "ttft_ms", "achieved_gbs", "roofline_fraction", "achieved_tflops"]
        w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in run.rows:
            w.writerow(r.to_dict())
        out.print(buf.getvalue().rstrip("\n"), markup=False, highlight=False)
    elif as_md:
        out.print(markdown(run), markup=False, highlight=False)
    else:
        _print_table(run)
    if compare:
        _print_compare(run, earlier)
    if plot is not None:
        from ..bench.plot import plot_run

        err.print(f"plot: {plot_run(run, plot)}", markup=False)


def markdown(run) -> str:
    lines = [f"{run.model} ({run.file_type or '?'}, {run.model_bytes / 2**30:.2f} GiB, {run.n_params / 1e9:.2f} B params) "
             f"on {run.machine.get('cpu')}", "",
             "| test | threads | batch | tokens/s | TTFT ms | GB/s | of roofline |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in run.rows:
        lines.append(f"| {r.test} | {r.threads} | {r.batch} | {r.tokens_per_second:.2f} ± {r.stddev:.2f} | "
                     f"{'' if r.ttft_ms is None else f'{r.ttft_ms:.0f}'} | "
                     f"{'' if r.achieved_gbs is None else f'{r.achieved_gbs:.1f}'} | "
                     f"{'' if r.roofline_fraction is None else f'{100 * r.roofline_fraction:.0f}%'} |")
    return "\n".join(lines)


def _print_table(run) -> None:
    bw = run.machine.get("bandwidth_gbs") or 0
    out.print(f"{run.model} ({run.file_type or '?'}, {run.model_bytes / 2**30:.2f} GiB, {run.n_params / 1e9:.2f} B params) "
              f"on {run.machine.get('cpu')}" + (f", bandwidth {bw:.1f} GB/s (measured)" if bw else ""), markup=False)
    t = Table(header_style="bold", box=None, pad_edge=False)
    for col in ("test", "threads", "batch", "tokens/s", "TTFT ms", "GB/s", "of roofline"):
        t.add_column(col, justify="left" if col == "test" else "right")
    for r in run.rows:
        t.add_row(r.test, str(r.threads), str(r.batch), f"{r.tokens_per_second:.2f} ± {r.stddev:.2f}",
                  "" if r.ttft_ms is None else f"{r.ttft_ms:.0f}",
                  "" if r.achieved_gbs is None else f"{r.achieved_gbs:.1f}",
                  "" if r.roofline_fraction is None else f"{100 * r.roofline_fraction:.0f}%")
    out.print(t)


def _print_compare(run, earlier: list[dict]) -> None:
    if not earlier:
        err.print(f"no earlier runs of this model (sha256 {run.sha256[:12]}) with these tests", markup=False)
        return
    t = Table(title="earlier runs of this model", header_style="bold", box=None, pad_edge=False)
    for col in ("when", "test", "threads", "batch", "tokens/s", "vs now"):
        t.add_column(col, justify="left" if col in ("when", "test") else "right")
    now = {(r.test, r.threads, r.batch): r.tokens_per_second for r in run.rows}
    for res in earlier:
        s, m = res["settings"], res["metrics"]
        cur = now.get((s.get("test"), s.get("threads"), s.get("batch")))
        old = float(m.get("tokens_per_second") or 0)
        delta = f"{100 * (cur - old) / old:+.1f}%" if cur and old else ""
        t.add_row(res["time"], s.get("test", "?"), str(s.get("threads")), str(s.get("batch")),
                  f"{old:.2f} ± {float(m.get('stddev') or 0):.2f}", delta)
    out.print(t)


# `llmdesk bench serve URL ...`: the load generator's options are a typer app of their own, to
# which `bench` hands the rest of its command line (`bench MODEL` keeps its own options, and a
# click group cannot take both a MODEL argument and a `serve` subcommand)
serve_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


@serve_app.command()
def bench_serve(
    url: Annotated[Optional[str], typer.Argument(help="The server, e.g. http://127.0.0.1:8080 (or its /v1).")] = None,
    concurrency: Annotated[Optional[list[str]], typer.Option("-c", "--concurrency", help="Concurrent requests, e.g. 1,4,16 (default 1,2,4,8).")] = None,
    requests: Annotated[int, typer.Option("--requests", help="Requests at each concurrency.")] = 32,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", help="Prompt length in tokens.")] = 128,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Tokens to generate per request.")] = 128,
    api_key: Annotated[Optional[str], typer.Option("--api-key", help="The server's API key.")] = None,
    model: Annotated[Optional[str], typer.Option("-m", "--model", help="The model to ask for (default: the server's first).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
) -> None:
    """Load-test an OpenAI-compatible server: tokens/s, time to first token and latency at each
    concurrency (bench/load.py)."""
    from ..bench.core import parse_list

    if not url:
        raise LlmdeskError("bench serve needs the server's URL, e.g. llmdesk bench serve http://127.0.0.1:8080")
    for flag, n in (("--requests", requests), ("--prompt-tokens", prompt_tokens), ("--max-tokens", max_tokens)):
        if n < 1:
            raise LlmdeskError(f"{flag} must be at least 1, got {n}")
    levels = parse_list(concurrency, "--concurrency", [1, 2, 4, 8], minimum=1)
    try:
        from ..bench import load
    except ImportError:
        raise LlmdeskError("the server load generator (llmdesk.bench.load) is not installed in this build") from None
    main = getattr(load, "main", None)
    if main is None:
        raise LlmdeskError("the server load generator (llmdesk.bench.load.main) is not available in this build")
    extra = {k: v for k, v in (("api_key", api_key), ("model", model)) if v is not None}
    rc = main(url=url, concurrency=levels, requests=requests, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
              json_out=as_json, **extra)
    if isinstance(rc, int) and rc != 0:
        raise LlmdeskError(f"no request to {url} succeeded")


def _serve(args: list[str], as_json: bool) -> None:
    """`llmdesk bench serve ...`: the rest of the command line to `serve_app` (`bench` has already
    taken --json, an option of both)."""
    command = typer.main.get_command(serve_app)
    command.main(args=args + (["--json"] if as_json else []), prog_name="llmdesk bench serve", standalone_mode=False)


@app.command("make-model")
def make_model_cmd(
    preset: Annotated[str, typer.Option("--preset", help="A model preset (see 'llmdesk fit --presets').")],
    type_name: Annotated[str, typer.Option("--type", help="f32, f16, bf16, q8_0, or a llama.cpp quantization (q4_k_m, q4_0, ...).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The .gguf file to write.")],
    layers: Annotated[Optional[int], typer.Option("--layers", help="Fewer layers than the real model (same widths), for quick tests.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed of the weights.")] = 0,
    threads: Annotated[Optional[int], typer.Option("--threads", help="Quantizer threads.")] = None,
) -> None:
    """Write a GGUF with random weights and the exact shapes of a real model (a fit preset), for
    benchmarks and memory checks without downloads. It writes gibberish: only its size, memory and
    speed are real."""
    from ..bench.make_model import check_supported, make_model, with_depth
    from ..fit.presets import get_preset
    from ..fit.quants import normalize_quant

    shape = get_preset(preset)
    normalize_quant(type_name)
    check_supported(shape)
    with_depth(shape, layers)  # bad values fail before the progress bar: one clean line
    if output.is_dir() or not output.parent.exists():
        raise LlmdeskError(f"{output}: is a directory" if output.is_dir() else f"{output.parent}: no such directory")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task(f"writing {shape.name} (random weights)", total=None)

        def progress(done: int, total: int, name: str) -> None:
            bar.update(task, description=f"quantizing to {type_name.lower()}", completed=done, total=total)

        path = make_model(shape, type_name, output, seed=seed, threads=threads, layers=layers, progress=progress)
    from ..formats.gguf import read_gguf

    info = read_gguf(path)
    out.print(f"{path}  {info.file_size / 2**30:.2f} GiB  {info.parameter_count / 1e9:.2f} B params  "
              f"{info.file_type}  ({shape.name}{f', {layers} layers' if layers else ''}, random weights)", markup=False)
