"""`llmdesk fit`: will a model fit here (or on a catalogued device), with how much memory, how fast."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import LlmdeskError
from .app import app, err, out


def _size(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:,.2f} {unit}"
    return f"{n:.0f} B"


def _rate(x: float) -> str:
    if x <= 0:
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.2f}"


@app.command()
def fit(
    model: Annotated[Optional[str], typer.Argument(help="A preset (llama-3.1-8b, qwen2.5-7b, ...), a .gguf file or store name, an HF config.json or checkpoint folder.")] = None,
    quant: Annotated[Optional[str], typer.Option("--quant", "-q", help="Quantization to count (q4_k_m, q8_0, f16, ...). Default: a GGUF's own; q4_k_m otherwise.")] = None,
    ctx: Annotated[Optional[int], typer.Option("--ctx", "-c", help="Context length per sequence, tokens (default: the model's, at most 4096).")] = None,
    parallel: Annotated[int, typer.Option("--parallel", "-np", help="Sequences served at once (each gets --ctx tokens of KV cache).")] = 1,
    batch: Annotated[Optional[int], typer.Option("--batch", "-b", help="Prompt batch (default 512); with --train, examples per micro-batch (default 4, as llmdesk tune).")] = None,
    kv_type: Annotated[str, typer.Option("--kv-type", help="KV cache type: f16, q8_0, q4_0, ...")] = "f16",
    device: Annotated[Optional[list[str]], typer.Option("--device", "-d", help="A catalogued device (rtx-4060, m2-max:96, raspberry-pi-5, ...); repeatable. 'auto': this machine only.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    devices: Annotated[bool, typer.Option("--devices", help="List the device catalog and exit.")] = False,
    presets: Annotated[bool, typer.Option("--presets", help="List the model presets and exit.")] = False,
    train: Annotated[Optional[str], typer.Option("--train", help="Also estimate training memory: full, lora or qlora.")] = None,
    seq_len: Annotated[int, typer.Option("--seq-len", help="With --train: tokens per example (llmdesk tune's --seq-len).")] = 1024,
    lora_rank: Annotated[int, typer.Option("--rank", "--lora-rank", help="With --train lora|qlora: LoRA rank (llmdesk tune's --rank).")] = 16,
    remeasure: Annotated[bool, typer.Option("--remeasure", help="Measure this machine's bandwidth again (it is cached).")] = False,
) -> None:
    """Estimate the memory a model needs (weights per tensor type, KV cache, compute and output
    buffers, overhead), whether it fits on this machine or a catalogued device, the largest
    context that fits, and decode/prefill speed from the bandwidth and compute rooflines."""
    from ..fit import DEVICES, PRESETS
    from ..fit.core import fit as run_fit

    if devices:
        _print_devices(DEVICES, as_json)
        return
    if presets:
        _print_presets(PRESETS, as_json)
        return
    if not model:
        raise LlmdeskError("give a MODEL: a preset name (see 'llmdesk fit --presets'), a .gguf file or a config.json")
    inference_batch = 512 if train or batch is None else batch
    report = run_fit(model, quant=quant, ctx=ctx, parallel=parallel, batch=inference_batch, kv_type=kv_type,
                     devices=device, train=train, seq_len=seq_len, train_batch=batch or 4, lora_rank=lora_rank,
                     remeasure=remeasure)
    if as_json:
        out.print(json.dumps(report.to_dict(), indent=1), markup=False, highlight=False)
        return
    _print_report(report)


def _print_report(r) -> None:
    o = out
    if not out.is_terminal:  # piped into a file: the whole table, not squeezed to 80 columns
        from rich.console import Console

        o = Console(highlight=False, soft_wrap=True, width=140, file=out.file)
    m = r.memory
    s = r.shape
    src = {"preset": f"preset, from {s['source']}", "gguf": "GGUF file", "config": "config.json"}[r.source]
    seqs = f"{m.parallel} sequences" if m.parallel > 1 else "1 sequence"
    o.print(f"{r.model} ({src}) at {r.quant.lower() if r.quant.isupper() else r.quant}, "
              f"ctx {m.ctx}, {seqs}, batch {m.batch}, KV {m.kv_type}", markup=False)
    o.print(f"{m.n_params / 1e9:.2f} B parameters, {s['n_layer']} layers, {s['n_head']} heads / "
              f"{s['n_head_kv']} KV heads x {s['head_dim']}, vocabulary {s['n_vocab']:,}", markup=False)
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column(justify="right")
    t.add_column(style="dim")
    bits = 8 * m.weights_bytes / m.n_params if m.n_params else 0
    mix = " + ".join(f"{k} {_size(v)}" for k, v in m.weights_by_type.items() if v >= 2**20)
    t.add_row("weights", _size(m.weights_bytes), f"{mix}, {bits:.2f} bits/weight")
    if m.repack_bytes:
        t.add_row("repacked", _size(m.repack_bytes), "CPU's interleaved copy of Q4 matrices")
    if s["causal"]:
        t.add_row("KV cache", _size(m.kv_cache_bytes),
                  f"{s['n_layer']} layers x {m.ctx} x {s['n_head_kv']} KV heads x {s['head_dim']} x K,V x {m.kv_type}"
                  + (f" x {m.parallel} seqs" if m.parallel > 1 else ""))
    else:
        t.add_row("KV cache", "none", "an encoder embeds each text in one pass and keeps no cache")
    t.add_row("compute buffer", _size(m.compute_bytes), f"CPU working set (GPU: {_size(m.compute_reserved_bytes)})")
    t.add_row("output buffer", _size(m.output_bytes),
              "logits per sequence" if s["causal"] else "logits and embedding per text of a batch")
    t.add_row("overhead", _size(m.overhead_bytes), "process + tokenizer tables")
    t.add_row("total (CPU)", _size(m.total_bytes),
              f"resident; {_size(m.required_bytes)} must fit" if m.repack_bytes else "resident")
    t.add_row("total (GPU)", _size(m.gpu_bytes), "all layers offloaded")
    o.print(t)
    o.print("")
    tt = Table(box=None, pad_edge=False, header_style="bold")
    for col, j in (("where", "left"), ("needs", "right"), ("has", "right"), ("fits", "left"),
                   ("max ctx", "right"), ("decode tok/s", "right"), ("prefill tok/s", "right")):
        tt.add_column(col, justify=j)
    for tg in r.targets:
        roof = f" (<{_rate(tg.decode_roofline_tokens_per_second)})" if tg.decode_roofline_tokens_per_second else ""
        tt.add_row(tg.name, _size(tg.needed_bytes), _size(tg.budget_bytes), "yes" if tg.fits else "NO",
                   f"{tg.max_ctx:,}" if tg.max_ctx else "-",
                   _rate(tg.decode_tokens_per_second) + roof if s["causal"] else "-",
                   _rate(tg.prefill_tokens_per_second))
    o.print(tt)
    if r.machine is not None:
        mm = r.machine
        bw = f", {mm.bandwidth_gbs:.1f} GB/s measured" if mm.bandwidth_gbs else ""
        err.print(f"this machine: {mm.cpu}, {mm.cores} threads, {mm.ram_bytes / 2**30:.1f} GB RAM{bw}", markup=False)
    for tg in r.targets:
        if tg.note:
            err.print(f"note: {tg.name}: {tg.note}", markup=False)
    for n in r.notes + m.notes:
        err.print(f"note: {n}", markup=False)
    if s["causal"]:
        o.print(f"decode reads {_size(r.bytes_per_token)} per token: tokens/s < bandwidth / that (the bound in "
                "brackets); prefill from compute", markup=False, style="dim")
    else:
        o.print("an embedding model: it does not decode; prefill is how fast it embeds, from compute",
                markup=False, style="dim")
    if r.training is not None:
        _print_training(o, r.training, r.machine)


def _print_training(o, cpu, machine=None) -> None:
    """The training estimate: this CPU (fp32, as llmdesk tune trains here) beside a CUDA GPU."""
    cols = [cpu, cpu.gpu] if cpu.device == "cpu" else [cpu]
    o.print("")
    o.print(f"training ({cpu.method}, seq {cpu.seq_len}, batch {cpu.batch}"
            + (f", LoRA rank {cpu.lora_rank} on all linear layers" if cpu.method != "full" else "")
            + (", gradient checkpointing" if cpu.checkpointing else "") + f"): "
            f"{cpu.trainable_params / 1e6:,.1f} M trainable parameters", markup=False)
    t = Table(box=None, pad_edge=False, header_style="bold")
    t.add_column("")
    heads = {"cpu": "CPU (fp32)", "cuda": "CUDA GPU (" + {"full": "fp32", "lora": "bf16", "qlora": "NF4"}[cpu.method] + ")"}
    for e in cols:
        t.add_column(heads[e.device], justify="right")
    t.add_column("")
    at = {"logits": "at the backward pass through the logits", "optimizer": "at the AdamW step",
          "loading": "while loading the weights"}
    weights = {"full": "fp32", "lora": "the frozen base (fp32 here, bf16 on a GPU) + fp32 adapters",
               "qlora": "the frozen base in NF4 (embeddings bf16) + fp32 adapters"}[cpu.method]
    rows = [("weights", "weights_bytes", weights),
            ("gradients", "gradients_bytes", "fp32, of the trained parameters"),
            ("optimizer", "optimizer_bytes", "AdamW's two moments, fp32"),
            ("activations", "activations_bytes", "what autograd keeps for the backward pass, every layer"
             if not cpu.checkpointing else "each layer's input, one layer recomputed at a time"),
            ("logits", "logits_bytes", "tokens x vocabulary in fp32, three arrays at once"),
            ("heap slack", "slack_bytes", "freed temporaries the C heap keeps beside the activations (CPU)"),
            ("overhead", "overhead_bytes", "the Python process with torch (GPU: the CUDA context)")]
    for label, key, note in rows:
        t.add_row(label, *(_size(getattr(e, key)) for e in cols), note)
    places = sorted({at[e.peak_at] for e in cols})
    t.add_row("peak", *(_size(e.total_bytes) for e in cols),
              places[0] if len(places) == 1 else "; ".join(f"{heads[e.device]}: {at[e.peak_at]}" for e in cols),
              style="bold")
    o.print(t)
    if machine is not None and cpu.device == "cpu":
        avail = machine.available_bytes or machine.ram_bytes
        fits = "fits" if cpu.total_bytes <= avail else "does NOT fit"
        o.print(f"llmdesk tune on this CPU: {_size(cpu.total_bytes)} at its peak {fits} in the "
                f"{_size(avail)} available", markup=False)
    if cpu.device != "cpu":
        err.print("note: QLoRA needs a CUDA GPU (bitsandbytes); llmdesk tune runs lora or full on a CPU", markup=False)


def _print_devices(devs, as_json: bool) -> None:
    if as_json:
        out.print(json.dumps([d.to_dict() for d in devs.values()], indent=1), markup=False, highlight=False)
        return
    out.print(f"{'device':<22}{'memory GB':>14}{'GB/s':>8}{'FP16 TFLOPS':>13}  name", markup=False, style="bold")
    for d in devs.values():
        mem = "/".join(f"{g:g}" for g in d.memory_options_gb) if d.memory_options_gb else f"{d.memory_gb:g}"
        fp = f"{d.fp16_tflops:g}" + (f" (NPU {d.npu_tops:g} TOPS)" if d.npu_tops else "")
        out.print(f"{d.key:<22}{mem:>14}{d.bandwidth_gbs:>8g}{fp:>13}  {d.name}", markup=False)
        out.print(f"{'':<22}source: {d.source}", markup=False, style="dim")


def _print_presets(presets, as_json: bool) -> None:
    if as_json:
        out.print(json.dumps([p.to_dict() for p in presets.values()], indent=1), markup=False, highlight=False)
        return
    from ..fit.memory import n_params

    out.print(f"{'preset':<16}{'params':>9}{'layers':>7}{'embd':>6}{'heads/kv':>9}{'ff':>8}{'vocab':>9}{'ctx':>8}"
              "  config.json of", markup=False, style="bold")
    for p in presets.values():
        ff = f"{p.n_ff}" + (f"x{p.n_expert}" if p.n_expert else "")
        out.print(f"{p.name:<16}{n_params(p) / 1e9:>8.2f}B{p.n_layer:>7}{p.n_embd:>6}{f'{p.n_head}/{p.n_head_kv}':>9}"
                  f"{ff:>8}{p.n_vocab:>9}{p.n_ctx_train:>8}  {p.source}", markup=False)
