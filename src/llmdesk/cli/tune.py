"""`llmdesk tune`: fine-tune a model on your own data (LoRA, QLoRA, full)."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import LlmdeskError
from .app import app, err, out


@app.command()
def tune(
    ctx: typer.Context,
    args: Annotated[list[str], typer.Argument(metavar="BASE DATA...", help="The base model (an HF folder, a 'llmdesk train' output folder, a .gguf or NAME[:TAG]) then the data files (.jsonl, .json, .csv, .parquet); with --base, only data files.")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Output folder: adapter/, merged/, checkpoint.pt, loss.png, metrics.json.")] = None,
    base: Annotated[Optional[str], typer.Option("--base", help="The base model, when not given first (as with --inspect).")] = None,
    method: Annotated[str, typer.Option("--method", help="lora, qlora (4-bit base: bitsandbytes and CUDA), full (all weights), dpo (preference pairs: prompt/chosen/rejected) or grpo (prompts and --reward graders); dpo and grpo train LoRA.")] = "lora",
    rank: Annotated[int, typer.Option("--rank", help="LoRA rank.")] = 16,
    alpha: Annotated[float, typer.Option("--alpha", help="LoRA alpha (the update is scaled by alpha/rank).")] = 32.0,
    dropout: Annotated[float, typer.Option("--dropout", help="LoRA dropout.")] = 0.05,
    targets: Annotated[str, typer.Option("--targets", help="Modules LoRA adapts: q_proj,v_proj,... or all-linear.")] = "all-linear",
    epochs: Annotated[Optional[float], typer.Option("--epochs", help="Passes over the data (default 1).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps (instead of --epochs).")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (default 2e-4 for LoRA, 2e-5 for full).")] = None,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Longest example in tokens; a longer row is an error naming it (or --truncate).")] = 1024,
    batch: Annotated[int, typer.Option("--batch", help="Examples per micro-batch.")] = 4,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Micro-batches per optimizer step.")] = 1,
    val: Annotated[Optional[Path], typer.Option("--val", help="Validation data file (default: --val-split of the rows).")] = None,
    val_split: Annotated[float, typer.Option("--val-split", help="Share of the rows held out for validation.")] = 0.1,
    eval_every: Annotated[Optional[int], typer.Option("--eval-every", help="Validation loss (and a checkpoint) every N steps (default: 10 times a run).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed: the same seed gives the same run.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUTPUT/checkpoint.pt (dpo and grpo: OUTPUT/trainer/), exactly.")] = False,
    merge: Annotated[bool, typer.Option("--merge", help="Also write the merged model (OUTPUT/merged/).")] = False,
    gguf: Annotated[Optional[str], typer.Option("--gguf", help="Convert the merged model to GGUF of this type (f16, q8_0, q4_k_m, ...) and add it to the store as NAME:TYPE.")] = None,
    lora_gguf: Annotated[bool, typer.Option("--lora-gguf", help="Also write the adapter as a llama.cpp LoRA GGUF (OUTPUT/adapter.gguf), to run with --lora beside the base's GGUF.")] = False,
    name: Annotated[Optional[str], typer.Option("--name", help="With --gguf: the store NAME (default: the output folder's name).")] = None,
    train_on: Annotated[str, typer.Option("--train-on", help="assistant (only the assistant turns and their end tokens) or all.")] = "assistant",
    chat_template: Annotated[Optional[str], typer.Option("--chat-template", help="Render the data with this template (a built-in name: chatml, llama-3, ...; or a .jinja file) instead of the base's; the merged model and its GGUF carry it.")] = None,
    truncate: Annotated[bool, typer.Option("--truncate", help="Cut rows longer than --seq-len to that length (else they are an error).")] = False,
    inspect: Annotated[bool, typer.Option("--inspect", help="Show the token lengths and a few rendered rows with the trained tokens marked; no training.")] = False,
    html: Annotated[Optional[Path], typer.Option("--html", help="With --inspect: also write the rendered rows to this HTML file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    reward: Annotated[Optional[list[str]], typer.Option("--reward", help="grpo: graders, comma-separated or repeated: exact[:COLUMN], regex:PATTERN, numeric[:COLUMN[:TOL]], json[:SCHEMA.json], python:FILE.py:FUNCTION, judge:MODEL.")] = None,
    reward_weights: Annotated[Optional[str], typer.Option("--reward-weights", help="grpo: a weight per grader, comma-separated (default 1 each).")] = None,
    beta: Annotated[float, typer.Option("--beta", help="dpo: how far from the base the preferences may pull the model (KL weight).")] = 0.1,
    sft_weight: Annotated[float, typer.Option("--sft-weight", help="dpo: weight of the chosen answers' own loss beside the preference loss (RPO; keeps DPO from lowering the chosen answers with the rejected ones); 0: plain DPO.")] = 0.0,
    generations: Annotated[int, typer.Option("--generations", help="grpo: completions per prompt, scored against each other.")] = 4,
    max_completion: Annotated[int, typer.Option("--max-completion", help="grpo: tokens per completion; dpo: of chosen/rejected.")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", help="grpo: sampling temperature of the completions.")] = 1.0,
    processes: Annotated[int, typer.Option("--processes", help="Train data parallel in N processes on this machine (one a GPU, else CPU processes), as 'accelerate launch --num_processes N' would; --batch is each one's share of a micro-batch (dpo: pairs, grpo: completions; grpo's --batch x N must be a multiple of --generations).")] = 1,
    fsdp: Annotated[bool, typer.Option("--fsdp", help="With --processes N (or under accelerate launch / torchrun): shard the weights, gradients and optimizer state over the processes (FSDP), each holding 1/N, instead of a whole copy in each.")] = False,
) -> Optional[int]:
    """Fine-tune a model on your data: LoRA (default), QLoRA or all weights.

    'llmdesk tune BASE chats.jsonl -o out --merge --gguf q4_k_m' trains, writes the adapter
    (out/adapter/, PEFT format), the merged model (out/merged/) and a GGUF in the store.
    'llmdesk tune chats.jsonl --base BASE --inspect' shows what would be trained.
    'llmdesk tune BASE chats.jsonl -o out --processes 2' trains data parallel in two processes, as
    'accelerate launch --multi_gpu --num_processes 2 -m llmdesk.cli.main tune BASE chats.jsonl -o out' does;
    add --fsdp to shard the model over them.
    """
    base_ref, data = (base, list(args)) if base is not None else (args[0], list(args[1:]))
    if not data:
        raise LlmdeskError("give the data files after BASE (or BASE with --base)")
    if inspect:
        _inspect(base_ref, data, seq_len, html, train_on, chat_template)
        return
    if html is not None:
        raise LlmdeskError("--html goes with --inspect")
    if output is None:
        raise LlmdeskError("give the output folder with -o DIR")
    if epochs is not None and steps is not None:
        raise LlmdeskError("give --epochs or --steps, not both")
    if name is not None and gguf is None:
        raise LlmdeskError("--name goes with --gguf TYPE")
    if processes < 1:
        raise LlmdeskError(f"--processes must be at least 1, got {processes}")
    if fsdp and processes == 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        raise LlmdeskError("--fsdp shards the model over several processes: add --processes N (or start the "
                           "command with accelerate launch or torchrun)")
    if fsdp and method in ("dpo", "grpo"):
        from ..train.rewards import no_fsdp

        raise no_fsdp(method)
    if processes > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LlmdeskError("--processes under accelerate launch (or torchrun): give the processes to one of them")
    if method in ("dpo", "grpo"):
        return _tune_rewards(ctx, method, base_ref, data, output, rank=rank, alpha=alpha, targets=targets, steps=steps,
                             epochs=epochs, lr=lr, batch=batch, grad_accum=grad_accum, seed=seed, val_split=val_split,
                             resume=resume, processes=processes, lora_gguf=lora_gguf, merge=merge, gguf=gguf,
                             save_every=eval_every or 0, sft_weight=sft_weight,
                             name=name, reward=reward, reward_weights=reward_weights, beta=beta,
                             generations=generations, max_completion=max_completion, temperature=temperature,
                             seq_len=seq_len, as_json=as_json)
    if reward or reward_weights:
        raise LlmdeskError("--reward goes with --method grpo")
    if sft_weight:
        raise LlmdeskError("--sft-weight goes with --method dpo")

    from ..train.tune import TuneConfig, process_rank, tune as run_tune

    cfg = TuneConfig(method=method, rank=rank, alpha=alpha, dropout=dropout, targets=targets, seq_len=seq_len,
                     train_on=train_on, truncate=truncate, val_split=val_split, epochs=epochs, steps=steps or 0,
                     lr=lr or 0.0, batch=batch, grad_accum=grad_accum, eval_every=eval_every or 0, seed=seed)
    if steps is not None and steps < 1:
        raise LlmdeskError(f"--steps must be at least 1, got {steps}")
    quantizer = None
    if gguf is not None:
        from ..quantize.core import quant_type
        from ..quantize.workflow import quantize_model

        if gguf.lower() not in ("f32", "f16", "bf16", "q8_0"):  # the converter's own types
            quant_type(gguf)  # an unknown type: one line now, not after training
        quantizer = quantize_model
    if processes > 1:  # the settings and the base are checked: now the same command in each process
        from ..train.tune import find_base

        find_base(base_ref)
        return _launch(ctx, processes)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..runtime.llama import LlamaModel

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=err, transient=False,
                        disable=as_json or not err.is_terminal)
    task = None

    def say(text: str) -> None:
        if not as_json:
            progress.console.print(text, markup=False)

    def on_event(kind: str, d: dict) -> None:
        nonlocal task
        if kind == "data":
            say(f"data: {d['train_examples']} training examples, {d['val_examples']} validation, "
                f"{d['trained_tokens']:,} of {d['total_tokens']:,} tokens trained; {d['steps']} steps")
            for notice in d["notices"]:
                say(f"note: {notice}")
        elif kind == "start":
            say(f"model: {d['trainable'] / 1e6:.3g}M of {d['total'] / 1e6:.3g}M parameters trained "
                f"({d['method']}) on {d['device']}" + (f", resuming at step {d['start']}" if d["start"] else ""))
            task = progress.add_task("tuning", total=d["steps"], completed=d["start"], info="")
        elif kind == "step" and task is not None:
            progress.update(task, completed=d["step"],
                            info=f"loss {d['loss']:.3f} · {d['run_tokens_per_second']:,.0f} tokens/s")
        elif kind == "eval":
            say(f"step {d['step']}: validation loss {d['val_loss']:.4f}")
        elif kind == "interrupted":
            say(f"interrupted: checkpoint {d['checkpoint']} at step {d['step']}; continue with --resume"
                if d["checkpoint"] else "interrupted before the first checkpoint; start again")
        elif kind == "notice":
            say(f"note: {d['text']}")
        elif kind == "status" and d["text"] not in ("tokenizer",):
            say(d["text"] + " ...")

    with progress, _one_voice():
        res = run_tune(base_ref, data, output, cfg, val=val, resume=resume, merge=merge, gguf=gguf, lora_gguf=lora_gguf, name=name,
                       chat_template=chat_template, fsdp=fsdp, quantize_with=quantizer, check_with=LlamaModel, on_event=on_event)
    if process_rank() != 0:  # under accelerate launch: the first process speaks for all
        return None
    if as_json:
        out.print(json.dumps(res.to_dict()), markup=False)
        return None
    vl = (f", validation loss {res.first_val_loss:.4f} -> {res.val_loss:.4f}"
          if res.val_loss is not None and res.first_val_loss is not None else "")
    out.print(f"tuned {res.trainable_params / 1e6:.3g}M parameters for {res.steps} steps ({res.tokens_seen:,} tokens, "
              f"{res.tokens_per_second:,.0f} tokens/s, {res.seconds:.0f} s){vl}", markup=False)
    wrote = [str(p) for p in (res.adapter, res.lora_gguf, res.merged, res.gguf, res.loss_png) if p is not None]
    out.print("wrote " + " · ".join(wrote), markup=False)
    if res.registered:
        out.print(f"run it: llmdesk run -m {res.registered}", markup=False)
    return None


def _tune_rewards(ctx: typer.Context, method: str, base_ref: str, data: list[str], output: Path, *, steps, epochs,
                  processes, resume, lora_gguf, reward, reward_weights, generations, max_completion, seq_len, as_json,
                  **kw) -> Optional[int]:
    """--method dpo|grpo: LoRA on TRL's trainers (train/rewards.py), data parallel with --processes N."""
    from ..eval.graders import parse_graders
    from ..runtime.llama import LlamaModel
    from ..train.rewards import RewardConfig, run
    from ..train.tune import find_base, process_rank

    if epochs is not None:
        raise LlmdeskError(f"--epochs is not available with --method {method}: give --steps")
    if len(data) != 1:
        raise LlmdeskError(f"--method {method} reads one data file: "
                           + ("prompt/chosen/rejected rows" if method == "dpo" else "prompts and the columns the graders read"))
    graders = weights = None
    if method == "grpo":
        if not reward:
            raise LlmdeskError("--method grpo needs graders: --reward exact, regex:PATTERN, numeric, json, "
                               "python:FILE.py:FUNCTION or judge:MODEL")
        specs = [x for r in reward for x in (r.split(",") if not r.startswith(("regex:", "python:")) else [r])]
        graders, weights = parse_graders(specs, reward_weights)
    elif reward or reward_weights:
        raise LlmdeskError("--reward goes with --method grpo")
    if kw["sft_weight"] and method != "dpo":
        raise LlmdeskError("--sft-weight goes with --method dpo")
    gguf, name, merge = kw.pop("gguf"), kw.pop("name"), kw.pop("merge")
    quantizer = None
    if gguf is not None and gguf.lower() not in ("f32", "f16", "bf16", "q8_0"):
        from ..quantize.core import quant_type
        from ..quantize.workflow import quantize_model

        quant_type(gguf)
        quantizer = quantize_model
    lr, val_split = kw.pop("lr"), kw.pop("val_split")
    cfg = RewardConfig(method=method, steps=steps or 50, lr=lr or 0.0, num_generations=generations,
                       max_prompt_tokens=seq_len, max_completion_tokens=max_completion,
                       val_split=val_split if method == "grpo" else 0.0, processes=processes if processes > 1 else 0,
                       **kw)
    if processes > 1:  # the settings and the base are checked: now the same command in each process
        find_base(base_ref)
        return _launch(ctx, processes)

    def on_event(kind: str, d: dict) -> None:
        if as_json:
            return
        if kind == "step" and "loss" in d:
            more = f" · reward {d['reward']:.3f}" if "reward" in d else (
                f" · chosen-rejected margin {d['rewards/margins']:.3f}" if "rewards/margins" in d else "")
            err.print(f"step {d['step']}/{d.get('max_steps', cfg.steps)}: loss {d['loss']:.4f}{more}", markup=False)
        elif kind == "reward":
            err.print(f"held-out reward {d['when']} training: {d['reward']:.3f} "
                      f"({', '.join(f'{k} {v:.3f}' for k, v in d['graders'].items())})", markup=False)
        elif kind == "status":
            err.print(d["text"] + " ...", markup=False)
        elif kind == "interrupted":
            err.print(f"interrupted: checkpoint {d['checkpoint']} at step {d['step']}; continue with --resume"
                      if d["checkpoint"] else "interrupted before the first checkpoint; start again", markup=False)

    with _one_voice():
        r = run(method, base_ref, data[0], output, cfg, graders=graders, weights=weights, merge=merge, gguf=gguf,
                name=name, resume=resume, lora_gguf=lora_gguf, quantize_with=quantizer, check_with=LlamaModel,
                on_event=on_event)
    if process_rank() != 0:  # the first process speaks for all
        return None
    if as_json:
        out.print(json.dumps(r.to_dict()), markup=False)
        return None
    gain = (f"; held-out reward {r.reward_before:.3f} -> {r.reward_after:.3f}"
            if r.reward_before is not None and r.reward_after is not None else "")
    where = f" in {r.processes} processes" if r.processes > 1 else ""
    out.print(f"tuned with {method} for {r.steps} steps{where} ({r.seconds:.0f} s){gain}", markup=False)
    wrote = [str(p) for p in (r.adapter, r.lora_gguf, r.merged, r.gguf, r.plot) if p is not None]
    out.print("wrote " + " · ".join(wrote), markup=False)
    if r.registered:
        out.print(f"run it: llmdesk run -m {r.registered}", markup=False)
    return None


