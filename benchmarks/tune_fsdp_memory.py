"""Peak memory of each process of `llmdesk tune`: one process, two data parallel, two sharded (--fsdp).

    .venv/bin/python benchmarks/tune_fsdp_memory.py [--models DIR] [--steps N] [--json OUT.json]

Runs the real command (`llmdesk tune BASE DATA -o OUT ... [--processes 2 [--fsdp]] --json`) for
LoRA and for all weights (--method full), on a random-weight model of SmolLM2-135M's shape (30
layers, 576 wide, a 49,152-token vocabulary; 135M parameters, 540 MB in float32 as tune trains on
a CPU; built by benchmarks/fit_train_vs_tune.py and cached in --models), rows of 256 tokens, the
same rows a step in every setting (one process: --batch 2; two: --batch 1 each). Each process's
peak resident memory (Linux VmHWM: everything, the interpreter and torch included) through
training is read from metrics.json (`peak_rss_per_process`), with the parameter bytes rank 0 held
(`param_bytes`). Memory, not time: the figures do not depend on how busy the cores are.

A process's peak comes from one of two moments: loading the base (every process reads the whole
checkpoint into memory before FSDP keeps its half: the whole model, once, for a moment) and
training (the weights, plus for full fine-tuning their gradients and AdamW's two moments, all
sharded by FSDP; and the activations, which are not). Each two-process setting is also run with a
fixed glibc mmap threshold (MALLOC_MMAP_THRESHOLD_), which keeps FSDP's per-layer gathers from
fragmenting the heap. The report gives --fsdp against data parallel.

Measured (2026-11-30, 2 shared CPU cores; docs/tune.md has the table): parameters held 0.50x;
largest peak per process 0.94x (full) and 1.11x (LoRA) with the default malloc, 0.79x and 0.96x
with the fixed threshold.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from fit_train_vs_tune import build_model  # noqa: E402  (the same random-weight models)

MODEL = "smollm2-135m"
# glibc's malloc raises its mmap threshold each time a large block is freed, up to 32 MiB; FSDP's
# per-layer gathers (allocated and freed every layer, every pass) then come from the heap, which
# fragments and keeps pages. A fixed threshold (1 MiB) keeps large blocks in mmap, returned on free.
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
SETTINGS = [  # (label, processes, fsdp, batch per process, environment)
    ("1 process", 1, False, 2, {}),
    ("2 processes, data parallel", 2, False, 1, {}),
    ("2 processes, --fsdp", 2, True, 1, {}),
    ("2 processes, data parallel, MALLOC_MMAP_THRESHOLD_=1MiB", 2, False, 1, FIXED_MMAP),
    ("2 processes, --fsdp, MALLOC_MMAP_THRESHOLD_=1MiB", 2, True, 1, FIXED_MMAP),
]


def run(base: Path, method: str, processes: int, fsdp: bool, batch: int, env: dict, steps: int, home: Path) -> dict:
    out = Path(tempfile.mkdtemp(dir=home, prefix="tune-")) / "out"
    cmd = [str(Path(sys.executable).parent / "llmdesk"), "tune", str(base), str(base / "data.jsonl"), "-o", str(out),
           "--method", method, "--rank", "16", "--steps", str(steps), "--seq-len", "256", "--truncate",
           "--train-on", "all", "--val-split", "0", "--batch", str(batch), "--json"]
    if processes > 1:
        cmd += ["--processes", str(processes)] + (["--fsdp"] if fsdp else [])
    r = subprocess.run(cmd, capture_output=True, text=True,
                       env={**os.environ, **env, "LLMDESK_HOME": str(home), "TOKENIZERS_PARALLELISM": "false"})
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return json.loads((out / "metrics.json").read_text())["result"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=Path, default=Path.home() / ".cache" / "llmdesk-bench-models")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    a = ap.parse_args()
    a.models.mkdir(parents=True, exist_ok=True)
    base = build_model(MODEL, a.models)
    MiB = 1 << 20
    rows = []
    with tempfile.TemporaryDirectory(prefix="tune-fsdp-") as home:
        for method in ("lora", "full"):
            for label, processes, fsdp, batch, env in SETTINGS:
                res = run(base, method, processes, fsdp, batch, env, a.steps, Path(home))
                rows.append({"method": method, "setting": label, "processes": processes, "fsdp": fsdp, "env": env,
                             "peak_rss_per_process": res["peak_rss_per_process"], "param_bytes": res["param_bytes"],
                             "final_loss": res["final_loss"], "total_params": res["total_params"]})
                print(f"{method}, {label}: peaks " + ", ".join(f"{p / MiB:,.0f}" for p in res["peak_rss_per_process"])
                      + f" MiB; parameters held {res['param_bytes'] / MiB:,.0f} MiB; loss {res['final_loss']:.4f}",
                      file=sys.stderr, flush=True)
    print(f"{MODEL} shape, {rows[0]['total_params'] / 1e6:.0f}M parameters, float32, rows of 256 tokens, "
          f"{a.steps} steps\n")
    print("| method | setting | peak RSS per process (MiB) | parameters held per process (MiB) | final loss |")
    print("| --- | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['method']} | {r['setting']} | {' / '.join(f'{p / MiB:,.0f}' for p in r['peak_rss_per_process'])} "
              f"| {r['param_bytes'] / MiB:,.0f} | {r['final_loss']:.4f} |")
    print()
    for method in ("lora", "full"):
        for env in ({}, FIXED_MMAP):
            dp, sh = (next(r for r in rows if r["method"] == method and r["processes"] == 2 and r["fsdp"] == f
                           and r["env"] == env) for f in (False, True))
            print(f"{method}{', fixed mmap threshold' if env else ''}: --fsdp / data parallel, peak RSS per "
                  f"process (largest): {max(sh['peak_rss_per_process']) / max(dp['peak_rss_per_process']):.2f}x; "
                  f"parameters held: {sh['param_bytes'] / dp['param_bytes']:.2f}x")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
