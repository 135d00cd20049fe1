"""Estimated against measured memory: the check behind fit's numbers.

For each (preset, type, ctx, parallel, batch) of a grid: make the model (random weights, real
shapes), load it in a child process the way users do (bench/memory.py), read the peak RSS, and
compare with `fit.memory.estimate_memory` for the same settings. Used by tests/test_fit_accuracy.py (a small
grid) and benchmarks/fit_accuracy.py (the table in docs/fit.md).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from ..fit.memory import estimate_memory
from ..fit.presets import resolve_shape


@dataclass
class GridPoint:
    preset: str
    type: str
    ctx: int
    parallel: int = 1
    batch: int = 512
    layers: int | None = None  # None: the preset's own depth


@dataclass
class Comparison:
    point: GridPoint
    file: str
    measured_bytes: int
    estimated_bytes: int
    measured: dict
    estimate: dict

    @property
    def error(self) -> float:
        """Signed relative error of the estimate (+: the estimate is higher)."""
        return (self.estimated_bytes - self.measured_bytes) / self.measured_bytes


def model_file(point: GridPoint, folder: Path) -> Path:
    from .make_model import make_model

    depth = f"-L{point.layers}" if point.layers else ""
    path = folder / f"{point.preset}{depth}-{point.type.lower()}.gguf"
    if not path.exists():
        make_model(point.preset, point.type, path, layers=point.layers)
    return path


def compare(point: GridPoint, folder: Path, threads: int | None = None) -> Comparison:
    from .memory import measure

    path = model_file(point, folder)
    m = measure(path, ctx=point.ctx, parallel=point.parallel, batch=point.batch, threads=threads)
    src = resolve_shape(str(path))
    e = estimate_memory(src.shape, quant=None, ctx=point.ctx, parallel=point.parallel, batch=point.batch,
                        gguf_info=src.gguf)
    return Comparison(point, str(path), m["peak_rss_bytes"], e.total_bytes, m, e.to_dict())


def summary(rows: list[Comparison]) -> dict[str, float]:
    errs = [abs(r.error) for r in rows]
    return {"n": len(rows), "median_abs_error": statistics.median(errs) if errs else 0.0,
            "max_abs_error": max(errs) if errs else 0.0}


def markdown(rows: list[Comparison]) -> str:
    MiB = 1 << 20
    out = ["| model | type | ctx | parallel | batch | measured peak RSS (MiB) | estimate (MiB) | error |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        p = r.point
        name = p.preset + (f" ({p.layers} layer{'s' if p.layers > 1 else ''})" if p.layers else "")
        out.append(f"| {name} | {p.type.lower()} | {p.ctx} | {p.parallel} | {p.batch} | "
                   f"{r.measured_bytes / MiB:,.0f} | {r.estimated_bytes / MiB:,.0f} | {100 * r.error:+.1f}% |")
    s = summary(rows)
    out.append("")
    out.append(f"{s['n']} configurations: median absolute error {100 * s['median_abs_error']:.1f}%, "
               f"worst {100 * s['max_abs_error']:.1f}%.")
    return "\n".join(out)
