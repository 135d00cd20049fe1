"""`llmdesk bench`: prompt processing and generation speed, measured through the Engine.

Like llama.cpp's llama-bench: every combination of the prompt sizes (-p), generation lengths
(-n), thread counts (-t) and batch sizes (-b) is a test; each test runs once untimed (warm-up)
and then `reps` times; rows give the mean and standard deviation of tokens/s.

- `pp<N>`: prefill N random tokens into an empty sequence; tokens/s = N / (time from admission to
  the first sampled token). That time is also the time to first token (TTFT).
- `tg<N>`: from a one-token prompt, generate N more tokens greedily (end-of-sequence ignored);
  tokens/s = N / (time from the first token to the last).

Every test goes through `Engine.submit` with one slot, the path `llmdesk run` and the server take.
Random prompts differ per repetition, so the Engine's prefix cache never shortens a prefill.

For generation rows, achieved bandwidth = bytes read per token (all weights but the token
embedding, plus the KV cache so far; fit/speed.py) x tokens/s, and the roofline fraction divides
it by this machine's measured bandwidth (fit/hardware.py). Prompt rows get achieved FLOPS the
same way.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import statistics
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import atomic
from ..errors import LlmdeskError


@dataclass
class BenchRow:
    test: str  # "pp512" | "tg128"
    n_prompt: int
    n_gen: int
    threads: int
    batch: int
    reps: int
    tokens_per_second: float  # mean
    stddev: float
    samples: list[float] = field(default_factory=list)
    ttft_ms: float | None = None  # prompt tests: mean time to first token
    bytes_per_token: int = 0
    achieved_gbs: float | None = None  # generation tests
    roofline_fraction: float | None = None
    achieved_tflops: float | None = None  # prompt tests
    compute_fraction: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BenchRun:
    model: str
    path: str
    sha256: str
    file_type: str | None
    model_bytes: int
    n_params: int
    machine: dict[str, Any]
    rows: list[BenchRow]
    started: str = ""
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # groups a run's rows in the store

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rows"] = [r.to_dict() for r in self.rows]
        return d


def parse_list(text: str | list[int] | None, what: str, default: list[int], minimum: int = 0) -> list[int]:
    """'512,1024' or '1-4' (or repeated options) -> [512, 1024] / [1, 2, 3, 4]."""
    if text is None or text == [] or text == "":
        return list(default)
    items = text if isinstance(text, list) else [text]
    out: list[int] = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                if "-" in part[1:]:
                    lo, hi = part.split("-", 1)
                    out.extend(range(int(lo), int(hi) + 1))
                else:
                    out.append(int(part))
            except ValueError:
                raise LlmdeskError(f"{what} takes numbers separated by commas (e.g. 128,512), got '{part}'") from None
    bad = [v for v in out if v < minimum]
    if bad:
        raise LlmdeskError(f"{what} values must be at least {minimum}, got {bad[0]}")
    return list(dict.fromkeys(out))


def file_sha256(path: Path) -> str:
    """sha256 of a model file, cached by path, size and mtime (hashing GBs takes seconds)."""
    from ..store import paths

    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    cache_file = paths.cache_dir() / "sha256.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    cache[key] = digest
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(cache_file, json.dumps(dict(list(cache.items())[-200:])))
    except OSError:
        pass
    return digest


def _mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return 0.0, 0.0
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


Progress = Callable[[str, int, int], None]  # (test label, done, total)


class EngineBench:
    """pp/tg timings through an Engine with one slot: the code `llmdesk bench` runs per (threads, batch)."""

    def __init__(self, llama, *, n_ctx: int, threads: int, batch: int, seed: int = 0):
        import numpy as np

        from ..runtime.engine import Engine, SamplingParams

        self.llama = llama
        self.engine = Engine(llama, n_ctx=n_ctx, n_slots=1, n_batch=batch, n_threads=threads)
        self.n_ctx = n_ctx
        self.rng = np.random.default_rng(seed)
        self.greedy = SamplingParams(temperature=0)

    def tokens(self, n: int) -> list[int]:
        return self.rng.integers(0, self.llama.n_vocab, size=n).tolist()

    def _run(self, prompt: list[int], max_tokens: int):
        from ..runtime.engine import Request

        r = self.engine.submit(Request(prompt, max_tokens=max_tokens, sampling=self.greedy, ignore_eos=True)).wait()
        if r.finish_reason == "error":
            raise LlmdeskError(f"the benchmark failed: {r.error}")
        return r

    def pp(self, n: int) -> tuple[float, float]:
        """(tokens/s, time to first token in s) of prefilling n random tokens."""
        r = self._run(self.tokens(n), 1)
        return n / r.prefill_s, r.ttft_s

    def tg(self, n: int) -> float:
        """tokens/s of generating n tokens after the first."""
        r = self._run(self.tokens(1), n + 1)
        return (r.n_gen - 1) / r.decode_s

    def close(self) -> None:
        self.engine.close()




def run_bench(ref: str, *, prompts: list[int] | None = None, gens: list[int] | None = None,
              threads: list[int] | None = None, batches: list[int] | None = None, reps: int = 5,
              warmup: bool = True, progress: Progress | None = None, measure_machine: bool = True,
              seed: int = 0, gpu_layers: int = 0) -> BenchRun:
    """Benchmark the model `ref` (path, store name or hf: ref) through the Engine."""
    from ..fit.hardware import machine as detect
    from ..fit.memory import estimate_memory
    from ..fit.presets import from_gguf
    from ..fit.speed import bytes_per_token, flops_per_token
    from ..formats.gguf import read_gguf
    from ..runtime.llama import LlamaModel, default_threads, gpu_offload
    from ..store.refs import resolve

    prompts = [512] if prompts is None else prompts
    gens = [128] if gens is None else gens
    threads = threads or [default_threads()]
    batches = batches or [512]
    if reps < 1:
        raise LlmdeskError(f"-r/--reps must be at least 1, got {reps}")
    tests = [("pp", n) for n in prompts if n > 0] + [("tg", n) for n in gens if n > 0]
    if not tests:
        raise LlmdeskError("nothing to measure: give -p and/or -n values above 0")
    found = resolve(ref)
    info = read_gguf(found.path)
    shape, _ = from_gguf(found.path)
    sha = found.entry.sha256 if found.entry is not None and getattr(found.entry, "sha256", None) else file_sha256(found.path)
    need_ctx = max([n + 8 for k, n in tests if k == "pp"] + [n + 8 for k, n in tests if k == "tg"] + [256])
    n_ctx = (need_ctx + 255) // 256 * 256
    est = estimate_memory(shape, quant=None, ctx=n_ctx, gguf_info=info)
    m = detect(measure=measure_machine)
    llama = LlamaModel(found.path, n_gpu_layers=gpu_layers)
    # with layers on a GPU, this CPU's bandwidth and compute are not the bound: no roofline shares
    on_cpu = not (gpu_layers and gpu_offload())
    rows: list[BenchRow] = []
    combos = list(itertools.product(threads, batches))
    total = len(combos) * len(tests) * reps
    done = 0
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        for t, b in combos:
            if t < 1 or b < 1:
                raise LlmdeskError("-t and -b values must be at least 1")
            eb = EngineBench(llama, n_ctx=n_ctx, threads=t, batch=b, seed=seed)
            try:
                if warmup:  # llama-bench's warm-up: one short untimed run of each kind
                    eb.pp(min(32, n_ctx - 8))
                    eb.tg(4)
                for kind, n in tests:
                    label = f"{kind}{n}"
                    samples, ttfts = [], []
                    for _ in range(reps):
                        tps, ttft = eb.pp(n) if kind == "pp" else (eb.tg(n), None)
                        samples.append(tps)
                        if ttft is not None:
                            ttfts.append(ttft)
                        done += 1
                        if progress:
                            progress(f"{label} t={t} b={b}", done, total)
                    mean, sd = _mean_std(samples)
                    row = BenchRow(label, n if kind == "pp" else 0, n if kind == "tg" else 0, t, b, reps, mean, sd,
                                   samples, ttft_ms=1000 * statistics.fmean(ttfts) if ttfts else None)
                    if kind == "tg":
                        # the KV cache read grows with the position: count it at the average depth
                        row.bytes_per_token = bytes_per_token(shape, est, depth=n // 2, gguf_info=info)
                        row.achieved_gbs = row.bytes_per_token * mean / 1e9
                        if m.bandwidth_gbs and on_cpu:
                            row.roofline_fraction = row.achieved_gbs / m.bandwidth_gbs
                    else:
                        fpt = flops_per_token(shape, n)
                        row.achieved_tflops = fpt * mean / 1e12
                        if m.fp32_gflops and on_cpu:  # against the peak of the threads used
                            peak = m.fp32_gflops * min(t, m.cores) / m.cores
                            row.compute_fraction = row.achieved_tflops * 1000 / peak
                    rows.append(row)
            finally:
                eb.close()
    finally:
        llama.close()
    return BenchRun(model=found.name, path=str(found.path), sha256=sha, file_type=info.file_type,
                    model_bytes=sum(t.nbytes for t in info.tensors), n_params=info.parameter_count,
                    machine={"cpu": m.cpu, "cores": m.cores, "ram_bytes": m.ram_bytes,
                             "bandwidth_gbs": m.bandwidth_gbs, "fp32_gflops": m.fp32_gflops,
                             "gpu_layers": gpu_layers if not on_cpu else 0},
                    rows=rows, started=started)


# ---------------------------------------------------------------------------------------------
# results store


def store_run(run: BenchRun) -> list[int]:
    """One results row per test (kind "bench"), so later runs compare test by test."""
    from .. import __version__
    from ..store.results import record

    ids = []
    for row in run.rows:
        settings = {"test": row.test, "n_prompt": row.n_prompt, "n_gen": row.n_gen, "threads": row.threads,
                    "batch": row.batch, "reps": row.reps, "run": run.run_id, "started": run.started, "cpu": run.machine.get("cpu"),
                    "file_type": run.file_type, "llmdesk": __version__}
        ids.append(record("bench", model=run.model, metrics=row.to_dict(), settings=settings,
                          model_sha256=run.sha256))
    return ids


def earlier_runs(run: BenchRun, limit: int = 200) -> list[dict[str, Any]]:
    """Earlier rows of the same model (by sha256) with the same test, threads and batch."""
    from ..store.results import query

    mine = {(r.test, r.threads, r.batch) for r in run.rows}
    out = []
    for res in query("bench", model_sha256=run.sha256, limit=limit):
        s = res["settings"]
        if s.get("run") == run.run_id:
            continue
        if (s.get("test"), s.get("threads"), s.get("batch")) in mine:
            out.append(res)
    return out
