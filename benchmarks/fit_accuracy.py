"""fit's memory estimate against llama.cpp's real peak memory, on a grid of real model shapes.

    .venv/bin/python benchmarks/fit_accuracy.py [--models DIR] [--json OUT.json] [--quick]

Makes each model with `llmdesk make-model` (random weights, exact shapes; cached in --models),
loads it in a fresh process through llmdesk's Engine, prefills a prompt that fills the context,
reads the process's peak RSS (VmHWM: anonymous memory plus the mmapped weight pages, which
llama.cpp populates at load) and prints the table that docs/fit.md shows. Memory, not time: the
numbers do not depend on how busy the machine is.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from llmdesk.bench.fit_accuracy import GridPoint, compare, markdown, summary

GRID = [
    GridPoint("smollm2-135m", "f16", 2048),
    GridPoint("smollm2-135m", "q8_0", 512),
    GridPoint("smollm2-135m", "q8_0", 8192),
    GridPoint("smollm2-135m", "q4_k_m", 2048),
    GridPoint("smollm2-360m", "q8_0", 2048),
    GridPoint("smollm2-360m", "q4_k_m", 4096),
    GridPoint("smollm2-360m", "q4_k_m", 2048, parallel=4),
    GridPoint("qwen2.5-0.5b", "f16", 1024),
    GridPoint("qwen2.5-0.5b", "q8_0", 4096),
    GridPoint("qwen2.5-0.5b", "q4_k_m", 2048),
    GridPoint("qwen2.5-0.5b", "q4_k_m", 2048, batch=128),
    GridPoint("tinyllama-1.1b", "q8_0", 2048),
    GridPoint("tinyllama-1.1b", "q4_0", 2048),
    GridPoint("tinyllama-1.1b", "q4_k_m", 512),
    GridPoint("tinyllama-1.1b", "q4_k_m", 2048),
    GridPoint("tinyllama-1.1b", "q4_k_m", 1024, parallel=2),
    GridPoint("llama-3.2-1b", "q8_0", 1024),
    GridPoint("llama-3.2-1b", "q4_k_m", 4096),
    # the other architectures, at reduced depth (their full models take long to make here)
    GridPoint("gemma-2-2b", "q8_0", 8192, layers=4),  # sliding-window layers keep 4,096 + 512 cells
    GridPoint("phi-3-mini", "q4_k_m", 2048, layers=4),  # fused qkv and gate+up
    GridPoint("mixtral-8x7b", "q4_k_m", 1024, layers=1),  # 8 experts, repacked
]

QUICK = [GridPoint("smollm2-135m", "q8_0", 1024), GridPoint("tinyllama-1.1b", "q4_k_m", 1024)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=Path, default=Path.home() / ".cache" / "llmdesk-bench-models")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    ap.add_argument("--quick", action="store_true", help="two configurations only")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    a.models.mkdir(parents=True, exist_ok=True)
    rows = []
    for point in QUICK if a.quick else GRID:
        t0 = time.perf_counter()
        r = compare(point, a.models, threads=a.threads)
        rows.append(r)
        print(f"{point.preset} {point.type} ctx={point.ctx} parallel={point.parallel} batch={point.batch}: "
              f"measured {r.measured_bytes / 2**20:,.0f} MiB, estimated {r.estimated_bytes / 2**20:,.0f} MiB "
              f"({100 * r.error:+.1f}%) [{time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
    print(markdown(rows))
    if a.json:
        a.json.write_text(json.dumps({"summary": summary(rows), "rows": [
            {"point": r.point.__dict__, "file": r.file, "measured_bytes": r.measured_bytes,
             "estimated_bytes": r.estimated_bytes, "error": r.error, "measured": r.measured,
             "estimate": r.estimate} for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
