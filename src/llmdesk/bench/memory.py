"""Measure what a model really takes: load it the way users do, in a child process, and read
the process's peak memory and llama.cpp's own buffer sizes.

    python -m llmdesk.bench.memory MODEL.gguf --ctx 2048 [--parallel N] [--batch N]

prints one JSON object. How memory is counted (Linux, /proc/self/status):

- `peak_rss_bytes` is VmHWM, the high-water mark of the resident set: anonymous memory (KV cache,
  compute buffers, repacked weights, Python) plus the pages of the mmapped model file that the
  process has touched. llama.cpp maps the file with MAP_POPULATE, so after loading every weight
  page is resident and counted, as it is once every token of the vocabulary has been used.
- the child loads through `llmdesk.runtime.model.Model` (the Engine users run), prefills a prompt
  that fills the context (so the KV cache, the attention mask and the compute buffer are written,
  not only reserved) and generates a few tokens: the peak of a full-context request.
- `baseline_rss_bytes` is the resident set after importing llmdesk and llama.cpp, before the model.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

MiB = 1 << 20

# llama.cpp's log lines (llama-model.cpp, llama-context.cpp, llama-kv-cache.cpp)
_BUFFER_RES = {
    "model": re.compile(r"load_tensors:\s+(\S+) model buffer size =\s+([\d.]+) MiB"),
    "kv": re.compile(r"(\S+) KV buffer size =\s+([\d.]+) MiB"),
    "compute": re.compile(r"(\S+) compute buffer size =\s+([\d.]+) MiB"),
    "output": re.compile(r"(\S+)\s+output buffer size =\s+([\d.]+) MiB"),
}


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def _child(path: str, ctx: int, parallel: int, batch: int, threads: int | None, gen: int) -> dict:
    lines: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    lg = logging.getLogger("llmdesk.llama")
    lg.setLevel(logging.DEBUG)
    lg.addHandler(_Keep())
    lg.propagate = False

    import numpy as np

    from llmdesk.runtime.model import Model

    base = _status()
    model = Model(path, ctx=ctx, slots=parallel, batch=batch, threads=threads)
    after_load = _status()
    n_prompt = max(1, model.n_ctx - gen - 2)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, model.llama.n_vocab, size=n_prompt).tolist()
    c = model.complete(prompt, max_tokens=gen, temperature=0, ignore_eos=True)
    end = _status()
    buffers: dict[str, dict[str, float]] = {k: {} for k in _BUFFER_RES}
    for line in lines:
        for kind, rx in _BUFFER_RES.items():
            m = rx.search(line)
            if m:
                size = float(m.group(2)) * MiB
                if kind == "kv":  # a sliding-window model has two caches, each logs its buffer
                    size += buffers[kind].get(m.group(1), 0.0)
                buffers[kind][m.group(1)] = size
    model.close()
    return {
        "model": str(path), "ctx": ctx, "parallel": parallel, "batch": batch,
        "n_ctx": model.n_ctx, "n_prompt": n_prompt, "n_gen": c.completion_tokens,
        "file_size": Path(path).stat().st_size,
        "baseline_rss_bytes": base["VmRSS"],
        "load_rss_bytes": after_load["VmRSS"],
        "peak_rss_bytes": end["VmHWM"],
        "rss_anon_bytes": end["RssAnon"], "rss_file_bytes": end["RssFile"],
        "buffers": buffers,
    }


def measure(path: str | Path, *, ctx: int, parallel: int = 1, batch: int = 512,
            threads: int | None = None, gen: int = 4, timeout: float = 600) -> dict:
    """Run the measurement in a fresh Python process (so nothing else is in its memory)."""
    cmd = [sys.executable, "-m", "llmdesk.bench.memory", str(path), "--ctx", str(ctx),
           "--parallel", str(parallel), "--batch", str(batch), "--gen", str(gen)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {path} failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--ctx", type=int, required=True)
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--gen", type=int, default=4)
    a = ap.parse_args(argv)
    print(json.dumps(_child(a.model, a.ctx, a.parallel, a.batch, a.threads, a.gen)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
