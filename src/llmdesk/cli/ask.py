"""`llmdesk ask`: an answer from your documents, citing its sources."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from ..errors import LlmdeskError
from .app import app, err, out
from .run import CtxOpt, ModelOpt, NoLogOpt, SeedOpt, TempOpt, ThreadsOpt, _load, _log, _write


@app.command()
def ask(
    question: Annotated[list[str], typer.Argument(help="The question.")],
    collection: Annotated[str, typer.Option("-c", "--collection", help="The collection to answer from ('llmdesk docs list').")] = "default",
    model: ModelOpt = None,
    k: Annotated[int, typer.Option("-k", help="How many passages to retrieve.")] = 5,
    mode: Annotated[str, typer.Option("--mode", help="How to retrieve: hybrid (BM25 and vectors), bm25 or vector.")] = "hybrid",
    show_sources: Annotated[bool, typer.Option("--show-sources", help="Print each passage under its source.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object: the answer, its citations, the passages.")] = False,
    max_tokens: Annotated[int, typer.Option("-n", "--max-tokens", help="Most tokens in the answer.")] = 512,
    temperature: TempOpt = 0.2,
    seed: SeedOpt = None,
    ctx: CtxOpt = None,
    threads: ThreadsOpt = None,
    no_log: NoLogOpt = False,
) -> None:
    """Answer a question from a collection of your documents, citing the passages as [1], [2].

    The passages go to the model as quoted data, never as instructions; passages that look like
    instructions to the model are marked as flagged."""
    from ..rag.answer import ask as ask_docs, retrieve

    text = " ".join(question).strip()
    if not text:
        raise LlmdeskError("no question: give it as an argument, e.g. llmdesk ask \"how do I rotate the logs?\"")
    if max_tokens < 1:
        raise LlmdeskError(f"--max-tokens must be at least 1, got {max_tokens}")
    hits = retrieve(text, collection, k=k, mode=mode)  # a missing collection fails before the model loads
    m = _load(model, ctx, threads, None, None)
    try:
        a = ask_docs(text, collection, model=m, hits=hits, max_tokens=max_tokens, temperature=temperature, seed=seed,
                     on_text=None if json_ else _write)
    finally:
        m.close()
    r = a.reply
    _log(no_log, model=m.name, prompt=text, response=a.text,
         options={"collection": collection, "k": k, "mode": mode, "temperature": temperature, "seed": seed,
                  "citations": [n for n, _ in a.citations]},
         tokens_in=r.prompt_tokens, tokens_out=r.completion_tokens, duration_s=r.total_s)
    if json_:
        out.print_json(json.dumps({"model": m.name, **a.to_dict()}, ensure_ascii=False))
        return
    sys.stdout.write("\n")
    if a.passages:
        sys.stdout.write("\nSources:\n")
        for line, hit in zip(a.sources(), a.passages):
            sys.stdout.write(line + "\n")
            if show_sources:
                sys.stdout.write("".join(f"    {row}\n" for row in hit.text.strip("\n").splitlines()) + "\n")
    else:
        err.print(f"(nothing in '{collection}' matched the question)", style="dim", markup=False)
    if a.dropped:
        err.print(f"({len(a.dropped)} more passage{'s' if len(a.dropped) > 1 else ''} retrieved did not fit in the "
                  f"context of {m.n_ctx} tokens and were left out: " + "; ".join(h.where for h in a.dropped) + ")",
                  style="yellow", markup=False)
    if a.unknown_citations:
        err.print(f"(the answer cites {', '.join(f'[{n}]' for n in a.unknown_citations)}, which no passage has: "
                  f"there were {len(a.passages)})", style="yellow", markup=False)
    if a.flagged:
        err.print(f"(passage{'s' if len(a.flagged) > 1 else ''} {', '.join(f'[{n}]' for n in a.flagged)} looked like "
                  "instructions to the model: quoted as data, marked flagged)", style="yellow", markup=False)