@contextmanager
def _one_voice():
    """In a run of several processes, an error is said once, by rank 0 (the others exit with 1),
    and an interrupt by rank 0's "interrupted: checkpoint ..." line (all exit with 130)."""
    from ..train.tune import process_rank

    try:
        yield
    except LlmdeskError:
        if process_rank() != 0:
            raise typer.Exit(1) from None
        raise
    except KeyboardInterrupt:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise SystemExit(130) from None  # past the CLI's own "interrupted" (the launcher's to say)
        raise


def _launch(ctx: typer.Context, processes: int) -> int:
    """This same command, without --processes, run in `processes` processes."""
    from ..train.tune import launch

    argv: list[str] = []
    for p in ctx.command.params:
        value = ctx.params.get(p.name)
        if p.name == "processes" or value is None or value == p.default or value in ((), []):
            continue
        if p.param_type_name == "argument":
            argv += [str(v) for v in value]
        elif getattr(p, "is_flag", False):
            argv.append(p.opts[-1])
        elif isinstance(value, (list, tuple)):  # a repeated option
            for v in value:
                argv += [p.opts[-1], str(v)]
        else:
            argv += [p.opts[-1], str(value)]
    rc = launch(processes, argv)
    if rc:  # the processes said why (rank 0, once: an error, or where an interrupted run can resume),
        raise SystemExit(rc)  # so past the CLI's own "interrupted"
    return 0


def _inspect(base_ref: str, data: list[str], seq_len: int, html: Optional[Path], train_on: str,
             chat_template: Optional[str]) -> None:
    from ..train import sft_data
    from ..train.tune import find_base, load_tokenizer

    b = find_base(base_ref)
    rows = sft_data.read_rows([Path(p) for p in data])
    tok = load_tokenizer(b)
    out.print(sft_data.inspect(rows, tok, n=3, html=html, seq_len=seq_len, train_on=train_on,
                               chat_template=chat_template), highlight=False)
