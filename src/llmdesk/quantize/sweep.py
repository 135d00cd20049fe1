"""What each quantization costs: a sweep over types, as a table and a picture.

For each model (f16/f32 GGUF, store name or HF folder) and each type: quantize, then measure the
file size, bits per weight, perplexity on the text, KL divergence from the unquantized model on
the same tokens, and generation speed (tokens/s, one sequence, greedy). The unquantized model is
the first row of each model (KLD 0 by definition). Perplexity is comparable across models that
share a tokenizer, so several models of different sizes on one plot answer "is a bigger model
quantized harder better than a smaller one at the same file size?".

    s = sweep(["tiny-f16.gguf"], ["Q8_0", "Q4_K_M", "Q2_K"], text)
    s.markdown(); s.plot("sweep.png")
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..atomic import atomic_path
from ..errors import LlmdeskError
from ..eval.common import MeasuredModel, record, resolve_model
from .core import quant_type


@dataclass
class SweepPoint:
    model: str  # the unquantized model this point belongs to
    type: str  # "F16", "Q4_K_M", ...
    ref: str  # the measured model (store NAME:TAG or file)
    size: int  # bytes on disk
    bits_per_weight: float
    ppl: float
    ppl_stderr: float
    mean_kld: float
    median_kld: float
    p99_kld: float
    max_kld: float
    same_top_token: float
    rms_delta_p: float
    ppl_ratio: float
    tokens_per_second: float
    parameters: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SweepResult:
    points: list[SweepPoint]
    text_tokens: dict[str, int] = field(default_factory=dict)  # model -> tokens scored
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"points": [p.to_dict() for p in self.points], "tokens": self.text_tokens, "settings": self.settings}

    def markdown(self) -> str:
        """One table per model: what each type costs against the unquantized model."""
        lines = []
        for model in dict.fromkeys(p.model for p in self.points):
            pts = [p for p in self.points if p.model == model]
            base = pts[0]
            lines += [
                f"### {model}", "",
                f"{_count(base.parameters)} parameters; perplexity and KL divergence over "
                f"{self.text_tokens.get(model, 0):,} tokens (ctx {self.settings.get('ctx')}).", "",
                "| type | size | bits/weight | perplexity | Δ ppl | mean KLD | p99 KLD | same top token | RMS Δp | tokens/s |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            ]
            for p in pts:
                lines.append(
                    f"| {p.type} | {_size(p.size)} | {p.bits_per_weight:.2f} | {p.ppl:.4g} ± {p.ppl_stderr:.2g} "
                    f"| {100 * (p.ppl_ratio - 1):+.2f}% | {p.mean_kld:.5f} | {p.p99_kld:.4f} "
                    f"| {100 * p.same_top_token:.1f}% | {100 * p.rms_delta_p:.2f}% | {p.tokens_per_second:.1f} |"
                )
            lines.append("")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike) -> Path:
        """Quality against file size: perplexity (comparable across models) and mean KL
        divergence from each model's own unquantized version. PNG or SVG by the file name."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path).expanduser()
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
        for model in dict.fromkeys(p.model for p in self.points):
            pts = [p for p in self.points if p.model == model]
            mb = [p.size / 1e6 for p in pts]
            line = ax1.plot(mb, [p.ppl for p in pts], "o-", label=model)[0]
            ax1.errorbar(mb, [p.ppl for p in pts], yerr=[p.ppl_stderr for p in pts], fmt="none",
                         ecolor=line.get_color(), alpha=0.5)
            q = [p for p in pts if p.mean_kld > 0]
            ax2.plot([p.size / 1e6 for p in q], [p.mean_kld for p in q], "o-", color=line.get_color(), label=model)
            for p in pts:
                ax1.annotate(p.type, (p.size / 1e6, p.ppl), textcoords="offset points", xytext=(4, 4), fontsize=7)
            for p in q:
                ax2.annotate(p.type, (p.size / 1e6, p.mean_kld), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax1.set(xlabel="file size (MB)", ylabel="perplexity (lower is better)", title="perplexity against size")
        ax2.set(xlabel="file size (MB)", ylabel="mean KL divergence from unquantized (nats)",
                title="KL divergence against size")
        if any(p.mean_kld > 0 for p in self.points):
            ax2.set_yscale("log")
        ppls = [p.ppl for p in self.points if p.ppl > 0]
        if ppls and max(ppls) / min(ppls) > 5:  # models far apart: a log scale keeps both readable
            ax1.set_yscale("log")
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        for ax in (ax1, ax2):
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        with atomic_path(path, suffix=path.suffix) as tmp:
            fig.savefig(tmp, dpi=120)
        plt.close(fig)
        return path


def _size(n: int) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


# ---------------------------------------------------------------------------------------------
# generation speed


def generation_speed(model_path: str | os.PathLike, *, n_tokens: int = 64, repeats: int = 3,
                     threads: int | None = None) -> float:
    """Greedy decoding tokens/s of one sequence, through the Engine as `llmdesk run` decodes: the
    median of `repeats` runs of `n_tokens` tokens, each timed from its first token (the prompt,
    one BOS token, and the first token are not timed: Result.tokens_per_second)."""
    from ..runtime.engine import Engine, Request, SamplingParams
    from ..runtime.llama import LlamaModel

    model = LlamaModel(model_path)
    try:
        rates = []
        start = [model.bos if model.bos >= 0 else 0]
        with Engine(model, n_ctx=max(16, n_tokens + 8), n_slots=1, n_batch=8, n_threads=threads) as engine:
            for _ in range(max(1, repeats)):  # a one-token prompt: nothing is reused from the run before
                r = engine.submit(Request(start, max_tokens=n_tokens + 1, sampling=SamplingParams(temperature=0),
                                          ignore_eos=True)).wait()
                if r.finish_reason == "error":
                    raise LlmdeskError(f"{Path(model_path).name}: decoding failed while measuring speed: {r.error}")
                rates.append(r.tokens_per_second)
        return float(np.median(rates))
    finally:
        model.close()


# ---------------------------------------------------------------------------------------------
# the sweep


def sweep(
    models: list[str | os.PathLike],
    types: list[str],
    text: str,
    *,
    ctx: int | None = None,
    stride: int | None = None,
    imatrix: str | os.PathLike | None = None,
    threads: int | None = None,
    tg_tokens: int = 64,
    say: Callable[[str], None] | None = None,
    progress=None,
) -> SweepResult:
    """Quantize each model to each type and measure every result (see the module docstring).
    `say(message)` is told what is happening; `progress(done, total, tensor)` follows each
    quantization. Every point is recorded in the results store (kind "sweep")."""
    from ..eval.kld import compute_base, kl_divergence
    from ..eval.ppl import nll_stats
    from ..formats.gguf import read_gguf
    from .workflow import quantize_model

    tell = say or (lambda _m: None)
    names = [quant_type(t)[0] for t in types]  # unknown types fail before any work
    if not names:
        raise LlmdeskError("--sweep needs at least one type, e.g. --sweep Q8_0,Q4_K_M,Q2_K")
    if imatrix is not None and len(models) > 1:
        raise LlmdeskError("--imatrix belongs to one model; sweep one model at a time with it")
    from .core import QUANT_TYPES

    needs = [n for n in names if QUANT_TYPES[n].needs_imatrix]
    if needs and imatrix is None:
        raise LlmdeskError(f"{', '.join(needs)} need an importance matrix: pass --imatrix FILE "
                           "(make one with 'llmdesk imatrix MODEL TEXT -o FILE')")
    result = SweepResult(points=[], settings={"types": names, "ctx": ctx, "stride": stride,
                                              "imatrix": str(imatrix) if imatrix else None, "tg_tokens": tg_tokens})
    from .workflow import store_name_for

    sources = [resolve_model(ref, say=tell) for ref in models]
    seen: dict[str, Path] = {}
    for src in sources:
        other = seen.setdefault(store_name_for(src), src.path.resolve())
        if other != src.path.resolve():
            raise LlmdeskError(
                f"{other} and {src.path} would both be stored as '{store_name_for(src)}:TYPE'; "
                f"import them under distinct names first ('llmdesk import FILE --name NAME')"
            )
    labels = [s.name for s in sources]
    for i, src in enumerate(sources):  # two files of the same name: say which folder
        if labels.count(src.name) > 1:
            src.name = f"{src.path.parent.name}/{src.path.name}"
    for src in sources:
        info = read_gguf(src.path)
        base_type = info.file_type or "base"
        tell(f"{src.name}: evaluating the unquantized model ({base_type})")
        bl = compute_base(src.path, text, ctx=ctx, stride=stride, threads=threads)
        result.settings["ctx"], result.settings["stride"] = bl.ctx, bl.stride
        result.text_tokens[src.name] = int(bl.targets.size)
        ppl, ppl_se, _, _ = nll_stats(-bl.target_logprob)
        tps = generation_speed(src.path, n_tokens=tg_tokens, threads=threads)
        base_pt = SweepPoint(
            model=src.name, type=base_type, ref=src.name, size=src.path.stat().st_size,
            bits_per_weight=info.bits_per_weight, ppl=ppl, ppl_stderr=ppl_se, mean_kld=0.0, median_kld=0.0,
            p99_kld=0.0, max_kld=0.0, same_top_token=1.0, rms_delta_p=0.0, ppl_ratio=1.0, tokens_per_second=tps,
            parameters=info.parameter_count,
        )
        _record(base_pt, src, text, result.settings)
        result.points.append(base_pt)
        for tname in names:
            tell(f"{src.name}: quantizing to {tname}")
            q = quantize_model(src, tname, imatrix=imatrix, threads=threads, progress=progress)
            tell(f"{src.name}: measuring {q.ref}")
            k = kl_divergence(bl, q.path, text, threads=threads)
            tps = generation_speed(q.path, n_tokens=tg_tokens, threads=threads)
            pt = SweepPoint(
                model=src.name, type=tname, ref=q.ref, size=q.size, bits_per_weight=q.bits_per_weight,
                ppl=k.ppl_model, ppl_stderr=k.extra["ppl_model_stderr"], mean_kld=k.mean_kld,
                median_kld=k.median_kld, p99_kld=k.p99_kld, max_kld=k.max_kld, same_top_token=k.same_top_token,
                rms_delta_p=k.rms_delta_p, ppl_ratio=k.ppl_ratio, tokens_per_second=tps,
                parameters=info.parameter_count,
            )
            _record(pt, MeasuredModel(Path(q.path), q.ref, q.sha256), text, result.settings, base=src)
            result.points.append(pt)
    return result


def _record(pt: SweepPoint, model: MeasuredModel, text: str, settings: dict, base: MeasuredModel | None = None) -> None:
    metrics = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
               for k, v in pt.to_dict().items() if k not in ("model", "ref")}
    record("sweep", model, metrics=metrics,
           settings={**settings, "base": (base or model).name, "base_sha256": (base or model).sha256}, text=text)
