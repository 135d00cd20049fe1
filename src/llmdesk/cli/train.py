"""`llmdesk train`: pretrain a small Llama model from scratch on text files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import LlmdeskError
from .app import app, err, out


@app.command()
def train(
    corpus: Annotated[list[Path], typer.Argument(help="Text files or folders: .txt, .md, .jsonl (a \"text\" or \"messages\" field).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder: model.gguf, hf/, loss.png, metrics.json.")],
    preset: Annotated[str, typer.Option("--preset", help="Model size: tiny, 1m, 5m, 25m, 100m.")] = "1m",
    tokenizer: Annotated[Optional[Path], typer.Option("--tokenizer", help="Reuse this tokenizer.json (or its folder).")] = None,
    vocab_size: Annotated[Optional[int], typer.Option("--vocab-size", help="Train a new BPE tokenizer of this size.")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps.")] = None,
    tokens: Annotated[Optional[int], typer.Option("--tokens", help="Train on this many tokens (sets --steps).")] = None,
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", help="Tokens per training sequence (and the context length).")] = None,
    batch: Annotated[Optional[int], typer.Option("--batch", help="Sequences per step.")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed: the same seed gives the same model.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUTPUT/checkpoint.pt.")] = False,
    export_type: Annotated[str, typer.Option("--type", help="GGUF tensor type of model.gguf: f32, f16, bf16, q8_0.")] = "f16",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Pretrain a small Llama-architecture model on your text, and export it as HF and GGUF.

    Trains a byte-level BPE tokenizer (or reuses one), holds out a validation split, reports
    validation loss and perplexity, checkpoints, resumes exactly (--resume), and writes a loss
    curve. Run the result with: llmdesk run -m OUTPUT/model.gguf
    """
    from ..train.config import make_config

    if tokenizer is not None and vocab_size is not None:
        raise LlmdeskError("give --tokenizer or --vocab-size, not both")
    if steps is not None and tokens is not None:
        raise LlmdeskError("give --steps or --tokens, not both")
    cfg = make_config(preset, vocab_size=vocab_size, seq_len=seq_len, batch=batch, lr=lr, seed=seed, steps=steps)
    if tokens is not None:
        if tokens < 1:
            raise LlmdeskError(f"--tokens must be at least 1, got {tokens}")
        cfg = make_config(preset, vocab_size=vocab_size, seq_len=seq_len, batch=batch, lr=lr, seed=seed,
                          steps=max(1, -(-tokens // (cfg.batch * cfg.seq_len))))

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..train.loop import train as run_train

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=err, transient=False)
    task = None

    def on_event(kind: str, d: dict) -> None:
        nonlocal task
        if kind == "data":
            err.print(f"corpus: {d['documents']} documents, {d['train_tokens']:,} training tokens, "
                      f"{d['val_tokens']:,} validation tokens, vocabulary {d['vocab']}", markup=False)
        elif kind == "start":
            err.print(f"model: {d['params'] / 1e6:.2f}M parameters on {d['device']}"
                      + (f", resuming at step {d['start']}" if d["start"] else ""), markup=False)
            task = progress.add_task("training", total=d["steps"], completed=d["start"], info="")
        elif kind == "step" and task is not None:
            progress.update(task, completed=d["step"],
                            info=f"loss {d['loss']:.3f} · {d['tokens_per_second']:,.0f} tokens/s")
        elif kind == "eval":
            progress.console.print(f"step {d['step']}: validation loss {d['val_loss']:.3f}, "
                                   f"perplexity {d['val_ppl']:.2f}", markup=False)

    with progress:
        res = run_train(corpus, output, cfg, tokenizer=tokenizer, resume=resume,
                        export_type=export_type.lower(), on_event=on_event)
    if as_json:
        out.print(json.dumps(res.to_dict()), markup=False)
        return
    ppl = f", validation perplexity {res.val_ppl:.2f}" if res.val_ppl is not None else ""
    out.print(f"trained {res.n_params / 1e6:.2f}M parameters for {res.steps} steps "
              f"({res.tokens_seen:,} tokens, {res.seconds:.0f} s){ppl}", markup=False)
    out.print(f"wrote {res.gguf} · {res.hf_dir} · {res.loss_png}", markup=False)
    out.print(f"run it: llmdesk run -m {res.gguf}", markup=False)
